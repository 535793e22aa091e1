"""The item-item path: EASE's weights beside a trained network, chosen on validation users.

A trained Mult-VAE / Mult-DAE ranks items by its decoder logits f(z). With an item-item path
it ranks by ``f(z) + w * x B``, where B is EASE's item-item matrix (Steck, WWW 2019: the
closed-form, zero-diagonal ridge regression of every item on the others) restricted to each
item's ``m`` strongest weights. This is the shallow parallel path of VASP (Vancura & Kordik,
ICANN 2021), fitted in closed form after the network instead of jointly, and it folds in a
history exactly as the network does: the service, the cache, ``compare`` and the retrain
gate see one model.

Why: the network is a low-rank model of the catalogue. Where items outnumber training users
(CiteULike-t: 24,100 items, 4,175 training users) a full-rank item-item model is ahead of the
whole VAE family, and the two err differently, so their sum is ahead of both (bench/RESULTS.md,
"The item-item path").

Fitting (:func:`fit_item_path`, after training, on the leader): EASE's lambda from
:data:`training.baselines.EASE_GRID` by the validation users' NDCG@100 (as ``multvae
evaluate --baselines``), B's rows pruned to the ``m`` weights largest in magnitude, then ``w``
from :data:`WEIGHTS` by the same users' NDCG@100 of the sum; ``w = 0`` (the network alone) is
one of the choices, and then no path is stored. A catalogue whose EASE would not fit in memory
(:func:`training.baselines.check_ease_memory`) keeps the network alone, and says so.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from typing import Any

import numpy as np
import torch

from multvae.errors import DataError
from multvae.model import MultVAE
from training.baselines import (
    EASE_GRID,
    check_ease_memory,
    ease_fit,
    ease_neighbours,
    evaluate_scorer,
)
from training.dataset import Split
from training.evaluate import evaluate_model

log = logging.getLogger(__name__)

# Weights of the path tried on the validation users; the logits' scale is the network's own,
# so the grid spans it in steps of ~3.
WEIGHTS: tuple[float, ...] = (0.0, 1.0, 3.0, 10.0, 30.0, 100.0, 300.0)


def with_item_path(
    model: MultVAE, neighbours: np.ndarray, weights: np.ndarray, weight: float
) -> MultVAE:
    """A copy of ``model`` that adds ``weight`` times the path (I, m) to its logits."""
    config = replace(model.config, item_neighbours=neighbours.shape[1], item_weight=weight)
    device = model.input_weight.device
    out = MultVAE(config).to(device)
    state = dict(model.state_dict())
    state["neighbours"] = torch.from_numpy(neighbours).to(device)
    state["neighbour_weights"] = torch.from_numpy(weights).to(device)
    out.load_state_dict(state)
    return out.train(model.training)


def network_alone(model: MultVAE) -> MultVAE:
    """A copy of ``model`` without its item-item path: the trained network's own scores."""
    network = MultVAE(replace(model.config, item_neighbours=0, item_weight=0.0))
    network.load_state_dict({k: v for k, v in model.state_dict().items()
                             if k not in ("neighbours", "neighbour_weights")})  # fmt: skip
    return network.to(model.input_weight.device).train(model.training)


def _validation_ndcg(model: MultVAE, split: Split) -> float:
    return float(evaluate_model(model, split.validation).per_user["ndcg@100"].mean())


def fit_item_path(model: MultVAE, split: Split, neighbours: int) -> tuple[MultVAE, dict[str, Any]]:
    """(the model to keep, a summary for metrics.json): see the module docstring."""
    tic = time.perf_counter()
    train = split.train
    lambdas = []
    try:  # EASE refuses data it cannot fit; the trained network is kept either way
        check_ease_memory(train.shape[1], n_users=train.shape[0])
        for l2 in EASE_GRID:
            score = evaluate_scorer(ease_fit(train, l2), split.validation)
            lambdas.append({"l2": l2, "val_ndcg@100": float(score.per_user["ndcg@100"].mean())})
        l2 = max(lambdas, key=lambda r: r["val_ndcg@100"])["l2"]
        cols, vals = ease_neighbours(train, l2, neighbours)
    except DataError as exc:
        log.warning("no item-item path: %s", exc)
        return model, {"fitted": False, "reason": str(exc)}
    was_training = model.training
    model.eval()
    tried = []
    for weight in WEIGHTS:
        candidate = with_item_path(model, cols, vals, weight) if weight else model
        tried.append({"weight": weight, "val_ndcg@100": _validation_ndcg(candidate, split)})
    model.train(was_training)
    best = max(tried, key=lambda r: r["val_ndcg@100"])  # the first of equals: the smaller w
    chosen = with_item_path(model, cols, vals, best["weight"]) if best["weight"] else model
    summary = {
        "fitted": bool(best["weight"]),
        "l2": l2,
        "neighbours": int(cols.shape[1]),
        "weight": best["weight"],
        "val_ndcg@100": best["val_ndcg@100"],
        "network_val_ndcg@100": tried[0]["val_ndcg@100"],
        "lambda_search": lambdas,
        "weight_search": tried,
        "seconds": round(time.perf_counter() - tic, 1),
    }
    log.info(
        "item-item path: lambda %g, weight %g of %s, validation NDCG@100 %.4f (network alone "
        "%.4f), %.0f s", l2, best["weight"], WEIGHTS, best["val_ndcg@100"],
        tried[0]["val_ndcg@100"], summary["seconds"],
    )  # fmt: skip
    return chosen, summary
