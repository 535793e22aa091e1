"""Two model versions on the same held-out users, metric by metric, with paired t-tests.

Used by the retraining gate: a candidate (B) against the version being served (A). The two
versions may know different items in a different column order, so everything goes through
external item ids:

* users: the test users held out by *both* versions (neither trained on them); their fold-in
  and target clicks come from version A's stored ``heldout.npz`` (so a series of candidates
  is measured against one fixed partition);
* items: only clicks on items both versions know are kept, on both sides, so both models see
  the same input and can rank every target; users left with no fold-in or no target are
  dropped and counted;
* ranking: each model ranks only the items both know (the others are masked like the fold-in),
  so a version is neither rewarded nor penalised for items the other cannot recommend.

Differences are B - A; :meth:`ComparisonResult.regressed` is the gate's question.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray

from multvae.artifacts import MANIFEST, VERSIONS, ModelVersion, load_version
from multvae.errors import DataError
from multvae.ranking import topk_rows
from multvae.recommend import block_scorer
from training.dataset import HeldOut
from training.evaluate import (
    HELDOUT_FILE,
    TOP_K,
    Evaluation,
    evaluate_topk,
    load_heldout,
    mean_se,
)
from training.stats import PairedTest, paired_tests, quintile_tests

GATE_METRIC = "ndcg@100"
DROP_REASONS = {
    "not_held_out_by_b": "not held out by B",
    "no_common_fold_in": "without fold-in on shared items",
    "no_common_target": "without targets on shared items",
}


def resolve_version(
    path: Path | str, version: str | None = None, device: torch.device | str = "cpu"
) -> ModelVersion:
    """A model directory (its CURRENT, or ``version``) or one ``versions/<v>`` directory."""
    p = Path(path)
    if (p / MANIFEST).is_file() and p.parent.name == VERSIONS:
        return load_version(p.parent.parent, p.name, device)
    return load_version(p, version, device)


@dataclass
class ComparisonResult:
    version_a: str
    version_b: str
    a: Evaluation
    b: Evaluation
    tests: dict[str, PairedTest]  # B - A per metric
    quintiles: list[PairedTest]  # B - A on NDCG@100 per fold-in activity quintile
    users_dropped: dict[str, int]  # why held-out users of A could not be compared
    items: dict[str, int]  # common, only_a, only_b

    @property
    def n_users(self) -> int:
        return self.a.n_users

    def regressed(
        self, metric: str = GATE_METRIC, alpha: float = 0.05, tolerance: float = 0.0
    ) -> bool:
        """B is worse than A on ``metric`` by more than ``tolerance``, significant at ``alpha``."""
        t = self.tests[metric]
        return t.diff < -tolerance and t.significant(alpha)

    def to_json(self) -> dict[str, Any]:
        return {
            "version_a": self.version_a,
            "version_b": self.version_b,
            "users": self.n_users,
            "users_dropped": self.users_dropped,
            "items": self.items,
            "a": self.a.to_json(),
            "b": self.b.to_json(),
            "tests": {m: _test_json(t) for m, t in self.tests.items()},
            "quintile_tests": [_test_json(t) for t in self.quintiles],
        }

    def format(self) -> str:
        dropped = ", ".join(f"{v} {DROP_REASONS[k]}" for k, v in self.users_dropped.items() if v)
        lines = [
            f"A = {self.version_a}",
            f"B = {self.version_b}",
            f"{self.n_users} test users held out by both (dropped: {dropped or 'none'}); "
            f"{self.items['common']} items known to both "
            f"(only A: {self.items['only_a']}, only B: {self.items['only_b']})",
            f"  {'metric':<10} {'A':<15} {'B':<15} {'B - A':<16} {'p':>9}",
        ]
        sa, sb = self.a.summary(), self.b.summary()
        for m, t in self.tests.items():
            a, b = mean_se(sa[m]["mean"], sa[m]["se"]), mean_se(sb[m]["mean"], sb[m]["se"])
            line = f"  {m:<10} {a:<15} {b:<15} {t.diff_text:<16} {t.p:>9.3g} {t.stars}"
            lines.append(line.rstrip())
        lines.append("  NDCG@100 by fold-in activity quintile (B - A):")
        for q, t in zip(self.a.quintiles(), self.quintiles, strict=True):
            lines.append(
                f"    Q{q['quintile']} ({q['min_clicks']}-{q['max_clicks']} clicks, "
                f"{q['users']} users): A {t.mean_b:.4f}, B {t.mean_a:.4f} ({t.diff:+.4f}), "
                f"p {t.p:.3g} {t.stars}".rstrip()
            )
        return "\n".join(lines)


def _test_json(t: PairedTest) -> dict[str, Any]:
    """A test of B against A, named so: ``paired_ttest(b, a)`` keeps B's mean in ``mean_a``."""
    out = t.to_json()
    out["mean_a"], out["mean_b"] = t.mean_b, t.mean_a
    out["diff_b_minus_a"] = out.pop("diff")
    return out


