"""The FastAPI app factory and its lifespan.

    uvicorn service.app:create_app --factory      # settings from MULTVAE_* variables
    multvae serve --model-dir models/              # the same, with command-line overrides

The lifespan resolves the device, loads and warms up the version ``CURRENT`` names (failing
startup when it cannot), opens the cache and starts the micro-batcher and the reload poller.
"""

from __future__ import annotations

import gc
import logging
import typing
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException

from multvae import __version__
from multvae.device import resolve_device
from service.batching import MicroBatcher
from service.cache import GuardedCache, build_cache
from service.errors import (
    InvalidRequestError,
    MalformedJSONError,
    NotReadyError,
    OverloadedError,
    ServiceError,
    UnsupportedMediaError,
    describe,
)
from service.logs import configure_logging
from service.metrics import Exposition, Metrics
from service.middleware import RequestMiddleware
from service.pipeline import Pipeline
from service.registry import ModelRegistry
from service.routes import (
    check_key,
    keyed,
    metrics_router,
    presented_key,
    recommend_router,
    reject_duplicate_keys,
    require_key,
    router,
)
from service.schemas import RecommendRequest
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
        metrics, settings.batch_max_size, settings.batch_wait_ms / 1000, settings.max_pending,
        max_pending_share=settings.max_pending_share,
    )  # fmt: skip
    batcher.start()
    registry.start()
    app.state.pipeline = Pipeline(settings, metrics, registry, cache, batcher)
    if settings.gc_freeze:
        # The ~200k objects of torch, FastAPI and the first model live as long as the process;
        # moving them out of the cyclic collector's reach makes a full collection cost ~0
        # instead of ~100 ms (a p99 spike). Only at startup: later models stay collectable.
        gc.freeze()
    log.info(
        "ready: model dir %s, device %s (%d torch threads), cache %s, batches of up to %d rows"
        " (a lone request waits %s ms for company), %s",
        settings.model_dir, device, torch.get_num_threads(), cache.name,
        settings.batch_max_size, settings.batch_wait_ms,
        "API key required on /recommend*, /metrics and /admin/*" if settings.api_key
        else "authentication OFF (MULTVAE_API_KEY unset): /recommend* and /metrics are open, "
        "/admin/* is disabled",
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
        # Served by service.routes instead, so that the request metrics name them.
        openapi_url=None,
        docs_url=None,
        redoc_url=None,
    )
    app.state.settings = settings
    app.state.metrics = metrics
    app.state.exposition = Exposition(metrics.registry)
    app.state.pipeline = None
    install_handlers(app)
    app.include_router(recommend_router, dependencies=keyed(settings))
    app.include_router(metrics_router, dependencies=keyed(settings))
    app.include_router(router)
    app.add_middleware(
        RequestMiddleware,
        metrics=metrics,
        log_access=settings.access_log,
        max_body_bytes=settings.max_body_bytes,
        body_timeout_s=settings.body_timeout_s,
    )
    return app


# 503s counted in multvae_rejected_total, by reason.
REJECTED: dict[type[ServiceError], str] = {
    OverloadedError: "overloaded",
    NotReadyError: "not_ready",
}


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


def _body_model(request: Request) -> type[BaseModel]:
    """The pydantic model the matched endpoint takes as its body."""
    endpoint = getattr(request.scope.get("route"), "endpoint", None)
    for hint in typing.get_type_hints(endpoint).values() if endpoint else ():
        if isinstance(hint, type) and issubclass(hint, BaseModel):
            return hint
    return RecommendRequest


def _protected(request: Request) -> bool:
    route = request.scope.get("route")
    return any(d.dependency is require_key for d in getattr(route, "dependencies", ()))


def _json(status: int, body: dict[str, Any], headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body, status_code=status, headers=headers)


def install_handlers(app: FastAPI) -> None:
    """Render every error as JSON with a ``detail`` that says what is accepted."""

    async def service_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ServiceError)
        # Both are 503s in the request metrics; an operator needs to tell shedding (scale
        # out) from a service without a working model (see its log and /readyz). A 503 from
        # /readyz is the probe's answer, not a refused request.
        reason = REJECTED.get(type(exc))
        if reason is not None and getattr(request.scope.get("route"), "path", "") != "/readyz":
            request.app.state.metrics.rejected.labels(reason).inc()
        return _json(exc.status, exc.body(), exc.headers)

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        # FastAPI parses the body before it solves dependencies, and validates it before the
        # route runs: check the key first, so an unauthenticated client learns nothing about
        # what a valid body is, and refuse a repeated key as such whatever else is wrong (as
        # the route's ``serving`` would).
        try:
            if _protected(request):
                check_key(request.app.state.settings, await presented_key(request))
            reject_duplicate_keys(await request.body())
        except ServiceError as refused:
            return await service_error(request, refused)
        errors = list(exc.errors())
        if any(e["type"] == "json_invalid" for e in errors):
            error = next(e for e in errors if e["type"] == "json_invalid")
            where = error["loc"][1] if len(error["loc"]) > 1 else "?"
            why = error.get("ctx", {}).get("error", "invalid JSON")
            failure: ServiceError = MalformedJSONError(f"malformed JSON: {why} at position {where}")
        elif any(e["loc"][:1] == ("body",) for e in errors) and not _is_json(
            request.headers.get("content-type", "")
        ):
            got = request.headers.get("content-type", "")[:80] or "none"
            failure = UnsupportedMediaError(
                f"Content-Type must be application/json, got {got!r}: send the header "
                "'Content-Type: application/json' (curl: -H 'Content-Type: application/json', "
                "or --json instead of -d)"
            )
        elif any(e["type"] == "missing" and tuple(e["loc"]) == ("body",) for e in errors):
            failure = MalformedJSONError("the body is empty; send a JSON object")
        else:
            top = tuple(_body_model(request).model_fields)
            single = tuple(RecommendRequest.model_fields)
            described = []
            for e in errors:
                loc = tuple(e["loc"])
                loc = loc[1:] if loc[:1] == ("body",) else loc  # "items[3]", not "body.items[3]"
                described.append(describe({**e, "loc": loc}, single if len(loc) > 1 else top))
            failure = InvalidRequestError.of(described)
        return _json(failure.status, failure.body())

    async def http_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, HTTPException)
        headers = dict(exc.headers or {})
        if exc.status_code == 404:
            detail = f"{request.url.path[:200]} is not an endpoint; see /docs for the API"
        elif exc.status_code == 405:
            allowed = headers.get("allow", headers.get("Allow", "?"))
            detail = f"method {request.method} is not allowed here; allowed: {allowed}"
        else:
            detail = str(exc.detail)
        return _json(exc.status_code, {"detail": detail}, headers)

    app.add_exception_handler(ServiceError, service_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(HTTPException, http_error)
