"""Command-line arguments shared by the offline subcommands (``train``, ``evaluate``,
``tune``) and ``retrain``: the data and the model/training options, what they build, and
retrain's exit codes. Parsers only: the training code is imported when a command runs."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import TYPE_CHECKING

from training.catalog import ALIASES, FORMATS, MODEL_KINDS, PRESETS

# Exit codes of `multvae retrain`, for cron, the k8s CronJob's podFailurePolicy and
# deploy/entrypoint-trainer.sh.
EXIT_PROMOTED = 0  # the candidate now serves (or there was no current version)
EXIT_FAILED = 1  # something went wrong; CURRENT is untouched
EXIT_USAGE = 2  # invalid arguments (argparse); nothing was done
EXIT_KEPT = 3  # the gate refused the candidate; the current version keeps serving
METRICS = ("recall@20", "recall@50", "ndcg@100")

if TYPE_CHECKING:
    from training.pipeline import DataSpec
    from training.train import TrainConfig

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


def _whole(text: str, least: int) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"{text!r}: must be >= {least}")
    return value


def positive_int(text: str) -> int:
    return _whole(text, 1)


def non_negative_int(text: str) -> int:
    return _whole(text, 0)


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
        help="interaction file (or a Netflix, FilmTrust, CiteULike or Parquet directory)",
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
        "training schedule; ml-100k, ml-latest-small: the reference split (ratings > 3.5, "
        "users >= 5, 100 / 50 held-out users per group, seeded permutation of user ids)",
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
        "--min-user-clicks", type=positive_int, help="drop users with fewer (default 5)"
    )
    g.add_argument(
        "--min-item-users", type=positive_int, help="drop items with fewer users (default 0)"
    )
    g.add_argument(
        "--heldout-users",
        type=_heldout,
        help="users in each of validation and test: a count, or a fraction of all users "
        "(default 10%%, at most 10,000)",
    )
    g.add_argument("--seed", type=int, default=98765, help="split and training seed")


def spec_from_args(args: argparse.Namespace) -> DataSpec:
    from training.pipeline import DataSpec

    return DataSpec(
        # Absolute: evaluate --baselines and retrain find it again from any directory.
        path=str(Path(args.data).absolute()),
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
    g.add_argument("--latent-dim", type=positive_int, help="K (default 200)")
    g.add_argument("--dropout", type=float, help="input dropout (default 0.5)")
    g.add_argument(
        "--epochs", type=positive_int,
        help="epochs (default: 200 / 100 under the paper presets, else enough for "
        "--min-updates, between 100 and 1000)",
    )
    g.add_argument(
        "--min-updates", type=positive_int, help="train at least this many updates (default 2000)"
    )
    g.add_argument(
        "--batch-size", type=positive_int,
        help="users per batch (default 500 under the paper presets, else <= 500 split evenly)",
    )
    g.add_argument("--lr", type=float, help="Adam learning rate (default 1e-3)")
    g.add_argument(
        "--anneal-cap",
        type=_anneal_cap,
        help="beta cap in [0, 1], 'auto' (anneal to 1, retrain to the peak) or 'auto-single'",
    )
    g.add_argument(
        "--total-anneal-steps", type=positive_int,
        help="updates until beta would reach 1 (default 200,000 under the paper presets, else "
        "scaled so beta reaches its cap half-way through training)",
    )
    g.add_argument("--weight-decay", type=float, help="L2 weight (default 0.01 DAE, 0 VAE)")
    g.add_argument(
        "--patience", type=positive_int,
        help="stop after this many epochs without validation gain (default: an eighth of the "
        "epochs, at least 20; none under the paper presets)",
    )
    g.add_argument("--no-early-stopping", action="store_true")
    g.add_argument(
        "--gamma", type=float,
        help="RecVAE: KL weight per click, beta_u = gamma * |x_u| (default 0.005)",
    )
    g.add_argument(
        "--encoder-epochs", type=positive_int,
        help="RecVAE: encoder passes per decoder pass in each epoch (default 3)",
    )
    g.add_argument(
        "--sampled-softmax", type=positive_int, metavar="N",
        help="train with a sampled softmax: N items drawn per batch (popularity^0.75, log-Q "
        "corrected) estimate the normaliser instead of scoring every item; for catalogues of "
        "100,000s of items (default: the full softmax, the paper's; docs/training.md)",
    )
    g.add_argument(
        "--item-neighbours",
        type=non_negative_int,
        metavar="M",
        help="the item-item path beside the network: each item's M strongest EASE weights, "
        "added to the logits with a weight chosen on the validation users (default 1024; 0 "
        "= the network alone, as under the paper presets; docs/training.md)",
    )
    g.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N")


CONFIG_FLAGS = (
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
    "sampled_softmax",
    "item_neighbours",
)


def train_config_from_args(args: argparse.Namespace, spec: DataSpec) -> TrainConfig:
    from training.pipeline import train_config_for

    overrides = {k: getattr(args, k) for k in CONFIG_FLAGS if getattr(args, k) is not None}
    if args.no_early_stopping:
        overrides["patience"] = None
    return train_config_for(spec, **overrides)
