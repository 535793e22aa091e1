"""The recommend pipeline: ids -> columns -> cache -> micro-batched fold-in -> response body.

Everything a request needs lives on one :class:`Pipeline`, built in the app's lifespan. The
model is read once per request, so a hot swap never changes the version under a request.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson

from service.batching import MicroBatcher
from service.cache import GuardedCache, cache_key
from service.errors import FieldError, NotReadyError, UnknownItemsError
from service.metrics import Metrics
from service.middleware import AccessInfo
from service.recommender import Ranked, ServingModel
from service.registry import ModelRegistry
from service.schemas import RecommendRequest
from service.settings import Settings


def _shown_ids(ids: Sequence[str], limit: int = 20) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


@dataclass
class Pipeline:
    settings: Settings
    metrics: Metrics
    registry: ModelRegistry
    cache: GuardedCache
    batcher: MicroBatcher

    def model(self) -> ServingModel:
        model = self.registry.current
        if model is None:
            raise NotReadyError("no model is loaded yet")
        return model

    async def recommend(
        self,
        requests: Sequence[RecommendRequest],
        strict: bool,
        prefixes: Sequence[str],
        access: AccessInfo | None,
    ) -> list[dict[str, Any]]:
        """Response bodies for ``requests``, in order; misses share one forward pass."""
        # On its way to the model until the cache has answered: a batch about to start
        # waits for it (service.batching).
        with self.batcher.arriving():
            model = self.model()
            resolved = [model.resolve(r) for r in requests]
            unknown_count = sum(len(unknown) for _, unknown in resolved)
            if unknown_count:
                self.metrics.unknown_items.inc(unknown_count)
            if strict and unknown_count:
                raise UnknownItemsError.of(
                    [
                        FieldError(
                            f"{prefix}items",
                            f"unknown item ids {_shown_ids(unknown)} (model version "
                            f"{model.version}); send only known ids or drop strict=true",
                        )
                        for prefix, (_, unknown) in zip(prefixes, resolved, strict=True)
                        if unknown
                    ]
                )
            queries = [query for query, _ in resolved]
            prefix = self.settings.cache_prefix
            keys = [cache_key(prefix, model.version, q) for q in queries]
            found = await self._lookup(keys)
        misses = [i for i, hit in enumerate(found) if hit is None]
        if misses:
            fresh = await self.batcher.submit(model, [queries[i] for i in misses])
            for i, ranked in zip(misses, fresh, strict=True):
                found[i] = ranked
            await self._store([keys[i] for i in misses], fresh)
        if access is not None:
            access.model_version = model.version
            access.cache = "miss" if len(misses) == len(keys) else "hit" if not misses else "mixed"
        missed = set(misses)
        bodies = []
        for i, ((_, unknown), hit) in enumerate(zip(resolved, found, strict=True)):
            assert hit is not None  # every miss was filled above
            ranked = hit
            if ranked.fallback is not None:
                self.metrics.fallbacks.labels(ranked.fallback).inc()
            bodies.append(
                {
                    "items": [
                        {"item": item, "score": score}
                        for item, score in zip(ranked.items, ranked.scores, strict=True)
                    ],
                    "model_version": model.version,
                    "unknown_items": unknown,
                    "fallback": ranked.fallback,
                    "cached": i not in missed,
                }
            )
        return bodies

    async def _lookup(self, keys: list[str]) -> list[Ranked | None]:
        out: list[Ranked | None] = []
        for value in await self.cache.get_many(keys):
            try:
                out.append(None if value is None else Ranked.from_json(orjson.loads(value)))
            except (orjson.JSONDecodeError, KeyError, TypeError, ValueError):
                out.append(None)  # an entry from an incompatible writer is just a miss
        return out

    async def _store(self, keys: list[str], ranked: list[Ranked]) -> None:
        values = [orjson.dumps(r.to_json()) for r in ranked]
        await self.cache.set_many(list(zip(keys, values, strict=True)), self.settings.cache_ttl_s)
