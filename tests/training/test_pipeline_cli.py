"""`multvae generate | train | evaluate` end to end, in-process, on generated data."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from multvae.artifacts import current_version, list_versions, load_version
from multvae_cli import main
from training.evaluate import HELDOUT_FILE, load_heldout


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("cli")
    data, models = work / "ratings.csv", work / "models"
    assert main(["generate", "--shape", "small", "--out", str(data), "--seed", "1"]) == 0
    code = main(
        [
            "train",
            "--data",
            str(data),
            "--out",
            str(models),
            "--epochs",
            "5",
            "--latent-dim",
            "32",
            "--hidden-dims",
            "none",
            "--device",
            "cpu",
            "--quiet",
            "--heldout-users",
            "150",
        ]
    )
    assert code == 0
    return data, models


def test_train_writes_a_loadable_version_with_everything_recorded(
    trained: tuple[Path, Path],
) -> None:
    _, models = trained
    version = load_version(models)
    assert version.version == current_version(models) == list_versions(models)[0]
    assert version.model.config.p_dims == (32, len(version.items))
    assert version.config["split"]["val_users"] == version.config["split"]["test_users"] == 150
    assert version.config["data"]["seed"] == 98765
    assert version.config["training"]["epochs"] == 5
    assert len(version.metrics["history"]) == 5
    test_ndcg = version.metrics["test"]["metrics"]["ndcg@100"]
    assert 0.0 < test_ndcg["mean"] <= 1.0
    assert test_ndcg["n"] == 150
    validation, test = load_heldout(version.path / HELDOUT_FILE)
    assert validation.n_users == test.n_users == 150
    assert (test.targets.multiply(test.fold_in)).nnz == 0  # targets never in the fold-in


def test_evaluate_reproduces_the_stored_test_metrics(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    data, models = trained
    stored = load_version(models).metrics["test"]["metrics"]
    assert main(["evaluate", str(models), "--json", "--device", "cpu"]) == 0
    from_heldout = json.loads(capsys.readouterr().out)["test"]["metrics"]
    assert main(["evaluate", str(models), "--json", "--data", str(data)]) == 0
    from_data = json.loads(capsys.readouterr().out)["test"]["metrics"]
    for metric in ("recall@20", "recall@50", "ndcg@100"):
        assert from_heldout[metric]["mean"] == pytest.approx(stored[metric]["mean"])
        assert from_data[metric]["mean"] == pytest.approx(stored[metric]["mean"])


def test_evaluate_prints_metrics_and_quintiles(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", str(trained[1])]) == 0
    out = capsys.readouterr().out
    for needle in ("recall@20", "recall@50", "ndcg@100", "Q1 (", "Q5 ("):
        assert needle in out
    quintiles = load_version(trained[1]).metrics["test"]["quintiles"]
    assert [q["quintile"] for q in quintiles] == [1, 2, 3, 4, 5]
    assert sum(q["users"] for q in quintiles) == 150
    lows = [q["min_clicks"] for q in quintiles]
    assert lows == sorted(lows)


def test_bad_input_is_a_clear_error_not_a_traceback(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad = tmp_path / "ratings.csv"
    bad.write_text("userId,movieId,rating,timestamp\n1,2,5,0\n1,oops\n")
    assert main(["train", "--data", str(bad), "--out", str(tmp_path / "m"), "--quiet"]) == 1
    err = capsys.readouterr().err
    assert "line 3" in err
    assert not (tmp_path / "m").exists()
    assert main(["train", "--data", str(tmp_path / "missing.csv"), "--out", "x"]) == 1
    assert "missing.csv" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["train", "--data", str(bad), "--out", "x", "--anneal-cap", "2"])
    assert "outside [0, 1]" in capsys.readouterr().err


def test_cuda_without_a_gpu_fails_before_reading(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    assert main(["train", "--data", "nowhere.csv", "--out", str(tmp_path), "--device", "cuda"]) == 1
    assert "no CUDA GPU" in capsys.readouterr().err


def test_versions_differ_and_stay_ordered(trained: tuple[Path, Path]) -> None:
    data, models = trained
    first = current_version(models)
    assert (
        main(
            [
                "train",
                "--data",
                str(data),
                "--out",
                str(models),
                "--epochs",
                "1",
                "--latent-dim",
                "16",
                "--hidden-dims",
                "none",
                "--device",
                "cpu",
                "--quiet",
                "--heldout-users",
                "150",
                "--no-promote",
            ]
        )
        == 0
    )
    versions = list_versions(models)
    assert len(versions) == 2
    assert versions[0] == first == current_version(models)  # --no-promote leaves CURRENT
    scores = [load_version(models, v).model.input_weight.detach().numpy() for v in versions]
    assert not np.array_equal(scores[0][:, :16], scores[1])


def test_count_column_keeps_every_play_and_tiny_groups_do_not_break_metrics(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # 12 users with 6 plays each, counts 1..3: as ratings (> 3.5) nothing would survive.
    rows = ["user,song,plays"]
    rows += [f"u{u},s{(u * 7 + k) % 15},{1 + k % 3}" for u in range(12) for k in range(6)]
    path = tmp_path / "plays.csv"
    path.write_text("\n".join(rows) + "\n")
    models = tmp_path / "m"
    code = main([
        "train", "--data", str(path), "--user-col", "user", "--item-col", "song",
        "--count-col", "plays", "--heldout-users", "1", "--epochs", "2", "--latent-dim", "8",
        "--out", str(models), "--quiet", "--device", "cpu",
    ])
    assert code == 0
    capsys.readouterr()
    version = load_version(models)
    assert version.config["split"]["train_clicks"] == 10 * 6
    # one test user: the standard error is undefined, stored as null rather than NaN
    assert version.metrics["test"]["metrics"]["ndcg@100"]["se"] is None
    assert main(["evaluate", str(models), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["test"]["metrics"]["ndcg@100"]["se"] is None


def test_paper_preset_accepts_an_explicit_epoch_count() -> None:
    from training.pipeline import DataSpec, train_config_for

    config = train_config_for(DataSpec("x", preset="ml-20m"), epochs=3)
    assert (config.epochs, config.batch_size, config.total_anneal_steps) == (3, 500, 200_000)
    assert train_config_for(DataSpec("x", preset="msd")).epochs == 100


def test_recommend_command_ranks_ids_like_the_core_recommender(
    trained: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from multvae.recommend import Recommender

    _, models = trained
    version = load_version(models)
    history = list(version.items.ids[:3])
    candidates = list(version.items.ids[3:40])
    argv = ["recommend", str(models), ",".join([*history, "no-such-item"]), "-n", "5",
            "--candidates", ",".join(candidates), "--device", "cpu", "--json"]  # fmt: skip
    assert main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    expected = Recommender(version.model, version.items).recommend(history, 5, (), candidates)
    assert [r["item"] for r in out["items"]] == [item for item, _ in expected.items]
    assert set(out["items"][0]) == {"item", "score"}
    assert out["unknown_items"] == ["no-such-item"]
    assert out["model_version"] == version.version
    assert main(["recommend", str(models), "", "--device", "cpu"]) == 0  # cold start
    assert "popularity" in capsys.readouterr().err


def test_preset_ml_20m_trains_the_papers_exact_configuration(tmp_path: Path) -> None:
    data, models = tmp_path / "r.csv", tmp_path / "models"
    assert main(["generate", "--shape", "small", "--out", str(data), "--seed", "2"]) == 0
    args = ["train", "--data", str(data), "--out", str(models), "--preset", "ml-20m",
            "--heldout-users", "100", "--epochs", "2", "--device", "cpu", "--quiet"]  # fmt: skip
    assert main(args) == 0
    config = load_version(models).config
    n_items = config["n_items"]
    assert config["model"] == {
        "kind": "multvae", "p_dims": [200, 600, n_items], "q_dims": None, "dropout": 0.5,
        "likelihood": "multinomial", "gaussian_c0": 1.0, "gaussian_c1": 10.0,
        "item_neighbours": 0, "item_weight": 0.0,  # the paper's model has no item-item path
    }  # fmt: skip
    training = config["training"]
    expected = {
        "model": "multvae", "hidden_dims": [600], "latent_dim": 200, "dropout": 0.5,
        "lr": 1e-3, "batch_size": 500, "epochs": 2, "anneal_cap": 0.2,
        "total_anneal_steps": 200_000, "patience": None, "weight_decay": 0.0,
    }  # fmt: skip
    assert {k: training[k] for k in expected} == expected
    assert config["preprocessing"] == {"min_rating": 3.5, "min_user_clicks": 5,
                                       "min_item_users": 0}  # fmt: skip
