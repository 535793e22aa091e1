"""The micro-batcher on a gated fake model and a fake clock: grouping, bounds, order, errors."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Sequence
from typing import Any

import pytest

from multvae.recommend import Query, Recommendation
from service.batching import MAX_RESTARTS, MicroBatcher
from service.errors import NotReadyError, OverloadedError
from service.metrics import Metrics

pytestmark = pytest.mark.anyio

HOUR = 3600.0  # a window no test may wait out: it would time out instead


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class FakeModel:
    """Echoes each query's n back as its only item; records every pass. With a ``gate``, a
    pass blocks (in the worker thread) until the gate is set, and ``running`` is set while a
    pass waits at it."""

    def __init__(
        self, name: str = "m", fail: bool = False, gate: threading.Event | None = None
    ) -> None:
        self.name = name
        self.fail = fail
        self.gate = gate
        self.running = threading.Event()
        self.passes: list[int] = []
        self.threads: set[int] = set()

    def recommend_batch(self, queries: Sequence[Query]) -> list[Recommendation]:
        self.running.set()
        if self.gate is not None:
            assert self.gate.wait(30)
        self.threads.add(threading.get_ident())
        self.passes.append(len(queries))
        if self.fail:
            raise RuntimeError("forward pass exploded")
        return [Recommendation([(f"{self.name}{q.n}", float(q.n))]) for q in queries]


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def _q(n: int) -> Query:
    return Query(["1"], n)


def _items(ranked: list[Recommendation]) -> list[str]:
    return [r.items[0][0] for r in ranked]


async def _run(batcher: MicroBatcher, jobs: list[tuple[Any, list[int]]]) -> list[list[str]]:
    batcher.start()
    try:
        results = await asyncio.wait_for(
            asyncio.gather(*(batcher.submit(model, [_q(n) for n in ns]) for model, ns in jobs)),
            timeout=30,
        )
        return [_items(ranked) for ranked in results]
    finally:
        await batcher.stop()


async def _until(condition: Any) -> None:
    """Yield to the loop until ``condition()`` holds (bounded: a hang fails, not blocks)."""
    async with asyncio.timeout(30):
        while not condition():
            await asyncio.sleep(0)


async def _started(model: FakeModel) -> None:
    """Until the model's gated pass is running in the worker thread."""
    assert await asyncio.to_thread(model.running.wait, 30)


async def test_concurrent_requests_share_one_pass_and_keep_their_results() -> None:
    model, metrics = FakeModel(), Metrics()
    batcher = MicroBatcher(metrics, max_batch=10, wait_s=HOUR)
    results = await _run(batcher, [(model, [i]) for i in range(10)])
    assert model.passes == [10]  # all queued before the consumer ran: none waited
    assert results == [[f"m{i}"] for i in range(10)]
    assert metrics.registry.get_sample_value("multvae_batch_size_sum") == 10
    assert metrics.registry.get_sample_value("multvae_inference_seconds_count") == 1


async def test_what_queued_during_a_pass_goes_together_without_waiting() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = MicroBatcher(Metrics(), max_batch=3, wait_s=HOUR)
    batcher.start()
    try:
        first = asyncio.ensure_future(batcher.submit(model, [_q(0)]))
        second = asyncio.ensure_future(batcher.submit(model, [_q(1)]))  # company: goes at once
        await _started(model)
        queued = [asyncio.ensure_future(batcher.submit(model, [_q(i)])) for i in range(2, 7)]
        await _until(lambda: batcher.pending_rows == 5)
        gate.set()
        results = await asyncio.wait_for(asyncio.gather(first, second, *queued), 30)
    finally:
        gate.set()
        await batcher.stop()
    # Never the hour-long window: after the pass, 5 waited; 3 went, then the 2 left together.
    assert model.passes == [2, 3, 2]
    assert [_items(r)[0] for r in results] == [f"m{i}" for i in range(7)]


