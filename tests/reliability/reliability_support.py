"""A real `multvae serve` process on a small model, and raw sockets to speak to it.

Shared by tests/reliability and bench/chaos.py: hostile inputs are sent over TCP exactly as
written (no HTTP client normalises them), and the server's own log is kept for the checks.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import BinaryIO

import httpx
import numpy as np
import torch

from multvae.artifacts import write_version
from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE

N_ITEMS = 300
ITEM_IDS = [str(5000 + i) for i in range(N_ITEMS)]
KEY = "reliability-key"
STARTUP_S = 120  # importing torch on a loaded 2-core machine can take a while
MULTVAE = [sys.executable, "-m", "multvae_cli"]


def write_model(model_dir: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = MultVAE(ModelConfig(p_dims=(16, 64, N_ITEMS)))
    items = ItemIndex.build(ITEM_IDS, np.arange(N_ITEMS)[::-1])
    return write_version(model_dir, model, items, {"test": {"ndcg@100": 0.1}})


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    """`multvae serve` as a child process; always stopped, its log kept."""

    def __init__(self, model_dir: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.port = free_port()
        self.log = log
        self._out = log.open("wb")
        argv = [*MULTVAE, "serve", "--model-dir", str(model_dir), "--port", str(self.port),
                "--device", os.environ.get("MULTVAE_TEST_DEVICE", "cpu")]  # fmt: skip
        settings = {"MULTVAE_RELOAD_INTERVAL_S": "0", "MULTVAE_API_KEY": KEY, **(env or {})}
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **settings}, stdout=self._out, stderr=subprocess.STDOUT
        )
        self.url = f"http://127.0.0.1:{self.port}"
        self.http = httpx.Client(base_url=self.url, timeout=30, headers={"X-API-Key": KEY})

    def wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited with {self.proc.returncode}:\n{self.output()}")
            try:
                if self.http.get("/readyz").status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)  # polling a starting process: nothing to wait on but the port
        raise AssertionError(f"server not ready after {STARTUP_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout: float = 30) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._out.close()
        return int(self.proc.returncode)

    def connect(self) -> socket.socket:
        return socket.create_connection(("127.0.0.1", self.port), timeout=30)


def status_of(raw: bytes) -> int | None:
    """The status code of a raw HTTP response, None when the server sent nothing."""
    if not raw.startswith(b"HTTP/1."):
        return None
    return int(raw.split(b" ", 2)[1])


def exchange(server: Server, request: bytes, timeout: float = 30) -> bytes:
    """Send ``request`` as is and read one response (or nothing, if the server closes)."""
    with server.connect() as sock:
        sock.settimeout(timeout)
        with contextlib.suppress(OSError):  # it may close early (a 400 to an oversized head)
            sock.sendall(request)
        return read_response(sock.makefile("rb"))


def read_response(stream: BinaryIO) -> bytes:
    """One response's bytes from a buffered stream of a connection: the head, then its
    Content-Length of body; b"" when the server closed (or reset) the connection first."""
    try:
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            line = stream.readline()
            if not line:
                return head
            head += line
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.split(b"\r\n")[1:]
                if line.lower().startswith(b"content-length:")
            ),
            0,
        )
        return head + stream.read(length)
    except ConnectionResetError:
        return b""
