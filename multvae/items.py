"""Item vocabulary: external item id <-> model column, training popularity, optional title.

External ids are always strings (the dataset's own ids); a JSON integer is its decimal string.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray


@dataclass(frozen=True)
class ItemIndex:
    """Column ``c`` of the model is item ``ids[c]``, clicked ``popularity[c]`` times in training."""

    ids: tuple[str, ...]
    popularity: NDArray[np.int64]
    titles: tuple[str | None, ...] | None = None

    def __post_init__(self) -> None:
        if len(self.popularity) != len(self.ids):
            raise ValueError(
                f"popularity has {len(self.popularity)} entries for {len(self.ids)} items"
            )
        if self.titles is not None and len(self.titles) != len(self.ids):
            raise ValueError(f"titles has {len(self.titles)} entries for {len(self.ids)} items")
        lookup = {item: col for col, item in enumerate(self.ids)}
        if len(lookup) != len(self.ids):
            raise ValueError("item ids must be unique")
        object.__setattr__(self, "_lookup", lookup)

    @classmethod
    def build(
        cls,
        ids: Iterable[Any],
        popularity: Sequence[int] | NDArray[np.integer],
        titles: Sequence[str | None] | None = None,
    ) -> ItemIndex:
        return cls(
            ids=tuple(str(i) for i in ids),
            popularity=np.asarray(popularity, dtype=np.int64),
            titles=tuple(titles) if titles is not None else None,
        )

    def __len__(self) -> int:
        return len(self.ids)

    def column(self, item: str) -> int | None:
        """The column of an external id, or None when the model does not know it."""
        lookup: dict[str, int] = self._lookup  # type: ignore[attr-defined]
        return lookup.get(item)

    def columns(self, items: Iterable[str]) -> tuple[NDArray[np.int64], list[str]]:
        """(known columns in input order, unknown ids in input order)."""
        lookup: dict[str, int] = self._lookup  # type: ignore[attr-defined]
        cols: list[int] = []
        unknown: list[str] = []
        for item in items:
            col = lookup.get(item)
            if col is None:
                unknown.append(item)
            else:
                cols.append(col)
        return np.asarray(cols, dtype=np.int64), unknown

    def title(self, item: str) -> str | None:
        """The item's title, None when the index has no titles or does not know the item."""
        column = self.column(item)
        return None if self.titles is None or column is None else self.titles[column]

    def unknown(self, items: Iterable[str]) -> list[str]:
        """The ids in ``items`` that are not in the index, in input order."""
        lookup: dict[str, int] = self._lookup  # type: ignore[attr-defined]
        return [item for item in items if item not in lookup]

    def popularity_ranking(self) -> NDArray[np.int64]:
        """Columns by descending training popularity; ties by column (stable)."""
        return np.argsort(-self.popularity, kind="stable").astype(np.int64)

    def to_json(self) -> dict[str, Any]:
        data: dict[str, Any] = {"ids": list(self.ids), "popularity": self.popularity.tolist()}
        if self.titles is not None:
            data["titles"] = list(self.titles)
        return data

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ItemIndex:
        try:
            return cls.build(data["ids"], data["popularity"], data.get("titles"))
        except KeyError as exc:
            raise ValueError(f"items.json lacks the field {exc.args[0]!r}") from exc

    def save(self, path: Path) -> None:
        path.write_text(json.dumps(self.to_json(), ensure_ascii=False))

    @classmethod
    def load(cls, path: Path) -> ItemIndex:
        return cls.from_json(json.loads(path.read_text()))
