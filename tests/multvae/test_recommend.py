"""The shared fold-in path: masking, cold start, batching equals single calls."""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE, SparseRows
from multvae.recommend import Recommender, topk_rows


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
