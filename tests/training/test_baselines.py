"""Baselines on tiny matrices whose right answer is known."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.sparse as sp

from multvae.errors import DataError
from multvae.items import ItemIndex
from training import baselines
from training.baselines import (
    _cg_half_step,
    _rows_of,
    check_ease_memory,
    ease_gram,
    ease_scorer,
    ease_weights,
    parse_baseline_names,
    popularity_scorer,
    rank_topk,
    run_baselines,
    wmf_fit,
    wmf_fold_in,
    wmf_scorer,
)
from training.dataset import HeldOut, Split


def csr(rows: list[list[int]], n_items: int) -> sp.csr_matrix:
    indptr = np.cumsum([0] + [len(r) for r in rows])
    indices = np.concatenate([np.asarray(r, dtype=np.int64) for r in rows]) if rows else []
    return sp.csr_matrix((np.ones(indptr[-1], np.float32), indices, indptr), (len(rows), n_items))


def block_split(
    seed: int = 0, per_block: int = 10, n_train: int = 60, n_heldout: int = 12
) -> Split:
    """Two disjoint tastes: users click only items of their own block (known right answer)."""
    rng = np.random.default_rng(seed)
    n_items = 2 * per_block

    def histories(n: int, size: int) -> list[list[int]]:
        out = []
        for u in range(n):
            block = u % 2
            out.append(sorted(rng.choice(per_block, size, replace=False) + block * per_block))
        return out

    train = csr(histories(n_train, 6), n_items)

    def heldout(n: int) -> HeldOut:
        hist = histories(n, 6)
        return HeldOut(
            csr([h[:4] for h in hist], n_items),
            csr([h[4:] for h in hist], n_items),
            np.asarray([f"u{i}" for i in range(n)]),
        )

    pop = np.asarray(train.sum(axis=0)).ravel().astype(np.int64)
    items = ItemIndex.build([str(i) for i in range(n_items)], pop)
    return Split(train, heldout(n_heldout), heldout(n_heldout), items, seed)


# -- EASE ------------------------------------------------------------------------------------


def test_ease_two_items_by_hand() -> None:
    # X^T X = [[2, 1], [1, 2]]; + I -> [[3, 1], [1, 3]]; P = [[3, -1], [-1, 3]] / 8;
    # B_01 = -P_01 / P_11 = (1/8) / (3/8) = 1/3, and symmetrically B_10.
    x = csr([[0, 1], [0], [1]], 2)
    np.testing.assert_allclose(ease_weights(x, 1.0), [[0.0, 1 / 3], [1 / 3, 0.0]], rtol=1e-6)


def test_ease_matches_closed_form_on_random_matrix() -> None:
    rng = np.random.default_rng(3)
    x = sp.csr_matrix((rng.random((30, 7)) < 0.4).astype(np.float32))
    lam = 5.0
    xd = x.toarray().astype(np.float64)
    np.testing.assert_array_equal(ease_gram(x), xd.T @ xd)  # counts: exact in float32
    p = np.linalg.inv(xd.T @ xd + lam * np.eye(7))
    expected = np.eye(7) - p / np.diag(p)[None, :]  # B = I - P diag(1 / diag P)
    weights = ease_weights(x, lam)
    assert weights.dtype == np.float32
    assert weights.flags.c_contiguous  # scored row by row without a copy
    np.testing.assert_allclose(weights, expected, atol=1e-6)


def test_ease_gram_in_row_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Blocks of a few rows (and a last, shorter one) assemble the same X^T X."""
    rng = np.random.default_rng(4)
    x = sp.csr_matrix((rng.random((40, 11)) < 0.3).astype(np.float32))
    monkeypatch.setattr(baselines, "GRAM_BLOCK", 4 * 11)
    xd = x.toarray().astype(np.float64)
    np.testing.assert_array_equal(ease_gram(x), xd.T @ xd)


def test_ease_refuses_catalogues_that_do_not_fit() -> None:
    with pytest.raises(DataError, match=r"80\.0 GB for 100,000 items"):
        check_ease_memory(100_000, available=10**9)
    check_ease_memory(1_000, available=10**9)  # 8 MB fits
    # CiteULike-t's shape: the dual form needs two 4,175^2 float64 matrices, not 24,100^2
    check_ease_memory(24_100, available=10**9, n_users=4_175)
    with pytest.raises(DataError, match=r"4,175 x 4,175 matrices over its users"):
        check_ease_memory(24_100, available=10**8, n_users=4_175)


