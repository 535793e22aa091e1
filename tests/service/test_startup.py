"""Startup: device selection, a missing model, the serve command's early errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from service_support import Trained, make_settings

from multvae.errors import DeviceError, NoModelError
from multvae_cli import main
from service.app import create_app
from service.settings import usable_cpus

no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="this host has a CUDA GPU")


@no_gpu
def test_auto_picks_the_cpu_without_a_gpu(trained: Trained) -> None:
    with TestClient(create_app(make_settings(trained.model_dir, device="auto"))) as client:
        assert client.get("/model").json()["device"] == "cpu"
        assert client.post("/recommend", json={"items": []}).status_code == 200


@no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_cuda_without_a_gpu_fails_startup_clearly(trained: Trained, device: str) -> None:
    app = create_app(make_settings(trained.model_dir, device=device))
    with pytest.raises(DeviceError, match="no CUDA GPU"), TestClient(app):
        pass


def test_an_unknown_device_fails_startup(trained: Trained) -> None:
    app = create_app(make_settings(trained.model_dir, device="tpu"))
    with pytest.raises(DeviceError, match="not one of: auto, cpu, cuda, cuda:N"), TestClient(app):
        pass


def test_no_model_fails_startup(tmp_path: Path) -> None:
    with (
        pytest.raises(NoModelError, match="no CURRENT"),
        TestClient(create_app(make_settings(tmp_path))),
    ):
        pass


@no_gpu
def test_serve_refuses_cuda_before_binding(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "--model-dir", str(trained.model_dir), "--device", "cuda", "--port", "1"])
    assert code == 1  # multvae_cli: a MultVAEError exits 1
    assert "multvae serve: error: device 'cuda' was requested" in capsys.readouterr().err


def test_serve_without_a_model_says_how_to_get_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["serve", "--model-dir", str(tmp_path), "--device", "cpu", "--port", "1"])
    assert code == 1  # multvae_cli: a MultVAEError exits 1
    err = capsys.readouterr().err
    assert "has no CURRENT model version" in err
    assert "multvae train" in err


def test_settings_come_from_the_environment(
    trained: Trained, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MULTVAE_MODEL_DIR", str(trained.model_dir))
    monkeypatch.setenv("MULTVAE_DEVICE", "cpu")
    monkeypatch.setenv("MULTVAE_MAX_N", "7")
    monkeypatch.setenv("MULTVAE_REDIS_URL", "")  # empty means "no Redis", not an error
    monkeypatch.setenv("MULTVAE_RELOAD_INTERVAL_S", "0")
    with TestClient(create_app()) as client:
        assert client.app.state.settings.redis_url is None  # type: ignore[attr-defined]
        response = client.post("/recommend", json={"items": [], "n": 8})
        assert response.status_code == 422
        assert "MULTVAE_MAX_N" in response.json()["detail"]


def test_usable_cpus_honours_a_cgroup_quota(tmp_path: Path) -> None:
    unlimited = usable_cpus(tmp_path / "missing")
    assert unlimited >= 1
    quota = tmp_path / "cpu.max"
    quota.write_text("150000 100000\n")  # 1.5 CPUs -> 2
    assert usable_cpus(quota) == min(2, unlimited)
    quota.write_text("max 100000\n")
    assert usable_cpus(quota) == unlimited
    quota.write_text("garbage\n")
    assert usable_cpus(quota) == unlimited
    assert make_settings(tmp_path, torch_threads=3).inference_threads() == 3


def test_a_bad_setting_is_one_clear_line_per_field_not_a_traceback(
    trained: Trained, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MULTVAE_MAX_N", "abc")
    monkeypatch.setenv("MULTVAE_STRICT", "maybe")
    monkeypatch.setenv("MULTVAE_HTTP", "spdy")
    monkeypatch.setenv("MULTVAE_LOG_LEVEL", "loud")
    monkeypatch.setenv("MULTVAE_API_KEY", "")  # empty is "unset", not an error
    code = main(["serve", "--model-dir", str(trained.model_dir), "--batch-max-size", "0",
                 "--port", "1"])  # fmt: skip
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "pydantic" not in err
    assert err.splitlines() == [
        "multvae serve: error: MULTVAE_MAX_N='abc' is not accepted: expected an integer",
        "multvae serve: error: MULTVAE_STRICT='maybe' is not accepted: expected true or false "
        "(also 1/0, yes/no, on/off)",
        "multvae serve: error: MULTVAE_HTTP='spdy' is not accepted: input should be 'h11' or "
        "'httptools'",
        "multvae serve: error: --batch-max-size 0 is not accepted: "
        "input should be greater than or equal to 1",
        "multvae serve: error: MULTVAE_LOG_LEVEL='loud' is not accepted: log level 'loud' is not "
        "one of critical, error, warning, info, debug",
    ]


def test_serve_help_says_which_options_read_a_variable(
    capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "Every option except --host and --port also reads its MULTVAE_*" in help_text
    for variable in ("MULTVAE_MODEL_DIR", "MULTVAE_DEVICE", "MULTVAE_REDIS_URL",
                     "MULTVAE_BATCH_WAIT_MS", "MULTVAE_BATCH_MAX_SIZE", "MULTVAE_LOG_LEVEL",
                     "MULTVAE_ACCESS_LOG", "MULTVAE_HTTP"):  # fmt: skip
        assert variable in help_text
    assert "MULTVAE_HOST" not in help_text
    assert "MULTVAE_PORT" not in help_text


def _serve_fails(model_dir: Path, capsys: pytest.CaptureFixture[str]) -> str:
    code = main(["serve", "--model-dir", str(model_dir), "--device", "cpu", "--port", "1"])
    assert code == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert err.startswith("multvae serve: error: ")
    return err


def test_serve_with_a_bad_current_or_weights_is_one_line_and_exit_1(
    model_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    current = (model_dir / "CURRENT").read_text().strip()
    weights = model_dir / "versions" / current / "model.safetensors"
    (model_dir / "CURRENT").write_text("no-such-version\n")
    assert "does not exist" in _serve_fails(model_dir, capsys)
    (model_dir / "CURRENT").write_text("../../etc\n")
    assert "does not hold a model version name" in _serve_fails(model_dir, capsys)
    (model_dir / "CURRENT").write_text(current + "\n")
    weights.write_bytes(weights.read_bytes() + b"junk")
    assert "fails verification" in _serve_fails(model_dir, capsys)


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("foo://bar", "must start with redis://, rediss:// or unix://"),
        ("redis://host:port/0", "numeric port"),
        ("redis://:s3cret@host:6379/zero", "must be a number"),
    ],
)
def test_serve_with_a_bad_redis_url_is_one_line_and_exit_1(
    trained: Trained,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    url: str,
    why: str,
) -> None:
    monkeypatch.setenv("MULTVAE_REDIS_URL", url)
    err = _serve_fails(trained.model_dir, capsys)
    assert "MULTVAE_REDIS_URL=" in err
    assert why in err
    assert "s3cret" not in err
