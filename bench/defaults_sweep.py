"""Candidate training defaults on every shared data set and seed, chosen on validation users.

    python bench/defaults_sweep.py run --results sweep.jsonl [--device cuda] [--workers 12]
        [--candidates dae,dae-z600,ease] [--datasets citeulike-t,filmtrust] [--seeds 98765]
        [--deadline 30m] [--data-root ../shared/data]
    python bench/defaults_sweep.py table --results sweep.jsonl [more.jsonl ...]

``run`` trains every candidate (a named set of ``TrainConfig`` overrides on top of what
``multvae train`` would do, or a baseline of ``training.baselines``) on every (data set, seed)
split of ``bench/quality.py`` (REFERENCE.md's split for ML-100K and ml-latest-small, the
default held-out rule for FilmTrust and CiteULike-t), in ``--workers`` processes, and appends
one JSON line per fit: validation NDCG@100 (what a default may be chosen on), the test users'
NDCG@100 and Recall@20 (what is reported), the best epoch and the time. Jobs go out in the
order of ``--candidates`` (CiteULike-t first inside each), so a run cut short by
``--deadline`` has whole candidates rather than a scatter; no job starts after the deadline.

``table`` prints, per candidate, the mean validation and test NDCG@100 of each data set over
its seeds with the pooled test standard error, and each candidate's mean validation NDCG@100
relative to the current default over all splits (the figure a default is chosen on).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

DATASETS = {  # as bench/quality.py: (path under the data root, preset)
    "citeulike-t": ("citeulike-t", None),
    "ml-latest-small": ("ml-latest-small/ratings.csv", "ml-latest-small"),
    "filmtrust": ("filmtrust", None),
    "ml-100k": ("ml-100k/u.data", "ml-100k"),
}
SEEDS = (98765, 12345, 2024)
REFERENCE = "dae"  # the current default on all four sets (fewer than 10,000 training users)
# TrainConfig overrides; "baseline:NAME" entries are training.baselines runs.
CANDIDATES: dict[str, dict[str, Any]] = {
    "dae": {"model": "multdae"},
    "dae-net": {"model": "multdae", "item_neighbours": 0},
    "dae-n64": {"model": "multdae", "item_neighbours": 64},
    "dae-n256": {"model": "multdae", "item_neighbours": 256},
    "ease": {"baseline": "ease"},
    "ease-wide": {"baseline": "ease", "grid": (5.0, 10.0, 20.0, 50.0, 100.0, 200.0, 500.0, 1000.0)},
    "dae-z600": {"model": "multdae", "latent_dim": 600},
    "dae-z1000": {"model": "multdae", "latent_dim": 1000},
    "dae-wd003": {"model": "multdae", "weight_decay": 0.003},
    "dae-wd03": {"model": "multdae", "weight_decay": 0.03},
    "dae-p07": {"model": "multdae", "dropout": 0.7},
    "dae-z600-p07": {"model": "multdae", "latent_dim": 600, "dropout": 0.7},
    "dae-z600-wd03": {"model": "multdae", "latent_dim": 600, "weight_decay": 0.03},
    "dae-z1000-p07": {"model": "multdae", "latent_dim": 1000, "dropout": 0.7},
    "dae-b100": {"model": "multdae", "batch_size": 100},
    "dae-lr3e-3": {"model": "multdae", "lr": 3e-3},
    "dae-p03": {"model": "multdae", "dropout": 0.3},
    "dae-h600": {"model": "multdae", "hidden_dims": (600,)},
    "dae-z2000-p07": {"model": "multdae", "latent_dim": 2000, "dropout": 0.7},
    "dae-z1000-p08": {"model": "multdae", "latent_dim": 1000, "dropout": 0.8},
    "vae": {"model": "multvae"},
    "vae-z600": {"model": "multvae", "latent_dim": 600},
    "recvae": {"model": "recvae"},
    "wmf": {"baseline": "wmf"},
}
_prepared: dict[tuple[str, int], Any] = {}


def _job(job: tuple[str, str, int, str, str, float]) -> dict[str, Any] | None:
    if time.time() > job[-1]:
        return None
    try:
        return _fit(*job[:-1])
    except Exception as exc:  # one failed fit is reported, the sweep goes on
        return {"failed": f"{job[:3]}: {type(exc).__name__}: {exc}"}


def _fit(candidate: str, dataset: str, seed: int, data_root: str, device: str) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)
    from training.baselines import run_baselines
    from training.evaluate import evaluate_model
    from training.pipeline import DataSpec, prepare, train_config_for
    from training.train import train

    rel, preset = DATASETS[dataset]
    spec = DataSpec(str(Path(data_root) / rel), preset=preset, seed=seed)
    if (dataset, seed) not in _prepared:
        _prepared[(dataset, seed)] = prepare(spec)
    split = _prepared[(dataset, seed)].split
    overrides = dict(CANDIDATES[candidate])
    tic = time.perf_counter()
    info: dict[str, Any]
    if "baseline" in overrides:
        name = overrides.pop("baseline")
        grids = {"ease_grid": overrides["grid"]} if "grid" in overrides else {}
        result = run_baselines(split, [name], **grids)[name]
        test, val = result.test, float(result.validation.per_user["ndcg@100"].mean())
        info = {"params": result.params}
    else:
        config = train_config_for(spec, seed=seed, device=device, **overrides)
        trained = train(split, config)
        test = evaluate_model(trained.model, split.test)
        val = float(evaluate_model(trained.model, split.validation).per_user["ndcg@100"].mean())
        info = {"best_epoch": trained.best_epoch, "epochs": len(trained.history),
                "item_path": trained.item_path, "network_test": _network_test(trained, split),
                "plan": {"model": trained.plan.model, "hidden": trained.plan.hidden_dims,
                         "batch": trained.plan.batch_size, "epochs": trained.plan.epochs}}
    return {
        "candidate": candidate, "dataset": dataset, "seed": seed, "device": device,
        "val_ndcg@100": val, "seconds": round(time.perf_counter() - tic, 1),
        "per_user": {m: [round(float(v), 5) for v in test.per_user[m]]
                     for m in ("ndcg@100", "recall@20")},
        **info,
    }


def _network_test(trained: Any, split: Any) -> list[float] | None:
    """The test users' NDCG@100 of the network alone, where an item-item path was added."""
    from training.evaluate import evaluate_model
    from training.itempath import network_alone

    if not trained.model.config.item_neighbours:
        return None
    network = network_alone(trained.model)
    return [round(float(v), 5) for v in evaluate_model(network, split.test).per_user["ndcg@100"]]


