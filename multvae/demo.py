"""``multvae demo``: generate data, train, serve, answer one request, the whole path in a minute.

It drives the other subcommands as child processes (``multvae generate``, ``multvae train``,
``multvae serve``) exactly as a user would type them, so it imports neither half.
"""

from __future__ import annotations

import argparse
import csv
import json
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
    return [sys.executable, "-m", "multvae.cli", *args]


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


def run(args: argparse.Namespace) -> int:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="multvae-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    data, models = work / "ratings.csv", work / "models"
    print(f"[demo] working in {work}", flush=True)
    subprocess.run(_multvae("generate", "--shape", "small", "--out", str(data)), check=True)
    subprocess.run(
        _multvae(
            "train",
            "--data",
            str(data),
            "--out",
            str(models),
            "--quiet",
            "--epochs",
            str(args.epochs),
            "--device",
            "cpu",
        ),
        check=True,
    )
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        _multvae("serve", "--model-dir", str(models), "--port", str(port), "--device", "cpu")
    )
    try:
        _wait_ready(base, server)
        history = _a_user_history(data)
        body = {"items": history, "n": 10}
        print(f"[demo] POST {base}/recommend {json.dumps(body)}", flush=True)
        print(json.dumps(_request(f"{base}/recommend", body), indent=2), flush=True)
        if args.keep_serving:
            print(f"[demo] serving on {base} (Ctrl-C to stop)", flush=True)
            server.wait()
    except KeyboardInterrupt:
        pass
    finally:
        server.terminate()
        server.wait(timeout=30)
    return 0


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "demo", help="generate data, train, serve and answer one request (about a minute)"
    )
    p.add_argument("--workdir", help="where data and models go (default: a new temp dir)")
    p.add_argument("--epochs", type=int, default=30, help="training epochs (default 30)")
    p.add_argument("--keep-serving", action="store_true", help="keep the server running")
    p.set_defaults(func=run)
