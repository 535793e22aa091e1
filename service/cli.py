"""``multvae serve``: run the HTTP service under uvicorn.

torch, FastAPI and uvicorn are imported inside the command, so ``multvae --help`` and the
training subcommands do not pay for them here.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from multvae.errors import NoModelError


def register(subparsers: Any) -> None:
    parser: argparse.ArgumentParser = subparsers.add_parser(
        "serve",
        help="serve recommendations over HTTP",
        description=(
            "Serve POST /recommend from the model version CURRENT names in --model-dir. "
            "Every option also reads its MULTVAE_* environment variable (see the README's "
            "Serving section); "
            "options given here win."
        ),
    )
    parser.add_argument("--model-dir", type=Path, help="model directory (MULTVAE_MODEL_DIR)")
    parser.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (MULTVAE_DEVICE)")
    parser.add_argument("--redis-url", help="Redis cache URL (MULTVAE_REDIS_URL)")
    parser.add_argument("--batch-wait-ms", type=float, help="micro-batch wait; 0 = off")
    parser.add_argument("--batch-max-size", type=int, help="rows per forward pass")
    parser.add_argument(
        "--log-level",
        choices=("critical", "error", "warning", "info", "debug"),
        help="log level (MULTVAE_LOG_LEVEL)",
    )
    parser.add_argument("--no-access-log", action="store_true", help="no per-request log line")
    parser.set_defaults(func=serve)


_OVERRIDES = ("model_dir", "device", "redis_url", "batch_wait_ms", "batch_max_size", "log_level")


def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from multvae.artifacts import current_version
    from multvae.device import resolve_device
    from service.app import create_app
    from service.logs import configure_logging
    from service.settings import Settings

    overrides: dict[str, Any] = {
        name: getattr(args, name) for name in _OVERRIDES if getattr(args, name) is not None
    }
    if args.no_access_log:
        overrides["access_log"] = False
    settings = Settings(**overrides)
    # Fail before binding the port, with the message rather than a lifespan traceback.
    resolve_device(settings.device)
    if current_version(settings.model_dir) is None:
        raise NoModelError(
            f"{settings.model_dir} has no CURRENT model version: train one first "
            f"(multvae train --out {settings.model_dir}) or point --model-dir elsewhere"
        )
    configure_logging(settings.log_level)
    config = uvicorn.Config(
        create_app(settings),
        host=args.host,
        port=args.port,
        log_config=None,
        access_log=False,
        server_header=False,
        timeout_graceful_shutdown=10,
    )
    server = uvicorn.Server(config)
    server.run()
    # uvicorn returns normally when startup fails (e.g. the model does not verify).
    return 0 if server.started else 1
