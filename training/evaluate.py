"""Scoring held-out users with the paper's metrics, plus the Figure 3 activity breakdown.

Every method (the model, the baselines) produces ranked top-k columns for the fold-in rows
with the fold-in items masked; :func:`evaluate_topk` turns them into per-user Recall@20,
Recall@50 and NDCG@100, means with standard errors, and NDCG@100 per quintile of fold-in
activity. Given cut-offs (``multvae evaluate --k 10,20,50,100``) it adds Recall, NDCG and
Precision at each, MRR, and catalogue coverage at each (see :mod:`multvae.ranking`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
from numpy.typing import NDArray

from multvae.errors import DataError
from multvae.model import MultVAE
from multvae.ranking import (
    PAPER_DEPTH,
    coverage_at_k,
    per_user_metrics,
    ranking_depth,
    standard_error,
    summarise,
)
from multvae.recommend import rank_rows
from training.dataset import HeldOut

TOP_K = PAPER_DEPTH  # the largest cut-off any paper metric needs
CUTOFF_KINDS = (("recall", "Recall"), ("ndcg", "NDCG"), ("precision", "Precision"))
N_QUINTILES = 5


@dataclass
class Evaluation:
    """Per-user metrics of one method on one set of held-out users."""

    per_user: dict[str, NDArray[np.float64]]
    fold_in_sizes: NDArray[np.int64]
    cutoffs: tuple[int, ...] = ()  # extra cut-offs asked for; () = the paper's metrics only
    coverage: dict[int, float] = field(default_factory=dict)  # cut-off -> catalogue coverage

    @property
    def n_users(self) -> int:
        return len(self.fold_in_sizes)

    def summary(self) -> dict[str, dict[str, Any]]:
        """Mean, standard error and count of each metric."""
        return summarise(self.per_user)

    def quintiles(self, metric: str = "ndcg@100") -> list[dict[str, Any]]:
        """``metric`` per fold-in activity quintile (equal-size groups by fold-in clicks)."""
        order = np.argsort(self.fold_in_sizes, kind="stable")
        out = []
        for q, members in enumerate(np.array_split(order, N_QUINTILES), start=1):
            if not len(members):
                continue
            values = self.per_user[metric][members]
            sizes = self.fold_in_sizes[members]
            out.append(
                {
                    "quintile": q,
                    "users": len(members),
                    "min_clicks": int(sizes.min()),
                    "max_clicks": int(sizes.max()),
                    "mean": float(values.mean()),
                    "se": standard_error(values),
                }
            )
        return out

    def cutoff_rows(self) -> list[tuple[int, list[str]]]:
        """(k, [Recall, NDCG, Precision, Coverage] as text) per extra cut-off."""
        summary = self.summary()
        return [
            (k, [mean_se(summary[f"{kind}@{k}"]["mean"], summary[f"{kind}@{k}"]["se"])
                 for kind, _ in CUTOFF_KINDS] + [f"{self.coverage[k]:.4f}"])
            for k in self.cutoffs
        ]

    @property
    def mrr_metric(self) -> str | None:
        """The key of the MRR metric (``mrr@<depth>``), None when only the paper's are scored."""
        return next((m for m in self.per_user if m.startswith("mrr@")), None)

    def to_json(self) -> dict[str, Any]:
        out = {"users": self.n_users, "metrics": self.summary(), "quintiles": self.quintiles()}
        if self.coverage:
            out["coverage"] = {f"coverage@{k}": v for k, v in self.coverage.items()}
        return out


def evaluate_topk(
    topk: NDArray[np.int64], heldout: HeldOut, cutoffs: Sequence[int] = ()
) -> Evaluation:
    """Metrics from ranked columns (fold-in already masked), one row per held-out user.

    ``topk`` needs :func:`~multvae.ranking.ranking_depth` columns (or the whole catalogue).
    """
    if topk.shape[0] != heldout.n_users:
        raise ValueError(f"{topk.shape[0]} ranked rows for {heldout.n_users} held-out users")
    sizes = np.diff(heldout.fold_in.indptr).astype(np.int64)
    coverage = {k: coverage_at_k(topk, heldout.fold_in, k) for k in cutoffs}
    return Evaluation(per_user_metrics(topk, heldout.targets, cutoffs), sizes, tuple(cutoffs),
                      coverage)


