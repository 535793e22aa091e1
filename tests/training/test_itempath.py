"""The item-item path: EASE's pruned weights beside the network (training.itempath)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from fastapi.testclient import TestClient

from multvae.artifacts import load_version, write_version
from multvae.model import ModelConfig, MultVAE, SparseRows
from multvae.recommend import Query, Recommender, rank_rows
from multvae.topn_index import IndexSpec, TopNIndex
from service.app import create_app
from service.settings import Settings
from training import baselines, itempath
from training.dataset import Split
from training.evaluate import evaluate_model
from training.preprocess import Preprocessing, filter_interactions
from training.split import strong_generalisation_split
from training.synthetic import generate
from training.train import TrainConfig, train

FAST = {"device": "cpu", "latent_dim": 32, "patience": None, "epochs": 8}


def _ease_b(x: sp.csr_matrix, lam: float) -> np.ndarray:
    xd = x.toarray().astype(np.float64)
    p = np.linalg.inv(xd.T @ xd + lam * np.eye(x.shape[1]))
    b = -p / np.diag(p)[None, :]
    np.fill_diagonal(b, 0.0)
    return b


@pytest.mark.parametrize("shape", [(12, 30), (40, 9)])  # dual (users < items) and primal
def test_neighbours_are_each_rows_largest_ease_weights(shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(7)
    x = sp.csr_matrix((rng.random(shape) < 0.3).astype(np.float32))
    b = _ease_b(x, 3.0)
    cols, vals = baselines.ease_neighbours(x, 3.0, 4, block=5)
    assert cols.shape == vals.shape == (shape[1], 4)
    for i in range(shape[1]):
        want = np.sort(np.abs(b[i]))[::-1][:4]
        np.testing.assert_allclose(np.sort(np.abs(vals[i]))[::-1], want, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(vals[i], b[i, cols[i]], rtol=1e-4, atol=1e-6)
    # Every weight kept: the path is x B exactly.
    cols, vals = baselines.ease_neighbours(x, 3.0, 10**6)
    full = np.zeros_like(b)
    np.put_along_axis(full, cols, vals, axis=1)
    np.testing.assert_allclose(full, b, rtol=1e-4, atol=1e-6)


def test_the_path_adds_weight_times_x_b_to_the_logits() -> None:
    rng = np.random.default_rng(1)
    n = 20
    cols = np.stack([rng.permutation(n)[:5] for _ in range(n)]).astype(np.int64)
    vals = rng.standard_normal((n, 5)).astype(np.float32)
    network = MultVAE(ModelConfig.default("multdae", n)).eval()
    model = itempath.with_item_path(network, cols, vals, 2.5).eval()
    dense_b = np.zeros((n, n), dtype=np.float32)
    np.put_along_axis(dense_b, cols, vals, axis=1)
    x = sp.csr_matrix((rng.random((4, n)) < 0.3).astype(np.float32))
    rows = SparseRows.from_csr(x)
    with torch.no_grad():
        want = network.fold_in(rows) + 2.5 * torch.from_numpy(x.toarray() @ dense_b)
        torch.testing.assert_close(model.fold_in(rows), want)
    assert model.config.item_neighbours == 5
    assert model.config.item_weight == 2.5


@pytest.fixture(scope="module")
def split() -> Split:
    inter, _ = filter_interactions(generate("small", seed=3), Preprocessing(3.5, 5, 0))
    return strong_generalisation_split(inter, 200, seed=98765)


def test_training_fits_the_path_on_validation_users(split: Split) -> None:
    result = train(split, TrainConfig(model="multdae", **FAST))
    path = result.item_path
    assert path is not None
    assert [r["weight"] for r in path["weight_search"]] == list(itempath.WEIGHTS)
    assert [r["l2"] for r in path["lambda_search"]] == list(baselines.EASE_GRID)
    best = max(path["weight_search"], key=lambda r: r["val_ndcg@100"])
    assert path["weight"] == best["weight"]
    assert path["fitted"] == (best["weight"] > 0)
    assert result.model.config.item_weight == path["weight"]
    # What was chosen on is what the kept model scores on the validation users.
    val = evaluate_model(result.model, split.validation).per_user["ndcg@100"].mean()
    assert val == pytest.approx(path["val_ndcg@100"], abs=1e-6)
    assert path["val_ndcg@100"] >= path["network_val_ndcg@100"]
    # The paper's configuration has no path.
    assert TrainConfig.paper().item_neighbours == 0


def test_no_path_when_ease_would_not_fit(split: Split, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines, "available_memory_bytes", lambda: 1000)
    network = MultVAE(ModelConfig.default("multdae", split.n_items))
    model, summary = itempath.fit_item_path(network, split, 16)
    assert model is network
    assert summary["fitted"] is False
    assert "EASE needs about" in summary["reason"]


def _hybrid(split: Split) -> MultVAE:
    network = train(split, TrainConfig(model="multdae", item_neighbours=0, **FAST)).model
    cols, vals = baselines.ease_neighbours(split.train, 100.0, 32)
    return itempath.with_item_path(network, cols, vals, 30.0).eval()


def test_a_version_with_a_path_round_trips_and_serves(split: Split, tmp_path: Path) -> None:
    model = _hybrid(split)
    write_version(tmp_path, model, split.items, {"test": {}}, {})
    version = load_version(tmp_path)
    assert version.model.config == model.config
    assert version.config["model"]["item_neighbours"] == 32
    offline = rank_rows(version.model, split.test.fold_in, 10)
    np.testing.assert_array_equal(offline, rank_rows(model, split.test.fold_in, 10))
    # ... and the path changes the ranking: it is not a no-op.
    network = itempath.network_alone(model)
    assert network.config.item_neighbours == 0
    assert (rank_rows(network, split.test.fold_in, 10) != offline).any()
    # The real app, with its lifespan, serves what the offline fold-in ranks.
    settings = Settings(model_dir=tmp_path, device="cpu", reload_interval_s=0, gc_freeze=False,
                        torch_threads=torch.get_num_threads())  # fmt: skip
    ids = version.items.ids
    with TestClient(create_app(settings)) as client:
        for u in range(5):
            history = split.test.fold_in[u].indices
            response = client.post("/recommend", json={"items": [ids[c] for c in history], "n": 10})
            assert response.status_code == 200, response.text
            assert [r["item"] for r in response.json()["items"]] == [ids[c] for c in offline[u]]


def test_an_index_scores_the_path_too(split: Split) -> None:
    """The index proposes by the network; the history's neighbours join its candidates."""
    pytest.importorskip("faiss")
    model = _hybrid(split)
    index = TopNIndex(model, IndexSpec(factory="Flat", search="", margin=0))
    exact = Recommender(model, split.items)
    indexed = Recommender(model, split.items, index=index)
    ids = split.items.ids
    for u in range(5):
        query = Query([ids[c] for c in split.test.fold_in[u].indices], 10)
        got, want = indexed.recommend_batch([query])[0], exact.recommend_batch([query])[0]
        assert [i for i, _ in got.items] == [i for i, _ in want.items]
        np.testing.assert_allclose([s for _, s in got.items], [s for _, s in want.items],
                                   rtol=1e-5)  # fmt: skip


def test_train_says_what_path_it_fitted_and_refuses_a_negative_width(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from multvae_cli import main

    data, models = tmp_path / "r.csv", tmp_path / "models"
    assert main(["generate", "--shape", "small", "--out", str(data), "--seed", "2"]) == 0
    common = ["train", "--data", str(data), "--out", str(models), "--heldout-users", "100",
              "--epochs", "2", "--device", "cpu", "--quiet"]  # fmt: skip
    with pytest.raises(SystemExit) as exit_info:
        main([*common, "--item-neighbours", "-1"])
    assert exit_info.value.code == 2
    assert "--item-neighbours: '-1': must be >= 0" in capsys.readouterr().err
    assert main([*common, "--item-neighbours", "8"]) == 0
    out = capsys.readouterr().out
    path = load_version(models).metrics["item_path"]
    assert path["neighbours"] == 8
    assert "item-item path: " in out
    assert (f"weight {path['weight']:g}" in out) == path["fitted"]
