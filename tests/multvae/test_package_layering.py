"""Arrows only point down (DESIGN.md section 2): training and multvae never reach the web stack."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path


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


def _project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (late imports too)."""
    root = Path(__file__).resolve().parents[2]
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts): path
        for package in ("multvae", "training", "service")
        for path in (root / package).glob("*.py")
    }
    graph: dict[str, set[str]] = {}
    for name, path in modules.items():
        found = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                targets = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            found |= {t for t in targets if t in modules and t != name}
        graph[name] = found
    return graph


def test_no_import_cycles_in_the_project() -> None:
    graph = _project_imports()
    assert "training.netflix" in graph["training.readers"]  # the scan sees late imports too
    cycles = []
    state: dict[str, int] = {}  # 1: on the current path, 2: done

    def visit(module: str, path: list[str]) -> None:
        state[module] = 1
        for target in sorted(graph[module]):
            if state.get(target) == 1:
                cycles.append([*path[path.index(target) :], target])
            elif target not in state:
                visit(target, [*path, target])
        state[module] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    assert cycles == []
