"""HTTP endpoints: plain FastAPI routes whose bodies and queries FastAPI and pydantic validate,
and whose pipeline and API-key check are ``Annotated`` dependencies (the recommend routes':
:func:`serving`, and :func:`keyed` when a key is configured)."""

from __future__ import annotations

import contextlib
import hmac
import importlib.resources
import json
from collections import Counter
from pathlib import Path
from typing import Annotated, Any

import orjson
from fastapi import APIRouter, Depends, Query, Request, Response, Security
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import FileResponse, HTMLResponse, JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException

from multvae import recommend
from multvae.errors import UnknownItemError
from multvae.recommend import Recommendation, Recommender
from service.errors import (
    AdminDisabledError,
    FieldError,
    InvalidRequestError,
    MalformedJSONError,
    NotReadyError,
    ReloadRefusedError,
    UnauthorizedError,
    shown,
)
from service.metrics import Exposition
from service.middleware import AccessInfo
from service.pipeline import Answer, Pipeline, UnknownItemsError
from service.schemas import (
    BatchRequest,
    BatchResponse,
    ErrorBody,
    ModelInfo,
    RecommendRequest,
    RecommendResponse,
    ReloadResponse,
    ScoredItem,
    SimilarRequest,
    SimilarResponse,
)
from service.settings import Settings

API_KEY = APIKeyHeader(name="X-API-Key", auto_error=False, description="the API key")
BEARER = HTTPBearer(auto_error=False, description="the API key as a bearer token")


# Dependencies are ``async def``: FastAPI runs plain ``def`` dependencies on a thread pool.
async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise NotReadyError("the service is starting or stopping")
    return pipeline


PipelineDep = Annotated[Pipeline, Depends(get_pipeline)]
ApiKey = Annotated[str | None, Security(API_KEY)]
BearerKey = Annotated[HTTPAuthorizationCredentials | None, Security(BEARER)]


def check_key(settings: Settings, presented: str | None) -> None:
    """Raise 401 unless ``presented`` is the configured key (when one is configured)."""
    if settings.api_key is None:
        return
    expected = settings.api_key.get_secret_value()
    # compare_digest: the time taken must not reveal how much of the key was right.
    if presented is None or not hmac.compare_digest(presented.encode(), expected.encode()):
        raise UnauthorizedError(
            "missing or invalid API key: send it in the X-API-Key header "
            "or as Authorization: Bearer <key>",
            headers={"WWW-Authenticate": "Bearer"},
        )


def _presented(key: str | None, bearer: HTTPAuthorizationCredentials | None) -> str | None:
    """The key a request carries: X-API-Key, else the bearer token; both trimmed (HTTP drops
    a header value's surrounding whitespace), an empty value counts as absent."""
    for value in (key, bearer.credentials if bearer is not None else None):
        if value is not None and value.strip():
            return value.strip()
    return None


async def presented_key(request: Request) -> str | None:
    """The key a request carries, in X-API-Key or as a bearer token."""
    return _presented(await API_KEY(request), await BEARER(request))


# The key checks read the settings from the app rather than through a dependency of their
# own: every dependant costs FastAPI work per request.
async def require_key(request: Request, key: ApiKey, bearer: BearerKey) -> None:
    """The API key, enforced only when MULTVAE_API_KEY is set."""
    check_key(request.app.state.settings, _presented(key, bearer))


async def require_admin(request: Request, key: ApiKey, bearer: BearerKey) -> None:
    """Admin endpoints never run unauthenticated: without a key they are off."""
    settings: Settings = request.app.state.settings
    if settings.api_key is None:
        raise AdminDisabledError("admin endpoints are disabled: set MULTVAE_API_KEY to enable them")
    check_key(settings, _presented(key, bearer))


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise MalformedJSONError(
                f"duplicate key {shown(key)} in a JSON object: send each key once (parsers "
                "disagree on which copy wins, so a proxy could see another request)"
            )
        seen[key] = value
    return seen


