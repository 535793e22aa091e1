"""`multvae tune` end to end: a 3-trial search, stopped and resumed, writes a verified version."""

from __future__ import annotations

import json
from pathlib import Path

import optuna
import pytest

from multvae.artifacts import current_version, list_versions, load_version, verify_version
from multvae_cli import main
from training.tune import parse_duration, study_path


@pytest.mark.parametrize(
    ("text", "seconds"), [("90s", 90.0), ("30m", 1800.0), ("1.5h", 5400.0), ("600", 600.0)]
)
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "soon", "-5m", "0", "3d"])
def test_bad_durations_are_refused(text: str) -> None:
    with pytest.raises(ValueError, match="not a duration"):
        parse_duration(text)


@pytest.mark.slow
def test_tune_runs_resumes_and_writes_a_verifiable_version(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data, models = tmp_path / "r.csv", tmp_path / "models"
    assert main(["generate", "--shape", "small", "--out", str(data), "--seed", "1"]) == 0
    common = ["tune", "--data", str(data), "--out", str(models), "--epochs", "3",
              "--device", "cpu", "--quiet", "--heldout-users", "150",
              "--models", "multdae,multvae"]  # fmt: skip
    assert main([*common, "--trials", "2"]) == 0
    first = current_version(models)
    assert first is not None  # an empty directory gets CURRENT
    study = optuna.load_study(study_name="multvae-tune", storage=f"sqlite:///{study_path(models)}")
    assert len(study.trials) == 2
    # the first trials are the defaults of each kind searched
    assert [t.params["model"] for t in study.trials] == ["multdae", "multvae"]
    assert study.trials[1].params["dropout"] == 0.5

    capsys.readouterr()
    assert main([*common, "--trials", "3"]) == 1  # a search is there: resume or remove it
    assert "--resume" in capsys.readouterr().err

    assert main([*common, "--trials", "3", "--resume"]) == 0
    assert "best: trial" in capsys.readouterr().out
    versions = list_versions(models)
    assert len(versions) == 2
    assert current_version(models) == first  # not promoted over CURRENT without --promote
    verify_version(models / "versions" / versions[-1])
    version = load_version(models, versions[-1])
    search = version.metrics["search"]
    assert [t["number"] for t in search["trials"]] == [0, 1, 2]
    finished = [t for t in search["trials"] if t["state"] == "complete"]
    assert search["best_val_ndcg@100"] == max(t["val_ndcg@100"] for t in finished)
    best = search["trials"][search["best_trial"]]
    assert version.config["model"]["kind"] == best["params"]["model"]
    # the version is the best trial retrained (the same network, the same validation score),
    # then given the item-item path, chosen on those users: never worse than the network
    path = version.metrics["item_path"]
    assert path["network_val_ndcg@100"] == pytest.approx(search["best_val_ndcg@100"])
    assert version.metrics["validation"]["metrics"]["ndcg@100"]["mean"] == pytest.approx(
        path["val_ndcg@100"]
    )
    assert path["val_ndcg@100"] >= path["network_val_ndcg@100"]
    assert json.loads((version.path / "metrics.json").read_text())["search"] == search
    # the report shows the search, one row per trial
    assert main(["evaluate", str(models), "--version", versions[-1], "--report"]) == 0
    report = next((models / "reports").rglob("report.md")).read_text()
    assert "## Hyperparameter search (multvae tune: 3 trials" in report
    assert report.count("| complete |") + report.count("| pruned |") == 3

    # --resume refuses a study made on other data flags
    assert main([*common, "--trials", "4", "--resume", "--seed", "7"]) == 1
    assert "other data" in capsys.readouterr().err
