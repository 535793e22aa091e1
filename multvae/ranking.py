"""Top-k with masking and the paper's ranking metrics (Section 4.2), full ranking over all items.

Recall@k = hits in the top k / min(k, |held-out|).
NDCG@k = sum_{r<=k} 1[hit at r] / log2(r + 1), divided by the ideal DCG over
min(|held-out|, k) items.
Precision@k = hits in the top k / k.
MRR@K = 1 / rank of the first hit in the top K, 0 when none is (K: the ranking depth).
Coverage@k = distinct items recommended in anyone's top k / catalogue size (one number for
all users; a user's own fold-in items, ranked only when too few others exist, do not count).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from torch import Tensor


def mask_and_topk(
    scores: Tensor,
    masked: Sequence[NDArray[np.int64]],
    k: int,
    allowed: Sequence[NDArray[np.int64] | None] | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Top-k columns and scores per row after setting each row's ``masked`` columns to -inf.

    ``scores`` is (B, I) and is modified in place. ``allowed[b]``, when given and not None,
    restricts row b to those columns (every other column is masked too). Rows may return
    masked columns only when fewer than k unmasked items exist; callers drop entries whose
    score is -inf.
    """
    if len(masked) != scores.shape[0]:
        raise ValueError(f"{len(masked)} masks for {scores.shape[0]} score rows")
    if allowed is not None:
        for row, keep in enumerate(allowed):
            if keep is not None:
                outside = torch.ones(scores.shape[1], dtype=torch.bool, device=scores.device)
                outside[torch.from_numpy(keep).to(scores.device)] = False
                scores[row, outside] = -torch.inf
    lengths = [len(m) for m in masked]
    if sum(lengths):
        rows = torch.repeat_interleave(
            torch.arange(len(masked)), torch.tensor(lengths, dtype=torch.int64)
        ).to(scores.device)
        cols = torch.from_numpy(np.concatenate(masked).astype(np.int64)).to(scores.device)
        scores[rows, cols] = -torch.inf
    k = min(k, scores.shape[1])
    values, indices = torch.topk(scores, k, dim=1, sorted=True)
    return indices.cpu().numpy().astype(np.int64), values.float().cpu().numpy()


# A block of fold-in rows is scored at once: at most 1000 rows, and at most this many bytes
# of scores at 8 bytes a score (float64, the baselines'; the model's float32 takes half), so
# that a catalogue of a million items is scored 67 rows at a time, not 1000 (8 GB).
MAX_BLOCK_ROWS = 1000
SCORE_BLOCK_BYTES = 2**29


