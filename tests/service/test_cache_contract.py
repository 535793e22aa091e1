"""One contract for every cache backend (in-process LRU and a real private redis-server), plus
the guard that turns backend failures into counted misses."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import Callable, Iterator, Sequence

import pytest
from service_support import RedisServer, free_port

from multvae.recommend import Query
from service.cache import (
    Cache,
    CacheError,
    CacheUnavailableError,
    GuardedCache,
    MemoryCache,
    RedisCache,
    cache_key,
)
from service.metrics import Metrics

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(params=["memory", "redis"])
def make_cache(request: pytest.FixtureRequest) -> Callable[[], Cache]:
    """A factory, so the Redis client is created inside the test's own event loop."""
    if request.param == "memory":
        return lambda: MemoryCache(max_entries=1000)
    server: RedisServer = request.getfixturevalue("redis_server")
    return lambda: RedisCache(server.url, timeout_s=1.0)


def _key() -> str:
    return f"test:{uuid.uuid4().hex}"  # tests share one Redis: never the same key twice


async def test_a_missing_key_is_none(make_cache: Callable[[], Cache]) -> None:
    cache = make_cache()
    assert (await cache.get_many([_key()]))[0] is None
    await cache.close()


async def test_values_round_trip_byte_for_byte(make_cache: Callable[[], Cache]) -> None:
    cache = make_cache()
    key, value = _key(), b'{"items": []}\x00\xff\xfe binary'
    await cache.set_many([(key, value)], 60)
    assert (await cache.get_many([key]))[0] == value
    await cache.close()


async def test_set_replaces_and_keys_are_independent(make_cache: Callable[[], Cache]) -> None:
    cache = make_cache()
    a, b = _key(), _key()
    await cache.set_many([(a, b"one")], 60)
    await cache.set_many([(b, b"other")], 60)
    await cache.set_many([(a, b"two")], 60)
    assert (await cache.get_many([a]))[0] == b"two"
    assert (await cache.get_many([b]))[0] == b"other"
    await cache.close()


async def test_entries_expire_after_their_ttl(make_cache: Callable[[], Cache]) -> None:
    cache = make_cache()
    short, long = _key(), _key()
    await cache.set_many([(short, b"x")], 0.2)
    await cache.set_many([(long, b"y")], 60)
    await asyncio.sleep(0.5)
    assert (await cache.get_many([short]))[0] is None
    assert (await cache.get_many([long]))[0] == b"y"
    await cache.close()


async def test_many_keys_in_one_call(make_cache: Callable[[], Cache]) -> None:
    cache = make_cache()
    a, b, c = _key(), _key(), _key()
    await cache.set_many([(a, b"1"), (b, b"2")], ttl_s=60)
    assert await cache.get_many([b, c, a]) == [b"2", None, b"1"]
    assert await cache.get_many([]) == []
    await cache.set_many([], ttl_s=60)
    await cache.close()


async def test_memory_cache_evicts_the_least_recently_used() -> None:
    cache = MemoryCache(max_entries=2)
    await cache.set_many([("a", b"1")], 60)
    await cache.set_many([("b", b"2")], 60)
    assert (await cache.get_many(["a"]))[0] == b"1"  # a is now more recent than b
    await cache.set_many([("c", b"3")], 60)
    assert (await cache.get_many(["b"]))[0] is None
    assert (await cache.get_many(["a"]))[0] == b"1"
    assert len(cache) == 2


async def test_memory_cache_ttl_with_a_fake_clock() -> None:
    now = [100.0]
    cache = MemoryCache(max_entries=10, clock=lambda: now[0])
    await cache.set_many([("k", b"v")], 5)
    now[0] = 104.9
    assert (await cache.get_many(["k"]))[0] == b"v"
    now[0] = 105.0
    assert (await cache.get_many(["k"]))[0] is None
    assert len(cache) == 0


async def test_redis_errors_are_cache_errors() -> None:
    cache = RedisCache(f"redis://127.0.0.1:{free_port()}/0", timeout_s=0.2)  # nobody listens
    with pytest.raises(CacheError, match="redis MGET failed"):
        await cache.get_many(["k"])
    with pytest.raises(CacheError, match="redis SET failed"):
        await cache.set_many([("k", b"v")], 1)
    await cache.close()


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP port that accepts connections and never answers: a hung Redis."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(16)
        yield int(s.getsockname()[1])


async def test_a_hung_redis_times_out(silent_server: int) -> None:
    cache = RedisCache(f"redis://127.0.0.1:{silent_server}/0", timeout_s=0.1)
    with pytest.raises(CacheError):
        await cache.get_many(["k"])
    await cache.close()


