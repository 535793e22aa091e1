"""``multvae recommend`` and ``multvae similar`` give what the service gives for the same
input, with the titles the version knows."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_support import IDS, Trained, make_settings

from multvae.artifacts import write_version
from multvae.items import ItemIndex
from multvae_cli import main
from service.app import create_app


@pytest.fixture
def titled_dir(trained: Trained, tmp_path: Path) -> Path:
    titles: list[str | None] = [f"Movie {item}" for item in IDS]
    titles[7] = None
    items = ItemIndex.build(IDS, trained.items.popularity, titles)
    write_version(tmp_path, trained.model, items, {})
    return tmp_path


def _cli(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[str, str]:
    assert main([*argv, "--device", "cpu"]) == 0
    captured = capsys.readouterr()
    return captured.out, captured.err


def test_recommend_command_equals_the_app(
    titled_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    history = [IDS[0], IDS[3], IDS[26], "unknown"]
    body = {"items": history, "n": 8, "exclude": [IDS[1]], "candidates": IDS[:60],
            "fields": ["title"]}  # fmt: skip
    with TestClient(create_app(make_settings(titled_dir))) as client:
        app = client.post("/recommend", json=body).json()
    argv = ["recommend", str(titled_dir), ",".join(history), "-n", "8", "--exclude", IDS[1],
            "--candidates", ",".join(IDS[:60])]  # fmt: skip
    out, _ = _cli(capsys, *argv, "--json")
    cli = json.loads(out)
    assert cli["items"] == app["items"]  # items, scores and titles
    assert (cli["unknown_items"], cli["model_version"]) == (["unknown"], app["model_version"])
    table, err = _cli(capsys, *argv)
    assert "ignored unknown item ids: unknown" in err
    rows = [line.split(None, 3) for line in table.splitlines()]
    assert [r[1] for r in rows] == [r["item"] for r in app["items"]]
    assert [r[3] if len(r) > 3 else None for r in rows] == [r["title"] for r in app["items"]]


def test_similar_command_equals_the_app(
    titled_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with TestClient(create_app(make_settings(titled_dir))) as client:
        app = client.post("/similar", json={"item": IDS[2], "n": 6, "fields": ["title"]}).json()
    out, _ = _cli(capsys, "similar", str(titled_dir), "--item", IDS[2], "-n", "6", "--json")
    assert json.loads(out) == app
    table, err = _cli(capsys, "similar", str(titled_dir), "--item", IDS[2], "-n", "6")
    assert err.strip() == f"similar to {IDS[2]} (Movie {IDS[2]})"
    assert [line.split()[1] for line in table.splitlines()] == [r["item"] for r in app["items"]]
    assert main(["similar", str(titled_dir), "--item", "ghost", "--device", "cpu"]) == 1
    assert "error: item id 'ghost' is not one of the 100 items" in capsys.readouterr().err
