"""Errors of the service, each with the HTTP status it is answered with, and the helpers that
word them. Plain exceptions: the domain modules raise them without importing the web stack;
``service.app`` renders every one as a JSON ``{"detail": ...}`` body.

    ServiceError                  base: an HTTP status and a message for the client
     ├── MalformedJSONError       400  the body is not parseable JSON, or repeats a key
     ├── UnauthorizedError        401  API key missing or wrong (the key itself is never echoed)
     ├── AdminDisabledError       403  /admin/* called while no MULTVAE_API_KEY is configured
     ├── ReloadRefusedError       409  a reload was refused (bad version, unreadable CURRENT)
     ├── UnsupportedMediaError    415  the Content-Type is not application/json
     ├── InvalidRequestError      422  one or more fields are invalid; ``errors`` lists each field
     ├── NotReadyError            503  no model is loaded yet, or the inference worker failed
     └── OverloadedError          503  more than MULTVAE_MAX_PENDING histories wait (Retry-After)

Framework errors are rendered the same way: validation (422; malformed JSON 400, a body that is
not JSON 415), strict mode's unknown ids (422), unknown route (404), wrong method (405), a
body above the limit (413), a body that stops arriving (408). Unexpected exceptions become
a JSON 500 in the request middleware (:mod:`service.middleware`); client input never reaches
that path, and a client that hangs up mid-body is recorded there as 499 with nothing sent.
Messages name the field and the value and say what is accepted.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class FieldError:
    field: str  # "items[3]", "requests[0].n", "query.strict"
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"field": self.field, "message": self.message}


class ServiceError(Exception):
    """An error answered with ``status`` and a JSON body; see the module docstring."""

    status = 500

    def __init__(
        self,
        detail: str,
        *,
        errors: Sequence[FieldError] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.detail = detail
        self.errors = list(errors) if errors else None
        self.headers = headers

    def body(self) -> dict[str, Any]:
        out: dict[str, Any] = {"detail": self.detail}
        if self.errors:
            out["errors"] = [e.as_dict() for e in self.errors]
        return out


class MalformedJSONError(ServiceError):
    status = 400


class UnauthorizedError(ServiceError):
    status = 401


class AdminDisabledError(ServiceError):
    status = 403


class ReloadRefusedError(ServiceError):
    status = 409


class UnsupportedMediaError(ServiceError):
    status = 415


class InvalidRequestError(ServiceError):
    status = 422

    @classmethod
    def of(cls, errors: Sequence[FieldError]) -> InvalidRequestError:
        return cls("; ".join(f"{e.field}: {e.message}" for e in errors), errors=errors)


class NotReadyError(ServiceError):
    status = 503


class OverloadedError(ServiceError):
    """Refused at once rather than queued: the wait would only grow (load shedding)."""

    status = 503


def field_path(loc: Iterable[int | str]) -> str:
    """``("requests", 0, "items", 3)`` -> ``"requests[0].items[3]"``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out or "body"


def shown(value: Any) -> str:
    """A value in JSON spelling (true, null, "5", NaN), as the client wrote it, cut at 40."""
    try:
        text = json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def describe(error: dict[str, Any], accepted_fields: Sequence[str]) -> FieldError:
    """One pydantic error as a field and a message that says what is accepted."""
    loc = tuple(error.get("loc", ()))
    field = field_path(loc)
    kind = error.get("type", "")
    value = error.get("input")
    if kind == "missing":
        message = "this field is required"
    elif kind == "extra_forbidden":
        message = f"unknown field; accepted fields are {', '.join(accepted_fields)}"
    elif kind in ("model_type", "dict_type", "model_attributes_type"):
        message = (
            f"expected a JSON object with the fields {', '.join(accepted_fields)}, "
            f"got {shown(value)}"
        )
    elif kind == "list_type":
        message = f"expected a JSON array, got {shown(value)}"
    elif kind in ("int_type", "int_parsing", "int_from_float"):
        message = f"expected an integer, got {shown(value)}"
    elif kind == "greater_than_equal":
        message = f"must be >= {error.get('ctx', {}).get('ge')}, got {shown(value)}"
    elif kind in ("bool_type", "bool_parsing"):
        message = f"expected true or false, got {shown(value)}"
    elif kind == "literal_error":
        message = f"expected one of {error.get('ctx', {}).get('expected', '?')}, got {shown(value)}"
    elif kind == "item_id_type":
        message = str(error.get("msg", "invalid item id"))
    else:
        message = f"{error.get('msg', 'invalid value')} (got {shown(value)})"
    return FieldError(field, message)
