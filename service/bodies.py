"""Request bodies: content type, size limit, JSON parsing, validation and configured limits.

The recommend endpoints read their body here rather than through FastAPI's body parameter so
that each failure gets its own status (415 wrong type, 413 too large, 400 malformed JSON,
422 invalid field) and so that pydantic validates straight from the JSON bytes.
"""

from __future__ import annotations

from collections import Counter
from typing import TypeVar

from fastapi import Request
from pydantic import BaseModel, ValidationError

from service.errors import (
    BodyTooLargeError,
    FieldError,
    InvalidRequestError,
    MalformedJSONError,
    UnsupportedMediaError,
    describe,
)
from service.schemas import RecommendRequest
from service.settings import Settings

M = TypeVar("M", bound=BaseModel)


def _is_json(content_type: str) -> bool:
    media = content_type.split(";", 1)[0].strip().lower()
    return media == "application/json" or (
        media.startswith("application/") and media.endswith("+json")
    )


async def read_body(request: Request, limit: int) -> bytes:
    """The raw body, refused early by Content-Length and again while streaming (chunked)."""
    content_type = request.headers.get("content-type", "")
    if not _is_json(content_type):
        raise UnsupportedMediaError(
            f"Content-Type must be application/json, got {content_type[:80] or 'none'!r}"
        )
    declared = request.headers.get("content-length")
    too_large = f"the body exceeds {limit} bytes (MULTVAE_MAX_BODY_BYTES); send fewer items"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise BodyTooLargeError(too_large)
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLargeError(too_large)
        chunks.append(chunk)
    return b"".join(chunks)


async def parse(request: Request, model: type[M], settings: Settings) -> M:
    """Read and validate a JSON body as ``model``."""
    body = await read_body(request, settings.max_body_bytes)
    if not body.strip():
        raise MalformedJSONError("the body is empty; send a JSON object")
    try:
        return model.model_validate_json(body)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        if any(e["type"] == "json_invalid" for e in errors):
            raise MalformedJSONError(f"malformed JSON: {errors[0]['msg']}") from None
        accepted_single = tuple(RecommendRequest.model_fields)
        accepted_top = tuple(model.model_fields)
        described = [
            # A field nested under requests[i] belongs to a RecommendRequest.
            describe(dict(e), accepted_single if len(e["loc"]) > 1 else accepted_top)
            for e in errors
        ]
        raise InvalidRequestError.of(described) from None


def check_limits(
    request: RecommendRequest, settings: Settings, prefix: str = ""
) -> list[FieldError]:
    """Configured bounds and duplicate ids; an empty list when the request is acceptable."""
    errors: list[FieldError] = []
    if request.n > settings.max_n:
        errors.append(
            FieldError(
                f"{prefix}n", f"must be <= {settings.max_n} (MULTVAE_MAX_N), got {request.n}"
            )
        )
    if len(request.items) > settings.max_history:
        errors.append(
            FieldError(
                f"{prefix}items",
                f"at most {settings.max_history} item ids are accepted (MULTVAE_MAX_HISTORY), "
                f"got {len(request.items)}",
            )
        )
    if len(request.exclude) > settings.max_exclude:
        errors.append(
            FieldError(
                f"{prefix}exclude",
                f"at most {settings.max_exclude} item ids are accepted (MULTVAE_MAX_EXCLUDE), "
                f"got {len(request.exclude)}",
            )
        )
    # A history is a set of clicks; a repeated id usually means the client sends events or
    # counts where the model expects distinct items, so say so instead of guessing.
    if len(set(request.items)) != len(request.items):
        repeated = [item for item, count in Counter(request.items).items() if count > 1]
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
