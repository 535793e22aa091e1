"""Fold-in: the one code path from click histories to ranked items, offline and online.

``multvae evaluate`` and the HTTP service both go through :class:`Recommender`, so a service
response equals what the offline evaluation computes for the same history.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from torch import Tensor

from multvae.errors import VerificationError
from multvae.items import ItemIndex
from multvae.model import MultVAE, SparseRows
from multvae.ranking import mask_and_topk

EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Recommendation:
    """Ranked columns with their scores; ``fallback`` names the ranking used when not the model."""

    columns: NDArray[np.int64]
    scores: NDArray[np.float32]
    fallback: str | None = None


def _rows(histories: Sequence[NDArray[np.int64]], n_items: int, device: torch.device) -> SparseRows:
    # Clicks are binary: a repeated column counts once, as in the binarised training data.
    unique = [np.unique(h) for h in histories]
    lengths = np.fromiter((len(u) for u in unique), dtype=np.int64, count=len(unique))
    indptr = np.concatenate([[0], np.cumsum(lengths)])
    indices = np.concatenate(unique) if unique else EMPTY
    x = sp.csr_matrix(
        (np.ones(len(indices), dtype=np.float32), indices, indptr),
        shape=(len(histories), n_items),
    )
    return SparseRows.from_csr(x, device)


class Scorer:
    """Fold-in scores for a model: z = mu(x), logits = f(z), seen items masked for top-k.

    The decoder's output layer (p_dims[-2] x I) is almost all of a fold-in's arithmetic. On
    the CPU it runs through oneDNN's linear kernel on the layer's own (live) weights instead
    of ``F.linear``, which goes to MKL: on the machine measured (bench/RESULTS.md) MKL did not
    use AVX-512 on that AMD CPU and scaled poorly over threads, and oneDNN took 2x less time
    at batch 17 with 2 threads. fp32 either way; the sums run in another order, so scores
    agree to ~1e-6 relative (identical rankings on ML-100K). Where that kernel is missing or
    disagrees with ``F.linear`` on a probe row, the plain layer is used.
    """

    def __init__(self, model: MultVAE) -> None:
        self.model = model.eval()
        self.device = model.input_weight.device
        self.onednn = self.device.type == "cpu" and _onednn_agrees(model.output_layer)

    @torch.inference_mode()
    def scores(self, x: SparseRows) -> Tensor:
        """(B, I) decoder logits at the encoder mean."""
        hidden = self.model.decode_hidden(self.model.encode(x)[0])
        layer = self.model.output_layer
        if self.onednn:
            return _onednn_linear(hidden, layer.weight, layer.bias)
        return layer(hidden)

    @torch.inference_mode()
    def topk(
        self,
        histories: Sequence[NDArray[np.int64]],
        k: int,
        exclude: Sequence[NDArray[np.int64]] | None = None,
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """(B, k) top columns and scores for non-empty histories, history and exclude masked."""
        scores = self.scores(_rows(histories, self.model.config.n_items, self.device))
        masked = list(histories)
        if exclude is not None:
            masked = [np.concatenate([h, e]) for h, e in zip(histories, exclude, strict=True)]
        return mask_and_topk(scores, masked, k)


def _onednn_linear(x: Tensor, weight: Tensor, bias: Tensor) -> Tensor:
    # The op torch's own CPU compiler (inductor) emits for a linear layer, on plain tensors.
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


def _onednn_agrees(layer: torch.nn.Linear) -> bool:
    """Whether oneDNN's linear is usable here and gives what ``F.linear`` gives."""
    if not torch.backends.mkldnn.is_available() or layer.weight.dtype != torch.float32:
        return False
    with torch.inference_mode():
        probe = torch.linspace(-1.0, 1.0, layer.in_features).unsqueeze(0)
        try:
            got = _onednn_linear(probe, layer.weight, layer.bias)
        except (AttributeError, RuntimeError):  # a torch without the op, an unsupported CPU
            return False
        return bool(torch.allclose(got, layer(probe), rtol=1e-4, atol=1e-5))


