"""Baselines beside the model: report tables on the small MovieLens sets, timings at ML-20M shape.

    python bench/baselines_time.py tables   # ml-100k and ml-latest-small, REFERENCE.md split
    python bench/baselines_time.py timing   # synthetic ML-20M-shaped data (136,677 x 20,108)

``tables`` splits each file exactly as ../shared/data/REFERENCE.md (ratings > 3.5, users >= 5,
H = 100 / 50 held-out users per group, seeds 98765, 12345, 2024), trains Mult-VAE and Mult-DAE
with the ``multvae train`` defaults, runs popularity, EASE and WMF with their validation grids,
and prints markdown rows (mean ± standard error over the test users) plus the paired t-test of
Mult-VAE against the best baseline. ``timing`` measures each method once on ML-20M-shaped
synthetic data: popularity, one EASE fit (the grid costs one such fit per lambda), one WMF fit
(the grid costs one per grid point), and one epoch of Mult-VAE / Mult-DAE (the paper trains
200). Both print what they measured; nothing here asserts a speed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from multvae.model import ModelKind
from training.baselines import (
    available_memory_bytes,
    check_ease_memory,
    ease_gram,
    ease_scorer,
    ease_weights,
    evaluate_scorer,
    popularity_scorer,
    run_baselines,
    wmf_fit,
    wmf_scorer,
)
from training.dataset import Split
from training.evaluate import Evaluation, evaluate_model, mean_se
from training.pipeline import DataSpec, prepare
from training.report import best_baseline
from training.stats import paired_tests
from training.train import TrainConfig, train

DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DATASETS = {
    "ml-100k": ("ml-100k/u.data", 100),
    "ml-latest-small": ("ml-latest-small/ratings.csv", 50),
}
SEEDS = (98765, 12345, 2024)
METRICS = ("recall@20", "recall@50", "ndcg@100")


def cell(ev: Evaluation, metric: str) -> str:
    s = ev.summary()[metric]
    return mean_se(s["mean"], s["se"])


def timed(fn: Callable[[], Any]) -> tuple[Any, float]:
    tic = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - tic


def tables(args: argparse.Namespace) -> None:
    rows: list[dict[str, Any]] = []
    for name in args.datasets.split(","):
        rel, heldout = DATASETS[name]
        for seed in (int(s) for s in args.seeds.split(",")):
            split = prepare(DataSpec(path=str(DATA / rel), heldout_users=heldout, seed=seed)).split
            evals: dict[str, tuple[Evaluation, str, float]] = {}
            kinds: tuple[tuple[ModelKind, str], ...] = (
                ("multvae", "Mult-VAE"),
                ("multdae", "Mult-DAE"),
            )
            for kind, label in kinds:
                tic = time.perf_counter()
                result = train(split, TrainConfig(model=kind, seed=seed))
                secs = time.perf_counter() - tic
                note = f"{len(result.history)} epochs, best {result.best_epoch}"
                if kind == "multvae":
                    note += f", beta {result.beta:.3f}"
                evals[label] = (evaluate_model(result.model, split.test), note, secs)
            names = [] if args.models_only else ["popularity", "ease", "wmf"]
            for key, r in run_baselines(split, names, seed=0).items():
                params = ", ".join(f"{k}={v}" for k, v in r.params.items())
                evals[{"popularity": "popularity", "ease": "EASE", "wmf": "WMF (ALS)"}[key]] = (
                    r.test,
                    params,
                    r.seconds,
                )
            base = {k: v[0] for k, v in evals.items() if not k.startswith("Mult")}
            for method, (ev, note, secs) in evals.items():
                row = {
                    "dataset": name,
                    "seed": seed,
                    "method": method,
                    "seconds": secs,
                    "note": note,
                    **{m: ev.summary()[m] for m in METRICS},
                }
                rows.append(row)
                print(
                    f"| {name} | {method} | {seed} | "
                    + " | ".join(cell(ev, m) for m in METRICS)
                    + f" | {secs:.1f} | {note} |",
                    flush=True,
                )
            if not base:
                continue
            best = str(best_baseline(base))
            test = paired_tests(evals["Mult-VAE"][0], base[best])["ndcg@100"]
            print(
                f"| {name} | Mult-VAE vs {best} | {seed} | NDCG@100 {test.diff:+.4f}, "
                f"p {test.p:.3g} {test.stars} | | | | |",
                flush=True,
            )
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=2))


def ml20m_split(seed: int) -> Split:
    from training.catalog import PRESETS
    from training.preprocess import filter_interactions
    from training.split import strong_generalisation_split
    from training.synthetic import generate

    raw = generate("ml-20m", seed=seed)
    kept, _ = filter_interactions(raw, PRESETS["ml-20m"].preprocessing)
    return strong_generalisation_split(kept, PRESETS["ml-20m"].n_heldout, seed=seed)


def timing(args: argparse.Namespace) -> None:
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} cpus, "
        f"torch threads {torch.get_num_threads()}, "
        f"MemAvailable {(available_memory_bytes() or 0) / 1e9:.1f} GB",
        flush=True,
    )
    split, secs = timed(lambda: ml20m_split(0))
    print(
        f"data: {split.train.shape[0]:,} training users x {split.n_items:,} items, "
        f"{split.train.nnz:,} training clicks, {split.validation.n_users:,} / "
        f"{split.test.n_users:,} held-out users ({secs:.0f} s to generate and split)",
        flush=True,
    )

    def report(method: str, what: str, secs: float, ev: Evaluation | None = None) -> None:
        ndcg = f", validation NDCG@100 {ev.per_user['ndcg@100'].mean():.4f}" if ev else ""
        print(f"| {method} | {what} | {secs:.1f} |{ndcg}", flush=True)

    scorer, secs = timed(lambda: popularity_scorer(split.train))
    ev, score_secs = timed(lambda: evaluate_scorer(scorer, split.validation))
    report("popularity", "count clicks + score validation users", secs + score_secs, ev)

    if "ease" in args.methods:
        check_ease_memory(split.n_items)
        gram, secs = timed(lambda: ease_gram(split.train))
        report("EASE", "dense X^T X (float32)", secs)
        del gram
        weights, secs = timed(lambda: ease_weights(split.train, args.ease_l2))
        report("EASE", f"one fit (X^T X, Cholesky inverse), lambda {args.ease_l2}", secs)
        ev, secs = timed(lambda: evaluate_scorer(ease_scorer(weights), split.validation))
        report("EASE", "score validation users", secs, ev)
        del weights

    if "wmf" in args.methods:
        f, a, r = args.wmf_factors, args.wmf_alpha, args.wmf_reg
        tic = time.perf_counter()
        _, items = wmf_fit(split.train, f, a, r, args.wmf_iterations)
        secs = time.perf_counter() - tic
        report(
            "WMF",
            f"one fit: {f} factors, alpha {a}, reg {r}, {args.wmf_iterations} "
            f"iterations x {3} CG steps",
            secs,
        )
        ev, secs = timed(lambda: evaluate_scorer(wmf_scorer(items, a, r), split.validation))
        report("WMF", "fold in (least squares) + score validation users", secs, ev)

    models: tuple[ModelKind, ...] = ("multvae", "multdae")
    for kind in models:
        if kind not in args.methods:
            continue
        tic = time.perf_counter()
        result = train(split, TrainConfig.paper(model=kind, epochs=args.epochs))
        secs = time.perf_counter() - tic
        report(
            "Mult-VAE" if kind == "multvae" else "Mult-DAE",
            f"{args.epochs} epoch(s), paper config (batch 500), incl. validation",
            secs,
        )
        per = result.history[-1]
        print(f"|   | one epoch: {per.seconds:.1f} s, {per.users_per_s:,.0f} users/s |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="mode", required=True)
    t = sub.add_parser("tables")
    t.add_argument("--datasets", default="ml-100k,ml-latest-small")
    t.add_argument("--seeds", default=",".join(map(str, SEEDS)))
    t.add_argument("--out", help="also write the rows as JSON here")
    t.add_argument("--models-only", action="store_true", help="Mult-VAE and Mult-DAE rows only")
    m = sub.add_parser("timing")
    m.add_argument("--methods", default="popularity,ease,wmf,multvae,multdae")
    m.add_argument("--ease-l2", type=float, default=500.0)
    m.add_argument("--wmf-factors", type=int, default=128)
    m.add_argument("--wmf-alpha", type=float, default=5.0)
    m.add_argument("--wmf-reg", type=float, default=10.0)
    m.add_argument("--wmf-iterations", type=int, default=15)
    m.add_argument("--epochs", type=int, default=1)
    args = parser.parse_args()
    if args.mode == "tables":
        tables(args)
    else:
        timing(args)


if __name__ == "__main__":
    main()
