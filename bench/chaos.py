"""Faults under HTTP load against a real `multvae serve` (issue 11): each scenario prints JSON
with what it counted, and says whether the outcome was the expected one.

    python bench/chaos.py edge         # /healthz under 1 MB headers and slowloris, scrapes
    python bench/chaos.py soak --seconds 600 --rate 40   # RSS growth < 5 %, no error
    python bench/chaos.py redis        # Redis SIGKILL + restart under load
    python bench/chaos.py swap         # model versions promoted + reloaded under load
    python bench/chaos.py sigterm      # SIGTERM under load: in flight answered, exit 0
    python bench/chaos.py retrain      # `multvae retrain` SIGKILLed at each phase

Load is open loop at a fixed rate (requests are sent on schedule whether or not earlier ones
were answered): ``/recommend`` over a pool of histories (hits and misses), ``/recommend/batch``
of 10, ``/healthz``, and a ``/metrics`` scrape every 5 s. Needs `redis-server` for the
scenarios with a cache. The server is the one tests/reliability start (a 300-item model).
A server stopped with SIGTERM exits by that signal (-15) after its graceful shutdown: uvicorn
re-raises the signal it handled, so that a supervisor sees why it ended.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parent.parent
# The process fixtures of the test suite, so the bench and the tests start the same server.
sys.path[:0] = [str(ROOT / "tests" / "reliability"), str(ROOT / "tests" / "service")]

from reliability_support import (  # noqa: E402
    ITEM_IDS,
    KEY,
    MULTVAE,
    Server,
    exchange,
    status_of,
    write_model,
)
from service_support import RedisServer  # noqa: E402

from multvae.artifacts import (  # noqa: E402
    current_version,
    list_versions,
    load_version,
    previous_version,
)

STOPPED = (0, -signal.SIGTERM)  # a graceful exit after SIGTERM


@dataclass
class Tally:
    """What the load saw: statuses, transport errors, hits, versions, per second."""

    statuses: Counter[str] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)
    hits_at: list[float] = field(default_factory=list)
    versions: Counter[str] = field(default_factory=Counter)
    started: float = field(default_factory=time.monotonic)

    def failed(self) -> int:
        bad = sum(n for s, n in self.statuses.items() if not s.split()[-1].startswith("2"))
        return bad + len(self.errors)


def _rss_kb(pid: int) -> int:
    """Resident memory of ``pid`` and its children (uvicorn runs the app in the same process
    with one worker)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


async def _one(client: httpx.AsyncClient, tally: Tally, rng: random.Random) -> None:
    kind = rng.random()
    try:
        if kind < 0.7:
            size = rng.randint(1, 8)
            start = rng.randrange(0, 200)  # a pool of ~200 histories: hits and misses
            body = {"items": ITEM_IDS[start : start + size], "n": 20}
            response = await client.post("/recommend", json=body)
            if response.status_code == 200:
                data = response.json()
                tally.versions[data["model_version"]] += 1
                if data["cached"]:
                    tally.hits_at.append(time.monotonic())
        elif kind < 0.9:
            batch = [{"items": [rng.choice(ITEM_IDS)], "n": 10} for _ in range(10)]
            response = await client.post("/recommend/batch", json={"requests": batch})
        else:
            response = await client.get("/healthz")
        tally.statuses[str(response.status_code)] += 1
    except httpx.HTTPError as exc:
        tally.errors.append(f"{time.monotonic() - tally.started:.2f}s {type(exc).__name__}")


