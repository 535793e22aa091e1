"""The ``multvae`` console script: builds the parser, then runs one subcommand.

Kept apart from the core package (``multvae`` names neither ``training`` nor ``service``) and
cheap to import: the modules that register subcommands here only define arguments, and each
command imports torch, scipy, pandas or the web stack when it runs. ``multvae --help`` and a
mistyped flag therefore answer at once.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from multvae import __version__
from multvae.errors import MultVAEError
from multvae_cli import demo, versions
from service import cli as service_cli
from training import cli as training_cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multvae",
        description="Mult-VAE / Mult-DAE recommender: train offline, serve online.",
    )
    parser.add_argument("--version", action="version", version=f"multvae {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    training_cli.register(subparsers)
    service_cli.register(subparsers)
    demo.register(subparsers)
    versions.register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    world = os.environ.get("WORLD_SIZE", "1")
    if args.command != "train" and world not in ("", "0", "1"):
        print(
            f"multvae {args.command}: error: only `multvae train` runs as several processes "
            f"(torchrun set WORLD_SIZE={world}); run {args.command} without torchrun",
            file=sys.stderr,
        )
        return 2
    try:
        code: int = args.func(args)
        sys.stdout.flush()
    except MultVAEError as exc:
        print(f"multvae {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"multvae {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`multvae compare --json | head`): stop quietly, as cat does.
        # stdout is pointed at /dev/null so that the interpreter's final flush cannot fail.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 141  # 128 + SIGPIPE, what a shell reports for a command killed by the pipe
    return code
