"""A million-item catalogue: sampled-softmax training, and exact vs FAISS-index top-100.

    nice -n 10 python bench/large_catalogue.py --work /tmp/large [--updates 60]
        [--full-updates 3] [--samples 8192] [--hidden 200] [--latent 64] [--batch 500]
        [--optimiser sparse|dense] [--epochs 12] [--validation-users 1000] [--threads N]
        [--memory-limit-gb 11] [--device cpu] [--factory HNSW32,Flat] [--metric inner_product]
        [--metric-check] [--search efSearch=64,efSearch=128,efSearch=256] [--margins 100,400]
        [--stage all|prepare|train|epochs|serve]

1. Data: ``training.synthetic``'s ``1m-items`` shape (200,000 users x 1,000,000 items, 10M
   play counts, every play a click); 2,000 random users are held out as serving histories.
2. Training speed (``--stage train``), each objective in a fresh process so its peak RSS is
   its own: Mult-VAE [I -> hidden -> latent -> hidden -> I], batch 500 (``--batch``), Adam
   1e-3, beta 0.2, for a bounded number of updates (not to convergence) after two warm-up
   updates: the sampled softmax (``training.sampled``, ``--samples`` items per batch) with
   lazy Adam over sparse gradients as ``multvae train`` runs it (``--optimiser dense``: the
   previous dense gradients and dense Adam, for comparison), then the full softmax (fewer
   updates: each scores every item for every user of the batch). Prints users/s and peak
   RSS; the sampled run's weights are kept for step 4. ``--memory-limit-gb`` caps a training
   process's address space (RLIMIT_AS), so that a run too big for the machine fails with
   "out of memory" instead of waking the kernel's OOM killer on a shared machine.
3. Training a usable model (``--stage epochs``): ``multvae train``'s own loop
   (``training.train.train`` with ``sampled_softmax``) for ``--epochs`` whole epochs over
   the 198,000 training users, beta annealed to 0.2, validation NDCG@100 every epoch on the
   first ``--validation-users`` held-out users (80 % folded in, 20 % targets), a checkpoint
   every epoch (run the same command again to continue after an interruption); one JSON
   line per epoch, and the best epoch's weights replace model.pt.
4. Serving (``--stage serve``), in a fresh process: the exact Recommender against one with a
   ``multvae.topn_index.TopNIndex`` (built as ``load_serving`` builds it; its build time and
   the RSS it adds are printed), top-100 for one history at a time and for batches of 16,
   p50/p99 latency, recall@100 of the index's answer against the exact one, for each
   ``--search`` setting and ``--margins`` value (extra candidates asked of the index and
   scored exactly), and the fastest setting with recall@100 >= 0.99; with
   ``--metric-check``, the recall of both metrics (inner product, L2 reduction) on the first
   100,000 items.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE, SparseRows
from multvae.recommend import Query, Recommender
from multvae.topn_index import IndexSpec, TopNIndex, require_faiss
from training import checkpoint
from training.checkpoint import Checkpointing
from training.dataset import HeldOut, Split
from training.sampled import Objective, SampledSoftmax, full_softmax
from training.sampled import optimisers as sampled_optimisers
from training.synthetic import generate
from training.train import EpochRecord, TrainConfig, train

HELD_OUT = 2_000
BETA = 0.2


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _machine() -> str:
    load = os.getloadavg()
    return (f"{os.cpu_count()} CPUs, torch {torch.__version__} ({torch.get_num_threads()} "
            f"threads), load average {load[0]:.2f}/{load[1]:.2f}/{load[2]:.2f}")


def prepare(work: Path) -> None:
    tic = time.perf_counter()
    inter = generate("1m-items", seed=0)
    n_users, n_items = len(inter.user_ids), len(inter.item_ids)
    clicks = sp.csr_matrix(
        (np.ones(len(inter), dtype=np.float32), (inter.user, inter.item)), shape=(n_users, n_items)
    )
    clicks.sum_duplicates()
    clicks.data[:] = 1.0
    order = np.random.default_rng(0).permutation(n_users)
    sp.save_npz(work / "train.npz", clicks[np.sort(order[HELD_OUT:])])
    sp.save_npz(work / "serve.npz", clicks[np.sort(order[:HELD_OUT])])
    print(json.dumps({"stage": "prepare", "users": n_users, "items": n_items,
                      "clicks": int(clicks.nnz), "seconds": round(time.perf_counter() - tic, 1)}))


def _limit_memory(args: argparse.Namespace) -> None:
    if args.memory_limit_gb:
        limit = int(args.memory_limit_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))


def train_stage(args: argparse.Namespace) -> None:
    _limit_memory(args)
    try:
        _train(args)
    except (MemoryError, RuntimeError) as exc:  # torch: "DefaultCPUAllocator: can't allocate"
        print(json.dumps({"stage": f"train-{args.objective}", "batch": args.batch,
                          "failed": f"{type(exc).__name__}: {str(exc)[:160]}",
                          "memory_limit_gb": args.memory_limit_gb,
                          "peak_rss_mb": round(_peak_mb())}))


def _train(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    train = sp.csr_matrix(sp.load_npz(args.work / "train.npz"))
    n_items = train.shape[1]
    loaded_mb = _rss_mb()
    torch.manual_seed(0)
    model = MultVAE(ModelConfig(p_dims=(args.latent, args.hidden, n_items))).to(device).train()
    objective: Objective = full_softmax
    optimisers: list[torch.optim.Optimizer] = [torch.optim.Adam(model.parameters(), lr=1e-3)]
    if args.objective == "sampled":
        objective = SampledSoftmax.from_clicks(train, args.samples, device)
        if args.optimiser == "sparse":  # what multvae train --sampled-softmax uses
            optimisers = sampled_optimisers(model, 1e-3)
    dense_grads = args.objective == "sampled" and args.optimiser == "dense"
    updates = args.updates if args.objective == "sampled" else args.full_updates
    rng = np.random.default_rng(0)

    def step() -> None:
        rows = rng.choice(train.shape[0], args.batch, replace=False)
        x = SparseRows.from_csr(train[rows], device)
        nll, mu, logvar = objective(model, x)
        assert logvar is not None
        loss = nll + BETA * model.kl_divergence(mu, logvar)
        for optimiser in optimisers:
            optimiser.zero_grad(set_to_none=True)
        loss.backward()
        if dense_grads:  # the previous dense gradients and Adam (--optimiser dense)
            for p in model.parameters():
                if p.grad is not None and p.grad.is_sparse:
                    p.grad = p.grad.to_dense()
        for optimiser in optimisers:
            optimiser.step()

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    tic = time.perf_counter()
    for _ in range(updates):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - tic
    if args.objective == "sampled":
        torch.save(model.state_dict(), args.work / "model.pt")
    print(json.dumps({
        "stage": f"train-{args.objective}", "machine": _machine(), "device": str(device),
        "optimiser": args.optimiser if args.objective == "sampled" else "dense",
        "architecture": f"[I -> {args.hidden} -> {args.latent} -> {args.hidden} -> I], I={n_items}",
        "samples": args.samples if args.objective == "sampled" else None,
        "batch": args.batch, "updates": updates,
        "seconds_per_update": round(seconds / updates, 3),
        "users_per_s": round(updates * args.batch / seconds, 1),
        "rss_after_data_mb": round(loaded_mb), "peak_rss_mb": round(_peak_mb()),
        **({"cuda_peak_mb": round(torch.cuda.max_memory_allocated(device) / 2**20)}
           if device.type == "cuda" else {}),
    }))


def _held_out(rows: sp.csr_matrix, seed: int) -> HeldOut:
    """80/20 fold-in/targets of each row with >= 5 clicks (the paper's held-out protocol)."""
    rng = np.random.default_rng(seed)
    parts: dict[bool, tuple[list[int], list[int]]] = {True: ([], []), False: ([], [])}
    kept = [u for u in range(rows.shape[0]) if rows.indptr[u + 1] - rows.indptr[u] >= 5]
    for r, u in enumerate(kept):
        cols = rows.indices[rows.indptr[u] : rows.indptr[u + 1]]
        is_target = np.zeros(len(cols), dtype=bool)
        is_target[rng.choice(len(cols), size=len(cols) // 5, replace=False)] = True
        for target in (True, False):
            picked = cols[is_target == target]
            parts[target][0].extend([r] * len(picked))
            parts[target][1].extend(picked.tolist())

    def matrix(target: bool) -> sp.csr_matrix:
        r, c = parts[target]
        shape = (len(kept), rows.shape[1])
        return sp.csr_matrix((np.ones(len(r), np.float32), (r, c)), shape=shape)

    return HeldOut(matrix(False), matrix(True), np.arange(len(kept)))


def epochs_stage(args: argparse.Namespace) -> None:
    """``multvae train``'s own loop for ``--epochs`` whole epochs, checkpointing each epoch
    (run the same command again to continue an interrupted run); the best epoch by validation
    NDCG@100 (the first ``--validation-users`` held-out users, 80 % folded in) -> model.pt."""
    device = torch.device(args.device)
    train_m = sp.csr_matrix(sp.load_npz(args.work / "train.npz"))
    serve = sp.csr_matrix(sp.load_npz(args.work / "serve.npz"))
    validation = _held_out(serve[: args.validation_users], seed=0)
    n_items = train_m.shape[1]
    popularity = np.bincount(train_m.indices, minlength=n_items)
    items = ItemIndex.build(range(n_items), popularity)
    split = Split(train_m, validation, validation, items, seed=0)
    config = TrainConfig(
        model="multvae", hidden_dims=(args.hidden,), latent_dim=args.latent,
        batch_size=args.batch, epochs=args.epochs, anneal_cap=BETA, patience=None,
        sampled_softmax=args.samples, device=str(device), seed=0,
    )  # fmt: skip
    checkpointing = Checkpointing(
        args.work / checkpoint.CHECKPOINT_FILE, True,
        checkpoint.identity("1m-items seed 0", config.to_dict()),
    )  # fmt: skip

    def report(record: EpochRecord) -> None:
        print(json.dumps({"stage": "epochs", **asdict(record), "peak_rss_mb": round(_peak_mb()),
                          "machine": _machine()}), flush=True)

    result = train(split, config, on_epoch=report, checkpointing=checkpointing)
    torch.save(result.model.state_dict(), args.work / "model.pt")
    print(json.dumps({
        "stage": "epochs-done", "machine": _machine(), "epochs": args.epochs,
        "updates": result.history[-1].updates if result.history else 0,
        "best_epoch": result.best_epoch, "best_val_ndcg_at_100": round(result.best_val_ndcg, 4),
        "validation_users": validation.n_users, "peak_rss_mb": round(_peak_mb()),
    }))


def _percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2),
            "p99_ms": round(float(np.percentile(ms, 99)), 2)}


def _timed(rec: Recommender, batches: list[list[Query]]) -> tuple[list[float], list[list[str]]]:
    times, answers = [], []
    for batch in batches:
        tic = time.perf_counter()
        out = rec.recommend_batch(batch)
        times.append(time.perf_counter() - tic)
        answers += [[item for item, _ in r.items] for r in out]
    return times, answers


def _recall(exact: list[list[str]], approx: list[list[str]]) -> dict[str, float]:
    per = [len(set(a) & set(e)) / max(len(e), 1) for e, a in zip(exact, approx, strict=True)]
    return {"recall_at_100_mean": round(float(np.mean(per)), 4),
            "recall_at_100_min": round(float(np.min(per)), 4)}


def serve_stage(args: argparse.Namespace) -> None:
    faiss = require_faiss()
    if args.threads:
        faiss.omp_set_num_threads(args.threads)
    torch.manual_seed(0)
    serve = sp.csr_matrix(sp.load_npz(args.work / "serve.npz"))
    n_items = serve.shape[1]
    model = MultVAE(ModelConfig(p_dims=(args.latent, args.hidden, n_items)))
    model.load_state_dict(torch.load(args.weights or args.work / "model.pt"))
    model.eval()
    items = ItemIndex.build([str(c) for c in range(n_items)], np.ones(n_items, dtype=np.int64))
    histories = [
        [str(c) for c in serve.indices[serve.indptr[u] : serve.indptr[u + 1]]]
        for u in range(serve.shape[0])
    ]
    singles = [[Query(h, 100)] for h in histories[: args.singles]]
    batches = [
        [Query(h, 100) for h in histories[i : i + 16]]
        for i in range(0, 16 * args.batches, 16)
    ]
    exact = Recommender(model, items)
    _timed(exact, singles[:5])  # warm-up
    single_t, single_exact = _timed(exact, singles)
    batch_t, batch_exact = _timed(exact, batches)
    out: dict[str, Any] = {
        "stage": "serve", "machine": _machine(), "faiss": faiss.__version__,
        "faiss_threads": faiss.omp_get_max_threads(), "items": n_items,
        "mean_history": round(float(np.mean([len(h) for h in histories])), 1),
        "exact": {"single": _percentiles(single_t), "batch16": _percentiles(batch_t)},
    }
    before = _rss_mb()
    index = TopNIndex(model, IndexSpec(args.factory, "", 100, args.metric))
    out["index"] = {"factory": args.factory, "metric": args.metric,
                    "build_seconds": round(index.build_seconds, 1),
                    "rss_added_mb": round(_rss_mb() - before)}
    print(json.dumps({"exact": out["exact"], "index": out["index"]}), flush=True)
    indexed = Recommender(model, items, index=index)
    for search in args.search.split(","):
        faiss.ParameterSpace().set_index_parameters(index.index, search)
        for margin in [int(m) for m in args.margins.split(",")]:
            index.spec = replace(index.spec, search=search, margin=margin)
            _timed(indexed, singles[:5])
            s_t, s_ans = _timed(indexed, singles)
            b_t, b_ans = _timed(indexed, batches)
            single, batch = _percentiles(s_t), _percentiles(b_t)
            setting = f"{search} margin={margin}"
            out[setting] = {
                "single": single, "batch16": batch,
                **_recall(single_exact + batch_exact, s_ans + b_ans),
                "speedup_p50_single": round(out["exact"]["single"]["p50_ms"] / single["p50_ms"], 1),
                "speedup_p50_batch16": round(
                    out["exact"]["batch16"]["p50_ms"] / batch["p50_ms"], 1
                ),
                "machine": _machine(),
            }
            print(json.dumps({setting: out[setting]}), flush=True)
    good = {k: v for k, v in out.items()
            if isinstance(v, dict) and v.get("recall_at_100_mean", 0) >= 0.99}  # fmt: skip
    out["fastest_at_recall_0.99"] = (
        max(good, key=lambda k: good[k]["speedup_p50_single"]) if good else None
    )
    del indexed, index
    if args.metric_check:
        out["metric_check"] = _metric_check(faiss, model, histories[: args.singles])
    print(json.dumps(out, indent=1))


def _metric_check(faiss: Any, model: MultVAE, histories: list[list[str]]) -> dict[str, Any]:
    """Recall@100 over the first 100,000 items: inner-product metric vs the L2 reduction."""
    part = 100_000
    layer = model.output_layer
    with torch.no_grad():
        vectors = torch.cat([layer.weight[:part], layer.bias[:part, None]], 1).numpy()
        cols = [np.array([int(c) for c in h], dtype=np.int64) for h in histories]
        x = sp.csr_matrix(
            (np.ones(sum(map(len, cols)), np.float32), np.concatenate(cols),
             np.r_[0, np.cumsum([len(c) for c in cols])]),
            shape=(len(cols), layer.weight.shape[0]),
        )  # fmt: skip
        hidden = model.decode_hidden(model.encode(SparseRows.from_csr(x))[0])
        queries = torch.cat([hidden, torch.ones(len(cols), 1)], 1).numpy()
    truth = np.argsort(-(queries @ vectors.T), axis=1)[:, :100]
    norms = (vectors.astype(np.float64) ** 2).sum(1)
    lifted = np.c_[vectors, np.sqrt(norms.max() - norms)].astype(np.float32)
    out = {}
    for name, metric, base, q in (
        ("inner_product", faiss.METRIC_INNER_PRODUCT, vectors, queries),
        ("l2_reduction", faiss.METRIC_L2, lifted, np.c_[queries, np.zeros(len(queries))]),
    ):
        index = faiss.index_factory(base.shape[1], "HNSW32,Flat", metric)
        index.add(np.ascontiguousarray(base, dtype=np.float32))
        faiss.ParameterSpace().set_index_parameters(index, "efSearch=128")
        found = index.search(np.ascontiguousarray(q, dtype=np.float32), 100)[1]
        out[name] = round(float(np.mean([len(set(f) & set(t)) / 100
                                         for f, t in zip(found, truth, strict=True)])), 4)
    return {"items": part, "index": "HNSW32,Flat efSearch=128", "recall_at_100": out}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, required=True)
    parser.add_argument("--stage", choices=("all", "prepare", "train", "epochs", "serve"),
                        default="all")
    parser.add_argument("--objective", choices=("sampled", "full"), default="sampled")
    parser.add_argument("--updates", type=int, default=60)
    parser.add_argument("--full-updates", type=int, default=3)
    parser.add_argument("--samples", type=int, default=8192)
    parser.add_argument("--hidden", type=int, default=200)
    parser.add_argument("--latent", type=int, default=64)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--optimiser", choices=("sparse", "dense"), default="sparse",
                        help="sampled softmax: lazy Adam over sparse gradients (multvae "
                        "train's) or the previous dense gradients and Adam")
    parser.add_argument("--epochs", type=int, default=3, help="--stage epochs")
    parser.add_argument("--validation-users", type=int, default=1000, help="--stage epochs")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch (and FAISS) threads; 0 = their defaults")
    parser.add_argument("--weights", type=Path, default=None,
                        help="--stage serve: a state dict to serve (default: WORK/model.pt)")
    parser.add_argument("--margins", default="100",
                        help="--stage serve: candidates beyond n + history asked of the index")
    parser.add_argument("--memory-limit-gb", type=float, default=0.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--factory", default="HNSW32,Flat")
    parser.add_argument("--metric", choices=("inner_product", "l2"), default="inner_product")
    parser.add_argument("--metric-check", action="store_true",
                        help="also compare both metrics' recall on the first 100,000 items")
    parser.add_argument("--search", default="efSearch=64,efSearch=128,efSearch=256")
    parser.add_argument("--singles", type=int, default=200)
    parser.add_argument("--batches", type=int, default=30)
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.stage == "prepare":
        prepare(args.work)
    elif args.stage == "train":
        train_stage(args)
    elif args.stage == "epochs":
        _limit_memory(args)
        epochs_stage(args)
    elif args.stage == "serve":
        serve_stage(args)
    else:
        prepare(args.work)
        passed = sys.argv[1:]
        for stage in (["train", "--objective", "sampled"], ["train", "--objective", "full"],
                      ["epochs"], ["serve"]):
            done = subprocess.run([sys.executable, __file__, *passed, "--stage", *stage])
            if done.returncode:
                print(json.dumps({"stage": " ".join(stage), "exit": done.returncode}))


if __name__ == "__main__":
    main()
