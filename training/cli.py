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
from multvae.model import MODEL_KINDS
from training.evaluate import HELDOUT_FILE, evaluate_model, format_evaluation, load_heldout
from training.pipeline import DataSpec, split_for_version, train_and_write, train_config_for
from training.preprocess import PRESETS
from training.readers import ALIASES, FORMATS

FORMAT_CHOICES = ("auto", *FORMATS, *ALIASES)


def _anneal_cap(text: str) -> float | str:
    if text in ("auto", "auto-single"):
        return text
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a number in [0, 1], 'auto' or 'auto-single'"
        ) from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"anneal cap {value} is outside [0, 1]")
    return value


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= 1")
    return value


def _heldout(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither a user count nor a fraction in (0, 1)"
        ) from None
    if value <= 0 or (value >= 1 and value != int(value)):
        raise argparse.ArgumentTypeError(f"{text!r}: give a count >= 1 or a fraction in (0, 1)")
    return value


def _dims(text: str) -> tuple[int, ...]:
    if text.strip().lower() in ("", "none"):
        return ()
    try:
        dims = tuple(int(d) for d in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r}: comma-separated layer sizes (e.g. 600) or 'none'"
        ) from None
    if any(d <= 0 for d in dims):
        raise argparse.ArgumentTypeError(f"{text!r}: layer sizes must be positive")
    return dims


def add_data_arguments(parser: argparse.ArgumentParser, required: bool = True) -> None:
    """--data/--format/--*-col/--preset and the filter and split flags (shared with retrain)."""
    g = parser.add_argument_group("data")
    g.add_argument(
        "--data", required=required,
        help="interaction file (or a Netflix, FilmTrust or CiteULike directory)",
    )
    g.add_argument("--format", default="auto", choices=FORMAT_CHOICES)
    g.add_argument("--user-col", help="user column of a generic CSV/TSV/Parquet file")
    g.add_argument("--item-col", help="item column of a generic CSV/TSV/Parquet file")
    g.add_argument("--rating-col", help="explicit rating column (binarised at --min-rating)")
    g.add_argument(
        "--count-col", help="play/click count column: every row with a count is a click"
    )
    g.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="ml-20m, netflix, msd: the paper's Table 1 preprocessing, held-out users and "
        "training schedule; ml-100k, ml-latest-small: the split of REFERENCE.md",
    )
    g.add_argument(
        "--min-rating", type=float,
        help="keep ratings > this (default 3.5 when the file has ratings, 2.5 for FilmTrust's "
        "0.5-4 scale; files of clicks or counts keep every row)",
    )
    g.add_argument(
        "--keep-all-ratings", action="store_true", help="do not binarise: every row is a click"
    )
    g.add_argument(
        "--min-user-clicks", type=_positive, help="drop users with fewer (default 5)"
    )
    g.add_argument(
        "--min-item-users", type=_positive, help="drop items with fewer users (default 0)"
    )
    g.add_argument(
        "--heldout-users",
        type=_heldout,
        help="users in each of validation and test: a count, or a fraction of all users "
        "(default 10%%, at most 10,000)",
    )
    g.add_argument("--seed", type=int, default=98765, help="split and training seed")


def spec_from_args(args: argparse.Namespace) -> DataSpec:
    return DataSpec(
        path=args.data,
        format=args.format,
        user_col=args.user_col,
        item_col=args.item_col,
        rating_col=args.rating_col,
        count_col=args.count_col,
        preset=args.preset,
        min_rating=args.min_rating,
        keep_all_ratings=args.keep_all_ratings,
        min_user_clicks=args.min_user_clicks,
        min_item_users=args.min_item_users,
        heldout_users=args.heldout_users,
        seed=args.seed,
    )


