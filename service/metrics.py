"""Prometheus metrics, namespace ``multvae``, on a registry owned by one app instance.

A registry per app (not the global default) lets tests build many apps in one process and
read exact counts. Labels stay bounded: routes are templates, never raw paths; the model
version has one live series at a time; no user or item id is ever a label.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

NAMESPACE = "multvae"

# Resolve below 10 ms, where cache hits and small batches live, up to 2.5 s.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.002, 0.003, 0.005, 0.0075, 0.01, 0.015, 0.025, 0.05,
    0.1, 0.25, 0.5, 1.0, 2.5,
)  # fmt: skip
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)


class Metrics:
    """Every metric the service exports; one instance per app."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "http_requests",
            "HTTP requests answered, by route template, method and status.",
            ["route", "method", "status"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.latency = Histogram(
            "http_request_duration_seconds",
            "Time from the request's arrival to the end of its response.",
            ["route", "method", "status"],
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.cache_hits = Counter(
            "cache_hits", "Recommendations answered from the cache.", namespace=NAMESPACE,
            registry=r,
        )  # fmt: skip
        self.cache_misses = Counter(
            "cache_misses", "Cache lookups that found nothing.", namespace=NAMESPACE, registry=r
        )
        self.cache_errors = Counter(
            "cache_errors",
            "Cache operations that failed or timed out and were bypassed.",
            ["operation"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.cache_bypassed = Counter(
            "cache_bypassed",
            "Cache operations skipped because the cache failed recently (circuit open).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.batch_size = Histogram(
            "batch_size",
            "Histories folded in per forward pass.",
            namespace=NAMESPACE,
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.batch_wait = Histogram(
            "batch_wait_seconds",
            "Time a request waited in the micro-batch queue before its forward pass began.",
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.inference = Histogram(
            "inference_seconds",
            "Time of one forward pass (fold-in, masking, top-n) in the worker thread.",
            namespace=NAMESPACE,
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.model_info = Gauge(
            "model_info",
            "The model version being served (value 1; one series at a time).",
            ["version", "device"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.model_items = Gauge(
            "model_items", "Items the served model ranks.", namespace=NAMESPACE, registry=r
        )
        self.model_loaded = Gauge(
            "model_loaded_timestamp_seconds",
            "Unix time the served model was swapped in.",
            namespace=NAMESPACE,
            registry=r,
        )
        self.reloads = Counter(
            "model_reloads",
            "Model load attempts by outcome (success, refused) and trigger.",
            ["outcome", "trigger"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.unknown_items = Counter(
            "unknown_items",
            "History item ids the served model does not know (ignored, or rejected in strict).",
            namespace=NAMESPACE,
            registry=r,
        )
        self.fallbacks = Counter(
            "fallbacks",
            "Recommendations answered by a fallback ranking instead of the model.",
            ["kind"],
            namespace=NAMESPACE,
            registry=r,
        )
        self.rejected = Counter(
            "rejected",
            "Requests refused with a 503, by reason: overloaded (load shedding: the model's "
            "queue is full) or not_ready (no model, inference worker down, shutting down).",
            ["reason"],
            namespace=NAMESPACE,
            registry=r,
        )
        self._served: tuple[str, str] | None = None

    def set_model(self, version: str, device: str, n_items: int, loaded_at: float) -> None:
        """Point the info gauge at a new version, dropping the old series."""
        if self._served is not None:
            self.model_info.remove(*self._served)
        self._served = (version, device)
        self.model_info.labels(version, device).set(1)
        self.model_items.set(n_items)
        self.model_loaded.set(loaded_at)


class Exposition:
    """``/metrics``' text, rendered on a worker thread and at most once per ``max_age_s``.

    Rendering walks every series under the registry's locks; on the event loop it would
    stall every request for as long, and clients scraping in a loop would multiply that.
    Concurrent scrapes share one render, and a scrape within ``max_age_s`` of the last render
    gets its text: Prometheus scrapes every few seconds, so it always sees fresh counters.
    """

    def __init__(
        self,
        registry: CollectorRegistry,
        max_age_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = registry
        self.max_age_s = max_age_s
        self.clock = clock
        self.renders = 0
        self._text = b""
        self._rendered_at = -float("inf")
        self._lock = asyncio.Lock()

    async def render(self) -> bytes:
        async with self._lock:
            if self.clock() - self._rendered_at >= self.max_age_s:
                self._text = await asyncio.to_thread(generate_latest, self.registry)
                self._rendered_at = self.clock()
                self.renders += 1
            return self._text