class _Flaky:
    name = "flaky"

    def __init__(self, error: CacheError | None = None) -> None:
        self.calls = 0
        self.error = error or CacheUnavailableError("down")
        self.fail = True
        self.data: dict[str, bytes] = {}

    async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
        self.calls += 1
        if self.fail:
            raise self.error
        return [self.data.get(key) for key in keys]

    async def set_many(self, entries: Sequence[tuple[str, bytes]], ttl_s: float) -> None:
        self.calls += 1
        if self.fail:
            raise self.error
        self.data.update(entries)

    async def close(self) -> None:
        pass


async def test_guard_counts_failures_and_opens_a_circuit() -> None:
    now = [0.0]
    backend, metrics = _Flaky(), Metrics()
    guard = GuardedCache(backend, metrics, breaker_s=5.0, clock=lambda: now[0])
    sample = metrics.registry.get_sample_value

    assert (await guard.get_many(["k"]))[0] is None  # the failure is a miss, not an exception
    assert sample("multvae_cache_errors_total", {"operation": "get"}) == 1
    assert (await guard.get_many(["k"]))[0] is None  # circuit open: the backend is not asked
    await guard.set_many([("k", b"v")], 60)
    assert backend.calls == 1
    assert sample("multvae_cache_bypassed_total") == 2

    backend.fail = False
    now[0] = 5.1  # the breaker period is over: try the backend again
    await guard.set_many([("k", b"v")], 60)
    assert (await guard.get_many(["k"]))[0] == b"v"
    assert (await guard.get_many(["other"]))[0] is None
    assert sample("multvae_cache_hits_total") == 1
    assert sample("multvae_cache_misses_total") == 1
    assert sample("multvae_cache_errors_total", {"operation": "get"}) == 1


async def test_only_connectivity_failures_open_the_circuit() -> None:
    # An error Redis answered with (or a busy pool) is a miss, but Redis is not "down".
    backend, metrics = _Flaky(CacheError("OOM command not allowed")), Metrics()
    guard = GuardedCache(backend, metrics, breaker_s=5.0, clock=lambda: 0.0)
    for _ in range(3):
        assert (await guard.get_many(["k"]))[0] is None
    assert backend.calls == 3
    assert (
        metrics.registry.get_sample_value("multvae_cache_errors_total", {"operation": "get"}) == 3
    )
    assert metrics.registry.get_sample_value("multvae_cache_bypassed_total") == 0


async def test_an_open_circuit_lets_one_probe_through_at_a_time() -> None:
    now = [0.0]
    gate, started = asyncio.Event(), asyncio.Event()

    class Slow(_Flaky):
        async def get_many(self, keys: Sequence[str]) -> list[bytes | None]:
            self.calls += 1
            started.set()
            await gate.wait()
            return [b"v" for _ in keys]

    backend, metrics = Slow(), Metrics()
    guard = GuardedCache(backend, metrics, breaker_s=1.0, clock=lambda: now[0])
    await guard.set_many([("k", b"v")], 60)  # fails: the circuit opens until t = 1
    now[0] = 1.0
    probe = asyncio.create_task(guard.get_many(["k"]))
    await started.wait()  # the probe is in the backend
    assert [await guard.get_many(["k"]) for _ in range(3)] == [[None]] * 3  # skipped meanwhile
    gate.set()
    assert await probe == [b"v"]
    assert (await guard.get_many(["k"]))[0] == b"v"  # closed: everyone uses the backend again
    assert backend.calls == 3  # the failed set, the probe, the last get


def _query(
    history: list[int], n: int, exclude: list[int], candidates: list[int] | None = None
) -> Query:
    return Query(
        [str(i) for i in history],
        n,
        [str(i) for i in exclude],
        None if candidates is None else [str(i) for i in candidates],
    )


def test_cache_key_ignores_order_and_separates_everything_else() -> None:
    base = cache_key("p", "v1", _query([3, 1, 2], 10, [7, 5]))
    assert base.startswith("p:v1:")
    assert base == cache_key("p", "v1", _query([2, 3, 1], 10, [5, 7, 7]))
    different = [
        cache_key("p", "v2", _query([1, 2, 3], 10, [5, 7])),  # another model version
        cache_key("q", "v1", _query([1, 2, 3], 10, [5, 7])),  # another prefix
        cache_key("p", "v1", _query([1, 2, 3], 11, [5, 7])),  # another n
        cache_key("p", "v1", _query([1, 2, 3], 10, [5])),  # another exclude
        cache_key("p", "v1", _query([1, 2], 10, [3, 5, 7])),  # a column moved across
        cache_key("p", "v1", _query([], 10, [1, 2, 3, 5, 7])),
        cache_key("p", "v1", _query([1, 2, 3], 10, [5, 7], [])),  # no candidate at all
        cache_key("p", "v1", _query([1, 2, 3], 10, [5, 7], [8, 9])),  # only among 8 and 9
    ]
    assert len({base, *different}) == 1 + len(different)
    assert cache_key("p", "v1", _query([1], 5, [], [9, 8])) == cache_key(
        "p", "v1", _query([1], 5, [], [8, 9, 9])
    )
