"""The HTTP edge in process (issue 11, D1, D3, D10, D12, D15-D17): what every connection may
send, how /metrics is exposed, and what the OpenAPI document promises."""

from __future__ import annotations

import asyncio
import logging
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter
from service_support import IDS, Trained, make_settings, metric_value
from starlette.types import Message

from multvae.artifacts import VERSIONS, WEIGHTS, current_version
from service.app import create_app
from service.batching import MicroBatcher
from service.errors import OverloadedError
from service.metrics import Exposition, Metrics

# -- D15: duplicate JSON keys ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "key"),
    [
        (b'{"items": ["83"], "items": ["201"]}', '"items"'),
        (b'{"items": ["1"], "n": 5, "n": 6}', '"n"'),
        (b'{"items": ["1"], "n": 5, "n": 0}', '"n"'),  # and invalid as parsed (last wins)
        (b'{"requests": [{"items": ["1"], "exclude": [], "exclude": ["2"]}]}', '"exclude"'),
    ],
)
def test_a_repeated_key_is_a_400_naming_it(client: TestClient, body: bytes, key: str) -> None:
    path = "/recommend/batch" if body.startswith(b'{"requests"') else "/recommend"
    response = client.post(path, content=body, headers={"content-type": "application/json"})
    assert response.status_code == 400
    detail = response.json()["detail"]
    assert f"duplicate key {key}" in detail
    assert "send each key once" in detail


def test_distinct_keys_in_sibling_objects_are_fine(client: TestClient) -> None:
    body = {"requests": [{"items": [IDS[0]], "n": 3}, {"items": [IDS[1]], "n": 3}]}
    assert client.post("/recommend/batch", json=body).status_code == 200


# -- D16: HEAD, route labels, file modes -------------------------------------------------------


def test_head_healthz_is_200_without_a_body(client: TestClient) -> None:
    response = client.head("/healthz")
    assert response.status_code == 200
    assert response.content == b""


def test_docs_and_openapi_get_their_own_route_labels(client: TestClient) -> None:
    assert client.get("/docs").status_code == 200
    assert client.get("/openapi.json").status_code == 200
    for route in ("/docs", "/openapi.json"):
        labels = {"route": route, "method": "GET", "status": "200"}
        assert metric_value(client, "multvae_http_requests_total", labels) == 1


def test_the_weights_file_gets_the_mode_of_the_rest(trained: Trained) -> None:
    version = current_version(trained.model_dir)
    assert version is not None
    path = Path(trained.model_dir) / VERSIONS / version
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in path.iterdir() if p.is_file()}
    umask = os.umask(0)
    os.umask(umask)
    assert modes[WEIGHTS] == 0o666 & ~umask
    assert set(modes.values()) == {modes[WEIGHTS]}


# -- D1: /metrics ------------------------------------------------------------------------------


def test_unmatched_paths_add_no_series_whatever_they_are(client: TestClient) -> None:
    def series() -> int:
        text = client.get("/metrics").text
        return sum(1 for line in text.splitlines() if line and not line.startswith("#"))

    client.get("/nope-0")
    client.request("PROPFIND", "/nope-0")
    before = series()
    for i in range(50):
        client.get(f"/nope-{i}/{'x' * i}")
        client.request("PROPFIND", f"/other-{i}")
        client.post(f"/recommend/{i}", json={})
    after = series()
    # The counters of the two methods and of the one more (unmatched POST 404) status: +1 each
    # at most, never a latency histogram (18 series) and never a path.
    assert after - before <= 1
    assert "nope-1" not in client.get("/metrics").text


def test_the_exposition_renders_off_the_loop_and_at_most_once_per_period() -> None:
    registry = CollectorRegistry()
    counter = Counter("hits", "h", registry=registry)
    now = [0.0]
    exposition = Exposition(registry, max_age_s=1.0, clock=lambda: now[0])
    threads: set[int] = set()

    class Spy:
        def collect(self) -> list[Any]:
            threads.add(threading.get_ident())
            return []

    registry.register(Spy())  # type: ignore[arg-type]

    async def scenario() -> list[bytes]:
        first = await asyncio.gather(*(exposition.render() for _ in range(8)))
        counter.inc()
        cached = await exposition.render()  # within the period: the same text
        now[0] = 1.0
        fresh = await exposition.render()
        return [*first, cached, fresh]

    texts = asyncio.run(scenario())
    assert exposition.renders == 2
    assert len(set(texts[:9])) == 1
    assert b"hits_total 0.0" in texts[0]
    assert b"hits_total 1.0" in texts[-1]
    assert threading.get_ident() not in threads


# -- D12: the OpenAPI document -----------------------------------------------------------------


def test_openapi_says_what_the_endpoints_do(client: TestClient) -> None:
    doc = client.get("/openapi.json").json()
    request = doc["components"]["schemas"]["RecommendRequest"]["properties"]
    accepted = {"anyOf": [{"type": "string"}, {"type": "integer"}]}
    assert request["items"]["items"] == accepted
    assert request["exclude"]["items"] == accepted
    metrics = doc["paths"]["/metrics"]["get"]
    assert list(metrics["responses"]["200"]["content"]) == ["text/plain"]
    # the API key: tests/service/test_api_auth.py
    assert set(doc["paths"]["/healthz"]) == {"get", "head"}