async def test_a_lone_request_waits_for_company_within_the_window() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=HOUR)
    batcher.start()
    try:
        alone = asyncio.ensure_future(batcher.submit(model, [_q(1)]))
        await _until(lambda: batcher.pending_rows == 1)
        for _ in range(10):
            await asyncio.sleep(0)
        assert not alone.done()
        assert model.passes == []
        company = await asyncio.wait_for(batcher.submit(model, [_q(2)]), 30)
        assert _items(await alone) == ["m1"]
    finally:
        await batcher.stop()
    assert _items(company) == ["m2"]
    assert model.passes == [2]


async def test_a_lone_request_goes_when_the_window_closes() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=0.001)
    ranked = await _run(batcher, [(model, [1])])
    assert ranked == [["m1"]]
    assert model.passes == [1]


async def test_wait_zero_never_waits_for_company() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=64, wait_s=0.0)
    batcher.start()
    try:
        for i in range(3):  # one at a time: each goes alone, at once
            assert _items(await asyncio.wait_for(batcher.submit(model, [_q(i)]), 30)) == [f"m{i}"]
    finally:
        await batcher.stop()
    assert model.passes == [1, 1, 1]


async def test_the_queueing_time_is_measured_on_the_clock() -> None:
    gate, clock, metrics = threading.Event(), FakeClock(), Metrics()
    model = FakeModel(gate=gate)
    batcher = MicroBatcher(metrics, max_batch=2, wait_s=HOUR, clock=clock)
    batcher.start()
    try:
        running = asyncio.gather(batcher.submit(model, [_q(0)]), batcher.submit(model, [_q(1)]))
        await _started(model)
        clock.now += 1.0
        queued = asyncio.gather(batcher.submit(model, [_q(2)]), batcher.submit(model, [_q(3)]))
        await _until(lambda: batcher.pending_rows == 2)
        clock.now += 0.25  # the running pass ends a quarter of a second later
        gate.set()
        await asyncio.wait_for(asyncio.gather(running, queued), 30)
    finally:
        gate.set()
        await batcher.stop()
    registry = metrics.registry
    assert registry.get_sample_value("multvae_batch_wait_seconds_count") == 4
    assert registry.get_sample_value("multvae_batch_wait_seconds_sum") == pytest.approx(0.5)


async def test_batches_never_exceed_max_batch() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=10, wait_s=0.01)
    results = await _run(batcher, [(model, [i]) for i in range(25)])
    assert sum(model.passes) == 25
    assert max(model.passes) <= 10
    assert results == [[f"m{i}"] for i in range(25)]


async def test_a_group_larger_than_max_batch_is_one_pass() -> None:
    model = FakeModel()
    batcher = MicroBatcher(Metrics(), max_batch=4, wait_s=0.01)
    results = await _run(batcher, [(model, list(range(9))), (model, [100])])
    assert model.passes == [9, 1]  # the big group alone; the next one waits for its own pass
    assert results == [[f"m{i}" for i in range(9)], ["m100"]]


async def test_two_model_versions_in_one_batch_get_one_pass_each() -> None:
    old, new = FakeModel("old"), FakeModel("new")
    batcher = MicroBatcher(Metrics(), max_batch=4, wait_s=HOUR)
    results = await _run(batcher, [(old, [1]), (new, [2]), (old, [3]), (new, [4])])
    assert (old.passes, new.passes) == ([2], [2])
    assert results == [["old1"], ["new2"], ["old3"], ["new4"]]


async def test_inference_runs_off_the_event_loop_thread() -> None:
    model = FakeModel()
    await _run(MicroBatcher(Metrics(), max_batch=8, wait_s=0.0), [(model, [1])])
    assert threading.get_ident() not in model.threads


