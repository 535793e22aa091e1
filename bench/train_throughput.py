"""Training throughput and peak memory: the sparse first layer against a naive dense batch.

    python bench/train_throughput.py [--shape ml-20m] [--batches 200] [--threads 2]

Generates synthetic data shaped like the paper's dataset (ML-20M: 136,677 users x 20,108
items, 10.0M clicks after the preset), splits it with the ml-20m preset, then trains the
paper's Mult-VAE [I -> 600 -> 200 -> 600 -> I], batch 500, for ``--batches`` updates twice,
each in a fresh process so peak RSS is measured separately:

* sparse: this project's model (embedding_bag over the L2-normalised click rows);
* dense:  the same model and loss written naively, each batch densified to (500, I).

Prints users/s, peak RSS of the process during training, and the training memory (that peak
minus the resident size once the data is loaded) for both.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp
import torch
import torch.nn.functional as F
from torch import nn


def _status_mb(field: str) -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _reset_peak() -> None:
    # Writing 5 to clear_refs resets VmHWM (peak RSS) on Linux, so the peak measured at the
    # end belongs to training alone, not to loading the matrix.
    Path("/proc/self/clear_refs").write_text("5")


class DenseMultVAE(nn.Module):
    """The paper's model as a dense reference: every layer an nn.Linear over dense rows."""

    def __init__(self, n_items: int) -> None:
        super().__init__()
        self.enc = nn.ModuleList([nn.Linear(n_items, 600), nn.Linear(600, 400)])
        self.dec = nn.ModuleList([nn.Linear(200, 600), nn.Linear(600, n_items)])

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        h = F.dropout(F.normalize(x, dim=1), 0.5, training=True)
        h = self.enc[1](torch.tanh(self.enc[0](h)))
        mu, logvar = h[:, :200], h[:, 200:]
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar)
        return self.dec[1](torch.tanh(self.dec[0](z))), mu, logvar


def child(matrix: Path, mode: str, batches: int, threads: int) -> dict[str, float]:
    from multvae.model import ModelConfig, MultVAE, SparseRows

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    train = sp.load_npz(matrix).tocsr()
    n_users, n_items = train.shape
    _reset_peak()
    base = _status_mb("VmRSS")
    model: nn.Module
    if mode == "sparse":
        model = MultVAE(ModelConfig.default("multvae", n_items))
    else:
        model = DenseMultVAE(n_items)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    rng = np.random.default_rng(0)
    users, started, warm = 0, 0.0, 5
    for step in range(batches + warm):
        if step == warm:  # allocator and thread pools settle in the first few steps
            started, users = time.perf_counter(), 0
        rows = rng.choice(n_users, 500, replace=False)
        block = train[rows]
        if mode == "sparse":
            x = SparseRows.from_csr(block)
            logits, mu, logvar = model(x)
            nll = model.neg_log_likelihood(logits, x)  # type: ignore[operator]
        else:
            xd = torch.from_numpy(block.toarray())  # (500, I) dense
            logits, mu, logvar = model(xd)
            nll = -(F.log_softmax(logits, 1) * xd).sum(1).mean()
        kl = (0.5 * (-logvar + logvar.exp() + mu**2 - 1)).sum(1).mean()
        loss = nll + 0.2 * kl
        opt.zero_grad()
        loss.backward()
        opt.step()
        users += len(rows)
    seconds = time.perf_counter() - started
    return {
        "users_per_s": users / seconds,
        "seconds_per_batch": seconds / batches,
        "peak_rss_mb": _status_mb("VmHWM"),
        "peak_rss_above_data_mb": _status_mb("VmHWM") - base,
        "nnz_per_batch": float(train.nnz / n_users * 500),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="ml-20m")
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", nargs=2, metavar=("MATRIX", "MODE"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(Path(args.child[0]), args.child[1], args.batches, args.threads)))
        return

    from training.catalog import PRESETS
    from training.preprocess import filter_interactions
    from training.split import strong_generalisation_split
    from training.synthetic import generate

    tic = time.perf_counter()
    inter, _ = filter_interactions(generate(args.shape), PRESETS[args.shape].preprocessing)
    split = strong_generalisation_split(inter, PRESETS[args.shape].n_heldout)
    print(
        f"data: {args.shape} shape, {split.train.shape[0]} training users x "
        f"{split.n_items} items, {split.train.nnz} training clicks "
        f"({time.perf_counter() - tic:.1f}s to generate and split)"
    )
    with tempfile.TemporaryDirectory() as tmp:
        matrix = Path(tmp) / "train.npz"
        sp.save_npz(matrix, split.train.astype(np.float32))
        del inter, split
        results = {}
        for mode in ("sparse", "dense"):
            out = subprocess.run(
                [
                    sys.executable,
                    __file__,
                    "--child",
                    str(matrix),
                    mode,
                    "--batches",
                    str(args.batches),
                    "--threads",
                    str(args.threads),
                ],
                check=True,
                capture_output=True,
                text=True,
            )
            results[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    print(
        f"\n{args.batches} batches of 500 users, {args.threads} threads, torch {torch.__version__}"
    )
    print(f"{'path':<8}{'users/s':>10}{'s/batch':>10}{'peak RSS MB':>13}{'training MB':>13}")
    for mode, r in results.items():
        print(
            f"{mode:<8}{r['users_per_s']:>10.0f}{r['seconds_per_batch']:>10.3f}"
            f"{r['peak_rss_mb']:>13.0f}{r['peak_rss_above_data_mb']:>13.0f}"
        )
    s, d = results["sparse"], results["dense"]
    print(
        f"\nsparse/dense: {s['users_per_s'] / d['users_per_s']:.2f}x throughput, "
        f"{s['peak_rss_mb'] / d['peak_rss_mb']:.2f}x peak RSS, "
        f"{s['peak_rss_above_data_mb'] / d['peak_rss_above_data_mb']:.2f}x training memory"
    )


if __name__ == "__main__":
    main()
