"""``multvae retrain``: train a candidate, gate it against the served version, promote or keep.

    lock MODEL_DIR ─> train + write candidate (promote=False) ─> compare with CURRENT
        ─> promote (atomic CURRENT swap) | keep (candidate deleted) ─> GC ─> JSON report

The gate is :func:`training.compare.compare_versions`: both versions score the test users
that *both* held out (so neither has trained on them), on the clicks of items both know, each
ranking only those shared items. When the data has not changed since the current version the
split is the same and these are all of the new split's test users; when users were added the
split is redrawn and the overlap is smaller, but a user the current model trained on never
counts in its favour.

Crash safety: the candidate is written with ``promote=False`` (temp dir + rename), and
``CURRENT`` moves only through :func:`multvae.artifacts.set_current` (temp file + rename). A
crash at any step therefore leaves ``CURRENT`` and the version it names untouched; a failed
run removes its own unpromoted candidate, and one killed outright leaves at most a complete
but unserved version, which garbage collection removes once a later promotion has made it old.
Garbage collection never removes ``CURRENT``, the version it replaced (``PREVIOUS``) or any
version written since the last promotion, however many killed or refused candidates exist.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import shutil
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from multvae.artifacts import (
    CONFIG,
    VERSIONS,
    atomic_write,
    current_version,
    remove_old_versions,
    remove_stale_temporaries,
    set_current,
)
from multvae.device import resolve_device
from multvae.errors import CurrentChangedError, MultVAEError
from training.arguments import (
    CONFIG_FLAGS,
    EXIT_FAILED,
    EXIT_KEPT,
    EXIT_PROMOTED,
    EXIT_USAGE,
    METRICS,
)
from training.compare import ComparisonResult, compare_versions
from training.pipeline import DataSpec, TrainedVersion, train_and_write, train_config_for
from training.train import TrainConfig

log = logging.getLogger(__name__)

__all__ = ["EXIT_FAILED", "EXIT_KEPT", "EXIT_PROMOTED", "EXIT_USAGE", "Gate", "retrain"]

REPORTS = "reports"
LOCK_FILE = ".retrain.lock"


@dataclass(frozen=True)
class Gate:
    """Promote unless the candidate is worse than the current version by more than allowed.

    ``absolute``: allowed drop = ``tolerance`` (in metric units, e.g. 0.01 NDCG@100).
    ``relative``: allowed drop = ``tolerance`` x the current version's mean (0.02 = 2 %).
    The gate is on the mean difference over the shared test users, not on significance: with
    a few hundred users a real 0.02 drop is often "not significant", and the safe default for
    a nightly job is to keep serving what is known to work. The p-value is reported beside it.
    """

    metric: str = "ndcg@100"
    tolerance: float = 0.01
    mode: str = "absolute"
    force: bool = False  # promote even when refused or when the versions cannot be compared

    def allowed_drop(self, current_mean: float) -> float:
        return self.tolerance * current_mean if self.mode == "relative" else self.tolerance

    def passes(self, current_mean: float, candidate_mean: float) -> bool:
        return candidate_mean - current_mean >= -self.allowed_drop(current_mean)


@dataclass
class RetrainResult:
    """What a run did; ``report`` is the JSON written to ``MODEL_DIR/reports``."""

    decision: str  # promoted | kept | failed
    exit_code: int
    report: dict[str, Any]
    report_path: Path | None = None
    comparison: ComparisonResult | None = field(default=None, repr=False)


class RetrainLockedError(MultVAEError):
    """Another retrain holds the model directory's lock."""