async def load(url: str, rate: float, seconds: float, tally: Tally, seed: int = 0) -> None:
    """Open-loop load at ``rate`` requests/s for ``seconds``, plus a /metrics scrape every 5 s."""
    rng = random.Random(seed)
    limits = httpx.Limits(max_connections=64, max_keepalive_connections=64)
    headers = {"X-API-Key": KEY}
    async with httpx.AsyncClient(
        base_url=url, timeout=30, limits=limits, headers=headers
    ) as client:
        tasks: set[asyncio.Task[None]] = set()
        start = time.monotonic()
        sent = 0
        next_scrape = start
        while (now := time.monotonic()) - start < seconds:
            if now >= next_scrape:
                task = asyncio.create_task(_scrape(client, tally))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
                next_scrape += 5
            due = start + sent / rate
            if now < due:
                await asyncio.sleep(due - now)
                continue
            task = asyncio.create_task(_one(client, tally, rng))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
            sent += 1
        if tasks:
            await asyncio.wait(tasks)


async def _scrape(client: httpx.AsyncClient, tally: Tally) -> None:
    try:
        response = await client.get("/metrics")
        tally.statuses[f"metrics {response.status_code}"] += 1
    except httpx.HTTPError as exc:
        tally.errors.append(f"metrics {type(exc).__name__}")


def _server(tmp: Path, env: dict[str, str] | None = None) -> Server:
    write_model(tmp / "models", seed=1)
    server = Server(tmp / "models", tmp / "serve.log", env)
    server.wait_ready()
    return server


def _summary(tally: Tally) -> dict[str, Any]:
    return {
        "statuses": dict(tally.statuses),
        "transport_errors": len(tally.errors),
        "first_errors": tally.errors[:5],
        "failed": tally.failed(),
    }


