"""Help texts name no file a fresh clone lacks (the shared data folder, REFERENCE.md)."""

from __future__ import annotations

from pathlib import Path

import pytest

from multvae_cli import main

COMMANDS = ["train", "evaluate", "compare", "recommend", "similar", "generate", "retrain",
            "data download", "serve", "demo", "versions", "promote", "rollback"]  # fmt: skip


@pytest.mark.parametrize("command", COMMANDS)
def test_help_names_no_file_outside_the_repository(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exited:
        main([*command.split(), "--help"])
    assert exited.value.code == 0
    text = capsys.readouterr().out
    assert f"usage: multvae {command}" in text
    for missing in ("REFERENCE.md", "shared/data", "../shared"):
        assert missing not in text, f"multvae {command} --help mentions {missing}"


def test_readme_and_docs_name_no_file_outside_the_repository() -> None:
    # A fresh clone has no ../shared: the README once sent new users there (issue 12, point 4).
    root = Path(__file__).resolve().parents[2]
    for page in [root / "README.md", *sorted((root / "docs").glob("*.md"))]:
        text = page.read_text()
        for missing in ("REFERENCE.md", "shared/data", "../shared"):
            assert missing not in text, f"{page.name} mentions {missing}"
