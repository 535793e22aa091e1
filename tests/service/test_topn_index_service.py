"""MULTVAE_TOPN_INDEX=faiss: the real app serves top-N through an index built at version load,
rebuilt with every version it swaps to; misconfiguration is one clear settings error."""

from __future__ import annotations

import copy
import sys
from importlib.util import find_spec
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from pydantic import ValidationError
from service_support import IDS, Trained, make_settings

from multvae.artifacts import load_version, write_version
from multvae.recommend import Recommender
from service.app import create_app
from service.settings import Settings

KEY = {"X-API-Key": "k"}
needs_faiss = pytest.mark.skipif(
    find_spec("faiss") is None,
    reason="faiss is not installed: pip install 'multvae-rec[faiss]' (in the dev extra)",
)
HISTORIES = [[IDS[i], IDS[(i * 7 + 3) % 100]] for i in range(0, 100, 9)]


def _served_ids(client: TestClient, history: list[str]) -> list[str]:
    response = client.post("/recommend", json={"items": history, "n": 15}, headers=KEY)
    assert response.status_code == 200, response.text
    return [r["item"] for r in response.json()["items"]]


def _exact_ids(recommender: Recommender, history: list[str]) -> list[str]:
    return [item for item, _ in recommender.recommend(history, 15).items]


@needs_faiss
def test_the_app_serves_through_the_index_and_rebuilds_it_on_reload(
    trained: Trained, model_dir: Path
) -> None:
    # An exhaustive index, so the answers must equal exact scoring's: this is about the
    # plumbing (load, serve, swap); tests/multvae/test_topn_index.py measures approximate ones.
    settings = make_settings(
        model_dir, api_key="k", topn_index="faiss", faiss_index="Flat", faiss_search="",
        faiss_margin=20,
    )  # fmt: skip
    with TestClient(create_app(settings)) as client:
        described = client.get("/model").json()["topn_index"]
        assert described["kind"] == "faiss"
        assert (described["factory"], described["search"]) == ("Flat", "")
        assert described["metric"] == "inner_product"
        assert described["probe_recall_at_100"] == 1.0  # measured at load
        registry = client.app.state.pipeline.registry  # type: ignore[attr-defined]
        first = registry.current.recommender.index
        assert first is not None
        assert first.n_items == len(IDS)
        exact = trained.recommender()
        for history in HISTORIES:
            assert _served_ids(client, history) == _exact_ids(exact, history)

        # A new version with other scores: the swap brings its own index, built from it.
        changed = copy.deepcopy(trained.model)
        with torch.no_grad():
            changed.output_layer.bias.add_(torch.linspace(-2, 2, changed.config.n_items))
        version = write_version(model_dir, changed, trained.items, {})
        assert client.post("/admin/reload", headers=KEY).json()["version"] == version
        second = registry.current.recommender.index
        assert second is not None
        assert second is not first
        new_exact = Recommender(load_version(model_dir, version).model, trained.items)
        moved = 0
        for history in HISTORIES:
            served = _served_ids(client, history)
            assert served == _exact_ids(new_exact, history)
            moved += served != _exact_ids(exact, history)
        assert moved > 0  # the new version does answer differently


def test_exact_scoring_is_the_default(trained: Trained) -> None:
    with TestClient(create_app(make_settings(trained.model_dir))) as client:
        assert client.get("/model").json()["topn_index"] == {"kind": "exact"}
        assert client.app.state.pipeline.registry.current.recommender.index is None  # type: ignore[attr-defined]


def test_faiss_selected_but_not_installed_is_one_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setitem(sys.modules, "faiss", None)  # what an absent package looks like
    with pytest.raises(ValidationError, match=r"pip install 'multvae-rec\[faiss\]'"):
        Settings(model_dir=tmp_path, topn_index="faiss")
    Settings(model_dir=tmp_path, topn_index="exact")  # exact needs no faiss


@needs_faiss
def test_bad_index_settings_are_refused_at_start_up(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="not a FAISS index-factory string"):
        Settings(model_dir=tmp_path, topn_index="faiss", faiss_index="HNSW,Nonsense")
    with pytest.raises(ValidationError, match="does not apply to a IVF64,Flat index"):
        Settings(model_dir=tmp_path, topn_index="faiss", faiss_index="IVF64,Flat",
                 faiss_search="efSearch=10")  # fmt: skip
    with pytest.raises(ValidationError, match="exact"):
        Settings(model_dir=tmp_path, topn_index="annoy")
