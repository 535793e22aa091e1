"""A version must fold in to finite scores before it may serve (NaN weights are refused)."""

from __future__ import annotations

import copy
import logging
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from service_support import IDS, Trained, make_settings, metric_value

from multvae.artifacts import write_version
from multvae.errors import VerificationError
from multvae.model import MultVAE
from service.app import create_app

KEY = {"X-API-Key": "k"}


def _nan_model(model: MultVAE) -> MultVAE:
    broken = copy.deepcopy(model)
    with torch.no_grad():
        broken.decoder[-1].weight[5, 0] = float("nan")
    return broken


def test_a_nan_version_is_refused_and_the_old_one_keeps_serving(
    trained: Trained, model_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = make_settings(model_dir, api_key="k")
    with (
        caplog.at_level(logging.ERROR, logger="multvae.registry"),
        TestClient(create_app(settings)) as client,
    ):
        # write_version computes the manifest: the NaN weights verify.
        bad = write_version(model_dir, _nan_model(trained.model), trained.items, {})
        response = client.post("/admin/reload", headers=KEY)
        assert response.status_code == 409
        assert "NaN or infinite" in response.json()["detail"]
        labels = {"outcome": "refused", "trigger": "admin"}
        assert metric_value(client, "multvae_model_reloads_total", labels) == 1
        served = client.post("/recommend", json={"items": [IDS[0], IDS[1]]}, headers=KEY)
        assert served.status_code == 200
        assert served.json()["model_version"] == trained.version
        assert len(served.json()["items"]) == 20  # the default n
        assert client.get("/readyz").json()["model_version"] == trained.version
    assert any(bad in r.getMessage() and "NaN" in r.getMessage() for r in caplog.records)


def test_a_nan_version_alone_never_becomes_ready(trained: Trained, tmp_path: Path) -> None:
    write_version(tmp_path, _nan_model(trained.model), trained.items, {})
    with (
        pytest.raises(VerificationError, match="NaN or infinite"),
        TestClient(create_app(make_settings(tmp_path))),
    ):
        pass


def test_the_poller_retries_a_refused_version_with_backoff(
    trained: Trained, model_dir: Path, tmp_path: Path
) -> None:
    import asyncio
    import shutil

    from multvae.artifacts import VERSIONS
    from service.metrics import Metrics
    from service.registry import ModelRegistry

    now = [0.0]
    metrics = Metrics()
    settings = make_settings(model_dir, reload_interval_s=1.0)
    registry = ModelRegistry(settings, torch.device("cpu"), metrics, clock=lambda: now[0])
    refused = {"outcome": "refused", "trigger": "poll"}

    def refusals() -> float:
        return metrics.registry.get_sample_value("multvae_model_reloads_total", refused) or 0.0

    async def scenario() -> None:
        await registry.load_initial()
        # CURRENT is written before its version directory is visible (a shared volume).
        staging = tmp_path / "staging"
        new = write_version(staging, trained.model, trained.items, {}, promote=False)
        (model_dir / "CURRENT").write_text(new + "\n")
        assert (await registry.reload("poll")).outcome == "refused"
        assert refusals() == 1
        shutil.move(staging / VERSIONS / new, model_dir / VERSIONS / new)
        now[0] = 1.9  # inside the backoff: not tried again yet
        assert (await registry.reload("poll")).outcome == "refused"
        assert refusals() == 1
        now[0] = 2.0  # the first retry, after 2 x the poll interval
        result = await registry.reload("poll")
        assert (result.outcome, result.version) == ("reloaded", new)

        # A version that stays broken is tried at 2, 4, 8... x the interval, not every poll.
        bad = write_version(model_dir, trained.model, trained.items, {})
        (model_dir / VERSIONS / bad / "model.safetensors").write_bytes(b"garbage")
        tried = []
        for tick in range(0, 40):
            now[0] = 10.0 + tick * 0.5
            before = refusals()
            result = await registry.reload("poll")
            assert (result.outcome, result.version) == ("refused", new)
            if refusals() > before:
                tried.append(now[0] - 10.0)
        assert tried == [0.0, 2.0, 6.0, 14.0]
        await registry.stop()

    asyncio.run(scenario())
