"""Bad input: every case gets a 4xx JSON error naming the field and what is accepted."""

from __future__ import annotations

import json
import logging
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import IDS, Trained, make_settings, metric_value
from starlette.types import Message

from service.app import create_app

LIMITS = {"max_n": 50, "max_history": 8, "max_exclude": 4, "max_batch_requests": 3}


@pytest.fixture(scope="module")
def limited(trained: Trained) -> Iterator[TestClient]:
    settings = make_settings(trained.model_dir, max_body_bytes=4096, **LIMITS)
    with TestClient(create_app(settings)) as client:
        yield client


BODY_CASES: list[tuple[str, Any, int, str | None, str]] = [
    # (case, JSON body, status, field, words the message must contain)
    ("not an object", [IDS[0]], 422, "body", "JSON object with the fields items, n, exclude"),
    ("items missing", {"n": 5}, 422, "items", "required"),
    ("unknown field", {"items": [], "itemz": []}, 422, "itemz", "accepted fields are items"),
    ("items not a list", {"items": IDS[0]}, 422, "items", "JSON array"),
    ("float id", {"items": [IDS[0], 1.5]}, 422, "items[1]", "got 1.5 (a float)"),
    ("bool id", {"items": [True]}, 422, "items[0]", "string or an integer, got true (a boolean)"),
    ("null id", {"items": [None]}, 422, "items[0]", "string or an integer, got null"),
    ("object id", {"items": [{"id": 1}]}, 422, "items[0]", "string or an integer, got an object"),
    ("list id", {"items": [[1]]}, 422, "items[0]", "string or an integer, got an array"),
    ("float exclude", {"items": [], "exclude": [2.0]}, 422, "exclude[0]", "string or an integer"),
    ("zero n", {"items": [], "n": 0}, 422, "n", "must be >= 1, got 0"),
    ("negative n", {"items": [], "n": -3}, 422, "n", "must be >= 1, got -3"),
    ("string n", {"items": [], "n": "5"}, 422, "n", 'expected an integer, got "5"'),
    ("float n", {"items": [], "n": 5.0}, 422, "n", "expected an integer, got 5.0"),
    ("bool n", {"items": [], "n": True}, 422, "n", "expected an integer, got true"),
    ("n above max", {"items": [], "n": 51}, 422, "n", "must be <= 50 (MULTVAE_MAX_N), got 51"),
    ("history too long", {"items": IDS[:9]}, 422, "items", "at most 8 item ids"),
    ("exclude too long", {"items": [], "exclude": IDS[:5]}, 422, "exclude", "at most 4"),
    ("duplicate ids", {"items": [IDS[0], IDS[1], IDS[0]]}, 422, "items",
     f"duplicate item ids '{IDS[0]}'"),
    ("int and str duplicate", {"items": [1000, "1000"]}, 422, "items", "duplicate item ids '1000'"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "status", "field", "words"),
    [case[1:] for case in BODY_CASES],
    ids=[case[0] for case in BODY_CASES],
)
def test_bad_recommend_bodies(
    limited: TestClient, body: Any, status: int, field: str, words: str
) -> None:
    response = limited.post("/recommend", json=body)
    assert response.status_code == status, response.text
    error = response.json()
    assert words in error["detail"]
    assert field in [e["field"] for e in error["errors"]]
    assert error["detail"].startswith(field) or f"; {field}" in error["detail"]


def test_several_errors_are_reported_together(limited: TestClient) -> None:
    response = limited.post("/recommend", json={"items": [1.5, None], "n": 0})
    assert response.status_code == 422
    assert [e["field"] for e in response.json()["errors"]] == ["items[0]", "items[1]", "n"]


@pytest.mark.parametrize(
    ("content", "headers", "status", "words"),
    [
        (b'{"items": [', {"content-type": "application/json"}, 400, "malformed JSON"),
        (b"{'items': []}", {"content-type": "application/json"}, 400, "malformed JSON"),
        (b"", {"content-type": "application/json"}, 400, "the body is empty"),
        (b'{"items": []}', {"content-type": "text/plain"}, 415, "must be application/json"),
        (b"items=1", {"content-type": "application/x-www-form-urlencoded"}, 415, "got"),
        (b'{"items": []}', {}, 415, "got 'none'"),
    ],
    ids=["truncated", "single quotes", "empty", "text/plain", "form", "no content type"],
)
def test_bad_bodies_and_content_types(
    limited: TestClient, content: bytes, headers: dict[str, str], status: int, words: str
) -> None:
    response = limited.post("/recommend", content=content, headers=headers)
    assert response.status_code == status
    assert words in response.json()["detail"]


