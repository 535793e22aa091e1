"""``multvae demo``: generate data, train, serve, answer one request, the whole path in a minute.

It drives the other subcommands as child processes (``multvae generate``, ``multvae train``,
``multvae serve``) exactly as a user would type them, so it imports neither half. Each step
is announced as it starts; the server's log goes to a file in the working directory, so the
answer printed is the service's JSON alone. A working directory the demo created itself is
removed at the end; one given with ``--workdir`` is kept.
"""

from __future__ import annotations

import argparse
import csv
import json
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any


def _multvae(*args: str) -> list[str]:
    return [sys.executable, "-m", "multvae_cli", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _request(url: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        result: dict[str, Any] = json.loads(resp.read())
        return result


def _wait_ready(base: str, server: subprocess.Popen[bytes], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"the server exited with code {server.returncode} before it was ready")
        try:
            _request(f"{base}/readyz")
            return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    raise SystemExit(f"the server was not ready after {timeout:.0f}s")


def _a_user_history(data: Path, max_items: int = 10) -> list[str]:
    """The first user's liked items (rating > 3.5) from the generated ratings file."""
    clicks: dict[str, list[str]] = {}
    with data.open() as fh:
        for row in csv.DictReader(fh):
            if float(row["rating"]) > 3.5:
                clicks.setdefault(row["userId"], []).append(row["movieId"])
            if len(clicks) > 50:
                break
    counts = Counter({user: len(items) for user, items in clicks.items()})
    user = counts.most_common(1)[0][0]
    return clicks[user][:max_items]


def _step(text: str) -> None:
    print(f"[demo] {text}", flush=True)


def run(args: argparse.Namespace) -> int:
    temporary = args.workdir is None
    work = Path(args.workdir or tempfile.mkdtemp(prefix="multvae-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    kept = "removed at the end" if temporary else "kept"
    _step(f"working in {work} ({kept})")
    try:
        return _demo(work, args)
    finally:
        if temporary:
            shutil.rmtree(work, ignore_errors=True)
            _step(f"removed {work} (pass --workdir DIR to keep the data, model and log)")


def _demo(work: Path, args: argparse.Namespace) -> int:
    data, models, log = work / "ratings.csv", work / "models", work / "serve.log"
    _step(f"1/4 generating synthetic ratings: multvae generate --shape small --out {data}")
    subprocess.run(_multvae("generate", "--shape", "small", "--out", str(data)), check=True)
    _step(f"2/4 training {args.epochs} epochs on the CPU: multvae train --out {models}")
    subprocess.run(
        _multvae(
            "train", "--data", str(data), "--out", str(models),
            "--epochs", str(args.epochs), "--device", "cpu",
        ),
        check=True,
    )  # fmt: skip
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    _step(f"3/4 starting the service on {base} (its log: {log})")
    with log.open("wb") as log_file:
        server = subprocess.Popen(
            _multvae("serve", "--model-dir", str(models), "--port", str(port), "--device", "cpu"),
            stdout=log_file,
            stderr=subprocess.STDOUT,
        )
        try:
            _wait_ready(base, server)
            history = _a_user_history(data)
            body = {"items": history, "n": 10}
            _step(f"4/4 POST {base}/recommend {json.dumps(body)}")
            print(json.dumps(_request(f"{base}/recommend", body), indent=2), flush=True)
            if args.keep_serving:
                _step(f"serving on {base} (Ctrl-C to stop)")
                server.wait()
        except KeyboardInterrupt:
            pass
        except SystemExit:
            print(log.read_text(errors="replace")[-4000:], file=sys.stderr)
            raise
        finally:
            server.terminate()
            server.wait(timeout=30)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="generate data, train, serve and answer one request (about a minute)"
    )
    p.add_argument(
        "--workdir",
        help="where data, models and the server log go, kept afterwards (default: a temporary "
        "directory, removed at the end)",
    )
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--keep-serving", action="store_true", help="keep the server running")
    p.set_defaults(func=run)
