"""Arrows only point down (DESIGN.md section 2): training and multvae never reach the web stack."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
HEAVY = {"torch", "scipy", "pandas", "pyarrow", "numpy", "fastapi", "starlette", "uvicorn",
         "redis", "pydantic", "sklearn", "matplotlib"}


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
        "multvae.items, multvae.device"
    )
    assert "multvae" in loaded
    assert not loaded & {"training", "service", "fastapi", "redis"}


def test_core_names_neither_half_not_even_as_a_string() -> None:
    # importlib.import_module("training.cli") would hide the dependency from the import test.
    pattern = re.compile(r"\b(training|service)\.[a-z_]+|\b(import|from) (training|service)\b")
    offending = [
        f"{path.name}: {match.group(0)}"
        for path in sorted((ROOT / "multvae").glob("*.py"))
        for match in pattern.finditer(path.read_text())
    ]
    assert offending == []


@pytest.mark.parametrize(
    "argv",
    [["--help"], ["train", "--help"], ["retrain", "--help"], ["serve", "--help"],
     ["data", "download", "--help"], ["versions", "--help"], ["demo", "--help"]],
)
def test_help_imports_neither_torch_nor_the_web_stack(argv: list[str]) -> None:
    # `multvae --help` used to import torch and scipy for every subcommand (4 s).
    code = (
        "import sys\nfrom multvae_cli import main\n"
        f"try:\n    main({argv!r})\nexcept SystemExit:\n    pass\n"
        "sys.stderr.write(' '.join(sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert "usage: multvae" in out.stdout
    loaded = {m.split(".")[0] for m in out.stderr.split()}
    assert {"multvae_cli", "training", "service"} <= loaded  # every parser was built
    assert not loaded & HEAVY


def _project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its file (late imports too)."""
    root = Path(__file__).resolve().parents[2]
    modules = {
        ".".join(path.relative_to(root).with_suffix("").parts): path
        for package in ("multvae", "multvae_cli", "training", "service")
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


def test_the_cli_offers_every_model_kind_the_model_knows() -> None:
    from multvae.model import MODEL_KINDS
    from training.catalog import MODEL_KINDS as CLI_KINDS

    assert CLI_KINDS == MODEL_KINDS
