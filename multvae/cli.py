"""The ``multvae`` console script.

Subcommands are registered by ``training.cli`` (train, evaluate, generate, ...) and
``service.cli`` (serve). They are looked up by module name so that the core package keeps
no import-time dependency on either half; each module exposes
``register(subparsers) -> None`` and sets ``func(args) -> int`` on its parsers.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from multvae import __version__
from multvae.errors import MultVAEError

SUBCOMMAND_MODULES = ("training.cli", "service.cli", "multvae.demo")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="multvae",
        description="Mult-VAE / Mult-DAE recommender: train offline, serve online.",
    )
    parser.add_argument("--version", action="version", version=f"multvae {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name in SUBCOMMAND_MODULES:
        importlib.import_module(name).register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except MultVAEError as exc:
        print(f"multvae {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"multvae {args.command}: interrupted", file=sys.stderr)
        return 130
    return code


if __name__ == "__main__":
    sys.exit(main())
