"""Micro-batching: concurrent requests share one forward pass, run off the event loop.

A forward pass costs far less per history for 32 histories than for 1 (the decoder's last
layer, K x I, dominates and is read once per pass), so under load grouping is where the
throughput comes from. While one pass runs, new requests queue and form the next batch. When
the worker is free, a batch waits for company only when company is likely: other requests
are on their way (inside :meth:`MicroBatcher.arriving`: parsed, looking up the cache), or
the clients the previous pass answered have not all come back yet (they tend to come back
together). It waits for them, never past ``max_batch`` rows or ``wait_s`` after the worker
became free (or after the first request came, if later). So a lone client is never kept
waiting for company that is not coming (bench/RESULTS.md: 8 -> 4 ms p50 at concurrency 1),
and requests queued during a pass also wait for the clients that pass just answered. Without
that, c concurrent clients settle into two alternating half-size passes, and since the
output layer streams all its weights once per pass, passes of 4 cost ~2x the CPU per
history of passes of 8 (c = 8: 769 req/s in passes of 4 against 848 in passes of 8).
``wait_s = 0`` turns grouping off: every request is its own pass.

Inference always runs on one worker thread, so passes never compete with each other for the
cores (torch already uses several threads inside one pass) and the event loop stays free to
parse requests and answer cache hits.

The queue is bounded: once ``max_pending`` histories wait, :meth:`MicroBatcher.submit` raises
:class:`OverloadedError` (503 with Retry-After) at once, so overload shows as fast refusals a
client or balancer can act on rather than as latency that grows without limit. Should the
consumer task ever die, everything waiting on it is failed with a 503 and it is restarted;
after a few deaths in a row without a completed pass it is not, and requests that need the
model get a 503 at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

from service.errors import NotReadyError, OverloadedError
from service.metrics import Metrics
from service.recommender import Query, Ranked, ServingModel

log = logging.getLogger("multvae.batching")

RETRY_AFTER = {"Retry-After": "1"}
# Consumer deaths in a row, with no pass completed in between, after which it stays down.
MAX_RESTARTS = 3


@dataclass
class _Job:
    model: ServingModel
    queries: Sequence[Query]
    future: asyncio.Future[list[Ranked]]
    enqueued: float = field(default_factory=time.perf_counter)


class MicroBatcher:
    """Groups :meth:`submit` calls into forward passes; start in the lifespan, then stop."""

    def __init__(
        self, metrics: Metrics, max_batch: int, wait_s: float, max_pending: int = 1024
    ) -> None:
        self.metrics = metrics
        self.max_batch = max_batch
        self.wait_s = wait_s
        self.max_pending = max_pending
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="multvae-infer")
        self._pending: deque[_Job] = deque()
        self._pending_rows = 0
        self._active: list[_Job] = []  # taken off the queue by the consumer, not yet answered
        self._direct_rows = 0  # grouping off: rows submitted and not yet answered
        self._wakeup = asyncio.Event()
        self._arriving = 0  # requests on their way to submit()
        self._last_jobs = 0  # requests the previous pass served
        self._free_since = 0.0  # when the previous pass ended (perf_counter)
        self._queued_at_free = 0  # requests that were already waiting then
        self._task: asyncio.Task[None] | None = None
        self._stopping = False
        self._deaths = 0  # consumer deaths since the last completed pass
        self._broken: str | None = None  # why submits are refused, once the consumer is down

    @property
    def enabled(self) -> bool:
        return self.wait_s > 0

    @property
    def broken(self) -> str | None:
        """Why every submit is refused for good (the consumer stayed down), else None."""
        return self._broken

    def start(self) -> None:
        if self.enabled and self._task is None:
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
            # Cancelled from outside (the loop is closing): nothing to restart it for.
            why = "the inference worker was cancelled; the service is shutting down"
            log.error("micro-batch consumer cancelled outside shutdown; refusing requests")
        else:
            exc = task.exception()
            self._deaths += 1
            why = "the inference worker failed unexpectedly; retry the request"
            log.error(
                "micro-batch consumer died (%d in a row); failing %d waiting requests",
                self._deaths, len(self._active) + len(self._pending),
                exc_info=exc,
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
        self._pending_rows = 0

    async def stop(self) -> None:
        self._stopping = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        while self._pending:
            job = self._pending.popleft()
            if not job.future.done():
                job.future.set_exception(NotReadyError("the service is shutting down"))
        self._executor.shutdown(wait=True)

    @contextlib.contextmanager
    def arriving(self) -> Iterator[None]:
        """Mark a request on its way to :meth:`submit`: a batch about to start waits for it
        (up to ``wait_s``). Leave before calling :meth:`submit`."""
        self._arriving += 1
        try:
            yield
        finally:
            self._arriving -= 1
            if not self._arriving:
                self._wakeup.set()  # a gathering batch need wait no longer

    async def submit(self, model: ServingModel, queries: Sequence[Query]) -> list[Ranked]:
        """Rankings for ``queries`` on ``model`` (the version the request started with).

        Raises :class:`OverloadedError` when ``max_pending`` histories already wait.
        """
        rows = len(queries)
        if not self.enabled:
            self._admit(self._direct_rows, rows)
            self._direct_rows += rows
            try:
                self.metrics.batch_wait.observe(0.0)
                return await self._run(model, queries)
            finally:
                self._direct_rows -= rows
        if self._broken is not None:
            raise NotReadyError(self._broken, headers=RETRY_AFTER)
        if self._task is None:
            raise NotReadyError("the model is not loaded yet")
        self._admit(self._pending_rows, rows)
        future: asyncio.Future[list[Ranked]] = asyncio.get_running_loop().create_future()
        self._pending.append(_Job(model, queries, future))
        self._pending_rows += rows
        self._wakeup.set()
        return await future

    def _admit(self, waiting: int, rows: int) -> None:
        # An empty queue takes any request, however large (as a pass takes any first job), so
        # a /recommend/batch above the cap is slow rather than refused forever.
        if waiting and waiting + rows > self.max_pending:
            raise OverloadedError(
                f"the service is overloaded: {waiting} histories are already waiting for the "
                f"model (MULTVAE_MAX_PENDING={self.max_pending}); retry in a moment",
                headers=RETRY_AFTER,
            )

    async def _run(self, model: ServingModel, queries: Sequence[Query]) -> list[Ranked]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._timed_rank, model, queries)

    def _timed_rank(self, model: ServingModel, queries: Sequence[Query]) -> list[Ranked]:
        tic = time.perf_counter()
        ranked = model.rank(queries)
        self.metrics.inference.observe(time.perf_counter() - tic)
        self.metrics.batch_size.observe(len(queries))
        return ranked

    async def _gather(self) -> list[_Job]:
        """Wait for the first job, then for the company that is likely to come, until it has
        come, the batch is full or the window closes."""
        while not self._pending:
            self._wakeup.clear()
            await self._wakeup.wait()
        # The window opens when the worker is free, or when the first job came if later: jobs
        # that queued during a pass still wait for the clients that pass just answered, and
        # once those are back (or the window closes) the batch goes.
        deadline = max(self._pending[0].enqueued, self._free_since) + self.wait_s
        expected = self._queued_at_free + self._last_jobs
        while self._pending_rows < self.max_batch and (
            self._arriving or len(self._pending) < expected
        ):
            remaining = deadline - time.perf_counter()
            if remaining <= 0:
                break
            self._wakeup.clear()
            try:
                async with asyncio.timeout(remaining):
                    await self._wakeup.wait()
            except TimeoutError:
                break
        # The first job always goes (a large /recommend/batch may exceed max_batch alone);
        # later ones only while they fit.
        jobs = [self._pending.popleft()]
        rows = len(jobs[0].queries)
        while self._pending and rows + len(self._pending[0].queries) <= self.max_batch:
            job = self._pending.popleft()
            jobs.append(job)
            rows += len(job.queries)
        self._pending_rows -= rows
        self._last_jobs = len(jobs)
        return jobs

    async def _consume(self) -> None:
        while True:
            jobs = await self._gather()
            self._active = jobs  # until answered: failed by _on_consumer_done should we die
            started = time.perf_counter()
            for job in jobs:
                self.metrics.batch_wait.observe(started - job.enqueued)
            # A swap can leave jobs for two versions in one batch: one pass per version.
            by_model: dict[int, list[_Job]] = {}
            for job in jobs:
                by_model.setdefault(id(job.model), []).append(job)
            try:
                for group in by_model.values():
                    await self._execute(group)
            except asyncio.CancelledError:
                # Stopped mid-pass: nobody may be left waiting on a future that never resolves.
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(NotReadyError("the service is shutting down"))
                raise
            self._active = []
            self._deaths = 0
            self._free_since = time.perf_counter()
            self._queued_at_free = len(self._pending)  # arrived during the pass

    async def _execute(self, jobs: list[_Job]) -> None:
        queries = [q for job in jobs for q in job.queries]
        try:
            ranked = await self._run(jobs[0].model, queries)
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