def test_run_baselines_refuses_ease_before_fitting(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(baselines, "available_memory_bytes", lambda: 1000)

    def fail(_: object) -> None:
        raise AssertionError("EASE started before the memory check")

    monkeypatch.setattr(baselines, "ease_gram", fail)
    with pytest.raises(DataError, match="EASE needs about"):
        run_baselines(block_split(), ["popularity", "ease"])


# -- popularity and masking ------------------------------------------------------------------


def test_popularity_ranks_by_training_count_and_masks_fold_in() -> None:
    # Column counts: 0 -> 1, 1 -> 4, 2 -> 2, 3 -> 3, 4 -> 2 (tie with 2: lower column first).
    train = csr([[0, 1, 2, 3, 4], [1, 3], [1, 2, 3, 4], [1]], 5)
    fold_in = csr([[3], [1, 4]], 5)
    top = rank_topk(popularity_scorer(train), fold_in, k=3)
    np.testing.assert_array_equal(top, [[1, 2, 4], [3, 2, 0]])


def test_ease_recommends_within_the_users_block() -> None:
    split = block_split()
    # A large L2 weight keeps every within-block weight positive (B ~ X^T X / lambda).
    scorer = ease_scorer(ease_weights(split.train, 100.0))
    top = rank_topk(scorer, split.test.fold_in, k=6)
    for row, ranked in enumerate(top):
        clicked = split.test.fold_in[row].indices
        block = clicked[0] // 10
        assert set(ranked) == set(range(block * 10, block * 10 + 10)) - set(clicked)


# -- WMF -------------------------------------------------------------------------------------


def exact_rows(x: sp.csr_matrix, fixed: np.ndarray, alpha: float, reg: float) -> np.ndarray:
    """Hu et al.'s closed form, one dense solve per row: (F^T C_u F + reg I)^-1 F^T C_u p_u."""
    out = []
    for u in range(x.shape[0]):
        p = x[u].toarray().ravel()
        c = 1.0 + alpha * p
        a = fixed.T @ (c[:, None] * fixed) + reg * np.eye(fixed.shape[1])
        out.append(np.linalg.solve(a, fixed.T @ (c * p)))
    return np.asarray(out)


def test_conjugate_gradient_half_step_reaches_the_exact_solve() -> None:
    rng = np.random.default_rng(1)
    x = sp.csr_matrix((rng.random((12, 9)) < 0.3).astype(np.float32))
    fixed = rng.normal(size=(9, 4)).astype(np.float32)
    start = np.zeros((12, 4), dtype=np.float32)
    # k = 4 unknowns per row: CG is exact after 4 steps up to float32 rounding.
    got = _cg_half_step(x, _rows_of(x), fixed, start, alpha=3.0, reg=0.5, steps=8)
    np.testing.assert_allclose(got, exact_rows(x, fixed.astype(np.float64), 3.0, 0.5), atol=1e-3)


def test_wmf_fold_in_is_the_least_squares_solve() -> None:
    rng = np.random.default_rng(2)
    fold_in = sp.csr_matrix((rng.random((5, 9)) < 0.4).astype(np.float32))
    items = rng.normal(size=(9, 3))
    np.testing.assert_allclose(
        wmf_fold_in(fold_in, items, 10.0, 1.0), exact_rows(fold_in, items, 10.0, 1.0), atol=1e-10
    )


def test_wmf_recommends_within_the_users_block() -> None:
    split = block_split()
    _, items = wmf_fit(split.train, factors=2, alpha=10.0, reg=1.0, iterations=10)
    top = rank_topk(wmf_scorer(items, 10.0, 1.0), split.test.fold_in, k=6)
    for row, ranked in enumerate(top):
        block = split.test.fold_in[row].indices[0] // 10
        assert all(c // 10 == block for c in ranked)


# -- the entry point -------------------------------------------------------------------------


def test_run_baselines_selects_on_validation_and_scores_test_users() -> None:
    split = block_split()
    results = run_baselines(
        split,
        ["popularity", "ease", "wmf"],
        ease_grid=(1.0, 1000.0),
        wmf_grid=((2, 10.0, 1.0), (2, 2.0, 100.0)),
        wmf_iterations=5,
    )
    assert list(results) == ["popularity", "ease", "wmf"]
    for name, result in results.items():
        assert result.test.n_users == split.test.n_users
        assert result.validation.n_users == split.validation.n_users
        json.dumps(result.to_json(), allow_nan=False)
        if name != "popularity":
            best = max(result.search, key=lambda s: s["val_ndcg@100"])
            assert best["val_ndcg@100"] == pytest.approx(
                result.validation.per_user["ndcg@100"].mean()
            )
    assert [s["l2"] for s in results["ease"].search] == [1.0, 1000.0]
    assert results["wmf"].params["iterations"] == 5
    # Tastes are disjoint blocks: the personalised methods beat ranking by popularity.
    pop = results["popularity"].test.per_user["ndcg@100"].mean()
    assert results["ease"].test.per_user["ndcg@100"].mean() > pop + 0.1
    assert results["wmf"].test.per_user["ndcg@100"].mean() > pop + 0.1


def test_parse_baseline_names() -> None:
    assert parse_baseline_names("popularity, EASE,ease") == ["popularity", "ease"]
    with pytest.raises(ValueError, match=r"'slim'.*popularity, ease, wmf"):
        parse_baseline_names("ease,slim")


@pytest.mark.parametrize("shape", [(12, 30), (40, 9)])
def test_ease_dual_form_scores_like_the_primal(shape: tuple[int, int]) -> None:
    """Fewer users than items: the U x U Woodbury form gives x B without forming B."""
    rng = np.random.default_rng(5)
    x = sp.csr_matrix((rng.random(shape) < 0.3).astype(np.float32))
    block = sp.csr_matrix((rng.random((6, shape[1])) < 0.3).astype(np.float32))
    lam = 3.0
    xd = x.toarray().astype(np.float64)
    p = np.linalg.inv(xd.T @ xd + lam * np.eye(shape[1]))
    b = np.eye(shape[1]) - p / np.diag(p)[None, :]
    np.testing.assert_allclose(
        baselines.ease_dual_scorer(x, lam)(block), block.toarray() @ b, atol=1e-9
    )
    assert baselines.ease_is_dual(*shape) == (shape[0] < shape[1])
    np.testing.assert_allclose(baselines.ease_fit(x, lam)(block), block.toarray() @ b,
                               atol=1e-5)
