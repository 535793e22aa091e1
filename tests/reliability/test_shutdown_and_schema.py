"""A real `multvae serve` at shutdown (D10) and against its own OpenAPI document (D12)."""

from __future__ import annotations

import shutil
import signal
import subprocess
from pathlib import Path

import pytest
from reliability_support import KEY, Server, read_response, status_of, write_model


def test_an_upload_still_running_at_the_end_of_the_grace_period_gets_a_503(
    tmp_path: Path,
) -> None:
    write_model(tmp_path / "models", seed=1)
    env = {"MULTVAE_SHUTDOWN_GRACE_S": "1", "MULTVAE_BODY_TIMEOUT_S": "600"}
    server = Server(tmp_path / "models", tmp_path / "serve.log", env)
    try:
        server.wait_ready()
        with server.connect() as sock:
            stream = sock.makefile("rb")
            sock.sendall(
                b"POST /recommend HTTP/1.1\r\nHost: t\r\nContent-Type: application/json\r\n"
                + f"X-API-Key: {KEY}\r\nContent-Length: 100\r\n".encode()
                + b"Expect: 100-continue\r\n\r\n"
            )
            # uvicorn sends 100 Continue when the app starts reading the body: the request
            # is in flight from here on.
            assert stream.readline().startswith(b"HTTP/1.1 100")
            assert stream.readline() == b"\r\n"
            sock.sendall(b'{"items": [')  # ... and the rest never comes
            server.proc.send_signal(signal.SIGTERM)
            raw = read_response(stream)
        assert status_of(raw) == 503
        assert b"shutting down" in raw
        code = server.proc.wait(timeout=60)
    finally:
        server.stop()
    assert code in (0, -signal.SIGTERM)  # uvicorn re-raises the signal it handled
    log = server.output()
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log


@pytest.mark.slow
def test_schemathesis_finds_no_server_error_and_no_schema_violation(tmp_path: Path) -> None:
    st = shutil.which("st")
    if st is None:
        pytest.skip("schemathesis is not installed (pip install -e '.[dev]')")
    write_model(tmp_path / "models", seed=1)
    server = Server(tmp_path / "models", tmp_path / "serve.log")
    try:
        server.wait_ready()
        result = subprocess.run(
            [st, "run", f"{server.url}/openapi.json", "--header", f"X-API-Key: {KEY}",
             "--checks", "not_a_server_error,response_schema_conformance,"
             "content_type_conformance,status_code_conformance",
             "--max-examples", "25", "--seed", "1", "--no-color"],
            capture_output=True, text=True, timeout=600, check=False,
            cwd=tmp_path,  # its cache directory goes there, not into the checkout
        )  # fmt: skip
    finally:
        server.stop()
    assert result.returncode == 0, result.stdout[-4000:]
    assert "Traceback" not in server.output()
