"""Hot reload: a new CURRENT is picked up under load without a failed request; a version that
does not verify is refused and the old one keeps answering."""

from __future__ import annotations

import copy
import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from fastapi.testclient import TestClient
from service_support import IDS, Trained, make_settings, metric_value

from multvae.artifacts import VERSIONS, WEIGHTS, write_version
from multvae.model import MultVAE
from multvae.recommend import Recommender
from service.app import create_app

KEY = {"X-API-Key": "k"}


def _changed(model: MultVAE) -> MultVAE:
    """A different model with the same shape, so a swap shows in the scores."""
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.decoder[-1].bias.add_(torch.linspace(-1, 1, other.config.n_items))
    return other


def _wait_for(condition: Callable[[], bool], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"gave up waiting for {what}")
        time.sleep(0.02)


def test_flipping_current_under_load_loses_no_request(trained: Trained, model_dir: Path) -> None:
    settings = make_settings(model_dir, reload_interval_s=0.05)
    stop = threading.Event()
    seen: list[list[tuple[int, str]]] = [[] for _ in range(4)]

    def client_loop(client: TestClient, worker: int) -> None:
        i = 0
        while not stop.is_set():
            history = [IDS[(worker * 25 + i) % 100], IDS[(worker * 25 + i + 1) % 100]]
            response = client.post("/recommend", json={"items": history, "n": 10 + i % 5})
            version = response.json().get("model_version", "") if response.is_success else ""
            seen[worker].append((response.status_code, version))
            i += 1

    new_model = _changed(trained.model)
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(4) as pool:
        loops = [pool.submit(client_loop, client, w) for w in range(4)]
        _wait_for(lambda: all(len(s) >= 5 for s in seen), "requests on the old version")
        new_version = write_version(model_dir, new_model, trained.items, {})  # flips CURRENT
        _wait_for(
            lambda: all(s and s[-1][1] == new_version for s in seen), "every client on the new"
        )
        marks = [len(s) for s in seen]
        _wait_for(lambda: all(len(s) >= m + 5 for s, m in zip(seen, marks, strict=True)), "more")
        stop.set()
        for loop in loops:
            loop.result()
        after = client.post("/recommend", json={"items": [IDS[3], IDS[4]], "n": 10}).json()
        assert metric_value(client, "multvae_model_reloads_total",
                            {"outcome": "success", "trigger": "poll"}) == 1  # fmt: skip
        assert metric_value(client, "multvae_model_info",
                            {"version": new_version, "device": "cpu"}) == 1  # fmt: skip
        assert metric_value(client, "multvae_model_info",
                            {"version": trained.version, "device": "cpu"}) == 0  # fmt: skip

    for worker in seen:
        assert {status for status, _ in worker} == {200}
        versions = [v for _, v in worker]
        switch = versions.index(new_version)
        # Each client is sequential: once it has seen the new version it never sees the old.
        assert versions[:switch] == [trained.version] * switch
        assert set(versions[switch:]) == {new_version}
    # ...and what it serves is the new model's fold-in.
    expected = Recommender(new_model.eval(), trained.items).recommend([IDS[3], IDS[4]], 10)
    assert [r["item"] for r in after["items"]] == [item for item, _ in expected.items]


def _corrupt_and_point_current(model_dir: Path, trained: Trained) -> str:
    version = write_version(model_dir, trained.model, trained.items, {}, promote=False)
    with (model_dir / VERSIONS / version / WEIGHTS).open("ab") as fh:
        fh.write(b"garbage")
    # set_current would refuse it; a broken deploy script writes the pointer by hand.
    (model_dir / "CURRENT").write_text(version + "\n")
    return version


