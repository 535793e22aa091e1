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
