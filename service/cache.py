"""Recommendation cache: a small interface, an in-process LRU and a Redis implementation.

``MULTVAE_REDIS_URL`` picks Redis; without it the embedded LRU serves. Keys are
``prefix:model_version:sha256(history ids, n, exclude ids, candidate ids)``, so a new model
version never reads an old version's entries, and the hash is over sorted ids, so the order
in which a client lists its history does not matter.

The cache is an optimisation, never a dependency: :class:`GuardedCache` turns every failure
into a counted "miss". Only a connectivity failure (:class:`CacheUnavailableError`: refused, reset,
timed out) opens its circuit breaker: the backend is then skipped, except for one probe every
``breaker_s`` seconds, so that a dead Redis costs one timeout per period, not one per request,
and the first probe that gets an answer closes the breaker again. An error Redis answered
with, or every pooled connection being busy, is a miss but not "Redis down".

:class:`RedisCache` bounds its connections (a pool of ``max_connections``; an operation waits
up to the timeout for a free one) and retries an operation once on a connection error, so a
pooled connection that died while idle (a Redis restart) costs a reconnect, not a failure;
connections idle longer than ``health_check_s`` are checked with a PING before use.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from typing import Protocol

import orjson
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import MaxConnectionsError, RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from multvae.recommend import Query
from service.metrics import Metrics

log = logging.getLogger("multvae.cache")

WARN_EVERY_S = 10.0  # at most one warning per this period for errors that are not "down"


class CacheError(Exception):
    """A cache operation failed: a miss, counted, but not a sign that the backend is down."""


class CacheUnavailableError(CacheError):
    """The backend cannot be reached (connection refused or reset, timeout): opens the breaker."""


class Cache(Protocol):
    """What the service needs from a cache; implementations raise :class:`CacheError`.

    Keys go in lists, so that a batch request costs one round trip to Redis, not one per
    history (nor one pooled connection per history).
    """

    name: str

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]: ...

    async def set_many(self, entries: Sequence[tuple[str, bytes]], ttl_s: float) -> None: ...

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

    def _get(self, key: str) -> bytes | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        expires, value = entry
        if expires <= self._clock():
            del self._data[key]
            return None
        self._data.move_to_end(key)
        return value

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        return [self._get(key) for key in keys]

    async def set_many(self, entries: Sequence[tuple[str, bytes]], ttl_s: float) -> None:
        if self.max_entries <= 0:
            return
        expires = self._clock() + ttl_s
        for key, value in entries:
            self._data[key] = (expires, value)
            self._data.move_to_end(key)
        while len(self._data) > self.max_entries:
            self._data.popitem(last=False)

    async def close(self) -> None:
        self._data.clear()


class RedisCache:
    """Redis via ``redis.asyncio``: a bounded pool, short timeouts, one retry on a dead connection.

    Only a connection error is retried, once, on a fresh connection: that is what a pooled
    connection closed while idle looks like. A timeout is not retried (it would double the
    wait on a sick Redis); the guard's circuit breaker handles a Redis that stays away.
    """

    name = "redis"

    def __init__(
        self, url: str, timeout_s: float, max_connections: int = 200, health_check_s: float = 10.0
    ) -> None:
        self.timeout_s = timeout_s
        self.max_connections = max_connections
        self.client = Redis.from_url(
            url,
            socket_timeout=timeout_s,
            socket_connect_timeout=timeout_s,
            retry=Retry(NoBackoff(), 1, supported_errors=(RedisConnectionError,)),
            health_check_interval=health_check_s,
            max_connections=max_connections,
        )
        # Operations beyond the pool wait here for a connection, never on redis-py's pool
        # (which raises MaxConnectionsError, a ConnectionError, when it is exhausted).
        self._slots = asyncio.Semaphore(max_connections)

    async def _run(self, operation: str, command: Callable[[], Awaitable[object]]) -> object:
        try:
            async with asyncio.timeout(self.timeout_s):
                await self._slots.acquire()
        except TimeoutError:
            raise CacheError(
                f"redis {operation}: all {self.max_connections} connections stayed busy for "
                f"{self.timeout_s * 1000:.0f} ms (MULTVAE_REDIS_MAX_CONNECTIONS)"
            ) from None
        try:
            # A retried operation may take a failed try, a reconnect and the command.
            async with asyncio.timeout(self.timeout_s * 3):
                return await command()
        except MaxConnectionsError as exc:
            raise CacheError(f"redis {operation}: connection pool exhausted: {exc}") from exc
        except (RedisConnectionError, RedisTimeoutError, OSError, TimeoutError) as exc:
            raise CacheUnavailableError(
                f"redis {operation} failed: {type(exc).__name__}: {exc}"
            ) from exc
        except RedisError as exc:
            raise CacheError(f"redis {operation} failed: {type(exc).__name__}: {exc}") from exc
        finally:
            self._slots.release()

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        if not keys:
            return []  # MGET with no key is an error, not an empty answer
        values = await self._run("MGET", lambda: self.client.mget(list(keys)))
        assert isinstance(values, list)
        return [v if v is None or isinstance(v, bytes) else str(v).encode() for v in values]

    async def set_many(self, entries: Sequence[tuple[str, bytes]], ttl_s: float) -> None:
        if not entries:
            return
        px = max(1, round(ttl_s * 1000))

        if len(entries) == 1:  # a lone SET costs the event loop less than a pipeline of one
            key, value = entries[0]
            await self._run("SET", lambda: self.client.set(key, value, px=px))
            return

        async def pipelined() -> object:
            # One round trip for all of them; not a transaction (no MULTI): each SET stands alone.
            pipe = self.client.pipeline(transaction=False)
            for key, value in entries:
                pipe.set(key, value, px=px)
            return await pipe.execute()

        await self._run("SET", pipelined)

    async def close(self) -> None:
        # Closing the client of a dead server is not an error.
        with contextlib.suppress(RedisError, OSError):
            await self.client.aclose()


class GuardedCache:
    """Counts hits, misses and errors; turns every backend failure into a miss.

    The breaker is closed (every operation goes to the backend) until a
    :class:`CacheUnavailableError`; then it is open for ``breaker_s`` seconds, after which one
    operation at a time probes the backend while the others still skip it. A probe that
    gets any answer from the backend closes the breaker; one that cannot reopens it.
    """

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
        self._open_until: float | None = None  # None: the breaker is closed
        self._probing = False
        self._warned_at = -math.inf

    @property
    def name(self) -> str:
        return self.backend.name

    def _skip(self, keys: int) -> bool:
        """Whether to bypass the backend; claims the probe when one is due."""
        if self._open_until is None:
            return False
        if self._probing or self._clock() < self._open_until:
            self.metrics.cache_bypassed.inc(keys)
            return True
        self._probing = True
        return False

    def _answered(self) -> None:
        self._probing = False
        if self._open_until is not None:
            self._open_until = None
            log.info("cache %s answers again: using it", self.name)

    def _failed(self, operation: str, keys: int, exc: CacheError) -> None:
        self.metrics.cache_errors.labels(operation).inc(keys)
        if not isinstance(exc, CacheUnavailableError):
            self._answered()  # the backend answered, or was merely busy: not "down"
            now = self._clock()
            if now - self._warned_at >= WARN_EVERY_S:
                self._warned_at = now
                log.warning("cache %s failed (served as a miss): %s", operation, exc)
            return
        self._probing = False
        if self._open_until is None:
            # Logged when the breaker opens, not once per request or failed probe.
            log.warning(
                "cache %s failed, bypassing it (one probe every %.1f s until it answers): %s",
                operation, self.breaker_s, exc,
            )  # fmt: skip
        else:
            log.debug("cache probe (%s) failed: %s", operation, exc)
        self._open_until = self._clock() + self.breaker_s

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        """The cached values, None for a miss; a failure is a miss for every key."""
        if self._skip(len(keys)):
            return [None] * len(keys)
        try:
            values = await self.backend.get_many(keys)
        except CacheError as exc:
            self._failed("get", len(keys), exc)
            return [None] * len(keys)
        self._answered()
        hits = sum(v is not None for v in values)
        self.metrics.cache_hits.inc(hits)
        self.metrics.cache_misses.inc(len(values) - hits)
        return values

    async def set_many(self, entries: Sequence[tuple[str, bytes]], ttl_s: float) -> None:
        if self._skip(len(entries)):
            return
        try:
            await self.backend.set_many(entries, ttl_s)
        except CacheError as exc:
            self._failed("set", len(entries), exc)
            return
        self._answered()

    async def close(self) -> None:
        await self.backend.close()


def build_cache(
    redis_url: str | None,
    max_entries: int,
    timeout_s: float,
    max_connections: int = 200,
    health_check_s: float = 10.0,
) -> Cache:
    """Redis when a URL is given, else the in-process LRU."""
    if redis_url:
        return RedisCache(redis_url, timeout_s, max_connections, health_check_s)
    return MemoryCache(max_entries)
