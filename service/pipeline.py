"""The recommend pipeline: queries -> cache -> micro-batched fold-in -> recommendations.

Everything a request needs lives on one :class:`Pipeline`, built in the app's lifespan. The
served version is read once per call, so a hot swap never changes it under a request. This
module knows nothing of HTTP: the routes turn an :class:`Answer` into a response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass

import orjson

from multvae.items import ItemIndex
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
    """Recommendations for the queries, in order, and which of them the cache answered;
    ``items`` is the answering version's index (titles)."""

    version: str
    items: ItemIndex
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

    async def recommend(self, queries: Sequence[Query], strict: bool) -> Answer:
        """Recommendations for ``queries``; cache misses share one forward pass."""
        recommender = self.served().recommender
        unknown = [recommender.unknown(q.items) for q in queries]
        unknown_count = sum(len(u) for u in unknown)
        if unknown_count:
            self.metrics.unknown_items.inc(unknown_count)
            if strict:
                raise UnknownItemsError(recommender.version, unknown)
        prefix = self.settings.cache_prefix
        keys = [cache_key(prefix, recommender.version, q) for q in queries]
        found = [None if v is None else _from_json(v) for v in await self._gather_get(keys)]
        misses = [i for i, hit in enumerate(found) if hit is None]
        if misses:
            fresh = await self.batcher.submit(recommender, [queries[i] for i in misses])
            for i, rec in zip(misses, fresh, strict=True):
                found[i] = rec
            await self._gather_set([keys[i] for i in misses], [_to_json(r) for r in fresh])
        recommendations = [rec for rec in found if rec is not None]
        for rec in recommendations:
            if rec.fallback is not None:
                self.metrics.fallbacks.labels(rec.fallback).inc()
        missed = set(misses)
        cached = [i not in missed for i in range(len(queries))]
        return Answer(recommender.version, recommender.items, recommendations, cached)

    async def similar(
        self, item: str, n: int, exclude: Sequence[str], candidates: Sequence[str] | None
    ) -> Answer:
        """Items similar to ``item`` (one matrix-vector product: off the event loop, uncached).

        Raises :class:`multvae.errors.UnknownItemError` for an item the version does not know.
        """
        recommender = self.served().recommender
        rec = await asyncio.to_thread(recommender.similar, item, n, exclude, candidates)
        return Answer(recommender.version, recommender.items, [rec], [False])

    async def _gather_get(self, keys: list[str]) -> list[bytes | None]:
        return list(await asyncio.gather(*(self.cache.get(k) for k in keys)))

    async def _gather_set(self, keys: list[str], values: list[bytes]) -> None:
        ttl = self.settings.cache_ttl_s
        await asyncio.gather(
            *(self.cache.set(k, v, ttl) for k, v in zip(keys, values, strict=True))
        )
