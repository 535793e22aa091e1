"""``multvae train | evaluate | compare | recommend | similar | generate | retrain``: the offline
subcommands.

This module only builds parsers: torch, scipy, pandas and the training code are imported
inside the commands, so that ``multvae --help`` and a mistyped flag answer at once.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from training.arguments import (
    EXIT_FAILED,
    EXIT_KEPT,
    EXIT_PROMOTED,
    EXIT_USAGE,
    METRICS,
    add_data_arguments,
    add_model_arguments,
    positive_int,
    spec_from_args,
    train_config_from_args,
)
from training.catalog import MODEL_KINDS

if TYPE_CHECKING:
    from multvae.artifacts import ModelVersion
    from multvae.recommend import Recommendation
    from training.train import EpochRecord


def describe_split(stats: dict[str, Any], seed: int) -> str:
    return (
        f"data: {stats['users']} users, {stats['items']} items, {stats['train_clicks']} "
        f"training clicks; {stats['val_users']} validation / {stats['test_users']} test users "
        f"(seed {seed})"
    )


def cmd_train(args: argparse.Namespace) -> int:
    return run_train(args)


def _silent(*_: Any, **__: Any) -> None:
    pass


def run_train(
    args: argparse.Namespace, on_epoch: Callable[[EpochRecord], None] | None = None
) -> int:
    """``multvae train`` in one process, or as one rank of a ``torchrun`` job.

    Every rank reads and splits the data (the split is seeded, so all agree, and they check
    the data fingerprint), trains its shard of every batch, and waits for the others at the
    end; then rank 0 alone scores the model, writes the version and removes the checkpoint.
    A rank that dies stops the job before that point: the others fail in their next
    collective (or torchrun stops them), and nothing is written. ``on_epoch`` runs on every
    rank after each epoch's checkpoint.
    """
    from multvae.artifacts import VERSIONS
    from training import checkpoint
    from training.distributed import joined
    from training.evaluate import format_evaluation
    from training.pipeline import prepare, write_trained
    from training.train import train

    spec = spec_from_args(args)
    config = train_config_from_args(args, spec)
    with joined(config.device) as group:  # a device that is not there fails before reading
        say = print if group.leader else _silent
        ranks = f" over {group.world} processes" if group.distributed else ""
        say(f"reading {spec.path} ...", flush=True)
        data = prepare(spec)
        group.check_same(data.fingerprint, "data")
        say(describe_split(data.split.stats, spec.seed), flush=True)
        path = checkpoint.checkpoint_path(args.out)
        if group.leader:
            path.parent.mkdir(parents=True, exist_ok=True)
            if path.exists():
                say(f"resuming the run checkpointed in {path}" if args.resume else
                    f"{path} holds an unfinished run: training from the start and replacing "
                    "it (--resume continues it)", flush=True)  # fmt: skip
            elif args.resume:
                say(f"--resume: no checkpoint at {path}; training from the start", flush=True)
        checkpointing = checkpoint.Checkpointing(
            path, args.resume, checkpoint.identity(data.fingerprint, config.to_dict())
        )
        result = train(
            data.split, config, progress=not args.quiet, on_epoch=on_epoch, group=group,
            checkpointing=checkpointing,
        )  # fmt: skip
        group.barrier()  # every rank finished training: none died before the write
        if not group.leader:
            return 0
        trained = write_trained(spec, config, args.out, data, result,
                                promote=not args.no_promote, processes=group.world)  # fmt: skip
        checkpoint.remove(path)
    r = trained.result
    print(
        f"trained {r.plan.model} for {len(r.history)} epochs ({r.history[-1].updates} updates, "
        f"batch {r.plan.batch_size}{ranks}) in {r.seconds:.1f}s; best epoch {r.best_epoch}, "
        f"beta {r.beta:.3f}, validation NDCG@100 {r.best_val_ndcg:.4f}"
    )
    if r.item_path is not None:
        print(describe_item_path(r.item_path))
    print(format_evaluation("test", trained.test))
    where = Path(args.out) / VERSIONS / str(trained.version)
    print(
        f"wrote model version {trained.version} to {where}"
        + ("" if args.no_promote else " (CURRENT)")
    )
    return 0


def describe_item_path(summary: dict[str, Any]) -> str:
    """One line on training.itempath's outcome."""
    if "reason" in summary:
        return f"item-item path: none ({summary['reason']})"
    if not summary["fitted"]:
        return (f"item-item path: none (the network alone is best on the validation users, "
                f"NDCG@100 {summary['network_val_ndcg@100']:.4f})")  # fmt: skip
    return (
        f"item-item path: EASE lambda {summary['l2']:g}, {summary['neighbours']} neighbours per "
        f"item, weight {summary['weight']:g}; validation NDCG@100 {summary['val_ndcg@100']:.4f} "
        f"(network alone {summary['network_val_ndcg@100']:.4f})"
    )


