"""HTTP endpoints; each one is a thin adapter over :class:`service.pipeline.Pipeline`."""

from __future__ import annotations

import hmac
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.bodies import check_limits, parse
from service.errors import (
    AdminDisabledError,
    FieldError,
    InvalidRequestError,
    NotReadyError,
    ReloadRefusedError,
    UnauthorizedError,
)
from service.middleware import AccessInfo
from service.pipeline import Pipeline
from service.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorBody,
    ModelInfo,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
)

router = APIRouter()


# Dependencies are ``async def``: FastAPI runs plain ``def`` dependencies on a thread pool,
# two thread hops per request for what is a dictionary lookup.
async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise NotReadyError("the service is starting or stopping")
    return pipeline


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]


def _presented_key(request: Request) -> str | None:
    key = request.headers.get("x-api-key")
    if key is None:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and token:
            key = token.strip()
    return key


def _check_key(request: Request, expected: str) -> None:
    presented = _presented_key(request)
    # compare_digest: the time taken must not reveal how much of the key was right.
    if presented is None or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise UnauthorizedError(
            "missing or invalid API key: send it in the X-API-Key header "
            "or as Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )


async def authorized(request: Request) -> Pipeline:
    """The pipeline, once the API key (enforced only when MULTVAE_API_KEY is set) checks out.

    One dependency rather than two chained ones: FastAPI's dependency solving is a
    measurable share of a cache hit's cost.
    """
    pipeline = await get_pipeline(request)
    if pipeline.settings.api_key is not None:
        _check_key(request, pipeline.settings.api_key.get_secret_value())
    return pipeline


Authorized = Annotated[Pipeline, Depends(authorized)]


async def require_admin(request: Request, pipeline: PipelineDep) -> None:
    """Admin endpoints never run unauthenticated: without a key they are off."""
    if pipeline.settings.api_key is None:
        raise AdminDisabledError("admin endpoints are disabled: set MULTVAE_API_KEY to enable them")
    _check_key(request, pipeline.settings.api_key.get_secret_value())


StrictParam = Annotated[
    bool | None,
    Query(description="reject unknown history ids with a 422 (default: MULTVAE_STRICT)"),
]

ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503)
}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _access(request: Request) -> AccessInfo | None:
    return getattr(request.state, "access", None)


def _request_body(model: type[RecommendRequest] | type[BatchRequest]) -> dict[str, Any]:
    # The body is parsed by service.bodies (for precise 4xx answers), so describe it here.
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": model.model_json_schema()}},
        }
    }


@router.post(
    "/recommend",
    responses={200: {"model": RecommendResponse}, **ERRORS},
    openapi_extra=_request_body(RecommendRequest),
)
async def recommend(request: Request, pipeline: Authorized, strict: StrictParam = None) -> Response:
    """Top-n items for one click history, history and exclude never returned."""
    settings = pipeline.settings
    body = await parse(request, RecommendRequest, settings)
    errors = check_limits(body, settings)
    if errors:
        raise InvalidRequestError.of(errors)
    strict_mode = settings.strict if strict is None else strict
    results = await pipeline.recommend([body], strict_mode, [""], _access(request))
    return _json(results[0])


@router.post(
    "/recommend/batch",
    responses={200: {"model": BatchResponse}, **ERRORS},
    openapi_extra=_request_body(BatchRequest),
)
async def recommend_batch(
    request: Request, pipeline: Authorized, strict: StrictParam = None
) -> Response:
    """Many histories in one forward pass, answered in order."""
    settings = pipeline.settings
    body = await parse(request, BatchRequest, settings)
    if len(body.requests) > settings.max_batch_requests:
        raise InvalidRequestError.of(
            [
                FieldError(
                    "requests",
                    f"at most {settings.max_batch_requests} requests per batch "
                    f"(MULTVAE_MAX_BATCH_REQUESTS), got {len(body.requests)}",
                )
            ]
        )
    prefixes = [f"requests[{i}]." for i in range(len(body.requests))]
    errors = [
        error
        for r, p in zip(body.requests, prefixes, strict=True)
        for error in check_limits(r, settings, p)
    ]
    if errors:
        raise InvalidRequestError.of(errors)
    strict_mode = settings.strict if strict is None else strict
    results = await pipeline.recommend(body.requests, strict_mode, prefixes, _access(request))
    return _json({"results": results})


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(request: Request) -> dict[str, str]:
    """A model is loaded and inference works; the cache's state does not decide readiness."""
    pipeline = await get_pipeline(request)
    if pipeline.batcher.broken is not None:
        raise NotReadyError(pipeline.batcher.broken)
    return {"status": "ready", "model_version": pipeline.model().version}


@router.get("/model", response_model=ModelInfo, responses={503: {"model": ErrorBody}})
async def model_info(pipeline: PipelineDep) -> Response:
    """The served model version, its size, device and offline metrics."""
    return _json(pipeline.model().describe())


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/admin/reload",
    dependencies=[Depends(require_admin)],
    responses={200: {"model": ReloadResponse}, 409: {"model": ErrorBody}},
)
async def admin_reload(pipeline: PipelineDep) -> Response:
    """Load the version CURRENT names now; 409 when it is refused (the old one keeps serving)."""
    result = await pipeline.registry.reload("admin")
    if result.outcome == "refused":
        what = f"version {result.requested}" if result.requested is not None else "CURRENT"
        raise ReloadRefusedError(f"{what} refused, still serving {result.version}: {result.detail}")
    return _json({"outcome": result.outcome, "version": result.version, "detail": result.detail})
