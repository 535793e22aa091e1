"""multvae retrain: first run promotes, a worse model is kept out, crashes promote nothing, GC."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from multvae.artifacts import (
    STALE_TMP_SECONDS,
    VERSIONS,
    current_version,
    list_versions,
    load_version,
    write_version,
)
from multvae_cli import main
from training import retrain as retrain_module
from training.dataset import Interactions
from training.pipeline import DataSpec, train_config_for
from training.retrain import (
    EXIT_FAILED,
    EXIT_KEPT,
    EXIT_PROMOTED,
    EXIT_USAGE,
    LOCK_FILE,
    REPORTS,
    Gate,
    _json_safe,
    retrain,
)
from training.synthetic import generate, write
from training.train import TrainConfig

# Small enough that one run trains in about a second; 10 epochs learn the clusters well
# enough that a model trained on shuffled labels is far behind.
N_USERS, N_ITEMS = 800, 200
FLAGS = ["--hidden-dims", "32", "--latent-dim", "16", "--device", "cpu", "--quiet"]


def small_data() -> Interactions:
    inter = generate("small", seed=0)
    keep = (inter.user < N_USERS) & (inter.item < N_ITEMS)
    assert inter.value is not None
    # Item codes index item_ids: cutting the ids to the kept codes keeps a relabelling of the
    # ids (shuffled_labels) inside the same vocabulary.
    return replace(inter, user=inter.user[keep], item=inter.item[keep], value=inter.value[keep],
                   item_ids=inter.item_ids[:N_ITEMS])  # fmt: skip


def shuffled_labels(inter: Interactions, seed: int = 1) -> Interactions:
    """Same users, same counts, but every item id swapped for another: the labels are noise.

    A bijection on item ids (rather than shuffling the item column) keeps each user's number
    of distinct clicks, so preprocessing keeps the same users and the split holds out the
    same test users: the gate compares the two models on every one of them.
    """
    perm = np.random.default_rng(seed).permutation(len(inter.item_ids))
    return replace(inter, item_ids=inter.item_ids[perm])


def config(spec: DataSpec, epochs: int = 10) -> TrainConfig:
    return train_config_for(spec, epochs=epochs, hidden_dims=(32,), latent_dim=16, device="cpu")


def report_files(model_dir: Path) -> list[Path]:
    return sorted((model_dir / REPORTS).glob("retrain-*.json"))


def hidden_entries(model_dir: Path) -> list[str]:
    """Temp dirs left under versions/ (a crashed write must leave none)."""
    return [p.name for p in (model_dir / VERSIONS).iterdir() if p.name.startswith(".")]


@dataclass
class Baseline:
    data: Path
    model_dir: Path
    version: str
    report: dict[str, Any]

    def copy(self, to: Path) -> Path:
        """A private copy of the model directory (tests change it)."""
        shutil.copytree(self.model_dir, to)
        return to


@pytest.fixture(scope="module")
def baseline(tmp_path_factory: pytest.TempPathFactory) -> Baseline:
    """The first retrain into an empty model directory (also the subject of one test)."""
    root = tmp_path_factory.mktemp("retrain")
    data = root / "clicks.csv"
    write(small_data(), data)
    spec = DataSpec(str(data))
    result = retrain(spec, config(spec), root / "models")
    assert result.exit_code == EXIT_PROMOTED, result.report
    assert result.report_path is not None
    return Baseline(data, root / "models", str(result.report["candidate"]),
                    json.loads(result.report_path.read_text()))  # fmt: skip


def test_the_first_run_promotes_its_model(baseline: Baseline) -> None:
    assert current_version(baseline.model_dir) == baseline.version
    assert list_versions(baseline.model_dir) == [baseline.version]
    report = baseline.report
    assert report["decision"] == "promoted"
    assert report["exit_code"] == EXIT_PROMOTED
    assert report["current_before"] is None
    assert report["current_after"] == baseline.version
    assert "no current version" in report["reason"]
    assert report["candidate_own_split"]["test"]["ndcg@100"]["mean"] > 0
    load_version(baseline.model_dir)  # what CURRENT names verifies and loads


def test_a_model_trained_on_shuffled_labels_is_kept_out(
    baseline: Baseline, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_dir = baseline.copy(tmp_path / "models")
    noisy = tmp_path / "shuffled.csv"
    write(shuffled_labels(small_data()), noisy)

    argv = ["retrain", "--data", str(noisy), "--model-dir", str(model_dir), "--epochs", "1",
            "--json", *FLAGS]  # fmt: skip
    code = main(argv)

    assert code == EXIT_KEPT
    assert current_version(model_dir) == baseline.version
    assert list_versions(model_dir) == [baseline.version]  # the refused candidate is deleted
    printed = json.loads(capsys.readouterr().out)
    old_reports = {p.name for p in report_files(baseline.model_dir)}
    [written] = [p for p in report_files(model_dir) if p.name not in old_reports]
    assert json.loads(written.read_text()) == printed
    assert printed["decision"] == "kept"
    assert printed["candidate_deleted"] is True
    gate = printed["gate"]
    assert gate["metric"] == "ndcg@100"
    assert gate["passed"] is False
    assert gate["candidate"] < gate["current"] - gate["allowed_drop"]
    # Both models were scored on the same users: all of the (unchanged) test users.
    comparison = printed["comparison"]
    assert comparison["users"] == baseline.report["candidate_own_split"]["split"]["test_users"]
    assert comparison["items"] == {"common": N_ITEMS, "only_a": 0, "only_b": 0}
    assert comparison["version_a"] == baseline.version


def test_retraining_on_the_same_data_passes_the_gate(baseline: Baseline, tmp_path: Path) -> None:
    model_dir = baseline.copy(tmp_path / "models")
    spec = DataSpec(str(baseline.data))
    result = retrain(spec, config(spec), model_dir)
    assert result.exit_code == EXIT_PROMOTED, result.report["reason"]
    new = result.report["candidate"]
    assert current_version(model_dir) == new != baseline.version
    assert result.report["gate"]["passed"] is True
    assert "gate passed" in result.report["reason"]


def test_items_new_since_the_current_version_are_compared_on_shared_items(
    baseline: Baseline, tmp_path: Path
) -> None:
    model_dir = baseline.copy(tmp_path / "models")
    inter = small_data()
    # Ten new items, clicked by every third user (test users included), appended to the file.
    n_new = 10
    users = np.unique(inter.user)[::3]
    new_codes = len(inter.item_ids) + np.arange(n_new)
    add_user = np.repeat(users, n_new).astype(np.int32)
    add_item = np.tile(new_codes, len(users)).astype(np.int32)
    grown = replace(
        inter,
        user=np.concatenate([inter.user, add_user]),
        item=np.concatenate([inter.item, add_item]),
        value=np.concatenate([inter.value, np.full(len(add_user), 5.0, np.float32)]),
        item_ids=np.concatenate([inter.item_ids, 10**6 + np.arange(n_new)]),
    )
    data = tmp_path / "grown.csv"
    write(grown, data)
    spec = DataSpec(str(data))

    # Any drop allowed: this test is about the vocabularies, not about which model wins.
    result = retrain(spec, config(spec), model_dir, Gate(tolerance=1.0))

    assert result.exit_code == EXIT_PROMOTED, result.report["reason"]
    items = result.report["comparison"]["items"]
    assert items == {"common": N_ITEMS, "only_a": 0, "only_b": n_new}
    assert result.report["comparison"]["users"] > 0
    served = load_version(model_dir)
    assert served.version == result.report["candidate"]
    assert len(served.items) == N_ITEMS + n_new


def _crash_in_heldout_write(monkeypatch: pytest.MonkeyPatch) -> None:
    # save_heldout runs inside write_version, after the weights and JSON files are written.
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("No space left on device (injected)")

    monkeypatch.setattr("training.pipeline.save_heldout", boom)


def _crash_in_weights_write(monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise OSError("I/O error writing model.safetensors (injected)")

    monkeypatch.setattr("multvae.artifacts.save_file", boom)


def _crash_while_promoting(monkeypatch: pytest.MonkeyPatch) -> None:
    # The candidate is complete and passed the gate; the swap itself fails.
    def boom(model_dir: Path, version: str, replacing: str | None = None) -> None:
        raise OSError("Read-only file system (injected)")

    monkeypatch.setattr("training.retrain.set_current", boom)


@pytest.mark.parametrize(
    "inject", [_crash_in_heldout_write, _crash_in_weights_write, _crash_while_promoting]
)
def test_a_crash_mid_run_leaves_current_and_versions_untouched(
    baseline: Baseline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, inject: Any
) -> None:
    model_dir = baseline.copy(tmp_path / "models")
    before = {p.name: p.stat().st_mtime_ns for p in (model_dir / VERSIONS).iterdir()}
    current_bytes = (model_dir / "CURRENT").read_bytes()
    inject(monkeypatch)
    spec = DataSpec(str(baseline.data))

    # force: reach the promotion step whatever the gate would say of a 1-epoch model.
    result = retrain(spec, config(spec, epochs=1), model_dir, Gate(force=True))

    assert result.exit_code == EXIT_FAILED
    assert result.decision == "failed"
    assert "injected" in result.report["reason"]
    assert (model_dir / "CURRENT").read_bytes() == current_bytes
    after = {p.name: p.stat().st_mtime_ns for p in (model_dir / VERSIONS).iterdir()}
    assert after == before  # no new version, no temp dir, the old one not rewritten
    assert hidden_entries(model_dir) == []
    load_version(model_dir)  # the served version still verifies
    assert result.report_path is not None
    assert json.loads(result.report_path.read_text())["decision"] == "failed"


def test_gc_never_removes_current_even_when_newer_versions_exist(
    baseline: Baseline, tmp_path: Path
) -> None:
    model_dir = baseline.copy(tmp_path / "models")
    noisy = tmp_path / "shuffled.csv"
    write(shuffled_labels(small_data()), noisy)
    spec = DataSpec(str(noisy))

    # Stale temporaries of killed runs: a pointer and a report being written when killed.
    stale = [model_dir / ".CURRENT.tmp-dead", model_dir / REPORTS / ".retrain-x.json.tmp-dead"]
    old = time.time() - STALE_TMP_SECONDS - 60
    for path in stale:
        path.write_text("partial")
        os.utime(path, (old, old))

    first = retrain(spec, config(spec, epochs=1), model_dir, keep=1, keep_refused=True)
    assert first.exit_code == EXIT_KEPT
    refused_1 = first.report["candidate"]
    # keep=1 keeps the newest (the refused candidate) *and* CURRENT, which is older.
    assert list_versions(model_dir) == [baseline.version, refused_1]
    assert not any(path.exists() for path in stale)

    second = retrain(spec, config(spec, epochs=1), model_dir, keep=1, keep_refused=True)
    assert second.exit_code == EXIT_KEPT
    # Written since the last promotion: kept for inspection until a later promotion.
    assert second.report["removed_versions"] == []
    assert list_versions(model_dir) == [baseline.version, refused_1, second.report["candidate"]]
    assert current_version(model_dir) == baseline.version


def test_a_current_version_that_cannot_be_compared_fails_unless_forced(tmp_path: Path) -> None:
    # A version written without its held-out users (heldout.npz) cannot be scored by the gate.
    inter = small_data()
    data = tmp_path / "clicks.csv"
    write(inter, data)
    spec = DataSpec(str(data))
    model_dir = tmp_path / "models"
    seed = retrain(spec, config(spec, epochs=1), tmp_path / "seed")
    loaded = load_version(tmp_path / "seed")
    old = write_version(model_dir, loaded.model, loaded.items, {})
    assert seed.exit_code == EXIT_PROMOTED

    failed = retrain(spec, config(spec, epochs=1), model_dir)
    assert failed.exit_code == EXIT_FAILED
    assert "heldout.npz" in failed.report["reason"]
    assert list_versions(model_dir) == [old]  # the unpromoted candidate was removed
    assert current_version(model_dir) == old

    forced = retrain(spec, config(spec, epochs=1), model_dir, Gate(force=True))
    assert forced.exit_code == EXIT_PROMOTED
    assert "could not be compared" in forced.report["reason"]
    assert current_version(model_dir) == forced.report["candidate"]


def test_a_second_concurrent_run_fails_without_touching_anything(
    baseline: Baseline, tmp_path: Path
) -> None:
    model_dir = baseline.copy(tmp_path / "models")
    fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)  # another run holds the lock
        spec = DataSpec(str(baseline.data))
        result = retrain(spec, config(spec, epochs=1), model_dir)
    finally:
        os.close(fd)
    assert result.exit_code == EXIT_FAILED
    assert "another retrain is running" in result.report["reason"]
    assert result.report["candidate"] is None
    assert list_versions(model_dir) == [baseline.version]


def test_an_operators_rollback_during_a_run_is_not_overridden(
    baseline: Baseline, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    model_dir = baseline.copy(tmp_path / "models")
    spec = DataSpec(str(baseline.data))
    second = retrain(spec, config(spec), model_dir)
    assert second.exit_code == EXIT_PROMOTED, second.report["reason"]
    b = str(second.report["candidate"])
    real_decide = retrain_module._decide

    def decide_then_rollback(*args: Any, **kwargs: Any) -> Any:
        decision = real_decide(*args, **kwargs)  # the gate compares the candidate with B ...
        assert main(["rollback", str(model_dir)]) == 0  # ... then the operator goes back to A
        return decision

    monkeypatch.setattr(retrain_module, "_decide", decide_then_rollback)
    result = retrain(spec, config(spec), model_dir)

    assert result.exit_code == EXIT_KEPT
    assert result.report["decision"] == "kept"
    assert f"no longer {b}" in result.report["reason"]
    assert current_version(model_dir) == result.report["current_after"] == baseline.version
    candidate = str(result.report["candidate"])
    assert result.report["candidate_deleted"] is False  # it passed its gate: kept for a promote
    assert candidate in list_versions(model_dir)


@pytest.mark.parametrize(
    ("gate", "current", "candidate", "passes"),
    [
        (Gate(tolerance=0.01), 0.40, 0.391, True),
        (Gate(tolerance=0.01), 0.40, 0.389, False),
        (Gate(tolerance=0.0), 0.40, 0.40, True),
        (Gate(tolerance=0.05, mode="relative"), 0.40, 0.381, True),  # allowed drop 0.02
        (Gate(tolerance=0.05, mode="relative"), 0.40, 0.379, False),
    ],
)
def test_gate_tolerance(gate: Gate, current: float, candidate: float, passes: bool) -> None:
    assert gate.passes(current, candidate) is passes


def test_invalid_flags_exit_with_the_usage_code(baseline: Baseline, tmp_path: Path) -> None:
    argv = ["retrain", "--data", str(baseline.data), "--model-dir", str(tmp_path / "m"),
            "--keep", "0", *FLAGS]  # fmt: skip
    assert main(argv) == EXIT_USAGE
    assert not (tmp_path / "m").exists()


def test_the_report_turns_non_finite_numbers_into_null() -> None:
    # A standard error over a single user is NaN; JSON has none, and the report must be written.
    report = {"se": float("nan"), "t": [float("inf"), 1.5], "n": {"users": 1}}
    assert json.dumps(_json_safe(report), allow_nan=False) == (
        '{"se": null, "t": [null, 1.5], "n": {"users": 1}}'
    )


# -- retrain reuses the recipe CURRENT was trained with -----------------------------------


def test_retrain_without_flags_reuses_currents_recipe(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # It used to demand --data again and use the defaults for every flag not repeated (94
    # instead of 100 held-out users), and compare, promote and serve on those.
    data, model_dir = tmp_path / "clicks.csv", tmp_path / "models"
    write(small_data(), data)
    recipe = ["--heldout-users", "60", "--min-user-clicks", "3", "--seed", "7",
              "--epochs", "2", "--hidden-dims", "none", "--latent-dim", "8"]  # fmt: skip
    assert main(["train", "--data", str(data), "--out", str(model_dir), *recipe,
                 "--device", "cpu", "--quiet"]) == 0  # fmt: skip
    first = current_version(model_dir)
    capsys.readouterr()

    code = main(["retrain", "--model-dir", str(model_dir), "--quiet", "--json", "--force"])

    assert code == EXIT_PROMOTED
    out, err = capsys.readouterr()
    assert f"recipe: CURRENT version {first}'s" in err
    assert "from the command line" not in err
    report = json.loads(out)
    assert report["data"]["path"] == str(data)
    candidate = load_version(model_dir, report["candidate"])
    cfg = candidate.config
    assert cfg["data"]["heldout_users"] == 60
    assert cfg["data"]["min_user_clicks"] == 3
    assert cfg["data"]["seed"] == 7
    assert cfg["split"] == load_version(model_dir, first).config["split"]  # the same split
    assert cfg["train_config"]["latent_dim"] == 8
    assert cfg["train_config"]["epochs"] == 2
    assert cfg["train_config"]["hidden_dims"] == []


def test_retrain_flags_given_replace_the_recorded_ones(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, model_dir = tmp_path / "clicks.csv", tmp_path / "models"
    write(small_data(), data)
    assert main(["train", "--data", str(data), "--out", str(model_dir), "--heldout-users", "60",
                 "--epochs", "2", "--latent-dim", "8", "--device", "cpu", "--quiet"]) == 0
    capsys.readouterr()

    code = main(["retrain", "--model-dir", str(model_dir), "--heldout-users", "40",
                 "--epochs", "1", "--quiet", "--force"])  # fmt: skip

    assert code == EXIT_PROMOTED
    out = capsys.readouterr().out
    assert "except --epochs, --heldout-users from the command line" in out
    assert out.index("recipe:") < out.index("PROMOTED")  # said before training, not after
    cfg = load_version(model_dir).config
    assert cfg["data"]["heldout_users"] == 40
    assert cfg["train_config"]["epochs"] == 1
    assert cfg["train_config"]["latent_dim"] == 8  # not given: recorded


def test_retrain_of_an_empty_model_dir_needs_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["retrain", "--model-dir", str(tmp_path / "m"), *FLAGS]) == EXIT_USAGE
    assert "has no CURRENT version whose recipe could be reused: pass --data" in (
        capsys.readouterr().err
    )


def test_a_flag_given_as_zero_still_replaces_the_recorded_value(tmp_path: Path) -> None:
    from multvae_cli import build_parser
    from training.retrain import recipe_from

    version = tmp_path / VERSIONS / "v1"
    version.mkdir(parents=True)
    recorded = {"data": DataSpec(str(tmp_path / "x.csv"), seed=7).to_dict(),
                "train_config": TrainConfig(seed=7, latent_dim=8).to_dict()}  # fmt: skip
    (version / "config.json").write_text(json.dumps(recorded))
    (tmp_path / "CURRENT").write_text("v1\n")
    args = build_parser().parse_args(["retrain", "--model-dir", str(tmp_path), "--seed", "0"])
    spec, config, where = recipe_from(tmp_path, args)
    assert (spec.seed, config.seed, config.latent_dim) == (0, 0, 8)
    assert where.endswith("except --seed from the command line")
