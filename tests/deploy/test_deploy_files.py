"""Deploy files: compose and Prometheus validate, k8s manifests are safe, everything agrees.

The external validators (`docker compose`/`docker-compose`, `promtool`) are skipped with a
reason when missing, except under CI=true, where a missing tool fails the test: CI installs
them (deploy/ci-setup.sh) and must never pass by skipping. No Docker engine is needed.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version

from multvae.artifacts import current_version, list_versions, load_version
from multvae_cli import build_parser
from service.metrics import Metrics
from training.retrain import EXIT_FAILED, EXIT_KEPT, EXIT_PROMOTED, EXIT_USAGE

ROOT = Path(__file__).resolve().parents[2]
COMPOSE = ROOT / "docker-compose.yml"
PROMETHEUS = ROOT / "deploy" / "prometheus.yml"
K8S = ROOT / "deploy" / "k8s"
DASHBOARD = ROOT / "deploy" / "grafana" / "multvae-dashboard.json"
DOCKERFILE = ROOT / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"
CI_SETUP = ROOT / "deploy" / "ci-setup.sh"
TRAINER = ROOT / "deploy" / "entrypoint-trainer.sh"
API_ENTRYPOINT = ROOT / "deploy" / "entrypoint-api.sh"
DEPLOY_DOCS = ROOT / "docs" / "deploy.md"
OPERATIONS_DOCS = ROOT / "docs" / "operations.md"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is not None:
        return path
    message = f"{name} is not installed (Debian: see deploy/ci-setup.sh)"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{message}; CI must run this check, not skip it")
    pytest.skip(message)


def compose_command() -> list[str]:
    """`docker compose` when the plugin exists, else Debian's `docker-compose`."""
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return [docker, "compose"]
    return [require_tool("docker-compose")]


def run_compose(
    tmp_path: Path, env: dict[str, str], *args: str
) -> subprocess.CompletedProcess[str]:
    # An empty --env-file: a developer's .env must not decide the outcome.
    empty = tmp_path / "empty.env"
    empty.write_text("")
    clean = {k: v for k, v in os.environ.items() if not k.startswith(("MULTVAE_", "REDIS_"))}
    return subprocess.run(
        [*compose_command(), "--env-file", str(empty), "-f", str(COMPOSE), *args],
        cwd=ROOT, env={**clean, **env}, capture_output=True, text=True, check=False,
    )  # fmt: skip


def load_yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


def docs_with_deploy_section() -> list[Path]:
    """docs/deploy.md, where the README's Deploy section points."""
    assert DEPLOY_DOCS.is_file(), "no docs/deploy.md"
    return [DEPLOY_DOCS]


# -- docker compose ----------------------------------------------------------------------------


def test_compose_config_passes_on_a_fresh_clone_with_no_variable_set(tmp_path: Path) -> None:
    # No .env (run_compose passes an empty one) and no MULTVAE_*/REDIS_* variable.
    result = run_compose(tmp_path, {}, "config", "-q")
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # not even a warning about an unset variable


def test_dot_env_is_never_committed() -> None:
    probe = subprocess.run(["git", "check-ignore", "-q", ".env"], cwd=ROOT, check=False)
    assert probe.returncode == 0, ".env is not in .gitignore"


def _resolved_api(tmp_path: Path, env: dict[str, str]) -> dict[str, Any]:
    result = run_compose(tmp_path, env, "config")
    assert result.returncode == 0, result.stderr
    return dict(yaml.safe_load(result.stdout)["services"]["api"])


def _published_on(api: dict[str, Any]) -> str:
    [port] = api["ports"]
    if isinstance(port, dict):  # docker compose v2's long form
        return str(port["host_ip"])
    return str(port).rsplit(":", 2)[0]


@pytest.mark.parametrize("bind", [None, "0.0.0.0", "10.1.2.3"])
def test_the_api_entry_point_is_told_where_compose_publishes_it(
    tmp_path: Path, bind: str | None
) -> None:
    api = _resolved_api(tmp_path, {} if bind is None else {"MULTVAE_BIND": bind})
    assert _published_on(api) == (bind or "127.0.0.1")
    assert api["environment"]["MULTVAE_PUBLISHED_ON"] == (bind or "127.0.0.1")
    assert api["entrypoint"] == ["multvae-api"]
    # The entry point runs the image's command, with compose's worker count (MULTVAE_WORKERS).
    assert api["command"] == [*_docker_cmd(), "--workers", "1"]