def reject_duplicate_keys(body: bytes) -> None:
    """400 for a body whose objects repeat a key: ``{"items": [1], "items": [2]}``.

    FastAPI has parsed the body already (the last copy wins); this second, strict pass over
    the same bytes refuses what that parse silently resolved.
    """
    if body:
        with contextlib.suppress(ValueError):  # not JSON at all: FastAPI has answered that
            json.loads(body, object_pairs_hook=_unique_keys)


# One dependant for the recommend routes (FastAPI solves every dependant of a route on every
# request, and these are the hot path); their key check is a dependency that the app adds
# only when a key is configured (``keyed``).
async def serving(request: Request) -> Pipeline:
    """The pipeline, once the body is known to repeat no JSON key."""
    reject_duplicate_keys(await request.body())
    return await get_pipeline(request)


ServingDep = Annotated[Pipeline, Depends(serving)]


Strict = Annotated[
    bool | None,
    Query(description="reject unknown history ids with a 422 (default: MULTVAE_STRICT)"),
]

ERRORS: dict[int | str, dict[str, type[ErrorBody]]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503)
}

router = APIRouter()
# The recommend endpoints and /metrics need the API key when one is configured: the app adds
# ``keyed`` to them then (and OpenAPI documents the key); without a key they are open. app.py
# checks the key before any body error too, so an unauthenticated client learns nothing
# about what a valid body is.
recommend_router = APIRouter(responses=ERRORS)
metrics_router = APIRouter()


def keyed(settings: Settings) -> list[Any]:
    """The dependencies of the routes that need the API key when one is configured."""
    return [Depends(require_key)] if settings.api_key is not None else []


def check_limits(
    request: RecommendRequest | SimilarRequest, settings: Settings, prefix: str = ""
) -> list[FieldError]:
    """Configured bounds and duplicate ids; an empty list when the request is acceptable."""
    errors: list[FieldError] = []
    if request.n > settings.max_n:
        message = f"must be <= {settings.max_n} (MULTVAE_MAX_N), got {request.n}"
        errors.append(FieldError(f"{prefix}n", message))
    history = request.items if isinstance(request, RecommendRequest) else []
    for name, got, limit, variable in (
        ("items", len(history), settings.max_history, "MULTVAE_MAX_HISTORY"),
        ("exclude", len(request.exclude), settings.max_exclude, "MULTVAE_MAX_EXCLUDE"),
        ("candidates", len(request.candidates or ()), settings.max_candidates,
         "MULTVAE_MAX_CANDIDATES"),
    ):  # fmt: skip
        if got > limit:
            message = f"at most {limit} item ids are accepted ({variable}), got {got}"
            errors.append(FieldError(f"{prefix}{name}", message))
    # A history is a set of clicks; a repeated id usually means the client sends events or
    # counts where the model expects distinct items, so say so instead of guessing.
    if len(set(history)) < len(history):
        repeated = [item for item, count in Counter(history).items() if count > 1]
        shown = ", ".join(repr(i) for i in repeated[:10])
        more = f" and {len(repeated) - 10} more" if len(repeated) > 10 else ""
        errors.append(
            FieldError(
                f"{prefix}items",
                f"duplicate item ids {shown}{more}; send each clicked item once "
                '(5 and "5" are the same id)',
            )
        )
    return errors


def _shown_ids(ids: list[str], limit: int = 20) -> str:
    shown = ", ".join(repr(i) for i in ids[:limit])
    return shown + (f" and {len(ids) - limit} more" if len(ids) > limit else "")


def client_of(request: Request) -> str:
    """Who asks, for the queue's fair share: the peer address (the real client's when uvicorn
    trusts a proxy's X-Forwarded-For, --forwarded-allow-ips). Not the API key: one key is
    shared by every caller of a deployment."""
    return request.client.host if request.client is not None else ""


def encode(recommender: Recommender, rec: Recommendation) -> bytes:
    """A :class:`RecommendResponse` as JSON, less its last field, ``cached``: this is what the
    cache keeps, and a hit is answered with these bytes as they are (see :func:`_body`)."""
    items = [{"item": item, "score": score} for item, score in rec.items]
    return orjson.dumps(
        {"items": items, "model_version": recommender.version, "unknown_items": rec.unknown,
         "fallback": rec.fallback}
    )  # fmt: skip


