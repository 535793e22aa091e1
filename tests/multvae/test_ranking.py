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


def test_score_blocks_shrink_with_the_catalogue_to_a_fixed_byte_budget() -> None:
    from multvae.ranking import SCORE_BLOCK_BYTES, score_block_rows

    assert score_block_rows(20_108) == 1000  # ML-20M: the old fixed block
    assert score_block_rows(1_000_000) == 67  # 67 x 10^6 x 8 bytes <= 512 MiB
    assert score_block_rows(10**9) == 1
    for n_items in (10, 41_140, 67_109, 1_000_000, 3_000_001):
        rows = score_block_rows(n_items)
        assert rows == 1000 or rows * n_items * 8 <= SCORE_BLOCK_BYTES < (rows + 1) * n_items * 8


def test_topk_rows_scores_blocks_of_the_memory_bounded_size(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("multvae.ranking.SCORE_BLOCK_BYTES", 8 * 10 * 4)  # 4 rows of 10 items
    fold_in = sp.csr_matrix(np.eye(10, dtype=np.float32)[:, ::-1])  # row r clicked 9 - r
    blocks = []

    def score(block: sp.csr_matrix) -> torch.Tensor:
        blocks.append(block.shape[0])
        return torch.arange(10, dtype=torch.float32).repeat(block.shape[0], 1)

    cols, _ = topk_rows(score, fold_in, 1)
    assert blocks == [4, 4, 2]
    assert cols.ravel().tolist() == [8] + [9] * 9


def test_summary_mean_and_standard_error() -> None:
    s = summarise({"m": np.array([0.0, 1.0, 0.5, 0.5])})["m"]
    assert s["mean"] == pytest.approx(0.5)
    assert s["se"] == pytest.approx(np.std([0, 1, 0.5, 0.5], ddof=1) / 2)


def test_precision_mrr_and_coverage_by_hand() -> None:
    from multvae.ranking import coverage_at_k, precision_at_k, reciprocal_rank

    topk = np.array([[3, 0, 1], [0, 1, 2], [4, 5, 6]])
    targets = _targets([[0, 1], [2], [9]])
    np.testing.assert_allclose(precision_at_k(topk, targets, 3), [2 / 3, 1 / 3, 0.0])
    np.testing.assert_allclose(precision_at_k(topk, targets, 1), [0.0, 0.0, 0.0])
    np.testing.assert_allclose(reciprocal_rank(topk, targets), [1 / 2, 1 / 3, 0.0])
    fold_in = _targets([[8], [7], [6]])  # user 2's item 6 was its own click: not "shown"
    assert coverage_at_k(topk, fold_in, 1) == pytest.approx(3 / 10)  # items 3, 0, 4
    assert coverage_at_k(topk, fold_in, 3) == pytest.approx(6 / 10)  # 0-5


def test_parse_cutoffs() -> None:
    from multvae.ranking import parse_cutoffs, ranking_depth

    assert parse_cutoffs("50,10, 20,10") == (10, 20, 50)
    for bad in ("", "10,x", "0,5", "-3", "2.5"):
        with pytest.raises(ValueError, match="comma-separated whole numbers >= 1"):
            parse_cutoffs(bad)
    assert ranking_depth(()) == 100
    assert ranking_depth((10, 500)) == 500


def _brute_force(
    scores: np.ndarray, fold_in: sp.csr_matrix, targets: sp.csr_matrix, k: int
) -> dict[str, float]:
    """Each metric from its definition, one user at a time over the full ranking."""
    recall, ndcg, precision, mrr, shown = [], [], [], [], set()
    for u in range(scores.shape[0]):
        own = set(fold_in[u].indices.tolist())
        relevant = set(targets[u].indices.tolist())
        ranked = [i for i in np.argsort(-scores[u], kind="stable") if i not in own]
        top = ranked[:k]
        shown |= set(top)
        hits = [i in relevant for i in top]
        recall.append(sum(hits) / min(k, len(relevant)))
        precision.append(sum(hits) / k)
        dcg = sum(1 / np.log2(r + 2) for r, h in enumerate(hits) if h)
        ideal = sum(1 / np.log2(r + 2) for r in range(min(k, len(relevant))))
        ndcg.append(dcg / ideal)
        first = next((r for r, i in enumerate(ranked) if i in relevant), None)
        mrr.append(0.0 if first is None or first >= k else 1 / (first + 1))  # MRR@k
    return {"recall": float(np.mean(recall)), "ndcg": float(np.mean(ndcg)),
            "precision": float(np.mean(precision)), "mrr": float(np.mean(mrr)),
            "coverage": len(shown) / scores.shape[1]}


@pytest.mark.parametrize("n_items", [40, 300])
def test_metrics_at_any_cutoff_match_brute_force(n_items: int) -> None:
    """Random scores, fold-in and targets: the vectorised metrics at new cut-offs (and with a
    catalogue smaller than the ranking depth) equal the definitions computed per user."""
    from training.dataset import HeldOut
    from training.evaluate import evaluate_topk

    rng = np.random.default_rng(n_items)
    n_users = 25
    scores = rng.normal(size=(n_users, n_items))
    fold_in_rows, target_rows = [], []
    for _ in range(n_users):
        items = rng.permutation(n_items)[: rng.integers(3, 15)]
        cut = rng.integers(1, len(items))
        fold_in_rows.append(sorted(items[:cut].tolist()))
        target_rows.append(sorted(items[cut:].tolist()))
    fold_in, targets = _targets(fold_in_rows, n_items), _targets(target_rows, n_items)
    cutoffs = (1, 5, 10, 37, 150)
    held = HeldOut(fold_in, targets, np.arange(n_users))
    masked = [fold_in[u].indices.astype(np.int64) for u in range(n_users)]
    topk, _ = mask_and_topk(torch.from_numpy(scores.copy()), masked, 150)
    ev = evaluate_topk(topk, held, cutoffs)
    summary = ev.summary()
    assert ev.cutoffs == cutoffs
    for k in cutoffs:
        expected = _brute_force(scores, fold_in, targets, k)
        for name in ("recall", "ndcg", "precision"):
            assert summary[f"{name}@{k}"]["mean"] == pytest.approx(expected[name]), (name, k)
        assert ev.coverage[k] == pytest.approx(expected["coverage"]), k
    depth = min(150, n_items)
    assert ev.mrr_metric == f"mrr@{depth}"
    expected_mrr = _brute_force(scores, fold_in, targets, depth)["mrr"]
    assert summary[f"mrr@{depth}"]["mean"] == pytest.approx(expected_mrr)
    # The paper's three are always there, unchanged by extra cut-offs.
    paper = evaluate_topk(topk, held).summary()
    assert set(paper) == {"recall@20", "recall@50", "ndcg@100"}
    for metric, stats in paper.items():
        assert summary[metric] == stats