def _run_api_entrypoint(**env: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MULTVAE_")}
    return subprocess.run(["sh", str(API_ENTRYPOINT), "echo", "served"], env={**clean, **env},
                          capture_output=True, text=True, check=False)  # fmt: skip


@pytest.mark.parametrize("published", ["127.0.0.1", "::1", "localhost"])
def test_without_a_key_the_api_serves_loopback(published: str) -> None:
    result = _run_api_entrypoint(MULTVAE_PUBLISHED_ON=published)
    assert result.returncode == 0, result.stderr
    assert result.stdout == "served\n"
    assert "MULTVAE_API_KEY is unset" in result.stderr


@pytest.mark.parametrize("published", ["0.0.0.0", "10.1.2.3", ""])
def test_without_a_key_the_api_refuses_to_be_published_beyond_loopback(published: str) -> None:
    result = _run_api_entrypoint(MULTVAE_PUBLISHED_ON=published)
    assert result.returncode == EXIT_USAGE
    assert result.stdout == ""
    assert "set MULTVAE_API_KEY" in result.stderr
    keyed = _run_api_entrypoint(MULTVAE_PUBLISHED_ON=published, MULTVAE_API_KEY="k")
    assert keyed.returncode == 0
    assert keyed.stdout == "served\n"
    assert keyed.stderr == ""


@pytest.mark.parametrize(("value", "expected"), [
    (None, "https://download.pytorch.org/whl/cpu"),
    ("", ""),  # pip's configured indexes, as CI installs torch
    ("https://download.pytorch.org/whl/cu128", "https://download.pytorch.org/whl/cu128"),
])  # fmt: skip
def test_the_torch_index_can_be_emptied_through_compose(
    tmp_path: Path, value: str | None, expected: str
) -> None:
    env = {} if value is None else {"MULTVAE_TORCH_INDEX_URL": value}
    api = _resolved_api(tmp_path, env)
    assert api["build"]["args"]["TORCH_INDEX_URL"] == expected


def _compose() -> dict[str, Any]:
    data = load_yaml(COMPOSE)
    assert isinstance(data, dict)
    return data


def test_compose_services_start_in_order_and_share_the_models_volume() -> None:
    services = _compose()["services"]
    assert set(services) >= {"redis", "api", "prometheus", "trainer"}
    api, trainer, redis = services["api"], services["trainer"], services["redis"]
    assert api["depends_on"]["redis"]["condition"] == "service_healthy"
    assert api["depends_on"]["trainer"]["condition"] == "service_completed_successfully"
    assert trainer["entrypoint"] == ["multvae-trainer"]
    assert trainer["command"] == ["bootstrap"]
    assert "models:/models" in trainer["volumes"]
    assert "models:/models:ro" in api["volumes"]
    assert any(str(p).endswith(f":{_container_port()}") for p in api["ports"])
    # A cache: a healthcheck, a memory bound and an eviction policy.
    assert redis["healthcheck"]["test"] == ["CMD", "redis-cli", "ping"]
    assert "mem_limit" in redis
    command = redis["command"]
    assert command[command.index("--maxmemory-policy") + 1] == "allkeys-lru"
    assert "--maxmemory" in command
    assert (
        "./deploy/prometheus.yml:/etc/prometheus/prometheus.yml:ro"
        in (services["prometheus"]["volumes"])
    )


def test_compose_holds_no_secret_values() -> None:
    text = COMPOSE.read_text()
    for service in _compose()["services"].values():
        for key, value in (service.get("environment") or {}).items():
            if re.search(r"KEY|PASSWORD|SECRET|TOKEN", key):
                # Only from the environment (or .env), never a literal or a default.
                assert re.fullmatch(rf"\$\{{{key}:-\}}", str(value)), (key, value)
    assert not re.search(r"(?i)password\s*[:=]\s*\S", text)


def test_nothing_is_published_beyond_loopback_by_default(tmp_path: Path) -> None:
    result = run_compose(tmp_path, {}, "config")
    assert result.returncode == 0, result.stderr
    for name, service in yaml.safe_load(result.stdout)["services"].items():
        for port in service.get("ports", []):
            host_ip = port["host_ip"] if isinstance(port, dict) else str(port).rsplit(":", 2)[0]
            assert host_ip == "127.0.0.1", (name, port)


# -- Prometheus ------------------------------------------------------------------------------


def test_prometheus_config_passes_promtool() -> None:
    promtool = require_tool("promtool")
    result = subprocess.run(
        # --syntax-only: the scrape key's credentials_file exists only inside the container.
        [promtool, "check", "config", "--syntax-only", str(PROMETHEUS)],
        capture_output=True, text=True,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr


def test_prometheus_scrapes_every_api_replica_on_the_served_port() -> None:
    config = load_yaml(PROMETHEUS)
    [job] = [j for j in config["scrape_configs"] if j["job_name"] == "multvae-api"]
    assert job.get("metrics_path", "/metrics") == "/metrics"
    [sd] = job["dns_sd_configs"]
    assert sd["names"] == ["api"]  # the compose service, one A record per replica
    assert sd["type"] == "A"
    assert "api" in _compose()["services"]
    assert sd["port"] == _container_port()
    # /metrics needs the API key; the compose service writes it where the job reads it.
    credentials = job["authorization"]["credentials_file"]
    prometheus = _compose()["services"]["prometheus"]
    assert credentials in " ".join(prometheus["entrypoint"])
    assert "MULTVAE_API_KEY" in prometheus["environment"]


# -- Dockerfile --------------------------------------------------------------------------------


def _dockerfile_lines() -> list[str]:
    """Instructions with continuation lines joined, comments dropped."""
    out: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        out.append(pending + line)
        pending = ""
    return out


def _instruction(name: str) -> list[str]:
    return [line[len(name) + 1 :].strip() for line in _dockerfile_lines()
            if line.upper().startswith(name + " ")]  # fmt: skip


def _docker_cmd() -> list[str]:
    [cmd] = _instruction("CMD")
    parsed = json.loads(cmd)  # exec form: the server is PID 1 and gets SIGTERM itself
    assert isinstance(parsed, list)
    return [str(p) for p in parsed]


def _container_port() -> int:
    [port] = _instruction("EXPOSE")
    return int(port)


def test_dockerfile_serves_one_worker_as_a_non_root_user() -> None:
    assert len(_instruction("FROM")) >= 2  # multi-stage
    cmd = _docker_cmd()
    args = build_parser().parse_args(cmd[1:])  # the CMD is valid for today's CLI
    assert cmd[0] == "multvae"
    assert args.command == "serve"
    assert args.host == "0.0.0.0"
    assert args.port == _container_port()
    [user] = _instruction("USER")
    assert user.split(":")[0].isdigit()
    assert int(user.split(":")[0]) > 0
    [healthcheck] = _instruction("HEALTHCHECK")
    assert f"127.0.0.1:{_container_port()}/readyz" in healthcheck
    assert _instruction("ARG")[0].startswith("BASE_IMAGE=")  # the CUDA switch


def test_the_docs_run_command_is_the_dockerfile_cmd() -> None:
    command = shlex.join(_docker_cmd())
    for doc in docs_with_deploy_section():
        assert f"`{command}`" in doc.read_text(), f"{doc} does not state the image's command"


def _pip_installs(text: str) -> list[str]:
    """Arguments of every `python -m pip install` in order (shell continuations joined)."""
    joined = text.replace("\\\n", " ")
    return [m.strip() for m in re.findall(r"-m pip install ([^&;\n]+)", joined)]


def _assignments(text: str, prefix: str = "") -> dict[str, str]:
    return dict(re.findall(rf"^{prefix}([A-Z_]+)=(\S+)$", text, flags=re.MULTILINE))


def test_the_image_installs_exactly_what_ci_installs() -> None:
    docker = DOCKERFILE.read_text()
    ci = CI_SETUP.read_text()
    docker_args = _assignments(docker, "ARG ")
    ci_vars = _assignments(ci)
    assert docker_args["TORCH_VERSION"] == ci_vars["TORCH_VERSION"]
    # CI may empty the index (its pip has the CPU wheel); its default is the image's.
    assert ci_vars["TORCH_INDEX_URL"] == f'"${{TORCH_INDEX_URL-{docker_args["TORCH_INDEX_URL"]}}}"'
    torch_step = '"torch==${TORCH_VERSION}" ${TORCH_INDEX_URL:+--index-url "${TORCH_INDEX_URL}"}'
    # torch, the dependency layer (stub packages), then the project; both with the faiss
    # extra, so that the image can serve MULTVAE_TOPN_INDEX=faiss.
    assert _pip_installs(docker) == [torch_step, '".[faiss]"', '".[faiss]"']
    assert _pip_installs(ci)[:2] == [torch_step, '".[faiss]"']  # the image's steps first
    # The pinned torch satisfies the project's own requirement.
    toml = (ROOT / "pyproject.toml").read_text()
    [torch_req] = [Requirement(r) for r in re.findall(r'"(torch[^"]*)"', toml)]
    assert Version(docker_args["TORCH_VERSION"]) in torch_req.specifier


def test_dockerignore_lets_in_only_what_the_image_copies() -> None:
    allowed = {line[1:].rstrip("/") for line in DOCKERIGNORE.read_text().splitlines()
               if line.startswith("!")}  # fmt: skip
    assert "*" in DOCKERIGNORE.read_text().splitlines()  # an allow-list
    copied = set()
    for args in _instruction("COPY"):
        parts = [p for p in args.split() if not p.startswith("--")]
        if "--from" in args:
            continue
        copied.update(p.removeprefix("./").rstrip("/") for p in parts[:-1])
    assert copied <= allowed, copied - allowed
    assert ".env" not in allowed


# -- the trainer entry point -------------------------------------------------------------------


def _run_trainer(tmp_path: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    # `multvae` as this checkout defines it (an installed console script may be older).
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "multvae"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m multvae_cli "$@"\n')
    shim.chmod(0o755)
    full = {
        **{k: v for k, v in os.environ.items() if not k.startswith("MULTVAE_")},
        "PATH": str(bin_dir) + os.pathsep + os.environ.get("PATH", ""),
        "MULTVAE_MODEL_DIR": str(tmp_path / "models"),
        "MULTVAE_DEMO_DATA": str(tmp_path / "data" / "demo-small.csv"),
        **env,
    }
    return subprocess.run(["sh", str(TRAINER), *args], env=full, capture_output=True, text=True,
                          check=False, timeout=300)  # fmt: skip


def test_trainer_bootstrap_builds_a_model_from_demo_data_once(tmp_path: Path) -> None:
    fast = ["--epochs", "1", "--hidden-dims", "8", "--latent-dim", "4", "--device", "cpu"]
    first = _run_trainer(tmp_path, "bootstrap", *fast)
    assert first.returncode == EXIT_PROMOTED, first.stdout + first.stderr
    assert (tmp_path / "data" / "demo-small.csv").is_file()
    served = load_version(tmp_path / "models")
    # The demo's --epochs 20 comes first, so the caller's --epochs 1 wins.
    assert served.config["training"]["epochs"] == 1
    again = _run_trainer(tmp_path, "bootstrap", *fast)
    assert again.returncode == 0
    assert "nothing to do" in again.stdout
    assert list_versions(tmp_path / "models") == [served.version]
    assert current_version(tmp_path / "models") == served.version


def test_trainer_refuses_missing_data_and_unknown_modes(tmp_path: Path) -> None:
    missing = _run_trainer(tmp_path, "retrain", MULTVAE_DATA=str(tmp_path / "nope.csv"))
    assert missing.returncode == EXIT_FAILED
    assert "does not exist" in missing.stderr
    assert not (tmp_path / "data").exists()  # no silent fall-back to the demo
    assert _run_trainer(tmp_path, "serve").returncode == EXIT_USAGE


# -- Kubernetes --------------------------------------------------------------------------------


def _manifests() -> Iterator[tuple[str, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def _by_kind(kind: str) -> dict[str, dict[str, Any]]:
    return {d["metadata"]["name"]: d for _, d in _manifests() if d["kind"] == kind}


def _pod_spec(doc: dict[str, Any]) -> dict[str, Any]:
    if doc["kind"] == "CronJob":
        return dict(doc["spec"]["jobTemplate"]["spec"]["template"]["spec"])
    return dict(doc["spec"]["template"]["spec"])


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    files = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(kustomization["resources"]) == files


def test_every_workload_has_resources_and_runs_as_non_root() -> None:
    workloads = [d for _, d in _manifests() if d["kind"] in ("Deployment", "CronJob")]
    assert {d["metadata"]["name"] for d in workloads} >= {
        "multvae-api", "multvae-redis", "multvae-retrain",
    }  # fmt: skip
    for doc in workloads:
        pod = _pod_spec(doc)
        assert pod["securityContext"]["runAsNonRoot"] is True, doc["metadata"]["name"]
        assert pod["securityContext"]["runAsUser"] > 0
        for container in pod.get("initContainers", []) + pod["containers"]:
            where = f"{doc['metadata']['name']}/{container['name']}"
            resources = container["resources"]
            assert {"cpu", "memory"} <= set(resources["requests"]), where
            assert "memory" in resources["limits"], where
            assert container["securityContext"]["allowPrivilegeEscalation"] is False, where
            assert container["securityContext"]["capabilities"]["drop"] == ["ALL"], where


def test_the_api_is_probed_on_readyz_and_healthz_as_the_image_user() -> None:
    api = _by_kind("Deployment")["multvae-api"]
    pod = _pod_spec(api)
    [container] = pod["containers"]
    [port] = container["ports"]
    assert port["containerPort"] == _container_port()
    for probe, path in (("readinessProbe", "/readyz"), ("livenessProbe", "/healthz")):
        get = container[probe]["httpGet"]
        assert get["path"] == path
        assert get["port"] in (port["name"], port["containerPort"])
    [user] = _instruction("USER")
    assert pod["securityContext"]["runAsUser"] == int(user.split(":")[0])
    assert "command" not in container
    assert "args" not in container
    [models] = [v for v in pod["volumes"] if v["name"] == "models"]
    assert models["persistentVolumeClaim"]["readOnly"] is True


def test_services_and_the_autoscaler_point_at_their_deployments() -> None:
    deployments = _by_kind("Deployment")
    for name, service in _by_kind("Service").items():
        labels = deployments[name]["spec"]["template"]["metadata"]["labels"]
        assert service["spec"]["selector"].items() <= labels.items(), name
    [hpa] = _by_kind("HorizontalPodAutoscaler").values()
    assert hpa["spec"]["scaleTargetRef"]["name"] in deployments
    assert hpa["spec"]["minReplicas"] >= 2
    config = _by_kind("ConfigMap")["multvae-config"]["data"]
    host = re.match(r"redis://([^:/]+)", config["MULTVAE_REDIS_URL"])
    assert host is not None
    assert host.group(1) in _by_kind("Service")


def test_models_volume_is_shared_and_the_cronjob_retrains_one_at_a_time() -> None:
    pvc = _by_kind("PersistentVolumeClaim")["multvae-models"]
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    cron = _by_kind("CronJob")["multvae-retrain"]
    assert cron["spec"]["concurrencyPolicy"] == "Forbid"
    job = cron["spec"]["jobTemplate"]["spec"]
    [container] = _pod_spec(cron)["containers"]
    assert container["command"] == ["multvae-trainer", "retrain"]
    # Usage errors and gate refusals fail at once; only real failures are retried.
    [rule] = job["podFailurePolicy"]["rules"]
    assert rule["action"] == "FailJob"
    assert sorted(rule["onExitCodes"]["values"]) == sorted([EXIT_USAGE, EXIT_KEPT])
    assert EXIT_FAILED not in rule["onExitCodes"]["values"]
    claims = {v["persistentVolumeClaim"]["claimName"] for v in _pod_spec(cron)["volumes"]
              if "persistentVolumeClaim" in v}  # fmt: skip
    assert "multvae-models" in claims


# -- Grafana and the Operations docs -----------------------------------------------------------


def _exported_series() -> set[str]:
    """Every series name the service's registry can expose."""
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    return {
        family.name + suffix
        for family in Metrics().registry.collect()
        for suffix in suffixes[family.type]
    }


def _families() -> set[str]:
    return {family.name for family in Metrics().registry.collect()}


def _dashboard_exprs() -> list[str]:
    dashboard = json.loads(DASHBOARD.read_text())
    panels = [p for p in dashboard["panels"] if p["type"] != "row"]
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
    exprs = []
    for panel in panels:
        assert panel["targets"], panel["title"]
        exprs += [t["expr"] for t in panel["targets"]]
    return exprs


def test_dashboard_queries_only_metrics_the_service_exports() -> None:
    exprs = _dashboard_exprs()
    used = {m for e in exprs for m in re.findall(r"\bmultvae_[a-z_]+", e)}
    assert used <= _exported_series(), used - _exported_series()
    text = "\n".join(exprs)
    for needed in (
        "multvae_http_requests_total",  # request rate
        "multvae_http_request_duration_seconds_bucket",  # latency quantiles
        "multvae_cache_hits_total",  # cache hit ratio
        "multvae_cache_misses_total",
        "multvae_batch_size_bucket",  # batch size
        "multvae_model_info",  # model version
    ):
        assert needed in text, needed
    assert "histogram_quantile(0.99" in text


def _promtool_rules(tmp_path: Path, exprs: list[str]) -> subprocess.CompletedProcess[str]:
    promtool = require_tool("promtool")
    rules = {"groups": [{"name": "check", "rules": [
        {"record": f"check:expr{i}", "expr": e} for i, e in enumerate(exprs)
    ]}]}  # fmt: skip
    path = tmp_path / "rules.yml"
    path.write_text(yaml.safe_dump(rules))
    return subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                          text=True, check=False)  # fmt: skip


def test_dashboard_promql_parses(tmp_path: Path) -> None:
    # Grafana's variables, as Grafana would substitute them.
    exprs = [e.replace("$__rate_interval", "5m").replace("$job", ".*")
             for e in _dashboard_exprs()]  # fmt: skip
    result = _promtool_rules(tmp_path, exprs)
    assert result.returncode == 0, result.stdout + result.stderr


def _alert_rules(doc: Path) -> str:
    blocks = re.findall(r"```yaml\n(.*?)```", doc.read_text(), flags=re.DOTALL)
    [rules] = [b for b in blocks if b.lstrip().startswith("groups:")]
    return str(rules)


def test_operations_docs_explain_every_metric_and_their_alerts_are_valid(tmp_path: Path) -> None:
    for doc in [OPERATIONS_DOCS]:
        text = doc.read_text()
        assert "# Operations" in text
        for family in _families():
            assert f"`{family}" in text, f"{doc} does not explain {family}"
        path = tmp_path / f"{doc.stem}-alerts.yml"
        path.write_text(_alert_rules(doc))
        promtool = require_tool("promtool")
        result = subprocess.run([promtool, "check", "rules", str(path)], capture_output=True,
                                text=True, check=False)  # fmt: skip
        assert result.returncode == 0, result.stdout + result.stderr
        alerts = [rule for group in load_yaml(path)["groups"] for rule in group["rules"]]
        assert len(alerts) >= 5
        used = {m for r in alerts for m in re.findall(r"\bmultvae_[a-z_]+", r["expr"])}
        assert used <= _exported_series(), used - _exported_series()


def test_docs_name_every_compose_variable() -> None:
    variables = set(re.findall(r"\$\{([A-Z_]+)", COMPOSE.read_text()))
    for doc in docs_with_deploy_section():
        text = doc.read_text()
        missing = {v for v in variables if v not in text}
        assert not missing, f"{doc} does not document {sorted(missing)}"
