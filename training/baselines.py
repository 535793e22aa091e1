"""Baselines scored beside the model: popularity, EASE (Steck 2019) and WMF (Hu et al. 2008).

Every baseline is fitted on the training users only. Held-out users are folded in from their
fold-in clicks without refitting (strong generalisation, as for the model), their fold-in
items are masked, and the top 100 (or down to the deepest ``--k`` cut-off) go through
:func:`training.evaluate.evaluate_topk`, so the numbers are directly comparable with the
model's. Hyperparameters are chosen by validation NDCG@100 and the chosen fit scores the
test users.

* popularity: training click counts (ties by column, as the service's cold-start fallback).
* EASE: B = I - P diag(1 / diag(P)), P = (X^T X + lambda I)^-1, scores x B; lambda from
  :data:`EASE_GRID`. With more training users than items: two dense I x I float32 matrices
  at a time (the best B so far and the one being inverted in place; X^T X is rebuilt per
  lambda rather than kept). With fewer users than items (CiteULike-t: 4,175 x 24,100) the
  same B in its dual form, by the Woodbury identity P = (I - X^T K X) / lambda with
  K = (X X^T + lambda I)^-1, a U x U matrix, and B is never formed: x B = ((x X^T) K X - x o
  diag(X^T K X)) / (1 - diag(X^T K X)). It refuses data for which either does not fit.
* WMF: implicit alternating least squares with confidence c = 1 + alpha * x. Each half step
  solves every row's normal equations with a few conjugate-gradient steps warm-started from
  the previous factors (vectorised over rows; cost O(nnz * k) per step instead of one k x k
  solve per row). Held-out users are folded in by an exact least-squares solve against the
  item factors. The grid is REFERENCE.md's (:data:`WMF_GRID`, 32 fits of 15 iterations):
  20 s to 2 min on the ML-100K / ml-latest-small splits on 2 cores, depending on load. One
  fit grows with nnz * factors (about 3 min at ML-20M shape), so pass a smaller grid there.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray

from multvae.errors import DataError
from multvae.ranking import ranking_depth, topk_rows
from training.dataset import HeldOut, Split
from training.evaluate import TOP_K, Evaluation, evaluate_topk

BASELINE_NAMES = ("popularity", "ease", "wmf")
EASE_GRID: tuple[float, ...] = (50.0, 100.0, 200.0, 500.0, 1000.0)
WMF_GRID: tuple[tuple[int, float, float], ...] = tuple(
    itertools.product((64, 128), (2.0, 5.0, 10.0, 30.0), (0.01, 1.0, 10.0, 100.0))
)  # (factors, alpha, regularisation)
WMF_ITERATIONS = 15
CG_STEPS = 3
# Dense I x I arrays alive at once while the grid runs: the best B so far and the matrix being
# factorised and inverted in place. float32: co-occurrence counts are exact up to 2^24 and the
# ranking does not need more; it halves memory and doubles LAPACK's speed.
EASE_COPIES = 2
EASE_DTYPE = np.float32
GRAM_BLOCK = 1 << 23  # entries of X^T X computed per sparse product (32 MB of float32)

# A fitted baseline: dense scores (B, I) for a batch of fold-in rows (B, I).
Scorer = Callable[[sp.csr_matrix], NDArray[np.floating]]
Log = Callable[[str], None]


@dataclass
class BaselineResult:
    """A baseline's test and validation metrics and how its hyperparameters were chosen."""

    name: str
    test: Evaluation
    validation: Evaluation
    params: dict[str, Any] = field(default_factory=dict)
    search: list[dict[str, Any]] = field(default_factory=list)  # params + validation NDCG@100
    seconds: float = 0.0  # fitting, selection and scoring together

    def to_json(self) -> dict[str, Any]:
        return {
            "params": self.params,
            "search": self.search,
            "seconds": self.seconds,
            "validation": self.validation.to_json(),
            "test": self.test.to_json(),
        }


def parse_baseline_names(text: str) -> list[str]:
    """``"popularity,ease"`` -> ["popularity", "ease"]; unknown names are refused by name."""
    names = [n.strip().lower() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in BASELINE_NAMES]
    if unknown or not names:
        raise ValueError(
            f"unknown baseline(s) {', '.join(map(repr, unknown)) or repr(text)}; "
            f"choose from {', '.join(BASELINE_NAMES)} (comma-separated)"
        )
    return list(dict.fromkeys(names))


# -- ranking: every baseline goes through the same masking and metrics -----------------------


