"""The cache through the app: hits, version isolation, and a Redis that dies mid-test."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient
from service_support import IDS, RedisServer, Trained, free_port, make_settings, metric_value

from multvae.artifacts import write_version
from multvae.recommend import Query
from service.app import create_app
from service.cache import cache_key
from service.pipeline import LAYOUT

KEY = {"X-API-Key": "s3cret"}


@pytest.fixture(params=["memory", "redis"])
def cached_client(request: pytest.FixtureRequest, model_dir: Path) -> Iterator[TestClient]:
    redis_url = None
    if request.param == "redis":
        redis_url = request.getfixturevalue("redis_server").url
    settings = make_settings(
        model_dir,
        redis_url=redis_url,
        cache_prefix=f"t{uuid.uuid4().hex[:8]}",  # the session's Redis is shared by tests
        api_key="s3cret",
    )
    with TestClient(create_app(settings)) as client:
        yield client


def _post(client: TestClient, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/recommend", json=body, headers=KEY)
    assert response.status_code == 200, response.text
    out: dict[str, Any] = response.json()
    return out


def test_a_hit_returns_the_same_body_flagged_cached(cached_client: TestClient) -> None:
    body = {"items": [IDS[3], IDS[1], IDS[2], "unknown-1"], "n": 7, "exclude": [IDS[9]]}
    first = _post(cached_client, body)
    second = _post(cached_client, body)
    assert first["cached"] is False
    assert second == {**first, "cached": True}
    reordered = _post(cached_client, {**body, "items": [IDS[2], "unknown-1", IDS[3], IDS[1]]})
    assert reordered["cached"] is True
    assert reordered["items"] == first["items"]
    other_n = _post(cached_client, {**body, "n": 8})
    assert other_n["cached"] is False
    assert metric_value(cached_client, "multvae_cache_hits_total") == 2
    assert metric_value(cached_client, "multvae_cache_misses_total") == 2


def test_batch_mixes_hits_and_misses(cached_client: TestClient) -> None:
    _post(cached_client, {"items": [IDS[40]], "n": 5})
    response = cached_client.post(
        "/recommend/batch",
        json={"requests": [{"items": [IDS[40]], "n": 5}, {"items": [IDS[41]], "n": 5}]},
        headers=KEY,
    )
    assert [r["cached"] for r in response.json()["results"]] == [True, False]


def test_an_entry_in_another_layout_is_a_miss_and_replaced(cached_client: TestClient) -> None:
    body = {"items": [IDS[50], IDS[51]], "n": 5}
    first = _post(cached_client, body)
    pipeline = cached_client.app.state.pipeline  # type: ignore[attr-defined]
    prefix = f"{pipeline.settings.cache_prefix}:{LAYOUT}"
    key = cache_key(prefix, first["model_version"], Query([IDS[50], IDS[51]], 5))
    assert cached_client.portal is not None
    cached_client.portal.call(pipeline.near.close)  # drop this process's copy
    cached_client.portal.call(pipeline.cache.set_many, [(key, b'{"not": "a body"}')], 60.0)
    assert _post(cached_client, body) == first  # recomputed, not the foreign value
    assert _post(cached_client, body) == {**first, "cached": True}


def test_a_new_model_version_misses(cached_client: TestClient, trained: Trained) -> None:
    body = {"items": [IDS[60], IDS[61]], "n": 5}
    old = _post(cached_client, body)
    assert _post(cached_client, body)["cached"] is True
    model_dir = cached_client.app.state.settings.model_dir  # type: ignore[attr-defined]
    new_version = write_version(model_dir, trained.model, trained.items, {})
    reload = cached_client.post("/admin/reload", headers=KEY)
    assert reload.json()["version"] == new_version
    fresh = _post(cached_client, body)
    assert fresh["model_version"] == new_version != old["model_version"]
    assert fresh["cached"] is False
    assert _post(cached_client, body)["cached"] is True


def test_stopping_redis_mid_test_still_answers(
    private_redis: RedisServer, trained: Trained, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(trained.model_dir, redis_url=private_redis.url, redis_breaker_s=600)
    with TestClient(create_app(settings)) as client:
        body = {"items": [IDS[10], IDS[11]], "n": 5}
        assert client.post("/recommend", json=body).json()["cached"] is False
        assert client.post("/recommend", json=body).json()["cached"] is True
        private_redis.stop()
        for i in range(10):
            response = client.post("/recommend", json={**body, "n": 6 + i})
            assert response.status_code == 200
            assert response.json()["cached"] is False
        # The process's own copy of the entry it wrote needs no Redis.
        assert client.post("/recommend", json=body).json()["cached"] is True
        assert client.get("/readyz").status_code == 200
        errors = metric_value(client, "multvae_cache_errors_total", {"operation": "get"})
        bypassed = metric_value(client, "multvae_cache_bypassed_total")
        # The first failure opens the circuit; the rest skip the dead server.
        assert errors == 1
        assert bypassed == 10 * 2 - 1  # ten gets and ten sets, less the one that failed
    assert any("bypassing it" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("near", [10, 0])
def test_replicas_keep_near_copies_of_shared_entries(
    private_redis: RedisServer, trained: Trained, near: int
) -> None:
    settings = make_settings(
        trained.model_dir, redis_url=private_redis.url, redis_breaker_s=600,
        near_cache_entries=near,
    )  # fmt: skip
    body = {"items": [IDS[20], IDS[21]], "n": 5}
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        assert a.post("/recommend", json=body).json()["cached"] is False
        assert b.post("/recommend", json=body).json()["cached"] is True  # a's entry, via Redis
        private_redis.stop()
        assert b.post("/recommend", json=body).json()["cached"] is bool(near)
        assert metric_value(b, "multvae_cache_hits_total") == 1 + bool(near)


def test_redis_down_at_startup_is_not_fatal(trained: Trained) -> None:
    dead = f"redis://127.0.0.1:{free_port()}/0"
    settings = make_settings(trained.model_dir, redis_url=dead, redis_breaker_s=0)
    with TestClient(create_app(settings)) as client:
        assert client.get("/readyz").status_code == 200
        for i in range(3):
            assert client.post("/recommend", json={"items": [IDS[i]]}).status_code == 200
        # No breaker: every get and every set tried and failed.
        assert metric_value(client, "multvae_cache_errors_total", {"operation": "get"}) == 3
        assert metric_value(client, "multvae_cache_errors_total", {"operation": "set"}) == 3