def encode_titled(recommender: Recommender, rec: Recommendation) -> bytes:
    """:func:`encode` with each item's title (null where the version has none): ``fields``."""
    title = recommender.items.title
    items = [{"item": item, "score": score, "title": title(item)} for item, score in rec.items]
    return orjson.dumps(
        {"items": items, "model_version": recommender.version, "unknown_items": rec.unknown,
         "fallback": rec.fallback}
    )  # fmt: skip


def _scored(
    recommender: Recommender, rec: Recommendation, body: SimilarRequest
) -> list[ScoredItem]:
    if "title" in body.fields:
        title = recommender.items.title
        return [ScoredItem(item=i, score=s, title=title(i)) for i, s in rec.items]
    return [ScoredItem(item=i, score=s) for i, s in rec.items]


def _body(answer: Answer, i: int) -> bytes:
    """The i-th encoded answer with ``cached`` added in place of its closing brace."""
    return answer.bodies[i][:-1] + (b',"cached":true}' if answer.cached[i] else b',"cached":false}')


async def _answer(
    request: Request,
    pipeline: Pipeline,
    bodies: list[RecommendRequest],
    strict: bool | None,
    prefixes: list[str],
) -> Answer:
    queries = [recommend.Query(b.items, b.n, b.exclude, b.candidates) for b in bodies]
    titled = ["title" in b.fields for b in bodies]
    try:
        answer = await pipeline.recommend(
            queries, pipeline.settings.strict if strict is None else strict,
            [encode_titled if t else encode for t in titled], client_of(request),
            ["title" if t else "" for t in titled],
        )
    except UnknownItemsError as exc:
        raise InvalidRequestError.of(
            [
                FieldError(
                    f"{prefix}items",
                    f"unknown item ids {_shown_ids(unknown)} (model version {exc.version}); "
                    "send only known ids or drop strict=true",
                )
                for prefix, unknown in zip(prefixes, exc.unknown, strict=True)
                if unknown
            ]
        ) from None
    access: AccessInfo | None = getattr(request.state, "access", None)
    if access is not None:
        access.model_version = answer.version
        hits = sum(answer.cached)
        access.cache = "hit" if hits == len(queries) else "miss" if not hits else "mixed"
    return answer


# The routes answer with the bytes they built, which FastAPI sends as they are; response_model
# still documents them in OpenAPI.
@recommend_router.post("/recommend", response_model=RecommendResponse)
async def recommend_one(
    body: RecommendRequest,
    request: Request,
    pipeline: ServingDep,
    strict: Strict = None,
) -> Response:
    """Top-n items for one click history, history and exclude never returned."""
    errors = check_limits(body, pipeline.settings)
    if errors:
        raise InvalidRequestError.of(errors)
    answer = await _answer(request, pipeline, [body], strict, [""])
    return Response(_body(answer, 0), media_type="application/json")


@recommend_router.post("/recommend/batch", response_model=BatchResponse)
async def recommend_batch(
    body: BatchRequest,
    request: Request,
    pipeline: ServingDep,
    strict: Strict = None,
) -> Response:
    """Many histories in one forward pass, answered in order."""
    settings = pipeline.settings
    if len(body.requests) > settings.max_batch_requests:
        message = (
            f"at most {settings.max_batch_requests} requests per batch "
            f"(MULTVAE_MAX_BATCH_REQUESTS), got {len(body.requests)}"
        )
        raise InvalidRequestError.of([FieldError("requests", message)])
    prefixes = [f"requests[{i}]." for i in range(len(body.requests))]
    errors = [
        error
        for r, p in zip(body.requests, prefixes, strict=True)
        for error in check_limits(r, settings, p)
    ]
    if errors:
        raise InvalidRequestError.of(errors)
    answer = await _answer(request, pipeline, body.requests, strict, prefixes)
    results = b",".join(_body(answer, i) for i in range(len(body.requests)))
    return Response(b'{"results":[' + results + b"]}", media_type="application/json")