@contextlib.contextmanager
def _exclusive(model_dir: Path) -> Iterator[None]:
    # Two overlapping runs (a slow nightly job and a manual one) would each compare against
    # the same CURRENT and the later swap would win blindly; one at a time per model dir.
    fd = os.open(model_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RetrainLockedError(
                f"another retrain is running on {model_dir} (it holds {LOCK_FILE}); "
                "wait for it to finish"
            ) from None
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _now() -> datetime:
    return datetime.now(UTC)


def _write_report_atomically(model_dir: Path, started: datetime, report: dict[str, Any]) -> Path:
    """``MODEL_DIR/reports/retrain-<UTC>.json``, written to a temp file and renamed."""
    reports = model_dir / REPORTS
    reports.mkdir(parents=True, exist_ok=True)
    path = reports / f"retrain-{started.strftime('%Y%m%dT%H%M%S%fZ')}.json"
    atomic_write(path, (json.dumps(report, indent=2, allow_nan=False) + "\n").encode())
    return path


def _current_or_none(model_dir: Path) -> str | None:
    # The report is written even when the model dir is unreadable; it then says "unknown".
    try:
        return current_version(model_dir)
    except OSError:
        return None


def _discard(model_dir: Path, version: str | None) -> bool:
    """Delete an unpromoted candidate; never the version CURRENT names."""
    if version is None or _current_or_none(model_dir) == version:
        return False
    shutil.rmtree(model_dir / VERSIONS / version, ignore_errors=True)
    return True


def _gate_json(gate: Gate, comparison: ComparisonResult) -> dict[str, Any]:
    a = comparison.a.summary()[gate.metric]["mean"]
    b = comparison.b.summary()[gate.metric]["mean"]
    test = comparison.tests[gate.metric]
    return {
        "current": a,
        "candidate": b,
        "diff": b - a,
        "allowed_drop": gate.allowed_drop(a),
        "p": test.p,
        "passed": gate.passes(a, b),
    }


def retrain(
    spec: DataSpec,
    config: TrainConfig,
    model_dir: Path | str,
    gate: Gate | None = None,
    *,
    keep: int = 3,
    keep_refused: bool = False,
    progress: bool = False,
    recipe: str | None = None,
) -> RetrainResult:
    """One retraining run; never raises for a run that fails (the result says ``failed``)."""
    gate = gate or Gate()
    if gate.metric not in METRICS:
        raise ValueError(f"gate metric {gate.metric!r} is not one of {', '.join(METRICS)}")
    if gate.mode not in ("absolute", "relative"):
        raise ValueError(f"tolerance mode {gate.mode!r} is not 'absolute' or 'relative'")
    if keep < 1:
        raise ValueError(f"keep must be >= 1, got {keep}")
    model_dir = Path(model_dir)
    started = _now()
    tic = time.perf_counter()
    report: dict[str, Any] = {
        "started_at": started.isoformat(),
        "model_dir": str(model_dir.resolve()),
        "data": spec.to_dict(),
        "recipe": recipe,
        "gate": {
            "metric": gate.metric,
            "tolerance": gate.tolerance,
            "mode": gate.mode,
            "forced": gate.force,
        },
        "current_before": None,
        "candidate": None,
    }
    comparison: ComparisonResult | None = None
    candidate: str | None = None
    try:
        model_dir.mkdir(parents=True, exist_ok=True)
        with _exclusive(model_dir):
            current = current_version(model_dir)
            report["current_before"] = current
            trained = train_and_write(spec, config, model_dir, promote=False, progress=progress)
            candidate = trained.version
            report["candidate"] = candidate
            report["candidate_own_split"] = _own_split_json(trained)
            decision, reason, comparison = _decide(
                model_dir, current, str(candidate), gate, config.device
            )
            report["reason"] = reason
            if comparison is not None:
                report["comparison"] = comparison.to_json()
                report["gate"].update(_gate_json(gate, comparison))
            if decision == "promoted":
                try:  # compare-and-swap: only over the version the gate compared with
                    set_current(model_dir, str(candidate), replacing=current)
                except CurrentChangedError as exc:  # an operator moved CURRENT meanwhile
                    decision, reason = "kept", str(exc)
                    report["reason"] = reason
                    report["candidate_deleted"] = False  # it passed its gate: keep it
            else:
                report["candidate_deleted"] = not keep_refused and _discard(model_dir, candidate)
            report["removed_versions"] = _collect_garbage(model_dir, keep)
            code = EXIT_PROMOTED if decision == "promoted" else EXIT_KEPT
    except Exception as exc:  # a scheduler needs an exit code and a report, not a crash
        if isinstance(exc, MultVAEError):  # expected: the message says what to fix
            log.error("retrain failed: %s", exc)
        else:
            log.exception("retrain failed")
        decision, code = "failed", EXIT_FAILED
        report["reason"] = f"{type(exc).__name__}: {exc}"
        report["candidate_deleted"] = _discard(model_dir, candidate)
    report |= {
        "decision": decision,
        "exit_code": code,
        "current_after": _current_or_none(model_dir),
        "finished_at": _now().isoformat(),
        "seconds": time.perf_counter() - tic,
    }
    report = _json_safe(report)
    path = None
    try:
        path = _write_report_atomically(model_dir, started, report)
    except OSError as exc:  # e.g. a full disk: the run has ended, its decision stands
        log.error("could not write the retrain report into %s: %s", model_dir / REPORTS, exc)
    return RetrainResult(decision, code, report, path, comparison)


def _json_safe(value: Any) -> Any:
    """NaN/inf (a standard error over one user) as null: JSON has no NaN, and the report must
    be written whatever the numbers."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_json_safe(v) for v in value]
    return value


def _decide(
    model_dir: Path, current: str | None, candidate: str, gate: Gate, device: str
) -> tuple[str, str, ComparisonResult | None]:
    """(promoted | kept, why, the comparison when there was one)."""
    if current is None:
        return "promoted", "no current version: the first model is promoted", None
    try:
        comparison = compare_versions(
            model_dir, model_dir, version_a=current, version_b=candidate,
            device=resolve_device(device),
        )  # fmt: skip
    except MultVAEError as exc:
        if gate.force:
            return "promoted", f"forced; the versions could not be compared: {exc}", None
        raise
    g = _gate_json(gate, comparison)
    verdict = (
        f"{gate.metric} {g['candidate']:.4f} vs current {g['current']:.4f} "
        f"(diff {g['diff']:+.4f}, allowed drop {g['allowed_drop']:.4f}, p {g['p']:.3g}) "
        f"on {comparison.n_users} shared test users"
    )
    if g["passed"]:
        return "promoted", f"gate passed: {verdict}", comparison
    if gate.force:
        return "promoted", f"forced past a refusal: {verdict}", comparison
    return "kept", f"gate refused: {verdict}", comparison


def _own_split_json(trained: TrainedVersion) -> dict[str, Any]:
    """The candidate's metrics on its own split (informative: not what the gate compares)."""
    return {
        "validation": trained.validation.summary(),
        "test": trained.test.summary(),
        "split": trained.data.split.stats,
    }


def _collect_garbage(model_dir: Path, keep: int) -> list[str]:
    # Housekeeping must not turn a promotion into a failure: log and go on.
    try:
        remove_stale_temporaries(model_dir / REPORTS, ".retrain-*.tmp-*")
        return remove_old_versions(model_dir, keep)
    except (OSError, MultVAEError) as exc:  # e.g. CURRENT unreadable: then nothing is deleted
        log.warning("garbage collection of old versions failed: %s", exc)
        return []


# -- command line ------------------------------------------------------------------------


def recipe_from(model_dir: Path, args: argparse.Namespace) -> tuple[DataSpec, TrainConfig, str]:
    """The data spec and training config to retrain with, and a line saying where they came from.

    Without flags: the recipe the version ``CURRENT`` names was trained with (its config.json);
    each data or model flag given on the command line replaces its recorded value. ``--device``
    is the machine's business, not the recipe's: it is never taken from the record.
    """
    flag_values = {f.name: getattr(args, "data" if f.name == "path" else f.name)
                   for f in fields(DataSpec)}  # fmt: skip
    # Unset flags are None (False for --keep-all-ratings); 0 is a value (--seed 0).
    given_data = {k: v for k, v in flag_values.items() if v is not None and v is not False}
    if "path" in given_data:
        given_data["path"] = str(Path(given_data["path"]).absolute())
    given_train = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if args.no_early_stopping:
        given_train["patience"] = None
    flags = sorted({*given_data, *given_train} - {"device"})
    from_flags = ", ".join("--" + ("data" if f == "path" else f).replace("_", "-") for f in flags)
    current = current_version(model_dir)
    if current is None:
        if "path" not in given_data:
            raise MultVAEError(
                f"{model_dir} has no CURRENT version whose recipe could be reused: "
                "pass --data (and any other data flags) for the first model"
            )
        spec = DataSpec(**given_data)
        return spec, train_config_for(spec, **given_train), "recipe: from the command line"
    config_path = model_dir / VERSIONS / current / CONFIG
    try:
        recorded = json.loads(config_path.read_text())
        spec = DataSpec.from_dict({**recorded["data"], **given_data})
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MultVAEError(
            f"cannot reuse the recipe of CURRENT version {current}: {config_path} records no "
            f"readable data recipe ({exc}); pass --data and the other flags explicitly"
        ) from exc
    names = {f.name for f in fields(TrainConfig)}
    # train_config (the settings as given) is recorded since 0.1; older versions have only
    # the resolved "training" block, whose values are the ones they actually trained with.
    train = recorded.get("train_config") or recorded.get("training", {})
    train = {k: v for k, v in train.items() if k in names and k != "device"}
    if isinstance(train.get("hidden_dims"), list):
        train["hidden_dims"] = tuple(train["hidden_dims"])
    config = replace(TrainConfig(**train), **given_train)
    where = f"recipe: CURRENT version {current}'s ({config_path})"
    return spec, config, where + (f", except {from_flags} from the command line" if flags else "")


def describe_recipe(spec: DataSpec, config: TrainConfig) -> str:
    data = ", ".join(
        f"{k} {v}" for k, v in spec.to_dict().items() if v is not None and v is not False
    )
    train = ", ".join(f"{k} {v}" for k, v in config.to_dict().items() if v is not None)
    return f"  data: {data}\n  training: {train}"


def run_retrain_command(args: argparse.Namespace) -> int:
    """``multvae retrain``: the parser is :func:`training.cli.register_retrain`."""
    if args.keep < 1:
        print(f"multvae retrain: error: --keep must be >= 1, got {args.keep}", file=sys.stderr)
        return EXIT_USAGE
    if args.tolerance < 0:
        print(
            f"multvae retrain: error: --tolerance must be >= 0, got {args.tolerance}",
            file=sys.stderr,
        )
        return EXIT_USAGE
    model_dir = Path(args.model_dir)
    try:
        spec, config, where = recipe_from(model_dir, args)
    except MultVAEError as exc:
        print(f"multvae retrain: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    # Said before training starts (on stderr under --json, which keeps stdout for the report).
    out = sys.stderr if args.json else sys.stdout
    print(f"{where}\n{describe_recipe(spec, config)}", file=out, flush=True)
    gate = Gate(args.metric, args.tolerance, args.tolerance_mode, args.force)
    result = retrain(
        spec, config, model_dir, gate,
        keep=args.keep, keep_refused=args.keep_refused, progress=not args.quiet, recipe=where,
    )  # fmt: skip
    if args.json:
        print(json.dumps(result.report, indent=2, allow_nan=False))
    else:
        print(format_result(result))
    return result.exit_code


def format_result(result: RetrainResult) -> str:
    r = result.report
    lines = []
    if result.comparison is not None:
        lines.append("A: the current version, B: the candidate")
        lines.append(result.comparison.format())
    lines.append(f"{result.decision.upper()}: {r.get('reason', '')}")
    lines.append(f"serving: {r.get('current_after')} (was {r.get('current_before')})")
    if r.get("removed_versions"):
        lines.append(f"removed old versions: {', '.join(r['removed_versions'])}")
    lines.append(f"report: {result.report_path or 'not written (see the log)'}")
    return "\n".join(lines)