def evaluate_model(model: MultVAE, heldout: HeldOut, cutoffs: Sequence[int] = ()) -> Evaluation:
    """Fold the held-out users in through the serving code path and score them."""
    topk = rank_rows(model, heldout.fold_in, ranking_depth(cutoffs))
    return evaluate_topk(topk, heldout, cutoffs)


def mean_se(mean: float, se: float | None) -> str:
    """``mean ± se``; an undefined standard error (one user) reads "n/a"."""
    return f"{mean:.4f} ± " + ("n/a" if se is None else f"{se:.4f}")


def format_evaluation(name: str, evaluation: Evaluation) -> str:
    """Human-readable metrics with standard errors and the activity breakdown."""
    summary = evaluation.summary()
    lines = [f"{name}: {evaluation.n_users} test users"]
    if evaluation.cutoffs:
        header = ["", *(label for _, label in CUTOFF_KINDS), "Coverage"]
        table = [header] + [[f"@{k}", *cells] for k, cells in evaluation.cutoff_rows()]
        widths = [max(len(row[c]) for row in table) for c in range(len(header))]
        for row in table:
            lines.append("  " + "  ".join(cell.ljust(w) for cell, w in zip(row, widths,
                                                                          strict=True)).rstrip())
        mrr = evaluation.mrr_metric
        if mrr is not None:
            stats = summary[mrr]
            lines.append(f"  MRR@{mrr.split('@')[1]}  {mean_se(stats['mean'], stats['se'])}")
    else:
        for metric, stats in summary.items():
            lines.append(f"  {metric:<10} {mean_se(stats['mean'], stats['se'])}")
    lines.append("  NDCG@100 by fold-in activity quintile:")
    for q in evaluation.quintiles():
        lines.append(
            f"    Q{q['quintile']} ({q['min_clicks']}-{q['max_clicks']} clicks, "
            f"{q['users']} users): {mean_se(q['mean'], q['se'])}"
        )
    return "\n".join(lines)


# -- held-out users stored with a model version (so `multvae evaluate DIR` needs no data) --

HELDOUT_FILE = "heldout.npz"


def save_heldout(path: Path, validation: HeldOut, test: HeldOut) -> None:
    """Store validation and test fold-in/targets (binary CSR over the version's columns)."""
    arrays: dict[str, Any] = {}
    for prefix, part in (("val", validation), ("test", test)):
        for name in ("fold_in", "targets"):
            m = sp.csr_matrix(getattr(part, name))
            arrays[f"{prefix}_{name}_indices"] = m.indices.astype(np.int32)
            arrays[f"{prefix}_{name}_indptr"] = m.indptr.astype(np.int64)
            arrays[f"{prefix}_{name}_shape"] = np.asarray(m.shape, dtype=np.int64)
        arrays[f"{prefix}_user_ids"] = np.asarray(part.user_ids).astype(str)
    with path.open("wb") as fh:
        np.savez_compressed(fh, **arrays)


def load_heldout(path: Path) -> tuple[HeldOut, HeldOut]:
    """(validation, test) as stored by :func:`save_heldout`."""
    if not path.is_file():
        raise DataError(
            f"{path} does not exist: this version was written without its held-out users; "
            "pass --data to evaluate it on re-split data"
        )
    with np.load(path, allow_pickle=False) as z:
        parts = []
        for prefix in ("val", "test"):
            mats = []
            for name in ("fold_in", "targets"):
                indices = z[f"{prefix}_{name}_indices"]
                n_rows, n_cols = (int(s) for s in z[f"{prefix}_{name}_shape"])
                data = np.ones(len(indices), dtype=np.float32)
                mats.append(
                    sp.csr_matrix((data, indices, z[f"{prefix}_{name}_indptr"]), (n_rows, n_cols))
                )
            parts.append(HeldOut(mats[0], mats[1], z[f"{prefix}_user_ids"]))
    return parts[0], parts[1]