def cmd_run(args: argparse.Namespace) -> None:
    path = Path(args.results)
    done = set()
    if path.exists():
        for line in path.read_text().splitlines():
            r = json.loads(line)
            done.add((r["candidate"], r["dataset"], r["seed"]))
    deadline = time.time() + args.deadline
    jobs = [
        (c, d, s, args.data_root, args.device, deadline)
        for c in args.candidates for d in args.datasets for s in args.seeds
        if (c, d, s) not in done
    ]
    os.environ.setdefault("OMP_NUM_THREADS", "2")  # numpy BLAS in the baselines, per worker
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "2")
    ctx = mp.get_context("spawn")  # CUDA in the workers
    with ctx.Pool(args.workers) as pool:
        for record in pool.imap_unordered(_job, jobs, chunksize=1):
            if record is None:
                continue
            if "failed" in record:
                print(record["failed"], flush=True)
                continue
            with path.open("a") as fh:
                fh.write(json.dumps(record) + "\n")
            print(f"{record['dataset']} {record['seed']} {record['candidate']}: val "
                  f"{record['val_ndcg@100']:.4f} test "
                  f"{np.mean(record['per_user']['ndcg@100']):.4f} ({record['seconds']:.0f} s)",
                  flush=True)


def _load(paths: list[str]) -> dict[tuple[str, str, int], dict[str, Any]]:
    runs: dict[tuple[str, str, int], dict[str, Any]] = {}
    for p in paths:
        for line in Path(p).read_text().splitlines():
            r = json.loads(line)
            runs.setdefault((r["candidate"], r["dataset"], r["seed"]), r)
    return runs


def cmd_table(args: argparse.Namespace) -> None:
    runs = _load(args.results)
    candidates = list(dict.fromkeys(c for c, _, _ in runs))
    datasets = [d for d in DATASETS if any(k[1] == d for k in runs)]
    print("| candidate | " + " | ".join(f"{d} val / test NDCG@100 (seeds)" for d in datasets)
          + " | val vs `dae` |")
    print("|---" * (len(datasets) + 2) + "|")
    for c in candidates:
        cells, ratios = [], []
        for d in datasets:
            mine = [r for (cc, dd, _), r in runs.items() if cc == c and dd == d]
            if not mine:
                cells.append("-")
                continue
            pooled = np.concatenate([r["per_user"]["ndcg@100"] for r in mine])
            se = pooled.std(ddof=1) / math.sqrt(len(pooled))
            val = np.mean([r["val_ndcg@100"] for r in mine])
            cells.append(f"{val:.4f} / {pooled.mean():.4f} ± {se:.4f} ({len(mine)})")
            for r in mine:
                ref = runs.get((REFERENCE, d, r["seed"]))
                if ref is not None:
                    ratios.append(r["val_ndcg@100"] / ref["val_ndcg@100"])
        rel = f"{(np.mean(ratios) - 1) * 100:+.1f} % ({len(ratios)})" if ratios else "-"
        print(f"| {c} | " + " | ".join(cells) + f" | {rel} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run")
    run.add_argument("--results", required=True,
                     help="JSON-lines file (appended; runs already in it are skipped)")
    run.add_argument(
        "--data-root", default=str(Path(__file__).resolve().parents[2] / "shared/data")
    )
    run.add_argument("--datasets", type=lambda s: s.split(","), default=list(DATASETS))
    run.add_argument("--seeds", type=lambda s: [int(v) for v in s.split(",")],
                     default=list(SEEDS))
    run.add_argument("--candidates", type=lambda s: s.split(","), default=list(CANDIDATES))
    run.add_argument("--device", default="cpu")
    run.add_argument("--workers", type=int, default=1)
    run.add_argument("--deadline", type=float, default=math.inf,
                     help="seconds after which no job starts")
    run.set_defaults(func=cmd_run)
    table = sub.add_parser("table")
    table.add_argument("--results", required=True, nargs="+")
    table.set_defaults(func=cmd_table)
    args = parser.parse_args()
    if args.command == "run":
        unknown = [c for c in args.candidates if c not in CANDIDATES]
        unknown += [d for d in args.datasets if d not in DATASETS]
        if unknown:
            parser.error(f"unknown {unknown}; candidates {list(CANDIDATES)}, "
                         f"data sets {list(DATASETS)}")
    args.func(args)


if __name__ == "__main__":
    main()
