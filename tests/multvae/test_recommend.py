"""The shared fold-in path: masking, cold start, batching equals single calls."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from multvae import recommend
from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE, SparseRows
from multvae.recommend import Recommender, Scorer, topk_rows


def _recommender(n_items: int = 50) -> Recommender:
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", n_items))
    pop = np.zeros(n_items, dtype=np.int64)
    pop[[7, 3, 11]] = [30, 20, 10]
    return Recommender(model, ItemIndex.build(range(n_items), pop))


def test_history_and_exclude_are_never_returned() -> None:
    rec = _recommender()
    history, exclude = np.array([1, 2, 3]), np.array([4, 5])
    out = rec.recommend(history, 50, exclude)
    assert not set(out.columns) & {1, 2, 3, 4, 5}
    assert len(out.columns) == 45  # every other item, no -inf padding
    assert np.all(np.diff(out.scores) <= 0)
    assert out.fallback is None


def test_scores_are_decoder_logits_at_the_mean() -> None:
    rec = _recommender()
    history = np.array([4, 9, 9])  # a repeated click counts once
    out = rec.recommend(history, 5)
    x = torch.zeros(1, 50)
    x[0, [4, 9]] = 1.0
    mu, _ = rec.model.encode(SparseRows.from_csr(sp.csr_matrix(x.numpy())))
    logits = rec.model.decode(mu)[0].detach()
    logits[[4, 9]] = -torch.inf
    np.testing.assert_allclose(out.scores, torch.topk(logits, 5).values.numpy(), rtol=1e-6)


def test_empty_history_falls_back_to_popularity() -> None:
    rec = _recommender()
    out = rec.recommend(np.array([], dtype=np.int64), 2, np.array([7]))
    assert out.fallback == "popularity"
    assert out.columns.tolist() == [3, 11]
    assert out.scores.tolist() == [20.0, 10.0]


def test_batch_equals_single_calls_and_offline_topk() -> None:
    rec = _recommender()
    histories = [np.array([1, 2]), np.array([], dtype=np.int64), np.array([10, 20, 30])]
    excludes = [np.array([5]), np.array([], dtype=np.int64), np.array([], dtype=np.int64)]
    batch = rec.recommend_batch(histories, [5, 3, 7], excludes)
    for h, n, e, got in zip(histories, [5, 3, 7], excludes, batch, strict=True):
        single = rec.recommend(h, n, e)
        np.testing.assert_array_equal(got.columns, single.columns)
        np.testing.assert_allclose(got.scores, single.scores, rtol=1e-6)
    fold_in = sp.csr_matrix((np.ones(5), ([0, 0, 1, 1, 1], [1, 2, 10, 20, 30])), shape=(2, 50))
    offline = topk_rows(rec.model, fold_in, 7)
    np.testing.assert_array_equal(offline[1], batch[2].columns)
    np.testing.assert_array_equal(offline[0][:5], rec.recommend(np.array([1, 2]), 5).columns)


def _reference(model: MultVAE, x: SparseRows) -> torch.Tensor:
    with torch.no_grad():
        return model.decode(model.encode(x)[0])


def _random_rows(batch: int, n_items: int, seed: int) -> SparseRows:
    rng = np.random.default_rng(seed)
    dense = (rng.random((batch, n_items)) < 0.02).astype(np.float32)
    dense[:, 0] = 1.0  # no empty row
    return SparseRows.from_csr(sp.csr_matrix(dense))


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="torch built without oneDNN")
def test_scorer_runs_the_output_layer_through_onednn_and_matches_f_linear() -> None:
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", 3000)).eval()  # [3000 -> 600 -> 200 -> ...]
    scorer = Scorer(model)
    assert scorer.onednn
    for batch in (1, 7, 64):
        x = _random_rows(batch, 3000, batch)
        torch.testing.assert_close(scorer.scores(x), _reference(model, x), rtol=1e-5, atol=1e-5)


def test_scorer_sees_weights_changed_in_place() -> None:
    # Training evaluates between optimiser steps, which update the weights in place: no
    # kernel may serve a stale copy of them.
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", 300)).eval()
    x = _random_rows(4, 300, 1)
    scorer = Scorer(model)
    assert scorer.onednn == torch.backends.mkldnn.is_available()  # the kernel under test
    old = scorer.scores(x).clone()
    with torch.no_grad():
        model.output_layer.weight.mul_(-1.0)
        model.output_layer.bias.mul_(-1.0)
    torch.testing.assert_close(scorer.scores(x), -old, rtol=1e-5, atol=1e-5)
    fold_in = sp.csr_matrix((np.ones(2), ([0, 0], [1, 2])), shape=(1, 300))
    ranked = topk_rows(model, fold_in, 5)[0]
    history = SparseRows.from_csr(fold_in)
    expected = _reference(model, history)[0]
    expected[[1, 2]] = -torch.inf
    np.testing.assert_array_equal(ranked, torch.topk(expected, 5).indices.numpy())


def test_scorer_falls_back_to_the_plain_layer_when_onednn_fails(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def broken(*_: object) -> torch.Tensor:
        raise RuntimeError("no oneDNN kernel for this CPU")

    monkeypatch.setattr(recommend, "_onednn_linear", broken)
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", 300)).eval()
    scorer = Scorer(model)
    assert not scorer.onednn
    x = _random_rows(3, 300, 2)
    torch.testing.assert_close(scorer.scores(x), _reference(model, x))


def test_a_model_with_non_finite_weights_fails_the_finite_check() -> None:
    from multvae.errors import VerificationError

    model = MultVAE(ModelConfig(p_dims=(4, 8, 20))).eval()
    items = ItemIndex.build([f"i{c}" for c in range(20)], np.arange(20))
    Recommender(model, items).check_finite()  # a healthy model passes
    with torch.no_grad():
        model.decoder[-1].weight[3, 0] = float("nan")
    with pytest.raises(VerificationError, match="NaN or infinite"):
        Recommender(model, items).check_finite()