def rank_topk(
    score: Scorer, fold_in: sp.csr_matrix, k: int = TOP_K, batch_size: int | None = None
) -> NDArray[np.int64]:
    """(B, k) ranked columns per fold-in row with the row's own clicks masked."""

    def scores(block: sp.csr_matrix) -> torch.Tensor:
        dense = score(sp.csr_matrix(block, dtype=np.float64))
        return torch.from_numpy(np.array(dense, dtype=np.float64))  # (B, I), own copy

    return topk_rows(scores, fold_in, k, batch_size=batch_size)[0]


def evaluate_scorer(score: Scorer, heldout: HeldOut, cutoffs: Sequence[int] = ()) -> Evaluation:
    return evaluate_topk(rank_topk(score, heldout.fold_in, ranking_depth(cutoffs)), heldout,
                         cutoffs)


# -- popularity ------------------------------------------------------------------------------


def popularity_scorer(train: sp.csr_matrix) -> Scorer:
    counts = np.asarray(sp.csr_matrix(train).sum(axis=0), dtype=np.float64).ravel()
    n = len(counts)
    # Counts are integers, so a sub-unit offset only breaks ties: lower column first.
    ranked = counts - np.arange(n) / (n + 1.0)
    return lambda block: np.broadcast_to(ranked, (block.shape[0], n))


# -- EASE ------------------------------------------------------------------------------------


