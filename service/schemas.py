"""Request and response bodies of the HTTP API.

Item ids are the dataset's own ids, always strings; a JSON integer is accepted and becomes its
decimal string (``5`` and ``"5"`` are the same item). Floats, booleans, null, arrays and
objects are rejected with the position of the offending id.

Limits that depend on settings (max ``n``, history length) are checked by
:func:`service.routes.check_limits`, because a pydantic model is fixed at import time.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema
from pydantic_core import PydanticCustomError

from service.errors import shown

ACCEPTED_ID = "a string or an integer"


def _json_value(value: Any) -> str:
    """A value described in JSON terms, since that is what the client sent."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"{str(value).lower()} (a boolean)"
    if isinstance(value, dict):
        return "an object"
    if isinstance(value, list):
        return "an array"
    return f"{shown(value)} (a {type(value).__name__})"


def _item_id(value: Any) -> str:
    # bool is a subclass of int: true/false must not silently become the items "True"/"False".
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    raise PydanticCustomError(
        "item_id_type",
        "item ids must be {accepted}, got {got}",
        {"accepted": ACCEPTED_ID, "got": _json_value(value)},
    )


# The schema says what the validator accepts: a string or an integer (never a float/bool).
ItemId = Annotated[
    str,
    BeforeValidator(_item_id),
    WithJsonSchema({"anyOf": [{"type": "string"}, {"type": "integer"}]}),
]
# Extra per-item fields a client may ask for; "title" is the title the model version knows.
ItemField = Literal["title"]
Count = Annotated[int, Field(strict=True, ge=1, description="how many items to return")]


Exclude = Annotated[
    list[ItemId], Field(default_factory=list, description="item ids never to return")
]
Candidates = Annotated[
    list[ItemId] | None,
    Field(
        description="rank only these item ids (e.g. in stock, one category); ids the model "
        "does not know are ignored; omitted or null: every item",
    ),
]
Fields = Annotated[
    list[ItemField],
    Field(
        default_factory=list,
        description='extra fields per returned item: "title" (null when the version has none)',
    ),
]


class RecommendRequest(BaseModel):
    """One click history to fold in; the history and ``exclude`` are never returned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    items: list[ItemId] = Field(description="the user's clicked item ids (the history)")
    n: Count = 20
    exclude: Exclude
    candidates: Candidates = None
    fields: Fields


class SimilarRequest(BaseModel):
    """Items similar to one item; the item itself and ``exclude`` are never returned."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    item: ItemId = Field(description="the item id to find similar items for")
    n: Count = 10
    exclude: Exclude
    candidates: Candidates = None
    fields: Fields


class BatchRequest(BaseModel):
    """Many histories, answered in order from one forward pass."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    requests: list[RecommendRequest]


class ScoredItem(BaseModel):
    """An item and its score; ``title`` only when the request asked for it (``fields``)."""

    item: str
    score: float
    title: str | None = None


class RecommendResponse(BaseModel):
    """Ranked items; ``fallback`` is ``"popularity"`` when the history gave the model nothing."""

    items: list[ScoredItem]
    model_version: str
    unknown_items: list[str]
    fallback: str | None
    cached: bool


class BatchResponse(BaseModel):
    results: list[RecommendResponse]


class SimilarResponse(BaseModel):
    """Items ranked by cosine similarity to ``item`` (see ``Recommender.similar``)."""

    item: str
    items: list[ScoredItem]
    model_version: str


class ModelInfo(BaseModel):
    version: str
    n_items: int
    device: str
    created_at: str
    loaded_at: str
    architecture: dict[str, Any]
    # How top-N is found: {"kind": "exact"}, or the FAISS index's factory, search
    # parameters, margin and build time (MULTVAE_TOPN_INDEX).
    topn_index: dict[str, Any]
    metrics: dict[str, Any]


class ReloadResponse(BaseModel):
    outcome: str  # "reloaded" or "unchanged"
    version: str
    detail: str


class ErrorBody(BaseModel):
    """Every error: ``detail`` says what was wrong and what is accepted."""

    detail: str
    errors: list[dict[str, str]] | None = None
