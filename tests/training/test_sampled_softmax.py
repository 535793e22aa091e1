"""The sampled softmax (training/sampled.py): a consistent estimate of the multinomial
likelihood that touches only the sampled and clicked rows, and trains as well as the full one."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from multvae.artifacts import load_version
from multvae.errors import TrainingError
from multvae.model import ModelConfig, MultVAE, SparseRows
from multvae.recommend import Recommender
from multvae_cli import main
from training.catalog import Preprocessing
from training.dataset import Split
from training.distributed import Group
from training.evaluate import evaluate_model, evaluate_topk
from training.preprocess import filter_interactions
from training.sampled import SampledSoftmax, full_softmax
from training.split import strong_generalisation_split
from training.synthetic import generate
from training.train import TrainConfig, train

# The estimator tests run where MULTVAE_TEST_DEVICE says (cuda on a GPU machine).
DEVICE = os.environ.get("MULTVAE_TEST_DEVICE", "cpu")
FAST = {"device": "cpu", "latent_dim": 32, "hidden_dims": (), "patience": None}
# Test NDCG@100 of the sampled softmax (50 of 500 items per batch) against the full softmax on
# the same data and schedule: within 0.04, about 2.5 standard errors of either (0.016).
NDCG_TOLERANCE = 0.04


@pytest.fixture(scope="module")
def split() -> Split:
    inter, _ = filter_interactions(generate("small", seed=3), Preprocessing(3.5, 5, 0))
    return strong_generalisation_split(inter, 200, seed=98765)


def _batch(
    n_users: int = 20, n_items: int = 50, density: float = 0.2
) -> tuple[MultVAE, sp.csr_matrix, SparseRows]:
    torch.manual_seed(0)
    model = MultVAE(ModelConfig(p_dims=(8, 16, n_items))).to(DEVICE).eval()
    x = sp.random(n_users, n_items, density=density, random_state=1, format="csr",
                  dtype=np.float32)  # fmt: skip
    x.data[:] = np.arange(len(x.data)) % 3 + 1  # click counts 1-3: the weights count too
    return model, x, SparseRows.from_csr(x, DEVICE)


@pytest.mark.parametrize("proposal", ["popularity", "uniform"])
def test_many_samples_give_the_full_softmax_likelihood(proposal: str) -> None:
    model, x, rows = _batch()
    full = full_softmax(model, rows)[0].item()
    sampler = (
        SampledSoftmax.from_clicks(x, 200_000, DEVICE) if proposal == "popularity"
        else SampledSoftmax(torch.ones(x.shape[1], device=DEVICE), 200_000)
    )  # fmt: skip
    torch.manual_seed(1)
    assert sampler(model, rows)[0].item() == pytest.approx(full, rel=2e-3)


def _rows_with_gradient(grad: torch.Tensor | None) -> set[int]:
    assert grad is not None
    assert grad.is_sparse  # for torch.optim.SparseAdam
    grad = grad.coalesce()
    nonzero = grad.values().abs().sum(dim=1) > 0
    return set(grad.indices()[0][nonzero].cpu().tolist())


@pytest.mark.parametrize("l2", [0.0, 0.5])
def test_only_the_clicked_and_sampled_rows_of_the_two_tables_get_gradient(l2: float) -> None:
    model, x, rows = _batch(n_users=3, n_items=400, density=0.02)
    sampler = SampledSoftmax(torch.ones(400, device=DEVICE), 10)
    torch.manual_seed(2)
    draws = torch.multinomial(sampler.proposal, 10, replacement=True)
    torch.manual_seed(2)  # the model is in eval mode: the draw is the loss's only randomness
    sampler(model, rows, l2)[0].backward()
    clicked = set(x.indices.tolist())
    touched = clicked | set(draws.cpu().tolist())
    assert _rows_with_gradient(model.input_weight.grad) == clicked
    assert _rows_with_gradient(model.output_layer.weight.grad) == touched
    assert len(touched) < 40


def test_many_samples_give_the_full_softmax_gradient() -> None:
    # The estimator's gradient, sparse, converges to the full softmax's, dense.
    model, x, rows = _batch()
    full_softmax(model, rows)[0].backward()
    tables = (model.input_weight, model.output_layer.weight)
    expected = [p.grad.clone() for p in tables if p.grad is not None]
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    SampledSoftmax(torch.ones(x.shape[1], device=DEVICE), 200_000)(model, rows)[0].backward()
    for table, dense in zip(tables, expected, strict=True):
        assert table.grad is not None
        assert table.grad.is_sparse
        torch.testing.assert_close(table.grad.to_dense(), dense, rtol=0.0, atol=5e-3)


def test_the_penalty_of_every_row_is_the_dae_penalty() -> None:
    model, _, _ = _batch()
    every = torch.arange(model.config.n_items, device=DEVICE)
    assert model.l2_penalty_rows(every, every).item() == pytest.approx(
        model.l2_penalty().item(), rel=1e-6
    )


def _popularity_ndcg(split: Split) -> float:
    order = split.items.popularity_ranking()
    top = np.asarray([
        order[~np.isin(order, split.test.fold_in[u].indices)][:100]
        for u in range(split.test.n_users)
    ])  # fmt: skip
    return float(evaluate_topk(top, split.test).summary()["ndcg@100"]["mean"])


def test_sampled_softmax_trains_close_to_the_full_softmax(split: Split) -> None:
    config = TrainConfig(model="multdae", epochs=50, **FAST)  # type: ignore[arg-type]
    full = train(split, config)
    sampled = train(split, TrainConfig(model="multdae", epochs=50, sampled_softmax=50, **FAST))  # type: ignore[arg-type]
    ndcg = {
        name: evaluate_model(result.model, split.test).summary()["ndcg@100"]["mean"]
        for name, result in (("full", full), ("sampled", sampled))
    }
    assert ndcg["sampled"] > _popularity_ndcg(split) + 0.15, ndcg
    assert abs(ndcg["sampled"] - ndcg["full"]) <= NDCG_TOLERANCE, ndcg


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"model": "recvae", "hidden_dims": (16,)}, "does not apply to model recvae"),
        ({"model": "multdae", "likelihood": "gaussian"}, "with likelihood gaussian"),
        ({"model": "multdae", "sampled_softmax": 0}, "needs >= 1 sampled item"),
    ],
)
def test_unsupported_combinations_are_clear_errors(
    split: Split, overrides: dict[str, object], message: str
) -> None:
    fields = {**FAST, "epochs": 1, "sampled_softmax": 20, **overrides}
    with pytest.raises(TrainingError, match=message):
        train(split, TrainConfig(**fields))  # type: ignore[arg-type]


def test_under_torchrun_it_is_refused_before_any_collective(split: Split) -> None:
    # The gathered output rows bypass DistributedDataParallel's forward, so its gradients
    # would not be averaged: refused up front (a 2-rank group, no process group needed).
    with pytest.raises(TrainingError, match="without torchrun"):
        train(split, TrainConfig(**{**FAST, "epochs": 1, "sampled_softmax": 20}),
              group=Group(rank=0, world=2))  # type: ignore[arg-type]


def test_cli_trains_a_version_that_loads_and_serves_like_any_other(tmp_path: Path) -> None:
    data, models = tmp_path / "ratings.csv", tmp_path / "models"
    assert main(["generate", "--shape", "small", "--out", str(data), "--seed", "1"]) == 0
    assert main([
        "train", "--data", str(data), "--out", str(models), "--epochs", "3", "--latent-dim",
        "16", "--hidden-dims", "none", "--device", "cpu", "--quiet", "--heldout-users", "150",
        "--sampled-softmax", "40",
    ]) == 0  # fmt: skip
    version = load_version(models)
    assert version.config["train_config"]["sampled_softmax"] == 40
    assert type(version.model) is MultVAE  # the ordinary model and file format
    ids = list(version.items.ids[:5])
    ranked = Recommender(version.model, version.items).recommend(ids, 10).items
    assert len(ranked) == 10
    assert not set(ids) & {item for item, _ in ranked}
