"""Helpers shared by the interaction-file readers (:mod:`training.readers`,
:mod:`training.netflix`): line checks for error messages, numbered lines, id codes."""

from __future__ import annotations

import csv
import math
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

# What a line should look like, or None when it does: the words of a MalformedLineError.
LineCheck = Callable[[str], str | None]


def field_check(sep: str, n_fields: int, kinds: dict[int, str], quoted: bool = False) -> LineCheck:
    """A checker for ``n_fields`` ``sep``-separated fields whose ``kinds`` are int/float/str."""
    layout = f"{n_fields} fields separated by {sep!r}"

    def check(line: str) -> str | None:
        fields = next(csv.reader([line], delimiter=sep)) if quoted else line.split(sep)
        if len(fields) != n_fields:
            return layout
        for i, field in enumerate(fields):
            kind = kinds.get(i, "str")
            if not field.strip():
                return f"{layout}, field {i + 1} not empty"
            if kind != "str" and not _parses(field, kind):
                return f"{layout}, field {i + 1} a number ({kind})"
        return None

    return check


def _parses(text: str, kind: str) -> bool:
    try:
        number = int(text) if kind == "int" else float(text)
    except ValueError:
        return False
    return math.isfinite(number)


def numbered_lines(path: Path, encoding: str = "utf-8") -> Iterator[tuple[int, str]]:
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            yield lineno, raw.decode(encoding, "replace").rstrip("\r\n")


def int_codes(ids: NDArray[np.integer], sort: bool) -> tuple[NDArray[np.int32], NDArray[np.int64]]:
    codes, uniques = pd.factorize(ids, sort=sort)
    return codes.astype(np.int32), np.asarray(uniques, dtype=np.int64)


def present_ids(ids: NDArray[Any]) -> set[str]:
    return {str(i) for i in ids.tolist()}
