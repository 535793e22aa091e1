"""Where a cache hit's server CPU goes: the real app, driven in process through ASGI.

    python bench/hit_profile.py 2>/dev/null                       # in-process LRU cache
    python bench/hit_profile.py --redis-url redis://127.0.0.1:6379/0 2>/dev/null
    python bench/hit_profile.py --ladder 2>/dev/null              # what each part costs

``--ladder`` times, in rounds that take turns so that a neighbour's burst hits every rung
alike, FastAPI endpoints that add one part of the ``/recommend`` route at a time (the
trivial endpoint of ``serve_open_loop.py``; a pydantic body; the ``strict`` query parameter;
one dependency that reads the body, as ``serving`` does) and then the service itself, with
and without its access line: the minimum and the median µs of CPU per request of each.

Builds the ML-20M-shaped model of ``serve_open_loop.py``, starts ``service.app`` with its
lifespan (ASGI ``lifespan`` messages), answers the 256 histories of a hit run once (misses:
they fill the cache), then sends ``--hits`` requests for them one at a time, first timed
(CPU µs per hit), then under cProfile. HTTP parsing (uvicorn's h11 or httptools) is not in
this path: the server's protocol layer is measured by ``serve_open_loop.py --trivial-http``.
The access log goes to stderr (hence ``2>/dev/null``).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import pstats
import tempfile
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import Depends, FastAPI, Request, Response
from serve_open_loop import _bodies, _write_model, trivial_app

from service.routes import Strict
from service.schemas import RecommendRequest

# the functions this report names (file fragment, function name)
WATCHED = [
    ("service/routes.py", "serving"),
    ("service/routes.py", "reject_duplicate_keys"),
    ("service/routes.py", "_unique_keys"),
    ("service/routes.py", "require_key"),
    ("service/routes.py", "client_of"),
    ("service/routes.py", "recommend_one"),
    ("service/pipeline.py", "recommend"),
    ("service/middleware.py", "__call__"),
    ("service/middleware.py", "_record"),
    ("fastapi/dependencies/utils.py", "solve_dependencies"),
    ("fastapi/routing.py", "get_request_handler"),
    ("fastapi/routing.py", "app"),
    ("starlette/requests.py", "body"),
    ("json/__init__.py", "loads"),
    ("logging/__init__.py", "handle"),
]


async def _call(app: Any, body: bytes) -> int:
    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/recommend", "raw_path": b"/recommend", "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 40000), "server": ("127.0.0.1", 8000),
        "headers": [(b"host", b"bench"), (b"content-type", b"application/json"),
                    (b"content-length", b"%d" % len(body))],
    }  # fmt: skip
    sent = False
    status = 0

    async def receive() -> dict[str, Any]:
        nonlocal sent
        if sent:
            await asyncio.Event().wait()  # no disconnect while the request is served
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    async def send(message: dict[str, Any]) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(scope, receive, send)
    return status


async def _run(args: argparse.Namespace, model_dir: Path) -> pstats.Stats:
    from service.app import create_app
    from service.settings import Settings

    fields: dict[str, Any] = {"model_dir": model_dir, "device": "cpu", "reload_interval_s": 0}
    if args.redis_url:
        fields["redis_url"] = args.redis_url
    app = create_app(Settings(**fields))
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(
        app({"type": "lifespan", "asgi": {"version": "3.0"}}, to_app.get, from_app.put)
    )
    await to_app.put({"type": "lifespan.startup"})
    started = await from_app.get()
    if started["type"] != "lifespan.startup.complete":
        raise SystemExit(f"startup failed: {started}")
    pool = _bodies("hit", 0, 0)
    statuses = [await _call(app, body) for body in pool]  # misses: fill the cache
    for body in pool:  # warm: every later request is a hit
        statuses.append(await _call(app, body))
    if any(s != 200 for s in statuses):
        raise SystemExit(f"warm-up failed: {sorted(set(statuses))}")
    cpu = time.process_time()
    for i in range(args.hits):
        await _call(app, pool[i % len(pool)])
    cpu = time.process_time() - cpu
    print(f"{args.hits} hits, no profiler: {cpu * 1e6 / args.hits:.0f} µs CPU per hit")
    profiler = cProfile.Profile()
    profiler.enable()
    for i in range(args.hits):
        await _call(app, pool[i % len(pool)])
    profiler.disable()
    await to_app.put({"type": "lifespan.shutdown"})
    await from_app.get()
    await lifespan
    return pstats.Stats(profiler)


async def read_body(request: Request) -> bytes:
    """The ladder's dependency: reads the body, as the service's ``serving`` does."""
    return await request.body()


def _rungs() -> dict[str, Any]:
    """FastAPI apps that each add one part of the hit route to the one before (their
    annotations are strings, resolved in this module's namespace: imports at the top)."""
    answer = b'{"items":[],"ok":true}'

    async def body(body: RecommendRequest) -> Response:
        return Response(answer, media_type="application/json")

    async def query(body: RecommendRequest, strict: Strict = None) -> Response:
        return Response(answer, media_type="application/json")

    async def dependency(
        body: RecommendRequest, seen: Annotated[bytes, Depends(read_body)], strict: Strict = None
    ) -> Response:
        return Response(answer, media_type="application/json")

    rungs: dict[str, Any] = {"trivial endpoint (serve_open_loop.py)": trivial_app()}
    for name, endpoint in (("+ a pydantic body (RecommendRequest)", body),
                           ("+ the strict query parameter", query),
                           ("+ one dependency reading the body", dependency)):  # fmt: skip
        app = FastAPI()
        app.add_api_route("/recommend", endpoint, methods=["POST"])
        rungs[name] = app
    return rungs


async def _ladder(args: argparse.Namespace, model_dir: Path) -> None:
    import logging
    import statistics

    from service.app import create_app
    from service.settings import Settings

    service = create_app(Settings(model_dir=model_dir, device="cpu", reload_interval_s=0))
    to_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    from_app: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
    lifespan = asyncio.create_task(
        service({"type": "lifespan", "asgi": {"version": "3.0"}}, to_app.get, from_app.put)
    )
    await to_app.put({"type": "lifespan.startup"})
    await from_app.get()
    access = logging.getLogger("multvae.access")
    rungs = [(name, app, False) for name, app in _rungs().items()]
    rungs += [("the service, no access line", service, True), ("the service", service, False)]
    pool = _bodies("hit", 0, 0)
    for name, app, _ in rungs:
        # Twice: the service's first pass are misses that fill its cache.
        statuses = {await _call(app, body) for body in pool + pool}
        if statuses != {200}:
            raise SystemExit(f"{name}: statuses {sorted(statuses)}")
    spent: dict[str, list[float]] = {name: [] for name, _, _ in rungs}
    for _ in range(args.rounds):
        for name, app, quiet in rungs:
            access.disabled = quiet
            cpu = time.process_time()
            for i in range(args.hits // args.rounds):
                await _call(app, pool[i % len(pool)])
            spent[name].append((time.process_time() - cpu) * 1e6 / (args.hits // args.rounds))
    access.disabled = False
    print(f"µs CPU per request, {args.rounds} rounds of {args.hits // args.rounds}: min, median")
    for name, values in spent.items():
        print(f"  {name:42s} {min(values):6.0f} {statistics.median(values):6.0f}")
    await to_app.put({"type": "lifespan.shutdown"})
    await from_app.get()
    await lifespan


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hits", type=int, default=3000)
    parser.add_argument("--ladder", action="store_true", help="what each part of a hit costs")
    parser.add_argument("--rounds", type=int, default=30, help="--ladder: rounds per rung")
    parser.add_argument("--redis-url", default=None, help="default: the in-process LRU")
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args()
    if args.ladder:
        import uvloop

        with tempfile.TemporaryDirectory() as tmp:
            _write_model(Path(tmp))
            uvloop.run(_ladder(args, Path(tmp)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        _write_model(Path(tmp))
        stats = asyncio.run(_run(args, Path(tmp)))
    total = stats.total_tt  # type: ignore[attr-defined]
    print(f"under cProfile: {total * 1e6 / args.hits:.0f} µs per hit (profiler overhead in)")
    print("named functions, cumulative µs per hit (share of the profiled hit):")
    for (path, _line, name), row in stats.stats.items():  # type: ignore[attr-defined]
        if any(path.endswith(p) and name == f for p, f in WATCHED):
            calls, cum = row[1], row[3]
            print(f"  {path.split('site-packages/')[-1]}:{name}: {cum * 1e6 / args.hits:7.1f} "
                  f"µs ({cum / total:5.1%}), {calls / args.hits:.1f} calls per hit")  # fmt: skip
    print(f"top {args.top} by own time:")
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
