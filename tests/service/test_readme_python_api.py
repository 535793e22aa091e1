"""The README's "Python API" block runs as written, against a model version whose item ids
include the ones it names."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from service_support import IDS, Trained

from multvae.artifacts import write_version
from multvae.items import ItemIndex

README = Path(__file__).resolve().parents[2] / "README.md"


def python_api_block() -> str:
    section = README.read_text().split("\n## Python API\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.DOTALL)
    assert len(blocks) == 1, "the README's Python API section has one python block"
    return str(blocks[0])


def test_the_readme_python_api_block_runs(
    trained: Trained, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:  # fmt: skip
    code = python_api_block()
    assert len(code.strip().splitlines()) <= 8
    named = re.findall(r'"(\d+)"', code)  # the ids the example asks about
    ids = [*named, *IDS[len(named) :]]
    titles = [f"Title of {item}" for item in ids]
    write_version(
        tmp_path / "models",
        trained.model,
        ItemIndex.build(ids, trained.items.popularity, titles),
        {},
    )
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Python API)", "exec"), {})
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 10
    for line in lines:
        item, score, title = line.split(" ", 2)
        assert item in ids
        assert item not in named
        assert title == f"Title of {item}"
        float(score)
