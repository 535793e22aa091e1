"""README.md's quick-start block, run line by line as written.

What differs from a user's machine, and only that: ``multvae data download`` fetches from a
local mirror (``MULTVAE_DATA_BASE_URL``) serving a small ml-latest-small.zip of the real
layout, whose digest stands in for GroupLens's; the server listens on a free port instead of
8000 and Redis is a private redis-server instead of port 6379 (the two port numbers are
replaced in the lines that name them). ``multvae`` lines run in this process through the
console script's ``main``, a line ending in ``&`` as a real ``multvae serve`` process, any
other line (curl) as a process of its own.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import time
import zipfile
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from service_support import RedisServer, free_port

from multvae_cli import main
from training import download

README = Path(__file__).resolve().parents[2] / "README.md"
STARTUP_S = 90  # importing torch on a loaded 2-core machine can take a while
LIKED = ["50", "172"]  # the ids the quick start asks about
OTHERS = [str(2000 + i) for i in range(58)]


def quickstart_lines() -> list[str]:
    section = README.read_text().split("\n## Quick start\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.DOTALL)[0]
    return [line for line in block.splitlines() if line.strip()]


def ml_latest_small_zip() -> bytes:
    """ratings.csv and movies.csv as GroupLens lays them out: three clusters of 20 movies,
    50 and 172 in the first; 300 users who rate 8-14 movies of their cluster 4 or 5 stars."""
    rng = np.random.default_rng(0)
    movies = LIKED + OTHERS
    ratings = ["userId,movieId,rating,timestamp"]
    for user in range(1, 301):
        cluster = movies[(user % 3) * 20 : (user % 3) * 20 + 20]
        for movie in rng.choice(cluster, size=rng.integers(8, 15), replace=False):
            ratings.append(f"{user},{movie},{rng.choice([4.0, 4.5, 5.0])},964982703")
    titles = ["movieId,title,genres"] + [f'{m},"Movie {m}, The (1995)",Drama' for m in movies]
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("ml-latest-small/ratings.csv", "\n".join(ratings) + "\n")
        zf.writestr("ml-latest-small/movies.csv", "\n".join(titles) + "\n")
    return buf.getvalue()


@pytest.fixture
def mirror(monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    archive = ml_latest_small_zip()
    name = download.DATASETS["ml-latest-small"].archive

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.rsplit("/", 1)[-1] != name:
                self.send_error(404)
                return
            self.send_response(200)
            self.send_header("Content-Length", str(len(archive)))
            self.end_headers()
            self.wfile.write(archive)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    fixture = dataclasses.replace(
        download.DATASETS["ml-latest-small"],
        sha256=hashlib.sha256(archive).hexdigest(),
        size=len(archive),
    )
    monkeypatch.setitem(download.DATASETS, "ml-latest-small", fixture)
    monkeypatch.setenv(download.BASE_URL_ENV, f"http://127.0.0.1:{server.server_address[1]}")
    try:
        yield name
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def _wait_ready(proc: subprocess.Popen[bytes], port: int, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=5).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise AssertionError(f"server not ready after {STARTUP_S} s:\n{log.read_text()}")


@pytest.mark.slow
def test_every_quickstart_line_runs_as_written(
    mirror: str,
    redis_server: RedisServer,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    lines = quickstart_lines()
    assert lines[0].startswith("multvae data download")
    monkeypatch.chdir(tmp_path)
    port = free_port()
    ports = {
        "localhost:8000": f"localhost:{port}",
        "localhost:6379": f"localhost:{redis_server.port}",
    }
    server: subprocess.Popen[bytes] | None = None
    log = tmp_path / "serve.log"
    outputs: dict[str, str] = {}
    threads = torch.get_num_threads()
    # One thread for the in-process commands: on a busy 2-core box the thread pool's spinning
    # makes training on tiny matrices many times slower (the server keeps its own default).
    torch.set_num_threads(1)
    try:
        for line in lines:
            for old, new in ports.items():
                line = line.replace(old, new)
            argv = shlex.split(line, comments=True)
            if argv[-1] == "&":
                assert argv[:2] == ["multvae", "serve"], line
                with log.open("wb") as out:
                    server = subprocess.Popen(
                        [sys.executable, "-m", "multvae_cli", *argv[1:-1], "--port", str(port)],
                        stdout=out, stderr=subprocess.STDOUT, env={**os.environ},
                    )  # fmt: skip
                _wait_ready(server, port, log)
            elif argv[0] == "multvae":
                assert main(argv[1:]) == 0, line
                outputs[argv[1]] = capsys.readouterr().out
            else:
                done = subprocess.run(argv, capture_output=True, check=False, timeout=60)
                assert done.returncode == 0, (line, done.stderr)
                outputs[argv[0]] = done.stdout.decode()
    finally:
        torch.set_num_threads(threads)
        if server is not None:
            server.terminate()
            server.wait(timeout=30)

    assert "ml-latest-small" in outputs["data"]
    assert "(CURRENT)" in outputs["train"]
    for command in ("recommend", "similar"):
        rows = outputs[command].splitlines()
        assert len(rows) == 5, outputs[command]
        assert all(
            re.fullmatch(r"\s+\d  \d+  -?\d+\.\d{4}  Movie \d+, The \(1995\)", r) for r in rows
        )
    answer = json.loads(outputs["curl"])
    assert len(answer["items"]) == 5
    assert not {r["item"] for r in answer["items"]} & set(LIKED)
    assert all(r["title"] == f"Movie {r['item']}, The (1995)" for r in answer["items"])
    # the history's own cluster first: the model learnt something from the download
    assert {r["item"] for r in answer["items"]} <= set(OTHERS[:18])
    assert "redis" in log.read_text()
