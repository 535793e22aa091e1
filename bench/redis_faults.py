"""The service's Redis cache under faults, against a private redis-server (issue 11, D4/D5).

    python bench/redis_faults.py                  # defaults: 300 ops/s for 8 s, kill at 2 s
    python bench/redis_faults.py --rate 1000 --down-s 3

Runs :class:`service.cache.GuardedCache` over :class:`service.cache.RedisCache` with the
service's default settings, the way a request uses it (GET; SET on a miss), at a fixed rate
over a small key set. Redis is SIGKILLed at ``--kill-at`` seconds and restarted on the same
port ``--down-s`` later; the pool then holds only dead connections. Reported: operations that
raised (the guard must turn every failure into a miss: 0), cache errors counted, and the time
from the restarted Redis answering PING to the first hit and to the first 0.5 s window with
no error. Then a burst: ``--batches`` concurrent batches of ``max_batch_requests`` histories
(the documented maximum), each one MGET and one pipelined store as in the service, must
neither error nor bypass the cache. Prints JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import socket
import subprocess
import time
from typing import Any

from service.cache import GuardedCache, build_cache
from service.metrics import Metrics
from service.settings import Settings


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _start_redis(port: int) -> subprocess.Popen[bytes]:
    exe = shutil.which("redis-server")
    if exe is None:
        raise SystemExit("redis-server is not on the PATH (apt-get install redis-server)")
    proc = subprocess.Popen(
        [exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc
        except OSError:
            time.sleep(0.01)
    proc.kill()
    raise SystemExit(f"redis-server on port {port} did not answer")


def _count(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


async def _restart_run(args: argparse.Namespace, settings: Settings, port: int) -> dict[str, Any]:
    url = f"redis://127.0.0.1:{port}/0"
    metrics = Metrics()
    backend = build_cache(
        url, 0, settings.redis_timeout_ms / 1000, settings.redis_pool_size(),
        settings.redis_health_check_s,
    )  # fmt: skip
    cache = GuardedCache(backend, metrics, settings.redis_breaker_s)
    proc = _start_redis(port)
    events: list[tuple[float, str]] = []  # (time, hit | miss | error-count-grew)
    raised = 0
    answering_at: float | None = None

    async def one(key: str) -> None:
        nonlocal raised
        errors = _count(metrics, "multvae_cache_errors_total", {"operation": "get"})
        try:
            [value] = await cache.get_many([key])
            if value is None:
                await cache.set_many([(key, b"x" * 200)], 60)
        except Exception:
            raised += 1
            return
        grew = _count(metrics, "multvae_cache_errors_total", {"operation": "get"}) > errors
        events.append((time.monotonic(), "error" if grew else "hit" if value else "miss"))

    async def chaos(start: float) -> None:
        nonlocal proc, answering_at
        await asyncio.sleep(max(0.0, start + args.kill_at - time.monotonic()))
        proc.kill()
        proc.wait()
        await asyncio.sleep(args.down_s)
        proc = await asyncio.to_thread(_start_redis, port)
        answering_at = time.monotonic()

    start = time.monotonic()
    tasks = {asyncio.create_task(chaos(start))}
    n = int(args.rate * args.duration)
    for i in range(n):
        await asyncio.sleep(max(0.0, start + i / args.rate - time.monotonic()))
        task = asyncio.create_task(one(f"bench:{i % args.keys}"))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    await asyncio.gather(*tasks)
    await cache.close()
    proc.kill()
    proc.wait()
    assert answering_at is not None
    after = [(t - answering_at, kind) for t, kind in events if t >= answering_at]
    first_hit = next((t for t, kind in after if kind == "hit"), None)
    last_error = max((t for t, kind in after if kind == "error"), default=None)
    return {
        "operations": n,
        "raised": raised,
        "get_errors": _count(metrics, "multvae_cache_errors_total", {"operation": "get"}),
        "set_errors": _count(metrics, "multvae_cache_errors_total", {"operation": "set"}),
        "bypassed": _count(metrics, "multvae_cache_bypassed_total"),
        "first_hit_after_redis_answers_s": first_hit,
        "last_error_after_redis_answers_s": last_error,
        "hits_after_restart": sum(kind == "hit" for _, kind in after),
        "ops_after_restart": len(after),
    }


async def _burst_run(args: argparse.Namespace, settings: Settings, port: int) -> dict[str, Any]:
    proc = _start_redis(port)
    metrics = Metrics()
    backend = build_cache(
        f"redis://127.0.0.1:{port}/0", 0, settings.redis_timeout_ms / 1000,
        settings.redis_pool_size(), settings.redis_health_check_s,
    )  # fmt: skip
    cache = GuardedCache(backend, metrics, settings.redis_breaker_s)
    size = settings.max_batch_requests
    batches = [[f"burst:{b}:{i}" for i in range(size)] for b in range(args.batches)]
    tic = time.perf_counter()
    # As the pipeline does for each batch request: look up, store the misses, look up again.
    await asyncio.gather(*(cache.get_many(keys) for keys in batches))
    await asyncio.gather(*(cache.set_many([(k, b"x" * 200) for k in keys], 60) for keys in batches))
    found = await asyncio.gather(*(cache.get_many(keys) for keys in batches))
    seconds = time.perf_counter() - tic
    await cache.close()
    proc.kill()
    proc.wait()
    return {
        "concurrent_batches": args.batches,
        "histories_per_batch": size,
        "pool_size": settings.redis_pool_size(),
        "errors": sum(
            _count(metrics, "multvae_cache_errors_total", {"operation": op})
            for op in ("get", "set")
        ),
        "bypassed": _count(metrics, "multvae_cache_bypassed_total"),
        "hits_on_second_lookup": sum(v is not None for values in found for v in values),
        "seconds_for_all_three_rounds": round(seconds, 3),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rate", type=float, default=300.0, help="cache operations per second")
    p.add_argument("--duration", type=float, default=8.0, help="seconds of load")
    p.add_argument("--kill-at", type=float, default=2.0, help="SIGKILL Redis after this long")
    p.add_argument("--down-s", type=float, default=2.0, help="restart it this much later")
    p.add_argument("--keys", type=int, default=50, help="distinct keys (hits need repeats)")
    p.add_argument("--batches", type=int, default=5, help="concurrent maximum-size batches")
    args = p.parse_args()
    settings = Settings()
    out = {
        "settings": {
            "redis_timeout_ms": settings.redis_timeout_ms,
            "redis_breaker_s": settings.redis_breaker_s,
            "redis_pool_size": settings.redis_pool_size(),
            "redis_health_check_s": settings.redis_health_check_s,
        },
        "restart": asyncio.run(_restart_run(args, settings, _free_port())),
        "burst": asyncio.run(_burst_run(args, settings, _free_port())),
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
