"""deploy/build-image.sh: what each builder is handed, with a recording stand-in for `docker`.

The real builds (BuildKit and legacy) run in deploy/smoke-test.sh; these check, without an
engine, that the pip settings reach the build only as secrets (BuildKit) or only in the
build stage (legacy), that local wheels are served to it, and that nothing is left behind.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "build-image.sh"

# Records one `docker build` call: its arguments, the files it was handed, the build
# environment, and the wheel listing a find-links URL in the pip.conf serves.
FAKE_DOCKER = """#!{python}
import json, os, re, sys, urllib.request
args = sys.argv[1:]
if args[:3] == ["build", "-q", "-"]:  # build-image.sh probing for BuildKit
    sys.exit(int(os.environ["FAKE_BUILDKIT_RC"]))
if args[0] != "build":  # removing the probe's image
    sys.exit(0)
record = {{"args": args, "buildkit": os.environ.get("DOCKER_BUILDKIT")}}
secrets = [a.split(",src=") for a in args if a.startswith("id=")]
record["secrets"] = {{s[0][3:]: open(s[1]).read() for s in secrets}}
if "-f" in args:
    record["dockerfile"] = open(args[args.index("-f") + 1]).read()
if os.path.isdir(".pip-build"):
    record["pip_build"] = {{n: open(f".pip-build/{{n}}").read() for n in os.listdir(".pip-build")}}
conf = record["secrets"].get("pip.conf") or record.get("pip_build", {{}}).get("pip.conf", "")
link = re.search(r"find-links = (\\S+)", conf)
if link:
    record["served"] = urllib.request.urlopen(link.group(1), timeout=10).read().decode()
with open(os.environ["FAKE_DOCKER_LOG"], "w") as f:
    json.dump(record, f)
"""


def _build(tmp_path: Path, buildkit: bool, **env: str) -> dict[str, Any]:
    docker = tmp_path / "docker"
    docker.write_text(FAKE_DOCKER.format(python=sys.executable))
    docker.chmod(0o755)
    cert = tmp_path / "ca.pem"
    cert.write_text("-----BEGIN CERTIFICATE-----\nproxy CA\n")
    wheels = tmp_path / "wheels"
    wheels.mkdir()
    (wheels / "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl").write_bytes(b"wheel")
    log = tmp_path / "docker.json"
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MULTVAE_")},
        "DOCKER": str(docker),
        "FAKE_DOCKER_LOG": str(log),
        "FAKE_BUILDKIT_RC": "0" if buildkit else "1",
        "MULTVAE_PIP_CERT": str(cert),
        "MULTVAE_PIP_WHEELS": str(wheels),
        **env,
    }
    result = subprocess.run(["sh", str(SCRIPT), "-t", "multvae-rec:test"], cwd=ROOT, env=full,
                            capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert not (ROOT / ".pip-build").exists()  # removed after the build
    record: dict[str, Any] = json.loads(log.read_text())
    return record


def test_buildkit_gets_the_pip_settings_as_secrets(tmp_path: Path) -> None:
    record = _build(tmp_path, buildkit=True)
    assert record["buildkit"] == "1"
    assert "-f" not in record["args"]  # the Dockerfile as it is
    assert record["secrets"]["pip-cert"].startswith("-----BEGIN CERTIFICATE-----")
    conf = record["secrets"]["pip.conf"]
    assert "cert = /run/secrets/pip-cert" in conf  # where the secret is mounted
    assert "--network=host" in record["args"]  # to reach the wheel server on 127.0.0.1
    assert "torch-2.13.0+cpu-cp311-cp311-linux_x86_64.whl" in record["served"]
    assert "pip_build" not in record


def test_the_legacy_builder_gets_them_in_the_build_stage_only(tmp_path: Path) -> None:
    record = _build(tmp_path, buildkit=False)
    assert record["buildkit"] == "0"
    assert record["secrets"] == {}
    dockerfile = record["dockerfile"]
    assert "--mount" not in dockerfile
    stages = dockerfile.split("\nFROM ")
    [build] = [s for s in stages if s.startswith("${BASE_IMAGE} AS build")]
    assert "\nCOPY .pip-build/ /run/secrets/\n" in build
    assert ".pip-build" not in "".join(s for s in stages if s is not build)
    assert "cert = /run/secrets/pip-cert" in record["pip_build"]["pip.conf"]
    assert record["pip_build"]["pip-cert"].startswith("-----BEGIN CERTIFICATE-----")
    assert "torch-2.13.0+cpu" in record["served"]


def test_the_legacy_builder_can_be_forced(tmp_path: Path) -> None:
    record = _build(tmp_path, buildkit=True, MULTVAE_BUILDER="legacy")
    assert record["buildkit"] == "0"
    assert "--mount" not in record["dockerfile"]


def test_every_install_step_mounts_both_secrets() -> None:
    text = (ROOT / "Dockerfile").read_text()
    # A `# syntax=` directive would make BuildKit pull a frontend image from a registry.
    assert not any(line.replace(" ", "").startswith("#syntax=") for line in text.splitlines())
    lines = [line for line in text.replace("\\\n", " ").splitlines()
             if line.strip() and not line.startswith("#")]  # fmt: skip
    installs = [line for line in lines if line.startswith("RUN ") and "pip install" in line]
    assert len(installs) == 3
    for run in installs:
        assert "--mount=type=secret,id=pip.conf --mount=type=secret,id=pip-cert" in run, run
    # Nothing else that only BuildKit understands: the legacy builder runs the rest as is.
    assert not [line for line in lines if "--chmod" in line]
    assert "VOLUME" not in [line.split()[0] for line in lines]


@pytest.mark.parametrize(("ci", "code", "verdict"), [("", 0, "SKIP"), ("true", 1, "FAIL")])
def test_the_smoke_test_without_an_engine_skips_or_fails_under_ci(
    ci: str, code: int, verdict: str
) -> None:
    env = {**os.environ, "DOCKER_HOST": "unix:///nonexistent/docker.sock", "CI": ci}
    result = subprocess.run(["bash", str(ROOT / "deploy" / "smoke-test.sh")], env=env,
                            capture_output=True, text=True, check=False, timeout=60)  # fmt: skip
    assert result.returncode == code, result.stdout + result.stderr
    last = result.stdout.splitlines()[-1]
    assert last.startswith(f"smoke-test: {verdict}: no Docker engine reachable"), last
    assert len(result.stdout.splitlines()) == 1  # one line: the reason
