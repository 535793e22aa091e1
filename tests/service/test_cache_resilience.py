"""Redis faults against a real private redis-server: a restart costs no failure and no long
bypass, and a burst of batches at the documented maximum never looks like "Redis down"."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from service_support import IDS, RedisServer, make_settings, metric_value

from service.app import create_app
from service.cache import GuardedCache, RedisCache, build_cache
from service.metrics import Metrics
from service.settings import Settings

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def _count(metrics: Metrics, name: str, labels: dict[str, str] | None = None) -> float:
    return metrics.registry.get_sample_value(name, labels or {}) or 0.0


def _errors(metrics: Metrics) -> float:
    return sum(
        _count(metrics, "multvae_cache_errors_total", {"operation": op}) for op in ("get", "set")
    )


async def test_a_redis_restart_costs_no_failed_operation(private_redis: RedisServer) -> None:
    import asyncio

    metrics = Metrics()
    cache = GuardedCache(RedisCache(private_redis.url, timeout_s=1.0), metrics, breaker_s=1.0)
    keys = [f"k{i}" for i in range(30)]
    # Thirty concurrent operations leave thirty pooled connections behind.
    await asyncio.gather(*(cache.set_many([(k, b"before")], 60) for k in keys))
    private_redis.kill()
    private_redis.start()  # same port, empty: every pooled connection is now dead
    await asyncio.gather(*(cache.set_many([(k, b"after")], 60) for k in keys))
    assert await asyncio.gather(*(cache.get_many([k]) for k in keys)) == [[b"after"]] * len(keys)
    assert _errors(metrics) == 0
    assert _count(metrics, "multvae_cache_bypassed_total") == 0
    assert _count(metrics, "multvae_cache_hits_total") == len(keys)
    await cache.close()


async def test_hits_come_back_within_one_breaker_period_of_redis_answering(
    private_redis: RedisServer,
) -> None:
    now = [0.0]
    metrics = Metrics()
    breaker_s = Settings().redis_breaker_s
    assert breaker_s <= 2.0  # the default brings hits back within 2 s of Redis answering
    backend = RedisCache(private_redis.url, timeout_s=0.5)
    cache = GuardedCache(backend, metrics, breaker_s=breaker_s, clock=lambda: now[0])
    await cache.set_many([("k", b"v")], 60)
    private_redis.kill()
    assert (await cache.get_many(["k"]))[0] is None  # Redis is down: a miss, the breaker opens
    assert _count(metrics, "multvae_cache_errors_total", {"operation": "get"}) == 1
    now[0] = breaker_s  # a probe while Redis is still down: reopens, one more error only
    assert (await cache.get_many(["k"]))[0] is None
    assert (await cache.get_many(["k"]))[0] is None  # skipped: another probe is not due yet
    assert _count(metrics, "multvae_cache_errors_total", {"operation": "get"}) == 2
    private_redis.start()  # Redis answers again at now = breaker_s
    await backend.client.set("k", b"v")  # (restarted empty; as a neighbour replica refills it)
    assert (await cache.get_many(["k"]))[0] is None  # inside the breaker period: still skipped
    now[0] = 2 * breaker_s  # one breaker period after Redis answered: the probe hits
    assert (await cache.get_many(["k"]))[0] == b"v"
    assert (await cache.get_many(["k"]))[0] == b"v"  # closed again: every request uses Redis
    assert _count(metrics, "multvae_cache_hits_total") == 2
    await cache.close()


async def test_more_concurrent_operations_than_connections_wait_never_bypass(
    redis_server: RedisServer,
) -> None:
    import asyncio

    settings = Settings(redis_url=redis_server.url, redis_max_connections=20)
    size = settings.redis_pool_size()
    metrics = Metrics()
    backend = build_cache(settings.redis_url, 0, 1.0, size, settings.redis_health_check_s)
    cache = GuardedCache(backend, metrics, breaker_s=5.0)
    prefix = uuid.uuid4().hex
    # More single-key calls at once than the pool has connections: they wait for one.
    keys = [f"{prefix}:{i}" for i in range(size + size // 2)]
    await asyncio.gather(*(cache.set_many([(k, k.encode())], 60) for k in keys))
    got = await asyncio.gather(*(cache.get_many([k]) for k in keys))
    assert got == [[k.encode()] for k in keys]
    assert _errors(metrics) == 0
    assert _count(metrics, "multvae_cache_bypassed_total") == 0
    await cache.close()


def test_a_burst_of_maximum_batches_through_the_app_never_bypasses_the_cache(
    redis_server: RedisServer, model_dir: Path
) -> None:
    # A generous timeout: this is about the pool's size, not about a busy CI box being slow
    # to open a few hundred connections at once.
    settings = make_settings(
        model_dir, redis_url=redis_server.url, cache_prefix=f"t{uuid.uuid4().hex[:8]}",
        redis_timeout_ms=2000, max_pending_share=1.0,  # one test client sends all four
    )  # fmt: skip
    batch = settings.max_batch_requests
    histories = [
        [IDS[(b * 7 + i) % 100], IDS[(i + 50) % 100]] for b in range(4) for i in range(batch)
    ]
    bodies = [
        {"requests": [{"items": h} for h in histories[b * batch : (b + 1) * batch]]}
        for b in range(4)
    ]
    with TestClient(create_app(settings)) as client, ThreadPoolExecutor(4) as pool:
        for _ in range(2):  # misses (lookups, then stores), then hits
            responses = list(pool.map(lambda b: client.post("/recommend/batch", json=b), bodies))
            assert [r.status_code for r in responses] == [200] * 4
        assert metric_value(client, "multvae_cache_bypassed_total") == 0
        for op in ("get", "set"):
            assert metric_value(client, "multvae_cache_errors_total", {"operation": op}) == 0
        # The first round missed (and stored) every history, the second hit every one.
        assert metric_value(client, "multvae_cache_misses_total") == len(histories)
        assert metric_value(client, "multvae_cache_hits_total") == len(histories)
