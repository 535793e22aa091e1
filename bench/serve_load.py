"""HTTP load benchmark of ``multvae serve`` on an ML-20M-shaped model, against a trivial
FastAPI endpoint served the same way on the same machine in the same run (the HTTP ceiling).

    python bench/serve_load.py                         # the whole matrix, ~5 minutes
    python bench/serve_load.py --duration 3 --concurrency 1 32

What it runs, each server as its own uvicorn process and every load cell as a separate
load-generator process (so the client never shares the server's event loop):

* ``trivial``: ``POST /recommend`` that reads the body and returns a constant; same uvicorn
  (uvloop + httptools, and the one-write-per-response protocol of ``multvae serve``), no
  middleware, no model. The ceiling for any endpoint here.
* ``service``: ``multvae serve`` with micro-batching on (``--batch-wait-ms``) and off (0),
  each with cache-miss load (every history unique) and cache-hit load (a warmed pool).

The model is randomly initialised with the paper's ML-20M architecture [20108 -> 600 -> 200
-> 600 -> 20108]; latency does not depend on the weights' values. Histories are 10..100 item
ids (strings) drawn uniformly, n = 20. The load generator is a closed loop of C keep-alive
HTTP/1.1 connections written on raw asyncio streams (an HTTP client library would cost more
CPU than the server under test); it reports latency from write to the end of the body.
"server CPU µs/req" is the server process's user + system CPU time per request (from
/proc): unlike req/s and latency it stays comparable when other processes load the machine.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

N_ITEMS = 20_108
HOST = "127.0.0.1"


# -- the trivial ceiling server ---------------------------------------------------------------


def trivial_server(port: int) -> None:
    import uvicorn
    from fastapi import FastAPI
    from starlette.requests import Request
    from starlette.responses import Response

    app = FastAPI()
    constant = b'{"items":[],"ok":true}'

    async def recommend(request: Request) -> Response:
        await request.body()
        return Response(constant, media_type="application/json")

    async def readyz(request: Request) -> Response:
        return Response(b'{"status":"ready"}', media_type="application/json")

    # Annotations are strings here (future import) and the names are local, so register the
    # endpoints with their Request parameter explicitly rather than by type-hint lookup.
    recommend.__annotations__ = {"request": Request, "return": Response}
    readyz.__annotations__ = {"request": Request, "return": Response}
    app.add_api_route("/recommend", recommend, methods=["POST"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    uvicorn.run(app, host=HOST, port=port, log_level="warning", access_log=False)


# -- the load generator -----------------------------------------------------------------------


def _bodies(mode: str, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    ids = [f'"{i}"'.encode() for i in range(N_ITEMS)]

    def body() -> bytes:
        history = rng.sample(ids, rng.randint(10, 100))
        return b'{"items":[' + b",".join(history) + b'],"n":20}'

    if mode == "hit":
        return [body() for _ in range(256)]  # a pool, warmed before timing
    return [body() for _ in range(count)]


async def _exchange(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: bytes, body: bytes
) -> tuple[int, bytes]:
    writer.write(
        b"POST %s HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (path, len(body), body)
    )
    status = int((await reader.readline()).split(b" ", 2)[1])
    length = 0
    while True:
        line = await reader.readline()
        if line in (b"\r\n", b""):
            break
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    return status, await reader.readexactly(length)


async def _load(args: argparse.Namespace) -> dict[str, Any]:
    path = args.path.encode()
    needed = int(args.max_rps * (args.duration + args.warmup))
    bodies = _bodies(args.mode, needed, args.seed)
    if args.prewarm_only:  # put every pooled history in the cache, then stop
        reader, writer = await asyncio.open_connection(HOST, args.port)
        for body in bodies:
            await _exchange(reader, writer, path, body)
        writer.close()
        return {"prewarmed": len(bodies)}
    start = time.perf_counter()
    measure_from, stop_at = start + args.warmup, start + args.warmup + args.duration
    latencies: list[float] = []
    failures = 0
    cached = 0
    cursor = 0
    total = 0

    async def connection() -> None:
        nonlocal failures, cached, cursor, total
        reader, writer = await asyncio.open_connection(HOST, args.port)
        while (now := time.perf_counter()) < stop_at:
            body = bodies[cursor % len(bodies)]
            cursor += 1
            status, data = await _exchange(reader, writer, path, body)
            done = time.perf_counter()
            total += 1
            if now >= measure_from:
                latencies.append(done - now)
                failures += status != 200
                cached += b'"cached":true' in data
        writer.close()

    await asyncio.gather(*(connection() for _ in range(args.concurrency)))
    latencies.sort()
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {
        "requests": len(latencies),
        "total_requests": total,  # warm-up included, for CPU per request
        "rps": len(latencies) / args.duration,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "failures": failures,
        "cached_share": cached / max(1, len(latencies)),
        "wrapped": args.mode == "miss" and cursor > len(bodies),  # a miss run must never repeat
    }


def client(args: argparse.Namespace) -> None:
    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_load(args))))


# -- orchestration ----------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _write_model(model_dir: Path) -> str:
    import numpy as np
    import torch

    from multvae.artifacts import write_version
    from multvae.items import ItemIndex
    from multvae.model import ModelConfig, MultVAE

    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", N_ITEMS))  # [I -> 600 -> 200 -> 600 -> I]
    popularity = np.random.default_rng(0).zipf(1.5, N_ITEMS).clip(max=100_000)
    items = ItemIndex.build([str(i) for i in range(N_ITEMS)], popularity)
    return write_version(model_dir, model, items, {"note": "random weights, bench only"})


class Server:
    def __init__(self, name: str, argv: list[str], env: dict[str, str], log: Path) -> None:
        self.name = name
        self.port = int(argv[argv.index("--port") + 1])
        self.log = log.open("wb")
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self.log, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{name} exited with {self.proc.returncode}; see {log}")
            try:
                with urllib.request.urlopen(f"http://{HOST}:{self.port}/readyz", timeout=2):
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{name} not ready after 120 s; see {log}")

    def batch_stats(self) -> tuple[float, float]:
        """(passes, rows) so far, from the service's own histogram."""
        try:
            with urllib.request.urlopen(f"http://{HOST}:{self.port}/metrics", timeout=5) as r:
                text = r.read().decode()
        except OSError:
            return 0.0, 0.0
        values = dict(
            line.rsplit(" ", 1)
            for line in text.splitlines()
            if line.startswith("multvae_batch_size_")
        )
        return float(values.get("multvae_batch_size_count", 0)), float(
            values.get("multvae_batch_size_sum", 0)
        )

    def cpu_seconds(self) -> float | None:
        """user + system CPU of the server process so far (Linux), robust to neighbours' load."""
        try:
            fields = Path(f"/proc/{self.proc.pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            return None
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


def _cell(
    server: Server, mode: str, concurrency: int, args: argparse.Namespace, seed: int
) -> dict[str, Any]:
    argv = [sys.executable, __file__, "client", "--port", str(server.port), "--mode", mode,
            "--concurrency", str(concurrency), "--duration", str(args.duration),
            "--warmup", str(args.warmup), "--seed", str(seed)]  # fmt: skip
    if mode == "hit":
        subprocess.run([*argv, "--prewarm-only"], check=True, capture_output=True)
    before, cpu_before = server.batch_stats(), server.cpu_seconds()
    out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
    result: dict[str, Any] = json.loads(out)
    after, cpu_after = server.batch_stats(), server.cpu_seconds()
    passes = after[0] - before[0]
    result["mean_batch"] = (after[1] - before[1]) / passes if passes else None
    result["cpu_us"] = (
        (cpu_after - cpu_before) * 1e6 / result["total_requests"]
        if cpu_before is not None and cpu_after is not None and result["total_requests"]
        else None
    )
    return result


def _machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs (nproc), {model}, load average {load[0]:.2f}/{load[1]:.2f}"


def run(args: argparse.Namespace) -> None:
    print(f"machine: {_machine()}", flush=True)
    print(f"command: {' '.join(sys.argv)}", flush=True)
    work = Path(tempfile.mkdtemp(prefix="serve-load-"))
    model_dir = work / "models"
    tic = time.perf_counter()
    version = _write_model(model_dir)
    print(
        f"model {version}: ML-20M shape, written in {time.perf_counter() - tic:.1f} s", flush=True
    )
    multvae = str(Path(sys.executable).with_name("multvae"))
    configs: list[tuple[str, list[str], dict[str, str], list[str]]] = [
        ("trivial FastAPI endpoint", [sys.executable, __file__, "trivial", "--port"], {}, ["miss"]),
    ]
    env = {"MULTVAE_RELOAD_INTERVAL_S": "0"}
    if args.torch_threads:
        env["MULTVAE_TORCH_THREADS"] = str(args.torch_threads)
    if args.redis_url:
        env["MULTVAE_REDIS_URL"] = args.redis_url
    where = "" if args.device == "cpu" else f" on {args.device}"
    on = f"service{where}, batching on ({args.batch_wait_ms} ms, max {args.batch_max_size})"
    for label, wait in ((on, args.batch_wait_ms), (f"service{where}, batching off", 0.0)):
        argv = [multvae, "serve", "--model-dir", str(model_dir), "--device", args.device,
                "--batch-wait-ms", str(wait), "--batch-max-size", str(args.batch_max_size),
                "--log-level", "info", "--port"]  # fmt: skip
        configs.append((label, argv, env, ["miss", "hit"]))
    rows: list[dict[str, Any]] = []
    seed = 1
    for label, argv, cfg_env, modes in configs:
        server = Server(
            label, [*argv, str(_free_port())], cfg_env, work / f"server-{len(rows)}.log"
        )
        try:
            # Unrecorded load first: the first few hundred requests after startup pay for lazy
            # initialisation that would otherwise land in the first cell's figures.
            seed += 1
            _cell(server, "miss", 8, argparse.Namespace(duration=2.0, warmup=0.0), seed)
            for mode in modes:
                for concurrency in args.concurrency:
                    seed += 1
                    result = _cell(server, mode, concurrency, args, seed)
                    row = {"server": label, "load": "-" if label.startswith("trivial") else
                           f"cache {mode}", "c": concurrency, **result}  # fmt: skip
                    rows.append(row)
                    print(_format_row(row), flush=True)
        finally:
            server.stop()
    print()
    print(f"machine: {_machine()}")
    print(_table(rows))
    print(f"\nserver logs in {work}")


def _format_row(row: dict[str, Any]) -> str:
    batch = f"{row['mean_batch']:.1f}" if row.get("mean_batch") else "-"
    cpu = f"{row['cpu_us']:.0f}" if row.get("cpu_us") else "-"
    # Only a service miss cell must never repeat a history (a repeat would be a cache hit).
    note = " WRAPPED" if row["wrapped"] and row["load"] == "cache miss" else ""
    return (
        f"| {row['server']} | {row['load']} | {row['c']} | {row['rps']:.0f} | "
        f"{row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {batch} | {cpu} | {row['failures']} | "
        f"{row['cached_share']:.0%}{note} |"
    )


def _table(rows: list[dict[str, Any]]) -> str:
    head = (
        "| server | load | concurrency | req/s | p50 ms | p99 ms | mean batch "
        "| server CPU µs/req | failed | cached |\n"
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"
    )
    return "\n".join([head, *(_format_row(r) for r in rows)])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = parser.add_subparsers(dest="command")
    p_run = sub.add_parser("run", help="the whole matrix (default)")
    for p in (parser, p_run):
        p.add_argument("--duration", type=float, default=6.0, help="measured seconds per cell")
        p.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds per cell")
        p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
        p.add_argument("--batch-wait-ms", type=float, default=2.0)
        p.add_argument("--batch-max-size", type=int, default=64)
        p.add_argument("--torch-threads", type=int, default=None)
        p.add_argument("--redis-url", default=None, help="cache in this Redis (default: LRU)")
        p.add_argument("--device", default="cpu", help="the service's device: cpu, cuda, cuda:N")
    p_trivial = sub.add_parser("trivial", help="serve the trivial endpoint")
    p_trivial.add_argument("--port", type=int, required=True)
    p_client = sub.add_parser("client", help="one load cell; prints JSON")
    p_client.add_argument("--port", type=int, required=True)
    p_client.add_argument("--path", default="/recommend")
    p_client.add_argument("--mode", choices=("miss", "hit"), required=True)
    p_client.add_argument("--concurrency", type=int, required=True)
    p_client.add_argument("--duration", type=float, required=True)
    p_client.add_argument("--warmup", type=float, required=True)
    p_client.add_argument("--seed", type=int, required=True)
    p_client.add_argument("--max-rps", type=float, default=5000.0, help="sizes the unique bodies")
    p_client.add_argument("--prewarm-only", action="store_true", help="fill the cache and exit")
    args = parser.parse_args()
    if args.command == "trivial":
        trivial_server(args.port)
    elif args.command == "client":
        client(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