def _duration(text: str) -> float:
    from training.tune import parse_duration

    try:
        return parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _model_kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = sorted(set(kinds) - set(MODEL_KINDS))
    if not kinds or unknown:
        raise argparse.ArgumentTypeError(
            f"{text!r}: give model kinds from {', '.join(MODEL_KINDS)}, comma-separated"
        )
    return kinds


def cmd_tune(args: argparse.Namespace) -> int:
    from multvae.artifacts import VERSIONS
    from multvae.device import resolve_device
    from training.evaluate import format_evaluation
    from training.pipeline import train_config_for
    from training.tune import tune

    spec = spec_from_args(args)
    fixed = {"epochs": args.epochs} if args.epochs is not None else {}
    base = train_config_for(spec, seed=args.seed, device=args.device, **fixed)
    resolve_device(base.device)  # fail before reading data
    result = tune(
        spec, base, args.out,
        trials=args.trials, time_budget=args.time_budget, resume=args.resume,
        promote=args.promote, progress=not args.quiet, models=args.models,
    )
    finished = [t for t in result.search if t["val_ndcg@100"] is not None]
    pruned = sum(t["state"] == "pruned" for t in result.search)
    print(f"search: {len(result.search)} trials ({pruned} pruned), best first:")
    for t in sorted(finished, key=lambda t: -t["val_ndcg@100"])[:10]:
        params = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                           for k, v in t["params"].items())
        print(f"  #{t['number']:<3} {t['state']:<8} val NDCG@100 {t['val_ndcg@100']:.4f}  {params}")
    trained = result.trained
    print(f"best: trial {result.study.best_trial.number}, validation NDCG@100 "
          f"{trained.result.best_val_ndcg:.4f}")
    print(format_evaluation("test", trained.test))
    where = Path(args.out) / VERSIONS / str(trained.version)
    print(f"wrote model version {trained.version} to {where}")
    return 0


