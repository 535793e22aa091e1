"""Helpers of the service tests: a small trained model whose right answers are known.

Four clusters of users each click mostly inside their own block of 25 items out of 100, so a
trained model must recommend a user's own block. Item ids are ``"1000"``..``"1099"``, never
equal to their columns, so a test catches a column leaking out where an id belongs.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from fastapi.testclient import TestClient

from multvae.items import ItemIndex
from multvae.model import MultVAE
from multvae.recommend import Recommender
from service.settings import Settings
from training.dataset import HeldOut, Split
from training.train import TrainConfig, train

N_ITEMS = 100
N_CLUSTERS = 4
BLOCK = N_ITEMS // N_CLUSTERS
IDS = [str(1000 + c) for c in range(N_ITEMS)]


def cluster_of(column: int) -> int:
    return column // BLOCK


def _users(n: int, rng: np.random.Generator, offset: int) -> tuple[sp.csr_matrix, list[int]]:
    rows, cols, clusters = [], [], []
    for u in range(n):
        c = (u + offset) % N_CLUSTERS
        own = rng.choice(BLOCK, size=rng.integers(8, 14), replace=False) + c * BLOCK
        noise = rng.choice(N_ITEMS, size=1)
        items = np.unique(np.concatenate([own, noise]))
        rows += [u] * len(items)
        cols += items.tolist()
        clusters.append(c)
    x = sp.csr_matrix((np.ones(len(rows), dtype=np.float32), (rows, cols)), shape=(n, N_ITEMS))
    return x, clusters


def _held_out(x: sp.csr_matrix, rng: np.random.Generator) -> HeldOut:
    fold, target = sp.lil_matrix(x.shape, dtype=np.float32), sp.lil_matrix(x.shape)
    for u in range(x.shape[0]):
        items = x.indices[x.indptr[u] : x.indptr[u + 1]]
        held = rng.choice(items, size=max(1, len(items) // 5), replace=False)
        for i in items:
            (target if i in held else fold)[u, i] = 1.0
    return HeldOut(sp.csr_matrix(fold), sp.csr_matrix(target), np.arange(x.shape[0]))


def build_split(seed: int = 0) -> Split:
    rng = np.random.default_rng(seed)
    train_x, _ = _users(400, rng, 0)
    val_x, _ = _users(40, rng, 1)
    test_x, _ = _users(40, rng, 2)
    popularity = np.asarray(train_x.sum(axis=0)).ravel().astype(np.int64)
    return Split(
        train=train_x,
        validation=_held_out(val_x, rng),
        test=_held_out(test_x, rng),
        items=ItemIndex.build(IDS, popularity),
        seed=seed,
    )


@dataclass(frozen=True)
class Trained:
    split: Split
    model: MultVAE
    version: str
    model_dir: Path  # pristine; tests that write versions copy it first

    @property
    def items(self) -> ItemIndex:
        return self.split.items

    def recommender(self) -> Recommender:
        return Recommender(self.model, self.items)


def train_model(seed: int = 0, epochs: int = 30) -> tuple[Split, MultVAE]:
    split = build_split()
    config = TrainConfig(
        hidden_dims=(32,), latent_dim=8, batch_size=50, epochs=epochs, patience=None,
        device="cpu", seed=seed,
    )  # fmt: skip
    # One thread: tiny matrices gain nothing from more, and on a busy 2-core box the thread
    # pool's spinning makes training ten times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return split, train(split, config).model
    finally:
        torch.set_num_threads(threads)


# The service tests run on the CPU; MULTVAE_TEST_DEVICE=cuda runs them on a GPU machine.
TEST_DEVICE = os.environ.get("MULTVAE_TEST_DEVICE", "cpu")


def make_settings(model_dir: Path, **overrides: Any) -> Settings:
    fields: dict[str, Any] = {
        "model_dir": model_dir,
        "device": TEST_DEVICE,
        "reload_interval_s": 0,
        "batch_wait_ms": 2,
        # gc.freeze() and torch's thread count are process-wide: leave the test session's be.
        "gc_freeze": False,
        "torch_threads": torch.get_num_threads(),
    }
    fields.update(overrides)
    return Settings(**fields)


def metric_value(client: TestClient, name: str, labels: dict[str, str] | None = None) -> float:
    """A sample's value from the app's own registry, 0 when the series does not exist."""
    registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
    value = registry.get_sample_value(name, labels or {})
    return 0.0 if value is None else float(value)


# -- a private redis-server ---------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class RedisServer:
    """``redis-server`` on a free port, no persistence; never the system Redis on 6379."""

    def __init__(self) -> None:
        exe = shutil.which("redis-server")
        if exe is None:
            pytest.skip("redis-server is not installed (CI installs it: apt-get install redis)")
        self.exe = exe
        self.port = free_port()
        self.start()

    def start(self) -> None:
        """Start (or restart, on the same port) and return once it answers PING."""
        self.proc = subprocess.Popen(
            [self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--loglevel", "warning"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        self._wait_for_ping()

    def kill(self) -> None:
        """SIGKILL, as a crashed or OOM-killed Redis: every client connection dies with it."""
        self.proc.kill()
        self.proc.wait()

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _wait_for_ping(self) -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(64).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
