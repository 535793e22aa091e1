"""The micro-batcher on a fake model: grouping, bounds, order, errors, threads."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np
import pytest

from service.batching import MAX_RESTARTS, MicroBatcher
from service.errors import NotReadyError, OverloadedError
from service.metrics import Metrics
from service.recommender import Query, Ranked

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeModel:
    """Echoes each query's n back as its only item; records every pass. With a ``gate``, a
    pass blocks (in the worker thread) until the gate is set."""

    def __init__(
        self, name: str = "m", fail: bool = False, gate: threading.Event | None = None
    ) -> None:
        self.name = name
        self.fail = fail
        self.gate = gate
        self.passes: list[int] = []
        self.threads: set[int] = set()

    def rank(self, queries: Sequence[Query]) -> list[Ranked]:
        if self.gate is not None:
            assert self.gate.wait(30)
        self.threads.add(threading.get_ident())
        self.passes.append(len(queries))
        if self.fail:
            raise RuntimeError("forward pass exploded")
        return [Ranked([f"{self.name}{q.n}"], [float(q.n)], None) for q in queries]


def _q(n: int) -> Query:
    return Query(np.array([1], dtype=np.int64), n, np.zeros(0, dtype=np.int64))


async def _run(batcher: MicroBatcher, jobs: list[tuple[Any, list[int]]]) -> list[list[str]]:
    batcher.start()
    try:
        results = await asyncio.gather(
            *(batcher.submit(model, [_q(n) for n in ns]) for model, ns in jobs)
        )
        return [[r.items[0] for r in ranked] for ranked in results]
    finally:
        await batcher.stop()


async def test_concurrent_requests_share_one_pass_and_keep_their_results() -> None:
    model, metrics = FakeModel(), Metrics()
    # A long wait, but the batch is full at 10 rows, so it starts at once.
    batcher = MicroBatcher(metrics, max_batch=10, wait_s=10.0)
    results = await _run(batcher, [(model, [i]) for i in range(10)])
    assert model.passes == [10]
    assert results == [[f"m{i}"] for i in range(10)]
    assert metrics.registry.get_sample_value("multvae_batch_size_sum") == 10
    assert metrics.registry.get_sample_value("multvae_inference_seconds_count") == 1


async def test_batches_never_exceed_max_batch() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=10, wait_s=0.01)
    results = await _run(batcher, [(model, [i]) for i in range(25)])
    assert sum(model.passes) == 25
    assert max(model.passes) <= 10
    assert results == [[f"m{i}"] for i in range(25)]


async def test_wait_zero_turns_grouping_off() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=64, wait_s=0.0)
    assert not batcher.enabled
    results = await _run(batcher, [(model, [i]) for i in range(6)])
    assert model.passes == [1] * 6
    assert results == [[f"m{i}"] for i in range(6)]


async def test_a_group_larger_than_max_batch_is_one_pass() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=4, wait_s=0.01)
    results = await _run(batcher, [(model, list(range(9))), (model, [100])])
    assert model.passes == [9, 1]  # the big group alone; the next one waits for its own pass
    assert results == [[f"m{i}" for i in range(9)], ["m100"]]


async def test_two_model_versions_in_one_batch_get_one_pass_each() -> None:
    old, new = FakeModel("old"), FakeModel("new")
    batcher = MicroBatcher(Metrics(), max_batch=4, wait_s=10.0)
    results = await _run(batcher, [(old, [1]), (new, [2]), (old, [3]), (new, [4])])
    assert (old.passes, new.passes) == ([2], [2])
    assert results == [["old1"], ["new2"], ["old3"], ["new4"]]


async def test_inference_runs_off_the_event_loop_thread() -> None:
    model = FakeModel()
    for wait in (0.0, 0.001):
        await _run(MicroBatcher(Metrics(), max_batch=8, wait_s=wait), [(model, [1])])
    assert threading.get_ident() not in model.threads


async def test_a_failed_pass_fails_its_requests_and_the_batcher_goes_on() -> None:
    bad, good = FakeModel("bad", fail=True), FakeModel("good")
    batcher = MicroBatcher(Metrics(), max_batch=2, wait_s=10.0)
    batcher.start()
    try:
        failed = await asyncio.gather(
            batcher.submit(bad, [_q(1)]), batcher.submit(bad, [_q(2)]), return_exceptions=True
        )
        assert [str(e) for e in failed] == ["forward pass exploded"] * 2
        ok = await asyncio.gather(batcher.submit(good, [_q(3)]), batcher.submit(good, [_q(4)]))
        assert [r[0].items for r in ok] == [["good3"], ["good4"]]
    finally:
        await batcher.stop()


async def test_a_lone_request_does_not_wait_for_company() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=3600.0)
    batcher.start()
    try:
        # Nobody else is on the way, so the hour-long window is never used.
        ranked = await asyncio.wait_for(batcher.submit(model, [_q(1)]), timeout=30)
    finally:
        await batcher.stop()
    assert ranked[0].items == ["m1"]
    assert model.passes == [1]


async def test_a_batch_waits_for_requests_on_their_way() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=3600.0)
    batcher.start()

    async def another_request() -> list[Ranked]:
        with batcher.arriving():  # parsing, looking up the cache
            await asyncio.sleep(0.05)
        return await batcher.submit(model, [_q(2)])

    try:
        other = asyncio.ensure_future(another_request())
        await asyncio.sleep(0)  # it is on its way now
        first = asyncio.ensure_future(batcher.submit(model, [_q(1)]))
        results = await asyncio.wait_for(asyncio.gather(first, other), timeout=30)
    finally:
        await batcher.stop()
    assert [r[0].items for r in results] == [["m1"], ["m2"]]
    assert model.passes == [2]  # the first waited for the second, not for the window


async def test_after_a_shared_pass_a_lone_request_waits_for_the_others() -> None:
    # Clients answered together tend to come back together: the next batch waits for them
    # even when none is visibly on its way yet.
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=3600.0)
    batcher.start()
    try:
        await asyncio.gather(batcher.submit(model, [_q(1)]), batcher.submit(model, [_q(2)]))
        first = asyncio.ensure_future(batcher.submit(model, [_q(3)]))
        await asyncio.sleep(0.05)
        assert not first.done()  # waiting, with nobody arriving
        second = await asyncio.wait_for(batcher.submit(model, [_q(4)]), timeout=30)
        await asyncio.wait_for(first, timeout=30)
    finally:
        await batcher.stop()
    assert second[0].items == ["m4"]
    assert model.passes == [2, 2]


async def test_once_the_answered_clients_are_back_the_batch_goes() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=64, wait_s=3600.0)
    batcher.start()
    try:
        for round_ in range(3):  # the same three clients, again and again
            await asyncio.wait_for(
                asyncio.gather(*(batcher.submit(model, [_q(round_ * 3 + i)]) for i in range(3))),
                timeout=30,
            )  # never the hour-long window: all three are back
    finally:
        await batcher.stop()
    assert model.passes == [3, 3, 3]


async def test_leaving_arriving_by_an_exception_still_counts() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=64, wait_s=3600.0)
    batcher.start()
    try:
        with pytest.raises(RuntimeError), batcher.arriving():
            raise RuntimeError("a strict-mode 422, a cache error, a cancelled request")
        ranked = await asyncio.wait_for(batcher.submit(model, [_q(1)]), timeout=30)
    finally:
        await batcher.stop()
    assert ranked[0].items == ["m1"]


async def test_requests_queued_during_a_pass_wait_for_the_clients_it_answered() -> None:
    # Without this, concurrent clients settle into alternating half-size passes.
    release = threading.Event()
    model = FakeModel(gate=release)
    batcher = MicroBatcher(Metrics(), max_batch=2, wait_s=0.5)
    batcher.start()
    try:
        answered = asyncio.gather(batcher.submit(model, [_q(1)]), batcher.submit(model, [_q(2)]))
        await asyncio.sleep(0.05)  # that pass is running now
        queued = asyncio.ensure_future(batcher.submit(model, [_q(3)]))
        await asyncio.sleep(0.6)  # longer than wait_s: its own window has run out
        release.set()
        await asyncio.wait_for(answered, timeout=30)
        back = await asyncio.wait_for(batcher.submit(model, [_q(4)]), timeout=30)  # a client
        await asyncio.wait_for(queued, timeout=30)
    finally:
        release.set()
        await batcher.stop()
    assert back[0].items == ["m4"]
    assert model.passes == [2, 2]


async def test_stop_fails_waiting_requests() -> None:
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=60.0)
    batcher.start()
    with batcher.arriving():  # another request on its way keeps the batch waiting
        waiting = asyncio.ensure_future(batcher.submit(FakeModel(), [_q(1)]))
        await asyncio.sleep(0)  # let it enqueue
        await batcher.stop()
    with pytest.raises(NotReadyError, match="shutting down"):
        await waiting


async def test_a_full_queue_refuses_at_once_instead_of_growing() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=60.0, max_pending=3)
    batcher.start()
    try:
        with batcher.arriving():  # the queue waits for more, so it can fill up
            # Alone in the queue, a request larger than the cap still goes (slow, not refused).
            big = asyncio.ensure_future(batcher.submit(model, [_q(i) for i in range(5)]))
            await asyncio.sleep(0)
            with pytest.raises(OverloadedError) as refused:
                await batcher.submit(model, [_q(9)])
            assert "MULTVAE_MAX_PENDING=3" in refused.value.detail
            assert "retry" in refused.value.detail
            assert refused.value.status == 503
            assert refused.value.headers == {"Retry-After": "1"}
            assert not big.done()
            await batcher.stop()
    finally:
        await batcher.stop()
    with pytest.raises(NotReadyError, match="shutting down"):
        await big
    assert model.passes == []


async def test_the_cap_counts_rows_and_also_holds_without_grouping() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=60.0, max_pending=3)
    batcher.start()
    try:
        with batcher.arriving():  # the queue waits for more, so it can fill up
            waiting = [asyncio.ensure_future(batcher.submit(model, [_q(1), _q(2)]))]
            await asyncio.sleep(0)
            waiting.append(asyncio.ensure_future(batcher.submit(model, [_q(3)])))  # 3 rows: fit
            await asyncio.sleep(0)
            with pytest.raises(OverloadedError):
                await batcher.submit(model, [_q(4)])
            await batcher.stop()
    finally:
        await batcher.stop()
    await asyncio.gather(*waiting, return_exceptions=True)

    release = threading.Event()
    blocked = FakeModel(gate=release)
    direct = MicroBatcher(Metrics(), max_batch=100, wait_s=0.0, max_pending=1)
    try:
        first = asyncio.ensure_future(direct.submit(blocked, [_q(1)]))
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):
            await direct.submit(blocked, [_q(2)])
        release.set()
        assert (await first)[0].items == ["m1"]
        assert (await direct.submit(blocked, [_q(3)]))[0].items == ["m3"]  # room again
    finally:
        release.set()
        await direct.stop()


class _Flaky:
    """A batch_wait histogram whose observe() raises: kills the consumer mid-batch."""

    def __init__(self, failures: int) -> None:
        self.failures = failures

    def observe(self, _: float) -> None:
        if self.failures > 0:
            self.failures -= 1
            raise RuntimeError("a bug in the consumer")


async def test_a_dead_consumer_fails_its_waiters_and_is_restarted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    model, metrics = FakeModel(), Metrics()
    metrics.batch_wait = _Flaky(failures=1)  # type: ignore[assignment]
    batcher = MicroBatcher(metrics, max_batch=2, wait_s=10.0)
    batcher.start()
    try:
        # Without the done-callback these would wait forever; wait_for turns that into a failure.
        failed = await asyncio.wait_for(
            asyncio.gather(
                batcher.submit(model, [_q(1)]), batcher.submit(model, [_q(2)]),
                return_exceptions=True,
            ),
            timeout=30,
        )  # fmt: skip
        assert all(isinstance(e, NotReadyError) for e in failed)
        assert all(e.status == 503 and "retry" in e.detail for e in failed)  # type: ignore[union-attr]
        ok = await asyncio.wait_for(
            asyncio.gather(batcher.submit(model, [_q(3)]), batcher.submit(model, [_q(4)])), 30
        )
        assert [r[0].items for r in ok] == [["m3"], ["m4"]]
    finally:
        await batcher.stop()
    died = [r for r in caplog.records if r.name == "multvae.batching" and "died" in r.message]
    assert len(died) == 1
    assert died[0].exc_info is not None


async def test_a_consumer_that_keeps_dying_stays_down_and_requests_fail_fast() -> None:
    model, metrics = FakeModel(), Metrics()
    metrics.batch_wait = _Flaky(failures=1000)  # type: ignore[assignment]
    batcher = MicroBatcher(metrics, max_batch=1, wait_s=10.0)
    batcher.start()
    try:
        for i in range(MAX_RESTARTS):
            with pytest.raises(NotReadyError, match="failed unexpectedly"):
                await asyncio.wait_for(batcher.submit(model, [_q(i)]), 30)
        # Down for good: refused before anything is queued.
        with pytest.raises(NotReadyError, match="failed unexpectedly"):
            await batcher.submit(model, [_q(99)])
        assert not batcher._pending
        assert batcher.broken is not None  # /readyz reports this and turns 503
    finally:
        await batcher.stop()
    assert model.passes == []