def _baseline_names(text: str) -> list[str]:
    from training.baselines import parse_baseline_names

    try:
        return parse_baseline_names(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def _cutoffs(text: str) -> tuple[int, ...]:
    from multvae.ranking import parse_cutoffs

    try:
        return parse_cutoffs(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def cmd_evaluate(args: argparse.Namespace) -> int:
    from multvae.artifacts import load_version
    from multvae.device import resolve_device
    from training.evaluate import HELDOUT_FILE, evaluate_model, format_evaluation, load_heldout
    from training.pipeline import recorded_data_path, split_for_version

    device = resolve_device(args.device)
    version = load_version(args.model_dir, args.version, device)
    data = args.data
    if args.baselines and data is None:
        # Baselines are fitted on the training users, which a version does not store: re-read
        # the recorded file; split_for_version refuses it when its fingerprint has changed.
        data = recorded_data_path(version)
        _stderr(f"baselines: re-reading {data}, the file version {version.version} recorded")
    split = split_for_version(version, data) if data is not None else None
    if split is not None:
        test = split.test
    else:
        _, test = load_heldout(version.path / HELDOUT_FILE)
    evaluation = evaluate_model(version.model, test, args.k)
    baselines: dict[str, Any] = {}
    if args.baselines and split is not None:
        from training.baselines import run_baselines

        # Progress goes to stderr so that --json output stays parseable.
        baselines = run_baselines(split, args.baselines, log=_stderr, cutoffs=args.k)
    report = None
    if args.report:
        from training.report import write_version_report

        report = write_version_report(args.model_dir, version, evaluation, baselines)
    if args.json:
        out: dict[str, Any] = {"version": version.version, "test": evaluation.to_json()}
        if baselines:
            out["baselines"] = {name: r.to_json() for name, r in baselines.items()}
            out["data"] = data
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
            print(f"  {metric:<12} {t.diff:+.4f}  p {t.p:.3g} {t.stars}".rstrip())
    if report is not None:
        print(f"report: {report[0]} and {report[1]}")
    return 0


def cmd_compare(args: argparse.Namespace) -> int:
    from multvae.device import resolve_device
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


# What `multvae generate` writes for an --out suffix when --format is not given.
SUFFIX_FORMATS = {".csv": "csv", ".tsv": "tsv", ".parquet": "parquet", ".txt": "msd"}


def generate_format(out: Path, fmt: str | None) -> str:
    """The format --out and --format ask for; DataError when they disagree or say nothing."""
    from multvae.errors import DataError

    by_suffix = SUFFIX_FORMATS.get(out.suffix.lower())
    known = ", ".join(f"{s} ({f})" for s, f in SUFFIX_FORMATS.items())
    if fmt is None:
        if by_suffix is None:
            raise DataError(
                f"cannot tell the format from {out.name!r}: name the file with one of {known}, "
                "or pass --format"
            )
        return by_suffix
    if by_suffix is not None and by_suffix != fmt and not (fmt == "msd" and by_suffix == "tsv"):
        raise DataError(
            f"--format {fmt} but {out.name!r} ends in {out.suffix} ({by_suffix}); "
            "give the file a matching suffix or drop --format"
        )
    return fmt


def cmd_generate(args: argparse.Namespace) -> int:
    from multvae.errors import TrainingError
    from training.synthetic import SHAPES, generate, write

    if args.shape not in SHAPES:
        raise TrainingError(f"unknown shape {args.shape!r}; choose one of {sorted(SHAPES)}")
    path = Path(args.out)
    fmt = generate_format(path, args.format)
    inter = generate(args.shape, seed=args.seed)
    write(inter, path, fmt)
    print(f"wrote {len(inter)} interactions ({args.shape}) to {path} as {fmt}")
    return 0


def cmd_retrain(args: argparse.Namespace) -> int:
    from training.retrain import run_retrain_command

    return run_retrain_command(args)


def cmd_data_download(args: argparse.Namespace) -> int:
    from training.download import download_command

    return download_command(args)


def _ids(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def _show(version: ModelVersion, rec: Recommendation, as_json: bool, extra: dict[str, Any]) -> None:
    """A ranking as a table (rank, item, score, title when known) or as the service's JSON
    (with a ``title`` per item when the version has titles)."""
    title = version.items.title
    if as_json:
        titled = version.items.titles is not None
        items = [{"item": i, "score": s} | ({"title": title(i)} if titled else {})
                 for i, s in rec.items]  # fmt: skip
        out = {"model_version": version.version, **extra, "items": items}
        print(json.dumps(out, indent=2, allow_nan=False))
        return
    for rank, (item, score) in enumerate(rec.items, start=1):
        known = title(item)
        print(f"{rank:>4}  {item}  {score:.4f}" + (f"  {known}" if known else ""))


def cmd_recommend(args: argparse.Namespace) -> int:
    from multvae.artifacts import load_version
    from multvae.device import resolve_device
    from multvae.recommend import Recommender

    version = load_version(args.model_dir, args.version, resolve_device(args.device))
    recommender = Recommender(version.model, version.items, version.version)
    rec = recommender.recommend(args.items, args.n, args.exclude, args.candidates)
    if not args.json:
        if rec.unknown:
            print(f"ignored unknown item ids: {', '.join(rec.unknown)}", file=sys.stderr)
        if rec.fallback is not None:
            print(f"no known history: {rec.fallback} ranking", file=sys.stderr)
    _show(version, rec, args.json, {"unknown_items": rec.unknown, "fallback": rec.fallback})
    return 0


def cmd_similar(args: argparse.Namespace) -> int:
    from multvae.artifacts import load_version
    from multvae.device import resolve_device
    from multvae.recommend import Recommender

    version = load_version(args.model_dir, args.version, resolve_device(args.device))
    recommender = Recommender(version.model, version.items, version.version)
    rec = recommender.similar(args.item, args.n, args.exclude, args.candidates)
    if not args.json:
        title = version.items.title(args.item)
        print(f"similar to {args.item}" + (f" ({title})" if title else ""), file=sys.stderr)
    _show(version, rec, args.json, {"item": args.item})
    return 0


def _add_ranking_arguments(p: argparse.ArgumentParser, n: int) -> None:
    """What `recommend` and `similar` share: how many, what not to return, which version."""
    p.add_argument("-n", type=positive_int, default=n, help=f"items to return (default {n})")
    p.add_argument("--exclude", type=_ids, default=[], help="item ids never to return")
    p.add_argument("--candidates", type=_ids, help="rank only these item ids")
    p.add_argument("--version", help="version to use (default: CURRENT)")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a model version from an interaction file")
    add_data_arguments(p)
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="model directory (versions/ and CURRENT)")
    p.add_argument("--no-promote", action="store_true", help="write the version, keep CURRENT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--resume", action="store_true",
        help="continue the run checkpointed in OUT/train-checkpoint.pt (same data and "
        "settings) when there is one, else start from the beginning",
    )  # fmt: skip
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "tune", help="hyperparameter search (Optuna) on the validation users; writes the best"
    )
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="model directory; the study goes to tune/")
    p.add_argument("--trials", type=positive_int, help="stop when the study has this many trials")
    p.add_argument(
        "--time-budget", type=_duration,
        help="start no trial after this long, e.g. 30m, 2h, 600 (seconds)",
    )
    p.add_argument(
        "--epochs", type=positive_int,
        help="epochs per trial (default: as multvae train, with early stopping)",
    )
    p.add_argument("--resume", action="store_true", help="continue the study under --out")
    p.add_argument(
        "--promote", action="store_true",
        help="point CURRENT at the result even when the directory has one already",
    )
    p.add_argument(
        "--models", type=_model_kinds, default=list(MODEL_KINDS),
        help=f"model kinds to search (default {','.join(MODEL_KINDS)})",
    )
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_tune)

    p = subparsers.add_parser(
        "evaluate", help="Recall@20/50 and NDCG@100 (or at --k cut-offs) on the test users"
    )
    p.add_argument("model_dir", help="model directory")
    p.add_argument("--version", help="version to score (default: CURRENT)")
    p.add_argument("--data", help="re-read and re-split this file instead of heldout.npz")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument(
        "--k",
        type=_cutoffs,
        default=(),
        metavar="K,...",
        help="cut-offs, e.g. 10,20,50,100: Recall, NDCG, Precision and catalogue coverage at "
        "each, and MRR (default: the paper's Recall@20, Recall@50 and NDCG@100 only)",
    )
    p.add_argument(
        "--baselines",
        type=_baseline_names,
        metavar="NAMES",
        help="also score baselines on the same test users, e.g. popularity,ease,wmf "
        "(fitted on the training users: re-reads --data, by default the file the version "
        "was trained on when it is unchanged)",
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
    _add_ranking_arguments(p, n=20)
    p.set_defaults(func=cmd_recommend)

    p = subparsers.add_parser(
        "similar",
        help="items similar to one item: cosine of the decoder's item vectors (no server needed)",
    )
    p.add_argument("model_dir", help="model directory")
    p.add_argument("--item", required=True, help="the item id")
    _add_ranking_arguments(p, n=10)
    p.set_defaults(func=cmd_similar)

    p = subparsers.add_parser("generate", help="write synthetic clustered interaction data")
    p.add_argument("--shape", required=True, help="small, ml-20m, netflix, msd or 1m-items")
    p.add_argument(
        "--out", required=True,
        help=f"output file; its suffix picks the format ({', '.join(SUFFIX_FORMATS)})",
    )  # fmt: skip
    p.add_argument(
        "--format", choices=("csv", "tsv", "parquet", "msd"),
        help="output format (default: from the suffix of --out)",
    )  # fmt: skip
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    register_retrain(subparsers)
    register_data(subparsers)


EPILOG = f"""\
exit codes:
  {EXIT_PROMOTED}  promoted: the candidate is CURRENT (or was the first model)
  {EXIT_FAILED}  failed: an error (data, training, comparison, disk); CURRENT is untouched
  {EXIT_USAGE}  invalid arguments; nothing was done
  {EXIT_KEPT}  kept: the gate refused the candidate; the current version keeps serving

Every run writes MODEL_DIR/reports/retrain-<UTC time>.json with the decision and both
versions' metrics. A running service picks a promoted version up by itself (hot reload).
"""


def register_retrain(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "retrain",
        help="train a new version, promote it only if it is not worse than CURRENT",
        description=(
            "Train a candidate version from the data, score it and the current version on "
            "the test users both held out (clicks on items both know), and promote it "
            "(atomic CURRENT swap) unless it is worse by more than the tolerance. "
            "Without data or model flags it reuses the recipe CURRENT was trained with "
            "(its config.json: file, filters, held-out users, seed, training settings); "
            "each flag given replaces its recorded value, and the command says what it used."
        ),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_data_arguments(p, required=False)
    add_model_arguments(p)
    # None = "not given": the recorded recipe's value is used (training.retrain.recipe_from).
    p.set_defaults(format=None, seed=None, model=None, likelihood=None)
    p.add_argument("--model-dir", required=True, help="model directory (versions/ and CURRENT)")
    g = p.add_argument_group("quality gate")
    g.add_argument("--metric", default="ndcg@100", choices=METRICS, help="gate metric")
    g.add_argument(
        "--tolerance", type=float, default=0.01,
        help="allowed drop of the metric versus CURRENT (default 0.01)",
    )  # fmt: skip
    g.add_argument(
        "--tolerance-mode", default="absolute", choices=("absolute", "relative"),
        help="absolute: metric units; relative: a fraction of CURRENT's value",
    )  # fmt: skip
    g.add_argument(
        "--force", action="store_true",
        help="promote even when the gate refuses or the versions cannot be compared",
    )  # fmt: skip
    g = p.add_argument_group("housekeeping and output")
    g.add_argument(
        "--keep", type=int, default=3,
        help="garbage collection keeps the newest N versions and, always, CURRENT, the version "
        "it replaced (PREVIOUS, for rollback) and every version written since the last "
        "promotion (default 3)",
    )  # fmt: skip
    g.add_argument(
        "--keep-refused", action="store_true",
        help="leave a refused candidate under versions/ for inspection (default: delete it)",
    )  # fmt: skip
    g.add_argument("--json", action="store_true", help="print the JSON report")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_retrain)


DATASET_NAMES = ("ml-100k", "ml-1m", "ml-20m", "ml-25m", "ml-latest-small", "msd")


def register_data(subparsers: Any) -> None:
    data = subparsers.add_parser("data", help="public datasets: download")
    commands = data.add_subparsers(dest="data_command", required=True, metavar="COMMAND")
    p = commands.add_parser(
        "download",
        help="download, check (sha256) and unpack a public dataset for multvae train --data",
        description=(
            "Download NAME's archive (resuming a partial download with HTTP Range requests), "
            "check its sha256, and unpack it to DIR/NAME, ready for multvae train --data "
            "DIR/NAME. MovieLens archives are checked against their known digests; the MSD "
            "taste profile has no published one (its digest is printed; --sha256 checks it)."
        ),
    )
    p.add_argument("name", choices=DATASET_NAMES, help="dataset")
    p.add_argument("--to", default="data", help="parent directory (default ./data)")
    p.add_argument(
        "--base-url",
        help="fetch the archive from this mirror, under its usual file name "
        "(default: MULTVAE_DATA_BASE_URL, else the publisher's site)",
    )
    p.add_argument("--sha256", help="expected sha256 of the archive (default: the known one)")
    p.add_argument(
        "--archive", help="an archive downloaded already (e.g. on another machine): check, unpack"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_data_download)
