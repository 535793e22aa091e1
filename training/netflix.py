"""Netflix Prize ratings: ``movie_id:`` lines, each followed by ``user,rating,date`` lines.

Either the 17,770 per-movie ``mv_*.txt`` files (possibly under ``training_set/``) or the four
``combined_data_*.txt`` files. Per-movie files are joined into ~128 MB buffers so that pandas'
C parser runs once per buffer instead of once per file; the movie id of each rating line
comes from ``np.repeat`` over the header positions, never from a Python loop over lines.
"""

from __future__ import annotations

import io
import re
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from numpy.typing import NDArray

from multvae.errors import DataError, MalformedLineError
from training.dataset import Interactions
from training.lines import field_check, int_codes, numbered_lines, present_ids

_NETFLIX_HEADER = re.compile(rb"^\s*(\d+):\s*$")
_NETFLIX_BATCH = 1 << 27  # join per-movie files into ~128 MB buffers: one parser call each
_netflix_check = field_check(",", 3, {0: "int", 1: "float"})


# (movie id, user id, rating) per rating line; ids as int32 when they fit (Netflix's do), so
# 100M ratings take 1.2 GB, not 2 GB, while the parts are concatenated.
_Part = tuple[NDArray[np.integer], NDArray[np.integer], NDArray[np.float32]]


class _BadBlobError(Exception):
    """The fast Netflix parse failed; the slow scan will name the line."""


def read_netflix(path: Path) -> Interactions:
    """Read a Netflix Prize directory (or one of its files) in file-name order."""
    if path.is_dir():
        files = (sorted(path.glob("mv_*.txt")) or sorted(path.glob("training_set/mv_*.txt"))
                 or sorted(path.glob("combined_data_*.txt")))
    else:
        files = [path]
    if not files:
        raise DataError(f"{path} holds neither mv_*.txt nor combined_data_*.txt files")
    parts: list[_Part] = []
    batch: list[Path] = []
    size = 0
    for i, file in enumerate(files):
        batch.append(file)
        size += file.stat().st_size
        if size >= _NETFLIX_BATCH or i == len(files) - 1:
            parts.append(_parse_netflix_files(batch))
            batch, size = [], 0
    movie = np.concatenate([p[0] for p in parts])
    user = np.concatenate([p[1] for p in parts])
    rating = np.concatenate([p[2] for p in parts])
    del parts
    if len(movie) == 0:
        raise DataError(f"{path} has no ratings")
    user_codes, user_ids = int_codes(user, sort=True)
    del user
    item_codes, item_ids = int_codes(movie, sort=False)
    inter = Interactions(user_codes, item_codes, rating, user_ids, item_ids, source="netflix")
    root = path if path.is_dir() else path.parent
    inter.titles = _titles_netflix([root, root.parent], item_ids)
    return inter


def _parse_netflix_files(files: list[Path]) -> _Part:
    if len(files) == 1:
        blob = files[0].read_bytes()  # a 500 MB combined file: no stripped or joined copy
    else:
        blob = b"\n".join(stripped for f in files if (stripped := f.read_bytes().rstrip()))
    try:
        return _parse_netflix_blob(blob)
    except _BadBlobError as exc:
        for file in files:  # the slow scan, only on the error path
            error = _netflix_bad_line(file)
            if isinstance(error, MalformedLineError):
                raise error from None
        raise DataError(f"{files[0]}...: could not be parsed: {exc}") from None


def _parse_netflix_blob(blob: bytes) -> _Part:
    content = len(blob)
    while content and blob[content - 1] in b" \t\r\n":  # trailing blank lines are no rows
        content -= 1
    if content == 0:
        return np.zeros(0, np.int32), np.zeros(0, np.int32), np.zeros(0, np.float32)
    # Headers are found with bytes.find (memchr speed); only one Python step per movie.
    starts: list[int] = []
    movies: list[int] = []
    pos = line = last = 0
    while (colon := blob.find(b":", pos)) >= 0:
        start = blob.rfind(b"\n", 0, colon) + 1
        end = blob.find(b"\n", colon)
        end = len(blob) if end < 0 else end
        match = _NETFLIX_HEADER.match(blob[start:end])
        if match is None:
            raise _BadBlobError("a ':' outside a movie_id line")
        line += blob.count(b"\n", last, start)
        last, pos = start, end
        starts.append(line)
        movies.append(int(match.group(1)))
    if not starts or starts[0] != 0:
        raise _BadBlobError("the data does not start with a movie_id line")
    n_lines = blob.count(b"\n", 0, content) + 1
    bounds = np.asarray([*starts, n_lines], dtype=np.int64)
    counts = bounds[1:] - bounds[:-1] - 1  # rating lines under each header
    try:
        frame = pd.read_csv(
            io.BytesIO(blob), engine="c", header=None, names=["user", "rating", "date"],
            usecols=["user", "rating"], dtype={"user": "int64", "rating": "float32"},
            skiprows=starts, skip_blank_lines=False, nrows=int(counts.sum()),
        )
    except (ValueError, pd.errors.ParserError) as exc:
        raise _BadBlobError(str(exc)) from exc
    rating = frame["rating"].to_numpy()
    if len(frame) != counts.sum() or not np.isfinite(rating).all():
        raise _BadBlobError("a rating line without a numeric rating")
    movie = np.repeat(_narrow(np.asarray(movies, dtype=np.int64)), counts)
    return movie, _narrow(frame["user"].to_numpy()), rating


def _narrow(ids: NDArray[np.int64]) -> NDArray[np.integer]:
    fits = len(ids) == 0 or (ids.min() >= 0 and ids.max() < 2**31)
    return ids.astype(np.int32) if fits else ids


def _netflix_bad_line(path: Path) -> DataError:
    seen_header = False
    blank = 0  # trailing blank lines are fine; one followed by data is not
    for lineno, line in numbered_lines(path):
        if not line.strip():
            blank = blank or lineno
            continue
        if blank:
            return MalformedLineError(path, blank, "no blank line between ratings", "")
        if _NETFLIX_HEADER.match(line.encode()):
            seen_header = True
            continue
        expected = _netflix_check(line) if seen_header else "a 'movie_id:' line first"
        if expected is not None:
            return MalformedLineError(path, lineno, expected, line)
    return DataError(f"{path}: could not be parsed")


def _titles_netflix(dirs: list[Path], ids: NDArray[Any]) -> dict[str, str]:
    keep = present_ids(ids)
    for folder in dirs:
        for name in ("movie_titles.csv", "movie_titles.txt"):
            src = folder / name
            if src.is_file():
                titles: dict[str, str] = {}
                for line in src.read_text(encoding="latin-1").splitlines():
                    fields = line.split(",", 2)  # titles contain unquoted commas
                    if len(fields) == 3 and fields[0] in keep:
                        titles[fields[0]] = fields[2]
                return titles
    return {}
