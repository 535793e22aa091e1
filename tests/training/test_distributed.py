"""`multvae train` under torchrun: two gloo ranks on the CPU, against one process.

Each job is a real ``python -m torch.distributed.run --standalone`` (rendezvous on a free
port) with each rank's output in its own log file, so the tests see which rank wrote what.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from multvae.artifacts import CURRENT, list_versions, load_version, verify_version
from multvae_cli import main
from training.checkpoint import CHECKPOINT_FILE
from training.distributed import Group

ROOT = Path(__file__).resolve().parents[2]
FLAGS = [
    "--model", "multvae", "--hidden-dims", "none", "--latent-dim", "32", "--epochs", "12",
    "--heldout-users", "200", "--device", "cpu", "--quiet",
]  # fmt: skip


def _torchrun(args: list[str], logs: Path) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
        "OMP_NUM_THREADS": "1",
    }
    return subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         "--log-dir", str(logs), "--redirects", "3", *args],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600, check=False,
    )  # fmt: skip


def _rank_output(logs: Path, rank: int) -> str:
    """What the rank printed, over every attempt torchrun made."""
    files = sorted(logs.glob(f"**/attempt_*/{rank}/stdout.log"))
    assert files, f"torchrun wrote no stdout log for rank {rank} under {logs}"
    return "".join(f.read_text() for f in files)


def _train(data: Path, out: Path, logs: Path, *extra: str) -> subprocess.CompletedProcess[str]:
    return _torchrun(
        ["-m", "multvae_cli", "train", "--data", str(data), "--out", str(out), *FLAGS, *extra],
        logs,
    )


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("data") / "ratings.csv"
    assert main(["generate", "--shape", "small", "--out", str(path), "--seed", "1"]) == 0
    return path


@pytest.fixture(scope="module")
def two_ranks(data: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    work = tmp_path_factory.mktemp("two-ranks")
    run = _train(data, work / "models", work / "logs")
    assert run.returncode == 0, run.stderr[-3000:]
    return work / "models", work / "logs"


def _ndcg(model_dir: Path) -> dict[str, float]:
    return dict(load_version(model_dir).metrics["test"]["metrics"]["ndcg@100"])


def test_two_ranks_write_one_verified_version_as_good_as_one_process(
    data: Path, two_ranks: tuple[Path, Path], tmp_path: Path
) -> None:
    models, logs = two_ranks
    [version] = list_versions(models)
    verify_version(models / "versions" / version)
    assert (models / CURRENT).read_text().strip() == version
    config = json.loads((models / "versions" / version / "config.json").read_text())
    assert config["environment"]["processes"] == 2
    # Rank 0 alone reported and wrote; rank 1 trained its shards and printed nothing.
    assert f"wrote model version {version}" in _rank_output(logs, 0)
    assert "over 2 processes" in _rank_output(logs, 0)
    assert _rank_output(logs, 1).strip() == ""
    assert not (models / CHECKPOINT_FILE).exists()  # removed once the version was written

    one = tmp_path / "one"
    assert main(["train", "--data", str(data), "--out", str(one), *FLAGS]) == 0
    a, b = _ndcg(models), _ndcg(one)
    assert abs(a["mean"] - b["mean"]) <= b["se"], (a, b)
    # Same global batches, same number of updates, so the same beta schedule.
    history = load_version(models).metrics["history"]
    single = load_version(one).metrics["history"]
    assert [(h["updates"], h["beta"]) for h in history] == [
        (h["updates"], h["beta"]) for h in single
    ]


def test_a_killed_rank_fails_the_job_and_resume_finishes_it(
    data: Path, two_ranks: tuple[Path, Path], tmp_path: Path
) -> None:
    models = tmp_path / "models"
    # Rank 1 is SIGKILLed right after epoch 3: rank 0 cannot finish epoch 4.
    killed = _torchrun(
        [str(ROOT / "tests" / "training" / "kill_rank.py"), "1", "3",
         "train", "--data", str(data), "--out", str(models), *FLAGS],
        tmp_path / "logs-killed",
    )  # fmt: skip
    assert killed.returncode != 0
    assert "SIGKILL" in killed.stderr
    # Nothing under versions/, not even a temporary directory, and no CURRENT.
    assert not any((models / "versions").glob("*"))
    assert not (models / CURRENT).exists()
    assert (models / CHECKPOINT_FILE).exists()  # rank 0's last completed epoch

    resumed = _train(data, models, tmp_path / "logs-resumed", "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming the run checkpointed in" in _rank_output(tmp_path / "logs-resumed", 0)
    # The uninterrupted two-rank run's model, bit for bit.
    uninterrupted = load_version(two_ranks[0]).model.state_dict()
    for name, weights in load_version(models).model.state_dict().items():
        assert torch.equal(weights, uninterrupted[name]), name


@pytest.mark.parametrize("world", [2, 3, 5])
def test_shards_weighted_by_share_average_to_the_batch_mean(world: int) -> None:
    rows = np.arange(100, 107)  # 7 users: 5 ranks leave nobody a spare, some get 1, some 2
    losses = np.random.default_rng(0).random(200)
    weighted = []
    for rank in range(world):
        mine, weight = Group(rank=rank, world=world).shard(rows)
        assert (weight == 0) == (len(np.array_split(rows, world)[rank]) == 0)
        weighted.append(weight * losses[mine].mean())
    # DistributedDataParallel averages over the ranks: the batch mean, as in one process.
    assert np.mean(weighted) == pytest.approx(losses[rows].mean())
    parts = [Group(rank=r, world=world).shard(rows)[0] for r in range(world)]
    assert sorted(np.concatenate(parts).tolist()) == rows.tolist()


def test_shards_of_a_batch_smaller_than_the_world_keep_every_rank_stepping() -> None:
    rows = np.array([4, 9])
    shards = [Group(rank=r, world=3).shard(rows) for r in range(3)]
    assert [(s.tolist(), w) for s, w in shards] == [([4], 1.5), ([9], 1.5), ([4], 0.0)]


def test_only_train_runs_under_torchrun(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["evaluate", str(tmp_path)]) == 2
    assert "only `multvae train` runs as several processes" in capsys.readouterr().err
