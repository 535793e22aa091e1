"""Open-loop HTTP benchmark of ``multvae serve`` on an ML-20M-shaped model.

    python bench/serve_open_loop.py                          # the whole matrix
    python bench/serve_open_loop.py --workers 1 --modes miss --step-s 3
    python bench/serve_open_loop.py --source /tmp/old-tree --workers 1   # another checkout
    python bench/serve_open_loop.py --modes hit --rates 300 600   # fixed rates, no search

Requests are sent at a fixed arrival rate, whatever the server answers (an open loop: a slow
response never delays the next request, and latency counts from the request's scheduled time,
so queueing shows). The load generator is one process pinned with ``taskset`` to the last CPU
and every server to the other CPUs, when the machine has at least two. For each server:

* capacity: the highest arrival rate whose p99 stays under ``--p99-ms`` (50 ms) with no
  failed request, found by raising the rate by ``--growth`` until it fails, then bisecting;
* p50/p99, server CPU per request (``/proc``: user + system of the server and its worker
  processes; Redis is not counted) and the mean forward-pass size, at 50 % and 80 % of it.

Servers: ``multvae serve`` with 1 and 2 workers sharing a private ``redis-server`` (cache-miss
load: every history unique; cache-hit load: a warmed pool of 256 histories). The references,
measured in the same run:

* hits: a trivial FastAPI endpoint (reads the body, returns a constant) at the same rates,
  under ``plain`` uvicorn, started with no option as the issue's "plain uvicorn" reads: its
  default parser (httptools, which uvicorn[standard] installs) and its access line on, like
  the service's own access line; and ``bare``, the same without the access line. ``--trivial``
  adds ``h11`` and ``bare-h11`` (uvicorn ``--http h11``), ``--service-env
  MULTVAE_ACCESS_LOG=false`` takes the service's access line away (compare with ``bare``);
* misses: the same model's in-process batched fold-in (``Recommender.recommend_batch``), in
  CPU per history, in a process pinned like the servers with the torch threads each worker
  has, that lives as long as the server. Right after each reported step, while the server is
  idle, it is timed in ``--rounds`` short rounds (warm passes back to back, ``--repeat`` of
  them timed per size) at the mean pass size the workers formed in that step (every worker's
  batch-size histogram, read by scraping ``/metrics`` until each worker has answered; the
  cost of a pass is taken as linear between the integer sizes timed around the mean, see
  :func:`reference_us`); the step's reference is the median of its rounds (min and max are
  reported), so a neighbour's burst during one round does not move it.

The summary at the end gives, per load, the ratios the targets are about.

Histories are 10..100 item ids (strings) drawn uniformly, n = 20; the model has the paper's
ML-20M architecture [20108 -> 600 -> 200 -> 600 -> 20108] with random weights (latency does
not depend on their values).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import shutil
import signal
import socket
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
POOL = 256  # distinct histories of a cache-hit run
# An idle connection is reused only this long: below the servers' keep-alive timeout
# (uvicorn's 5 s default, MULTVAE_KEEP_ALIVE_S), after which they close it. Reusing one the
# server has closed fails at the connection level, which is the client's doing, not a refusal.
IDLE_REUSE_S = 4.0
ROOT = Path(__file__).resolve().parents[1]


# -- the trivial reference app (plain uvicorn: uvicorn serve_open_loop:trivial_app --factory) --


def trivial_app() -> Any:
    from fastapi import FastAPI, Request, Response

    app = FastAPI()
    constant = b'{"items":[],"ok":true}'

    async def recommend(request: Request) -> Response:
        await request.body()
        return Response(constant, media_type="application/json")

    async def readyz() -> dict[str, str]:
        return {"status": "ready"}

    recommend.__annotations__ = {"request": Request, "return": Response}
    readyz.__annotations__ = {"return": dict}
    app.add_api_route("/recommend", recommend, methods=["POST"])
    app.add_api_route("/readyz", readyz, methods=["GET"])
    return app


# -- the load generator (its own process) --------------------------------------------------------


def _bodies(mode: str, count: int, seed: int) -> list[bytes]:
    rng = random.Random(seed)
    ids = [b'"%d"' % i for i in range(N_ITEMS)]

    def body() -> bytes:
        history = rng.sample(ids, rng.randint(10, 100))
        return b'{"items":[' + b",".join(history) + b'],"n":20}'

    return [body() for _ in range(POOL if mode == "hit" else count)]


async def _exchange(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, body: bytes) -> int:
    writer.write(
        b"POST /recommend HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
    )
    line = await reader.readline()
    if not line:
        raise ConnectionResetError("the server closed the connection before answering")
    status = int(line.split(b" ", 2)[1])
    length = 0
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.partition(b":")
        if name.lower() == b"content-length":
            length = int(value)
    await reader.readexactly(length)
    return status


async def _open_loop(
    port: int, rate: float, duration: float, bodies: list[bytes]
) -> dict[str, Any]:
    """Send ``rate`` requests a second for ``duration`` seconds on keep-alive connections
    (the last one used that is idle, open and idle for less than ``IDLE_REUSE_S``, else a new
    one); latency from each request's scheduled time. Failures are counted by kind."""
    idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter, float]] = []
    latencies: list[float] = []
    kinds: dict[str, int] = {}
    tasks: set[asyncio.Task[None]] = set()
    opened = 0

    def reusable() -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        while idle:
            reader, writer, since = idle.pop()
            if not reader.at_eof() and time.perf_counter() - since < IDLE_REUSE_S:
                return reader, writer
            writer.close()
        return None

    async def one(body: bytes, scheduled: float) -> None:
        nonlocal opened
        kind = None
        try:
            conn = reusable()
            if conn is None:
                conn = await asyncio.open_connection(HOST, port)
                opened += 1
            status = await _exchange(*conn, body)
            idle.append((*conn, time.perf_counter()))
            if status != 200:
                kind = f"status {status}"
        except (OSError, EOFError) as exc:  # status 0: the connection failed
            kind = f"connection: {type(exc).__name__}"
        latencies.append(time.perf_counter() - scheduled)
        if kind is not None:
            kinds[kind] = kinds.get(kind, 0) + 1

    count = int(rate * duration)
    start = time.perf_counter() + 0.05
    for i in range(count):
        scheduled = start + i / rate
        delay = scheduled - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(one(bodies[i % len(bodies)], scheduled))
        tasks.add(task)
        task.add_done_callback(tasks.discard)
    late = max(0.0, time.perf_counter() - (start + (count - 1) / rate))
    if tasks:
        await asyncio.wait(tasks, timeout=60)
    for _, writer, _ in idle:
        writer.close()
    q = (
        statistics.quantiles(latencies, n=100, method="inclusive")
        if len(latencies) > 1
        else [0] * 99
    )
    return {
        "sent": count,
        "answered": len(latencies),
        "failures": sum(kinds.values()) + count - len(latencies),
        "failure_kinds": kinds,
        "p50_ms": q[49] * 1000,
        "p99_ms": q[98] * 1000,
        "connections": opened,
        "generator_late_s": late,  # > 0: the generator itself could not keep the rate
    }


