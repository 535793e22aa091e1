"""The training loop on clustered synthetic data whose right answer is known."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from multvae.errors import TrainingError
from training.catalog import Preprocessing
from training.dataset import Split
from training.evaluate import evaluate_model, evaluate_topk
from training.preprocess import filter_interactions
from training.split import strong_generalisation_split
from training.synthetic import generate
from training.train import BetaSchedule, TrainConfig, plan, train

FAST = {"device": "cpu", "latent_dim": 32, "hidden_dims": (), "patience": None}


@pytest.fixture(scope="module")
def split() -> Split:
    inter, _ = filter_interactions(generate("small", seed=3), Preprocessing(3.5, 5, 0))
    return strong_generalisation_split(inter, 200, seed=98765)


def _popularity_topk(split: Split) -> np.ndarray:
    order = split.items.popularity_ranking()
    rows = []
    for u in range(split.test.n_users):
        seen = split.test.fold_in[u].indices
        rows.append(order[~np.isin(order, seen)][:100])
    return np.asarray(rows)


@pytest.mark.parametrize("model", ["multvae", "multdae"])
def test_trained_model_beats_popularity_by_far(split: Split, model: str) -> None:
    result = train(split, TrainConfig(model=model, epochs=50, **FAST))  # type: ignore[arg-type]
    ours = evaluate_model(result.model, split.test).summary()["ndcg@100"]["mean"]
    pop = evaluate_topk(_popularity_topk(split), split.test).summary()["ndcg@100"]["mean"]
    assert ours > pop + 0.15, (ours, pop)
    assert result.best_val_ndcg == max(r.val_ndcg_at_100 for r in result.history)


def test_same_seed_same_model_on_cpu(split: Split) -> None:
    config = TrainConfig(epochs=3, seed=7, **FAST)
    a, b = train(split, config), train(split, config)
    for (name, pa), pb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(pa, pb), name
    c = train(split, dataclasses.replace(config, seed=8))
    assert not torch.equal(a.model.input_weight, c.model.input_weight)


def test_beta_follows_the_schedule_and_history_is_complete(split: Split) -> None:
    config = TrainConfig(
        model="multvae", epochs=4, batch_size=300, total_anneal_steps=20, anneal_cap=0.2, **FAST
    )
    result = train(split, config)
    per_epoch = result.plan.batches_per_epoch
    assert [r.epoch for r in result.history] == [1, 2, 3, 4]
    assert [r.updates for r in result.history] == [per_epoch * e for e in (1, 2, 3, 4)]
    # beta of the last batch of epoch e = min(cap, (updates - 1) / total)
    for r in result.history:
        assert r.beta == pytest.approx(min(0.2, (r.updates - 1) / 20))


def test_dae_has_no_beta_and_uses_weight_decay(split: Split) -> None:
    result = train(split, TrainConfig(model="multdae", epochs=2, **FAST))
    assert all(r.beta == 0.0 for r in result.history)
    assert result.plan.weight_decay == 0.01


def test_auto_anneal_cap_retrains_to_the_peak(split: Split) -> None:
    config = TrainConfig(
        model="multvae", epochs=6, anneal_cap="auto", total_anneal_steps=30, **FAST
    )
    result = train(split, config)
    assert len(result.anneal_search) == 6
    peak = max(result.anneal_search, key=lambda r: r.val_ndcg_at_100)
    assert max(r.beta for r in result.history) <= peak.beta + 1e-12


def test_auto_single_freezes_beta_at_the_best_epoch_once_validation_drops() -> None:
    schedule = BetaSchedule(cap=1.0, total_steps=100, freeze_on_drop=True)
    assert schedule(30) == pytest.approx(0.3)
    schedule.observe(improved=True, best_beta=0.3)
    assert schedule(50) == pytest.approx(0.5)
    schedule.observe(improved=False, best_beta=0.3)  # validation dropped: beta stays at 0.3
    assert schedule(90) == pytest.approx(0.3)
    schedule.observe(improved=False, best_beta=0.5)  # the first freeze is final
    assert schedule(99) == pytest.approx(0.3)
    plain = BetaSchedule(cap=0.2, total_steps=100)
    plain.observe(improved=False, best_beta=0.01)
    assert plain(90) == pytest.approx(0.2)


def test_auto_single_trains_one_run(split: Split) -> None:
    result = train(split, TrainConfig(model="multvae", epochs=3, anneal_cap="auto-single", **FAST))
    assert len(result.history) == 3
    assert result.anneal_search == []


def test_non_finite_loss_stops_with_a_clear_error(split: Split) -> None:
    with pytest.raises(TrainingError, match=r"loss became (nan|inf).*nothing was written"):
        train(split, TrainConfig(model="multvae", epochs=2, lr=1e6, **FAST))


def test_paper_plan_is_the_paper() -> None:
    p = plan(TrainConfig.paper(epochs=200), 116_677)
    assert (p.batch_size, p.epochs, p.total_anneal_steps, p.patience) == (500, 200, 200_000, None)
    assert p.hidden_dims == (600,)
    assert p.batches_per_epoch == 234


def test_adaptive_plan_on_small_data() -> None:
    p = plan(TrainConfig(), 738)  # ML-100K training users
    assert p.model == "multdae"  # the default kind below 10,000 training users
    assert p.batch_size == 369
    assert p.batches_per_epoch == 2
    assert p.epochs == 1000
    assert p.updates == 2000
    # beta = step / total reaches the 0.2 cap half-way through the planned updates
    assert p.total_anneal_steps * 0.2 == pytest.approx(0.5 * p.updates, rel=1e-3)
    assert p.hidden_dims == ()
    assert p.patience == 125
    big = plan(TrainConfig(), 116_677)
    assert big.model == "multvae"
    assert big.hidden_dims == (600,)
    assert big.epochs == 100
    assert big.batch_size == 499


def test_the_progress_bar_ends_at_the_epochs_that_ran(
    split: Split, capsys: pytest.CaptureFixture[str]
) -> None:
    # It counted to the planned epochs and stopped part-way when early stopping ended training.
    config = TrainConfig(**{**FAST, "epochs": 200, "patience": 2, "lr": 0.5})
    result = train(split, config, progress=True)
    ran = len(result.history)
    assert ran < 200
    final = capsys.readouterr().err.split("\r")[-1]
    assert f"{ran}/{ran}" in final
    assert "stopped early (2 epochs without gain)" in final
    assert "/200" not in final