def available_memory_bytes() -> int | None:
    """MemAvailable from /proc/meminfo, or None where the kernel does not say."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def ease_is_dual(n_users: int | None, n_items: int) -> bool:
    """Whether EASE works in the U x U dual (fewer training users than items)."""
    return n_users is not None and n_users < n_items


def ease_memory_bytes(n_items: int, n_users: int | None = None) -> int:
    if ease_is_dual(n_users, n_items):
        assert n_users is not None
        return EASE_COPIES * n_users * n_users * 8  # the best K so far and the one inverted
    return EASE_COPIES * n_items * n_items * np.dtype(EASE_DTYPE).itemsize


def check_ease_memory(
    n_items: int, available: int | None = None, n_users: int | None = None
) -> None:
    """Refuse EASE before allocating when its dense matrices cannot fit."""
    available = available_memory_bytes() if available is None else available
    need = ease_memory_bytes(n_items, n_users)
    if available is not None and need > available:
        side = min(n_items, n_users or n_items)
        what = "users" if ease_is_dual(n_users, n_items) else "items"
        raise DataError(
            f"EASE needs about {need / 1e9:.1f} GB for {n_items:,} items ({EASE_COPIES} dense "
            f"{side:,} x {side:,} matrices over its {what}) but only {available / 1e9:.1f} GB "
            "is available; drop 'ease' from --baselines, or keep fewer items"
        )


def ease_gram(train: sp.csr_matrix, out: NDArray[np.float32] | None = None) -> NDArray[np.float32]:
    """Dense X^T X (I, I) float32 of the training matrix, into ``out`` when given.

    Built a block of rows at a time, so the sparse product never exists whole (at ML-20M's
    20,000 items it is nearly dense and would take three times the dense matrix's memory).
    """
    x = sp.csr_matrix(train, dtype=EASE_DTYPE)
    xt = sp.csr_matrix(x.T)
    n = x.shape[1]
    gram = np.empty((n, n), dtype=EASE_DTYPE) if out is None else out
    step = max(1, GRAM_BLOCK // max(n, 1))
    for start in range(0, n, step):
        gram[start : start + step] = (xt[start : start + step] @ x).toarray()
    return gram


def ease_weights(train: sp.csr_matrix, l2: float) -> NDArray[np.float32]:
    """EASE's item-item matrix B (I, I) float32 with zero diagonal, in one I x I buffer."""
    n = train.shape[1]
    buffer = np.empty((n, n), dtype=EASE_DTYPE, order="F")
    ease_gram(train, out=buffer.T)  # X^T X is symmetric: filling its transpose fills it
    # Column-major, as LAPACK stores matrices: torch factorises and inverts it in place, where
    # a row-major tensor costs a working copy. torch's LAPACK (MKL) rather than scipy's: the
    # bundled OpenBLAS crashes (SIGSEGV in its threaded potrf) from about 16,500 items here.
    p = torch.from_numpy(buffer)
    _invert_regularised_(p, l2, "X^T X")  # P = (X^T X + lambda I)^-1, both triangles
    inv = buffer.T  # P is symmetric: the row-major view is P too, and scores rows fast
    inv /= -np.diag(inv).copy()[None, :]  # B_ij = -P_ij / P_jj
    np.fill_diagonal(inv, 0.0)
    return inv


def _invert_regularised_(m: torch.Tensor, l2: float, name: str) -> None:
    """``m <- (m + l2 I)^-1`` in place through its Cholesky factor (``m`` symmetric)."""
    m.diagonal().add_(l2)
    try:
        torch.linalg.cholesky(m, out=m)
    except torch.linalg.LinAlgError as exc:
        raise DataError(
            f"{name} + {l2} I is not positive definite ({exc}); use a larger L2 weight"
        ) from exc
    torch.cholesky_inverse(m, out=m)


def ease_scorer(weights: NDArray[np.float32]) -> Scorer:
    # The block in B's dtype: a float64 block would make scipy convert all of B first.
    return lambda block: np.asarray(block.astype(weights.dtype) @ weights)


@dataclass
class _Dual:
    """EASE's dual pieces for fewer training users U than items: the training matrix's
    transpose, K = (X X^T + lambda I)^-1 (U x U) and diag(X^T K X)."""

    xt: sp.csr_matrix
    kernel: NDArray[np.float64]
    qdiag: NDArray[np.float64]

    @classmethod
    def fit(cls, train: sp.csr_matrix, l2: float, chunk: int = 2048) -> _Dual:
        x = sp.csr_matrix(train, dtype=np.float64)
        xt = sp.csr_matrix(x.T)
        k = torch.from_numpy((x @ xt).toarray())  # X X^T, U x U
        _invert_regularised_(k, l2, "X X^T")
        kernel = k.numpy()  # symmetric
        # diag(X^T K X)_j = x_j^T K x_j over item columns x_j, a chunk of items at a time.
        qdiag = np.empty(x.shape[1])
        for start in range(0, x.shape[1], chunk):
            cols = xt[start : start + chunk]  # (c, U)
            qdiag[start : start + chunk] = np.asarray(
                cols.multiply(cols @ kernel).sum(axis=1)
            ).ravel()
        return cls(xt, kernel, qdiag)


def ease_dual_scorer(train: sp.csr_matrix, l2: float) -> Scorer:
    """EASE's scores x B without B, for fewer training users U than items (see the module doc).

    Costs a U x U Cholesky inverse (float64) per lambda instead of an I x I one.
    """
    dual = _Dual.fit(train, l2)
    xt, kernel, qdiag = dual.xt, dual.kernel, dual.qdiag
    scale = 1.0 / (1.0 - qdiag)  # 1 / (lambda P_jj) > 0: P is positive definite

    def score(block: sp.csr_matrix) -> NDArray[np.float64]:
        block = sp.csr_matrix(block, dtype=np.float64)
        t = np.asarray((block @ xt) @ kernel)  # (B, U)
        xq = np.asarray(xt @ t.T).T  # (B, I) = x X^T K X
        xq[_rows_of(block), block.indices] -= block.data * qdiag[block.indices]  # B_jj = 0
        return xq * scale[None, :]

    return score


def ease_neighbours(
    train: sp.csr_matrix, l2: float, width: int, block: int = 1024
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Each item's ``width`` largest EASE weights by magnitude: (I, m) columns j and B[i, j].

    The rows of B are built a block of items at a time, from the I x I inverse or, with
    fewer training users than items, from the dual (B[i, j] = (X^T K X)_ij / (1 - q_j) off
    the diagonal), so the dual never holds more than a block of B.
    """
    n = train.shape[1]
    width = min(width, n)
    cols = np.empty((n, width), dtype=np.int64)
    vals = np.empty((n, width), dtype=np.float32)
    if ease_is_dual(train.shape[0], n):
        dual = _Dual.fit(train, l2)
        scale = 1.0 / (1.0 - dual.qdiag)

        def rows(start: int, stop: int) -> NDArray[np.floating]:
            kx = np.asarray(dual.xt[start:stop] @ dual.kernel)  # (b, U)
            out = np.asarray(dual.xt @ kx.T).T * scale[None, :]  # (b, I)
            out[np.arange(stop - start), np.arange(start, stop)] = 0.0
            return out
    else:
        weights = ease_weights(train, l2)

        def rows(start: int, stop: int) -> NDArray[np.floating]:
            return weights[start:stop]

    for start in range(0, n, block):
        stop = min(start + block, n)
        b = rows(start, stop)
        top = np.argpartition(-np.abs(b), width - 1, axis=1)[:, :width]
        cols[start:stop] = top
        vals[start:stop] = np.take_along_axis(b, top, axis=1)
    return cols, vals


def ease_fit(train: sp.csr_matrix, l2: float) -> Scorer:
    """EASE's scorer in whichever form is cheaper for the shape of ``train``."""
    if ease_is_dual(train.shape[0], train.shape[1]):
        return ease_dual_scorer(train, l2)
    return ease_scorer(ease_weights(train, l2))


# -- WMF (implicit ALS) ----------------------------------------------------------------------


def _rows_of(m: sp.csr_matrix) -> NDArray[np.int64]:
    return np.repeat(np.arange(m.shape[0], dtype=np.int64), np.diff(m.indptr))


def _cg_half_step(
    conf: sp.csr_matrix,
    rows: NDArray[np.int64],
    fixed: NDArray[np.float32],
    solve_for: NDArray[np.float32],
    alpha: float,
    reg: float,
    steps: int,
    chunk: int = 8192,
) -> NDArray[np.float32]:
    """Approximately solve, for every row u of ``conf`` (n, m) at once,
    (F^T F + alpha F_u^T F_u + reg I) x_u = (1 + alpha) F_u^T 1, starting from ``solve_for``.

    F = ``fixed`` (m, k); F_u its rows for the items u clicked. Only clicked entries carry the
    extra confidence, so each operator application costs O(nnz * k + n * k^2). float32 and
    small gather chunks (which stay in cache) make the sampled product several times faster.
    """
    k = fixed.shape[1]
    gram = (fixed.T @ fixed + reg * np.eye(k, dtype=np.float32)).astype(np.float32)  # (k, k)
    cols = conf.indices

    def apply(v: NDArray[np.float32]) -> NDArray[np.float32]:
        # alpha * sum_{i in u} f_i (f_i . v_u), via a sampled dense product over clicks only.
        d = np.empty(len(cols), dtype=np.float32)
        for s in range(0, len(cols), chunk):
            e = s + chunk
            d[s:e] = np.einsum("ij,ij->i", fixed[cols[s:e]], v[rows[s:e]])
        weighted = sp.csr_matrix((np.float32(alpha) * d, cols, conf.indptr), shape=conf.shape)
        return np.asarray(v @ gram + weighted @ fixed, dtype=np.float32)

    b = np.float32(1.0 + alpha) * np.asarray(conf @ fixed, dtype=np.float32)  # (n, k)
    x = solve_for.copy()
    r = b - apply(x)
    p = r.copy()
    rs = np.einsum("ij,ij->i", r, r)
    for _ in range(steps):
        ap = apply(p)
        denom = np.einsum("ij,ij->i", p, ap)
        step = np.divide(rs, denom, out=np.zeros_like(rs), where=denom > 0)
        x += step[:, None] * p
        r -= step[:, None] * ap
        rs_new = np.einsum("ij,ij->i", r, r)
        ratio = np.divide(rs_new, rs, out=np.zeros_like(rs), where=rs > 0)
        p = r + ratio[:, None] * p
        rs = rs_new
    return x


def wmf_fit(
    train: sp.csr_matrix,
    factors: int,
    alpha: float,
    reg: float,
    iterations: int = WMF_ITERATIONS,
    cg_steps: int = CG_STEPS,
    seed: int = 0,
) -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    """(user factors (n, k), item factors (m, k)) by implicit ALS on the binary ``train``."""
    x = sp.csr_matrix(train, dtype=np.float32)
    x.data[:] = 1.0
    xt = sp.csr_matrix(x.T)
    rows_u, rows_i = _rows_of(x), _rows_of(xt)
    rng = np.random.default_rng(seed)
    items = rng.normal(0.0, 0.01, (x.shape[1], factors)).astype(np.float32)
    users = np.zeros((x.shape[0], factors), dtype=np.float32)
    for _ in range(iterations):
        users = _cg_half_step(x, rows_u, items, users, alpha, reg, cg_steps)
        items = _cg_half_step(xt, rows_i, users, items, alpha, reg, cg_steps)
    return users, items


def wmf_fold_in(
    fold_in: sp.csr_matrix, item_factors: NDArray[np.floating], alpha: float, reg: float
) -> NDArray[np.float64]:
    """Exact least-squares user factors (B, k) for held-out rows, item factors fixed."""
    fold_in = sp.csr_matrix(fold_in)
    items = np.asarray(item_factors, dtype=np.float64)  # solve in float64: few users, exact
    k = items.shape[1]
    gram = items.T @ items + reg * np.eye(k)
    a = np.empty((fold_in.shape[0], k, k))
    b = np.empty((fold_in.shape[0], k))
    for u in range(fold_in.shape[0]):
        fu = items[fold_in.indices[fold_in.indptr[u] : fold_in.indptr[u + 1]]]  # (n_u, k)
        a[u] = gram + alpha * (fu.T @ fu)
        b[u] = (1.0 + alpha) * fu.sum(axis=0)
    if not len(a):
        return b
    return np.asarray(np.linalg.solve(a, b[:, :, None])[:, :, 0], dtype=np.float64)


def wmf_scorer(items: NDArray[np.floating], alpha: float, reg: float) -> Scorer:
    return lambda block: wmf_fold_in(block, items, alpha, reg) @ items.T


# -- selection on validation users and the public entry point --------------------------------


def _select(
    name: str,
    split: Split,
    candidates: Sequence[dict[str, Any]],
    fit: Callable[[dict[str, Any]], Scorer],
    log: Log | None,
    cutoffs: Sequence[int] = (),
) -> BaselineResult:
    tic = time.perf_counter()
    best: tuple[float, dict[str, Any], Scorer, Evaluation] | None = None
    search: list[dict[str, Any]] = []
    for params in candidates:
        scorer = fit(params)
        val = evaluate_scorer(scorer, split.validation)
        ndcg = float(val.per_user["ndcg@100"].mean())
        search.append({**params, "val_ndcg@100": ndcg})
        if log is not None and len(candidates) > 1:
            log(f"  {name} {params}: validation NDCG@100 {ndcg:.4f}")
        if best is None or ndcg > best[0]:
            best = (ndcg, params, scorer, val)
        del scorer  # a losing fit (EASE: an I x I matrix) is freed before the next one
    assert best is not None, "a baseline needs at least one candidate"
    _, params, scorer, val = best
    test = evaluate_scorer(scorer, split.test, cutoffs)
    return BaselineResult(name, test, val, dict(params), search, time.perf_counter() - tic)


def run_popularity(
    split: Split, log: Log | None = None, cutoffs: Sequence[int] = ()
) -> BaselineResult:
    return _select("popularity", split, [{}], lambda _: popularity_scorer(split.train), log,
                   cutoffs)


def run_ease(
    split: Split, grid: Sequence[float] = EASE_GRID, log: Log | None = None,
    cutoffs: Sequence[int] = (),
) -> BaselineResult:
    check_ease_memory(split.n_items, n_users=split.train.shape[0])
    candidates = [{"l2": float(v)} for v in grid]
    return _select(
        "ease", split, candidates, lambda p: ease_fit(split.train, p["l2"]), log, cutoffs
    )


def run_wmf(
    split: Split,
    grid: Sequence[tuple[int, float, float]] = WMF_GRID,
    iterations: int = WMF_ITERATIONS,
    seed: int = 0,
    log: Log | None = None,
    cutoffs: Sequence[int] = (),
) -> BaselineResult:
    def fit(p: dict[str, Any]) -> Scorer:
        _, items = wmf_fit(split.train, p["factors"], p["alpha"], p["reg"], iterations, seed=seed)
        return wmf_scorer(items, p["alpha"], p["reg"])

    candidates = [{"factors": f, "alpha": a, "reg": r} for f, a, r in grid]
    result = _select("wmf", split, candidates, fit, log, cutoffs)
    result.params["iterations"] = iterations
    return result


def run_baselines(
    split: Split,
    names: Sequence[str],
    *,
    ease_grid: Sequence[float] = EASE_GRID,
    wmf_grid: Sequence[tuple[int, float, float]] = WMF_GRID,
    wmf_iterations: int = WMF_ITERATIONS,
    seed: int = 0,
    log: Log | None = None,
    cutoffs: Sequence[int] = (),
) -> dict[str, BaselineResult]:
    """Fit, select on validation NDCG@100 and score on the test users each named baseline
    (with the metrics at ``cutoffs`` too, as :func:`training.evaluate.evaluate_topk`)."""
    unknown = [n for n in names if n not in BASELINE_NAMES]
    if unknown:
        raise ValueError(f"unknown baseline(s) {unknown}; choose from {BASELINE_NAMES}")
    if "ease" in names:
        # before any work, so the refusal is immediate
        check_ease_memory(split.n_items, n_users=split.train.shape[0])
    results: dict[str, BaselineResult] = {}
    for name in names:
        if name == "popularity":
            results[name] = run_popularity(split, log, cutoffs)
        elif name == "ease":
            results[name] = run_ease(split, ease_grid, log, cutoffs)
        else:
            results[name] = run_wmf(split, wmf_grid, wmf_iterations, seed, log, cutoffs)
        if log is not None:
            r = results[name]
            log(
                f"{name}: {r.params or 'no hyperparameters'}, validation NDCG@100 "
                f"{r.validation.per_user['ndcg@100'].mean():.4f} ({r.seconds:.1f} s)"
            )
    return results
