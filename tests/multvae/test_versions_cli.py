"""`multvae versions | promote | rollback` and the PREVIOUS pointer rollback returns to."""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from multvae import artifacts
from multvae.artifacts import (
    POINTER_LOCK,
    PREVIOUS,
    current_version,
    list_versions,
    previous_version,
    remove_old_versions,
    rollback,
    set_current,
    write_version,
)
from multvae.errors import ArtifactError, CurrentChangedError
from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE
from multvae_cli import main


def _write(model_dir: Path, seed: int, ndcg: float, promote: bool = True) -> str:
    torch.manual_seed(seed)
    model = MultVAE(ModelConfig.default("multvae", 20)).eval()
    items = ItemIndex.build([f"m{i}" for i in range(20)], np.arange(20))
    metrics = {"test": {"users": 7, "metrics": {"ndcg@100": {"mean": ndcg, "se": 0.01}}}}
    return write_version(model_dir, model, items, metrics, promote=promote)


def test_every_move_of_current_records_the_version_it_replaced(tmp_path: Path) -> None:
    a = _write(tmp_path, 0, 0.3)
    assert previous_version(tmp_path) is None  # the first CURRENT replaced nothing
    b = _write(tmp_path, 1, 0.4)
    assert (current_version(tmp_path), previous_version(tmp_path)) == (b, a)
    set_current(tmp_path, b)  # no move: nothing recorded
    assert previous_version(tmp_path) == a


def test_rollback_returns_to_the_replaced_version_and_a_second_one_undoes_it(
    tmp_path: Path,
) -> None:
    a, b = _write(tmp_path, 0, 0.3), _write(tmp_path, 1, 0.4)
    assert rollback(tmp_path) == (b, a)
    assert (current_version(tmp_path), previous_version(tmp_path)) == (a, b)
    assert rollback(tmp_path) == (a, b)
    assert current_version(tmp_path) == b


def test_rollback_without_a_replaced_version_says_so(tmp_path: Path) -> None:
    _write(tmp_path, 0, 0.3)
    with pytest.raises(ArtifactError, match="nothing to roll back to"):
        rollback(tmp_path)


def test_garbage_collection_keeps_the_rollback_target(tmp_path: Path) -> None:
    a = _write(tmp_path, 0, 0.3)
    [_write(tmp_path, s, 0.1, promote=False) for s in (2, 3)]  # refused before b's promotion
    b = _write(tmp_path, 1, 0.4)
    remove_old_versions(tmp_path, keep=1)
    assert list_versions(tmp_path) == [a, b]  # PREVIOUS and CURRENT are pinned


def test_versions_lists_metrics_and_which_serves(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = _write(tmp_path, 0, 0.3), _write(tmp_path, 1, 0.4)
    c = _write(tmp_path, 2, 0.2, promote=False)
    assert main(["versions", str(tmp_path)]) == 0
    lines = capsys.readouterr().out.splitlines()
    [row_a] = [line for line in lines if line.startswith(a)]
    [row_b] = [line for line in lines if line.startswith(b)]
    [row_c] = [line for line in lines if line.startswith(c)]
    assert row_a.endswith("PREVIOUS")
    assert "0.3000" in row_a
    assert row_b.endswith("CURRENT")
    assert "0.4000" in row_b
    assert row_c.endswith("0.2000")  # neither
    assert main(["versions", str(tmp_path), "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert listed["current"] == b
    assert [v["version"] for v in listed["versions"]] == [a, b, c]
    assert listed["versions"][2]["test"] == {"ndcg@100": 0.2}


def test_promote_and_rollback_from_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    a = _write(tmp_path, 0, 0.3)
    b = _write(tmp_path, 1, 0.4, promote=False)
    assert main(["promote", str(tmp_path), b]) == 0
    assert f"CURRENT: {b} (was {a})" in capsys.readouterr().out
    assert (tmp_path / PREVIOUS).read_text().strip() == a
    assert main(["rollback", str(tmp_path)]) == 0
    assert f"CURRENT: {a} (was {b})" in capsys.readouterr().out
    assert current_version(tmp_path) == a

    assert main(["promote", str(tmp_path), "20990101T000000000000Z-nope"]) == 1
    err = capsys.readouterr().err
    assert "is not a model version" in err
    assert b in err  # the known versions are listed
    assert current_version(tmp_path) == a


def _lock_is_held(model_dir: Path) -> bool:
    """Whether someone holds the pointer lock (a non-blocking try from a second descriptor)."""
    fd = os.open(model_dir / POINTER_LOCK, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def test_every_pointer_move_and_deletion_holds_the_pointer_lock(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    a, b, c = _write(tmp_path, 0, 0.3), _write(tmp_path, 1, 0.4), _write(tmp_path, 2, 0.5)
    _write(tmp_path, 3, 0.6)
    seen: list[tuple[str, bool]] = []
    real_write, real_rmtree = artifacts.atomic_write, artifacts.shutil.rmtree

    def watched_write(path: Path, data: bytes) -> None:
        seen.append((path.name, _lock_is_held(tmp_path)))
        real_write(path, data)

    def watched_rmtree(path: Path) -> None:
        seen.append(("rmtree", _lock_is_held(tmp_path)))
        real_rmtree(path)

    monkeypatch.setattr(artifacts, "atomic_write", watched_write)
    monkeypatch.setattr(artifacts.shutil, "rmtree", watched_rmtree)
    assert main(["promote", str(tmp_path), b]) == 0
    assert main(["rollback", str(tmp_path)]) == 0
    assert remove_old_versions(tmp_path, keep=1) == [a, c]  # CURRENT and PREVIOUS stay
    assert {name for name, _ in seen} == {PREVIOUS, "CURRENT", "rmtree"}
    assert all(held for _, held in seen), seen
    assert not _lock_is_held(tmp_path)  # and released after each


def test_a_compare_and_swap_refuses_when_current_moved(tmp_path: Path) -> None:
    a, b = _write(tmp_path, 0, 0.3), _write(tmp_path, 1, 0.4)
    c = _write(tmp_path, 2, 0.5, promote=False)
    with pytest.raises(CurrentChangedError, match=f"CURRENT is {b}, no longer {a}"):
        set_current(tmp_path, c, replacing=a)
    assert (current_version(tmp_path), previous_version(tmp_path)) == (b, a)
    set_current(tmp_path, c, replacing=b)
    assert (current_version(tmp_path), previous_version(tmp_path)) == (c, b)
