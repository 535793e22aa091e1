"""Recommendation cache: a small interface, an in-process LRU and a Redis implementation.

``MULTVAE_REDIS_URL`` picks Redis; without it the embedded LRU serves. Keys are
``prefix:model_version:sha256(history ids, n, exclude ids, candidate ids)``, so a new model
version never reads an old version's entries, and the hash is over sorted ids, so the order
in which a client lists its history does not matter.

The cache is an optimisation, never a dependency: :class:`GuardedCache` counts a failure or
timeout, answers "miss", and skips the backend for ``breaker_s`` seconds (a circuit breaker)
so that a dead Redis costs one timeout, not one per request.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Protocol

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from multvae.recommend import Query
from service.metrics import Metrics

log = logging.getLogger("multvae.cache")


class CacheError(Exception):
    """A cache backend failed or timed out."""


class Cache(Protocol):
    """What the service needs from a cache; implementations raise :class:`CacheError`."""

    name: str

    async def get(self, key: str) -> bytes | None: ...

    async def set(self, key: str, value: bytes, ttl_s: float) -> None: ...

    async def close(self) -> None: ...


def cache_key(prefix: str, version: str, query: Query) -> str:
    """``prefix:version:hex`` over the sorted unique ids of the history, exclude and candidate
    lists, and n: the order in which a client lists ids does not matter."""
    candidates = None if query.candidates is None else sorted(set(query.candidates))
    # A JSON array of the parts: unambiguous, so no two different requests share bytes.
    parts = [sorted(set(query.items)), query.n, sorted(set(query.exclude)), candidates]
    return f"{prefix}:{version}:{hashlib.sha256(orjson.dumps(parts)).hexdigest()}"


class MemoryCache:
    """In-process LRU with a TTL per entry; lives on the event loop, so no locking."""

    name = "memory"

    def __init__(self, max_entries: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_entries = max_entries
        self._clock = clock
        self._data: OrderedDict[str, tuple[float, bytes]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._data)

    async def get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if self.max_entries <= 0:
            return
        self._data[key] = (self._clock() + ttl_s, value)
        self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Redis via ``redis.asyncio`` with short socket timeouts and no retries.

    A retry would multiply the time a request waits on a sick Redis; the guard's circuit
    breaker is the retry policy instead.
    """

    name = "redis"

    def __init__(self, url: str, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 0),
            health_check_interval=0,
        )

    async def get(self, key: str) -> bytes | None:
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                value = await self.client.get(key)
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheError(f"redis GET failed: {type(exc).__name__}: {exc}") from exc
        if value is None or isinstance(value, bytes):
            return value
        return str(value).encode()

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        try:
            async with asyncio.timeout(self.timeout_s * 2):
                await self.client.set(key, value, px=max(1, round(ttl_s * 1000)))
        except (RedisError, OSError, TimeoutError) as exc:
            raise CacheError(f"redis SET failed: {type(exc).__name__}: {exc}") from exc

    async def close(self) -> None:
        # Closing the client of a dead server is not an error.
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()


class GuardedCache:
    """Counts hits, misses and errors; turns every backend failure into a miss."""

    def __init__(
        self,
        backend: Cache,
        metrics: Metrics,
        breaker_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.backend = backend
        self.metrics = metrics
        self.breaker_s = breaker_s
        self._clock = clock
        self._open_until = 0.0

    @property
    def name(self) -> str:
        return self.backend.name

    def _open(self) -> bool:
        if self._open_until > self._clock():
            self.metrics.cache_bypassed.inc()
            return True
        return False

    def _failed(self, operation: str, exc: CacheError) -> None:
        self.metrics.cache_errors.labels(operation).inc()
        if self._open_until <= self._clock():
            # Logged once per breaker period, not once per request.
            log.warning(
                "cache %s failed, bypassing it for %.1f s: %s", operation, self.breaker_s, exc
            )
        self._open_until = self._clock() + self.breaker_s

    async def get(self, key: str) -> bytes | None:
        if self._open():
            return None
        try:
            value = await self.backend.get(key)
        except CacheError as exc:
            self._failed("get", exc)
            return None
        if value is None:
            self.metrics.cache_misses.inc()
        else:
            self.metrics.cache_hits.inc()
        return value

    async def set(self, key: str, value: bytes, ttl_s: float) -> None:
        if self._open():
            return
        try:
            await self.backend.set(key, value, ttl_s)
        except CacheError as exc:
            self._failed("set", exc)

    async def close(self) -> None:
        await self.backend.close()


def build_cache(redis_url: str | None, max_entries: int, timeout_s: float) -> Cache:
    """Redis when a URL is given, else the in-process LRU."""
    if redis_url:
        return RedisCache(redis_url, timeout_s)
    return MemoryCache(max_entries)