async def test_a_failed_pass_fails_its_requests_and_the_batcher_goes_on() -> None:
    bad, good = FakeModel("bad", fail=True), FakeModel("good")
    batcher = MicroBatcher(Metrics(), max_batch=2, wait_s=HOUR)
    batcher.start()
    try:
        failed = await asyncio.gather(
            batcher.submit(bad, [_q(1)]), batcher.submit(bad, [_q(2)]), return_exceptions=True
        )
        assert [str(e) for e in failed] == ["forward pass exploded"] * 2
        ok = await asyncio.gather(batcher.submit(good, [_q(3)]), batcher.submit(good, [_q(4)]))
        assert [_items(r) for r in ok] == [["good3"], ["good4"]]
    finally:
        await batcher.stop()


async def test_stop_fails_waiting_requests() -> None:
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=HOUR)
    batcher.start()
    waiting = asyncio.ensure_future(batcher.submit(FakeModel(), [_q(1)]))  # alone: it waits
    await _until(lambda: batcher.pending_rows == 1)
    await batcher.stop()
    with pytest.raises(NotReadyError, match="shutting down"):
        await waiting


async def test_a_full_queue_refuses_at_once_instead_of_growing() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = MicroBatcher(Metrics(), max_batch=5, wait_s=HOUR, max_pending=3)
    batcher.start()
    try:
        running = asyncio.gather(batcher.submit(model, [_q(0)]), batcher.submit(model, [_q(0)]))
        await _started(model)
        # Alone in the queue, a request larger than the cap still goes (slow, not refused).
        big = asyncio.ensure_future(batcher.submit(model, [_q(i) for i in range(5)]))
        await _until(lambda: batcher.pending_rows == 5)
        with pytest.raises(OverloadedError) as refused:
            await batcher.submit(model, [_q(9)])
        assert "MULTVAE_MAX_PENDING=3" in refused.value.detail
        assert "retry" in refused.value.detail
        assert refused.value.status == 503
        assert refused.value.headers == {"Retry-After": "1"}
        gate.set()
        await asyncio.wait_for(asyncio.gather(running, big), 30)
    finally:
        gate.set()
        await batcher.stop()
    assert model.passes == [2, 5]


async def test_the_cap_counts_rows() -> None:
    gate = threading.Event()
    model = FakeModel(gate=gate)
    batcher = MicroBatcher(Metrics(), max_batch=100, wait_s=HOUR, max_pending=3)
    batcher.start()
    try:
        running = asyncio.gather(batcher.submit(model, [_q(0)]), batcher.submit(model, [_q(0)]))
        await _started(model)
        waiting = [asyncio.ensure_future(batcher.submit(model, [_q(1), _q(2)]))]
        waiting.append(asyncio.ensure_future(batcher.submit(model, [_q(3)])))  # 3 rows: fit
        await _until(lambda: batcher.pending_rows == 3)
        with pytest.raises(OverloadedError):
            await batcher.submit(model, [_q(4)])
        gate.set()
        await asyncio.wait_for(asyncio.gather(running, *waiting), 30)
        again = [
            batcher.submit(model, [_q(5)]),
            batcher.submit(
                model,
                [_q(6)],
            ),
        ]
        room = await asyncio.wait_for(asyncio.gather(*again), 30)  # room again
        assert [_items(r) for r in room] == [["m5"], ["m6"]]
    finally:
        gate.set()
        await batcher.stop()


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
    batcher = MicroBatcher(metrics, max_batch=2, wait_s=HOUR)
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
        assert [_items(r) for r in ok] == [["m3"], ["m4"]]
    finally:
        await batcher.stop()
    died = [r for r in caplog.records if r.name == "multvae.batching" and "died" in r.message]
    assert len(died) == 1
    assert died[0].exc_info is not None


async def test_a_consumer_that_keeps_dying_stays_down_and_requests_fail_fast() -> None:
    model, metrics = FakeModel(), Metrics()
    metrics.batch_wait = _Flaky(failures=1000)  # type: ignore[assignment]
    batcher = MicroBatcher(metrics, max_batch=1, wait_s=HOUR)
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
