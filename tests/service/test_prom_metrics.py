"""Prometheus metrics on a fresh registry per app: names, labels, buckets, values."""

from __future__ import annotations

from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from service_support import IDS, Trained, make_settings, metric_value

from service.app import create_app
from service.metrics import LATENCY_BUCKETS


def _families(client: TestClient) -> dict[str, object]:
    text = client.get("/metrics").text
    return {f.name: f for f in text_string_to_metric_families(text)}


def test_every_app_has_its_own_registry(trained: Trained) -> None:
    settings = make_settings(trained.model_dir)
    with TestClient(create_app(settings)) as a, TestClient(create_app(settings)) as b:
        a.post("/recommend", json={"items": [IDS[0]]})
        labels = {"route": "/recommend", "method": "POST", "status": "200"}
        assert metric_value(a, "multvae_http_requests_total", labels) == 1
        assert metric_value(b, "multvae_http_requests_total", labels) == 0


def test_request_counter_and_latency_by_route_template_and_status(client: TestClient) -> None:
    for _ in range(3):
        client.post("/recommend", json={"items": [IDS[1]]})
    client.post("/recommend", json={"items": [], "n": 0})
    client.get("/items/12345")  # not a route: must not become a label
    ok = {"route": "/recommend", "method": "POST", "status": "200"}
    assert metric_value(client, "multvae_http_requests_total", ok) == 3
    assert metric_value(client, "multvae_http_requests_total", {**ok, "status": "422"}) == 1
    unmatched = {"route": "unmatched", "method": "GET", "status": "404"}
    assert metric_value(client, "multvae_http_requests_total", unmatched) == 1
    assert metric_value(client, "multvae_http_request_duration_seconds_count", ok) == 3
    assert metric_value(client, "multvae_http_request_duration_seconds_bucket",
                        {**ok, "le": "2.5"}) == 3  # fmt: skip


def test_latency_buckets_resolve_below_ten_milliseconds() -> None:
    assert LATENCY_BUCKETS[0] == 0.0005
    assert LATENCY_BUCKETS[-1] == 2.5
    assert len([b for b in LATENCY_BUCKETS if b < 0.01]) >= 5
    assert list(LATENCY_BUCKETS) == sorted(LATENCY_BUCKETS)


def test_exposition_parses_and_labels_stay_bounded(trained: Trained, client: TestClient) -> None:
    sent = [IDS[5], IDS[6], "never-seen-item", "user-42"]
    client.post("/recommend", json={"items": sent, "n": 5, "exclude": [IDS[7]]})
    client.post("/recommend", json={"items": sent, "n": 5, "exclude": [IDS[7]]})  # a cache hit
    client.post("/recommend/batch", json={"requests": [{"items": [IDS[8]]}, {"items": []}]})
    families = _families(client)
    expected = {
        "multvae_http_requests", "multvae_http_request_duration_seconds", "multvae_cache_hits",
        "multvae_cache_misses", "multvae_cache_errors", "multvae_cache_bypassed",
        "multvae_batch_size", "multvae_batch_wait_seconds", "multvae_inference_seconds",
        "multvae_model_info", "multvae_model_items", "multvae_model_loaded_timestamp_seconds",
        "multvae_model_reloads", "multvae_unknown_items", "multvae_fallbacks",
    }  # fmt: skip
    assert expected <= set(families)
    assert all(name.startswith("multvae_") for name in families)
    label_values = {
        value
        for family in families.values()
        for sample in family.samples  # type: ignore[attr-defined]
        for value in sample.labels.values()
    }
    assert not label_values & {*sent, IDS[7], IDS[8], *IDS}

    def value(name: str, **labels: str) -> float:
        return next(
            s.value
            for family in families.values()
            for s in family.samples  # type: ignore[attr-defined]
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items())
        )

    assert value("multvae_cache_hits_total") == 1
    assert value("multvae_cache_misses_total") == 3
    assert value("multvae_unknown_items_total") == 4  # two unknown ids, sent twice
    assert value("multvae_fallbacks_total", kind="popularity") == 1
    assert value("multvae_model_info", version=trained.version, device="cpu") == 1
    assert value("multvae_model_items") == 100
    assert value("multvae_model_reloads_total", outcome="success", trigger="startup") == 1
    # Two passes: the single miss, then the batch's two histories together.
    assert value("multvae_batch_size_count") == 2
    assert value("multvae_batch_size_sum") == 3
    assert value("multvae_inference_seconds_count") == 2


def test_the_method_label_is_bounded(client: TestClient) -> None:
    for method in ("PROPFIND", "BREW", "X" * 50):
        assert client.request(method, "/healthz").status_code == 405
    assert client.request("OPTIONS", "/healthz").status_code == 405
    other = {"route": "/healthz", "method": "other", "status": "405"}
    assert metric_value(client, "multvae_http_requests_total", other) == 3
    options = {**other, "method": "OPTIONS"}
    assert metric_value(client, "multvae_http_requests_total", options) == 1
    methods = {
        sample.labels["method"]
        for family in _families(client).values()
        for sample in family.samples  # type: ignore[attr-defined]
        if "method" in sample.labels
    }
    assert methods <= {"GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "other"}
