"""Fold-in: the one code path from click histories to ranked items, offline and online.

:func:`fold_in_scores` is the model's scoring (z = mu(x), logits = f(z)); :func:`rank_rows`
ranks held-out fold-in rows with it (``multvae evaluate``, per-epoch validation) and
:class:`Recommender` speaks item ids (the service, ``multvae recommend``). Both rank through
:func:`multvae.ranking.mask_and_topk`, so a service response equals what the offline
evaluation computes for the same history. :meth:`Recommender.similar` ranks items by the
cosine between their vectors in the decoder's output layer (``/similar``, ``multvae similar``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import scipy.sparse as sp
import torch
from numpy.typing import NDArray
from torch import Tensor

from multvae.errors import UnknownItemError, VerificationError
from multvae.items import ItemIndex
from multvae.model import MultVAE, SparseRows
from multvae.ranking import mask_and_topk, topk_rows
from multvae.topn_index import TopNIndex

EMPTY = np.zeros(0, dtype=np.int64)
_NO_SCORES = np.zeros(0, dtype=np.float32)
Ranked = tuple[NDArray[np.int64], NDArray[np.float32]]  # columns, scores


@torch.no_grad()
def fold_in_scores(model: MultVAE, x: SparseRows) -> Tensor:
    """(B, I) the model's scores at the encoder mean (:meth:`MultVAE.fold_in`), in fp32."""
    return model.fold_in(x)


def block_scorer(model: MultVAE) -> Callable[[sp.csr_matrix], Tensor]:
    """:func:`fold_in_scores` for a block of fold-in rows given as a CSR matrix."""
    model.eval()
    device = model.input_weight.device

    def score(block: sp.csr_matrix) -> Tensor:
        return fold_in_scores(model, SparseRows.from_csr(block, device))

    return score


def rank_rows(
    model: MultVAE, fold_in: sp.csr_matrix, k: int, batch_size: int | None = None
) -> NDArray[np.int64]:
    """(B, k) ranked columns for every row of a fold-in matrix, its clicks masked (evaluation)."""
    return topk_rows(block_scorer(model), fold_in, k, batch_size=batch_size)[0]


@dataclass(frozen=True)
class Query:
    """One click history in item ids; ``candidates``, when given, limits what may be ranked."""

    items: Sequence[str]
    n: int = 20
    exclude: Sequence[str] = ()
    candidates: Sequence[str] | None = None


@dataclass(frozen=True)
class Recommendation:
    """Ranked ``(item id, score)`` pairs; ``unknown`` are history ids the model ignored.

    ``fallback`` names the ranking used when the history gave the model nothing
    (``"popularity"``: training click counts as scores), else it is None.
    """

    items: list[tuple[str, float]]
    unknown: list[str] = field(default_factory=list)
    fallback: str | None = None


