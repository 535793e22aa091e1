"""Help texts name no file a fresh clone lacks (the shared data folder, REFERENCE.md)."""

from __future__ import annotations

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
