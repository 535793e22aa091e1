"""``multvae serve``: run the HTTP service under uvicorn.

torch, FastAPI and uvicorn are imported inside the command, so ``multvae --help`` and the
training subcommands do not pay for them here.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from multvae.errors import NoModelError


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve recommendations over HTTP",
        description=(
            "Serve POST /recommend from the model version CURRENT names in --model-dir. "
            "Every option except --host and --port also reads its MULTVAE_* environment "
            "variable (the table is in docs/serving.md); options given here win."
        ),
    )
    parser.add_argument("--model-dir", type=Path, help="model directory (MULTVAE_MODEL_DIR)")
    # No MULTVAE_HOST/MULTVAE_PORT: in docker-compose MULTVAE_PORT is the host-side port.
    parser.add_argument(
        "--host", default="127.0.0.1", help="bind address (default 127.0.0.1; no variable)"
    )
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000; no variable)")
    parser.add_argument(
        "--workers",
        type=_positive,
        default=1,
        help="server processes on the port, each with its own model copy, sharing the Redis "
        "cache (default 1; no variable). Each gets usable cores / workers torch threads "
        "unless MULTVAE_TORCH_THREADS says otherwise",
    )
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (MULTVAE_DEVICE)")
    parser.add_argument("--redis-url", help="Redis cache URL (MULTVAE_REDIS_URL)")
    parser.add_argument(
        "--batch-wait-ms",
        type=float,
        help="longest a lone request waits for company; 0 = never (MULTVAE_BATCH_WAIT_MS)",
    )
    parser.add_argument(
        "--batch-max-size", type=int, help="rows per forward pass (MULTVAE_BATCH_MAX_SIZE)"
    )
    parser.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        help="log level (MULTVAE_LOG_LEVEL)",
    )
    parser.add_argument(
        "--http",
        choices=("h11", "httptools"),
        help="uvicorn's HTTP parser: h11 (default) refuses a request head over "
        "MULTVAE_MAX_HEADER_BYTES; httptools is faster and bounds no head, so use it only "
        "behind a proxy that does (MULTVAE_HTTP)",
    )
    parser.add_argument(
        "--no-access-log",
        action="store_true",
        help="no per-request log line (MULTVAE_ACCESS_LOG=false)",
    )
    parser.set_defaults(func=serve)


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


_OVERRIDES = ("model_dir", "device", "redis_url", "batch_wait_ms", "batch_max_size",
              "log_level", "http")  # fmt: skip

# What a value of each pydantic error type should have been, for the one-line messages.
_ACCEPTED = {
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_parsing": "a number",
    "bool_parsing": "true or false (also 1/0, yes/no, on/off)",
}


def _settings_errors(errors: Iterable[Mapping[str, Any]], from_command_line: set[str]) -> list[str]:
    """One line per invalid setting: where it came from, its value and what is accepted."""
    lines = []
    for error in errors:
        field = str(error["loc"][0]) if error.get("loc") else "?"
        value = error.get("input")
        if field == "redis_url" and isinstance(value, str):
            value = re.sub(r"(//[^/@]*?:)[^/@]*@", r"\1***@", value)  # never print a password
        shown = (
            "(hidden)" if field == "api_key" else repr(value) if isinstance(value, str) else value
        )
        if field in from_command_line:
            source = f"--{field.replace('_', '-')} {shown}"
        else:
            source = f"MULTVAE_{field.upper()}={shown}"
        accepted = _ACCEPTED.get(str(error.get("type")))
        if accepted is not None:
            why = f"expected {accepted}"
        else:
            why = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            why = why[:1].lower() + why[1:]
        lines.append(f"{source} is not accepted: {why}")
    return lines


def _stopped(signum: int, frame: object) -> None:
    """The stop signal uvicorn re-raises once it has shut down: nothing is left to do."""


def serve(args: argparse.Namespace) -> int:
    """Validate the settings, then run ``uvicorn service.app:create_app --factory``.

    Command-line overrides travel to the app (and to every worker process) as the
    ``MULTVAE_*`` variables they stand for, so this and plain uvicorn are the same server.
    """
    import uvicorn
    from pydantic import ValidationError

    from multvae.artifacts import current_version
    from multvae.device import resolve_device
    from service.logs import configure_logging
    from service.registry import load_serving
    from service.settings import Settings, usable_cpus

    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None
    }
    if args.no_access_log:
        overrides["access_log"] = False
    try:
        settings = Settings(**overrides)
    except ValidationError as exc:
        for line in _settings_errors(exc.errors(include_url=False), set(overrides)):
            print(f"multvae serve: error: {line}", file=sys.stderr)
        return 1
    # Fail before binding the port, with one line rather than a lifespan traceback: the
    # version CURRENT names must load, verify and fold in to finite scores.
    device = resolve_device(settings.device)
    if current_version(settings.model_dir) is None:
        raise NoModelError(
            f"{settings.model_dir} has no CURRENT model version: train one first "
            f"(multvae train --out {settings.model_dir}) or point --model-dir elsewhere"
        )
    load_serving(settings.model_dir, None, device)
    for name, value in overrides.items():
        os.environ[f"MULTVAE_{name.upper()}"] = str(value)
    if args.workers > 1 and settings.torch_threads is None:
        # N processes with every core each would oversubscribe the CPU N times over.
        os.environ["MULTVAE_TORCH_THREADS"] = str(max(1, usable_cpus() // args.workers))
    configure_logging(settings.log_level)
    if settings.http == "httptools":
        logging.getLogger("multvae.serve").info(
            "MULTVAE_HTTP=httptools: request heads are not bounded here (MULTVAE_MAX_HEADER_BYTES "
            "applies to h11 only); the proxy in front must bound them"
        )
    # After a graceful shutdown uvicorn restores the handlers it found and re-raises the
    # signal that stopped it. With Python's defaults that kills the process (143 under an
    # init process such as compose's `init: true`); with these the shutdown ends in exit 0.
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, _stopped)
    _raise_open_files_limit()
    try:
        uvicorn.run(
            "service.app:create_app",
            factory=True,
            host=args.host,
            port=args.port,
            workers=args.workers,
            log_config=None,
            access_log=False,
            server_header=False,
            timeout_graceful_shutdown=settings.shutdown_grace_s,
            # Only h11 bounds a request head (httptools buffers a head of any size); neither
            # bounds the body, the app's middleware does.
            http=settings.http,
            h11_max_incomplete_event_size=settings.max_header_bytes,
            timeout_keep_alive=settings.keep_alive_s,
        )
    except SystemExit as exc:
        # uvicorn exits 3 when startup fails (e.g. CURRENT changed to a bad version since the
        # check above); the log has said why. Our exit code for "could not serve" is 1.
        return 1 if exc.code else 0
    return 0


def _raise_open_files_limit() -> None:
    """Lift the soft limit on open files to the hard one: every idle or slow client holds a
    descriptor, and a soft limit of 256-1024 would let a few hundred of them starve /healthz."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
