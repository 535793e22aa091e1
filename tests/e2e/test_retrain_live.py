"""A running `multvae serve` process switches to a version `retrain` promotes, failing nothing.

The service is a real child process polling CURRENT every 0.2 s; two client threads keep
POSTing /recommend while the retrain (in this process) trains, gates and promotes.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import httpx
import numpy as np
import pytest

from training.pipeline import DataSpec, train_config_for
from training.retrain import EXIT_PROMOTED, Gate, retrain
from training.synthetic import generate, write

STARTUP_S = 90  # importing torch on a loaded 2-core machine can take a while
SWITCH_S = 60


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# The console script as this checkout defines it (an installed one may be older).
MULTVAE = [sys.executable, "-m", "multvae_cli"]


@dataclass
class ClientLog:
    """What one client thread saw, in order."""

    versions: list[str] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def _client_loop(base_url: str, items: list[str], stop: threading.Event, log: ClientLog,
                 seed: int) -> None:  # fmt: skip
    rng = np.random.default_rng(seed)
    with httpx.Client(base_url=base_url, timeout=30) as http:
        while not stop.is_set():
            # Varied histories: most requests miss the cache and reach the model.
            history = rng.choice(items, size=int(rng.integers(1, 8)), replace=False).tolist()
            try:
                r = http.post("/recommend", json={"items": history, "n": 10})
            except httpx.HTTPError as exc:
                log.failures.append(f"{type(exc).__name__}: {exc}")
                continue
            if r.status_code != 200:
                log.failures.append(f"{r.status_code}: {r.text}")
                continue
            body = r.json()
            if len(body["items"]) != 10 or body["fallback"] is not None:
                log.failures.append(f"unexpected answer: {body}")
            log.versions.append(body["model_version"])


@pytest.fixture
def server_for(tmp_path: Path) -> Iterator[Callable[[Path], str]]:
    """Starts `multvae serve` on a model dir; the process is always stopped afterwards."""
    procs: list[subprocess.Popen[bytes]] = []
    logs: list[Path] = []

    def start(model_dir: Path) -> str:
        port = _free_port()
        log = tmp_path / "serve.log"
        env = {
            **os.environ,
            "MULTVAE_RELOAD_INTERVAL_S": "0.2",
            "MULTVAE_REDIS_URL": "",  # the in-process cache
            "MULTVAE_API_KEY": "",  # no auth: this test is about the switch
        }
        with log.open("wb") as out:
            procs.append(subprocess.Popen(
                [*MULTVAE, "serve", "--model-dir", str(model_dir), "--port", str(port),
                 "--device", os.environ.get("MULTVAE_TEST_DEVICE", "cpu"), "--no-access-log"],
                env=env, stdout=out, stderr=subprocess.STDOUT,
            ))  # fmt: skip
        logs.append(log)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + STARTUP_S
        while time.monotonic() < deadline:
            assert procs[-1].poll() is None, f"server exited:\n{log.read_text()}"
            try:
                if httpx.get(f"{base}/readyz", timeout=5).status_code == 200:
                    return base
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {STARTUP_S} s:\n{log.read_text()}")

    try:
        yield start
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def test_a_running_service_switches_to_the_promoted_version(
    tmp_path: Path, server_for: Callable[[Path], str]
) -> None:
    inter = generate("small", seed=0)
    keep = (inter.user < 600) & (inter.item < 150)
    assert inter.value is not None
    inter = replace(inter, user=inter.user[keep], item=inter.item[keep], value=inter.value[keep],
                    item_ids=inter.item_ids[:150])  # fmt: skip
    data = tmp_path / "clicks.csv"
    write(inter, data)
    spec = DataSpec(str(data))
    config = train_config_for(spec, epochs=3, hidden_dims=(32,), latent_dim=16, device="cpu")
    model_dir = tmp_path / "models"
    first = retrain(spec, config, model_dir)
    assert first.exit_code == EXIT_PROMOTED
    old = first.report["candidate"]

    base = server_for(model_dir)
    items = [str(i) for i in inter.item_ids.tolist()]
    stop = threading.Event()
    logs = [ClientLog(), ClientLog()]
    threads = [
        threading.Thread(target=_client_loop, args=(base, items, stop, log, seed), daemon=True)
        for seed, log in enumerate(logs)
    ]
    for t in threads:
        t.start()
    try:
        _wait(lambda: all(len(log.versions) >= 10 for log in logs), "first answers")
        # Any drop allowed: the gate has its own tests; this one is about the switch.
        second = retrain(spec, config, model_dir, Gate(tolerance=1.0))
        assert second.exit_code == EXIT_PROMOTED, second.report["reason"]
        new = second.report["candidate"]
        _wait(lambda: all(log.versions[-1:] == [new] for log in logs), f"answers from {new}")
        n = [len(log.versions) for log in logs]
        _wait(lambda: all(len(log.versions) >= k + 10 for log, k in zip(logs, n, strict=True)),
              "answers after the switch")  # fmt: skip
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)

    assert [f for log in logs for f in log.failures] == []
    for log in logs:
        # Each client is sequential: once it has seen the new version it never sees the old.
        switch = log.versions.index(new)
        assert set(log.versions[:switch]) == {old}
        assert set(log.versions[switch:]) == {new}
    served = httpx.get(f"{base}/model", timeout=10).json()
    assert served["version"] == new


def test_a_running_service_follows_promote_and_rollback(
    tmp_path: Path, server_for: Callable[[Path], str]
) -> None:
    from multvae_cli import main

    inter = generate("small", seed=0)
    data = tmp_path / "clicks.csv"
    write(inter, data)
    spec = DataSpec(str(data))
    config = train_config_for(spec, epochs=1, hidden_dims=(), latent_dim=8, device="cpu")
    model_dir = tmp_path / "models"
    old = retrain(spec, config, model_dir).report["candidate"]
    new = retrain(spec, config, model_dir, Gate(force=True)).report["candidate"]
    base = server_for(model_dir)

    def served() -> str:
        return str(httpx.get(f"{base}/model", timeout=10).json()["version"])

    assert served() == new
    assert main(["rollback", str(model_dir)]) == 0
    _wait(lambda: served() == old, f"the service to roll back to {old}")
    assert main(["promote", str(model_dir), new]) == 0
    _wait(lambda: served() == new, f"the service to serve {new} again")


def _wait(condition: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + SWITCH_S
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)
