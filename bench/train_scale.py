"""Data-parallel training throughput (1 vs 2 torchrun processes) and training memory at the
MSD shape.

    python bench/train_scale.py processes [--shape ml-20m] [--users 20000] [--epochs 2]
                                          [--layouts 1x2,1x1,2x1]
    python bench/train_scale.py msd /tmp/msd-bench/train_triplets.txt [--updates 40]

``processes`` generates synthetic data of the shape (``multvae generate``; ML-20M: 136,677
users x 20,108 items, 10.0M clicks after the preset), splits it with the preset, keeps the
first ``--users`` training users and 1,000 validation users (throughput depends on the items
and the clicks per user, not on how many users there are), then runs the real training loop
(:func:`training.train.train`: the paper's Mult-VAE [I -> 600 -> 200 -> 600 -> I], batch 500)
for ``--epochs`` epochs under ``torchrun --standalone`` in each ``--layouts`` entry:
1 process of 2 threads, 1 of 1, 2 processes of 1 thread each (gloo) by default. It prints,
per epoch, users/s of the training passes (validation excluded), the validation NDCG@100,
and each rank's peak RSS.

``msd`` is the whole data path of ``multvae train --preset msd`` (read, preprocessing, split)
on a file ``bench/read_memory.py make`` wrote, then ``--updates`` updates of the paper's model
on the first training users in one process; it prints the peak RSS (VmHWM) after the data path
and after training, and users/s.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import torch
from read_memory import peak_rss_bytes  # bench/ is the script's directory

from training.dataset import HeldOut, Split
from training.train import TrainConfig, train

GIB = 1024**3


def _subset(split: Split, users: int, validation: int) -> Split:
    held = split.validation
    rows = np.arange(min(validation, held.n_users))
    small = HeldOut(held.fold_in[rows], held.targets[rows], held.user_ids[rows])
    return replace(split, train=split.train[:users], validation=small, test=small)


def processes(args: argparse.Namespace) -> None:
    from training.catalog import PRESETS, Preprocessing
    from training.preprocess import filter_interactions
    from training.split import strong_generalisation_split
    from training.synthetic import generate

    tic = time.perf_counter()
    preset = PRESETS.get(args.shape)  # "small" (a smoke run) has none: the defaults
    prep = preset.preprocessing if preset else Preprocessing(3.5, 5, 0)
    inter, _ = filter_interactions(generate(args.shape), prep)
    split = strong_generalisation_split(inter, preset.n_heldout if preset else 200)
    del inter
    print(f"data: {args.shape} shape, {split.train.shape[0]:,} training users x "
          f"{split.n_items:,} items, {split.train.nnz:,} training clicks "
          f"({time.perf_counter() - tic:.0f} s to generate and split)")  # fmt: skip
    split = _subset(split, args.users, 1000)
    print(f"training on the first {split.train.shape[0]:,} users ({split.train.nnz:,} clicks), "
          f"validating on {split.validation.n_users:,}; {args.epochs} epochs of "
          f"{-(-split.train.shape[0] // 500)} updates (batch 500)")  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "split.pkl"
        path.write_bytes(pickle.dumps(split))
        del split
        for layout in args.layouts.split(","):
            n, threads = (int(v) for v in layout.split("x"))
            env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
            run = subprocess.run(
                ["nice", "-n", "5", sys.executable, "-m", "torch.distributed.run", "--standalone",
                 "--nproc-per-node", str(n), __file__, "child", str(path),
                 "--epochs", str(args.epochs)],
                env=env, capture_output=True, text=True, check=True,
            )  # fmt: skip
            ranks = [json.loads(line) for line in run.stdout.splitlines() if line.startswith("{")]
            lead = next(r for r in ranks if r["rank"] == 0)
            ranks.sort(key=lambda r: r["rank"])
            rss = ", ".join(f"{r['peak_rss_gib']:.2f}" for r in ranks)
            for e in lead["history"]:
                print(f"{n} process(es) x {threads} thread(s): epoch {e['epoch']} "
                      f"{e['users_per_s']:.0f} users/s ({e['seconds']:.1f} s, {e['updates']} "
                      f"updates so far), validation NDCG@100 {e['val_ndcg_at_100']:.4f}; "
                      f"peak RSS per rank {rss} GiB")  # fmt: skip


def child(args: argparse.Namespace) -> None:
    from training.distributed import joined

    split = pickle.loads(Path(args.split).read_bytes())
    config = TrainConfig.paper(epochs=args.epochs, device="cpu")
    with joined(config.device) as group:
        result = train(split, config, group=group)
        print(json.dumps({
            "rank": group.rank, "peak_rss_gib": peak_rss_bytes() / GIB,
            "history": [asdict(r) for r in result.history],
        }), flush=True)  # fmt: skip


def msd(args: argparse.Namespace) -> None:
    from training.pipeline import DataSpec, prepare

    base = peak_rss_bytes()
    tic = time.perf_counter()
    data = prepare(DataSpec(str(args.path), args.format, preset="msd", count_col=args.count_col))
    prepared = time.perf_counter() - tic
    after_data = peak_rss_bytes()
    full = data.split.train.shape
    split = _subset(data.split, args.updates * 500, 2000)
    torch.set_num_threads(args.threads)
    result = train(split, TrainConfig.paper(epochs=1, device="cpu"))
    [epoch] = result.history
    print(f"{platform.node()} {args.path}: data path (read + MSD preprocessing + split) "
          f"{prepared:.0f} s, {full[0]:,} training users x {full[1]:,} items, "
          f"{data.split.train.nnz:,} training clicks; peak RSS {after_data / GIB:.2f} GiB "
          f"(after imports {base / GIB:.2f} GiB)")  # fmt: skip
    print(f"training: {epoch.updates} updates of batch 500, {args.threads} threads: "
          f"{epoch.users_per_s:.0f} users/s ({epoch.seconds:.1f} s); peak RSS with training "
          f"{peak_rss_bytes() / GIB:.2f} GiB")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("processes")
    p.add_argument("--shape", default="ml-20m")
    p.add_argument("--users", type=int, default=20_000)
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument(
        "--layouts", default="1x2,1x1,2x1",
        help="PROCESSESxTHREADS (threads per process), comma-separated",
    )  # fmt: skip
    p = sub.add_parser("child")
    p.add_argument("split")
    p.add_argument("--epochs", type=int, default=2)
    p = sub.add_parser("msd")
    p.add_argument("path", type=Path)
    p.add_argument("--format", default="auto")
    p.add_argument("--count-col", help="a Parquet/CSV file's play count column (`count`)")
    p.add_argument("--updates", type=int, default=40)
    p.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    {"processes": processes, "child": child, "msd": msd}[args.command](args)


if __name__ == "__main__":
    main()
