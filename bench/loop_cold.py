"""What the event loop's steps of a cache miss cost when the loop wakes from idle, and warm.

    python bench/loop_cold.py                 # idle 20 ms before each operation, and none
    python bench/loop_cold.py --idle-ms 5 --count 500

At the arrival rates where the miss target is measured (tens of requests a second per
worker) the event loop sleeps between requests and between the steps of a miss (the Redis
reply, the batch window, the forward pass), so each step runs on cold caches. This times,
on uvloop in one thread pinned like the servers of ``serve_open_loop.py`` (the first CPU,
with a private ``redis-server``), the CPU of that thread for each step, once after
``--idle-ms`` of sleep and once back to back: the service's ``RedisCache`` (MGET, a lone
SET), the same through redis-py directly, a pipeline of one SET, a raw RESP round trip on an
asyncio stream, and the batch window's two forms (an ``asyncio.timeout`` around
``Event.wait``, or a timer that sets the event). Median µs of thread CPU per operation.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import socket
import statistics
import subprocess
import time
from collections.abc import Awaitable, Callable

from service.cache import RedisCache

Op = Callable[[], Awaitable[object]]


async def _median_us(op: Op, idle_s: float, count: int) -> float:
    for _ in range(20):
        await op()
    spent = []
    for _ in range(count):
        if idle_s:
            await asyncio.sleep(idle_s)
        tic = time.thread_time_ns()
        await op()
        spent.append(time.thread_time_ns() - tic)
    return statistics.median(spent) / 1000


async def _main(port: int, idle_s: float, count: int) -> None:
    url = f"redis://127.0.0.1:{port}/0"
    cache = RedisCache(url, timeout_s=0.1, max_connections=64)
    client = cache.client
    key, value = "multvae:rec:body1:v:" + "ab" * 32, b"\n" + b"x" * 1200
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    mget = b"*2\r\n$4\r\nMGET\r\n$%d\r\n%s\r\n" % (len(key), key.encode())
    arrived = asyncio.Event()

    async def pipeline_of_one() -> object:
        pipe = client.pipeline(transaction=False)
        pipe.set(key, value, px=300_000)
        return await pipe.execute()

    async def raw_round_trip() -> object:
        writer.write(mget)
        for _ in range(3):  # *1, $len, the value
            await reader.readuntil(b"\r\n")
        return None

    async def window_by_timeout() -> object:
        arrived.clear()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(0.002):
                await arrived.wait()
        return None

    async def window_by_timer() -> object:
        arrived.clear()
        timer = asyncio.get_running_loop().call_later(0.002, arrived.set)
        await arrived.wait()
        timer.cancel()
        return None

    ops: dict[str, Op] = {
        "RedisCache.get_many, one key (MGET)": lambda: cache.get_many([key]),
        "RedisCache.set_many, one entry": lambda: cache.set_many([(key, value)], 300),
        "redis-py mget": lambda: client.mget([key]),
        "redis-py set": lambda: client.set(key, value, px=300_000),
        "redis-py pipeline of one set": pipeline_of_one,
        "raw RESP MGET on an asyncio stream": raw_round_trip,
        "batch window: asyncio.timeout + Event.wait": window_by_timeout,
        "batch window: call_later(event.set)": window_by_timer,
        "asyncio.sleep(0)": lambda: asyncio.sleep(0),
    }
    print(f"{'operation':45s} {f'after {idle_s * 1000:g} ms idle':>18s} {'back to back':>14s}")
    for name, op in ops.items():
        cold = await _median_us(op, idle_s, count)
        warm = await _median_us(op, 0.0, count)
        print(f"{name:45s} {cold:15.0f} µs {warm:11.0f} µs", flush=True)
    writer.close()
    await cache.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--idle-ms", type=float, default=20.0)
    parser.add_argument("--count", type=int, default=300)
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    args = parser.parse_args()
    import uvloop

    cpus = sorted(os.sched_getaffinity(0))
    os.sched_setaffinity(0, cpus[:1])
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = int(s.getsockname()[1])
    redis = subprocess.Popen(
        ["taskset", "-c", str(cpus[0]), args.redis_server, "--port", str(port), "--save", "",
         "--appendonly", "no", "--bind", "127.0.0.1"], stdout=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        time.sleep(0.5)  # redis-server binds within milliseconds
        print(f"CPU {cpus[0]}, load average {os.getloadavg()[0]:.2f}", flush=True)
        uvloop.run(_main(port, args.idle_ms / 1000, args.count))
    finally:
        redis.terminate()
        redis.wait()


if __name__ == "__main__":
    main()
