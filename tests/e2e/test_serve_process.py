"""End to end: `multvae serve` (and uvicorn --factory) as real processes, spoken to over HTTP."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from prometheus_client.parser import text_string_to_metric_families

from multvae.artifacts import VERSIONS, WEIGHTS, write_version
from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE

N_ITEMS = 300
STARTUP_S = 90  # importing torch on a loaded 2-core machine can take a while


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _write_model(model_dir: Path, seed: int) -> str:
    torch.manual_seed(seed)
    model = MultVAE(ModelConfig(p_dims=(16, 64, N_ITEMS)))
    items = ItemIndex.build([str(5000 + i) for i in range(N_ITEMS)], np.arange(N_ITEMS)[::-1])
    return write_version(model_dir, model, items, {"test": {"ndcg@100": 0.1}})


class Server:
    """A child process serving HTTP; always terminated, its stderr kept for the assertions."""

    def __init__(self, argv: list[str], env: dict[str, str], log: Path, port: int) -> None:
        self.port = port
        self.log = log
        self._stderr = log.open("wb")
        self.proc = subprocess.Popen(
            argv, env={**os.environ, **env}, stdout=self._stderr, stderr=subprocess.STDOUT
        )
        self.http = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)

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
            time.sleep(0.1)
        raise AssertionError(f"server not ready after {STARTUP_S} s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        self.http.close()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._stderr.close()
        return int(self.proc.returncode)


# The console script as this checkout defines it (an installed one may be older).
MULTVAE = [sys.executable, "-m", "multvae_cli"]


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    out = tmp_path / "models"
    _write_model(out, seed=1)
    return out


@pytest.fixture
def served(model_dir: Path, tmp_path: Path) -> Iterator[Server]:
    port = _free_port()
    argv = [*MULTVAE, "serve", "--model-dir", str(model_dir), "--port", str(port),
            "--device", os.environ.get("MULTVAE_TEST_DEVICE", "cpu")]  # fmt: skip
    env = {"MULTVAE_RELOAD_INTERVAL_S": "0", "MULTVAE_API_KEY": "e2e-key"}
    server = Server(argv, env, tmp_path / "serve.log", port)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


KEY = {"X-API-Key": "e2e-key"}


def _requests_by_route_and_status(http: httpx.Client) -> dict[tuple[str, str], float]:
    text = http.get("/metrics", headers=KEY).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    return {
        (s.labels["route"], s.labels["status"]): s.value
        for s in families["multvae_http_requests"].samples
        if s.name == "multvae_http_requests_total"
    }


def test_multvae_serve_answers_over_http(served: Server, model_dir: Path) -> None:
    http = served.http
    response = http.post(
        "/recommend",
        json={"items": ["5001", "5002", 5007, "nope"], "n": 5, "exclude": ["5003"]},
        headers={**KEY, "X-Request-ID": "e2e-1"},
    )
    assert response.status_code == 200, response.text
    body = response.json()
    assert response.headers["x-request-id"] == "e2e-1"
    returned = [r["item"] for r in body["items"]]
    assert len(returned) == 5
    assert not set(returned) & {"5001", "5002", "5007", "5003"}
    assert body["unknown_items"] == ["nope"]
    assert body["fallback"] is None
    assert http.post("/recommend", json={"items": ["5001"]}).status_code == 401
    bad = http.post(
        "/recommend", content=b"{nope", headers={**KEY, "content-type": "application/json"}
    )
    assert bad.status_code == 400
    batch = http.post("/recommend/batch", json={"requests": [{"items": []}]}, headers=KEY)
    assert batch.json()["results"][0]["fallback"] == "popularity"

    text = http.get("/metrics", headers=KEY).text
    families = {f.name: f for f in text_string_to_metric_families(text)}
    requests = _requests_by_route_and_status(http)
    assert requests[("/recommend", "200")] == 1
    assert requests[("/recommend", "401")] == 1
    assert requests[("/recommend", "400")] == 1
    assert requests[("/recommend/batch", "200")] == 1
    info = families["multvae_model_info"].samples[0]
    assert info.labels["version"] == http.get("/model").json()["version"]

    # A client that hangs up halfway through its body: a 499 in the metrics, no stack trace.
    with socket.create_connection(("127.0.0.1", served.port), timeout=10) as raw:
        raw.sendall(
            b"POST /recommend HTTP/1.1\r\nHost: e2e\r\nX-API-Key: e2e-key\r\n"
            b'Content-Type: application/json\r\nContent-Length: 200\r\n\r\n{"items": ['
        )
    deadline = time.monotonic() + 60
    while _requests_by_route_and_status(http).get(("/recommend", "499")) != 1:
        assert time.monotonic() < deadline, served.output()
        time.sleep(0.05)
    assert ("/recommend", "500") not in _requests_by_route_and_status(http)

    # SIGHUP reloads CURRENT in the running process.
    new_version = _write_model(model_dir, seed=2)
    served.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 60
    while http.get("/model").json()["version"] != new_version:
        assert time.monotonic() < deadline, served.output()
        time.sleep(0.1)
    after = http.post("/recommend", json={"items": ["5001"]}, headers=KEY).json()
    assert after["model_version"] == new_version

    # Over a raw socket, keep-alive responses arrive whole and in order, and a
    # Connection: close one before EOF.
    with socket.create_connection(("127.0.0.1", served.port), timeout=30) as raw:
        body = b'{"items": ["5001"], "n": 3}'
        request = (
            b"POST /recommend HTTP/1.1\r\nHost: e2e\r\nX-API-Key: e2e-key\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\n%s\r\n%s"
        )
        raw.sendall(request % (len(body), b"", body) * 2)  # two pipelined requests
        raw.sendall(request % (len(body), b"Connection: close\r\n", body))
        received = b""
        while chunk := raw.recv(65536):
            received += chunk
    responses = received.split(b"HTTP/1.1 ")[1:]
    assert [r.split(b"\r\n", 1)[0] for r in responses] == [b"200 OK"] * 3
    assert all(r.rstrip().endswith(b"}") for r in responses)  # every body complete
    # uvicorn shuts down gracefully on SIGTERM, then re-raises it so the parent sees why.
    assert served.stop() in (0, -signal.SIGTERM)
    assert "Application shutdown complete" in served.output()
    lines = [json.loads(line) for line in served.output().splitlines() if line.startswith("{")]
    access = [line for line in lines if line["logger"] == "multvae.access"]
    first = next(line for line in access if line["request_id"] == "e2e-1")
    assert first["route"] == "/recommend"
    assert first["status"] == 200
    assert first["cache"] == "miss"
    assert "e2e-key" not in served.output()
    assert "Traceback" not in served.output()
    assert not [line for line in lines if line["logger"] == "multvae.error"]
    assert any("SIGHUP" in line["message"] for line in lines)


def test_uvicorn_factory_reads_the_environment(model_dir: Path, tmp_path: Path) -> None:
    port = _free_port()
    argv = [sys.executable, "-m", "uvicorn", "service.app:create_app", "--factory",
            "--port", str(port), "--log-level", "warning"]  # the README's command  # fmt: skip
    env = {"MULTVAE_MODEL_DIR": str(model_dir), "MULTVAE_DEVICE": "auto",
           "MULTVAE_MAX_N": "3"}  # fmt: skip
    server = Server(argv, env, tmp_path / "uvicorn.log", port)
    try:
        server.wait_ready()
        too_many = server.http.post("/recommend", json={"items": [], "n": 4})
        assert too_many.status_code == 422
        assert "MULTVAE_MAX_N" in too_many.json()["detail"]
        assert server.http.post("/recommend", json={"items": [], "n": 3}).status_code == 200
    finally:
        server.stop()
    # The factory path logs JSON access lines too, though uvicorn configured the logging.
    lines = [json.loads(x) for x in server.output().splitlines() if x.startswith("{")]
    assert [x["status"] for x in lines if x["logger"] == "multvae.access"][-2:] == [422, 200]


def test_a_corrupt_current_version_fails_startup(model_dir: Path, tmp_path: Path) -> None:
    version = (model_dir / "CURRENT").read_text().strip()
    with (model_dir / VERSIONS / version / WEIGHTS).open("ab") as fh:
        fh.write(b"x")
    port = _free_port()
    argv = [*MULTVAE, "serve", "--model-dir", str(model_dir), "--port", str(port),
            "--device", os.environ.get("MULTVAE_TEST_DEVICE", "cpu")]  # fmt: skip
    server = Server(argv, {}, tmp_path / "bad.log", port)
    try:
        code = server.proc.wait(timeout=STARTUP_S)
    finally:
        server.stop()
    assert code != 0
    assert "fails verification" in server.output()
