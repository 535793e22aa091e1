"""Arrows only point down (DESIGN.md section 2): training and multvae never reach the web stack."""

from __future__ import annotations

import subprocess
import sys


def _modules_after(statement: str) -> set[str]:
    code = f"import sys\n{statement}\nprint(' '.join(sys.modules))\n"
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    return {m.split(".")[0] for m in out.stdout.split()}


def test_training_never_imports_the_service_or_web_stack() -> None:
    loaded = _modules_after(
        "import training.cli, training.pipeline, training.retrain, training.compare, "
        "training.report, training.baselines"
    )
    assert "training" in loaded
    assert not loaded & {"service", "fastapi", "starlette", "uvicorn", "redis"}


def test_core_imports_neither_half() -> None:
    loaded = _modules_after(
        "import multvae.model, multvae.artifacts, multvae.recommend, multvae.ranking, "
        "multvae.items, multvae.device, multvae.demo"
    )
    assert "multvae" in loaded
    assert not loaded & {"training", "service", "fastapi", "redis"}