def test_a_corrupt_version_is_refused_and_the_old_one_serves(
    trained: Trained, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(model_dir, reload_interval_s=0.05, api_key="k")
    refused = {"outcome": "refused", "trigger": "poll"}
    with (
        caplog.at_level(logging.ERROR, logger="multvae.registry"),
        TestClient(create_app(settings)) as client,
    ):
        bad = _corrupt_and_point_current(model_dir, trained)
        _wait_for(lambda: metric_value(client, "multvae_model_reloads_total", refused) >= 1,
                  "the poller to refuse the version")  # fmt: skip
        for i in range(5):
            response = client.post("/recommend", json={"items": [IDS[i]]}, headers=KEY)
            assert response.status_code == 200
            assert response.json()["model_version"] == trained.version
        time.sleep(0.3)  # several poll intervals: the refused version is not retried each time
        assert metric_value(client, "multvae_model_reloads_total", refused) == 1
        assert client.get("/readyz").json()["model_version"] == trained.version

        # An operator asks explicitly: refused again, with the reason, and nothing changes.
        response = client.post("/admin/reload", headers=KEY)
        assert response.status_code == 409
        assert bad in response.json()["detail"]
        assert "fails verification" in response.json()["detail"]
        assert client.get("/model").json()["version"] == trained.version

        # Fixed by pointing CURRENT at a good version: taken by the admin call or the poller.
        good = write_version(model_dir, trained.model, trained.items, {})
        response = client.post("/admin/reload", headers=KEY)
        assert response.status_code == 200
        assert response.json()["version"] == good
        assert response.json()["outcome"] in ("reloaded", "unchanged")
        served = client.post("/recommend", json={"items": []}, headers=KEY).json()
        assert served["model_version"] == good
    messages = [r.getMessage() for r in caplog.records if r.name == "multvae.registry"]
    assert any(bad in m and "fails verification" in m and "refused" in m for m in messages)


def test_in_flight_requests_finish_on_the_old_model(trained: Trained, model_dir: Path) -> None:
    settings = make_settings(model_dir, api_key="k", batch_wait_ms=0)
    started, release = threading.Event(), threading.Event()
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(1) as pool:
        old = client.app.state.pipeline.registry.current.recommender  # type: ignore[attr-defined]
        original = old.recommend_batch

        def slow_rank(queries: Any) -> Any:
            started.set()
            assert release.wait(30)
            return original(queries)

        old.recommend_batch = slow_rank
        in_flight = pool.submit(client.post, "/recommend", json={"items": [IDS[7]]}, headers=KEY)
        assert started.wait(30)
        new_version = write_version(model_dir, trained.model, trained.items, {})
        assert client.post("/admin/reload", headers=KEY).json()["version"] == new_version
        release.set()
        response = in_flight.result(30)
        assert response.status_code == 200
        assert response.json()["model_version"] == trained.version
        after = client.post("/recommend", json={"items": [IDS[7]]}, headers=KEY)
        assert after.json()["model_version"] == new_version


def test_admin_reload_needs_the_key(trained: Trained) -> None:
    with TestClient(create_app(make_settings(trained.model_dir))) as client:
        disabled = client.post("/admin/reload")
        assert disabled.status_code == 403
        assert "MULTVAE_API_KEY" in disabled.json()["detail"]
    with TestClient(create_app(make_settings(trained.model_dir, api_key="k"))) as client:
        assert client.post("/admin/reload").status_code == 401
        assert client.post("/admin/reload", headers={"X-API-Key": "wrong"}).status_code == 401
        ok = client.post("/admin/reload", headers={"Authorization": "Bearer k"})
        assert ok.status_code == 200
        assert ok.json()["outcome"] == "unchanged"


@pytest.mark.parametrize("breakage", ["directory", "not utf-8"])
def test_an_unreadable_current_is_refused_never_a_500(
    trained: Trained, model_dir: Path, breakage: str, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(model_dir, api_key="k")
    current = model_dir / "CURRENT"
    with (
        caplog.at_level(logging.ERROR, logger="multvae.registry"),
        TestClient(create_app(settings)) as client,
    ):
        current.unlink()
        if breakage == "directory":
            current.mkdir()
        else:
            current.write_bytes(b"\xff\xfe\x00version")
        response = client.post("/admin/reload", headers=KEY)
        assert response.status_code == 409
        detail = response.json()["detail"]
        assert "CURRENT" in detail
        assert f"still serving {trained.version}" in detail
        assert "None" not in detail
        registry = client.app.state.pipeline.registry  # type: ignore[attr-defined]
        assert client.portal is not None
        for trigger in ("sighup", "poll"):
            result = client.portal.call(registry.reload, trigger)
            assert (result.outcome, result.version) == ("refused", trained.version)
        ok = client.post("/recommend", json={"items": [IDS[0]]}, headers=KEY)
        assert ok.json()["model_version"] == trained.version
        for trigger in ("admin", "sighup"):
            labels = {"outcome": "refused", "trigger": trigger}
            assert metric_value(client, "multvae_model_reloads_total", labels) == 1
    refusals = [r for r in caplog.records if "refused CURRENT" in r.getMessage()]
    assert len(refusals) == 2  # admin and SIGHUP; the poll repeats a known reason quietly


def test_a_missing_current_is_reported_once_per_reason_not_per_poll(
    trained: Trained, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    current = model_dir / "CURRENT"
    refused = {"outcome": "refused", "trigger": "poll"}
    with (
        caplog.at_level(logging.DEBUG, logger="multvae.registry"),
        TestClient(create_app(make_settings(model_dir))) as client,
    ):
        registry = client.app.state.pipeline.registry  # type: ignore[attr-defined]
        assert client.portal is not None

        def poll(times: int = 3) -> None:
            for _ in range(times):
                result = client.portal.call(registry.reload, "poll")  # type: ignore[union-attr]
                assert result.version == trained.version

        current.unlink()
        poll()
        assert metric_value(client, "multvae_model_reloads_total", refused) == 1
        current.mkdir()  # another reason: reported again, once
        poll()
        assert metric_value(client, "multvae_model_reloads_total", refused) == 2
        current.rmdir()
        current.write_text(trained.version + "\n")  # fixed: the next breakage counts anew
        poll(1)
        current.unlink()
        poll()
        assert metric_value(client, "multvae_model_reloads_total", refused) == 3
    records = [r for r in caplog.records if "refused CURRENT" in r.getMessage()]
    quiet = [r for r in caplog.records if "still refusing CURRENT" in r.getMessage()]
    assert [r.levelno for r in records] == [logging.ERROR] * 3
    assert len(quiet) == 6
    assert {r.levelno for r in quiet} == {logging.DEBUG}