def _ids(version: ModelVersion) -> NDArray[np.str_]:
    return np.asarray(version.items.ids, dtype=str)


def _common_heldout(
    ref: HeldOut, ref_ids: NDArray[np.str_], common_col: dict[str, int], keep: NDArray[np.bool_]
) -> tuple[HeldOut, dict[str, int]]:
    """A's held-out rows ``keep`` re-expressed over the common item columns (+1 dummy column)."""
    n_common = len(common_col)
    rows: dict[str, list[NDArray[np.int64]]] = {"fold_in": [], "targets": []}
    users: list[Any] = []
    no_fold_in = no_target = 0
    for u in np.flatnonzero(keep):
        mapped = {}
        for name in rows:
            m = getattr(ref, name)
            ids = ref_ids[m.indices[m.indptr[u] : m.indptr[u + 1]]]
            mapped[name] = np.asarray([common_col[i] for i in ids if i in common_col], np.int64)
        if not len(mapped["fold_in"]):
            no_fold_in += 1
        elif not len(mapped["targets"]):
            no_target += 1
        else:
            users.append(ref.user_ids[u])
            for name in rows:
                rows[name].append(np.sort(mapped[name]))

    def matrix(parts: list[NDArray[np.int64]]) -> sp.csr_matrix:
        indptr = np.concatenate([[0], np.cumsum([len(p) for p in parts])]).astype(np.int64)
        indices = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        data = np.ones(len(indices), np.float32)
        return sp.csr_matrix((data, indices, indptr), shape=(len(parts), n_common + 1))

    held = HeldOut(matrix(rows["fold_in"]), matrix(rows["targets"]), np.asarray(users))
    return held, {"no_common_fold_in": no_fold_in, "no_common_target": no_target}


def _rank_common(
    version: ModelVersion,
    held: HeldOut,
    common_ids: NDArray[np.str_],
    batch_size: int | None = None,
) -> NDArray[np.int64]:
    """(B, 100) top columns in the common space, ranking only items both versions know."""
    cols_in_model = np.asarray([version.items.column(i) for i in common_ids], dtype=np.int64)
    to_common = np.full(len(version.items) + 1, len(common_ids), dtype=np.int64)  # dummy
    to_common[cols_in_model] = np.arange(len(common_ids))
    unknown_to_other = np.setdiff1d(np.arange(len(version.items)), cols_in_model)
    k = min(TOP_K, len(common_ids))
    fold = held.fold_in
    in_model = sp.csr_matrix(
        (fold.data, cols_in_model[fold.indices], fold.indptr),
        shape=(fold.shape[0], len(to_common) - 1),
    )
    ranked, scores = topk_rows(
        block_scorer(version.model), in_model, k, exclude=unknown_to_other, batch_size=batch_size
    )
    common = to_common[ranked]
    common[~np.isfinite(scores)] = len(common_ids)  # masked: fewer than k items to rank
    return common


def compare_versions(
    dir_a: Path | str,
    dir_b: Path | str,
    *,
    version_a: str | None = None,
    version_b: str | None = None,
    device: torch.device | str = "cpu",
) -> ComparisonResult:
    """Score versions A and B on the test users both held out (see the module doc)."""
    va = resolve_version(dir_a, version_a, device)
    vb = resolve_version(dir_b, version_b, device)
    _, test_a = load_heldout(va.path / HELDOUT_FILE)
    _, test_b = load_heldout(vb.path / HELDOUT_FILE)
    ids_a, ids_b = _ids(va), _ids(vb)
    in_b = np.isin(ids_a, ids_b)
    common_ids = ids_a[in_b]  # A's column order
    if not len(common_ids):
        raise DataError(f"versions {va.version} and {vb.version} share no item ids")
    common_col = {item: c for c, item in enumerate(common_ids.tolist())}
    keep = np.isin(test_a.user_ids.astype(str), test_b.user_ids.astype(str))
    held, dropped = _common_heldout(test_a, ids_a, common_col, keep)
    dropped = {"not_held_out_by_b": int((~keep).sum()), **dropped}
    if held.n_users < 2:
        raise DataError(
            f"only {held.n_users} of version {va.version}'s {test_a.n_users} test users can be "
            f"compared (held out by both versions, with fold-in and targets on shared items; "
            f"dropped: {dropped}); versions trained on different splits cannot be compared "
            "on the same held-out users: retrain with the same data seed"
        )
    eval_a = evaluate_topk(_rank_common(va, held, common_ids), held)
    eval_b = evaluate_topk(_rank_common(vb, held, common_ids), held)
    return ComparisonResult(
        va.version,
        vb.version,
        eval_a,
        eval_b,
        paired_tests(eval_b, eval_a),
        quintile_tests(eval_b, eval_a),
        dropped,
        {
            "common": len(common_ids),
            "only_a": int((~in_b).sum()),
            "only_b": int((~np.isin(ids_b, ids_a)).sum()),
        },
    )
