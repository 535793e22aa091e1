"""A torchrun entry point for tests: ``multvae train`` on every rank, one of which dies.

    python -m torch.distributed.run ... tests/training/kill_rank.py RANK EPOCH train FLAGS...

The rank numbered RANK sends itself SIGKILL (no handler runs, nothing is cleaned up: a lost
node) right after epoch EPOCH, a deterministic point in training; every other rank runs
``multvae train`` unchanged.
"""

from __future__ import annotations

import os
import signal
import sys

from multvae_cli import build_parser
from training.cli import run_train
from training.train import EpochRecord


def main() -> int:
    victim, at_epoch = int(sys.argv[1]), int(sys.argv[2])
    args = build_parser().parse_args(sys.argv[3:])
    rank = int(os.environ["RANK"])

    def die(record: EpochRecord) -> None:
        if rank == victim and record.epoch == at_epoch:
            os.kill(os.getpid(), signal.SIGKILL)

    return run_train(args, on_epoch=die)


if __name__ == "__main__":
    sys.exit(main())
