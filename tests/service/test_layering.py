"""The service depends on the shared core only: never on training (DESIGN.md section 2)."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import service

SERVICE_DIR = Path(service.__file__).parent


def _imported_modules(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_service_module_imports_training() -> None:
    files = sorted(SERVICE_DIR.glob("*.py"))
    assert len(files) >= 10  # the scan does see the package
    offenders = {
        f.name: sorted(m for m in _imported_modules(f) if m.split(".")[0] == "training")
        for f in files
    }
    assert {k: v for k, v in offenders.items() if v} == {}


def test_imports_stay_light_and_never_reach_training() -> None:
    # One interpreter, two checkpoints: after service.cli (what `multvae --help` imports),
    # then after the whole app.
    code = (
        "import sys\n"
        "import service.cli\n"
        "print(' '.join(sys.modules))\n"
        "import service.app\n"
        "print(' '.join(sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout.splitlines()
    after_cli, after_app = ({m.split(".")[0] for m in line.split()} for line in out)
    heavy = {"torch", "fastapi", "uvicorn", "starlette", "redis", "prometheus_client"}
    assert not after_cli & heavy  # they wait for `multvae serve`
    assert {"fastapi", "redis", "prometheus_client"} <= after_app  # the checkpoint works
    assert "training" not in after_app
