"""The model being served, and hot reload to the version ``CURRENT`` names.

A reload (from the poller, SIGHUP or ``POST /admin/reload``) loads, verifies and warms up the
new version on a background thread while the old one keeps answering, then swaps one
reference. A request reads that reference once, at its start, so requests in flight finish
on the version they began with. A version that fails to load, verify or fold in to finite
scores is refused: the old one keeps serving, ``multvae_model_reloads_total{outcome="refused"}``
counts it and the log says why. The poller retries a refused version with exponential backoff
(the poll interval, doubled after each refusal, at most :data:`RETRY_MAX_S`): a version whose
files were not all visible yet (a shared volume) is taken a little later, and a broken one
costs one load and one log line per backoff period. SIGHUP and the admin endpoint retry at
once. A ``CURRENT``
that is missing or unreadable is refused the same way; the poller counts and logs it as an
error once per reason, then at debug level until the reason changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

import torch

from multvae.artifacts import ModelVersion, current_version, load_version
from multvae.errors import ArtifactError
from multvae.recommend import Query, Recommender
from multvae.topn_index import IndexSpec, TopNIndex
from service.metrics import Metrics
from service.settings import Settings

log = logging.getLogger("multvae.registry")

Trigger = Literal["startup", "poll", "sighup", "admin"]

RETRY_MAX_S = 300.0  # the poller retries a refused version at least this often


@dataclass(frozen=True)
class Refusal:
    """Why a version was refused, and when the poller may try it again."""

    why: str
    attempts: int
    retry_at: float


@dataclass(frozen=True)
class ReloadResult:
    outcome: Literal["reloaded", "unchanged", "refused"]
    version: str  # the version serving after the attempt
    requested: str | None  # the version CURRENT named
    detail: str


@dataclass(frozen=True)
class Served:
    """A loaded version and its recommender; swapped whole, never mutated."""

    loaded: ModelVersion
    recommender: Recommender
    device: torch.device
    loaded_at: float = field(default_factory=time.time)

    @property
    def version(self) -> str:
        return self.loaded.version

    def describe(self) -> dict[str, Any]:
        """What GET /model shows."""
        return {
            "version": self.version,
            "n_items": self.recommender.n_items,
            "device": str(self.device),
            "created_at": self.loaded.created_at,
            "loaded_at": datetime.fromtimestamp(self.loaded_at, UTC).isoformat(),
            "architecture": dict(self.loaded.config.get("model", {})),
            "topn_index": (
                {"kind": "exact"} if self.recommender.index is None
                else self.recommender.index.describe()
            ),
            "metrics": metrics_summary(self.loaded.metrics),
        }


def metrics_summary(metrics: dict[str, Any]) -> dict[str, Any]:
    """metrics.json without its lists (the per-epoch history, quintiles, the anneal search):
    the summary figures GET /model shows. The whole file stays in the version directory."""
    return {
        key: metrics_summary(value) if isinstance(value, dict) else value
        for key, value in metrics.items()
        if not isinstance(value, list)
    }


def index_spec(settings: Settings) -> IndexSpec | None:
    """The top-N index the settings ask for; None for exact scoring."""
    if settings.topn_index == "exact":
        return None
    return IndexSpec(
        settings.faiss_index, settings.faiss_search, settings.faiss_margin, settings.faiss_metric
    )


def load_serving(
    model_dir: Path, version: str | None, device: torch.device, index: IndexSpec | None = None
) -> Served:
    """Blocking: read, verify, rebuild and warm up one version (default: CURRENT's).

    With ``index``, the version's top-N index is built here, so it is swapped with the
    version. The warm-up folds in probe histories, so the first request pays no lazy
    initialisation and a model whose scores are not finite is refused before it serves.
    Raises :class:`ArtifactError` (or its :class:`VerificationError`) when it may not serve.
    """
    loaded = load_version(model_dir, version, device)
    topn = TopNIndex(loaded.model, index) if index is not None else None
    recommender = Recommender(loaded.model, loaded.items, loaded.version, topn)
    if topn is not None:
        topn.probe_recall = recommender.index_recall()
    recommender.check_finite()
    ids = list(recommender.items.ids[:10])
    recommender.recommend_batch([Query(ids, 20), Query([], 20)])
    return Served(loaded, recommender, device)


class ModelRegistry:
    """Holds the :class:`Served` version; all mutation happens on the event loop."""

    def __init__(
        self,
        settings: Settings,
        device: torch.device,
        metrics: Metrics,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.settings = settings
        self.device = device
        self.metrics = metrics
        self.current: Served | None = None
        self.refused: dict[str, Refusal] = {}  # the poller's backoff per refused version
        self._clock = clock
        self.pointer_problem: str | None = None  # why CURRENT could not be read, last time
        self._lock = asyncio.Lock()
        self._tasks: set[asyncio.Task[object]] = set()
        self._poller: asyncio.Task[None] | None = None
        self._sighup = False

    def _load(self, version: str | None) -> Served:
        return load_serving(
            self.settings.model_dir, version, self.device, index_spec(self.settings)
        )

    def _swap(self, model: Served, trigger: Trigger) -> None:
        old = self.current
        self.current = model
        self.metrics.set_model(
            model.version, str(model.device), model.recommender.n_items, model.loaded_at
        )
        self.metrics.reloads.labels("success", trigger).inc()
        index = model.recommender.index
        log.info(
            "serving model version %s on %s (%d items; top-N %s; was %s; trigger %s)",
            model.version, model.device, model.recommender.n_items,
            "exact" if index is None
            else f"by {index.spec.factory} index, built in {index.build_seconds:.1f} s, "
            f"recall@100 {index.probe_recall:.3f} on probe histories",
            old.version if old else None, trigger,
        )  # fmt: skip

    async def load_initial(self) -> Served:
        """Load the version CURRENT names; failure here fails startup."""
        async with self._lock:
            model = await asyncio.to_thread(self._load, None)
            self._swap(model, "startup")
            return model

    async def reload(self, trigger: Trigger) -> ReloadResult:
        """Load CURRENT if it names a version other than the one being served."""
        async with self._lock:
            serving = self.current.version if self.current else ""
            try:
                target = await asyncio.to_thread(current_version, self.settings.model_dir)
            except ArtifactError as exc:
                return self._refuse_pointer(str(exc), trigger)
            except Exception as exc:  # whatever reading CURRENT raises, the old model serves
                return self._refuse_pointer(f"CURRENT cannot be read: {exc!r}", trigger)
            if target is None:
                return self._refuse_pointer(
                    f"{self.settings.model_dir}/CURRENT is missing or empty", trigger
                )
            self.pointer_problem = None
            if target == serving:
                return ReloadResult("unchanged", serving, target, f"already serving {target}")
            refusal = self.refused.get(target)
            if trigger == "poll" and refusal is not None and self._clock() < refusal.retry_at:
                return ReloadResult("refused", serving, target, refusal.why)
            try:
                model = await asyncio.to_thread(self._load, target)
            except Exception as exc:  # any failure to load must leave the old model serving
                return self._refuse(target, f"{type(exc).__name__}: {exc}", trigger)
            self.refused.pop(target, None)
            self._swap(model, trigger)
            return ReloadResult("reloaded", model.version, target, f"now serving {target}")

    def _refuse_pointer(self, why: str, trigger: Trigger) -> ReloadResult:
        """CURRENT names no usable version. The poller reports each reason once, not per poll."""
        if trigger == "poll" and why == self.pointer_problem:
            serving = self.current.version if self.current else ""
            log.debug("still refusing CURRENT (trigger poll), serving %s: %s", serving, why)
            return ReloadResult("refused", serving, None, why)
        self.pointer_problem = why
        return self._refuse(None, why, trigger)

    def _refuse(self, target: str | None, why: str, trigger: Trigger) -> ReloadResult:
        serving = self.current.version if self.current else ""
        self.metrics.reloads.labels("refused", trigger).inc()
        retry = ""
        if target is not None:
            before = self.refused.get(target)
            attempts = before.attempts + 1 if before is not None else 1
            delay = min(RETRY_MAX_S, max(self.settings.reload_interval_s, 1.0) * 2**attempts)
            self.refused[target] = Refusal(why, attempts, self._clock() + delay)
            if self.settings.reload_interval_s > 0:
                retry = f" (refusal {attempts}; the poller retries in {delay:.0f} s)"
        log.error(
            "refused %s (trigger %s), still serving %s%s: %s",
            f"model version {target}" if target is not None else "CURRENT", trigger, serving,
            retry, why,
        )  # fmt: skip
        return ReloadResult("refused", serving, target, why)

    # -- background triggers ------------------------------------------------------------------

    def start(self) -> None:
        """Start the CURRENT poller and the SIGHUP handler (main thread only)."""
        interval = self.settings.reload_interval_s
        if interval > 0 and self._poller is None:
            self._poller = asyncio.create_task(self._poll(interval), name="multvae-reload-poll")
        loop = asyncio.get_running_loop()
        try:
            loop.add_signal_handler(signal.SIGHUP, self._on_sighup)
            self._sighup = True
        except (ValueError, RuntimeError, NotImplementedError, AttributeError):
            # Not the main thread (TestClient) or no SIGHUP (Windows): the other triggers remain.
            log.debug("SIGHUP reload not available in this thread/platform")

    def _on_sighup(self) -> None:
        log.info("SIGHUP: reloading CURRENT")
        task: asyncio.Task[object] = asyncio.create_task(self._reload_logged("sighup"))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _reload_logged(self, trigger: Trigger) -> None:
        # A background reload has nobody to raise to: log what reload() did not turn into a
        # refusal rather than leave a "Task exception was never retrieved" behind.
        try:
            await self.reload(trigger)
        except Exception:
            log.exception("reloading CURRENT (trigger %s) failed", trigger)

    async def _poll(self, interval: float) -> None:
        while True:
            await asyncio.sleep(interval)
            try:
                await self.reload("poll")
            except Exception:  # the poller must survive anything, e.g. an unreadable dir
                log.exception("polling CURRENT failed; will try again in %.1f s", interval)

    async def stop(self) -> None:
        if self._sighup:
            with contextlib.suppress(ValueError, RuntimeError):
                asyncio.get_running_loop().remove_signal_handler(signal.SIGHUP)
            self._sighup = False
        tasks: list[asyncio.Task[object] | asyncio.Task[None]] = [*self._tasks]
        if self._poller is not None:
            tasks.append(self._poller)
            self._poller = None
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
