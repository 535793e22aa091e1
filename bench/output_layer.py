"""The fold-in's cost on this CPU: the decoder's output layer by kernel, and a whole fold-in.

    python bench/output_layer.py                    # ML-20M shape: 600 -> 20,108
    python bench/output_layer.py --items 41140 --threads 1 2

The output layer (p_dims[-2] x I) is nearly all of a fold-in's arithmetic. ``F.linear`` goes to
MKL; :class:`multvae.recommend.Scorer` runs it through oneDNN instead. This prints wall time
and process CPU per row for both kernels and for a whole :class:`Recommender` fold-in (sparse
input, encoder, decoder, masking, top-20), so the choice can be checked on another CPU.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from functools import partial

import numpy as np
import torch

from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE
from multvae.recommend import EMPTY, Recommender, _onednn_linear


def _per_row(fn: Callable[[], object], rows: int, repeats: int) -> tuple[float, float]:
    """(wall µs, CPU µs) per row, best of three rounds."""
    for _ in range(3):
        fn()
    best = (float("inf"), float("inf"))
    for _ in range(3):
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(repeats):
            fn()
        took = (time.perf_counter() - wall, time.process_time() - cpu)
        best = min(best, took)
    return best[0] / repeats / rows * 1e6, best[1] / repeats / rows * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--items", type=int, default=20_108)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 8, 17, 32, 64])
    args = parser.parse_args()
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", args.items)).eval()
    layer = model.output_layer
    recommender = Recommender(model, ItemIndex.build(range(args.items), np.ones(args.items)))
    print(f"torch {torch.__version__}, {torch.backends.cpu.get_cpu_capability()}, "
          f"oneDNN used by Scorer: {recommender.scorer.onednn}; output layer "
          f"{layer.in_features} x {layer.out_features}")  # fmt: skip
    print("| threads | batch | F.linear µs/row (wall / CPU) | oneDNN µs/row | fold-in µs/row |")
    print("|---:|---:|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for threads in args.threads:
        torch.set_num_threads(threads)
        for batch in args.batches:
            hidden = torch.rand(batch, layer.in_features) * 2 - 1
            histories = [rng.choice(args.items, rng.integers(10, 100), replace=False)
                         for _ in range(batch)]  # fmt: skip
            repeats = max(5, 200 // batch)
            with torch.inference_mode():
                plain = _per_row(partial(layer, hidden), batch, repeats)
                onednn = _per_row(
                    partial(_onednn_linear, hidden, layer.weight, layer.bias), batch, repeats
                )
            fold_in = partial(recommender.recommend_batch, histories, [20] * batch, [EMPTY] * batch)
            whole = _per_row(fold_in, batch, repeats)
            print(f"| {threads} | {batch} | {plain[0]:.0f} / {plain[1]:.0f} "
                  f"| {onednn[0]:.0f} / {onednn[1]:.0f} | {whole[0]:.0f} / {whole[1]:.0f} |",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
