"""HTTP endpoints; each one is a thin adapter over :class:`service.pipeline.Pipeline`."""

from __future__ import annotations

import hmac
from collections.abc import Callable, Coroutine
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Request, Response
from fastapi.routing import APIRoute
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic.json_schema import models_json_schema

from service.bodies import check_limits, parse
from service.errors import (
    AdminDisabledError,
    FieldError,
    InvalidRequestError,
    NotReadyError,
    ReloadRefusedError,
    UnauthorizedError,
    shown,
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


class DirectRoute(APIRoute):
    """A route whose endpoint takes the request and returns a finished response.

    FastAPI's own handler resolves dependencies, validates parameters and serialises the
    return value on every request; the recommend endpoints do all of that by hand (precise
    4xx answers, see service.bodies), so their handler only calls them. They stay APIRoutes,
    documented in OpenAPI through ``openapi_extra``. This is the ``get_route_handler`` hook
    FastAPI documents for custom route classes. Dependencies would never run here, so a route
    that declares any is refused; app-wide ones (``FastAPI(dependencies=...)``) would be
    skipped too, and the app declares none.
    """

    def __init__(self, path: str, endpoint: Callable[..., Any], **kwargs: Any) -> None:
        super().__init__(path, endpoint, **kwargs)
        if self.dependant.dependencies:
            raise TypeError(
                f"{path}: a DirectRoute endpoint authenticates and parses by hand; "
                "its dependencies would never run"
            )

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        endpoint: Callable[[Request], Coroutine[Any, Any, Response]] = self.endpoint

        async def handle(request: Request) -> Response:
            return await endpoint(request)

        return handle


router = APIRouter()
# The hot path: endpoints of signature (Request) -> Response, served by DirectRoute.
recommend_router = APIRouter(route_class=DirectRoute)


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

    Called directly by the recommend endpoints rather than through ``Depends``: FastAPI's
    dependency solving was a quarter of a cache hit's in-process cost (cProfile).
    """
    pipeline = await get_pipeline(request)
    if pipeline.settings.api_key is not None:
        _check_key(request, pipeline.settings.api_key.get_secret_value())
    return pipeline


async def require_admin(request: Request, pipeline: PipelineDep) -> None:
    """Admin endpoints never run unauthenticated: without a key they are off."""
    if pipeline.settings.api_key is None:
        raise AdminDisabledError("admin endpoints are disabled: set MULTVAE_API_KEY to enable them")
    _check_key(request, pipeline.settings.api_key.get_secret_value())


# The spellings pydantic accepts for a boolean query parameter, which this one used to be.
_TRUE = frozenset({"true", "t", "1", "yes", "y", "on"})
_FALSE = frozenset({"false", "f", "0", "no", "n", "off"})
STRICT_PARAMETER = {
    "name": "strict",
    "in": "query",
    "required": False,
    "schema": {"type": "boolean"},
    "description": "reject unknown history ids with a 422 (default: MULTVAE_STRICT)",
}


def _strict(request: Request, default: bool) -> bool:
    """The ``strict`` query parameter, read by hand for the same reason as :func:`authorized`."""
    if not request.scope.get("query_string"):
        return default
    value = request.query_params.get("strict")
    if value is None:
        return default
    if value.lower() in _TRUE:
        return True
    if value.lower() in _FALSE:
        return False
    raise InvalidRequestError.of(
        [FieldError("query.strict", f"expected true or false, got {shown(value)}")]
    )


ERRORS: dict[int | str, dict[str, Any]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503)
}


def _json(body: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(body), status_code=status, media_type="application/json")


def _access(request: Request) -> AccessInfo | None:
    return getattr(request.state, "access", None)


COMPONENTS = "#/components/schemas/{model}"
# The request models, in the form OpenAPI's components take them (references between them
# point into the components, not into a schema's own $defs).
REQUEST_SCHEMAS: dict[str, Any] = models_json_schema(
    [(RecommendRequest, "validation"), (BatchRequest, "validation")], ref_template=COMPONENTS
)[1]["$defs"]


def _request_body(model: type[RecommendRequest] | type[BatchRequest]) -> dict[str, Any]:
    # The body and the query are parsed by hand (service.bodies gives precise 4xx answers, and
    # skipping dependency solving halves FastAPI's share of a hit), so describe them here;
    # service.app adds REQUEST_SCHEMAS to the document's components.
    return {
        "parameters": [STRICT_PARAMETER],
        "requestBody": {
            "required": True,
            "content": {
                "application/json": {"schema": {"$ref": COMPONENTS.format(model=model.__name__)}}
            },
        },
    }


@recommend_router.post(
    "/recommend",
    responses={200: {"model": RecommendResponse}, **ERRORS},
    openapi_extra=_request_body(RecommendRequest),
)
async def recommend(request: Request) -> Response:
    """Top-n items for one click history, history and exclude never returned."""
    pipeline = await authorized(request)
    settings = pipeline.settings
    strict_mode = _strict(request, settings.strict)
    body = await parse(request, RecommendRequest, settings)
    errors = check_limits(body, settings)
    if errors:
        raise InvalidRequestError.of(errors)
    results = await pipeline.recommend([body], strict_mode, [""], _access(request))
    return _json(results[0])


@recommend_router.post(
    "/recommend/batch",
    responses={200: {"model": BatchResponse}, **ERRORS},
    openapi_extra=_request_body(BatchRequest),
)
async def recommend_batch(request: Request) -> Response:
    """Many histories in one forward pass, answered in order."""
    pipeline = await authorized(request)
    settings = pipeline.settings
    strict_mode = _strict(request, settings.strict)
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
