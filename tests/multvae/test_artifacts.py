"""Model versions: atomic writes, verification, reload equality, CURRENT, garbage collection."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from multvae import artifacts
from multvae.artifacts import (
    current_version,
    list_versions,
    load_version,
    remove_old_versions,
    set_current,
    write_version,
)
from multvae.errors import ArtifactError, NoModelError, VerificationError
from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE
from multvae.recommend import Recommender


def _model(n_items: int = 30, seed: int = 0) -> MultVAE:
    torch.manual_seed(seed)
    return MultVAE(ModelConfig.default("multvae", n_items)).eval()


def _items(n_items: int = 30) -> ItemIndex:
    return ItemIndex.build([f"m{i}" for i in range(n_items)], np.arange(n_items)[::-1])


def _write(model_dir: Path, seed: int = 0, **kwargs: object) -> str:
    return write_version(model_dir, _model(seed=seed), _items(), {"test": {}}, **kwargs)  # type: ignore[arg-type]


def test_save_then_load_gives_identical_scores(tmp_path: Path) -> None:
    model = _model()
    version = write_version(tmp_path, model, _items(), {"test": {"ndcg@100": 0.5}}, {"beta": 0.2})
    loaded = load_version(tmp_path)
    assert loaded.version == version == current_version(tmp_path)
    assert loaded.config["beta"] == 0.2
    assert loaded.metrics["test"]["ndcg@100"] == 0.5
    assert loaded.items.ids == _items().ids
    history = ["m1", "m5", "m7"]
    a = Recommender(model, _items()).recommend(history, 10)
    b = Recommender(loaded.model, loaded.items).recommend(history, 10)
    assert a.items == b.items


def test_version_directory_layout_and_manifest(tmp_path: Path) -> None:
    version = _write(tmp_path, write_extra=lambda d: (d / "extra.bin").write_bytes(b"x"))
    path = tmp_path / "versions" / version
    names = {p.name for p in path.iterdir()}
    assert names == {*artifacts.FILES, artifacts.MANIFEST, "extra.bin"}
    manifest = json.loads((path / artifacts.MANIFEST).read_text())
    assert set(manifest["files"]) == {*artifacts.FILES, "extra.bin"}
    assert (tmp_path / "CURRENT").read_text() == version + "\n"


@pytest.mark.parametrize("name", ["model.safetensors", "items.json", "config.json", "metrics.json"])
def test_corrupted_file_fails_verification(tmp_path: Path, name: str) -> None:
    version = _write(tmp_path)
    target = tmp_path / "versions" / version / name
    data = bytearray(target.read_bytes())
    data[len(data) // 2] ^= 0xFF
    target.write_bytes(bytes(data))
    with pytest.raises(VerificationError, match=name):
        load_version(tmp_path)


def test_missing_file_and_missing_manifest_fail(tmp_path: Path) -> None:
    version = _write(tmp_path)
    path = tmp_path / "versions" / version
    (path / "items.json").unlink()
    with pytest.raises(VerificationError, match="missing"):
        load_version(tmp_path)
    (path / "manifest.json").unlink()
    with pytest.raises(VerificationError, match="incomplete"):
        load_version(tmp_path)


def test_no_current_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(NoModelError, match="no CURRENT"):
        load_version(tmp_path)
    (tmp_path / "CURRENT").write_text("20990101T000000Z-deadbeef\n")
    with pytest.raises(NoModelError, match="does not exist"):
        load_version(tmp_path)


def test_failed_write_leaves_nothing_behind(tmp_path: Path) -> None:
    first = _write(tmp_path)

    def explode(_: Path) -> None:
        raise OSError("disk full")

    with pytest.raises(ArtifactError, match=r"cannot write a model version into .*disk full"):
        _write(tmp_path, seed=1, write_extra=explode)
    assert list_versions(tmp_path) == [first]
    assert current_version(tmp_path) == first
    assert not [p for p in (tmp_path / "versions").iterdir() if p.name.startswith(".tmp")]


def test_set_current_refuses_a_corrupt_version(tmp_path: Path) -> None:
    good = _write(tmp_path)
    bad = _write(tmp_path, seed=1, promote=False)
    (tmp_path / "versions" / bad / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(VerificationError):
        set_current(tmp_path, bad)
    assert current_version(tmp_path) == good


def test_remove_old_versions_keeps_current(tmp_path: Path) -> None:
    versions = []
    for seed in range(4):
        versions.append(_write(tmp_path, seed=seed, promote=seed == 0))
    # Everything newer than CURRENT was written since the last promotion: all kept.
    assert remove_old_versions(tmp_path, keep=1) == []
    artifacts.set_current(tmp_path, versions[2])  # an operator promotes a candidate by hand
    removed = remove_old_versions(tmp_path, keep=1)
    left = list_versions(tmp_path)
    assert versions[0] in left  # the version CURRENT replaced survives though it is the oldest
    assert sorted([versions[0], versions[2], versions[3]]) == left
    assert removed == [versions[1]]


def test_unreadable_current_is_an_artifact_error(tmp_path: Path) -> None:
    (tmp_path / "CURRENT").mkdir()
    with pytest.raises(ArtifactError, match="cannot be read"):
        current_version(tmp_path)


def test_stale_temporary_directories_are_reclaimed(tmp_path: Path) -> None:
    import os
    import time

    _write(tmp_path)
    stale = tmp_path / "versions" / ".tmp-stale"
    fresh = tmp_path / "versions" / ".tmp-fresh"
    for d in (stale, fresh):
        d.mkdir()
    old = time.time() - artifacts.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    remove_old_versions(tmp_path, keep=3)
    assert not stale.exists()
    assert fresh.exists()  # a writer may still be filling it


@pytest.mark.parametrize(
    "pointer", ["../x", "/etc", "versions/../../x", ".tmp-abc", "a b", "x\ny", "ü" * 3, "x" * 300]
)
def test_current_must_name_a_plain_version_directory(tmp_path: Path, pointer: str) -> None:
    _write(tmp_path)
    (tmp_path / "CURRENT").write_text(pointer + "\n")
    with pytest.raises(ArtifactError, match="does not hold a model version name") as err:
        current_version(tmp_path)
    assert pointer.strip() not in str(err.value)  # never echoed
    with pytest.raises(ArtifactError):
        load_version(tmp_path)


def test_a_current_symlink_to_a_foreign_file_is_refused_without_echoing_it(
    tmp_path: Path,
) -> None:
    secret = tmp_path / "outside" / "secret"
    secret.parent.mkdir()
    secret.write_text("rootpassword\n")
    model_dir = tmp_path / "models"
    _write(model_dir)
    (model_dir / "CURRENT").unlink()
    (model_dir / "CURRENT").symlink_to(secret)
    with pytest.raises(ArtifactError, match="symlink leading outside") as err:
        current_version(model_dir)
    assert "rootpassword" not in str(err.value)


def test_a_version_symlink_escaping_versions_is_refused(tmp_path: Path) -> None:
    good = _write(tmp_path / "elsewhere")
    _write(tmp_path / "models")
    (tmp_path / "models" / "versions" / "evil").symlink_to(
        tmp_path / "elsewhere" / "versions" / good
    )
    with pytest.raises(ArtifactError, match="symlink leading outside"):
        load_version(tmp_path / "models", "evil")
    with pytest.raises(ArtifactError, match="symlink leading outside"):
        set_current(tmp_path / "models", "evil")


def test_gc_keeps_the_replaced_version_after_killed_candidates(tmp_path: Path) -> None:
    # The D6 sequence: two killed retrains leave complete, unpromoted candidates, then a
    # promotion; keep=3 used to keep the candidates and delete the version just replaced.
    serving = _write(tmp_path, seed=0)
    killed = [_write(tmp_path, seed=s, promote=False) for s in (1, 2)]
    new = _write(tmp_path, seed=3)
    assert (tmp_path / "PREVIOUS").read_text().strip() == serving
    removed = remove_old_versions(tmp_path, keep=3)
    assert removed == []
    assert serving in list_versions(tmp_path)
    assert current_version(tmp_path) == new
    # After one more promotion the killed candidates are old garbage; the rollback target stays.
    newest = _write(tmp_path, seed=4)
    removed = remove_old_versions(tmp_path, keep=1)
    assert sorted(removed) == sorted([serving, *killed])
    assert list_versions(tmp_path) == sorted([new, newest])


def test_no_sequence_of_killed_refused_or_promoted_runs_loses_a_protected_version(
    tmp_path: Path,
) -> None:
    rng = np.random.default_rng(7)
    current = _write(tmp_path, seed=0)
    previous: str | None = None
    since_promotion: list[str] = []
    for step in range(40):
        action = rng.choice(["promote", "killed", "refused"])
        if action == "promote":
            previous, current = current, _write(tmp_path, seed=step + 1)
            since_promotion = []
        else:  # a killed run or a --keep-refused candidate: complete, never promoted
            since_promotion.append(_write(tmp_path, seed=step + 1, promote=False))
        remove_old_versions(tmp_path, keep=int(rng.integers(1, 4)))
        left = set(list_versions(tmp_path))
        assert current_version(tmp_path) == current
        assert current in left
        assert previous is None or previous in left
        assert set(since_promotion) <= left
        load_version(tmp_path)  # CURRENT still loads


def test_stale_pointer_temporaries_are_reclaimed(tmp_path: Path) -> None:
    import os
    import time

    _write(tmp_path)
    stale = tmp_path / ".CURRENT.tmp-0123"
    fresh = tmp_path / ".CURRENT.tmp-4567"
    for f in (stale, fresh):
        f.write_text("x")
    old = time.time() - artifacts.STALE_TMP_SECONDS - 60
    os.utime(stale, (old, old))
    remove_old_versions(tmp_path, keep=3)
    assert not stale.exists()
    assert fresh.exists()  # its writer may be about to rename it
    assert (tmp_path / "CURRENT").exists()