def generator(args: argparse.Namespace) -> None:
    import uvloop

    # A hit run's pool is always the same 256 histories: the ones the prewarm cached.
    seed = 0 if args.mode == "hit" else args.seed
    bodies = _bodies(args.mode, int(args.rate * args.duration) + 1, seed)
    if args.prewarm:  # put the pool in the cache, one request at a time

        async def prewarm() -> dict[str, Any]:
            conn = await asyncio.open_connection(HOST, args.port)
            statuses = [await _exchange(*conn, body) for body in bodies]
            conn[1].close()
            return {"prewarmed": len(bodies), "failures": sum(s != 200 for s in statuses)}

        print(json.dumps(uvloop.run(prewarm())))
        return
    print(json.dumps(uvloop.run(_open_loop(args.port, args.rate, args.duration, bodies))))


# -- orchestration ------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _cpus() -> tuple[list[str], list[str]]:
    """(taskset prefix for servers, for the generator): the last CPU is the generator's."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2 or shutil.which("taskset") is None:
        return [], []
    server = ",".join(str(c) for c in cpus[:-1])
    return ["taskset", "-c", server], ["taskset", "-c", str(cpus[-1])]


def _tree_cpu_seconds(pid: int) -> tuple[float, float]:
    """user + system CPU of ``pid`` and its live children (uvicorn's worker processes): in all,
    and in their main threads (each process's event loop; the others are the inference
    thread and the pool that ``asyncio.to_thread`` uses)."""
    tick = os.sysconf("SC_CLK_TCK")
    total = loops = 0.0
    pids = [pid]
    with contextlib.suppress(OSError):
        pids += [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    for p in pids:
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{p}/task").iterdir():
                fields = (task / "stat").read_text().rsplit(")", 1)[1].split()
                seconds = (int(fields[11]) + int(fields[12])) / tick
                total += seconds
                loops += seconds if task.name == str(p) else 0.0
    return total, loops


def _get(port: int, path: str) -> str:
    with urllib.request.urlopen(f"http://{HOST}:{port}{path}", timeout=5) as response:
        return str(response.read().decode())


class Process:
    def __init__(
        self, argv: list[str], env: dict[str, str], log: Path, port: int | None, cwd: Path = ROOT
    ) -> None:
        self.port = port
        self.log_path = log
        self.log = log.open("wb")
        # cwd: `python -m` puts the working directory before PYTHONPATH on sys.path.
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env}, cwd=cwd, stdout=self.log, stderr=subprocess.STDOUT
        )
        if port is None:
            return
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise SystemExit(f"{argv[:4]} exited with {self.proc.returncode}; see {log}")
            try:
                _get(port, "/readyz")
                return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise SystemExit(f"{argv[:4]} not ready after 180 s; see {log}")

    def passes(self, workers: int) -> dict[str, tuple[float, float]]:
        """(passes, rows) so far of each worker's batch-size histogram, by worker.

        Each worker keeps its own metrics and a scrape reads whichever answers, so with
        several workers the scrape is repeated (a new connection each time) until every
        worker has answered once; a worker is told apart by the time its model loaded.
        """
        assert self.port is not None
        seen: dict[str, tuple[float, float]] = {}
        for _ in range(40 * workers):
            try:
                text = _get(self.port, "/metrics")
            except OSError:
                continue
            values = dict(
                line.rsplit(" ", 1) for line in text.splitlines() if line.startswith("multvae_")
            )
            worker = values.get("multvae_model_loaded_timestamp_seconds", "?")
            seen[worker] = (
                float(values.get("multvae_batch_size_count", 0)),
                float(values.get("multvae_batch_size_sum", 0)),
            )
            if len(seen) >= workers:
                break
        return seen

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.log.close()


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.server_cpus, self.generator_cpus = _cpus()
        self.seed = 0
        self.workers = 1  # of the server under test
        self.reference: Reference | None = None  # of the server under test, for misses

    def step(self, server: Process, mode: str, rate: float, duration: float) -> dict[str, Any]:
        assert server.port is not None
        self.seed += 1
        argv = [*self.generator_cpus, sys.executable, __file__, "generate", "--port",
                str(server.port), "--mode", mode, "--rate", str(rate), "--duration",
                str(duration), "--seed", str(self.seed)]  # fmt: skip
        # The mean pass size over every worker that answered a scrape before and after.
        counted = mode != "trivial"
        before = server.passes(self.workers) if counted else {}
        cpu, loops = _tree_cpu_seconds(server.proc.pid)
        out = subprocess.run(argv, check=True, capture_output=True, text=True).stdout
        result: dict[str, Any] = {"rate": rate, "mode": mode, **json.loads(out)}
        cpu_after, loops_after = _tree_cpu_seconds(server.proc.pid)
        result["cpu_us"] = (cpu_after - cpu) * 1e6 / result["sent"]
        result["loop_cpu_us"] = (loops_after - loops) * 1e6 / result["sent"]
        after = server.passes(self.workers) if counted else {}
        both = [w for w in after if w in before]
        passes = sum(after[w][0] - before[w][0] for w in both)
        rows = sum(after[w][1] - before[w][1] for w in both)
        result["mean_batch"] = rows / passes if passes else None
        result["workers_counted"] = len(both)
        return result

    def ok(self, result: dict[str, Any]) -> bool:
        return bool(
            result["failures"] == 0
            and result["p99_ms"] < self.args.p99_ms
            and result["generator_late_s"] < 0.05 * self.args.step_s
        )

    def capacity(
        self, server: Process, mode: str, start: float
    ) -> tuple[float, list[dict[str, Any]]]:
        """The highest rate (req/s) whose p99 stays under the target, and every step run."""
        steps: list[dict[str, Any]] = []
        good, bad, rate = 0.0, None, start

        def passes(rate: float) -> bool:
            # A failed step is run again once: on a shared machine one p99 can be a
            # neighbour's burst rather than this server's limit.
            for _ in range(2):
                result = self.step(server, mode, rate, self.args.step_s)
                steps.append(result)
                print(f"    {mode} {rate:8.1f} req/s: {_short(result)}", flush=True)
                if self.ok(result):
                    return True
            return False

        while bad is None and rate <= self.args.max_rate:
            if passes(rate):
                good, rate = rate, rate * self.args.growth
            else:
                bad = rate
        if bad is not None and good:
            for _ in range(self.args.bisect):
                rate = (good * bad) ** 0.5
                good, bad = (rate, bad) if passes(rate) else (good, rate)
        return good, steps

    def measured(self, server: Process, mode: str, rate: float) -> dict[str, Any]:
        """A step at one of the reported loads; for misses, right after it (the server idle),
        the in-process reference at the pass size that step formed, and the ratio."""
        result = self.step(server, mode, rate, self.args.measure_s)
        if mode == "miss" and self.reference is not None:
            reference = self.reference.measure(result["mean_batch"] or 1.0)
            result["in_process"] = reference
            result["ratio"] = result["cpu_us"] / reference["median_us"]
        return result

    def at_rates(self, server: Process, mode: str, rates: list[float]) -> list[dict[str, Any]]:
        rows = []
        for rate in rates:
            result = self.measured(server, mode, rate)
            rows.append(result)
            print(f"    {mode} at {rate:.0f} req/s: {_short(result)}", flush=True)
        return rows

    def at_loads(self, server: Process, mode: str, capacity: float) -> list[dict[str, Any]]:
        rows = []
        for share in (0.5, 0.8):
            result = self.measured(server, mode, capacity * share)
            result["share"] = share
            rows.append(result)
            print(f"    {mode} {share:.0%} of {capacity:.0f}: {_short(result)}", flush=True)
        return rows


def _kinds(r: dict[str, Any]) -> str:
    kinds = r.get("failure_kinds") or {}
    return f" ({', '.join(f'{n} {k}' for k, n in kinds.items())})" if kinds else ""


def _short(r: dict[str, Any]) -> str:
    batch = f", batch {r['mean_batch']:.2f}" if r.get("mean_batch") else ""
    ref = r.get("in_process")
    if ref:
        batch += (f"; in process {ref['median_us']:.0f} µs/history (rounds {ref['min_us']:.0f}-"
                  f"{ref['max_us']:.0f}), {r['ratio']:.2f}x")  # fmt: skip
    return (
        f"p50 {r['p50_ms']:.1f} ms, p99 {r['p99_ms']:.1f} ms, {r['cpu_us']:.0f} µs CPU/req, "
        f"{r['failures']} failed{_kinds(r)}, late {r['generator_late_s']:.2f} s{batch}"
    )


def _write_model(model_dir: Path) -> str:
    import numpy as np
    import torch

    from multvae.artifacts import write_version
    from multvae.items import ItemIndex
    from multvae.model import ModelConfig, MultVAE

    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", N_ITEMS))
    popularity = np.random.default_rng(0).zipf(1.5, N_ITEMS).clip(max=100_000)
    items = ItemIndex.build([str(i) for i in range(N_ITEMS)], popularity)
    return write_version(model_dir, model, items, {"note": "random weights, bench only"})


def in_process(args: argparse.Namespace) -> None:
    """Time ``recommend_batch`` in rounds: one JSON line on stdin, ``{"batch": [sizes]}``, is
    answered by one JSON line, CPU µs per history at each size: ``--warm`` passes, then
    ``--repeat`` passes timed, back to back. The first line out says the model is loaded."""
    import torch

    from multvae import recommend
    from multvae.artifacts import load_version

    torch.set_num_threads(args.threads)
    loaded = load_version(args.model_dir)
    rng = random.Random(7)
    # More histories than a pass holds (MULTVAE_BATCH_MAX_SIZE, 64 by default).
    histories = [rng.sample(range(N_ITEMS), rng.randint(10, 100)) for _ in range(256)]
    if hasattr(recommend, "Query"):  # ids in, (item, score) out
        recommender = recommend.Recommender(loaded.model, loaded.items, loaded.version)
        queries = [recommend.Query([str(c) for c in h], 20) for h in histories]

        def fold_in(k: int) -> object:
            return recommender.recommend_batch(queries[:k])
    else:  # an older checkout (--source): columns in, columns out
        import numpy as np

        old = recommend.Recommender(loaded.model, loaded.items)
        columns = [np.asarray(h, dtype=np.int64) for h in histories]

        def fold_in(k: int) -> object:
            return old.recommend_batch(columns[:k], [20] * k, [recommend.EMPTY] * k)

    print(json.dumps({"threads": args.threads}), flush=True)
    for line in sys.stdin:
        per_history = {}
        for k in json.loads(line)["batch"]:
            for _ in range(args.warm):
                fold_in(k)
            cpu = time.process_time()
            for _ in range(args.repeat):
                fold_in(k)
            per_history[k] = (time.process_time() - cpu) * 1e6 / (args.repeat * k)
        print(json.dumps(per_history), flush=True)


class Reference:
    """The in-process fold-in of one server's model, in its own process pinned like the
    server, with the torch threads each worker has; timed in rounds between the server's
    steps (while the server is idle)."""

    def __init__(self, argv: list[str], env: dict[str, str], rounds: int) -> None:
        self.rounds = rounds
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        self._read()  # the model is loaded

    def _read(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the in-process reference exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def measure(self, mean_pass: float) -> dict[str, Any]:
        """``rounds`` rounds at the integer pass sizes around ``mean_pass``, and the reference
        they give (:func:`reference_stats`)."""
        assert self.proc.stdin is not None
        sizes = pass_sizes(mean_pass)
        rounds = []
        for _ in range(self.rounds):
            self.proc.stdin.write(json.dumps({"batch": sizes}) + "\n")
            self.proc.stdin.flush()
            rounds.append({int(k): v for k, v in self._read().items()})
        return {"rounds": rounds, **reference_stats(rounds, mean_pass)}

    def stop(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def pass_sizes(mean_pass: float) -> list[int]:
    """The integer pass sizes around a mean pass size (at least one history)."""
    mean_pass = max(mean_pass, 1.0)
    return sorted({math.floor(mean_pass), math.ceil(mean_pass)})


def reference_us(per_history: dict[int, float], mean_pass: float) -> float:
    """In-process CPU per history at a mean pass size of ``mean_pass`` histories.

    A pass costs a fixed part (the output layer is read once per pass) plus a part per
    history, so the cost of a pass is taken as linear between the measured integer sizes
    around the mean; for a mix of pass sizes with that mean, the total cost over the total
    histories is then the cost of a pass of the mean size over the mean size.
    """
    sizes = sorted(per_history)
    mean_pass = min(max(mean_pass, sizes[0]), sizes[-1])
    low = max(k for k in sizes if k <= mean_pass)
    high = min(k for k in sizes if k >= mean_pass)
    cost_low, cost_high = low * per_history[low], high * per_history[high]
    share = 0.0 if high == low else (mean_pass - low) / (high - low)
    return (cost_low + share * (cost_high - cost_low)) / mean_pass


def reference_stats(rounds: list[dict[int, float]], mean_pass: float) -> dict[str, float]:
    """The reference of each round at ``mean_pass`` (:func:`reference_us`): their median (the
    reference), min and max."""
    each = [reference_us(r, mean_pass) for r in rounds]
    return {"median_us": statistics.median(each), "min_us": min(each), "max_us": max(each)}


def _machine() -> str:
    model = "unknown CPU"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    load = os.getloadavg()
    return f"{os.cpu_count()} CPUs, {model}, load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}"


# The trivial endpoint's servers: "plain" is the reference, uvicorn as it starts with no
# options (its default protocol, httptools where installed as by uvicorn[standard], and its
# access log on); "bare" is that without the access line (earlier sections' reference).
TRIVIAL = {
    "plain": [],
    "bare": ["--no-access-log", "--log-level", "warning"],
    "h11": ["--http", "h11"],
    "bare-h11": ["--http", "h11", "--no-access-log", "--log-level", "warning"],
}


def run(args: argparse.Namespace) -> None:
    bench = Bench(args)
    source = Path(args.source).resolve()
    print(f"machine: {_machine()}", flush=True)
    print(f"command: {' '.join(sys.argv)}", flush=True)
    print(f"servers on CPUs {bench.server_cpus[-1:] or 'all'}, generator on "
          f"{bench.generator_cpus[-1:] or 'all'}; source {source}", flush=True)  # fmt: skip
    work = Path(tempfile.mkdtemp(prefix="open-loop-"))
    model_dir = work / "models"
    print(f"model {_write_model(model_dir)} (ML-20M shape)", flush=True)
    redis_port = _free_port()
    redis = Process(
        [*bench.server_cpus, args.redis_server, "--port", str(redis_port), "--save", "",
         "--appendonly", "no", "--bind", HOST], {}, work / "redis.log", None,
    )  # fmt: skip
    time.sleep(0.5)  # redis-server binds within milliseconds; it answers no /readyz
    env = {"PYTHONPATH": str(source), "MULTVAE_RELOAD_INTERVAL_S": "0",
           "MULTVAE_REDIS_URL": f"redis://{HOST}:{redis_port}/0",
           "MULTVAE_MODEL_DIR": str(model_dir), "MULTVAE_DEVICE": "cpu",
           **dict(kv.split("=", 1) for kv in args.service_env)}  # fmt: skip
    threads = len(os.sched_getaffinity(0)) - (1 if bench.generator_cpus else 0)
    summary: dict[str, Any] = {"machine": _machine(), "source": str(source), "servers": {}}
    try:
        hit_rates: list[float] = []
        for workers in args.workers:
            port = _free_port()
            argv = [*bench.server_cpus, sys.executable, "-m", "multvae_cli", "serve",
                    "--model-dir", str(model_dir), "--device", "cpu",
                    "--port", str(port)]  # fmt: skip
            if args.service_http:  # the app under plain uvicorn, this protocol (an A/B of it)
                argv = [*bench.server_cpus, sys.executable, "-m", "uvicorn",
                        "service.app:create_app", "--factory", "--port", str(port),
                        "--http", args.service_http, "--log-level", "warning",
                        "--no-access-log", "--no-server-header"]  # fmt: skip
            argv += ["--workers", str(workers)] if workers > 1 else []
            label = f"service, {workers} worker{'s' * (workers > 1)}"
            print(f"{label}:", flush=True)
            server = Process(argv, env, work / f"service-{workers}.log", port, cwd=source)
            bench.workers = workers
            try:
                if "miss" in args.modes:  # the misses' reference, with each worker's threads
                    per_worker = max(1, threads // workers)
                    in_argv = [*bench.server_cpus, sys.executable, __file__, "in-process",
                               "--model-dir", str(model_dir), "--threads", str(per_worker),
                               "--repeat", str(args.repeat)]  # fmt: skip
                    env_in = {"PYTHONPATH": str(source)}
                    bench.reference = Reference(in_argv, env_in, args.rounds)
                bench.step(server, "miss", 20, 2.0)  # unrecorded: lazy initialisation
                entry: dict[str, Any] = {}
                for mode in args.modes:
                    if mode == "hit":
                        prewarm = [*bench.generator_cpus, sys.executable, __file__, "generate",
                                   "--port", str(port), "--mode", "hit", "--rate", "1",
                                   "--duration", "1", "--seed", "0", "--prewarm"]  # fmt: skip
                        subprocess.run(prewarm, check=True, capture_output=True)
                    start = args.start_miss if mode == "miss" else args.start_hit
                    if not args.rates:
                        capacity, steps = bench.capacity(server, mode, start)
                        loads = bench.at_loads(server, mode, capacity) if capacity else []
                    else:  # the same rates for every server, so CPU per request compares
                        capacity, steps = 0.0, []
                        loads = bench.at_rates(server, mode, args.rates)
                    entry[mode] = {"capacity": capacity, "loads": loads, "steps": steps}
                    if mode == "hit":
                        hit_rates += [r["rate"] for r in loads]
                summary["servers"][label] = entry
            finally:
                server.stop()
                if bench.reference is not None:
                    bench.reference.stop()
                    bench.reference = None
        if hit_rates:
            summary["trivial"] = {}
            for variant in args.trivial:
                options = TRIVIAL[variant]
                print(f"trivial FastAPI endpoint, uvicorn {' '.join(options) or '(no options)'}"
                      f" [{variant}]:", flush=True)  # fmt: skip
                port = _free_port()
                argv = [*bench.server_cpus, sys.executable, "-m", "uvicorn",
                        "serve_open_loop:trivial_app", "--factory",
                        "--app-dir", str(Path(__file__).parent), "--port", str(port),
                        *options]  # fmt: skip
                server = Process(argv, {}, work / f"trivial-{variant}.log", port)
                bench.workers = 1
                try:
                    bench.step(server, "trivial", 200, 1.0)
                    summary["trivial"][variant] = []
                    for rate in dict.fromkeys(hit_rates):  # each rate once
                        result = bench.step(server, "trivial", rate, args.measure_s)
                        summary["trivial"][variant].append(result)
                        print(f"    at {rate:.0f} req/s: {_short(result)}", flush=True)
                finally:
                    server.stop()
            trivial_us = {
                (variant, r["rate"]): r["cpu_us"]
                for variant, rows in summary["trivial"].items()
                for r in rows
            }
            for served in summary["servers"].values():
                for row in served.get("hit", {}).get("loads", []):
                    row["ratios"] = {
                        variant: row["cpu_us"] / trivial_us[variant, row["rate"]]
                        for variant in summary["trivial"]
                    }
    finally:
        redis.stop()
    _report(summary)
    results = Path(args.out) if args.out else work / "open_loop.json"
    results.write_text(json.dumps(summary, indent=2))
    print(f"\nfull results: {results}")


def _report(summary: dict[str, Any]) -> None:
    """The figures the targets are about, one line per measured load."""
    print(f"\nsummary ({_machine()}):")
    for label, entry in summary["servers"].items():
        for mode in ("miss", "hit"):
            if mode not in entry:
                continue
            capacity = entry[mode]["capacity"]
            at = f", capacity {capacity:.0f} req/s" if capacity else ""
            print(f"  {label}, {'misses' if mode == 'miss' else 'hits'}{at}")
            for row in entry[mode]["loads"]:
                share = f"{row['share']:.0%} = " if "share" in row else ""
                head = (f"    {share}{row['rate']:.0f}/s: p50 {row['p50_ms']:.1f} / p99 "
                        f"{row['p99_ms']:.1f} ms, {row['cpu_us']:.0f} µs CPU/req")  # fmt: skip
                if mode == "miss" and "ratio" in row:
                    other = row["cpu_us"] - row["loop_cpu_us"]
                    ref = row["in_process"]
                    print(f"{head} (event loops {row['loop_cpu_us']:.0f}, other threads "
                          f"{other:.0f}), mean pass {row['mean_batch'] or 0:.2f}, in process "
                          f"{ref['median_us']:.0f} µs/history (rounds {ref['min_us']:.0f}-"
                          f"{ref['max_us']:.0f}): {row['ratio']:.2f}x "
                          "(target <= 1.5x)")  # fmt: skip
                elif mode == "hit" and "ratios" in row:
                    ratios = ", ".join(f"{v:.2f}x {k}" for k, v in row["ratios"].items())
                    print(f"{head}: {ratios} (target <= 2.5x plain)")
                else:
                    print(head)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command")
    g = sub.add_parser("generate")
    g.add_argument("--port", type=int, required=True)
    g.add_argument("--mode", choices=("miss", "hit", "trivial"), required=True)
    g.add_argument("--rate", type=float, required=True)
    g.add_argument("--duration", type=float, required=True)
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--prewarm", action="store_true")
    p = sub.add_parser("in-process")
    p.add_argument("--model-dir", type=Path, required=True)
    p.add_argument("--threads", type=int, required=True)
    p.add_argument("--warm", type=int, default=3)
    p.add_argument("--repeat", type=int, default=10)
    parser.add_argument("--source", default=str(ROOT),
                        help="the checkout whose service runs (PYTHONPATH)")  # fmt: skip
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--modes", nargs="+", default=["miss", "hit"], choices=("miss", "hit"))
    parser.add_argument("--p99-ms", type=float, default=50.0)
    parser.add_argument("--start-miss", type=float, default=20.0)
    parser.add_argument("--start-hit", type=float, default=200.0)
    parser.add_argument(
        "--rates",
        type=float,
        nargs="+",
        help="measure at these rates (req/s) instead of searching the capacity",
    )
    parser.add_argument("--growth", type=float, default=1.5)
    parser.add_argument("--bisect", type=int, default=2)
    parser.add_argument("--max-rate", type=float, default=20_000.0)
    parser.add_argument("--step-s", type=float, default=4.0)
    parser.add_argument("--measure-s", type=float, default=8.0)
    parser.add_argument(
        "--rounds",
        type=int,
        default=7,
        help="rounds of the in-process reference after each reported miss step (the median "
        "is the reference)",
    )
    parser.add_argument(
        "--repeat", type=int, default=10, help="timed passes per pass size in a round"
    )
    parser.add_argument(
        "--trivial",
        nargs="+",
        choices=list(TRIVIAL),
        default=["plain", "bare"],
        help="the trivial endpoint's servers: plain = uvicorn with no options (the issue's "
        "reference: httptools, access log on), bare = without the access log, h11 and "
        "bare-h11 = the same under h11",
    )
    parser.add_argument(
        "--service-env",
        nargs="+",
        default=[],
        metavar="NAME=VALUE",
        help="extra environment for the service, e.g. MULTVAE_HTTP=httptools",
    )
    parser.add_argument(
        "--service-http",
        choices=["h11", "httptools"],
        default=None,
        help="start the service as `uvicorn service.app:create_app --factory --http X` "
        "instead of `multvae serve` (h11 unless --service-env MULTVAE_HTTP=httptools); works "
        "for checkouts older than that setting too",
    )
    parser.add_argument("--redis-server", default=shutil.which("redis-server") or "redis-server")
    parser.add_argument("--out", help="JSON results (default: in the run's temporary directory)")
    args = parser.parse_args()
    if args.command == "generate":
        generator(args)
    elif args.command == "in-process":
        in_process(args)
    else:
        run(args)


if __name__ == "__main__":
    main()
