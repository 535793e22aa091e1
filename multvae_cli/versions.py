"""``multvae versions | promote | rollback``: look at a model directory and move ``CURRENT``.

Every move goes through :func:`multvae.artifacts.set_current` (verify, then an atomic
rename), and a running service follows it through its CURRENT poller (hot reload), as it
follows a promotion by ``multvae train`` or ``multvae retrain``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

METRICS = ("recall@20", "recall@50", "ndcg@100")


def _summary(path: Path) -> dict[str, Any]:
    """Created time and test metrics from a version's JSON files (no weights are loaded)."""
    from multvae.artifacts import CONFIG
    from multvae.artifacts import METRICS as METRICS_FILE

    out: dict[str, Any] = {"created_at": None, "test_users": None, "test": {}}
    try:
        out["created_at"] = json.loads((path / CONFIG).read_text()).get("created_at")
        test = json.loads((path / METRICS_FILE).read_text()).get("test", {})
    except (OSError, ValueError, AttributeError):
        return out  # unreadable: listed with blanks; `multvae promote` would refuse it
    out["test_users"] = test.get("users")
    metrics = test.get("metrics", {})
    out["test"] = {m: metrics[m].get("mean") for m in METRICS if isinstance(metrics.get(m), dict)}
    return out


def _cell(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, float) else "-"


def cmd_versions(args: argparse.Namespace) -> int:
    from multvae.artifacts import VERSIONS, current_version, list_versions, previous_version

    model_dir = Path(args.model_dir)
    current, previous = current_version(model_dir), previous_version(model_dir)
    rows = []
    for name in list_versions(model_dir):
        role = "CURRENT" if name == current else "PREVIOUS" if name == previous else ""
        rows.append({"version": name, "role": role, **_summary(model_dir / VERSIONS / name)})
    if args.json:
        print(json.dumps({"current": current, "previous": previous, "versions": rows}, indent=2))
        return 0
    if not rows:
        print(f"{model_dir} has no model versions (multvae train --out {model_dir} makes one)")
        return 0
    header = ["version", "created (UTC)", "users", *METRICS, ""]
    table = [header] + [
        [
            r["version"],
            (r["created_at"] or "-")[:19].replace("T", " "),
            str(r["test_users"] or "-"),
            *(_cell(r["test"].get(m)) for m in METRICS),
            r["role"],
        ]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip())
    print("metrics: the version's own test users (compare versions with `multvae compare`)")
    return 0


def cmd_promote(args: argparse.Namespace) -> int:
    from multvae.artifacts import VERSIONS, current_version, list_versions, set_current
    from multvae.errors import NoModelError

    model_dir = Path(args.model_dir)
    if args.version not in list_versions(model_dir):
        known = ", ".join(list_versions(model_dir)[-5:]) or "none"
        raise NoModelError(
            f"{model_dir / VERSIONS / args.version} is not a model version; the newest are: "
            f"{known} (see `multvae versions {model_dir}`)"
        )
    before = current_version(model_dir)
    if before == args.version:
        print(f"{args.version} is already CURRENT in {model_dir}; nothing changed")
        return 0
    set_current(model_dir, args.version)
    print(f"CURRENT: {args.version} (was {before}); `multvae rollback {model_dir}` undoes this")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from multvae.artifacts import rollback

    model_dir = Path(args.model_dir)
    left, restored = rollback(model_dir)
    print(f"CURRENT: {restored} (was {left}); a second `multvae rollback` returns to {left}")
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "versions", help="list a model directory's versions, their metrics and which serves"
    )
    p.add_argument("model_dir", help="model directory (versions/ and CURRENT)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_versions)

    p = subparsers.add_parser(
        "promote",
        help="serve another version: point CURRENT at it (atomic; services reload it)",
    )
    p.add_argument("model_dir", help="model directory (versions/ and CURRENT)")
    p.add_argument("version", help="a name from `multvae versions MODEL_DIR`")
    p.set_defaults(func=cmd_promote)

    p = subparsers.add_parser(
        "rollback",
        help="serve the version CURRENT replaced again (atomic; services reload it)",
    )
    p.add_argument("model_dir", help="model directory (versions/ and CURRENT)")
    p.set_defaults(func=cmd_rollback)
