"""In-process cost of one cache hit through the real app: lifespan, middleware, routing, body
parsing, id lookup, cache key, LRU, response and access log; no sockets, no HTTP parsing.

    python bench/hit_path.py                 # ML-20M-shaped model, access log on
    python bench/hit_path.py --no-access-log

Far steadier than an HTTP load run (no load generator sharing the cores), so it is the one to
use when changing the request path; bench/serve_load.py gives the end-to-end figures. The
access log goes to /dev/null, so its cost is the formatting and the write call.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))  # bench scripts run as files, not a package

from serve_load import N_ITEMS, _write_model

from service.app import create_app
from service.logs import configure_logging
from service.settings import Settings


def _bodies(count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    return [
        b'{"items":['
        + b",".join(f'"{i}"'.encode() for i in rng.sample(range(N_ITEMS), rng.randint(10, 100)))
        + b'],"n":20}'
        for _ in range(count)
    ]


async def _call(app: Any, body: bytes) -> list[dict[str, Any]]:
    """One POST /recommend as an ASGI server would make it; returns the messages sent."""
    sent: list[dict[str, Any]] = []
    delivered = False

    async def receive() -> dict[str, Any]:
        nonlocal delivered
        if delivered:  # the app never asks twice for a complete body
            raise RuntimeError("body already delivered")
        delivered = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/recommend", "raw_path": b"/recommend", "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 1), "server": ("127.0.0.1", 80),
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())],
    }  # fmt: skip
    await app(scope, receive, send)
    return sent


async def run(args: argparse.Namespace, model_dir: Path) -> None:
    settings = Settings(
        model_dir=model_dir, device="cpu", reload_interval_s=0, access_log=args.access_log
    )
    configure_logging("info")
    devnull = Path(os.devnull).open("w")  # noqa: SIM115  (open for the whole run)
    logging.getLogger().handlers[0].stream = devnull  # type: ignore[attr-defined]
    app = create_app(settings)
    bodies = _bodies(64, seed=0)
    async with app.router.lifespan_context(app):
        for body in bodies:  # fill the cache
            await _call(app, body)
        answer = await _call(app, bodies[0])
        assert b'"cached":true' in answer[-1]["body"], answer
        best = float("inf")
        for _ in range(args.rounds):
            tic = time.perf_counter()
            for i in range(args.requests):
                await _call(app, bodies[i % len(bodies)])
            best = min(best, (time.perf_counter() - tic) / args.requests)
    print(f"cache hit, in process, access log {'on' if args.access_log else 'off'}: "
          f"{best * 1e6:.1f} µs/request (best of {args.rounds} x {args.requests})")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=4000)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--no-access-log", dest="access_log", action="store_false")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="hit-path-") as work:
        model_dir = Path(work) / "models"
        _write_model(model_dir)
        asyncio.run(run(args, model_dir))


if __name__ == "__main__":
    main()
