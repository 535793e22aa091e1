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


# The service's domain: what a request does, independent of how it arrived.
DOMAIN = ("batching", "cache", "errors", "metrics", "pipeline", "registry", "settings")
WEB = {"fastapi", "starlette", "uvicorn", "httptools", "h11"}
HTTP_MODULES = {"service.app", "service.routes", "service.middleware", "service.schemas"}


def test_domain_modules_import_nothing_from_the_http_layer() -> None:
    offenders = {}
    for name in DOMAIN:
        imported = _imported_modules(SERVICE_DIR / f"{name}.py")
        bad = {m for m in imported if m.split(".")[0] in WEB or m in HTTP_MODULES}
        if bad:
            offenders[name] = sorted(bad)
    assert offenders == {}


THIRD_PARTY = {"torch", "uvicorn", "starlette", "fastapi", "logging", "pydantic", "redis"}
ROOT = SERVICE_DIR.parent


def _dotted(node: ast.AST) -> str | None:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        return ".".join([node.id, *reversed(parts)])
    return None


def _private(dotted: str) -> bool:
    return any(p.startswith("_") and not p.endswith("__") for p in dotted.split(".")[1:])


def test_nothing_reaches_into_another_projects_private_parts() -> None:
    # Private modules and attributes (`_`-prefixed, `uvicorn.protocols.*`) of the stack we
    # build on change without notice: only public API, pinned by version range.
    files = [
        f
        for d in ("multvae", "training", "service", "bench", "tests")
        for f in (ROOT / d).rglob("*.py")
    ]
    assert len(files) > 40
    offences = []
    for path in files:
        tree = ast.parse(path.read_text(), str(path))
        for node in ast.walk(tree):
            names: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.Attribute):
                dotted = _dotted(node)
                names = [dotted] if dotted else []
            for name in names:
                root = name.split(".")[0]
                if root in THIRD_PARTY and (_private(name) or name.startswith("uvicorn.protocols")):
                    offences.append(f"{path.relative_to(ROOT)}:{node.lineno}: {name}")
    assert sorted(set(offences)) == []