@recommend_router.post("/similar", response_model_exclude_unset=True)
async def similar(
    body: SimilarRequest, request: Request, pipeline: ServingDep
) -> SimilarResponse:
    """Items similar to one item: cosine of the decoder's item vectors (docs/api.md says how)."""
    errors = check_limits(body, pipeline.settings)
    if errors:
        raise InvalidRequestError.of(errors)
    try:
        recommender, rec = await pipeline.similar(
            body.item, body.n, body.exclude, body.candidates
        )
    except UnknownItemError as exc:
        raise InvalidRequestError.of([FieldError("item", str(exc))]) from None
    access: AccessInfo | None = getattr(request.state, "access", None)
    if access is not None:
        access.model_version = recommender.version
    items = _scored(recommender, rec, body)
    return SimilarResponse(item=body.item, items=items, model_version=recommender.version)


@router.get("/healthz")
@router.head("/healthz", operation_id="healthz_head")  # load balancers probe with HEAD too
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


# The API's own document and UI as plain routes (FastAPI's built-in ones are not routes the
# request metrics can name: they would all count as "unmatched").
@router.get("/openapi.json", include_in_schema=False)
async def openapi_document(request: Request) -> JSONResponse:
    return JSONResponse(request.app.openapi())


# Swagger UI's JavaScript and CSS as the fastapi-offline package ships them, served from here:
# FastAPI's default page fetches them from a CDN and is blank on a network without internet.
DOCS_ASSETS = Path(str(importlib.resources.files("fastapi_offline") / "static"))
DOCS_FILES = {"swagger-ui-bundle.js": "text/javascript", "swagger-ui.css": "text/css",
              "favicon.png": "image/png"}  # fmt: skip


@router.get("/docs", include_in_schema=False)
async def docs() -> HTMLResponse:
    return get_swagger_ui_html(
        openapi_url="/openapi.json",
        title="multvae-rec API",
        swagger_js_url="/docs/assets/swagger-ui-bundle.js",
        swagger_css_url="/docs/assets/swagger-ui.css",
        swagger_favicon_url="/docs/assets/favicon.png",
    )


@router.get("/docs/assets/{name}", include_in_schema=False)
async def docs_asset(name: str) -> FileResponse:
    if name not in DOCS_FILES:
        raise HTTPException(404)
    return FileResponse(DOCS_ASSETS / name, media_type=DOCS_FILES[name])


@router.get("/readyz", responses={503: {"model": ErrorBody}})
async def readyz(pipeline: PipelineDep) -> dict[str, str]:
    """A model is loaded and inference works; the cache's state does not decide readiness."""
    if pipeline.batcher.broken is not None:
        raise NotReadyError(pipeline.batcher.broken)
    return {"status": "ready", "model_version": pipeline.served().version}


@router.get("/model", responses={503: {"model": ErrorBody}})
async def model_info(pipeline: PipelineDep) -> ModelInfo:
    """The served model version, its size, device and summary metrics (the per-epoch history
    and quintiles are in the version's metrics.json)."""
    return ModelInfo(**pipeline.served().describe())


@metrics_router.get(
    "/metrics",
    response_class=Response,
    responses={
        200: {
            "content": {"text/plain": {"schema": {"type": "string"}}},
            "description": f"Prometheus text format ({CONTENT_TYPE_LATEST})",
        },
        401: {"model": ErrorBody},
    },
)
async def metrics(request: Request) -> Response:
    """Prometheus text exposition; needs the API key when one is configured."""
    exposition: Exposition = request.app.state.exposition
    return Response(await exposition.render(), media_type=CONTENT_TYPE_LATEST)


@router.post(
    "/admin/reload",
    dependencies=[Depends(require_admin)],
    responses={409: {"model": ErrorBody}},
)
async def admin_reload(pipeline: PipelineDep) -> ReloadResponse:
    """Load the version CURRENT names now; 409 when it is refused (the old one keeps serving)."""
    result = await pipeline.registry.reload("admin")
    if result.outcome == "refused":
        what = f"version {result.requested}" if result.requested is not None else "CURRENT"
        raise ReloadRefusedError(f"{what} refused, still serving {result.version}: {result.detail}")
    return ReloadResponse(outcome=result.outcome, version=result.version, detail=result.detail)
