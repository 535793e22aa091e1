"""Metrics against values computed by hand, and masked top-k."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from multvae.ranking import mask_and_topk, ndcg_at_k, recall_at_k, summarise, topk_rows


def _targets(rows: list[list[int]], n_items: int = 10) -> sp.csr_matrix:
    data = [(r, c) for r, cols in enumerate(rows) for c in cols]
    r, c = zip(*data, strict=True)
    return sp.csr_matrix((np.ones(len(r)), (r, c)), shape=(len(rows), n_items))


def test_recall_uses_min_k_and_heldout_size() -> None:
    topk = np.array([[0, 1, 2, 3], [4, 5, 6, 7]])
    targets = _targets([[1, 9], [4, 5, 6, 7, 8, 9]])
    # user 0: 1 hit of 2 held-out, k=4 -> 1/min(4,2); user 1: 4 hits -> 4/min(4,6)
    np.testing.assert_allclose(recall_at_k(topk, targets, 4), [0.5, 1.0])
    np.testing.assert_allclose(recall_at_k(topk, targets, 2), [0.5, 1.0])


def test_ndcg_by_hand() -> None:
    topk = np.array([[3, 0, 1], [0, 1, 2]])
    targets = _targets([[0, 1], [2]])
    # user 0: hits at ranks 2,3 -> 1/log2(3) + 1/log2(4); ideal 1 + 1/log2(3)
    u0 = (1 / np.log2(3) + 1 / np.log2(4)) / (1 + 1 / np.log2(3))
    # user 1: hit at rank 3 -> 1/log2(4); ideal over 1 item -> 1
    u1 = 1 / np.log2(4)
    np.testing.assert_allclose(ndcg_at_k(topk, targets, 3), [u0, u1])


def test_perfect_ranking_scores_one() -> None:
    topk = np.array([[5, 6, 0, 1]])
    targets = _targets([[5, 6]])
    assert ndcg_at_k(topk, targets, 4)[0] == pytest.approx(1.0)
    assert recall_at_k(topk, targets, 4)[0] == pytest.approx(1.0)


def test_users_without_targets_are_refused_not_nan() -> None:
    targets = sp.csr_matrix((2, 10))
    with pytest.raises(ValueError, match="at least one held-out item"):
        ndcg_at_k(np.zeros((2, 3), dtype=np.int64), targets, 3)


def test_mask_and_topk_never_returns_masked_items() -> None:
    scores = torch.arange(10, dtype=torch.float32).repeat(2, 1)
    cols, vals = mask_and_topk(scores, [np.array([9, 8]), np.array([], dtype=np.int64)], 3)
    assert cols.tolist() == [[7, 6, 5], [9, 8, 7]]
    assert vals.tolist() == [[7, 6, 5], [9, 8, 7]]


def test_mask_and_topk_ranks_only_allowed_columns_where_given() -> None:
    scores = torch.arange(10, dtype=torch.float32).repeat(2, 1)
    allowed = [np.array([1, 4, 9]), None]
    cols, vals = mask_and_topk(scores, [np.array([9]), np.array([], dtype=np.int64)], 3, allowed)
    assert cols[0][:2].tolist() == [4, 1]
    assert vals[0][2] == -np.inf  # only two allowed columns were left: the caller drops it
    assert cols[1].tolist() == [9, 8, 7]


def test_topk_rows_masks_each_rows_clicks_and_the_shared_exclude_in_batches() -> None:
    fold_in = sp.csr_matrix(([1.0, 1.0, 1.0], ([0, 1, 2], [9, 8, 0])), shape=(3, 10))

    def score(block: sp.csr_matrix) -> torch.Tensor:
        return torch.arange(10, dtype=torch.float32).repeat(block.shape[0], 1)

    cols, _ = topk_rows(score, fold_in, 2, exclude=np.array([7]), batch_size=2)
    assert cols.tolist() == [[8, 6], [9, 6], [9, 8]]


def test_summary_mean_and_standard_error() -> None:
    s = summarise({"m": np.array([0.0, 1.0, 0.5, 0.5])})["m"]
    assert s["mean"] == pytest.approx(0.5)
    assert s["se"] == pytest.approx(np.std([0, 1, 0.5, 0.5], ddof=1) / 2)
