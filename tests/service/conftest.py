"""Fixtures of the service tests; helpers and the synthetic data live in service_support."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_support import RedisServer, Trained, make_settings, train_model

from multvae.artifacts import load_version, write_version
from service.app import create_app


@pytest.fixture(scope="session")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    split, model = train_model()
    model_dir = tmp_path_factory.mktemp("models")
    version = write_version(model_dir, model, split.items, {"validation": {"ndcg@100": 0.5}})
    # Serve and compare against the model as loaded back, exactly what the service runs.
    loaded = load_version(model_dir, version)
    return Trained(split, loaded.model, version, model_dir)


@pytest.fixture
def model_dir(trained: Trained, tmp_path: Path) -> Path:
    """A private copy of the model directory, for tests that write or corrupt versions."""
    out = tmp_path / "models"
    shutil.copytree(trained.model_dir, out)
    return out


@pytest.fixture
def client(trained: Trained) -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(trained.model_dir))) as c:
        yield c


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    yield server
    server.stop()


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A server of this test's own, for tests that stop it."""
    server = RedisServer()
    yield server
    server.stop()
