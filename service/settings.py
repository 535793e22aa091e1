"""Service settings, read from ``MULTVAE_*`` environment variables (or passed in by tests).

Built by the app factory, never at import time, so that importing the service has no side
effects and every test can hand the factory its own :class:`Settings`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Literal
from urllib.parse import urlsplit

from pydantic import Field, SecretStr, ValidationInfo, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


def usable_cpus(cgroup: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 quota (containers).

    ``os.cpu_count()`` reports the host's CPUs even when a container may use two of them.
    """
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    try:
        quota, period = cgroup.read_text().split()[:2]
        if quota != "max":
            cpus = min(cpus, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota visible: the affinity is the limit
    return cpus


class Settings(BaseSettings):
    """Every knob of the online service; docs/serving.md has the table."""

    model_config = SettingsConfigDict(env_prefix="MULTVAE_", extra="ignore", frozen=True)

    model_dir: Path = Path("models")
    device: str = "auto"

    # Request limits: bounded so one request cannot occupy the model for long.
    max_n: int = Field(default=100, ge=1)
    max_history: int = Field(default=1000, ge=1)
    max_exclude: int = Field(default=1000, ge=0)
    max_candidates: int = Field(default=10_000, ge=1)
    max_batch_requests: int = Field(default=100, ge=1)
    max_body_bytes: int = Field(default=1_000_000, ge=1024)
    strict: bool = False  # default for requests that do not say ?strict=

    # Connection limits (every connection, before any authentication). `multvae serve` runs
    # uvicorn's h11 protocol by default, which refuses a request head (request line +
    # headers) above max_header_bytes with a 400 at once; keep_alive_s closes a connection
    # idle between requests; a request body that stops arriving for body_timeout_s is
    # answered 408. http="httptools" parses faster but bounds no head (uvicorn has no limit
    # for it): only behind a proxy that bounds request heads (docs/serving.md).
    http: Literal["h11", "httptools"] = "h11"
    max_header_bytes: int = Field(default=16_384, ge=1024)
    keep_alive_s: int = Field(default=5, ge=1)
    body_timeout_s: float = Field(default=10.0, gt=0.0)
    # On SIGTERM: stop accepting, let requests in flight finish for this long, then answer
    # what still runs (e.g. an upload in progress) 503. Below the orchestrator's grace period.
    shutdown_grace_s: int = Field(default=10, ge=1)

    # Micro-batching: a pass takes what queued, up to batch_max_size rows; a lone request waits
    # at most batch_wait_ms for company.
    batch_wait_ms: float = Field(default=2.0, ge=0.0)
    batch_max_size: int = Field(default=64, ge=1)
    # Load shedding: above this many histories waiting for a forward pass, answer 503 at once
    # (with Retry-After) instead of letting the queue, and every request's latency, grow.
    max_pending: int = Field(default=1024, ge=1)
    # Fair share: one client (API key presented, else peer address) may hold at most this
    # fraction of max_pending, so one heavy caller is shed before everyone else is.
    max_pending_share: float = Field(default=0.25, gt=0.0, le=1.0)
    # Threads inside one forward pass; None = every usable core. The event loop mostly waits
    # while a pass runs: on a quiet 2-core machine two threads doubled cache-miss throughput at
    # concurrency 32 (bench/RESULTS.md). On a box shared with other busy processes, 1 is better.
    torch_threads: int | None = Field(default=None, ge=1)

    # Top-N: "exact" scores every item (the default); "faiss" takes candidates from an
    # inner-product index over the output layer (built when a version loads) and scores them
    # exactly. Needs the faiss extra. Knobs: multvae.topn_index.IndexSpec, docs/serving.md.
    topn_index: Literal["exact", "faiss"] = "exact"
    faiss_index: str = "HNSW32,Flat"
    faiss_metric: Literal["inner_product", "l2"] = "inner_product"
    faiss_search: str = "efSearch=128"
    faiss_margin: int = Field(default=100, ge=0)

    # Cache: Redis when a URL is set, else an in-process LRU.
    redis_url: str | None = None
    cache_ttl_s: float = Field(default=300.0, gt=0.0)
    cache_max_entries: int = Field(default=100_000, ge=0)  # in-process LRU only; 0 = off
    cache_prefix: str = "multvae:rec"
    # With Redis: entries this process keeps a copy of, checked before Redis; 0 = off.
    near_cache_entries: int = Field(default=10_000, ge=0)
    redis_timeout_ms: float = Field(default=100.0, gt=0.0)
    # After Redis could not be reached, skip it and let one request probe it every this many
    # seconds, so a dead server costs one timeout per period, not one per request.
    redis_breaker_s: float = Field(default=1.0, ge=0.0)
    # Connections to Redis; None = redis_pool_size()'s default. Beyond it an operation waits
    # up to redis_timeout_ms for a free connection (then it is a miss, never "Redis down").
    redis_max_connections: int | None = Field(default=None, ge=1)
    # PING a pooled connection idle this long before using it (0 = never).
    redis_health_check_s: float = Field(default=10.0, ge=0.0)

    # Hot reload: poll CURRENT this often (0 = only on SIGHUP or POST /admin/reload).
    reload_interval_s: float = Field(default=10.0, ge=0.0)
    gc_freeze: bool = True  # see service.app; tests that build many apps in one process opt out

    api_key: SecretStr | None = None
    log_level: str = "info"
    access_log: bool = True

    def redis_pool_size(self) -> int:
        """One connection per history the queue admits: a request (single or batch) uses one
        connection per round trip, so every admitted request can reach Redis at once. The
        pool opens connections only as concurrency needs them."""
        if self.redis_max_connections is not None:
            return self.redis_max_connections
        return self.max_pending

    def inference_threads(self) -> int:
        if self.torch_threads is not None:
            return self.torch_threads
        return usable_cpus()

    @field_validator("redis_url", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # MULTVAE_REDIS_URL= (empty) in a compose file means "no Redis", not a broken URL.
        if isinstance(value, str) and not value.strip():
            return None
        return value

    @field_validator("api_key", mode="before")
    @classmethod
    def _usable_key(cls, value: object) -> object:
        # Unset or empty (MULTVAE_API_KEY= in a compose file) means "auth off", which start-up
        # logs. Whitespace only is never a deliberate choice (a typo, a template that rendered
        # a space): refuse it rather than turn auth off silently.
        if isinstance(value, SecretStr):
            value = value.get_secret_value()
        if value == "":
            return None
        if isinstance(value, str):
            if not value.strip():
                raise ValueError(
                    "the API key is empty or blank: set a key (surrounding whitespace is "
                    "ignored) or unset MULTVAE_API_KEY to run without authentication"
                )
            return value.strip()
        return value

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        # Checked here, so a typo is one line at start-up rather than a lifespan traceback.
        if value is None:
            return None
        parts = urlsplit(value.strip())
        if parts.scheme not in ("redis", "rediss", "unix"):
            raise ValueError(
                "a Redis URL must start with redis://, rediss:// or unix:// "
                "(e.g. redis://redis:6379/0)"
            )
        try:
            port = parts.port
        except ValueError:
            port = -1
        if parts.scheme != "unix" and (not parts.hostname or port == -1):
            raise ValueError("a Redis URL needs a host and, if any, a numeric port")
        db = parts.path.lstrip("/")
        if parts.scheme != "unix" and db and not db.isdigit():
            raise ValueError(f"the database after the host must be a number, not {db!r}")
        return value.strip()

    @field_validator("topn_index")
    @classmethod
    def _faiss_installed(cls, value: str) -> str:
        if value == "faiss":
            from multvae.topn_index import require_faiss

            try:
                require_faiss()
            except ImportError as exc:
                raise ValueError(str(exc)) from None
        return value

    @field_validator("faiss_search")
    @classmethod
    def _faiss_parameters(cls, value: str, info: ValidationInfo) -> str:
        # Both strings are checked at start-up, when faiss is on (fields after topn_index).
        if info.data.get("topn_index") == "faiss":
            from multvae.topn_index import IndexSpec

            metric = info.data.get("faiss_metric", "inner_product")
            IndexSpec(info.data.get("faiss_index", ""), value, metric=metric).check()
        return value

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        value = value.strip().lower()
        if value not in ("critical", "error", "warning", "info", "debug"):
            raise ValueError(
                f"log level {value!r} is not one of critical, error, warning, info, debug"
            )
        return value
