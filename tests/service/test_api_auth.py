"""The optional API key: /recommend* and /admin/* need it, probes stay open, never logged."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError
from service_support import IDS, Trained, make_settings

from service import routes
from service.app import create_app
from service.logs import JsonFormatter

SECRET = "k3y-Vq9-never-in-logs"


@pytest.fixture
def keyed(trained: Trained) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(trained.model_dir, api_key=SECRET))) as client:
        yield client


BODY = {"items": [IDS[0]]}
BATCH = {"requests": [BODY]}


@pytest.mark.parametrize(
    "headers",
    [{}, {"X-API-Key": "wrong"}, {"Authorization": f"Basic {SECRET}"}, {"X-API-Key": ""}],
    ids=["none", "wrong", "wrong scheme", "empty"],
)
def test_recommend_refuses_without_the_right_key(
    keyed: TestClient, headers: dict[str, str]
) -> None:
    for path, body in (("/recommend", BODY), ("/recommend/batch", BATCH)):
        response = keyed.post(path, json=body, headers=headers)
        assert response.status_code == 401
        assert "X-API-Key" in response.json()["detail"]
        assert response.headers["www-authenticate"] == "Bearer"
        assert SECRET not in response.text


@pytest.mark.parametrize(
    "headers",
    [{"X-API-Key": SECRET}, {"Authorization": f"Bearer {SECRET}"}],
    ids=["header", "bearer"],
)
def test_the_right_key_is_accepted(keyed: TestClient, headers: dict[str, str]) -> None:
    assert keyed.post("/recommend", json=BODY, headers=headers).status_code == 200
    assert keyed.post("/recommend/batch", json=BATCH, headers=headers).status_code == 200


def test_the_key_is_checked_before_the_body(keyed: TestClient) -> None:
    # An unauthenticated client learns nothing about what a valid body looks like.
    assert keyed.post("/recommend", content=b"{", headers={}).status_code == 401


def test_probes_stay_open_and_metrics_need_the_key(keyed: TestClient) -> None:
    for path in ("/healthz", "/readyz", "/model"):
        assert keyed.get(path).status_code == 200, path
    assert keyed.head("/healthz").status_code == 200
    refused = keyed.get("/metrics")
    assert refused.status_code == 401
    assert "multvae_" not in refused.text
    scraped = keyed.get("/metrics", headers={"Authorization": f"Bearer {SECRET}"})
    assert scraped.status_code == 200
    assert scraped.headers["content-type"].startswith("text/plain")
    assert "multvae_http_requests_total" in scraped.text


@pytest.mark.parametrize(
    "headers",
    [
        {"X-API-Key": f" {SECRET} "},
        {"X-API-Key": f"{SECRET}\t"},
        {"Authorization": f"Bearer  {SECRET} "},
        {"X-API-Key": "", "Authorization": f"Bearer {SECRET}"},
        {"X-API-Key": "   ", "Authorization": f"Bearer {SECRET}"},
    ],
    ids=["spaces", "tab", "bearer spaces", "empty header, bearer", "blank header, bearer"],
)
def test_keys_are_trimmed_and_an_empty_header_does_not_hide_the_bearer(
    keyed: TestClient, headers: dict[str, str]
) -> None:
    assert keyed.post("/recommend", json=BODY, headers=headers).status_code == 200


@pytest.mark.parametrize("blank", [" ", "\t  \n"])
def test_a_blank_configured_key_is_an_error_not_auth_off(trained: Trained, blank: str) -> None:
    with pytest.raises(ValidationError, match="empty or blank"):
        make_settings(trained.model_dir, api_key=blank)


def test_a_configured_key_is_trimmed(trained: Trained) -> None:
    settings = make_settings(trained.model_dir, api_key=f" {SECRET}\n")
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == SECRET


@pytest.mark.parametrize("key", [SECRET, None])
def test_start_up_says_whether_auth_is_on(
    trained: Trained, key: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO), TestClient(
        create_app(make_settings(trained.model_dir, api_key=key))
    ):
        pass
    ready = [r.getMessage() for r in caplog.records if r.getMessage().startswith("ready:")]
    assert len(ready) == 1
    if key is None:
        assert "authentication OFF" in ready[0]
    else:
        assert "API key required" in ready[0]
    assert SECRET not in ready[0]


def test_without_a_configured_key_recommend_is_open(client: TestClient) -> None:
    assert client.post("/recommend", json=BODY).status_code == 200


KEYED = [("/recommend", "post"), ("/recommend/batch", "post"), ("/similar", "post"),
         ("/metrics", "get")]  # fmt: skip


def test_openapi_documents_the_key_where_it_is_needed(
    keyed: TestClient, client: TestClient
) -> None:
    # With a key: both ways of sending it, on every route that needs it.
    doc = keyed.get("/openapi.json").json()
    schemes = doc["components"]["securitySchemes"]
    assert schemes["APIKeyHeader"] == {
        "type": "apiKey", "description": "the API key", "in": "header", "name": "X-API-Key"
    }  # fmt: skip
    assert schemes["HTTPBearer"]["scheme"] == "bearer"
    both = [{"APIKeyHeader": []}, {"HTTPBearer": []}]
    for path, method in [*KEYED, ("/admin/reload", "post")]:
        assert doc["paths"][path][method]["security"] == both, path
    # Without one those routes are open and say so; /admin/* is off without a key, and the
    # document keeps saying what it would need.
    doc = client.get("/openapi.json").json()
    for path, method in KEYED:
        assert "security" not in doc["paths"][path][method], path
    assert doc["paths"]["/admin/reload"]["post"]["security"] == both


def test_comparison_is_constant_time(keyed: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = routes.hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(routes.hmac, "compare_digest", spy)
    keyed.post("/recommend", json=BODY, headers={"X-API-Key": "guess"})
    assert calls == [(b"guess", SECRET.encode())]


def test_the_key_is_never_logged(trained: Trained, caplog: pytest.LogCaptureFixture) -> None:
    formatter = JsonFormatter()
    with caplog.at_level(logging.DEBUG):
        settings = make_settings(trained.model_dir, api_key=SECRET)
        with TestClient(create_app(settings)) as client:
            client.post("/recommend", json=BODY, headers={"X-API-Key": SECRET})
            client.post("/recommend", json=BODY, headers={"X-API-Key": SECRET + "x"})
            client.post("/admin/reload", headers={"Authorization": f"Bearer {SECRET}"})
    assert caplog.records  # the access log did write lines
    for record in caplog.records:
        assert SECRET not in formatter.format(record)
    assert SECRET not in repr(settings)
    assert SECRET not in str(settings.model_dump())
