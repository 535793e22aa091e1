"""Top-k with masking and the paper's ranking metrics (Section 4.2), full ranking over all items.

Recall@k = hits in the top k / min(k, |held-out|).
NDCG@k = sum_{r<=k} 1[hit at r] / log2(r + 1), divided by the ideal DCG over
min(|held-out|, k) items.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from torch import Tensor


def mask_and_topk(
    scores: Tensor, masked: Sequence[NDArray[np.int64]], k: int
) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
    """Top-k columns and scores per row after setting each row's ``masked`` columns to -inf.

    ``scores`` is (B, I) and is modified in place. Rows may return masked columns only when
    fewer than k unmasked items exist; callers drop entries whose score is -inf.
    """
    if len(masked) != scores.shape[0]:
        raise ValueError(f"{len(masked)} masks for {scores.shape[0]} score rows")
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


PAPER_METRICS: tuple[tuple[str, int], ...] = (("recall", 20), ("recall", 50), ("ndcg", 100))


def per_user_metrics(
    topk: NDArray[np.int64], targets: sp.csr_matrix
) -> dict[str, NDArray[np.float64]]:
    """The paper's Recall@20, Recall@50 and NDCG@100, one value per user."""
    out: dict[str, NDArray[np.float64]] = {}
    for name, k in PAPER_METRICS:
        fn = recall_at_k if name == "recall" else ndcg_at_k
        out[f"{name}@{k}"] = fn(topk, targets, k)
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
