"""``multvae train | evaluate | compare | generate``: the offline subcommands."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from multvae.artifacts import VERSIONS, load_version
from multvae.device import resolve_device
from multvae.errors import DataError, TrainingError
from training.arguments import (
    add_data_arguments,
    add_model_arguments,
    positive_int,
    spec_from_args,
    train_config_from_args,
)
from training.evaluate import HELDOUT_FILE, evaluate_model, format_evaluation, load_heldout
from training.pipeline import split_for_version, train_and_write
from training.retrain import register_retrain


def cmd_train(args: argparse.Namespace) -> int:
    spec = spec_from_args(args)
    config = train_config_from_args(args, spec)
    resolve_device(config.device)  # fail before reading data
    trained = train_and_write(
        spec, config, args.out, promote=not args.no_promote, progress=not args.quiet
    )
    stats = trained.data.split.stats
    print(
        f"data: {stats['users']} users, {stats['items']} items, {stats['train_clicks']} "
        f"training clicks; {stats['val_users']} validation / {stats['test_users']} test users "
        f"(seed {spec.seed})"
    )
    r = trained.result
    print(
        f"trained {config.model} for {len(r.history)} epochs ({r.history[-1].updates} updates, "
        f"batch {r.plan.batch_size}) in {r.seconds:.1f}s; best epoch {r.best_epoch}, "
        f"beta {r.beta:.3f}, validation NDCG@100 {r.best_val_ndcg:.4f}"
    )
    print(format_evaluation("test", trained.test))
    where = Path(args.out) / VERSIONS / str(trained.version)
    print(
        f"wrote model version {trained.version} to {where}"
        + ("" if args.no_promote else " (CURRENT)")
    )
    return 0


def _baseline_names(text: str) -> list[str]:
    from training.baselines import parse_baseline_names

    try:
        return parse_baseline_names(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    version = load_version(args.model_dir, args.version, device)
    if args.baselines and args.data is None:
        raise DataError(
            "--baselines needs --data: baselines are fitted on the training users, which a "
            "model version does not store; pass the file the version was trained on"
        )
    split = split_for_version(version, args.data) if args.data is not None else None
    if split is not None:
        test = split.test
    else:
        _, test = load_heldout(version.path / HELDOUT_FILE)
    evaluation = evaluate_model(version.model, test)
    baselines: dict[str, Any] = {}
    if args.baselines and split is not None:
        from training.baselines import run_baselines

        # Progress goes to stderr so that --json output stays parseable.
        baselines = run_baselines(
            split, args.baselines, log=lambda line: print(line, file=sys.stderr, flush=True)
        )
    report = None
    if args.report:
        from training.report import write_version_report

        report = write_version_report(args.model_dir, version, evaluation, baselines)
    if args.json:
        out: dict[str, Any] = {"version": version.version, "test": evaluation.to_json()}
        if baselines:
            out["baselines"] = {name: r.to_json() for name, r in baselines.items()}
        if report is not None:
            out["report"] = {"markdown": str(report[0]), "html": str(report[1])}
        print(json.dumps(out, indent=2, allow_nan=False))
        return 0
    print(f"model version {version.version}")
    print(format_evaluation("test", evaluation))
    for name, result in baselines.items():
        print(format_evaluation(f"{name} {result.params or ''}".strip(), result.test))
    if baselines:
        from training.report import best_baseline
        from training.stats import paired_tests

        best = str(best_baseline({n: r.test for n, r in baselines.items()}))
        print(f"model vs {best} (best baseline), paired t-test:")
        for metric, t in paired_tests(evaluation, baselines[best].test).items():
            print(f"  {metric:<10} {t.diff:+.4f}  p {t.p:.3g} {t.stars}".rstrip())
    if report is not None:
        print(f"report: {report[0]} and {report[1]}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from training.compare import compare_versions

    result = compare_versions(
        args.dir_a,
        args.dir_b,
        version_a=args.version_a,
        version_b=args.version_b,
        device=resolve_device(args.device),
    )
    regressed = result.regressed(args.metric, args.alpha, args.tolerance)
    if args.json:
        print(json.dumps({**result.to_json(), "regressed": regressed}, indent=2, allow_nan=False))
    else:
        print(result.format())
        verdict = "REGRESSED" if regressed else "no significant regression"
        gate = f"alpha {args.alpha}, tolerance {args.tolerance}"
        print(f"B vs A on {args.metric} ({gate}): {verdict}")
    # 3, as `multvae retrain` when its gate keeps the current version; 1 stays "an error".
    return 3 if regressed and args.fail_on_regression else 0


def cmd_generate(args: argparse.Namespace) -> int:
    from training.synthetic import SHAPES, generate, write

    if args.shape not in SHAPES:
        raise TrainingError(f"unknown shape {args.shape!r}; choose one of {sorted(SHAPES)}")
    inter = generate(args.shape, seed=args.seed)
    path = Path(args.out)
    write(inter, path, args.format)
    print(f"wrote {len(inter)} interactions ({args.shape}) to {path}")
    return 0


def _ids(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def cmd_recommend(args: argparse.Namespace) -> int:
    from multvae.recommend import Recommender

    version = load_version(args.model_dir, args.version, resolve_device(args.device))
    recommender = Recommender(version.model, version.items, version.version)
    rec = recommender.recommend(args.items, args.n, args.exclude, args.candidates)
    if args.json:
        out = {
            "model_version": version.version,
            "items": [{"item": item, "score": score} for item, score in rec.items],
            "unknown_items": rec.unknown,
            "fallback": rec.fallback,
        }
        print(json.dumps(out, indent=2, allow_nan=False))
        return 0
    if rec.unknown:
        print(f"ignored unknown item ids: {', '.join(rec.unknown)}", file=sys.stderr)
    if rec.fallback is not None:
        print(f"no known history: {rec.fallback} ranking", file=sys.stderr)
    titles = version.items.titles
    for rank, (item, score) in enumerate(rec.items, start=1):
        column = version.items.column(item)
        title = titles[column] if titles is not None and column is not None else None
        print(f"{rank:>4}  {item}  {score:.4f}" + (f"  {title}" if title else ""))
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a model version from an interaction file")
    add_data_arguments(p)
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="model directory (versions/ and CURRENT)")
    p.add_argument("--no-promote", action="store_true", help="write the version, keep CURRENT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser("evaluate", help="Recall@20/50 and NDCG@100 on the test users")
    p.add_argument("model_dir", help="model directory")
    p.add_argument("--version", help="version to score (default: CURRENT)")
    p.add_argument("--data", help="re-read and re-split this file instead of heldout.npz")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--baselines",
        type=_baseline_names,
        metavar="NAMES",
        help="also score baselines on the same test users, e.g. popularity,ease,wmf "
        "(fitted on the training users: needs --data)",
    )
    p.add_argument(
        "--report",
        action="store_true",
        help="write report.md, report.html and plots to MODEL_DIR/reports/<version>/",
    )
    p.set_defaults(func=cmd_evaluate)

    p = subparsers.add_parser(
        "compare", help="two model versions on the same held-out users, with paired t-tests"
    )
    p.add_argument("dir_a", help="reference: a model directory or a versions/<v> directory")
    p.add_argument("dir_b", help="candidate: a model directory or a versions/<v> directory")
    p.add_argument("--version-a", help="version of DIR_A (default: its CURRENT)")
    p.add_argument("--version-b", help="version of DIR_B (default: its CURRENT)")
    p.add_argument("--metric", default="ndcg@100", choices=("recall@20", "recall@50", "ndcg@100"))
    p.add_argument("--alpha", type=float, default=0.05, help="significance level of the gate")
    p.add_argument(
        "--tolerance", type=float, default=0.0, help="allowed drop of the metric (B - A)"
    )
    p.add_argument(
        "--fail-on-regression",
        action="store_true",
        help="exit 3 when B is significantly worse than A by more than --tolerance",
    )
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_compare)

    p = subparsers.add_parser(
        "recommend",
        help="top-n items for one click history, from a model version (no server needed)",
    )
    p.add_argument("model_dir", help="model directory")
    p.add_argument("items", type=_ids, help="the history: comma-separated item ids")
    p.add_argument("-n", type=positive_int, default=20, help="items to return (default 20)")
    p.add_argument("--exclude", type=_ids, default=[], help="item ids never to return")
    p.add_argument("--candidates", type=_ids, help="rank only these item ids")
    p.add_argument("--version", help="version to use (default: CURRENT)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_recommend)

    p = subparsers.add_parser("generate", help="write synthetic clustered interaction data")
    p.add_argument("--shape", required=True, help="small, ml-20m, netflix or msd")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--format", default="csv", choices=("csv", "tsv", "parquet", "msd"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    register_retrain(subparsers)