class Recommender:
    """Item ids in, ranked ``(item, score)`` out: fold-in with a trained model.

    ``version`` names the model version it serves (empty offline). With ``index`` (built
    over this model), a history's top-N comes from the index's candidates scored exactly;
    without it (the default) every item is scored. Blocking: the service calls it on its
    inference thread.
    """

    def __init__(
        self, model: MultVAE, items: ItemIndex, version: str = "", index: TopNIndex | None = None
    ) -> None:
        if model.config.n_items != len(items):
            raise ValueError(f"model has {model.config.n_items} items, index has {len(items)}")
        if index is not None and index.n_items != len(items):
            raise ValueError(f"the top-N index has {index.n_items} items, the model {len(items)}")
        self.model = model.eval()
        self.items = items
        self.version = version
        self.index = index
        self.device = model.input_weight.device
        self._popularity_order = items.popularity_ranking()
        with torch.no_grad():
            # Row c of the output layer's weight is item c's vector: logit_c = w_c . h + b_c.
            self._item_norms = self.model.output_layer.weight.norm(dim=1).clamp_min(1e-12)

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
        scores = fold_in_scores(self.model, _rows(probes, n, self.device))
        bad = int((~torch.isfinite(scores)).sum())
        if bad:
            raise VerificationError(
                f"the model scores {bad} of {scores.numel()} (item, probe history) pairs as "
                "NaN or infinite: its weights are not finite; it must not serve"
            )

    def unknown(self, items: Sequence[str]) -> list[str]:
        """The ids in ``items`` this model does not know, in input order."""
        return self.items.unknown(items)

    def recommend(
        self,
        items: Sequence[str],
        n: int,
        exclude: Sequence[str] = (),
        candidates: Sequence[str] | None = None,
    ) -> Recommendation:
        """Top ``n`` items for one history; history and ``exclude`` are never returned."""
        return self.recommend_batch([Query(items, n, exclude, candidates)])[0]

    def recommend_batch(self, queries: Sequence[Query]) -> list[Recommendation]:
        """Every query in one forward pass, in order; empty histories use popularity."""
        lookup = self.items.columns
        resolved = [lookup(q.items) for q in queries]
        histories = [history for history, _ in resolved]
        excluded = [lookup(q.exclude)[0] if q.exclude else EMPTY for q in queries]
        allowed = [None if q.candidates is None else lookup(q.candidates)[0] for q in queries]
        columns: list[Ranked] = [(EMPTY, _NO_SCORES)] * len(queries)
        fallback: list[str | None] = [None] * len(queries)
        model_rows = [b for b, h in enumerate(histories) if len(h)]
        if model_rows:
            k = min(max(queries[b].n for b in model_rows), self.n_items)
            x = _rows([histories[b] for b in model_rows], self.n_items, self.device)
            masked = [np.concatenate([histories[b], excluded[b]]) for b in model_rows]
            limits = [allowed[b] for b in model_rows]
            if self.index is None:
                cols, scores = mask_and_topk(fold_in_scores(self.model, x), masked, k, limits)
            else:
                cols, scores = self._candidate_topk(x, masked, k, limits)
            for row, b in enumerate(model_rows):
                keep = np.isfinite(scores[row])
                n = queries[b].n
                columns[b] = (cols[row][keep][:n], scores[row][keep][:n])
        for b, h in enumerate(histories):
            if not len(h):
                columns[b] = self._popular(queries[b].n, excluded[b], allowed[b])
                fallback[b] = "popularity"
        ids = self.items.ids
        return [
            Recommendation(
                [(ids[c], s) for c, s in zip(cols.tolist(), scores.tolist(), strict=True)],
                resolved[b][1],
                fallback[b],
            )
            for b, (cols, scores) in enumerate(columns)
        ]

    @torch.no_grad()
    def index_recall(self, probes: int = 16, n: int = 100) -> float | None:
        """Mean recall@n of the index's top n against exact scoring (None without an index),
        over one-item histories spread evenly over the popularity ranking."""
        if self.index is None:
            return None
        order = self._popularity_order
        picks = order[np.linspace(0, len(order) - 1, min(probes, len(order))).astype(np.int64)]
        seen = [np.array([c], dtype=np.int64) for c in picks]
        n = min(n, self.n_items - 1)
        exact, _ = mask_and_topk(fold_in_scores(self.model, _rows(seen, self.n_items, self.device)),
                                 seen, n)  # fmt: skip
        found = self.recommend_batch([Query([self.items.ids[c]], n) for c in picks])
        ids = self.items.ids
        return float(np.mean([
            len({ids[c] for c in want} & {item for item, _ in got.items}) / n
            for want, got in zip(exact.tolist(), found, strict=True)
        ]))  # fmt: skip

    @torch.no_grad()
    def _candidate_topk(
        self,
        x: SparseRows,
        masked: list[NDArray[np.int64]],
        k: int,
        allowed: list[NDArray[np.int64] | None],
    ) -> tuple[NDArray[np.int64], NDArray[np.float32]]:
        """:func:`mask_and_topk` over each row's candidates only: the index's proposals (or
        the query's own ``candidates``), scored exactly by the output layer. With an item-item
        path, the history's neighbours join the proposals and the path's scores are added."""
        assert self.index is not None
        hidden = self.model.decode_hidden(self.model.encode(x)[0])  # (B, d)
        wanted = k + max(len(m) for m in masked) + self.index.spec.margin
        proposed = self.index.propose(hidden, wanted) if any(a is None for a in allowed) else None
        path = self.model.item_path(x) if self.model.config.item_neighbours else None
        rows = []
        for b, limit in enumerate(allowed):
            if limit is not None:
                rows.append(np.unique(limit))
            else:
                assert proposed is not None
                cand = proposed[b][proposed[b] >= 0]
                if path is not None:
                    cand = np.union1d(cand, path[b].nonzero()[:, 0].cpu().numpy())
                rows.append(cand)
        width = max(max(len(r) for r in rows), 1)
        columns = np.full((len(rows), width), -1, dtype=np.int64)
        scores = torch.full((len(rows), width), -torch.inf, device=hidden.device)
        layer = self.model.output_layer
        for b, cand in enumerate(rows):
            columns[b, : len(cand)] = cand
            at = torch.from_numpy(cand).to(hidden.device)
            scores[b, : len(cand)] = layer.weight[at] @ hidden[b] + layer.bias[at]
            if path is not None:
                scores[b, : len(cand)] += self.model.config.item_weight * path[b, at]
        local = [
            np.flatnonzero((columns[b] < 0) | np.isin(columns[b], masked[b]))
            for b in range(len(rows))
        ]
        picked, values = mask_and_topk(scores, local, k)
        return np.take_along_axis(columns, picked, axis=1), values

    @torch.no_grad()
    def similar(
        self,
        item: str,
        n: int,
        exclude: Sequence[str] = (),
        candidates: Sequence[str] | None = None,
    ) -> Recommendation:
        """The ``n`` items most similar to ``item``: cosine of the decoder's item vectors.

        Item c's vector is row c of the output layer's weight (logit_c = w_c . h + b_c): items
        whose logits respond alike to every user state are alike. The bias (popularity) is
        left out, so a popular item is not similar to everything. ``item`` and ``exclude``
        are never returned; ``candidates`` limits what may be ranked. Raises
        :class:`UnknownItemError` for an id the version does not know.
        """
        column = self.items.column(item)
        if column is None:
            where = f" of model version {self.version}" if self.version else ""
            raise UnknownItemError(
                f"item id {item!r} is not one of the {self.n_items} items{where}; "
                "ask for an item the model was trained on"
            )
        weight = self.model.output_layer.weight
        scores = (weight @ weight[column]) / (self._item_norms * self._item_norms[column])
        lookup = self.items.columns
        masked = np.concatenate([[column], lookup(exclude)[0]]).astype(np.int64)
        allowed = None if candidates is None else lookup(candidates)[0]
        cols, values = mask_and_topk(scores[None, :], [masked], n, [allowed])
        keep = np.isfinite(values[0])
        ranked = zip(cols[0][keep].tolist(), values[0][keep].tolist(), strict=True)
        return Recommendation([(self.items.ids[c], s) for c, s in ranked])

    def _popular(
        self, n: int, exclude: NDArray[np.int64], allowed: NDArray[np.int64] | None
    ) -> Ranked:
        """Cold start: the most popular training items, ``exclude`` removed."""
        order = self._popularity_order
        if len(exclude):
            order = order[~np.isin(order, exclude)]
        if allowed is not None:
            order = order[np.isin(order, allowed)]
        top = order[:n]
        return top, self.items.popularity[top].astype(np.float32)


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
