"""Issue 9's quality table: every method on the same splits, test NDCG@100 / Recall@20.

    python bench/quality.py run --results quality.jsonl [--datasets ml-100k,filmtrust]
        [--seeds 98765,12345] [--methods default,recvae,ease] [--tune-budget 5m]
    python bench/quality.py table --results a.jsonl b.jsonl   # markdown for bench/RESULTS.md

``run`` appends one JSON line per (dataset, seed, method) and skips those already in the
file, so an interrupted run continues where it stopped. Methods:

* ``default``: ``multvae train`` with no flags (the configuration ``train_config_for`` gives;
  Mult-DAE below 10,000 training users, so the ``multdae`` row on these sets);
* ``multvae``, ``multdae``, ``recvae``: that kind with its defaults;
* ``tune``: ``multvae tune`` with ``--tune-budget`` / ``--tune-trials`` (time = the whole search
  plus the final training);
* ``ease``, ``wmf``: ``multvae evaluate --baselines`` (grids of training/baselines.py).

ML-100K and ml-latest-small use REFERENCE.md's split (``--preset``), FilmTrust and
CiteULike-t the default rule (10 % of users validation, 10 % test). Pooled standard errors in
the table are over all test users of all seeds of a dataset.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np
import torch

from training.baselines import run_baselines
from training.evaluate import Evaluation, evaluate_model
from training.pipeline import DataSpec, PreparedData, prepare, train_config_for
from training.train import train
from training.tune import parse_duration, tune

DATASETS = {
    "ml-100k": ("ml-100k/u.data", "ml-100k"),
    "ml-latest-small": ("ml-latest-small/ratings.csv", "ml-latest-small"),
    "filmtrust": ("filmtrust", None),
    "citeulike-t": ("citeulike-t", None),
}
METHODS = ("default", "tune", "multvae", "multdae", "recvae", "ease", "wmf")
SEEDS = (98765, 12345, 2024)
LABELS = {
    "default": "default `multvae train` (auto kind)",
    "tune": "`multvae tune`",
    "multvae": "Mult-VAE",
    "multdae": "Mult-DAE (= default `multvae train` here)",
    "recvae": "RecVAE",
    "ease": "EASE",
    "wmf": "WMF (ALS)",
}
METRICS = ("ndcg@100", "recall@20")


def _record(evaluation: Evaluation, seconds: float, **info: Any) -> dict[str, Any]:
    return {
        "per_user": {m: evaluation.per_user[m].tolist() for m in METRICS},
        "seconds": seconds,
        **info,
    }


def run_method(
    method: str, spec: DataSpec, data: PreparedData, args: argparse.Namespace
) -> dict[str, Any]:
    split = data.split
    if method in ("ease", "wmf"):
        result = run_baselines(split, [method], log=lambda line: print(line, file=sys.stderr))
        r = result[method]
        return _record(r.test, r.seconds, params=r.params)
    if method == "tune":
        with tempfile.TemporaryDirectory() as tmp:
            tic = time.perf_counter()
            base = train_config_for(spec, seed=spec.seed, device="cpu")
            tuned = tune(
                spec, base, tmp, trials=args.tune_trials, time_budget=args.tune_budget,
                prepared=data,
            )
            seconds = time.perf_counter() - tic
        best = tuned.study.best_trial
        return _record(
            tuned.trained.test, seconds, params=best.params,
            trials=sum(t["state"] in ("complete", "pruned") for t in tuned.search),
            val=best.value,
        )
    overrides: dict[str, Any] = {"seed": spec.seed, "device": "cpu"}
    if method != "default":
        overrides["model"] = method
    config = train_config_for(spec, **overrides)
    result = train(split, config)
    return _record(
        evaluate_model(result.model, split.test), result.seconds, model=result.plan.model,
        epochs=len(result.history), best_epoch=result.best_epoch, val=result.best_val_ndcg,
    )


def cmd_run(args: argparse.Namespace) -> None:
    path = Path(args.results)
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["dataset"], r["seed"], r["method"]))
    torch.set_num_threads(args.threads)
    for seed in args.seeds:  # every dataset's first seed first
        for name in args.datasets:
            rel, preset = DATASETS[name]
            todo = [m for m in args.methods if (name, seed, m) not in done]
            if not todo:
                continue
            spec = DataSpec(str(Path(args.data_root) / rel), preset=preset, seed=seed)
            data = prepare(spec)
            for method in todo:
                tic = time.perf_counter()
                record = run_method(method, spec, data, args)
                ndcg = float(np.mean(record["per_user"]["ndcg@100"]))
                print(
                    f"{name} seed {seed} {method}: test NDCG@100 {ndcg:.4f} "
                    f"({time.perf_counter() - tic:.0f} s)",
                    flush=True,
                )
                with path.open("a") as fh:
                    fh.write(json.dumps({"dataset": name, "seed": seed, "method": method,
                                         **record}) + "\n")


def _pooled(values: list[float]) -> str:
    a = np.asarray(values)
    se = a.std(ddof=1) / math.sqrt(len(a)) if len(a) > 1 else float("nan")
    return f"{a.mean():.4f} ± {se:.4f}"


def cmd_table(args: argparse.Namespace) -> None:
    rows: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    seen = set()
    for results in args.results:
        for line in Path(results).read_text().splitlines():
            r = json.loads(line)
            key = (r["dataset"], r["seed"], r["method"])
            if key not in seen:  # the first file holding a run wins
                seen.add(key)
                rows[(r["dataset"], r["method"])].append(r)
    for name in DATASETS:
        methods = [m for m in METHODS if (name, m) in rows]
        if not methods:
            continue
        print(f"\n#### {name}\n")
        print("| method | seeds | NDCG@100 | Recall@20 | NDCG@100 per seed | time per seed (s) |")
        print("|---|---|---|---|---|---|")
        for m in methods:
            runs = sorted(rows[(name, m)], key=lambda r: SEEDS.index(r["seed"]))
            pooled = {k: [v for r in runs for v in r["per_user"][k]] for k in METRICS}
            per_seed = " / ".join(f"{np.mean(r['per_user']['ndcg@100']):.4f}" for r in runs)
            secs = " / ".join(f"{r['seconds']:.0f}" for r in runs)
            print(
                f"| {LABELS[m]} | {len(runs)} | {_pooled(pooled['ndcg@100'])} | "
                f"{_pooled(pooled['recall@20'])} | {per_seed} | {secs} |"
            )


def _list(choices: Any, cast: Any = str) -> Any:
    def parse(text: str) -> list[Any]:
        values = [cast(v) for v in text.split(",") if v]
        bad = [v for v in values if choices is not None and v not in choices]
        if bad:
            raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
        return values

    return parse


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--results", required=True, help="JSON-lines file (appended)")
    run.add_argument(
        "--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data")
    )
    run.add_argument("--datasets", type=_list(DATASETS), default=list(DATASETS))
    run.add_argument("--seeds", type=_list(None, int), default=list(SEEDS))
    run.add_argument("--methods", type=_list(METHODS), default=list(METHODS))
    run.add_argument("--tune-budget", type=parse_duration, default=None)
    run.add_argument("--tune-trials", type=int, default=None)
    run.add_argument("--threads", type=int, default=1, help="torch threads (default 1)")
    run.set_defaults(func=cmd_run)
    table = sub.add_parser("table")
    table.add_argument("--results", required=True, nargs="+", help="JSON-lines files")
    table.set_defaults(func=cmd_table)
    args = parser.parse_args()
    if args.command == "run" and "tune" in args.methods and not (
        args.tune_budget or args.tune_trials
    ):
        parser.error("--methods tune needs --tune-budget or --tune-trials")
    args.func(args)


if __name__ == "__main__":
    main()
