"""Hostile raw HTTP against a real `multvae serve` (issue 11, D2, D3, D12, D15, D16): every
input gets a 4xx (or, for what is not HTTP at all, a closed connection), never a 5xx; the
server stays healthy while slow and idle clients hold connections."""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from reliability_support import (
    ITEM_IDS,
    KEY,
    Server,
    exchange,
    read_response,
    status_of,
    write_model,
)

HOST = b"Host: t\r\n"
AUTH = f"X-API-Key: {KEY}\r\n".encode()
JSON = b"Content-Type: application/json\r\n"


def _post(body: bytes, extra: bytes = b"", path: bytes = b"/recommend") -> bytes:
    length = f"Content-Length: {len(body)}\r\n".encode()
    return b"POST " + path + b" HTTP/1.1\r\n" + HOST + AUTH + JSON + length + extra + b"\r\n" + body


GOOD = json.dumps({"items": ITEM_IDS[:3]}).encode()
CLOSED = None  # the server closed the connection without an answer (what is not HTTP)

# (name, raw request, accepted statuses). Every one must leave the server healthy. h11
# refuses a head once more than MULTVAE_MAX_HEADER_BYTES of it wait incomplete; one that
# arrives whole in a single read (up to 256 KiB on loopback) is parsed and answered.
CASES: list[tuple[str, bytes, set[int | None]]] = [
    ("1 MB header", b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Big: " + b"a" * 1_000_000
     + b"\r\n\r\n", {400, CLOSED}),
    ("100 KB request line", b"GET /" + b"a" * 100_000 + b" HTTP/1.1\r\n" + HOST + b"\r\n",
     {400, 404, CLOSED}),
    ("5000 headers", b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-A: b\r\n" * 5000 + b"\r\n",
     {200, 400, CLOSED}),
    ("garbage", b"\x00\x01\x02\xff garbage\r\n\r\n", {400, CLOSED}),
    ("HTTP/2 preface", b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n", {400, 404, CLOSED}),
    ("no Host", b"GET /healthz HTTP/1.1\r\n\r\n", {400}),
    ("header without colon", b"GET /healthz HTTP/1.1\r\n" + HOST + b"NoColon\r\n\r\n", {400}),
    ("NUL in the path", b"GET /heal\x00thz HTTP/1.1\r\n" + HOST + b"\r\n", {400, 404}),
    ("unknown method", b"BREW /recommend HTTP/1.1\r\n" + HOST + b"\r\n", {400, 405}),
    ("negative length", b"POST /recommend HTTP/1.1\r\n" + HOST + AUTH + JSON
     + b"Content-Length: -5\r\n\r\n", {400}),
    ("length and chunked", b"POST /recommend HTTP/1.1\r\n" + HOST + AUTH + JSON
     + b"Content-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n", {400}),
    ("unsupported transfer coding", b"POST /recommend HTTP/1.1\r\n" + HOST + AUTH + JSON
     + b"Transfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n", {400}),
    ("broken chunk mid-body", b"POST /recommend HTTP/1.1\r\n" + HOST + AUTH + JSON
     + b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"ite\r\nZZ\r\nxx\r\n", {400}),
    ("1 TB declared", b"POST /recommend HTTP/1.1\r\n" + HOST + AUTH + JSON
     + b"Content-Length: 1000000000000\r\n\r\n{", {413}),
    ("no key", b"POST /recommend HTTP/1.1\r\n" + HOST + JSON + b"Content-Length: 2\r\n\r\n{}",
     {401}),
    ("metrics without the key", b"GET /metrics HTTP/1.1\r\n" + HOST + b"\r\n", {401}),
    ("not JSON", _post(b"{items: [1]"), {400}),
    ("duplicate keys", _post(b'{"items": ["5001"], "items": ["5002"]}'), {400}),
    ("NaN", _post(b'{"items": ["5001"], "n": NaN}'), {400, 422}),
    ("nested 50,000 deep", _post(b"[" * 50_000 + b"]" * 50_000), {400, 422}),
    ("float id", _post(b'{"items": [1.5]}'), {422}),
    ("10,000 ids", _post(json.dumps({"items": [str(i) for i in range(10_000)]}).encode()),
     {422}),
    ("text/plain", _post(GOOD).replace(JSON, b"Content-Type: text/plain\r\n"), {415}),
    ("HEAD /healthz", b"HEAD /healthz HTTP/1.1\r\n" + HOST + b"\r\n", {200}),
    ("a good request", _post(GOOD), {200}),
]  # fmt: skip


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("hostile")
    write_model(tmp / "models", seed=1)
    env = {"MULTVAE_BODY_TIMEOUT_S": "1", "MULTVAE_KEEP_ALIVE_S": "1"}
    server = Server(tmp / "models", tmp / "serve.log", env)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.mark.parametrize(("raw", "accepted"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_hostile_input_gets_a_4xx_never_a_5xx(
    server: Server, raw: bytes, accepted: set[int | None]
) -> None:
    status = status_of(exchange(server, raw))
    assert status in accepted
    assert server.http.get("/healthz").status_code == 200


def test_slowloris_connections_leave_healthz_answering(server: Server) -> None:
    # 250 clients each send half a request head and then nothing.
    held: list[socket.socket] = []
    try:
        for _ in range(250):
            sock = server.connect()
            sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"X-Slow: ")
            held.append(sock)
        for _ in range(5):
            assert server.http.get("/healthz").status_code == 200
    finally:
        for sock in held:
            sock.close()


def test_an_idle_connection_is_closed_after_the_keep_alive_timeout(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n")
        assert status_of(read_response(sock.makefile("rb"))) == 200
        sock.settimeout(30)  # MULTVAE_KEEP_ALIVE_S=1: closed long before
        assert sock.recv(1) == b""


def test_a_body_shorter_than_declared_is_a_408(server: Server) -> None:
    with server.connect() as sock:
        head = b"POST /recommend HTTP/1.1\r\n" + HOST + AUTH + JSON + b"Content-Length: 90\r\n"
        sock.sendall(head + b'\r\n{"items": [')
        raw = read_response(sock.makefile("rb"))  # MULTVAE_BODY_TIMEOUT_S=1
    assert status_of(raw) == 408
    assert b"MULTVAE_BODY_TIMEOUT_S" in raw


def test_pipelined_requests_are_all_answered(server: Server) -> None:
    with server.connect() as sock:
        sock.sendall(b"GET /healthz HTTP/1.1\r\n" + HOST + b"\r\n" + _post(GOOD) * 20)
        stream = sock.makefile("rb")
        statuses = [status_of(read_response(stream)) for _ in range(21)]
    assert statuses == [200] * 21


def test_no_5xx_was_counted_and_the_labels_stayed_bounded(server: Server) -> None:
    for i in range(100):
        exchange(server, f"GET /probe-{i} HTTP/1.1\r\nHost: t\r\n\r\n".encode())
    text = server.http.get("/metrics").text
    samples = [
        s
        for f in text_string_to_metric_families(text)
        if f.name == "multvae_http_requests"
        for s in f.samples
        if s.name == "multvae_http_requests_total"
    ]
    assert not [s for s in samples if s.labels["status"].startswith("5")]
    assert not [s for s in samples if "probe" in s.labels["route"]]
    assert len(samples) < 40  # routes x methods x statuses actually answered


def test_the_log_holds_no_traceback(server: Server) -> None:
    log = server.output()
    assert "Traceback" not in log
    assert "Exception in ASGI application" not in log


def test_httptools_is_an_opt_in_that_bounds_no_head(tmp_path: Path) -> None:
    """MULTVAE_HTTP=httptools (for a deployment whose proxy bounds request heads): it serves,
    says at start-up that heads are unbounded, and does parse the 1 MB head h11 refuses."""
    write_model(tmp_path / "models", seed=1)
    server = Server(tmp_path / "models", tmp_path / "serve.log", {"MULTVAE_HTTP": "httptools"})
    try:
        server.wait_ready()
        assert server.http.post("/recommend", json={"items": ITEM_IDS[:3]}).status_code == 200
        assert status_of(exchange(server, CASES[0][1])) == 200  # "1 MB header": parsed
    finally:
        server.stop()
    assert "request heads are not bounded" in server.output()
    assert "Traceback" not in server.output()
