"""Micro-batching: concurrent requests share one forward pass, run off the event loop.

A forward pass costs far less per history for 32 histories than for 1 (the decoder's output
layer, K x I, is read once per pass), so under load grouping is where the throughput comes
from. The rule:

* while a pass runs, new requests queue; when the worker is free, the next pass takes
  everything that queued (up to ``max_batch`` rows; the first request always goes, however
  large);
* only a request that would go alone waits for company, at most ``wait_s`` (0: never);
* once ``max_pending`` histories wait, :meth:`MicroBatcher.submit` raises
  :class:`OverloadedError` at once (a 503 with Retry-After), so overload shows as fast
  refusals a client or balancer can act on, not as latency that grows without limit;
* before that global bound, one client may hold at most ``max_pending_share`` of it: a
  client over its fair share gets the 503, everyone else is still served.

Inference runs on one worker thread, so passes never compete with each other for the cores
(torch already uses several threads inside one pass) and the event loop stays free to parse
requests and answer cache hits. Should the consumer task die, everything waiting on it is
failed with a 503 and it is restarted; after a few deaths in a row without a completed pass
it stays down and requests that need the model get a 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from multvae.recommend import Query, Recommendation, Recommender
from service.errors import NotReadyError, OverloadedError
from service.metrics import Metrics

log = logging.getLogger("multvae.batching")

RETRY_AFTER = {"Retry-After": "1"}
# Consumer deaths in a row, with no pass completed in between, after which it stays down.
MAX_RESTARTS = 3


@dataclass
class _Job:
    recommender: Recommender
    queries: Sequence[Query]
    future: asyncio.Future[list[Recommendation]]
    enqueued: float
    client: str = ""


class MicroBatcher:
    """Groups :meth:`submit` calls into forward passes; start in the lifespan, then stop.

    ``clock`` times the queueing metric (tests pass a fake one).
    """

    def __init__(
        self,
        metrics: Metrics,
        max_batch: int,
        wait_s: float,
        max_pending: int = 1024,
        clock: Callable[[], float] = time.perf_counter,
        max_pending_share: float = 1.0,
    ) -> None:
        self.metrics = metrics
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_pending = max_pending
        self.max_pending_share = max_pending_share
        self.per_client = max(1, int(max_pending * max_pending_share))
        self.clock = clock
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multvae-infer")
        self._pending: deque[_Job] = deque()
        self._active: list[_Job] = []  # taken off the queue by the consumer, not yet answered
        self._arrived = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._deaths = 0  # consumer deaths since the last completed pass
        self._broken: str | None = None  # why submits are refused, once the consumer is down

    @property
    def pending_rows(self) -> int:
        """Histories waiting for a pass (not counting the one running)."""
        return sum(len(job.queries) for job in self._pending)

    @property
    def broken(self) -> str | None:
        """Why every submit is refused for good (the consumer stayed down), else None."""
        return self._broken

    def start(self) -> None:
        if self._task is None:
            self._stopping = False
            self._spawn()

    def _spawn(self) -> None:
        self._task = asyncio.create_task(self._consume(), name="multvae-batcher")
        self._task.add_done_callback(self._on_consumer_done)

    def _on_consumer_done(self, task: asyncio.Task[None]) -> None:
        """The consumer ended without :meth:`stop`: fail its waiters, then restart it (or not)."""
        if self._stopping or task is not self._task:
            return
        if task.cancelled():
            why = "the inference worker was cancelled; the service is shutting down"
            log.error("micro-batch consumer cancelled outside shutdown; refusing requests")
        else:
            self._deaths += 1
            why = "the inference worker failed unexpectedly; retry the request"
            log.error(
                "micro-batch consumer died (%d in a row); failing %d waiting requests",
                self._deaths, len(self._active) + len(self._pending),
                exc_info=task.exception(),
            )  # fmt: skip
        self._fail_waiting(NotReadyError(why, headers=RETRY_AFTER))
        self._task = None
        if not task.cancelled() and self._deaths < MAX_RESTARTS:
            log.warning("restarting the micro-batch consumer")
            self._spawn()
        else:
            self._broken = why
            log.error("micro-batch consumer stays down; requests that need the model get 503")

    def _fail_waiting(self, exc: Exception) -> None:
        for job in [*self._active, *self._pending]:
            if not job.future.done():
                job.future.set_exception(exc)
        self._active = []
        self._pending.clear()

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        self._fail_waiting(NotReadyError("the service is shutting down"))
        self._executor.shutdown(wait=True)

    async def submit(
        self, recommender: Recommender, queries: Sequence[Query], client: str = ""
    ) -> list[Recommendation]:
        """Recommendations for ``queries`` from ``recommender`` (the version the request began
        with). Raises :class:`OverloadedError` when ``max_pending`` histories already wait,
        or ``client`` already has its share of them waiting."""
        if self._broken is not None:
            raise NotReadyError(self._broken, headers=RETRY_AFTER)
        if self._task is None:
            raise NotReadyError("the model is not loaded yet")
        waiting = self.pending_rows
        # An empty queue takes any request, however large (as a pass takes any first job), so
        # a large /recommend/batch is slow rather than refused forever.
        if waiting and waiting + len(queries) > self.max_pending:
            raise OverloadedError(
                f"the service is overloaded: {waiting} histories are already waiting for the "
                f"model (MULTVAE_MAX_PENDING={self.max_pending}); retry in a moment",
                headers=RETRY_AFTER,
            )
        mine = sum(len(job.queries) for job in self._pending if job.client == client)
        if mine and mine + len(queries) > self.per_client:
            raise OverloadedError(
                f"this client already has {mine} histories waiting for the model, its share "
                f"of the queue ({self.per_client} of {self.max_pending}: "
                f"MULTVAE_MAX_PENDING_SHARE={self.max_pending_share:g}); retry in a moment",
                headers=RETRY_AFTER,
            )
        future: asyncio.Future[list[Recommendation]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(recommender, queries, future, self.clock(), client))
        self._arrived.set()
        return await future

    async def _next_batch(self) -> list[_Job]:
        """Everything that queued (up to ``max_batch`` rows); a lone request waits for company
        at most ``wait_s``."""
        while not self._pending:
            self._arrived.clear()
            await self._arrived.wait()
        if (
            self.wait_s > 0
            and len(self._pending) == 1
            and len(self._pending[0].queries) < self.max_batch
        ):
            # Woken by the next arrival or, at the latest, by the window's end (a timer that
            # sets the event: cheaper than a timeout, which cancels the task and raises).
            self._arrived.clear()
            window = asyncio.get_running_loop().call_later(self.wait_s, self._arrived.set)
            try:
                await self._arrived.wait()
            finally:
                window.cancel()
        jobs = [self._pending.popleft()]
        rows = len(jobs[0].queries)
        while self._pending and rows + len(self._pending[0].queries) <= self.max_batch:
            job = self._pending.popleft()
            jobs.append(job)
            rows += len(job.queries)
        return jobs

    async def _consume(self) -> None:
        while True:
            jobs = await self._next_batch()
            self._active = jobs  # until answered: failed by _on_consumer_done should we die
            started = self.clock()
            for job in jobs:
                self.metrics.batch_wait.observe(started - job.enqueued)
            # A swap can leave jobs for two versions in one batch: one pass per version.
            by_version: dict[int, list[_Job]] = {}
            for job in jobs:
                by_version.setdefault(id(job.recommender), []).append(job)
            try:
                for group in by_version.values():
                    await self._execute(group)
            except asyncio.CancelledError:
                # Stopped mid-pass: nobody may be left waiting on a future that never resolves.
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(NotReadyError("the service is shutting down"))
                raise
            self._active = []
            self._deaths = 0

    async def _execute(self, jobs: list[_Job]) -> None:
        queries = [q for job in jobs for q in job.queries]
        loop = asyncio.get_running_loop()
        try:
            ranked = await loop.run_in_executor(
                self._executor, self._timed_pass, jobs[0].recommender, queries
            )
        except Exception as exc:  # every waiting request must hear about the failure
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        start = 0
        for job in jobs:
            end = start + len(job.queries)
            if not job.future.done():  # the client may have gone away
                job.future.set_result(ranked[start:end])
            start = end

    def _timed_pass(self, recommender: Recommender, queries: list[Query]) -> list[Recommendation]:
        tic = time.perf_counter()
        ranked = recommender.recommend_batch(queries)
        self.metrics.inference.observe(time.perf_counter() - tic)
        self.metrics.batch_size.observe(len(queries))
        return ranked
