"""The recommend pipeline: queries -> cache -> micro-batched fold-in -> encoded answers.

Everything a request needs lives on one :class:`Pipeline`, built in the app's lifespan. The
served version is read once per call, so a hot swap never changes it under a request. This
module knows nothing of HTTP: the routes turn an :class:`Answer` into a response.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from multvae.recommend import Query, Recommendation, Recommender
from service.batching import MicroBatcher
from service.cache import GuardedCache, MemoryCache, cache_key
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


# The caller's wire form of one recommendation (for the routes, the JSON response body); the
# recommender is the answering version's (its name, its titles).
Encoder = Callable[[Recommender, Recommendation], bytes]

# What the cache holds for a query: the fallback kind (empty for none), a newline, then the
# encoded recommendation, so a hit is answered without decoding and re-encoding anything.
# Part of every key: entries written in another layout (an older replica) are never read.
LAYOUT = "body1"


@dataclass(frozen=True)
class Answer:
    """Encoded recommendations for the queries, in order, and which the cache answered."""

    version: str
    bodies: list[bytes]
    cached: list[bool]


@dataclass
class Pipeline:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    cache: GuardedCache
    batcher: MicroBatcher
    # This process's copies of shared (Redis) entries, so that a hot entry costs no round
    # trip. A copy never goes stale: a key names the model version, and the value is a
    # function of the key. With the in-process backend it would only duplicate it: size 0.
    near: MemoryCache = field(init=False)

    def __post_init__(self) -> None:
        shared = self.cache.name != MemoryCache.name
        self.near = MemoryCache(self.settings.near_cache_entries if shared else 0)

    def served(self) -> Served:
        served = self.registry.current
        if served is None:
            raise NotReadyError("no model is loaded yet")
        return served

    async def recommend(
        self,
        queries: Sequence[Query],
        strict: bool,
        encode: Sequence[Encoder],
        client: str = "",
        variants: Sequence[str] | None = None,
    ) -> Answer:
        """``queries[i]`` answered as ``encode[i]`` makes it; cache misses share one forward
        pass, in which ``client`` (who asks) may hold only its fair share of the queue.
        ``variants[i]`` names query i's encoding (e.g. ``"title"``) in its cache key."""
        recommender = self.served().recommender
        version = recommender.version
        unknown = [recommender.unknown(q.items) for q in queries]
        unknown_count = sum(len(u) for u in unknown)
        if unknown_count:
            self.metrics.unknown_items.inc(unknown_count)
            if strict:
                raise UnknownItemsError(version, unknown)
        prefix = f"{self.settings.cache_prefix}:{LAYOUT}"
        variants = variants or [""] * len(queries)
        keys = [
            cache_key(f"{prefix}:{variant}" if variant else prefix, version, q)
            for q, variant in zip(queries, variants, strict=True)
        ]
        values = await self._get_many(keys)
        # A value without the layout's newline is no entry of ours: a miss, and overwritten.
        misses = [i for i, value in enumerate(values) if value is None or b"\n" not in value]
        if misses:
            fresh = await self.batcher.submit(recommender, [queries[i] for i in misses], client)
            stored = [
                (rec.fallback or "").encode() + b"\n" + encode[i](recommender, rec)
                for i, rec in zip(misses, fresh, strict=True)
            ]
            for i, new in zip(misses, stored, strict=True):
                values[i] = new
            await self._set_many([(keys[i], v) for i, v in zip(misses, stored, strict=True)])
        bodies = []
        for value in values:
            assert value is not None
            fallback, _, body = value.partition(b"\n")
            if fallback:
                self.metrics.fallbacks.labels(fallback.decode()).inc()
            bodies.append(body)
        missed = set(misses)
        return Answer(version, bodies, [i not in missed for i in range(len(queries))])

    async def similar(
        self, item: str, n: int, exclude: Sequence[str], candidates: Sequence[str] | None
    ) -> tuple[Recommender, Recommendation]:
        """Items similar to ``item`` (one matrix-vector product: off the event loop, uncached).

        Raises :class:`multvae.errors.UnknownItemError` for an item the version does not know.
        """
        recommender = self.served().recommender
        rec = await asyncio.to_thread(recommender.similar, item, n, exclude, candidates)
        return recommender, rec

    async def _get_many(self, keys: list[str]) -> list[bytes | None]:
        """The near copies first, then one round trip to the shared cache for the rest."""
        values = await self.near.get_many(keys)
        far = [i for i, value in enumerate(values) if value is None]
        if len(far) < len(keys):
            self.metrics.cache_hits.inc(len(keys) - len(far))
        if far:
            fetched = await self.cache.get_many([keys[i] for i in far])
            found = []
            for i, value in zip(far, fetched, strict=True):
                if value is not None:
                    values[i] = value
                    found.append((keys[i], value))
            await self.near.set_many(found, self.settings.cache_ttl_s)
        return values

    async def _set_many(self, entries: list[tuple[str, bytes]]) -> None:
        await self.near.set_many(entries, self.settings.cache_ttl_s)
        await self.cache.set_many(entries, self.settings.cache_ttl_s)
