"""Top-N candidates from a maximum-inner-product index over the decoder's output layer (FAISS).

A fold-in scores item j as ``h . W_j + b_j`` (``h`` the decoder's last hidden state, ``W_j``
and ``b_j`` row j of the output layer): an inner product of ``[h, 1]`` with ``[W_j, b_j]``.
With ``metric="inner_product"`` (the default) FAISS searches those rows by inner product
directly, as graph search for maximum inner product does well (Morozov & Babenko, NeurIPS
2018). With ``metric="l2"`` the search is reduced to a nearest-neighbour one (Bachrach et
al., RecSys 2014): item j is indexed as ``v_j = [W_j, b_j, sqrt(M - |[W_j, b_j]|^2)]`` with
``M`` the largest squared norm, the query is ``q = [h, 1, 0]``, and ``|q - v_j|^2 = |h|^2 + 1
+ M - 2 (h . W_j + b_j)``: the nearest items are exactly the highest-scoring ones. Which finds
more of the true top N depends on the weights (bench/RESULTS.md has both), so every load
measures it: :attr:`TopNIndex.probe_recall` is the recall@100 of the index's answer against
exact scoring on probe histories. :class:`multvae.recommend.Recommender` scores the proposed
candidates exactly with the model's own layer and masks the history. FAISS is an optional
extra (``pip install 'multvae-rec[faiss]'``) and runs on the CPU; the index is built from
the version's weights when the version loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Literal

import numpy as np
import torch
from numpy.typing import NDArray
from torch import Tensor

from multvae.model import MultVAE

FAISS_MISSING = (
    "the FAISS top-N index needs the faiss extra, which is not installed: "
    "pip install 'multvae-rec[faiss]' (or serve with MULTVAE_TOPN_INDEX=exact)"
)


def require_faiss() -> ModuleType:
    """The faiss module, or ImportError saying how to install it."""
    try:
        import faiss
    except ImportError as exc:
        raise ImportError(FAISS_MISSING) from exc
    return faiss


@dataclass(frozen=True)
class IndexSpec:
    """How to build and search the index.

    ``factory`` is a FAISS index-factory string (e.g. ``HNSW32,Flat``, ``IVF1024,Flat``),
    ``search`` its search-time parameters as FAISS's ParameterSpace takes them (e.g.
    ``efSearch=128``, ``nprobe=32``; empty for none). Each history asks the index for
    ``n + |history| + |exclude| + margin`` candidates, so that n survive the masking.
    ``metric``: inner product directly, or the L2 reduction (module docstring).
    """

    factory: str = "HNSW32,Flat"
    search: str = "efSearch=128"
    margin: int = 100
    metric: Literal["inner_product", "l2"] = "inner_product"

    def check(self) -> None:
        """Raise ValueError naming what is wrong with ``factory`` or ``search`` (faiss needed)."""
        faiss = require_faiss()
        try:
            index = faiss.index_factory(8, self.factory, _metric(faiss, self.metric))
        except RuntimeError:
            raise ValueError(
                f"{self.factory!r} is not a FAISS index-factory string, e.g. HNSW32,Flat or "
                "IVF1024,Flat"
            ) from None
        try:
            _set_search(faiss, index, self.search)
        except RuntimeError:
            raise ValueError(
                f"{self.search!r} does not apply to a {self.factory} index: give FAISS search "
                "parameters as name=value[,name=value], e.g. efSearch=128 (HNSW) or "
                "nprobe=32 (IVF)"
            ) from None


def _metric(faiss: ModuleType, metric: str) -> Any:
    if metric not in ("inner_product", "l2"):
        raise ValueError(f"the index metric must be inner_product or l2, got {metric!r}")
    return faiss.METRIC_INNER_PRODUCT if metric == "inner_product" else faiss.METRIC_L2


def _set_search(faiss: ModuleType, index: Any, search: str) -> None:
    if search.strip():
        faiss.ParameterSpace().set_index_parameters(index, search.strip())


class TopNIndex:
    """An index over a model's ``[W_j, b_j]`` rows (module doc); proposes top-N candidates."""

    def __init__(self, model: MultVAE, spec: IndexSpec) -> None:
        faiss = require_faiss()
        self.spec = spec
        started = time.perf_counter()
        layer = model.output_layer
        with torch.no_grad():
            rows = torch.cat([layer.weight, layer.bias[:, None]], dim=1).float()  # (I, d + 1)
            if spec.metric == "l2":
                norms = torch.linalg.vector_norm(rows, dim=1) ** 2
                lift = (norms.max() - norms).clamp_min(0.0).sqrt()
                rows = torch.cat([rows, lift[:, None]], dim=1)  # (I, d + 2)
            vectors = np.ascontiguousarray(rows.cpu().numpy())
            del rows  # one float32 copy of the layer besides FAISS's own
        self.n_items, self.dim = vectors.shape
        self.index = faiss.index_factory(self.dim, spec.factory, _metric(faiss, spec.metric))
        if not self.index.is_trained:
            self.index.train(vectors)
        self.index.add(vectors)
        _set_search(faiss, self.index, spec.search)
        self.build_seconds = time.perf_counter() - started
        self.probe_recall: float | None = None  # set by whoever measures it (load_serving)

    def propose(self, hidden: Tensor, k: int) -> NDArray[np.int64]:
        """(B, min(k, I)) candidate columns for the decoder states ``hidden`` (B, d), best
        first by the index's estimate; -1 where it found fewer."""
        with torch.no_grad():
            ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
            parts = [hidden, ones] + ([torch.zeros_like(ones)] if self.spec.metric == "l2" else [])
            queries = torch.cat(parts, dim=1)
        found = self.index.search(
            np.ascontiguousarray(queries.float().cpu().numpy()), min(k, self.n_items)
        )[1]
        return np.asarray(found, dtype=np.int64)

    def describe(self) -> dict[str, Any]:
        """What GET /model shows about the index."""
        return {
            "kind": "faiss",
            "factory": self.spec.factory,
            "search": self.spec.search,
            "margin": self.spec.margin,
            "metric": self.spec.metric,
            "probe_recall_at_100": self.probe_recall,
            "build_seconds": round(self.build_seconds, 3),
        }
