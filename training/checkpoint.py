"""Resumable training: a run's whole state, written atomically at the end of every epoch.

``multvae train --out MODEL_DIR`` keeps ``MODEL_DIR/train-checkpoint.pt`` while it trains:
the model, the optimiser state (Adam's moments and step counts), the best epoch's weights and
the schedule (epochs and updates done, beta and its freeze, best validation NDCG@100 so far,
the patience counter, the history, and for ``--anneal-cap auto`` which of its two runs is
going and what the first found). Random streams need no saving: each epoch seeds its own from
(seed, epoch, rank) (:func:`training.train.epoch_seed`), so a resumed run draws the same
permutation, dropout masks and noise as an uninterrupted one. Only rank 0 writes it, to a
temporary file that is fsynced and renamed over the last one, so a crash leaves the previous
epoch's checkpoint whole. It is deleted once the model version is written.

``--resume`` continues from it when it is there (and starts afresh when it is not, so a
restarted job can always pass the flag); it is refused when the data or any training setting
differs from the run that wrote it (the device may change).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from multvae.errors import TrainingError

CHECKPOINT_FILE = "train-checkpoint.pt"
FORMAT = 1


@dataclass(frozen=True)
class Checkpointing:
    """Where a run checkpoints, whether it continues what it finds there, and the identity
    (data fingerprint and training settings, as JSON) a checkpoint must carry to be continued."""

    path: Path
    resume: bool
    identity: str


def checkpoint_path(model_dir: Path | str) -> Path:
    return Path(model_dir) / CHECKPOINT_FILE


def identity(fingerprint: str, config: dict[str, Any]) -> str:
    """What a resumed run must share with the one that checkpointed: the data and the training
    settings, all but the device."""
    settings = {k: v for k, v in config.items() if k != "device"}
    return json.dumps({"data": fingerprint, "config": settings}, sort_keys=True)


def _fsync(path: Path, flags: int = os.O_RDONLY) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save(path: Path, state: dict[str, Any]) -> None:
    """Write ``state`` to ``path`` atomically: a temporary file beside it (streamed, never a
    second copy in memory), fsynced, renamed. TrainingError when it cannot be written."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        torch.save(state, tmp)
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent, os.O_RDONLY | os.O_DIRECTORY)
    except (OSError, RuntimeError) as exc:  # torch.save reports a failed write as RuntimeError
        tmp.unlink(missing_ok=True)
        why = exc.strerror if isinstance(exc, OSError) and exc.strerror else (
            "the write failed part-way (a full disk, a quota or a file size limit)"
        )  # fmt: skip
        raise TrainingError(
            f"cannot write the training checkpoint {path}: {why}; training stopped and no "
            "version was written (free space or pick another --out)"
        ) from exc


def _differences(found: str, wanted: str) -> str:
    a, b = json.loads(found), json.loads(wanted)
    lines = []
    if a["data"] != b["data"]:
        lines.append(f"data fingerprint {a['data']} then, {b['data']} now")
    for key in sorted(set(a["config"]) | set(b["config"])):
        then, now = a["config"].get(key), b["config"].get(key)
        if then != now:
            lines.append(f"{key} {then!r} then, {now!r} now")
    return "; ".join(lines)


def load(checkpointing: Checkpointing) -> dict[str, Any] | None:
    """The checkpoint to continue from, or None (no --resume, or nothing to resume)."""
    path = checkpointing.path
    if not checkpointing.resume or not path.exists():
        return None
    try:
        state: dict[str, Any] = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises many types for a damaged or foreign file
        raise TrainingError(
            f"cannot read the checkpoint {path}: damaged, or not a checkpoint multvae wrote "
            f"({type(exc).__name__}); delete it to train from the start"
        ) from exc
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise TrainingError(
            f"{path} is not a checkpoint this version of multvae wrote; delete it to train "
            "from the start"
        )
    if state["identity"] != checkpointing.identity:
        raise TrainingError(
            f"the checkpoint {path} belongs to another run ("
            f"{_differences(state['identity'], checkpointing.identity)}): resume with the same "
            "data and settings, or delete it to train from the start"
        )
    return state


def remove(path: Path) -> None:
    path.unlink(missing_ok=True)
