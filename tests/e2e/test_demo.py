"""`multvae demo` as a user runs it: steps as they happen, the answer alone, no leftovers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest


@pytest.mark.slow
def test_demo_announces_its_steps_prints_only_the_answer_and_cleans_up(tmp_path: Path) -> None:
    # It printed nothing for ~40 s, mixed the server's log lines into the answer and left
    # its temporary directory behind without a word.
    env = {k: v for k, v in os.environ.items() if not k.startswith("MULTVAE_")}
    env["TMPDIR"] = str(tmp_path)
    done = subprocess.run(
        [sys.executable, "-m", "multvae_cli", "demo", "--epochs", "2"],
        env=env, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    steps = [line for line in lines if line.startswith("[demo]")]
    assert steps[0].startswith(f"[demo] working in {tmp_path}")
    assert "removed at the end" in steps[0]
    assert [s.split()[1] for s in steps[1:5]] == ["1/4", "2/4", "3/4", "4/4"]
    assert steps[-1].startswith(f"[demo] removed {tmp_path}")
    # Between the request and the clean-up: the JSON answer and nothing else.
    start = lines.index(steps[4]) + 1
    end = lines.index(steps[-1])
    answer = json.loads("\n".join(lines[start:end]))
    assert len(answer["items"]) == 10
    assert "INFO" not in done.stdout + done.stderr  # the server's log went to its file
    assert list(tmp_path.glob("multvae-demo-*")) == []