def test_json_with_charset_and_vendor_types_is_accepted(limited: TestClient) -> None:
    for media in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = limited.post(
            "/recommend", content=b'{"items": []}', headers={"content-type": media}
        )
        assert response.status_code == 200, media


def test_body_size_limit_declared_and_streamed(limited: TestClient) -> None:
    big = json.dumps({"items": ["x" * 5000]}).encode()
    declared = limited.post("/recommend", content=big, headers={"content-type": "application/json"})
    assert declared.status_code == 413
    assert "4096 bytes (MULTVAE_MAX_BODY_BYTES)" in declared.json()["detail"]

    def chunks() -> Iterator[bytes]:  # no Content-Length: the limit holds while streaming
        for i in range(0, len(big), 1000):
            yield big[i : i + 1000]

    streamed = limited.post(
        "/recommend", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413


@pytest.mark.parametrize(
    ("value", "strict"),
    [("true", True), ("T", True), ("1", True), ("yes", True), ("Y", True), ("on", True),
     ("false", False), ("f", False), ("0", False), ("No", False), ("n", False), ("OFF", False)],
)  # fmt: skip
def test_strict_takes_every_boolean_spelling(limited: TestClient, value: str, strict: bool) -> None:
    response = limited.post(f"/recommend?strict={value}", json={"items": ["never-seen"]})
    assert response.status_code == (422 if strict else 200), response.text
    if strict:
        assert "unknown item ids" in response.json()["detail"]


def test_bad_query_parameter(limited: TestClient) -> None:
    response = limited.post("/recommend?strict=maybe", json={"items": []})
    assert response.status_code == 422
    assert response.json()["errors"][0]["field"] == "query.strict"
    assert "true or false" in response.json()["detail"]


BATCH_CASES: list[tuple[str, Any, str, str]] = [
    ("not a list", {"requests": {"items": []}}, "requests", "JSON array"),
    ("unknown field", {"reqs": []}, "reqs", "accepted fields are requests"),
    ("bad n inside", {"requests": [{"items": []}, {"items": [], "n": 0}]}, "requests[1].n", ">= 1"),
    ("bad id inside", {"requests": [{"items": [2.5]}]}, "requests[0].items[0]", "2.5 (a float)"),
    ("extra inside", {"requests": [{"items": [], "x": 1}]}, "requests[0].x",
     "accepted fields are items, n, exclude"),
    ("too many", {"requests": [{"items": []}] * 4}, "requests", "at most 3 requests per batch"),
    ("limit inside", {"requests": [{"items": [], "n": 99}]}, "requests[0].n", "must be <= 50"),
    ("duplicates inside", {"requests": [{"items": [1000, 1000]}]}, "requests[0].items",
     "duplicate"),
]  # fmt: skip


@pytest.mark.parametrize(
    ("body", "field", "words"), [c[1:] for c in BATCH_CASES], ids=[c[0] for c in BATCH_CASES]
)
def test_bad_batch_bodies(limited: TestClient, body: Any, field: str, words: str) -> None:
    response = limited.post("/recommend/batch", json=body)
    assert response.status_code == 422, response.text
    assert field in [e["field"] for e in response.json()["errors"]]
    assert words in response.json()["detail"]


def test_wrong_method_and_unknown_route_are_json(limited: TestClient) -> None:
    wrong = limited.get("/recommend")
    assert wrong.status_code == 405
    assert "allowed: POST" in wrong.json()["detail"]
    missing = limited.get("/recommendations")
    assert missing.status_code == 404
    assert "/recommendations is not an endpoint" in missing.json()["detail"]


def _junk(rng: random.Random, depth: int = 0) -> Any:
    kind = rng.randrange(9 if depth < 3 else 6)
    if kind == 0:
        return None
    if kind == 1:
        return rng.choice([True, False])
    if kind == 2:
        return rng.choice([0, -1, 1, 7, 10**30, -(10**30), 2**63])
    if kind == 3:
        return rng.choice([0.5, -0.0, 1e308, 3.0])
    if kind == 4:
        return rng.choice(["", "1000", "\u0000", "é" * 10, IDS[3], "x" * 300])
    if kind == 5:
        return rng.choice(["items", "n", "exclude", "requests"])
    if kind in (6, 7):
        return [_junk(rng, depth + 1) for _ in range(rng.randrange(4))]
    keys = ["items", "n", "exclude", "requests", "other"]
    return {rng.choice(keys): _junk(rng, depth + 1) for _ in range(rng.randrange(4))}


def test_no_input_reaches_a_500(limited: TestClient) -> None:
    rng = random.Random(7)
    statuses = set()
    for _ in range(300):
        body = _junk(rng)
        path = rng.choice(["/recommend", "/recommend/batch"])
        response = limited.post(path, content=json.dumps(body).encode(),
                                headers={"content-type": "application/json"})  # fmt: skip
        assert response.status_code < 500, (path, body, response.text)
        expected_key = (
            "detail"
            if response.status_code >= 400
            else ("results" if path.endswith("batch") else "items")
        )
        assert expected_key in response.json()
        statuses.add(response.status_code)
    assert 422 in statuses  # the generator does reach validation, not only one early branch


def test_an_unexpected_failure_is_a_json_500_with_the_request_id(
    trained: Trained, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    with TestClient(create_app(make_settings(trained.model_dir))) as client:
        pipeline = client.app.state.pipeline  # type: ignore[attr-defined]

        async def broken(*args: Any, **kwargs: Any) -> Any:
            raise RuntimeError("a bug, not the client's fault")

        monkeypatch.setattr(pipeline, "recommend", broken)
        response = client.post("/recommend", json={"items": []}, headers={"X-Request-ID": "r-500"})
        assert response.status_code == 500
        assert response.json() == {"detail": "internal error; quote request id r-500"}
        assert response.headers["x-request-id"] == "r-500"
        labels = {"route": "/recommend", "method": "POST", "status": "500"}
        registry = client.app.state.metrics.registry  # type: ignore[attr-defined]
        assert registry.get_sample_value("multvae_http_requests_total", labels) == 1
    errors = [r for r in caplog.records if r.name == "multvae.error"]
    assert errors[0].exc_info is not None
    assert errors[0].__dict__["request_id"] == "r-500"


def test_not_ready_outside_the_lifespan(trained: Trained) -> None:
    client = TestClient(create_app(make_settings(trained.model_dir)))  # no `with`: no startup
    assert client.get("/healthz").status_code == 200
    response = client.get("/readyz")
    assert response.status_code == 503
    assert "starting or stopping" in response.json()["detail"]
    assert client.post("/recommend", json={"items": []}).status_code == 503


def test_not_ready_once_inference_stays_down(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    with TestClient(create_app(make_settings(trained.model_dir))) as client:
        assert client.get("/readyz").status_code == 200
        batcher = client.app.state.pipeline.batcher  # type: ignore[attr-defined]
        monkeypatch.setattr(batcher, "_broken", "the inference worker failed unexpectedly")
        response = client.get("/readyz")
        assert response.status_code == 503
        assert "inference worker failed" in response.json()["detail"]
        assert client.post("/recommend", json={"items": [IDS[4]]}).status_code == 503
        assert metric_value(client, "multvae_rejected_total", {"reason": "not_ready"}) == 1
        assert metric_value(client, "multvae_rejected_total", {"reason": "overloaded"}) == 0


@pytest.mark.parametrize(
    "content",
    [
        b"[" * 3000 + b"]" * 3000,  # deeper than any parser's recursion limit
        b'{"items": ["\xff\xfe"]}',  # not UTF-8
        b'{"items": [], "n": 20, "n": 21}',  # a repeated key: JSON allows it, the last wins
        b'{"items": ["' + b"x" * 3000 + b'"]}',  # one long id: unknown, not an error
    ],
    ids=["deep", "not utf-8", "repeated key", "long id"],
)
def test_odd_bodies_get_an_answer_not_a_500(limited: TestClient, content: bytes) -> None:
    response = limited.post(
        "/recommend", content=content, headers={"content-type": "application/json"}
    )
    assert response.status_code < 500
    assert response.json()["detail" if response.status_code >= 400 else "items"] is not None


def test_non_finite_floats_are_shown_as_the_client_spelled_them(limited: TestClient) -> None:
    # One display helper for every error message: JSON spelling, so NaN is not "nan".
    response = limited.post(
        "/recommend",
        content=b'{"items": [NaN, Infinity]}',
        headers={"content-type": "application/json"},
    )
    assert response.status_code == 422
    messages = [e["message"] for e in response.json()["errors"]]
    assert messages == [
        "item ids must be a string or an integer, got NaN (a float)",
        "item ids must be a string or an integer, got Infinity (a float)",
    ]


def test_overload_is_a_fast_503_with_retry_after(trained: Trained) -> None:
    settings = make_settings(trained.model_dir, max_pending=1)
    started, release = threading.Event(), threading.Event()
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(2) as pool:
        pipeline = client.app.state.pipeline  # type: ignore[attr-defined]
        model = pipeline.registry.current.recommender
        original = model.recommend_batch

        def blocking_rank(queries: Any) -> Any:
            started.set()
            assert release.wait(30)
            return original(queries)

        model.recommend_batch = blocking_rank
        try:
            # One request in the (blocked) forward pass, one waiting: the queue is full.
            in_pass = pool.submit(client.post, "/recommend", json={"items": [IDS[1]]})
            assert started.wait(30)
            queued = pool.submit(client.post, "/recommend", json={"items": [IDS[2]]})
            deadline = time.monotonic() + 30
            while pipeline.batcher.pending_rows < 1:
                assert time.monotonic() < deadline, "the second request never queued"
                time.sleep(0.01)
            refused = client.post("/recommend", json={"items": [IDS[3]]})
        finally:
            release.set()
        assert refused.status_code == 503
        assert refused.headers["retry-after"] == "1"
        assert "overloaded" in refused.json()["detail"]
        assert "MULTVAE_MAX_PENDING" in refused.json()["detail"]
        assert in_pass.result(30).status_code == 200
        assert queued.result(30).status_code == 200
        labels = {"route": "/recommend", "method": "POST", "status": "503"}
        assert metric_value(client, "multvae_http_requests_total", labels) == 1
        assert metric_value(client, "multvae_rejected_total", {"reason": "overloaded"}) == 1
        assert metric_value(client, "multvae_rejected_total", {"reason": "not_ready"}) == 0


def test_a_client_that_hangs_up_mid_body_is_a_499_not_a_500(
    trained: Trained, caplog: pytest.LogCaptureFixture
) -> None:
    messages: list[Message] = [
        {"type": "http.request", "body": b'{"items": [', "more_body": True},
        {"type": "http.disconnect"},
    ]
    sent: list[Message] = []

    async def receive() -> Message:
        return messages.pop(0)

    async def send(message: Message) -> None:
        sent.append(message)

    scope = {
        "type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "POST",
        "scheme": "http", "path": "/recommend", "raw_path": b"/recommend", "root_path": "",
        "query_string": b"", "client": ("127.0.0.1", 50000), "server": ("testserver", 80),
        "headers": [(b"content-type", b"application/json"), (b"x-request-id", b"gone-1")],
    }  # fmt: skip
    with (
        caplog.at_level(logging.INFO),
        TestClient(create_app(make_settings(trained.model_dir))) as client,
    ):
        assert client.portal is not None
        client.portal.call(client.app, scope, receive, send)
        labels = {"route": "/recommend", "method": "POST"}
        assert metric_value(client, "multvae_http_requests_total", {**labels, "status": "499"}) == 1
        assert metric_value(client, "multvae_http_requests_total", {**labels, "status": "500"}) == 0
    assert not [m for m in sent if m["type"] == "http.response.start"]  # nobody to answer
    assert not [r for r in caplog.records if r.name == "multvae.error"]
    access = [r.__dict__ for r in caplog.records if r.name == "multvae.access"]
    assert [(a["request_id"], a["status"]) for a in access] == [("gone-1", 499)]
