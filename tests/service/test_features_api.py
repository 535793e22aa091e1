"""Candidates, /similar, titles (``fields``), the /model summary and offline /docs, through
the real app and its lifespan."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from fastapi.testclient import TestClient
from service_support import BLOCK, IDS, Trained, cluster_of, make_settings

from multvae.artifacts import write_version
from multvae.items import ItemIndex
from service.app import create_app


def _ok(response: Any) -> dict[str, Any]:
    assert response.status_code == 200, response.text
    body: dict[str, Any] = response.json()
    return body


def _items(body: dict[str, Any]) -> list[str]:
    return [r["item"] for r in body["items"]]


# -- candidates ---------------------------------------------------------------------------------


def test_candidates_rank_only_within_the_set(trained: Trained, client: TestClient) -> None:
    history = IDS[0:5]
    candidates = [IDS[c] for c in (3, 30, 60, 7, 90, 8)] + ["not-an-item"]
    body = _ok(client.post("/recommend", json={"items": history, "n": 10,
                                                 "candidates": candidates}))  # fmt: skip
    # the history (3) never comes back, unknown candidates are ignored: 5 items remain
    assert set(_items(body)) == {IDS[c] for c in (30, 60, 7, 90, 8)}
    # the same order as the full ranking, restricted to the set
    full = _items(_ok(client.post("/recommend", json={"items": history, "n": 100})))
    assert _items(body) == [item for item in full if item in set(candidates)]
    assert cluster_of(IDS.index(_items(body)[0])) == 0  # the history's own cluster first
    expected = trained.recommender().recommend(history, 10, (), candidates)
    np.testing.assert_allclose([r["score"] for r in body["items"]],
                               [s for _, s in expected.items], rtol=1e-6)  # fmt: skip


def test_candidates_in_a_batch_and_with_exclude(client: TestClient) -> None:
    requests = [
        {"items": IDS[0:3], "n": 5, "candidates": IDS[50:60], "exclude": IDS[50:55]},
        {"items": IDS[0:3], "n": 5},
        {"items": [], "n": 3, "candidates": [IDS[99], IDS[1]]},  # cold start: popularity
    ]
    results = _ok(client.post("/recommend/batch", json={"requests": requests}))["results"]
    assert set(_items(results[0])) <= set(IDS[55:60])
    assert len(results[0]["items"]) == 5
    assert {cluster_of(IDS.index(i)) for i in _items(results[1])} == {0}
    assert set(_items(results[2])) == {IDS[99], IDS[1]}
    assert results[2]["fallback"] == "popularity"
    empty = _ok(client.post("/recommend", json={"items": IDS[0:3], "candidates": []}))
    assert empty["items"] == []


@pytest.fixture(params=["memory", "redis"])
def cached_client(request: pytest.FixtureRequest, trained: Trained) -> Iterator[TestClient]:
    redis_url = request.getfixturevalue("redis_server").url if request.param == "redis" else None
    settings = make_settings(
        trained.model_dir, redis_url=redis_url, cache_prefix=f"t{uuid.uuid4().hex[:8]}"
    )
    with TestClient(create_app(settings)) as client:
        yield client


def test_candidates_are_part_of_the_cache_key(cached_client: TestClient) -> None:
    def post(candidates: list[str] | None) -> dict[str, Any]:
        body = {"items": IDS[0:4], "n": 3, "candidates": candidates}
        return _ok(cached_client.post("/recommend", json=body))

    first, second = IDS[10:20], IDS[60:70]
    a = post(first)
    b = post(second)
    assert (a["cached"], b["cached"]) == (False, False)
    assert set(_items(a)) <= set(first)
    assert set(_items(b)) <= set(second)
    assert post(list(reversed(first))) == {**a, "cached": True}  # order does not matter
    unrestricted = post(None)
    assert unrestricted["cached"] is False
    assert _items(unrestricted) != _items(b)  # the history is of cluster 0, b outside it


def test_candidates_are_bounded(trained: Trained) -> None:
    settings = make_settings(trained.model_dir, max_candidates=3)
    with TestClient(create_app(settings)) as client:
        response = client.post("/recommend", json={"items": [IDS[0]], "candidates": IDS[:4]})
        assert response.status_code == 422
        assert response.json()["errors"] == [{
            "field": "candidates",
            "message": "at most 3 item ids are accepted (MULTVAE_MAX_CANDIDATES), got 4",
        }]  # fmt: skip
        bad = client.post("/recommend", json={"items": [], "candidates": "1000"})
        assert bad.status_code == 422
        assert bad.json()["errors"][0]["field"] == "candidates"


# -- /similar -----------------------------------------------------------------------------------


def test_similar_items_come_from_the_items_cluster(trained: Trained, client: TestClient) -> None:
    for c in range(4):
        item = IDS[c * BLOCK + 2]
        body = _ok(client.post("/similar", json={"item": item, "n": 10}))
        assert body["item"] == item
        assert body["model_version"] == trained.version
        assert item not in _items(body)
        assert [cluster_of(IDS.index(i)) for i in _items(body)] == [c] * 10
        expected = trained.recommender().similar(item, 10)
        assert body["items"] == [{"item": i, "score": pytest.approx(s, rel=1e-5)}
                                 for i, s in expected.items]  # fmt: skip
    assert len(_ok(client.post("/similar", json={"item": 1000}))["items"]) == 10  # default n


def test_similar_takes_exclude_and_candidates(client: TestClient) -> None:
    body = {"item": IDS[0], "n": 5, "exclude": [IDS[1]], "candidates": [IDS[0], IDS[1], IDS[2],
            IDS[80]]}  # fmt: skip
    assert _items(_ok(client.post("/similar", json=body))) == [IDS[2], IDS[80]]


def test_similar_errors_say_what_is_accepted(client: TestClient) -> None:
    unknown = client.post("/similar", json={"item": "ghost"})
    assert unknown.status_code == 422
    assert unknown.json()["errors"][0]["field"] == "item"
    assert "'ghost' is not one of the 100 items" in unknown.json()["detail"]
    missing = client.post("/similar", json={"n": 3})
    assert missing.status_code == 422
    assert missing.json()["errors"] == [{"field": "item", "message": "this field is required"}]
    extra = client.post("/similar", json={"item": IDS[0], "items": [IDS[1]]})
    assert extra.status_code == 422
    assert "accepted fields are" in extra.json()["detail"]
    too_many = client.post("/similar", json={"item": IDS[0], "n": 101})
    assert too_many.status_code == 422
    assert "MULTVAE_MAX_N" in too_many.json()["detail"]


def test_similar_needs_the_key_when_one_is_set(trained: Trained) -> None:
    with TestClient(create_app(make_settings(trained.model_dir, api_key="k"))) as client:
        assert client.post("/similar", json={"item": IDS[0]}).status_code == 401
        ok = client.post("/similar", json={"item": IDS[0]}, headers={"X-API-Key": "k"})
        assert ok.status_code == 200


# -- titles -------------------------------------------------------------------------------------


@pytest.fixture
def titled(trained: Trained, tmp_path: Path) -> Iterator[TestClient]:
    titles: list[str | None] = [f"Movie {item}" for item in IDS]
    titles[5] = None  # the dataset had no title for this one
    items = ItemIndex.build(IDS, trained.items.popularity, titles)
    write_version(tmp_path, trained.model, items, {"validation": {"ndcg@100": 0.5}})
    with TestClient(create_app(make_settings(tmp_path))) as client:
        yield client


def test_titles_only_when_asked(titled: TestClient) -> None:
    plain = _ok(titled.post("/recommend", json={"items": IDS[0:3], "n": 5}))
    assert all(set(r) == {"item", "score"} for r in plain["items"])
    asked = _ok(titled.post("/recommend", json={"items": IDS[0:3], "n": 5, "fields": ["title"]}))
    # the cache keeps answers as sent: the titled one is an entry of its own
    assert asked["cached"] is False
    again = titled.post("/recommend", json={"items": IDS[0:3], "n": 5, "fields": ["title"]})
    assert _ok(again) == {**asked, "cached": True}
    assert [r["title"] for r in asked["items"]] == [f"Movie {r['item']}" for r in plain["items"]]
    candidates = {"candidates": [IDS[5], IDS[6]], "fields": ["title"]}
    similar = _ok(titled.post("/similar", json={"item": IDS[0], **candidates}))
    assert {r["item"]: r["title"] for r in similar["items"]} == {IDS[5]: None, IDS[6]: "Movie 1006"}
    batch = _ok(
        titled.post(
            "/recommend/batch",
            json={
                "requests": [
                    {"items": [IDS[0]], "n": 2, "fields": ["title"]},
                    {"items": [IDS[0]], "n": 2},
                ]
            },
        )
    )
    assert "title" in batch["results"][0]["items"][0]
    assert "title" not in batch["results"][1]["items"][0]


def test_titles_are_null_for_a_version_without_titles(client: TestClient) -> None:
    body = _ok(client.post("/recommend", json={"items": [IDS[0]], "n": 2, "fields": ["title"]}))
    assert [r["title"] for r in body["items"]] == [None, None]


def test_unknown_fields_are_refused_with_the_accepted_ones(client: TestClient) -> None:
    response = client.post("/recommend", json={"items": [], "fields": ["title", "genre"]})
    assert response.status_code == 422
    assert response.json()["errors"] == [
        {"field": "fields[1]", "message": "expected one of 'title', got \"genre\""}
    ]


# -- /model, /docs, the 415 -------------------------------------------------------------------


def test_model_is_a_summary_without_the_per_epoch_history(trained: Trained, tmp_path: Path) -> None:
    metrics = {
        "validation": {"metrics": {"ndcg@100": {"mean": 0.4, "se": 0.01}}, "users": 40,
                       "quintiles": [{"quintile": q, "mean": 0.3} for q in range(1, 6)]},
        "test": {"metrics": {"ndcg@100": {"mean": 0.38, "se": 0.01}}, "users": 40},
        "best_epoch": 28, "beta": 0.2, "train_seconds": 9.5,
        "history": [{"epoch": e, "loss": 1.0 / e} for e in range(1, 400)],
        "anneal_search": [{"beta": 0.1}],
    }  # fmt: skip
    write_version(tmp_path, trained.model, trained.items, metrics)
    with TestClient(create_app(make_settings(tmp_path))) as client:
        response = client.get("/model")
    assert response.status_code == 200
    assert len(response.content) < 2000
    assert response.json()["metrics"] == {
        "validation": {"metrics": {"ndcg@100": {"mean": 0.4, "se": 0.01}}, "users": 40},
        "test": {"metrics": {"ndcg@100": {"mean": 0.38, "se": 0.01}}, "users": 40},
        "best_epoch": 28, "beta": 0.2, "train_seconds": 9.5,
    }  # fmt: skip


def test_docs_work_offline(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn" not in page.text.lower()
    assert "https://" not in page.text
    assets = [part.split('"')[1] for part in page.text.split("src=")[1:]]
    assets += [part.split('"')[1] for part in page.text.split('rel="stylesheet" href=')[1:]]
    assert any(a.endswith("swagger-ui-bundle.js") for a in assets)
    for asset in assets:
        response = client.get(asset)
        assert response.status_code == 200, asset
        assert len(response.content) > 10_000
    assert client.get("/openapi.json").json()["openapi"].startswith("3.")


def test_the_415_says_how_to_fix_it(client: TestClient) -> None:
    # what `curl -d '{"items": [...]}'` sends: form-encoded
    response = client.post(
        "/recommend", content=b'{"items": ["1000"]}',
        headers={"content-type": "application/x-www-form-urlencoded"},
    )  # fmt: skip
    assert response.status_code == 415
    detail = response.json()["detail"]
    assert "'application/x-www-form-urlencoded'" in detail
    assert "send the header 'Content-Type: application/json'" in detail
    assert "-H 'Content-Type: application/json'" in detail


def test_openapi_documents_similar_candidates_and_fields(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    operation = spec["paths"]["/similar"]["post"]
    ref = operation["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    assert ref == "#/components/schemas/SimilarRequest"
    schemas = spec["components"]["schemas"]
    assert schemas["SimilarRequest"]["required"] == ["item"]
    for body in ("RecommendRequest", "SimilarRequest"):
        assert {"candidates", "fields", "exclude"} <= set(schemas[body]["properties"])
    assert "title" in schemas["ScoredItem"]["properties"]
