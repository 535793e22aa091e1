"""The recommend pipeline: queries -> cache -> micro-batched fold-in -> recommendations.

Everything a request needs lives on one :class:`Pipeline`, built in the app's lifespan. The
served version is read once per call, so a hot swap never changes it under a request. This
module knows nothing of HTTP: the routes turn an :class:`Answer` into a response.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from multvae.recommend import Query, Recommendation
from service.batching import MicroBatcher
from service.cache import GuardedCache, cache_key
from service.errors import NotReadyError
from service.metrics import Metrics
from service.registry import ModelRegistry, Served
from service.settings import Settings


class UnknownItemsError(Exception):
    """Strict mode: histories name ids the served version does not know."""

    def __init__(self, version: str, unknown: list[list[str]]) -> None:
        super().__init__(f"unknown item ids for model version {version}")
        self.version = version
        self.unknown = unknown  # per query, in order; empty where all ids are known


@dataclass(frozen=True)
class Answer:
    """Recommendations for the queries, in order, and which of them the cache answered."""

    version: str
    recommendations: list[Recommendation]
    cached: list[bool]


def _to_json(rec: Recommendation) -> bytes:
    return orjson.dumps({"items": rec.items, "unknown": rec.unknown, "fallback": rec.fallback})


def _from_json(value: bytes) -> Recommendation | None:
    try:
        data = orjson.loads(value)
        items = [(str(item), float(score)) for item, score in data["items"]]
        return Recommendation(items, [str(u) for u in data["unknown"]], data["fallback"])
    except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
        return None  # an entry from an incompatible writer is just a miss


@dataclass
class Pipeline:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    cache: GuardedCache
    batcher: MicroBatcher

    def served(self) -> Served:
        served = self.registry.current
        if served is None:
            raise NotReadyError("no model is loaded yet")
        return served

    async def recommend(
        self, queries: Sequence[Query], strict: bool, client: str = ""
    ) -> Answer:
        """Recommendations for ``queries``; cache misses share one forward pass, in which
        ``client`` (who asks) may hold only its fair share of the queue."""
        recommender = self.served().recommender
        unknown = [recommender.unknown(q.items) for q in queries]
        unknown_count = sum(len(u) for u in unknown)
        if unknown_count:
            self.metrics.unknown_items.inc(unknown_count)
            if strict:
                raise UnknownItemsError(recommender.version, unknown)
        prefix = self.settings.cache_prefix
        keys = [cache_key(prefix, recommender.version, q) for q in queries]
        found = [None if v is None else _from_json(v) for v in await self.cache.get_many(keys)]
        misses = [i for i, hit in enumerate(found) if hit is None]
        if misses:
            fresh = await self.batcher.submit(recommender, [queries[i] for i in misses], client)
            for i, rec in zip(misses, fresh, strict=True):
                found[i] = rec
            await self.cache.set_many(
                [(keys[i], _to_json(r)) for i, r in zip(misses, fresh, strict=True)],
                self.settings.cache_ttl_s,
            )
        recommendations = [rec for rec in found if rec is not None]
        for rec in recommendations:
            if rec.fallback is not None:
                self.metrics.fallbacks.labels(rec.fallback).inc()
        missed = set(misses)
        cached = [i not in missed for i in range(len(queries))]
        return Answer(recommender.version, recommendations, cached)
