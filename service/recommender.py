"""A loaded model version ready to serve: external ids in, ranked external ids out.

Scoring itself is :class:`multvae.recommend.Recommender`, the same fold-in code that
``multvae evaluate`` runs, so a response equals the offline ranking for the same history.
This module only maps ids to columns and back.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import numpy as np
import torch
from numpy.typing import NDArray

from multvae.artifacts import ModelVersion
from multvae.items import ItemIndex
from multvae.recommend import EMPTY, Recommender
from service.schemas import RecommendRequest


@dataclass(frozen=True)
class Query:
    """One history in model columns; ``n`` is the number of items wanted."""

    history: NDArray[np.int64]
    n: int
    exclude: NDArray[np.int64]


@dataclass(frozen=True)
class Ranked:
    """A ranking in external ids, as cached and as returned."""

    items: list[str]
    scores: list[float]
    fallback: str | None

    def to_json(self) -> dict[str, Any]:
        return {"items": self.items, "scores": self.scores, "fallback": self.fallback}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Ranked:
        return cls(list(data["items"]), [float(s) for s in data["scores"]], data["fallback"])


@dataclass
class ServingModel:
    """One model version on one device; immutable once it serves (swapped, never mutated)."""

    loaded: ModelVersion
    device: torch.device
    recommender: Recommender = field(init=False)
    loaded_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.recommender = Recommender(self.loaded.model, self.loaded.items)

    @property
    def version(self) -> str:
        return self.loaded.version

    @property
    def items(self) -> ItemIndex:
        return self.loaded.items

    @property
    def n_items(self) -> int:
        return len(self.loaded.items)

    def resolve(self, request: RecommendRequest) -> tuple[Query, list[str]]:
        """Columns of the history and exclude lists, plus the history ids this model lacks.

        Unknown ids in ``exclude`` are dropped silently: they can never be recommended.
        """
        history, unknown = self.items.columns(request.items)
        exclude = self.items.columns(request.exclude)[0] if request.exclude else EMPTY
        return Query(history, request.n, exclude), unknown

    def rank(self, queries: Sequence[Query]) -> list[Ranked]:
        """Rank many histories in one forward pass. Blocking: call it off the event loop."""
        recs = self.recommender.recommend_batch(
            [q.history for q in queries], [q.n for q in queries], [q.exclude for q in queries]
        )
        ids = self.items.ids
        return [
            Ranked([ids[c] for c in r.columns.tolist()], r.scores.tolist(), r.fallback)
            for r in recs
        ]

    def warm_up(self) -> None:
        """Fold-ins before serving: the first request pays no lazy initialisation, and a model
        whose scores are not finite is refused (:class:`VerificationError`) before it serves."""
        self.recommender.check_finite()
        cols = np.arange(min(10, self.n_items), dtype=np.int64)
        self.rank([Query(cols, 20, EMPTY), Query(EMPTY, 20, EMPTY)])

    def describe(self) -> dict[str, Any]:
        """What GET /model shows."""
        config = self.loaded.config
        return {
            "version": self.version,
            "n_items": self.n_items,
            "device": str(self.device),
            "created_at": self.loaded.created_at,
            "loaded_at": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(),
            "architecture": dict(config.get("model", {})),
            "metrics": self.loaded.metrics,
        }
