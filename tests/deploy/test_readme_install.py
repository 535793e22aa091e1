"""The README's install lines do what the README says: torch's CPU build, the version CI pins."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def _install_block() -> list[str]:
    text = (ROOT / "README.md").read_text()
    section = text[text.index("## Install") :]
    block = section[section.index("```bash") : section.index("```", section.index("```bash") + 3)]
    return block.splitlines()


def test_the_readme_installs_the_cpu_build_of_the_torch_ci_pins() -> None:
    # `pip install torch==X` alone pulls the multi-GB CUDA build from PyPI on Linux.
    [line] = [line for line in _install_block() if "pip install torch" in line]
    assert "--index-url https://download.pytorch.org/whl/cpu" in line
    ci = (ROOT / "deploy" / "ci-setup.sh").read_text()
    [pinned] = re.findall(r"^TORCH_VERSION=(\S+)", ci, re.M)
    assert f"torch=={pinned} " in line
    [ci_index] = re.findall(r'TORCH_INDEX_URL="\$\{TORCH_INDEX_URL-(\S+)\}"', ci)
    assert ci_index == "https://download.pytorch.org/whl/cpu"
