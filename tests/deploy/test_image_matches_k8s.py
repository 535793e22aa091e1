"""The k8s manifests agree with the image: its user, port, probes and entry point, and the
distributed training Job (deploy/k8s/distributed-train) launches torchrun as the image has it.

Checked twice: against the configuration the Dockerfile declares, and against the built image
(`docker image inspect`; the image deploy/smoke-test.sh builds, $SMOKE_IMAGE). Without a Docker
engine or that image the second is skipped with the reason, except under CI=true, where .ci/run
has built it and a skip would hide a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DISTRIBUTED = K8S / "distributed-train"
DOCKERFILE = ROOT / "Dockerfile"
IMAGE = os.environ.get("SMOKE_IMAGE", "multvae-rec:smoke")


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile's final stage, continuations joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    lines = [line.strip() for line in text.splitlines()]
    parsed = [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]
    last_from = max(i for i, p in enumerate(parsed) if p[0].upper() == "FROM")
    return [(p[0].upper(), p[1] if len(p) > 1 else "") for p in parsed[last_from:]]


def _dockerfile_config() -> dict[str, Any]:
    """The final stage's settings in `docker image inspect`'s .Config shape."""
    config: dict[str, Any] = {"Entrypoint": None, "ExposedPorts": {}, "Volumes": None}
    for name, args in _instructions():
        if name == "USER":
            config["User"] = args
        elif name == "EXPOSE":
            config["ExposedPorts"] = {f"{p}/tcp": {} for p in args.split()}
        elif name == "CMD":
            config["Cmd"] = json.loads(args)
        elif name == "ENTRYPOINT":
            config["Entrypoint"] = json.loads(args)
        elif name == "HEALTHCHECK":
            config["Healthcheck"] = {"Test": ["CMD", *json.loads(args.split(" CMD ", 1)[1])]}
        elif name == "VOLUME":
            config["Volumes"] = {v: {} for v in json.loads(args)}
        elif name == "WORKDIR":
            config["WorkingDir"] = args
    return config


def _built_image_config() -> dict[str, Any]:
    docker = shutil.which("docker")
    why = None
    if docker is None:
        why = "docker is not installed"
    else:
        probe = subprocess.run([docker, "image", "inspect", IMAGE], capture_output=True,
                               text=True, check=False)  # fmt: skip
        if probe.returncode == 0:
            return dict(json.loads(probe.stdout)[0]["Config"])
        why = f"no image {IMAGE} to inspect ({probe.stderr.strip()[:200]})"
    message = f"{why}: bash deploy/smoke-test.sh builds it"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI runs the smoke test first and must check the image")
    pytest.skip(message)


@pytest.fixture(params=["dockerfile", "built image"])
def image_config(request: pytest.FixtureRequest) -> dict[str, Any]:
    if request.param == "dockerfile":
        return _dockerfile_config()
    return _built_image_config()


def _docs(kind: str) -> dict[str, dict[str, Any]]:
    found = {}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc and doc["kind"] == kind:
                found[doc["metadata"]["name"]] = doc
    return found


def _pod(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(doc["spec"]["template"]["spec"])


def _api_container() -> tuple[dict[str, Any], dict[str, Any]]:
    pod = _pod(_docs("Deployment")["multvae-api"])
    [container] = [c for c in pod["containers"] if c["name"] == "api"]
    return pod, container


def _port_number(container: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    [named] = [p for p in container["ports"] if p["name"] == port]
    return int(named["containerPort"])


def test_the_pods_run_as_the_image_user(image_config: dict[str, Any]) -> None:
    uid, _, gid = str(image_config["User"]).partition(":")
    assert uid.isdigit(), "a numeric user, so that runAsNonRoot can verify it"
    assert int(uid) > 0
    for doc in (_docs("Deployment")["multvae-api"], _docs("CronJob")["multvae-retrain"]):
        security = _pod(doc)["securityContext"]
        assert security["runAsNonRoot"] is True
        assert security["runAsUser"] == int(uid), doc["metadata"]["name"]
        assert security["runAsGroup"] == int(gid or uid), doc["metadata"]["name"]


def test_the_api_port_and_probes_are_the_images(image_config: dict[str, Any]) -> None:
    _, container = _api_container()
    [exposed] = image_config["ExposedPorts"]
    port = int(exposed.split("/")[0])
    assert [p["containerPort"] for p in container["ports"]] == [port]
    # The image's serve command listens on that port, on every interface.
    cmd = image_config["Cmd"]
    assert cmd[cmd.index("--port") + 1] == str(port)
    assert cmd[cmd.index("--host") + 1] == "0.0.0.0"
    # The image's HEALTHCHECK is readiness; Kubernetes probes the same URL for readiness.
    health = " ".join(image_config["Healthcheck"]["Test"])
    readiness = container["readinessProbe"]["httpGet"]
    assert f"127.0.0.1:{port}{readiness['path']}" in health
    assert readiness["path"] == "/readyz"
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert _port_number(container, container[probe]["httpGet"]["port"]) == port, probe


def test_the_manifests_run_the_images_entry_points(image_config: dict[str, Any]) -> None:
    _, container = _api_container()
    # The api runs the image's own command: no entry point to bypass, nothing overridden.
    assert image_config["Entrypoint"] is None
    assert image_config["Cmd"][:2] == ["multvae", "serve"]
    assert "command" not in container
    assert "args" not in container
    [retrain] = _pod(_docs("CronJob")["multvae-retrain"])["containers"]
    assert retrain["command"][0] == "multvae-trainer"
    # No anonymous volumes: the pod mounts exactly what it needs (models, data, /tmp).
    assert image_config["Volumes"] is None


def test_the_built_image_has_the_commands_the_manifests_run() -> None:
    config = _built_image_config()
    assert config["User"]  # the skip/fail logic ran: an image and an engine are here
    docker = shutil.which("docker")
    assert docker is not None
    _, container = _api_container()
    # As Kubernetes runs it: the image's user, a read-only root filesystem, /tmp writable.
    probe = subprocess.run(
        [docker, "run", "--rm", "--read-only", "--tmpfs", "/tmp", "--user", config["User"],
         "--entrypoint", "sh", IMAGE, "-c",
         "command -v multvae-trainer multvae-api multvae torchrun && id -u"],
        capture_output=True, text=True, check=False, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr
    assert probe.stdout.split()[-1] == config["User"].split(":")[0]
    assert container["securityContext"]["readOnlyRootFilesystem"] is True


def _distributed() -> dict[str, dict[str, Any]]:
    kustomization = yaml.safe_load((DISTRIBUTED / "kustomization.yaml").read_text())
    docs = [doc for name in kustomization["resources"]
            for doc in yaml.safe_load_all((DISTRIBUTED / name).read_text()) if doc]  # fmt: skip
    return {doc["kind"]: doc for doc in docs}


def test_the_distributed_job_runs_torchrun_over_the_image(image_config: dict[str, Any]) -> None:
    from torch.distributed.run import parse_args

    from multvae_cli import build_parser

    docs = _distributed()
    job, service = docs["Job"], docs["Service"]
    pod = _pod(job)
    [container] = pod["containers"]
    security = pod["securityContext"]
    uid, _, gid = str(image_config["User"]).partition(":")
    assert (security["runAsUser"], security["runAsGroup"]) == (int(uid), int(gid or uid))
    assert container["image"] == "multvae-rec"
    # The image has no ENTRYPOINT, so `command` replaces its CMD: torchrun, which the image's
    # virtualenv has with torch, runs the CLI package as a module (python -m multvae_cli).
    assert image_config["Entrypoint"] is None
    assert container["command"] == ["torchrun"]
    launch = parse_args(container["args"])
    assert (launch.module, launch.training_script) == (True, "multvae_cli")
    # The build stage installs that package into the virtualenv the final stage copies.
    assert re.search(r"^COPY multvae_cli ", DOCKERFILE.read_text(), flags=re.MULTILINE)
    # One pod per node of the rendezvous, all at once, each with its own index.
    nodes = int(launch.nnodes)
    assert job["spec"]["completionMode"] == "Indexed"
    assert job["spec"]["completions"] == job["spec"]["parallelism"] == nodes > 1
    # The rendezvous: pod 0's stable DNS name under the headless Service, on its port.
    assert launch.rdzv_backend == "c10d"
    host, port = launch.rdzv_endpoint.rsplit(":", 1)
    name = job["metadata"]["name"]
    assert service["spec"]["clusterIP"] == "None"
    assert pod["subdomain"] == service["metadata"]["name"]
    assert host == f"{name}-0.{service['metadata']['name']}"
    assert service["spec"]["selector"] == {"batch.kubernetes.io/job-name": name}
    assert [p["port"] for p in service["spec"]["ports"]] == [int(port)]
    assert [p["containerPort"] for p in container["ports"]] == [int(port)]
    # The training command is one `multvae train` accepts; a restarted rank resumes.
    args = build_parser().parse_args(launch.training_script_args)
    assert args.command == "train"
    assert args.resume is True
    mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
    assert args.out in mounts
    assert not mounts[args.out].get("readOnly", False)
    assert any(args.data.startswith(path + "/") for path in mounts)
    # Threads per process x processes fit the pod's CPU request.
    [threads] = [int(e["value"]) for e in container["env"] if e["name"] == "OMP_NUM_THREADS"]
    assert threads * int(launch.nproc_per_node) <= int(container["resources"]["requests"]["cpu"])
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]  # torchrun's files
