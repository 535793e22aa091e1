"""The FastAPI app factory and its lifespan.

    uvicorn service.app:create_app --factory      # settings from MULTVAE_* variables
    multvae serve --model-dir models/              # the same, with command-line overrides

The lifespan resolves the device, loads and warms up the version ``CURRENT`` names (failing
startup when it cannot), opens the cache and starts the micro-batcher and the reload poller.
"""

from __future__ import annotations

import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI

from multvae import __version__
from multvae.device import resolve_device
from service.batching import MicroBatcher
from service.cache import GuardedCache, build_cache
from service.errors import install_handlers
from service.logs import configure_logging
from service.metrics import Metrics
from service.middleware import RequestMiddleware
from service.pipeline import Pipeline
from service.registry import ModelRegistry
from service.routes import REQUEST_SCHEMAS, recommend_router, router
from service.settings import Settings

log = logging.getLogger("multvae.app")


@asynccontextmanager
async def lifespan(app: FastAPI) -> AsyncIterator[None]:
    settings: Settings = app.state.settings
    metrics: Metrics = app.state.metrics
    if not logging.getLogger().handlers:
        # Started as `uvicorn service.app:create_app --factory`: uvicorn configures only its
        # own loggers, and the access log would go nowhere. `multvae serve` configures first.
        configure_logging(settings.log_level)
    torch.set_num_threads(settings.inference_threads())
    device = resolve_device(settings.device)
    registry = ModelRegistry(settings, device, metrics)
    await registry.load_initial()
    backend = build_cache(
        settings.redis_url, settings.cache_max_entries, settings.redis_timeout_ms / 1000,
        settings.redis_pool_size(), settings.redis_health_check_s,
    )  # fmt: skip
    cache = GuardedCache(backend, metrics, settings.redis_breaker_s)
    batcher = MicroBatcher(
        metrics, settings.batch_max_size, settings.batch_wait_ms / 1000, settings.max_pending
    )
    batcher.start()
    registry.start()
    app.state.pipeline = Pipeline(settings, metrics, registry, cache, batcher)
    if settings.gc_freeze:
        # The ~200k objects of torch, FastAPI and the first model live as long as the process;
        # moving them out of the cyclic collector's reach makes a full collection cost ~0
        # instead of ~100 ms (a p99 spike). Only at startup: later models stay collectable.
        gc.freeze()
    log.info(
        "ready: model dir %s, device %s (%d torch threads), cache %s, batching %s",
        settings.model_dir, device, torch.get_num_threads(), cache.name,
        f"up to {settings.batch_max_size} rows / {settings.batch_wait_ms} ms"
        if batcher.enabled else "off",
    )  # fmt: skip
    try:
        yield
    finally:
        app.state.pipeline = None
        await registry.stop()
        await batcher.stop()
        await cache.close()


def create_app(settings: Settings | None = None) -> FastAPI:
    """A new app; ``settings`` default to the environment (``MULTVAE_*``)."""
    settings = settings if settings is not None else Settings()
    metrics = Metrics()
    app = FastAPI(
        title="multvae-rec",
        version=__version__,
        summary="Mult-VAE fold-in recommendations: click history in, top-N items out.",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.pipeline = None
    install_handlers(app)
    app.include_router(recommend_router)
    app.include_router(router)
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        # The recommend bodies are parsed by hand, so FastAPI does not know their models.
        spec = generate()  # built once, then cached by FastAPI
        spec.setdefault("components", {}).setdefault("schemas", {}).update(REQUEST_SCHEMAS)
        return spec

    app.openapi = openapi  # type: ignore[method-assign]
    app.add_middleware(RequestMiddleware, metrics=metrics, log_access=settings.access_log)
    return app
