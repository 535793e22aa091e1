"""POST /recommend and /recommend/batch through the real app and its lifespan."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_support import BLOCK, IDS, Trained, cluster_of, make_settings, metric_value

from multvae.recommend import rank_rows
from service.app import create_app


def _ids(columns: Any) -> list[str]:
    return [IDS[int(c)] for c in columns]


def _post(client: TestClient, items: list[Any], **extra: Any) -> dict[str, Any]:
    response = client.post("/recommend", json={"items": items, **extra})
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


@pytest.mark.parametrize("batch_wait_ms", [0, 2])
def test_response_equals_offline_fold_in(trained: Trained, batch_wait_ms: float) -> None:
    fold_in = trained.split.validation.fold_in
    offline = rank_rows(trained.model, fold_in, 20)  # the path `multvae evaluate` ranks with
    recommender = trained.recommender()
    settings = make_settings(trained.model_dir, batch_wait_ms=batch_wait_ms)
    with TestClient(create_app(settings)) as client:
        for u in range(12):
            history = fold_in.indices[fold_in.indptr[u] : fold_in.indptr[u + 1]]
            body = _post(client, _ids(history), n=20)
            assert [r["item"] for r in body["items"]] == _ids(offline[u])
            expected = [score for _, score in recommender.recommend(_ids(history), 20).items]
            np.testing.assert_allclose([r["score"] for r in body["items"]], expected, rtol=1e-6)
            assert body["fallback"] is None
            assert body["model_version"] == trained.version


def test_a_cluster_history_gets_its_own_cluster(client: TestClient) -> None:
    for c in range(4):
        history = list(range(c * BLOCK, c * BLOCK + 5))
        body = _post(client, _ids(history), n=10)
        assert [cluster_of(IDS.index(r["item"])) for r in body["items"]] == [c] * 10


def test_history_and_exclude_are_never_returned(client: TestClient) -> None:
    history, exclude = _ids(range(0, 5)), _ids(range(5, 15))
    body = _post(client, history, n=100, exclude=exclude)
    returned = [r["item"] for r in body["items"]]
    assert len(returned) == 100 - 15  # everything else, no padding
    assert not set(returned) & set(history + exclude)
    scores = [r["score"] for r in body["items"]]
    assert scores == sorted(scores, reverse=True)


@pytest.mark.parametrize("history", [[], ["nope", "also-not-an-item"]])
def test_cold_start_is_the_popularity_ranking(trained: Trained, client: TestClient,
                                              history: list[str]) -> None:  # fmt: skip
    body = _post(client, history, n=5, exclude=[IDS[int(trained.items.popularity_ranking()[0])]])
    order = trained.items.popularity_ranking()[1:6]  # the most popular one was excluded
    assert body["fallback"] == "popularity"
    assert [r["item"] for r in body["items"]] == _ids(order)
    assert [r["score"] for r in body["items"]] == trained.items.popularity[order].tolist()
    assert body["unknown_items"] == history
    assert metric_value(client, "multvae_fallbacks_total", {"kind": "popularity"}) == 1


def test_unknown_ids_are_ignored_and_listed(client: TestClient) -> None:
    known = _ids(range(30, 36))
    mixed = _post(client, ["x1", *known, "x2"], n=10)
    plain = _post(client, known, n=10)
    assert mixed["items"] == plain["items"]
    assert mixed["unknown_items"] == ["x1", "x2"]
    assert plain["unknown_items"] == []
    assert metric_value(client, "multvae_unknown_items_total") == 2


def test_integer_ids_are_their_decimal_strings(client: TestClient) -> None:
    as_ints = _post(client, [int(i) for i in _ids(range(50, 56))], n=7, exclude=[int(IDS[60])])
    as_strs = _post(client, _ids(range(50, 56)), n=7, exclude=[IDS[60]])
    assert as_ints["items"] == as_strs["items"]
    assert IDS[60] not in [r["item"] for r in as_ints["items"]]


def test_strict_mode_rejects_unknown_ids_with_the_list(client: TestClient) -> None:
    response = client.post("/recommend?strict=true", json={"items": [IDS[0], "zz9", "zz8"]})
    assert response.status_code == 422
    body = response.json()
    assert body["errors"][0]["field"] == "items"
    assert "'zz9'" in body["detail"]
    assert "'zz8'" in body["detail"]
    assert "strict" in body["detail"]
    assert client.app.state.pipeline.batcher.pending_rows == 0  # type: ignore[attr-defined]
    # Unknown ids in exclude can never be returned anyway; strict does not reject them.
    ok = client.post("/recommend?strict=true", json={"items": [IDS[0]], "exclude": ["zz9"]})
    assert ok.status_code == 200


def test_strict_setting_is_the_default_and_the_query_overrides_it(trained: Trained) -> None:
    with TestClient(create_app(make_settings(trained.model_dir, strict=True))) as client:
        assert client.post("/recommend", json={"items": ["zz"]}).status_code == 422
        relaxed = client.post("/recommend?strict=false", json={"items": ["zz"]})
        assert relaxed.status_code == 200
        assert relaxed.json()["fallback"] == "popularity"


def test_batch_equals_single_calls_in_order(client: TestClient) -> None:
    requests = [
        {"items": _ids(range(0, 4)), "n": 5},
        {"items": [], "n": 3},
        {"items": _ids(range(70, 80)), "n": 8, "exclude": _ids(range(80, 85))},
        {"items": ["unknown", *_ids(range(40, 42))], "n": 4},
    ]
    response = client.post("/recommend/batch", json={"requests": requests})
    assert response.status_code == 200, response.text
    results = response.json()["results"]
    assert len(results) == len(requests)
    fresh = create_app(make_settings(client.app.state.settings.model_dir))  # type: ignore[attr-defined]
    with TestClient(fresh) as other:  # a cold cache, so singles are computed, not looked up
        for request, got in zip(requests, results, strict=True):
            single = _post(other, **request)
            assert [r["item"] for r in got["items"]] == [r["item"] for r in single["items"]]
            np.testing.assert_allclose(
                [r["score"] for r in got["items"]], [r["score"] for r in single["items"]],
                rtol=1e-6,
            )  # fmt: skip
            for field in ("unknown_items", "fallback", "model_version"):
                assert got[field] == single[field]


def test_batch_is_one_forward_pass(client: TestClient) -> None:
    requests = [{"items": _ids(range(i, i + 3)), "n": 5} for i in range(0, 60, 6)]
    assert client.post("/recommend/batch", json={"requests": requests}).status_code == 200
    assert metric_value(client, "multvae_batch_size_count") == 1
    assert metric_value(client, "multvae_batch_size_sum") == len(requests)


def test_batch_strict_names_the_request(client: TestClient) -> None:
    requests = [{"items": [IDS[0]]}, {"items": ["ghost"]}]
    response = client.post("/recommend/batch?strict=true", json={"requests": requests})
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "requests[1].items", "message": response.json()["errors"][0]["message"]}
    ]
    assert "'ghost'" in response.json()["detail"]


def test_health_ready_and_model(trained: Trained, client: TestClient) -> None:
    assert client.get("/healthz").json() == {"status": "ok"}
    ready = client.get("/readyz")
    assert ready.status_code == 200
    assert ready.json()["model_version"] == trained.version
    model = client.get("/model").json()
    assert model["version"] == trained.version
    assert model["n_items"] == 100
    assert model["device"] == "cpu"
    assert model["metrics"] == {"validation": {"ndcg@100": 0.5}}
    assert model["created_at"].startswith("20")
    assert model["architecture"]["p_dims"] == [8, 32, 100]


def test_every_response_carries_a_request_id(client: TestClient) -> None:
    generated = client.get("/healthz").headers["x-request-id"]
    assert len(generated) == 32
    echoed = client.get("/healthz", headers={"X-Request-ID": "abc-123"})
    assert echoed.headers["x-request-id"] == "abc-123"
    hostile = client.get("/healthz", headers={"X-Request-ID": "a b\tc" + "x" * 200})
    assert hostile.headers["x-request-id"] != "a b\tc" + "x" * 200
    for response in (client.get("/nowhere"), client.post("/recommend", content=b"{")):
        assert response.headers["x-request-id"]


def test_access_log_line(client: TestClient, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="multvae.access"):
        client.post("/recommend", json={"items": [IDS[1]]}, headers={"X-Request-ID": "rid-1"})
        client.post("/recommend", json={"items": [IDS[1]]}, headers={"X-Request-ID": "rid-2"})
    records = [r for r in caplog.records if r.name == "multvae.access"]
    assert [r.__dict__["request_id"] for r in records] == ["rid-1", "rid-2"]
    assert [r.__dict__["cache"] for r in records] == ["miss", "hit"]
    first = records[0].__dict__
    assert (first["method"], first["route"], first["status"]) == ("POST", "/recommend", 200)
    assert first["latency_ms"] > 0


def test_openapi_documents_the_endpoints(client: TestClient) -> None:
    # FastAPI documents what it validates: what to send, what comes back (the API key:
    # tests/service/test_api_auth.py).
    spec = client.get("/openapi.json").json()
    for path, body in (("/recommend", "RecommendRequest"), ("/recommend/batch", "BatchRequest")):
        operation = spec["paths"][path]["post"]
        assert [p["name"] for p in operation["parameters"]] == ["strict"]
        ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
        assert ref == f"#/components/schemas/{body}"
        assert spec["components"]["schemas"][body]["additionalProperties"] is False
        assert {"200", "400", "413", "415", "422", "503"} <= set(operation["responses"])
    ok = spec["paths"]["/recommend"]["post"]["responses"]["200"]["content"]["application/json"]
    assert ok["schema"]["$ref"].endswith("/RecommendResponse")
    nested = spec["components"]["schemas"]["BatchRequest"]["properties"]["requests"]["items"]
    assert nested == {"$ref": "#/components/schemas/RecommendRequest"}

    def refs(node: Any) -> Iterator[str]:
        if isinstance(node, dict):
            yield from ([node["$ref"]] if "$ref" in node else [])
            for value in node.values():
                yield from refs(value)
        elif isinstance(node, list):
            for value in node:
                yield from refs(value)

    schemas = spec["components"]["schemas"]
    for ref in refs(spec):  # every reference resolves inside the document
        assert ref.startswith("#/components/schemas/"), ref
        assert ref.rsplit("/", 1)[1] in schemas, ref