def topk_rows(
    model: MultVAE, fold_in: sp.csr_matrix, k: int, batch_size: int = 1000
) -> NDArray[np.int64]:
    """Ranked top-k columns for every row of a fold-in matrix (evaluation), in batches."""
    scorer = Scorer(model)
    fold_in = sp.csr_matrix(fold_in)
    out = []
    for start in range(0, fold_in.shape[0], batch_size):
        block = fold_in[start : start + batch_size]
        histories = [
            block.indices[block.indptr[i] : block.indptr[i + 1]].astype(np.int64)
            for i in range(block.shape[0])
        ]
        cols, _ = scorer.topk(histories, k)
        out.append(cols)
    return np.concatenate(out) if out else np.zeros((0, k), dtype=np.int64)


class Recommender:
    """Scores histories with a trained model: z = mu(x), logits = f(z), seen items masked."""

    def __init__(self, model: MultVAE, items: ItemIndex) -> None:
        if model.config.n_items != len(items):
            raise ValueError(f"model has {model.config.n_items} items, index has {len(items)}")
        self.scorer = Scorer(model)
        self.items = items
        self._popularity_order = items.popularity_ranking()

    @property
    def model(self) -> MultVAE:
        return self.scorer.model

    @property
    def n_items(self) -> int:
        return len(self.items)

    def check_finite(self) -> None:
        """Fold in a few probe histories and raise :class:`VerificationError` unless every
        score is finite.

        A model whose weights hold NaN or inf (a diverged run, a bad conversion) verifies
        against its manifest and loads, but ranks nothing: every history would get no items.
        """
        n = self.n_items
        probes = [np.arange(min(10, n), dtype=np.int64), np.array([n - 1]), np.array([n // 2])]
        scores = self.scorer.scores(_rows(probes, n, self.scorer.device))
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise VerificationError(
                f"the model scores {bad} of {scores.numel()} (item, probe history) pairs as "
                "NaN or infinite: its weights are not finite; it must not serve"
            )

    def recommend_batch(
        self,
        histories: Sequence[NDArray[np.int64]],
        n: Sequence[int],
        exclude: Sequence[NDArray[np.int64]],
    ) -> list[Recommendation]:
        """Top ``n[b]`` items for each history in one forward pass; empty ones use popularity."""
        if not len(histories) == len(n) == len(exclude):
            raise ValueError("histories, n and exclude must have the same length")
        results: list[Recommendation | None] = [None] * len(histories)
        model_rows = [b for b, h in enumerate(histories) if len(h)]
        if model_rows:
            k = min(max(n[b] for b in model_rows), self.n_items)
            cols, scores = self.scorer.topk(
                [histories[b] for b in model_rows],
                k,
                [exclude[b] for b in model_rows],
            )
            for row, b in enumerate(model_rows):
                keep = np.isfinite(scores[row])
                results[b] = Recommendation(cols[row][keep][: n[b]], scores[row][keep][: n[b]])
        for b, h in enumerate(histories):
            if not len(h):
                results[b] = self.popular(n[b], exclude[b])
        return [r for r in results if r is not None]

    def recommend(
        self, history: NDArray[np.int64], n: int, exclude: NDArray[np.int64] = EMPTY
    ) -> Recommendation:
        """Top ``n`` items for one history (columns), seen and excluded items never returned."""
        return self.recommend_batch([history], [n], [exclude])[0]

    def popular(self, n: int, exclude: NDArray[np.int64] = EMPTY) -> Recommendation:
        """Cold start: the most popular training items, ``exclude`` removed."""
        order = self._popularity_order
        if len(exclude):
            order = order[~np.isin(order, exclude)]
        top = order[:n]
        return Recommendation(
            top, self.items.popularity[top].astype(np.float32), fallback="popularity"
        )