def soak(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    redis = RedisServer()
    server = _server(tmp, {"MULTVAE_REDIS_URL": redis.url})
    samples: list[tuple[float, int]] = []
    tally = Tally()

    async def run() -> None:
        async def sample() -> None:
            while True:
                samples.append((time.monotonic() - tally.started, _rss_kb(server.proc.pid)))
                await asyncio.sleep(10)

        sampler = asyncio.create_task(sample())
        await load(server.url, args.rate, args.seconds, tally)
        sampler.cancel()
        samples.append((time.monotonic() - tally.started, _rss_kb(server.proc.pid)))

    try:
        asyncio.run(run())
    finally:
        code = server.stop()
        redis.stop()
    # Growth from the first sample after the warm-up minute (allocator pools, caches and
    # lazy imports fill up first) to the last.
    warm = next((kb for t, kb in samples if t >= args.warmup_s), samples[0][1])
    last = samples[-1][1]
    growth = 100.0 * (last - warm) / warm
    return {
        "scenario": "soak",
        "rate": args.rate,
        "seconds": args.seconds,
        **_summary(tally),
        "rss_kb_first": samples[0][1],
        "rss_kb_after_warmup": warm,
        "rss_kb_last": last,
        "rss_growth_pct": round(growth, 2),
        "rss_kb_max": max(kb for _, kb in samples),
        "exit_code": code,
        "traceback_in_log": "Traceback" in server.output(),
        "expected": growth < 5.0 and tally.failed() == 0 and code in STOPPED,
    }


def redis_fault(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    redis = RedisServer()
    server = _server(tmp, {"MULTVAE_REDIS_URL": redis.url})
    tally = Tally()
    marks: dict[str, float] = {}

    async def run() -> None:
        async def fault() -> None:
            await asyncio.sleep(args.kill_at)
            redis.kill()
            marks["killed"] = time.monotonic()
            await asyncio.sleep(args.down_s)
            await asyncio.to_thread(redis.start)  # returns once it answers PING
            marks["answering"] = time.monotonic()

        await asyncio.gather(load(server.url, args.rate, args.seconds, tally), fault())

    try:
        asyncio.run(run())
    finally:
        code = server.stop()
        redis.stop()
    back = [t for t in tally.hits_at if t > marks["answering"]]
    first_hit = round(back[0] - marks["answering"], 2) if back else None
    return {
        "scenario": "redis",
        **_summary(tally),
        "first_hit_after_redis_answered_s": first_hit,
        "exit_code": code,
        "traceback_in_log": "Traceback" in server.output(),
        "expected": tally.failed() == 0 and first_hit is not None and first_hit < 2.0,
    }


def swap(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    server = _server(tmp)
    tally = Tally()
    promoted: list[str] = []

    async def run() -> None:
        async def promote() -> None:
            async with httpx.AsyncClient(base_url=server.url, headers={"X-API-Key": KEY}) as c:
                for seed in range(2, 2 + args.swaps):
                    await asyncio.sleep(args.seconds / (args.swaps + 1))
                    promoted.append(await asyncio.to_thread(write_model, tmp / "models", seed))
                    response = await c.post("/admin/reload", timeout=60)
                    tally.statuses[f"reload {response.status_code}"] += 1

        await asyncio.gather(load(server.url, args.rate, args.seconds, tally), promote())

    try:
        asyncio.run(run())
    finally:
        code = server.stop()
    return {
        "scenario": "swap",
        **_summary(tally),
        "promoted": len(promoted),
        "versions_answered": len(tally.versions),
        "exit_code": code,
        "traceback_in_log": "Traceback" in server.output(),
        "expected": tally.failed() == 0 and len(tally.versions) == len(promoted) + 1,
    }


def sigterm(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    server = _server(tmp)
    tally = Tally()
    marks: dict[str, float] = {}

    async def run() -> None:
        async def term() -> None:
            await asyncio.sleep(args.seconds / 2)
            marks["sigterm"] = time.monotonic()
            server.proc.send_signal(signal.SIGTERM)

        await asyncio.gather(load(server.url, args.rate, args.seconds, tally), term())

    try:
        asyncio.run(run())
        code = server.proc.wait(timeout=60)
    finally:
        server.stop()
    # After SIGTERM the listener closes: new connections are refused (the balancer's cue),
    # requests already sent are answered.
    refused = sum(1 for e in tally.errors if "ConnectError" in e)
    other = len(tally.errors) - refused
    bad = sum(n for s, n in tally.statuses.items() if s.startswith("5"))
    return {
        "scenario": "sigterm",
        **_summary(tally),
        "refused_after_sigterm": refused,
        "other_transport_errors": other,
        "exit_code": code,
        "traceback_in_log": "Traceback" in server.output(),
        "expected": code in STOPPED and other == 0 and bad == 0,
    }


def retrain_kill(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Train a first version, time one complete `multvae retrain`, then SIGKILL retrains at
    10 %, 20 %, ... 90 % of that time (reading data, training, writing the candidate,
    evaluating the gate, promoting, collecting garbage); after every kill, CURRENT must load
    and the version it replaced must still be there (every retrain runs GC with --keep 1)."""
    data = tmp / "clicks.csv"
    rng = random.Random(0)
    rows = [f"u{u},i{rng.randrange(200)}" for u in range(400) for _ in range(12)]
    data.write_text("user,item\n" + "\n".join(rows) + "\n")
    model_dir = tmp / "models"
    common = ["--data", str(data), "--epochs", "3", "--quiet"]
    subprocess.run([*MULTVAE, "train", *common, "--out", str(model_dir)], check=True,
                   capture_output=True)  # fmt: skip
    retrain = [*MULTVAE, "retrain", *common, "--model-dir", str(model_dir), "--keep", "1",
               "--force"]  # fmt: skip
    tic = time.monotonic()
    subprocess.run(retrain, check=True, capture_output=True)
    full_s = time.monotonic() - tic
    outcomes = []
    for tenth in range(1, 10):
        before = set(list_versions(model_dir))
        proc = subprocess.Popen(retrain, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            code = proc.wait(timeout=full_s * tenth / 10)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = proc.wait()
        current = current_version(model_dir)
        previous = previous_version(model_dir)
        outcomes.append({
            "killed_at_s": round(full_s * tenth / 10, 2),
            "exit": code,
            "new_versions": len(set(list_versions(model_dir)) - before),
            "current_loads": current is not None and bool(load_version(model_dir, current)),
            "previous_kept": previous is None or previous in list_versions(model_dir),
        })  # fmt: skip
    return {
        "scenario": "retrain",
        "full_run_s": round(full_s, 2),
        "outcomes": outcomes,
        "expected": all(o["current_loads"] and o["previous_kept"] for o in outcomes),
    }


def _latencies_ms(
    client: httpx.Client, path: str, n: int, json: dict[str, Any] | None = None
) -> dict[str, float]:
    """p50 and max of ``n`` sequential requests (a POST of ``json`` when given), in ms."""
    times = []
    for _ in range(n):
        tic = time.perf_counter()
        response = client.get(path) if json is None else client.post(path, json=json)
        times.append((time.perf_counter() - tic) * 1000)
        assert response.status_code == 200, response.text
    times.sort()
    return {"p50": round(times[n // 2], 2), "max": round(times[-1], 2)}


def edge(args: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """/healthz while 1 MB headers arrive and while 250 slowloris clients hold connections;
    cache-hit latency while 4 clients scrape /metrics in a loop."""
    server = _server(tmp)
    out: dict[str, Any] = {"scenario": "edge"}
    client = server.http
    hit = {"items": ITEM_IDS[:3], "n": 20}
    try:
        out["healthz_idle_ms"] = _latencies_ms(client, "/healthz", 50)
        stop = threading.Event()
        answers: Counter[str] = Counter()

        def big_headers() -> None:
            head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Big: " + b"a" * 1_000_000 + b"\r\n\r\n"
            while not stop.is_set():
                answers[str(status_of(exchange(server, head)))] += 1

        sender = threading.Thread(target=big_headers)
        sender.start()
        out["healthz_during_1mb_headers_ms"] = _latencies_ms(client, "/healthz", 50)
        stop.set()
        sender.join()
        out["1mb_header_answers"] = dict(answers)
        held = []
        for _ in range(250):
            sock = server.connect()
            sock.sendall(b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: ")
            held.append(sock)
        out["healthz_with_250_slowloris_ms"] = _latencies_ms(client, "/healthz", 50)
        for sock in held:
            sock.close()
        client.post("/recommend", json=hit)  # now cached
        out["hit_idle_ms"] = _latencies_ms(client, "/recommend", 100, json=hit)
        stop.clear()

        def scrape() -> None:
            with httpx.Client(base_url=server.url, headers={"X-API-Key": KEY}) as c:
                while not stop.is_set():
                    c.get("/metrics")

        scrapers = [threading.Thread(target=scrape) for _ in range(4)]
        for t in scrapers:
            t.start()
        out["hit_with_4_metrics_scrapers_ms"] = _latencies_ms(client, "/recommend", 100, json=hit)
        stop.set()
        for t in scrapers:
            t.join()
        out["metrics_bytes"] = len(client.get("/metrics").content)
    finally:
        out["exit_code"] = server.stop()
    out["traceback_in_log"] = "Traceback" in server.output()
    out["expected"] = (
        out["healthz_during_1mb_headers_ms"]["max"] < 50
        and out["healthz_with_250_slowloris_ms"]["max"] < 50
    )
    return out


SCENARIOS = {
    "edge": edge,
    "soak": soak,
    "redis": redis_fault,
    "swap": swap,
    "sigterm": sigterm,
    "retrain": retrain_kill,
}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--rate", type=float, default=40.0, help="requests/s (default 40)")
    parser.add_argument("--seconds", type=float, default=20.0, help="load duration")
    parser.add_argument("--warmup-s", type=float, default=60.0, help="soak: RSS baseline at")
    parser.add_argument("--kill-at", type=float, default=5.0, help="redis: SIGKILL at (s)")
    parser.add_argument("--down-s", type=float, default=3.0, help="redis: restart after (s)")
    parser.add_argument("--swaps", type=int, default=3, help="swap: versions promoted")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="multvae-chaos-") as tmp:
        result = SCENARIOS[args.scenario](args, Path(tmp))
    print(json.dumps(result, indent=2))
    return 0 if result["expected"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
