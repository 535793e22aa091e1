"""Paired significance tests between two methods scored on the same held-out users.

The paper (Figure 3) marks differences with a paired t-test: * at alpha = 0.05, ** at 0.01,
*** at 0.001. Pairing matters: per-user NDCG varies far more between users than between
methods, so an unpaired test would call almost nothing significant on a few hundred users.

Degenerate inputs never produce NaN (the report and the retraining gate serialise these to
JSON and compare them): identical inputs give t = 0, p = 1; a constant non-zero difference
gives p = 0 with an infinite t (reported as null in JSON); fewer than two users cannot be
tested and are reported as t = 0, p = 1.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray
from scipy import stats as sps

from training.evaluate import N_QUINTILES, Evaluation

STAR_LEVELS: tuple[tuple[float, str], ...] = ((0.001, "***"), (0.01, "**"), (0.05, "*"))


def stars(p: float) -> str:
    """The paper's significance marks for a p-value ("" when not significant at 0.05)."""
    for level, mark in STAR_LEVELS:
        if p < level:
            return mark
    return ""


@dataclass(frozen=True)
class PairedTest:
    """Paired t-test of ``a - b`` on one metric over ``n`` users."""

    metric: str
    n: int
    mean_a: float
    mean_b: float
    diff: float  # mean of a - b
    se_diff: float  # standard error of the per-user differences
    t: float
    p: float

    @property
    def stars(self) -> str:
        return stars(self.p)

    def significant(self, alpha: float = 0.05) -> bool:
        return self.p < alpha

    @property
    def diff_text(self) -> str:
        """``+0.0123 ± 0.0045`` (B - A), the standard error left out when undefined."""
        se = f" ± {self.se_diff:.4f}" if math.isfinite(self.se_diff) else ""
        return f"{self.diff:+.4f}{se}"

    def to_json(self) -> dict[str, Any]:
        def finite(x: float) -> float | None:
            return x if math.isfinite(x) else None

        return {
            "metric": self.metric,
            "n": self.n,
            "mean_a": self.mean_a,
            "mean_b": self.mean_b,
            "diff": self.diff,
            "se_diff": finite(self.se_diff),
            "t": finite(self.t),
            "p": self.p,
            "stars": self.stars,
        }


def paired_ttest(a: ArrayLike, b: ArrayLike, metric: str = "") -> PairedTest:
    """Paired t-test of per-user values ``a`` against ``b`` (same users, same order)."""
    x = np.asarray(a, dtype=np.float64)
    y = np.asarray(b, dtype=np.float64)
    if x.shape != y.shape or x.ndim != 1:
        raise ValueError(f"paired samples need equal 1-d shapes, got {x.shape} and {y.shape}")
    n = len(x)
    d = x - y
    mean_a = float(x.mean()) if n else float("nan")
    mean_b = float(y.mean()) if n else float("nan")
    diff = float(d.mean()) if n else 0.0
    if n < 2:
        return PairedTest(metric, n, mean_a, mean_b, diff, float("nan"), 0.0, 1.0)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    # Differences equal up to rounding (x + c - x is not exactly c in floating point): scipy
    # returns NaN, or a meaningless t, there; the limit of the test is what a reader expects.
    tol = 1e-12 * max(1.0, float(np.abs(x).max()), float(np.abs(y).max()))
    if sd <= tol:
        if abs(diff) <= tol:
            return PairedTest(metric, n, mean_a, mean_b, 0.0, 0.0, 0.0, 1.0)
        return PairedTest(metric, n, mean_a, mean_b, diff, 0.0, math.copysign(math.inf, diff), 0.0)
    result = sps.ttest_rel(x, y)
    return PairedTest(
        metric, n, mean_a, mean_b, diff, se, float(result.statistic), float(result.pvalue)
    )


def _check_same_users(a: Evaluation, b: Evaluation) -> None:
    if a.n_users != b.n_users or not np.array_equal(a.fold_in_sizes, b.fold_in_sizes):
        raise ValueError(
            f"paired tests need the same held-out users: {a.n_users} vs {b.n_users} users "
            "(or their fold-in sizes differ)"
        )


def paired_tests(a: Evaluation, b: Evaluation) -> dict[str, PairedTest]:
    """One paired t-test per metric the two evaluations share, ``a`` minus ``b``."""
    _check_same_users(a, b)
    return {
        metric: paired_ttest(a.per_user[metric], b.per_user[metric], metric)
        for metric in a.per_user
        if metric in b.per_user
    }


def quintile_members(fold_in_sizes: NDArray[np.int64]) -> list[NDArray[np.int64]]:
    """User indices per fold-in activity quintile, grouped exactly as ``Evaluation.quintiles``."""
    order = np.argsort(fold_in_sizes, kind="stable")
    return [m.astype(np.int64) for m in np.array_split(order, N_QUINTILES) if len(m)]


def quintile_tests(a: Evaluation, b: Evaluation, metric: str = "ndcg@100") -> list[PairedTest]:
    """Figure 3: a paired t-test of ``metric`` within each fold-in activity quintile."""
    _check_same_users(a, b)
    return [
        paired_ttest(a.per_user[metric][m], b.per_user[metric][m], metric)
        for m in quintile_members(a.fold_in_sizes)
    ]
