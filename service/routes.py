"""HTTP endpoints: plain FastAPI routes whose dependencies (``Annotated``) supply the settings,
the pipeline and the API-key check, and whose bodies FastAPI and pydantic validate."""

from __future__ import annotations

import hmac
from collections import Counter
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request, Response, Security
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from multvae import recommend
from multvae.errors import UnknownItemError
from service.errors import (
    AdminDisabledError,
    FieldError,
    InvalidRequestError,
    NotReadyError,
    ReloadRefusedError,
    UnauthorizedError,
)
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
async def get_settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


async def get_pipeline(request: Request) -> Pipeline:
    pipeline: Pipeline | None = getattr(request.app.state, "pipeline", None)
    if pipeline is None:
        raise NotReadyError("the service is starting or stopping")
    return pipeline


SettingsDep = Annotated[Settings, Depends(get_settings)]
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


async def presented_key(request: Request) -> str | None:
    """The key a request carries, in X-API-Key or as a bearer token."""
    key = await API_KEY(request)
    if key is None:
        bearer = await BEARER(request)
        key = bearer.credentials if bearer is not None else None
    return key


async def require_key(settings: SettingsDep, key: ApiKey, bearer: BearerKey) -> None:
    """The API key, enforced only when MULTVAE_API_KEY is set."""
    check_key(settings, key if key is not None else bearer.credentials if bearer else None)


async def require_admin(settings: SettingsDep, key: ApiKey, bearer: BearerKey) -> None:
    """Admin endpoints never run unauthenticated: without a key they are off."""
    if settings.api_key is None:
        raise AdminDisabledError("admin endpoints are disabled: set MULTVAE_API_KEY to enable them")
    check_key(settings, key if key is not None else bearer.credentials if bearer else None)


Strict = Annotated[
    bool | None,
    Query(description="reject unknown history ids with a 422 (default: MULTVAE_STRICT)"),
]

ERRORS: dict[int | str, dict[str, type[ErrorBody]]] = {
    code: {"model": ErrorBody} for code in (400, 401, 413, 415, 422, 503)
}

router = APIRouter()
# The recommend endpoints need the API key (when configured); app.py checks it before any
# body error too, so an unauthenticated client learns nothing about what a valid body is.
recommend_router = APIRouter(dependencies=[Depends(require_key)], responses=ERRORS)


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
    repeated = [item for item, count in Counter(history).items() if count > 1]
    if repeated:
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


async def _answer(
    request: Request,
    pipeline: Pipeline,
    bodies: list[RecommendRequest],
    strict: bool | None,
    prefixes: list[str],
) -> Answer:
    queries = [recommend.Query(b.items, b.n, b.exclude, b.candidates) for b in bodies]
    try:
        answer = await pipeline.recommend(
            queries, pipeline.settings.strict if strict is None else strict
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


def _items(answer: Answer, i: int, body: RecommendRequest | SimilarRequest) -> list[ScoredItem]:
    ranked = answer.recommendations[i].items
    if "title" in body.fields:
        title = answer.items.title
        return [ScoredItem(item=item, score=score, title=title(item)) for item, score in ranked]
    return [ScoredItem(item=item, score=score) for item, score in ranked]


def _response(answer: Answer, i: int, body: RecommendRequest) -> RecommendResponse:
    rec = answer.recommendations[i]
    return RecommendResponse(
        items=_items(answer, i, body),
        model_version=answer.version,
        unknown_items=rec.unknown,
        fallback=rec.fallback,
        cached=answer.cached[i],
    )


# A title is in an answer only when the request asked for it (exclude_unset), not as null.
@recommend_router.post("/recommend", response_model_exclude_unset=True)
async def recommend_one(
    body: RecommendRequest,
    request: Request,
    pipeline: PipelineDep,
    strict: Strict = None,
) -> RecommendResponse:
    """Top-n items for one click history, history and exclude never returned."""
    errors = check_limits(body, pipeline.settings)
    if errors:
        raise InvalidRequestError.of(errors)
    return _response(await _answer(request, pipeline, [body], strict, [""]), 0, body)


@recommend_router.post("/recommend/batch", response_model_exclude_unset=True)
async def recommend_batch(
    body: BatchRequest,
    request: Request,
    pipeline: PipelineDep,
    strict: Strict = None,
) -> BatchResponse:
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
    return BatchResponse(results=[_response(answer, i, r) for i, r in enumerate(body.requests)])


@recommend_router.post("/similar", response_model_exclude_unset=True)
async def similar(body: SimilarRequest, request: Request, pipeline: PipelineDep) -> SimilarResponse:
    """Items similar to one item: cosine of the decoder's item vectors (docs/api.md says how)."""
    errors = check_limits(body, pipeline.settings)
    if errors:
        raise InvalidRequestError.of(errors)
    try:
        answer = await pipeline.similar(body.item, body.n, body.exclude, body.candidates)
    except UnknownItemError as exc:
        raise InvalidRequestError.of([FieldError("item", str(exc))]) from None
    access: AccessInfo | None = getattr(request.state, "access", None)
    if access is not None:
        access.model_version = answer.version
    return SimilarResponse(
        item=body.item, items=_items(answer, 0, body), model_version=answer.version
    )


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """The process is alive."""
    return {"status": "ok"}


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


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    """Prometheus text exposition."""
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


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
