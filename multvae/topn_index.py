"""Top-N candidates from a maximum-inner-product index over the decoder's output layer (FAISS).

A fold-in scores item j as ``h . W_j + b_j`` (``h`` the decoder's last hidden state, ``W_j``
and ``b_j`` row j of the output layer): an inner product of ``[h, 1]`` with ``[W_j, b_j]``.
Graph and cluster indexes search nearest neighbours far better than largest inner products
(an FAISS HNSW index with the inner-product metric found about half of the true top 100 on a
20,000-item test, bench/RESULTS.md), so the search is reduced to a nearest-neighbour one
(Bachrach et al., RecSys 2014): item j is indexed as ``v_j = [W_j, b_j, sqrt(M - |[W_j,
b_j]|^2)]`` with ``M`` the largest squared norm, the query is ``q = [h, 1, 0]``, and
``|q - v_j|^2 = |h|^2 + 1 + M - 2 (h . W_j + b_j)``: the nearest items in L2 are exactly the
highest-scoring ones. :class:`multvae.recommend.Recommender` then scores the proposed
candidates exactly with the model's own layer and masks the history. FAISS is an optional
extra (``pip install 'multvae-rec[faiss]'``) and runs on the CPU; the index is built from
the version's weights when the version loads.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any

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
    """

    factory: str = "HNSW32,Flat"
    search: str = "efSearch=128"
    margin: int = 100

    def check(self) -> None:
        """Raise ValueError naming what is wrong with ``factory`` or ``search`` (faiss needed)."""
        faiss = require_faiss()
        try:
            index = faiss.index_factory(8, self.factory, faiss.METRIC_L2)
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


def _set_search(faiss: ModuleType, index: Any, search: str) -> None:
    if search.strip():
        faiss.ParameterSpace().set_index_parameters(index, search.strip())


class TopNIndex:
    """A nearest-neighbour index over a model's augmented ``[W_j, b_j]`` rows (module doc);
    proposes top-N candidates."""

    def __init__(self, model: MultVAE, spec: IndexSpec) -> None:
        faiss = require_faiss()
        self.spec = spec
        started = time.perf_counter()
        layer = model.output_layer
        with torch.no_grad():
            rows = torch.cat([layer.weight, layer.bias[:, None]], dim=1).float()  # (I, d + 1)
            norms = torch.linalg.vector_norm(rows, dim=1) ** 2
            lift = (norms.max() - norms).clamp_min(0.0).sqrt()
            vectors = np.ascontiguousarray(torch.cat([rows, lift[:, None]], dim=1).cpu().numpy())
            del rows  # (I, d + 2) above: one float32 copy of the layer besides FAISS's own
        self.n_items, self.dim = vectors.shape
        self.index = faiss.index_factory(self.dim, spec.factory, faiss.METRIC_L2)
        if not self.index.is_trained:
            self.index.train(vectors)
        self.index.add(vectors)
        _set_search(faiss, self.index, spec.search)
        self.build_seconds = time.perf_counter() - started

    def propose(self, hidden: Tensor, k: int) -> NDArray[np.int64]:
        """(B, min(k, I)) candidate columns for the decoder states ``hidden`` (B, d), best
        first by the index's estimate; -1 where it found fewer."""
        with torch.no_grad():
            ones = torch.ones(hidden.shape[0], 1, dtype=hidden.dtype, device=hidden.device)
            queries = torch.cat([hidden, ones, torch.zeros_like(ones)], dim=1)
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
            "build_seconds": round(self.build_seconds, 3),
        }
