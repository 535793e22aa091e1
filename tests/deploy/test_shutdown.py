"""How the API process ends, as a container runtime sees it.

* `multvae serve` stopped by SIGTERM exits 0 after its graceful shutdown, also when it is
  not PID 1 but the child of an init process (compose's `init: true` runs docker-init).
* A request still running when the graceful-shutdown timeout ends is answered 503 and
  logged as 503, without an "Exception in ASGI application" traceback.
"""

from __future__ import annotations

import asyncio
import http.client
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from multvae.artifacts import write_version
from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE
from service.metrics import Metrics
from service.middleware import RequestMiddleware

N_ITEMS = 50


def _model_dir(tmp_path: Path) -> Path:
    torch.manual_seed(0)
    out = tmp_path / "models"
    model = MultVAE(ModelConfig(p_dims=(8, 16, N_ITEMS)))
    items = ItemIndex.build([str(i) for i in range(N_ITEMS)], np.arange(N_ITEMS)[::-1])
    write_version(out, model, items, {"test": {"ndcg@100": 0.1}})
    return out


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _init() -> list[str]:
    """docker-init (tini), the init that compose's `init: true` runs as PID 1."""
    for name in ("docker-init", "tini"):
        path = shutil.which(name)
        if path is not None:
            return [path, "--"]
    message = "no docker-init or tini here (Debian: docker.io or tini)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI installs docker.io")
    pytest.skip(message)


@pytest.mark.parametrize("under_init", [False, True], ids=["pid-1-like", "under-init"])
def test_serve_exits_0_after_a_graceful_stop(tmp_path: Path, under_init: bool) -> None:
    multvae = Path(sys.executable).with_name("multvae")
    argv = [str(multvae), "serve", "--model-dir", str(_model_dir(tmp_path)),
            "--port", str(_free_port()), "--device", "cpu"]  # fmt: skip
    if under_init:
        argv = _init() + argv
    proc = subprocess.Popen(argv, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stderr is not None
        lines = []
        for line in proc.stderr:  # blocks until the server says it has started
            lines.append(line)
            if "Application startup complete" in line:
                break
        else:
            pytest.fail(f"serve exited before starting:\n{''.join(lines)}")
        proc.send_signal(signal.SIGTERM)  # to docker-init, which forwards it
        rest = proc.communicate(timeout=60)[1]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert "Application shutdown complete" in rest
    assert proc.returncode == 0, rest  # not -15 (killed), nor 143 under an init


def test_a_request_cut_by_the_shutdown_timeout_is_answered_503(
    caplog: pytest.LogCaptureFixture,
) -> None:
    entered = threading.Event()

    async def stuck(request: Request) -> Response:
        entered.set()
        await asyncio.Event().wait()  # only cancellation ends it
        return Response("never")

    app = RequestMiddleware(Starlette(routes=[Route("/stuck", stuck)]), Metrics(), True, 1 << 20)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    port = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, lifespan="off", timeout_graceful_shutdown=0.2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]})
    caplog.set_level(logging.INFO)
    thread.start()
    client = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    try:
        client.request("GET", "/stuck")
        assert entered.wait(timeout=60)
        server.should_exit = True  # what SIGTERM does
        response = client.getresponse()
        body = response.read()
    finally:
        server.should_exit = True
        thread.join(timeout=60)
        client.close()
        sock.close()
    assert response.status == 503
    assert b"shutting down" in body
    assert response.getheader("connection") == "close"
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]
    assert not [r for r in caplog.records if r.exc_info]
    [access] = [r for r in caplog.records if r.name == "multvae.access"]
    assert access.__dict__["status"] == 503