# -- D3, D10: bodies that stop, requests cancelled at shutdown ---------------------------------


def _scope(path: str = "/recommend", length: int | None = None) -> dict[str, Any]:
    headers = [(b"content-type", b"application/json"), (b"x-request-id", b"edge-1")]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": path, "raw_path": path.encode(), "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
        "headers": headers,
    }  # fmt: skip


def test_a_body_that_stops_arriving_is_a_408(
    trained: Trained, caplog: pytest.LogCaptureFixture
) -> None:
    # The client declared 100 bytes and sent 11: receive() never returns again.
    messages: list[Message] = [{"type": "http.request", "body": b'{"items": [', "more_body": True}]
    sent: list[Message] = []

    async def receive() -> Message:
        if messages:
            return messages.pop(0)
        await asyncio.Event().wait()  # the rest of the body never comes
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    settings = make_settings(trained.model_dir, body_timeout_s=0.05)
    with caplog.at_level(logging.INFO), TestClient(create_app(settings)) as client:
        assert client.portal is not None
        client.portal.call(client.app, _scope(length=100), receive, send)
        labels = {"route": "/recommend", "method": "POST", "status": "408"}
        assert metric_value(client, "multvae_http_requests_total", labels) == 1
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 408
    assert (b"connection", b"close") in start["headers"]
    body = b"".join(m.get("body", b"") for m in sent if m["type"] == "http.response.body")
    assert b"MULTVAE_BODY_TIMEOUT_S" in body
    assert not [r for r in caplog.records if r.name == "multvae.error"]


def test_a_request_cancelled_by_the_end_of_the_grace_period_is_a_503(
    trained: Trained, caplog: pytest.LogCaptureFixture
) -> None:
    # uvicorn cancels the tasks still running when timeout_graceful_shutdown ends; here the
    # client is still uploading (receive() waits) when that happens.
    uploading = threading.Event()
    sent: list[Message] = []
    first = True

    async def receive() -> Message:
        nonlocal first
        if first:
            first = False
            return {"type": "http.request", "body": b'{"items": [', "more_body": True}
        uploading.set()
        await asyncio.Event().wait()
        raise AssertionError("unreachable")

    async def send(message: Message) -> None:
        sent.append(message)

    settings = make_settings(trained.model_dir, body_timeout_s=3600)
    with caplog.at_level(logging.INFO), TestClient(create_app(settings)) as client:
        assert client.portal is not None
        app = client.app

        async def request_then_cancel() -> None:
            task = asyncio.ensure_future(app(_scope(), receive, send))
            await asyncio.to_thread(uploading.wait, 30)
            task.cancel()
            await task  # ends normally: the cancellation was answered

        client.portal.call(request_then_cancel)
        labels = {"route": "/recommend", "method": "POST", "status": "503"}
        assert metric_value(client, "multvae_http_requests_total", labels) == 1
    start = next(m for m in sent if m["type"] == "http.response.start")
    assert start["status"] == 503
    assert (b"connection", b"close") in start["headers"]
    assert not [r for r in caplog.records if r.name == "multvae.error" or r.exc_info]


# -- D17: a fair share of the admission queue --------------------------------------------------


class _GatedModel:
    def __init__(self) -> None:
        self.gate = threading.Event()
        self.running = threading.Event()

    def recommend_batch(self, queries: list[Any]) -> list[Any]:
        from multvae.recommend import Recommendation

        self.running.set()
        assert self.gate.wait(30)
        return [Recommendation([("i", 1.0)]) for _ in queries]


def test_one_client_cannot_fill_the_queue_for_everyone() -> None:
    from multvae.recommend import Query

    async def scenario() -> tuple[list[str], int]:
        model = _GatedModel()
        batcher = MicroBatcher(Metrics(), 1000, 0.0, max_pending=400, max_pending_share=0.25)
        batcher.start()
        batch = [Query(["1"], 1)] * 100
        try:
            running = asyncio.ensure_future(batcher.submit(model, batch, "heavy"))  # type: ignore[arg-type]
            assert await asyncio.to_thread(model.running.wait, 30)
            queued = [
                asyncio.ensure_future(batcher.submit(model, [*batch], "heavy"))  # type: ignore[arg-type]
            ]
            async with asyncio.timeout(30):
                while batcher.pending_rows < 100:
                    await asyncio.sleep(0)
            refused: list[str] = []
            try:
                await batcher.submit(model, batch, "heavy")  # type: ignore[arg-type]
            except OverloadedError as exc:
                refused.append(exc.detail)
            # Everyone else still gets in, up to the global bound.
            for other in ("a", "b", "c"):
                queued.append(asyncio.ensure_future(batcher.submit(model, batch, other)))  # type: ignore[arg-type]
            async with asyncio.timeout(30):
                while batcher.pending_rows < 400:
                    await asyncio.sleep(0)
            model.gate.set()
            done = await asyncio.wait_for(asyncio.gather(running, *queued), 30)
            return refused, sum(len(d) for d in done)
        finally:
            model.gate.set()
            await batcher.stop()

    refused, answered = asyncio.run(scenario())
    assert len(refused) == 1
    assert "MULTVAE_MAX_PENDING_SHARE=0.25" in refused[0]
    assert "100 of 400" in refused[0]
    assert answered == 500