def score_block_rows(n_items: int) -> int:
    """How many fold-in rows :func:`topk_rows` scores at once over ``n_items`` items."""
    return max(1, min(MAX_BLOCK_ROWS, SCORE_BLOCK_BYTES // (8 * max(n_items, 1))))


def topk_rows(
    score: Callable[[sp.csr_matrix], Tensor],
    fold_in: sp.csr_matrix,
    k: int,
    *,
    exclude: NDArray[np.int64] | None = None,
    batch_size: int | None = None,
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """(B, k) ranked columns and scores for every fold-in row, in batches of ``batch_size``
    rows (default: :func:`score_block_rows`, bounded by the catalogue size).

    ``score`` maps a block of fold-in rows (b, I) to a (b, I) score tensor of its own (it is
    masked in place). Each row's own clicks are masked, and ``exclude`` (columns) in every
    row; a score of -inf marks a masked column returned because fewer than k were left. The
    one batched top-k of the project: the model's evaluation, the baselines and
    ``multvae compare`` all rank through it.
    """
    fold_in = sp.csr_matrix(fold_in)
    batch_size = batch_size or score_block_rows(fold_in.shape[1])
    extra = exclude if exclude is not None else np.zeros(0, dtype=np.int64)
    cols, scores = [], []
    for start in range(0, fold_in.shape[0], batch_size):
        block = fold_in[start : start + batch_size]
        masked = [
            np.concatenate([block.indices[block.indptr[i] : block.indptr[i + 1]], extra])
            for i in range(block.shape[0])
        ]
        c, s = mask_and_topk(score(block), [m.astype(np.int64) for m in masked], k)
        cols.append(c)
        scores.append(s)
    if not cols:
        width = min(k, fold_in.shape[1])
        return np.zeros((0, width), dtype=np.int64), np.zeros((0, width), dtype=np.float32)
    return np.concatenate(cols), np.concatenate(scores)


def _hits(topk: NDArray[np.int64], targets: sp.csr_matrix) -> NDArray[np.bool_]:
    """(B, k) whether the item ranked r for user b is one of b's held-out items."""
    rows = np.arange(topk.shape[0])[:, None]
    picked = sp.csr_matrix(targets[rows, topk])  # (B, k)
    return np.asarray(picked.toarray() > 0)


def recall_at_k(topk: NDArray[np.int64], targets: sp.csr_matrix, k: int) -> NDArray[np.float64]:
    """Per-user Recall@k; ``topk`` is (B, >=k) ranked columns, ``targets`` (B, I)."""
    n_targets = np.asarray((targets > 0).sum(axis=1)).ravel()
    if (n_targets == 0).any():
        raise ValueError("every evaluated user needs at least one held-out item")
    hits = _hits(topk[:, :k], targets).sum(axis=1)
    return hits / np.minimum(k, n_targets)


def ndcg_at_k(topk: NDArray[np.int64], targets: sp.csr_matrix, k: int) -> NDArray[np.float64]:
    """Per-user NDCG@k with the log2(rank + 1) discount."""
    n_targets = np.asarray((targets > 0).sum(axis=1)).ravel()
    if (n_targets == 0).any():
        raise ValueError("every evaluated user needs at least one held-out item")
    discount = 1.0 / np.log2(np.arange(2, k + 2))
    dcg = (_hits(topk[:, :k], targets) * discount[: topk[:, :k].shape[1]]).sum(axis=1)
    ideal = np.cumsum(discount)[np.minimum(n_targets, k) - 1]
    return dcg / ideal


def precision_at_k(
    topk: NDArray[np.int64], targets: sp.csr_matrix, k: int
) -> NDArray[np.float64]:
    """Per-user Precision@k: hits in the top k over k."""
    return _hits(topk[:, :k], targets).sum(axis=1) / k


def reciprocal_rank(topk: NDArray[np.int64], targets: sp.csr_matrix) -> NDArray[np.float64]:
    """Per-user 1 / rank of the first held-out item within ``topk``'s columns, else 0."""
    hits = _hits(topk, targets)
    first = hits.argmax(axis=1)
    return np.where(hits.any(axis=1), 1.0 / (first + 1.0), 0.0)


def coverage_at_k(topk: NDArray[np.int64], fold_in: sp.csr_matrix, k: int) -> float:
    """Share of the catalogue that appears in some user's top k (own fold-in items excluded)."""
    top = topk[:, :k]
    rows = np.repeat(np.arange(top.shape[0]), top.shape[1])
    shown = sp.csr_matrix(
        (np.ones(top.size), (rows, top.ravel())), shape=fold_in.shape, dtype=np.float64
    )
    shown = shown - shown.multiply(fold_in > 0)
    return float(np.count_nonzero(np.asarray(shown.sum(axis=0)).ravel())) / fold_in.shape[1]


PAPER_METRICS: tuple[tuple[str, int], ...] = (("recall", 20), ("recall", 50), ("ndcg", 100))
PAPER_DEPTH = 100  # the largest cut-off a paper metric needs
_PER_USER_AT_K = {"recall": recall_at_k, "ndcg": ndcg_at_k, "precision": precision_at_k}


def ranking_depth(cutoffs: Sequence[int] = ()) -> int:
    """How many ranked columns the paper's metrics plus ``cutoffs`` need."""
    return max((PAPER_DEPTH, *cutoffs))


def parse_cutoffs(text: str) -> tuple[int, ...]:
    """``"10,20,50,100"`` -> (10, 20, 50, 100), ascending without repeats; ValueError naming
    what is accepted otherwise."""
    try:
        cutoffs = sorted({int(part) for part in text.split(",")})
    except ValueError:
        cutoffs = []
    if not cutoffs or cutoffs[0] < 1:
        raise ValueError(
            f"{text!r}: give cut-offs as comma-separated whole numbers >= 1, e.g. 10,20,50,100"
        )
    return tuple(cutoffs)


def per_user_metrics(
    topk: NDArray[np.int64], targets: sp.csr_matrix, cutoffs: Sequence[int] = ()
) -> dict[str, NDArray[np.float64]]:
    """The paper's Recall@20, Recall@50 and NDCG@100, one value per user; with ``cutoffs``,
    also Recall, NDCG and Precision at each cut-off and MRR over all of ``topk``'s columns."""
    out: dict[str, NDArray[np.float64]] = {}
    for name, k in PAPER_METRICS:
        out[f"{name}@{k}"] = _PER_USER_AT_K[name](topk, targets, k)
    if cutoffs:
        for name, fn in _PER_USER_AT_K.items():
            for k in cutoffs:
                out.setdefault(f"{name}@{k}", fn(topk, targets, k))
        out[f"mrr@{topk.shape[1]}"] = reciprocal_rank(topk, targets)
    return out


def standard_error(values: NDArray[np.float64]) -> float | None:
    """Standard error of the mean; None (JSON null, not NaN) when it is undefined (n < 2)."""
    n = len(values)
    return float(values.std(ddof=1) / np.sqrt(n)) if n > 1 else None


def summarise(per_user: dict[str, NDArray[np.float64]]) -> dict[str, dict[str, Any]]:
    """Mean, standard error and user count of each per-user metric."""
    return {
        name: {"mean": float(values.mean()), "se": standard_error(values), "n": len(values)}
        for name, values in per_user.items()
    }
