"""Resumable training: a run stopped after any epoch and resumed ends where an uninterrupted
run ends, bit for bit (CPU, same seed), in every kind of run."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import pytest
import torch

from multvae.errors import TrainingError
from training import checkpoint
from training.catalog import Preprocessing
from training.checkpoint import Checkpointing
from training.dataset import Split
from training.preprocess import filter_interactions
from training.split import strong_generalisation_split
from training.synthetic import generate
from training.train import EpochRecord, TrainConfig, TrainResult, train

FAST: dict[str, Any] = {"device": "cpu", "latent_dim": 32, "hidden_dims": ()}


class StoppedError(Exception):
    """The process died here (after the epoch's checkpoint)."""


@pytest.fixture(scope="module")
def split() -> Split:
    inter, _ = filter_interactions(generate("small", seed=5), Preprocessing(3.5, 5, 0))
    return strong_generalisation_split(inter, 150, seed=98765)


def _checkpointing(path: Path, config: TrainConfig, resume: bool) -> Checkpointing:
    return Checkpointing(path, resume, checkpoint.identity("data", config.to_dict()))


def _stop_after(calls: int) -> Any:
    seen: list[EpochRecord] = []

    def hook(record: EpochRecord) -> None:
        seen.append(record)
        if len(seen) == calls:
            raise StoppedError

    return hook


def _same(a: TrainResult, b: TrainResult) -> None:
    for (name, wa), wb in zip(
        a.model.state_dict().items(), b.model.state_dict().values(), strict=True
    ):
        assert torch.equal(wa, wb), name
    assert (a.best_epoch, a.best_val_ndcg, a.beta) == (b.best_epoch, b.best_val_ndcg, b.beta)
    drop = ("seconds", "users_per_s")  # wall-clock
    rows = [{k: v for k, v in vars(r).items() if k not in drop} for r in a.history]
    assert rows == [{k: v for k, v in vars(r).items() if k not in drop} for r in b.history]
    assert [r.val_ndcg_at_100 for r in a.anneal_search] == [
        r.val_ndcg_at_100 for r in b.anneal_search
    ]


CASES = {
    # (config, stop after this many epoch reports)
    "multvae": (TrainConfig(model="multvae", epochs=5, patience=None, **FAST), 2),
    # patience 1 stops it after epoch 4 of 8; resumed from that epoch, it stays stopped
    "multdae early stop": (TrainConfig(model="multdae", epochs=8, patience=1, lr=3e-2, **FAST), 2),
    "multdae at its early stop": (
        TrainConfig(model="multdae", epochs=8, patience=1, lr=3e-2, **FAST), 4
    ),
    # anneal_cap="auto" trains twice: stopped in the search, and in the final run
    "auto cap, search": (
        TrainConfig(model="multvae", epochs=3, anneal_cap="auto", patience=None, **FAST), 2
    ),
    "auto cap, final": (
        TrainConfig(model="multvae", epochs=3, anneal_cap="auto", patience=None, **FAST), 4
    ),
    # validation drops at epoch 4, which freezes beta at epoch 3's 0.275 for epochs 5 and 6
    "auto-single": (
        TrainConfig(model="multvae", epochs=6, anneal_cap="auto-single", total_anneal_steps=40,
                    lr=3e-2, patience=None, **FAST), 4,
    ),
    # the sampled softmax: SparseAdam for the two I-row tables, Adam for the rest; the DAE's
    # L2 penalty on the rows each batch touches
    "sampled softmax": (
        TrainConfig(model="multvae", epochs=4, sampled_softmax=30, patience=None, **FAST), 2
    ),
    "sampled softmax, multdae": (
        TrainConfig(model="multdae", epochs=4, sampled_softmax=30, lr=3e-2, patience=None,
                    **FAST), 3,
    ),
    # two optimisers and the previous epoch's encoder
    "recvae": (
        TrainConfig(model="recvae", epochs=3, hidden_dims=(32,), patience=None, encoder_epochs=1,
                    device="cpu", latent_dim=16), 2,
    ),
}


@pytest.mark.parametrize("case", CASES)
def test_a_stopped_run_resumes_to_the_uninterrupted_result(
    split: Split, tmp_path: Path, case: str
) -> None:
    config, stop = CASES[case]
    uninterrupted = train(split, config)
    if case.startswith("multdae"):
        assert len(uninterrupted.history) == 4
    if case == "auto-single":
        assert [round(r.beta, 3) for r in uninterrupted.history][-3:] == [0.375, 0.275, 0.275]
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    with pytest.raises(StoppedError):
        train(split, config, on_epoch=_stop_after(stop),
              checkpointing=_checkpointing(path, config, resume=False))  # fmt: skip
    resumed = train(split, config, checkpointing=_checkpointing(path, config, resume=True))
    _same(resumed, uninterrupted)


def test_resume_refuses_another_runs_checkpoint_and_no_resume_starts_afresh(
    split: Split, tmp_path: Path
) -> None:
    config = TrainConfig(model="multdae", epochs=3, patience=None, **FAST)
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    with pytest.raises(StoppedError):
        train(split, config, on_epoch=_stop_after(1),
              checkpointing=_checkpointing(path, config, resume=False))  # fmt: skip
    other = dataclasses.replace(config, lr=2e-3)
    with pytest.raises(TrainingError, match=r"belongs to another run \(lr 0.001 then, 0.002 now"):
        train(split, other, checkpointing=_checkpointing(path, other, resume=True))
    # Another device is the same run.
    moved = dataclasses.replace(config, device="auto")
    assert _checkpointing(path, moved, True).identity == _checkpointing(path, config, True).identity
    # Without --resume the checkpoint is replaced by a run from the start.
    fresh = train(split, config, checkpointing=_checkpointing(path, config, resume=False))
    _same(fresh, train(split, config))
    assert torch.load(path, weights_only=True)["run"]["epoch"] == 3


def test_a_damaged_checkpoint_is_a_clear_error(split: Split, tmp_path: Path) -> None:
    config = TrainConfig(model="multdae", epochs=1, patience=None, **FAST)
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(TrainingError, match=r"cannot read the checkpoint .* delete it"):
        train(split, config, checkpointing=_checkpointing(path, config, resume=True))


def test_a_sampled_softmax_checkpoint_with_one_optimiser_is_a_clear_error(
    split: Split, tmp_path: Path
) -> None:
    # Before the lazy optimiser, a --sampled-softmax run checkpointed one dense Adam.
    config = TrainConfig(model="multdae", epochs=2, sampled_softmax=30, patience=None, **FAST)
    path = tmp_path / checkpoint.CHECKPOINT_FILE
    with pytest.raises(StoppedError):
        train(split, config, on_epoch=_stop_after(1),
              checkpointing=_checkpointing(path, config, resume=False))  # fmt: skip
    state = torch.load(path, weights_only=True)
    assert len(state["optimisers"]) == 2  # SparseAdam for the two tables, Adam for the rest
    state["optimisers"] = state["optimisers"][1:]
    torch.save(state, path)
    with pytest.raises(TrainingError, match=r"holds 1 optimiser states .* delete .* from the st"):
        train(split, config, checkpointing=_checkpointing(path, config, resume=True))
