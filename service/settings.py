"""Service settings, read from ``MULTVAE_*`` environment variables (or passed in by tests).

Built by the app factory, never at import time, so that importing the service has no side
effects and every test can hand the factory its own :class:`Settings`.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
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
    """Every knob of the online service; the README's Serving section has the table."""

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

    # Micro-batching: wait at most batch_wait_ms for more requests, up to batch_max_size rows.
    batch_wait_ms: float = Field(default=2.0, ge=0.0)
    batch_max_size: int = Field(default=64, ge=1)
    # Load shedding: above this many histories waiting for a forward pass, answer 503 at once
    # (with Retry-After) instead of letting the queue, and every request's latency, grow.
    max_pending: int = Field(default=1024, ge=1)
    # Threads inside one forward pass; None = every usable core. The event loop mostly waits
    # while a pass runs: on a quiet 2-core machine two threads doubled cache-miss throughput at
    # concurrency 32 (bench/RESULTS.md). On a box shared with other busy processes, 1 is better.
    torch_threads: int | None = Field(default=None, ge=1)

    # Cache: Redis when a URL is set, else an in-process LRU.
    redis_url: str | None = None
    cache_ttl_s: float = Field(default=300.0, gt=0.0)
    cache_max_entries: int = Field(default=100_000, ge=0)  # in-process LRU only; 0 = off
    cache_prefix: str = "multvae:rec"
    redis_timeout_ms: float = Field(default=100.0, gt=0.0)
    # After a Redis failure, skip Redis this long so a dead server costs one timeout, not one
    # per request.
    redis_breaker_s: float = Field(default=5.0, ge=0.0)

    # Hot reload: poll CURRENT this often (0 = only on SIGHUP or POST /admin/reload).
    reload_interval_s: float = Field(default=10.0, ge=0.0)
    warmup: bool = True
    gc_freeze: bool = True  # see service.app; tests that build many apps in one process opt out

    api_key: SecretStr | None = None
    log_level: str = "info"
    access_log: bool = True

    def inference_threads(self) -> int:
        if self.torch_threads is not None:
            return self.torch_threads
        return usable_cpus()

    @field_validator("redis_url", "api_key", mode="before")
    @classmethod
    def _empty_is_unset(cls, value: object) -> object:
        # MULTVAE_REDIS_URL= (empty) in a compose file means "no Redis", not a broken URL.
        if isinstance(value, str) and not value.strip():
            return None
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
