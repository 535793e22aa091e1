"""EASE's memory and time on the largest shared catalogue, CiteULike-t (about 24,000 items).

    python bench/ease_memory.py [--seed 98765] [--grid 50,100,200,500,1000]
    python bench/ease_memory.py --synthetic 12000x6000   # more users than items: primal form

Reads ../shared/data/citeulike-t with the `multvae train` defaults (every saved article is a
click, users >= 5, 10 % of users held out per group), runs the EASE grid exactly as
`multvae evaluate --baselines ease` does, and prints the process's peak resident memory
(VmHWM) before and after, the bound `check_ease_memory` enforces, the time per lambda and the
chosen lambda's test metrics. With 4,175 training users for 24,100 items EASE
takes its dual (U x U) form here. Nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import os
import platform
import time
from pathlib import Path

import numpy as np
import torch

from training.baselines import (
    EASE_GRID,
    available_memory_bytes,
    ease_is_dual,
    ease_memory_bytes,
    run_ease,
)
from training.dataset import Interactions, Split
from training.evaluate import mean_se
from training.pipeline import DataSpec, prepare
from training.split import strong_generalisation_split

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "citeulike-t"


def peak_rss_bytes() -> int:
    """VmHWM: the most resident memory this process has held so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def synthetic_split(shape: str, seed: int) -> Split:
    """Users x items with 20 clicks per user, each drawn from one of 20 item blocks."""
    n_users, n_items = (int(v) for v in shape.split("x"))
    rng = np.random.default_rng(seed)
    block = n_items // 20
    start = rng.integers(0, 20, n_users) * block
    items = start[:, None] + np.argsort(rng.random((n_users, block)), axis=1)[:, :20]
    users = np.repeat(np.arange(n_users), 20)
    inter = Interactions(users.astype(np.int32), items.ravel().astype(np.int32), None,
                         np.arange(n_users), np.arange(n_items), source="synthetic")
    return strong_generalisation_split(inter, 500, seed=seed)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seed", type=int, default=98765)
    parser.add_argument("--grid", default=",".join(str(v) for v in EASE_GRID))
    parser.add_argument("--synthetic", metavar="USERSxITEMS", help="random data instead")
    args = parser.parse_args()
    grid = [float(v) for v in args.grid.split(",")]
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads), load average "
          f"{os.getloadavg()[0]:.1f}, MemAvailable {(available_memory_bytes() or 0) / 1e9:.1f} GB")
    if args.synthetic:
        split = synthetic_split(args.synthetic, args.seed)
    else:
        split = prepare(DataSpec(path=str(DATA), seed=args.seed)).split
    n = split.n_items
    before = peak_rss_bytes()
    print(f"data: {split.train.shape[0]:,} training users x {n:,} items, "
          f"{split.train.nnz:,} clicks; {split.validation.n_users} / {split.test.n_users} "
          f"held-out users (seed {args.seed}); peak RSS before EASE {before / 1e9:.2f} GB")
    tic = time.perf_counter()
    result = run_ease(split, grid, log=lambda line: print(
        f"  [{time.perf_counter() - tic:6.0f} s] {line.strip()}", flush=True))
    secs = time.perf_counter() - tic
    after = peak_rss_bytes()
    users = split.train.shape[0]
    form = "dual (U x U)" if ease_is_dual(users, n) else "primal (I x I)"
    print(f"form: {form}; one {n:,}^2 float32 matrix would be {n * n * 4 / 1e9:.2f} GB; "
          f"check_ease_memory's bound {ease_memory_bytes(n, users) / 1e9:.2f} GB")
    print(f"peak RSS during EASE: {after / 1e9:.2f} GB, {(after - before) / 1e9:.2f} GB above "
          f"the data ({(after - before) / (n * n * 4):.2f} I x I float32 matrices)")
    print(f"grid of {len(grid)} lambdas: {secs:.0f} s ({secs / len(grid):.0f} s per lambda), "
          f"chosen {result.params}")
    s = result.test.summary()
    print("test: " + ", ".join(f"{m} {mean_se(s[m]['mean'], s[m]['se'])}" for m in s))


if __name__ == "__main__":
    main()