def add_model_arguments(parser: argparse.ArgumentParser) -> None:
    """Model and optimisation flags; unset ones follow the paper (preset) or adapt to the data."""
    g = parser.add_argument_group("model and training")
    g.add_argument(
        "--model", choices=("auto", *MODEL_KINDS),
        help="multvae (Liang et al.), multdae, or recvae (Shenbin et al., WSDM 2020); auto "
        "(default): multdae below 10,000 training users, multvae from there",
    )
    g.add_argument(
        "--likelihood", default="multinomial", choices=("multinomial", "gaussian", "logistic")
    )
    g.add_argument(
        "--hidden-dims",
        type=_dims,
        help="hidden layer sizes, e.g. 600, or 'none' (default: 600 for Mult-VAE from 10,000 "
        "training users, none below and for the DAE; 600,600,600,600,600 for RecVAE)",
    )
    g.add_argument("--latent-dim", type=_positive, help="K (default 200)")
    g.add_argument("--dropout", type=float, help="input dropout (default 0.5)")
    g.add_argument(
        "--epochs", type=_positive,
        help="epochs (default: 200 / 100 under the paper presets, else enough for "
        "--min-updates, between 100 and 1000)",
    )
    g.add_argument(
        "--min-updates", type=_positive, help="train at least this many updates (default 2000)"
    )
    g.add_argument(
        "--batch-size", type=_positive,
        help="users per batch (default 500 under the paper presets, else <= 500 split evenly)",
    )
    g.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    g.add_argument(
        "--anneal-cap",
        type=_anneal_cap,
        help="beta cap in [0, 1], 'auto' (anneal to 1, retrain to the peak) or 'auto-single'",
    )
    g.add_argument(
        "--total-anneal-steps", type=_positive,
        help="updates until beta would reach 1 (default 200,000 under the paper presets, else "
        "scaled so beta reaches its cap half-way through training)",
    )
    g.add_argument("--weight-decay", type=float, help="L2 weight (default 0.01 DAE, 0 VAE)")
    g.add_argument(
        "--patience", type=_positive,
        help="stop after this many epochs without validation gain (default: an eighth of the "
        "epochs, at least 20; none under the paper presets)",
    )
    g.add_argument("--no-early-stopping", action="store_true")
    g.add_argument(
        "--gamma", type=float,
        help="RecVAE: KL weight per click, beta_u = gamma * |x_u| (default 0.005)",
    )
    g.add_argument(
        "--encoder-epochs", type=_positive,
        help="RecVAE: encoder passes per decoder pass in each epoch (default 3)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


_CONFIG_FLAGS = (
    "model",
    "likelihood",
    "hidden_dims",
    "latent_dim",
    "dropout",
    "epochs",
    "min_updates",
    "batch_size",
    "lr",
    "anneal_cap",
    "total_anneal_steps",
    "weight_decay",
    "patience",
    "device",
    "seed",
    "gamma",
    "encoder_epochs",
)


def train_config_from_args(args: argparse.Namespace, spec: DataSpec) -> Any:
    overrides = {k: getattr(args, k) for k in _CONFIG_FLAGS if getattr(args, k) is not None}
    if args.no_early_stopping:
        overrides["patience"] = None
    return train_config_for(spec, **overrides)


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
        f"trained {r.plan.model} for {len(r.history)} epochs ({r.history[-1].updates} updates, "
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


def _cutoffs(text: str) -> tuple[int, ...]:
    from multvae.ranking import parse_cutoffs

    try:
        return parse_cutoffs(text)
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
    evaluation = evaluate_model(version.model, test, args.k)
    baselines: dict[str, Any] = {}
    if args.baselines and split is not None:
        from training.baselines import run_baselines

        # Progress goes to stderr so that --json output stays parseable.
        baselines = run_baselines(
            split, args.baselines, log=lambda line: print(line, file=sys.stderr, flush=True),
            cutoffs=args.k,
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
            print(f"  {metric:<12} {t.diff:+.4f}  p {t.p:.3g} {t.stars}".rstrip())
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


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("train", help="train a model version from an interaction file")
    add_data_arguments(p)
    add_model_arguments(p)
    p.add_argument("--out", required=True, help="model directory (versions/ and CURRENT)")
    p.add_argument("--no-promote", action="store_true", help="write the version, keep CURRENT")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_train)

    p = subparsers.add_parser(
        "tune", help="hyperparameter search (Optuna) on the validation users; writes the best"
    )
    add_data_arguments(p)
    p.add_argument("--out", required=True, help="model directory; the study goes to tune/")
    p.add_argument("--trials", type=_positive, help="stop when the study has this many trials")
    p.add_argument(
        "--time-budget", type=_duration,
        help="start no trial after this long, e.g. 30m, 2h, 600 (seconds)",
    )
    p.add_argument(
        "--epochs", type=_positive,
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

    p = subparsers.add_parser("generate", help="write synthetic clustered interaction data")
    p.add_argument("--shape", required=True, help="small, ml-20m, netflix or msd")
    p.add_argument("--out", required=True, help="output file")
    p.add_argument("--format", default="csv", choices=("csv", "tsv", "parquet", "msd"))
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_generate)

    # Imported here: training.retrain builds on this module's argument helpers.
    from training.retrain import register_retrain

    register_retrain(subparsers)
