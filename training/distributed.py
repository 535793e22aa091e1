"""Data-parallel training under ``torchrun``: which rank this process is, and the few
collectives the training loop needs.

``torchrun`` (torch.distributed.run) starts one process per rank and gives each RANK,
WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE and the rendezvous address; :func:`joined` joins the
process group, NCCL when the process trains on a GPU (each rank on the GPU of its
LOCAL_RANK), gloo on the CPU. Without torchrun (or with one process) the process is rank 0 of
1, no process group is created and nothing here talks to anything.

Sharding keeps one process's arithmetic: every rank draws the same permutation of the users and
so the same global batches; rank r trains on its slice of each batch and weights its loss by
the slice's share of the batch (:meth:`Group.shard`), so the gradient DistributedDataParallel
averages over the ranks is the gradient of the global batch's mean loss, and the number of
updates, hence the beta schedule, is the one process's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from numpy.typing import NDArray
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from multvae.device import resolve_device
from multvae.errors import DataError, DeviceError


@dataclass(frozen=True)
class Group:
    """This process's place among the ranks of one training job."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def leader(self) -> bool:
        """Rank 0: the one that validates last, checkpoints, reports and writes the version."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world > 1

    def shard(self, rows: NDArray[np.int64]) -> tuple[NDArray[np.int64], float]:
        """This rank's part of a global batch, and the weight that makes its mean loss count
        as its share of the batch: ``len(part) * world / len(batch)`` (1 for one process).

        A batch with fewer users than ranks leaves some ranks nothing: they still take part
        in the gradient all-reduce, on one user at weight 0.
        """
        if self.world == 1:
            return rows, 1.0
        mine = np.array_split(rows, self.world)[self.rank]
        if len(mine) == 0:
            return rows[:1], 0.0
        return mine, len(mine) * self.world / len(rows)

    def wrap(self, model: nn.Module) -> nn.Module:
        """The module to call for training steps: DistributedDataParallel across the ranks
        (it broadcasts rank 0's weights now and averages the gradients in every backward),
        the model itself in one process."""
        if not self.distributed:
            return model
        ids = [self.device] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=ids)

    def sum(self, values: Sequence[float]) -> list[float]:
        """Element-wise sums over the ranks, identical on every rank (rank 0's bits)."""
        if not self.distributed:
            return list(values)
        t = torch.tensor(list(values), dtype=torch.float64, device=self.device)
        dist.all_reduce(t)
        dist.broadcast(t, src=0)
        return [float(v) for v in t.tolist()]

    def from_leader(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (pickled; the others' values are ignored)."""
        if not self.distributed:
            return value
        box = [value if self.leader else None]
        dist.broadcast_object_list(box, src=0, device=self._object_device)
        return box[0]

    def check_same(self, value: str, what: str) -> None:
        """DataError on every rank unless every rank holds the same ``value``."""
        if not self.distributed:
            return
        values: list[Any] = [None] * self.world
        dist.all_gather_object(values, value)
        if len(set(values)) > 1:
            ranks = ", ".join(f"rank {r}: {v}" for r, v in enumerate(values))
            raise DataError(
                f"the ranks do not train on the same {what} ({ranks}); every node must read "
                "the same file"
            )

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    @property
    def _object_device(self) -> torch.device | None:
        return self.device if self.device.type == "cuda" else None


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise DeviceError(f"{name}={text!r} is not a whole number (torchrun sets it)") from None


def world_size() -> int:
    """WORLD_SIZE as torchrun set it; 1 outside torchrun."""
    return _env_int("WORLD_SIZE", 1)


def rank_device(spec: str, local_rank: int, local_world: int) -> torch.device:
    """The device of the rank with ``local_rank`` on its node: under several ranks per node,
    ``auto`` and ``cuda`` mean the GPU numbered LOCAL_RANK, one per rank."""
    device = resolve_device(spec)
    if device.type == "cpu" or local_world == 1:
        return device
    if device.index is not None:
        raise DeviceError(
            f"device {spec!r} names one GPU, but torchrun starts {local_world} processes on "
            "this node and each needs its own: pass --device cuda (rank r takes GPU LOCAL_RANK)"
        )
    count = torch.cuda.device_count()
    if local_rank >= count:
        raise DeviceError(
            f"LOCAL_RANK {local_rank} has no GPU: {count} visible for {local_world} processes "
            "per node; start at most one process per GPU (torchrun --nproc-per-node)"
        )
    return torch.device("cuda", local_rank)


@contextmanager
def joined(device_spec: str) -> Iterator[Group]:
    """Join the torchrun job this process belongs to (or be the only rank) for the block.

    The process group is destroyed when the block ends normally. When it raises, the
    process is left to exit with the error: torchrun's agent then stops the other ranks,
    which are blocked in a collective that cannot complete.
    """
    world = world_size()
    if world <= 1:
        yield Group(device=resolve_device(device_spec))
        return
    rank, local_rank = _env_int("RANK", 0), _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    device = rank_device(device_spec, local_rank, local_world)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        dist.init_process_group("nccl", device_id=device)
    else:
        dist.init_process_group("gloo")
    yield Group(rank, world, local_rank, local_world, device)
    dist.destroy_process_group()
