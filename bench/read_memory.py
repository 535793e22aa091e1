"""Peak memory of reading (and preparing) a large interaction file, one file per process.

    python bench/read_memory.py make --dir /tmp/msd-bench [--shape msd] [--parts 10]
    python bench/read_memory.py read /tmp/msd-bench/train_triplets.txt [--prepare]
    python bench/read_memory.py read /tmp/msd-bench/parts --count-col count [--prepare]

``make`` writes one synthetic set three ways: MSD's ``train_triplets.txt`` layout, one Parquet
file, and a directory of ``--parts`` Parquet files (as daily partitions would be). ``read``
runs :func:`training.readers.read_interactions` (with ``--prepare``: the whole
``multvae train`` data path, read + paper preprocessing + split) and prints the process's peak
resident memory (VmHWM) next to the size of the CSR matrix the rows make (int32 indices and
float32 data per click, int64 row pointers). Run one ``read`` per process: VmHWM only grows.
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import pyarrow.parquet as pq

from training.pipeline import DataSpec, prepare
from training.readers import read_interactions
from training.synthetic import generate, write


def peak_rss_bytes() -> int:
    """VmHWM: the most resident memory this process has held so far."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("/proc/self/status has no VmHWM")


def make(directory: Path, shape: str, parts: int, seed: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    inter = generate(shape, seed=seed)
    write(inter, directory / "train_triplets.txt", "msd")
    single = directory / "interactions.parquet"
    write(inter, single, "parquet")
    del inter
    table = pq.read_table(single)
    (directory / "parts").mkdir(exist_ok=True)
    step = -(-table.num_rows // parts)
    for i in range(parts):
        pq.write_table(table.slice(i * step, step), directory / "parts" / f"day={i:03d}.parquet")
    print(f"wrote {table.num_rows:,} rows to {directory} (triplets, one parquet, {parts} parts)")


def read(path: Path, fmt: str, with_prepare: bool, preset: str | None,
         count_col: str | None) -> None:
    gib = 1024**3
    base = peak_rss_bytes()
    tic = time.perf_counter()
    if with_prepare:
        data = prepare(DataSpec(str(path), fmt, count_col=count_col, preset=preset))
        split = data.split
        clicks = split.train.nnz + split.validation.fold_in.nnz + split.validation.targets.nnz \
            + split.test.fold_in.nnz + split.test.targets.nnz
        users = data.filter_stats["users"]
        rows = data.filter_stats["rows_read"]
        what = "read + preprocess + split"
    else:
        inter = read_interactions(path, fmt, rating_col=count_col)
        clicks = rows = len(inter)
        users = len(inter.user_ids)
        what = "read"
    seconds = time.perf_counter() - tic
    csr = clicks * 8 + (users + 1) * 8  # int32 index + float32 value per click, int64 indptr
    peak = peak_rss_bytes()
    print(f"{platform.node()} {what} {path} ({fmt}): {rows:,} rows in {seconds:.1f} s; "
          f"peak RSS {peak / gib:.2f} GiB (after imports {base / gib:.2f} GiB); "
          f"CSR of {clicks:,} clicks {csr / gib:.2f} GiB; peak / CSR {peak / csr:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("make")
    p.add_argument("--dir", type=Path, required=True)
    p.add_argument("--shape", default="msd")
    p.add_argument("--parts", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    p = sub.add_parser("read")
    p.add_argument("path", type=Path)
    p.add_argument("--format", default="auto")
    p.add_argument("--prepare", action="store_true")
    p.add_argument("--preset", help="with --prepare: a paper preset (msd), else the defaults")
    p.add_argument("--count-col", help="a Parquet/CSV file's play count column (`count`)")
    args = parser.parse_args()
    if args.command == "make":
        make(args.dir, args.shape, args.parts, args.seed)
    else:
        read(args.path, args.format, args.prepare, args.preset, args.count_col)


if __name__ == "__main__":
    main()
