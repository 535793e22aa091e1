"""Interaction files -> :class:`Interactions`: each paper dataset's raw layout, generic tables.

Every big format is parsed by a C parser (pyarrow, or pandas for Netflix) with explicit
dtypes; Python only ever loops over a few lines (sniffing), per-movie headers, titles files,
or - when a parser fails - over the file once more to name the first bad line. String ids are
dictionary-encoded so that MSD's 48M rows never become 48M Python strings.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numpy.typing import NDArray

from multvae.errors import DataError, MalformedLineError
from training.catalog import ALIASES, FORMATS
from training.dataset import Interactions
from training.lines import LineCheck, field_check, int_codes, numbered_lines, present_ids
from training.netflix import read_netflix

USER_COLUMNS = ("userId", "user_id", "user", "userID", "UserId")
ITEM_COLUMNS = ("itemId", "item_id", "movieId", "movie_id", "item", "song", "song_id", "itemID")
RATING_COLUMNS = ("rating",)  # a count column must be named explicitly: it is not a rating
_STR_DICT = pa.dictionary(pa.int32(), pa.string())

# A line checker returns None for a good line, else what the line should have looked like.


def read_interactions(
    path: str | Path,
    fmt: str = "auto",
    user_col: str | None = None,
    item_col: str | None = None,
    rating_col: str | None = None,
    sep: str | None = None,
) -> Interactions:
    """Read an interaction file (or a Netflix Prize directory) in file order.

    ``fmt`` is one of :data:`FORMATS` (or an alias in :data:`ALIASES`) or ``"auto"``.
    ``user_col``/``item_col``/``rating_col``/``sep`` only apply to csv, tsv and parquet.
    """
    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    fmt = ALIASES.get(fmt, fmt)
    if fmt == "auto":
        path, fmt = detect_format(path)
    if fmt not in FORMATS:
        raise DataError(f"unknown format {fmt!r}; accepted: auto, {', '.join(FORMATS)}")
    if fmt == "netflix":
        return read_netflix(path)
    if fmt == "filmtrust":
        return _read_filmtrust(path)
    if fmt == "citeulike" and path.is_dir():
        path = path / "users.dat"
        if not path.is_file():
            raise DataError(f"{path.parent} has no users.dat (the CiteULike layout)")
    if path.is_dir():
        raise DataError(f"{path} is a directory; format {fmt!r} reads one file")
    if path.stat().st_size == 0:
        raise DataError(f"{path} is empty")
    if fmt == "ml-100k":
        return _read_headerless(path, fmt, "\t", 4, ("int", "int", "float"), _titles_100k)
    if fmt == "ml-1m":
        return _read_headerless(path, fmt, "::", 4, ("int", "int", "float"), _titles_1m)
    if fmt == "msd":
        return _read_headerless(path, fmt, "\t", 3, ("str", "str", "int"), None)
    if fmt == "citeulike":
        return _read_citeulike(path)
    if fmt == "parquet":
        return _read_parquet(path, user_col, item_col, rating_col)
    if fmt == "ml-20m":
        user_col, item_col = user_col or "userId", item_col or "movieId"
    return _read_table(path, fmt, sep or ("\t" if fmt == "tsv" else ","),
                       user_col, item_col, rating_col)


def detect_format(path: Path) -> tuple[Path, str]:
    """(file to read, format) for ``fmt="auto"``; DataError listing the formats when unsure."""
    if path.is_dir():
        if any(path.glob("mv_*.txt")) or any(path.glob("training_set/mv_*.txt")) \
                or any(path.glob("combined_data_*.txt")):
            return path, "netflix"
        if filmtrust_parts(path):
            return path, "filmtrust"
        for name in ("u.data", "ratings.dat", "ratings.csv", "train_triplets.txt", "users.dat"):
            if (path / name).is_file():
                return detect_format(path / name)
    name = path.name.lower()
    if name == "u.data":
        return path, "ml-100k"
    if name == "ratings.dat":
        return path, "ml-1m"
    if name == "train_triplets.txt":
        return path, "msd"
    if name == "users.dat":
        return path, "citeulike"
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return path, "parquet"
    first = _first_lines(path, 5) if path.is_file() else []
    if suffix == ".csv" and first and first[0].replace('"', "").startswith("userId,movieId"):
        return path, "ml-20m"
    if first and all(_looks_like_triplet(line) for line in first):
        return path, "msd"
    if suffix in (".csv", ".tsv"):
        return path, suffix[1:]
    raise DataError(
        f"cannot tell the format of {path}; pass one of {', '.join(FORMATS)} "
        "(netflix takes the directory of mv_*.txt or combined_data_*.txt files, filmtrust "
        "the directory of ratings_*.txt files)"
    )


def _looks_like_triplet(line: str) -> bool:
    fields = line.split("\t")
    return (len(fields) == 3 and fields[2].strip().isdigit()
            and not fields[0].strip().isdigit() and not fields[1].strip().isdigit())


def _first_lines(path: Path, n: int) -> list[str]:
    lines: list[str] = []
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh):
            # A UTF-8 byte order mark (Excel's "CSV UTF-8") is not part of the first field.
            text = raw.decode("utf-8-sig" if lineno == 0 else "utf-8", "replace").rstrip("\r\n")
            if text.strip():
                lines.append(text)
            if len(lines) == n:
                break
    return lines


# ---- headerless text formats: u.data, ratings.dat, train_triplets.txt --------------------------


def _read_headerless(
    path: Path, fmt: str, sep: str, n_fields: int, kinds: tuple[str, str, str],
    titles: Callable[[Path, NDArray[Any]], dict[str, str]] | None,
) -> Interactions:
    # "::" is not a single-character delimiter: parse on ":" and keep every other column.
    delim = sep[0]
    width = n_fields if len(sep) == 1 else 2 * n_fields - 1
    names = [f"f{i}" for i in range(width)]
    step = 1 if len(sep) == 1 else 2
    user, item, value = names[0], names[step], names[2 * step]
    types = {"int": pa.int64(), "float": pa.float32(), "str": _STR_DICT}
    column_types = dict(zip((user, item, value), (types[k] for k in kinds), strict=True))
    check = field_check(sep, n_fields, {i: k for i, k in enumerate(kinds) if k != "str"})
    table = _arrow_csv(path, check, delim, names, column_types, [user, item, value], False)
    inter = _to_interactions(path, table[user], table[item], table[value], fmt, check, 0)
    if titles is not None:
        inter.titles = titles(path, inter.item_ids)
    return inter


def _arrow_csv(
    path: Path, check: LineCheck, delim: str, names: list[str] | None,
    column_types: dict[str, pa.DataType], include: list[str], header: bool,
) -> pa.Table:
    read = pacsv.ReadOptions(column_names=names, skip_rows=0, block_size=1 << 24)
    parse = pacsv.ParseOptions(delimiter=delim, quote_char='"' if header else False)
    convert = pacsv.ConvertOptions(
        column_types=column_types, include_columns=include,
        auto_dict_encode=True, auto_dict_max_cardinality=2**30,
    )
    try:
        table = pacsv.read_csv(path, read_options=read, parse_options=parse,
                               convert_options=convert)
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise locate_bad_line(path, check, skip=int(header), cause=str(exc)) from exc
    if table.num_rows == 0:
        raise DataError(f"{path} has no interactions")
    return table


def locate_bad_line(path: Path, check: LineCheck, skip: int, cause: str) -> DataError:
    """The error for the first line ``check`` rejects (the parser only said *that* it failed)."""
    for lineno, line in numbered_lines(path):
        if lineno <= skip or not line.strip():
            continue
        expected = check(line)
        if expected is not None:
            return MalformedLineError(path, lineno, expected, line)
    return DataError(f"{path}: could not be parsed: {cause}")


# ---- FilmTrust (ratings_*.txt parts) and CiteULike (users.dat) ------------------------------


def _read_filmtrust(path: Path) -> Interactions:
    """FilmTrust's ``user item rating`` lines, space-separated, CRLF or LF.

    A directory is read as all its ``ratings_<n>.txt`` parts in order of n (the release splits
    one dataset into arbitrary parts); a file is read alone.
    """
    parts = filmtrust_parts(path) if path.is_dir() else [path]
    if not parts:
        raise DataError(f"{path} has no ratings_<n>.txt files (the FilmTrust layout)")
    check = field_check(" ", 3, {0: "int", 1: "int", 2: "float"})
    names = ["user", "item", "rating"]
    types = {"user": pa.int64(), "item": pa.int64(), "rating": pa.float32()}
    tables = []
    for part in parts:
        if part.stat().st_size == 0:
            raise DataError(f"{part} is empty")
        table = _arrow_csv(part, check, " ", names, types, names, False)
        if any(table[c].null_count for c in names):
            raise locate_bad_line(part, check, skip=0, cause="an empty field")
        tables.append(table)
    table = pa.concat_tables(tables)
    return _to_interactions(path, table["user"], table["item"], table["rating"], "filmtrust",
                            None, 0)


_FILMTRUST_PART = re.compile(r"ratings_(\d+)\.txt")


def filmtrust_parts(directory: Path) -> list[Path]:
    """The ``ratings_<n>.txt`` files of ``directory`` in order of n."""
    numbered = [(int(m.group(1)), p) for p in directory.iterdir()
                if (m := _FILMTRUST_PART.fullmatch(p.name)) and p.is_file()]
    return [p for _, p in sorted(numbered)]


def _read_citeulike(path: Path) -> Interactions:
    """CiteULike's ``users.dat``: line n (from 0) is user n's item count, then the item ids.

    Every pair is an implicit click (no ratings); users with no items do not appear.
    """
    users: list[NDArray[np.int64]] = []
    items: list[NDArray[np.int64]] = []
    expected = "the item count n followed by n item ids (whole numbers >= 0)"
    for lineno, line in numbered_lines(path):
        fields = line.split()
        if not fields:
            raise MalformedLineError(path, lineno, expected, line)
        try:
            numbers = np.array(fields, dtype=np.int64)
        except (ValueError, OverflowError):
            raise MalformedLineError(path, lineno, expected, line) from None
        if numbers[0] != len(numbers) - 1 or (numbers < 0).any():
            raise MalformedLineError(path, lineno, expected, line)
        items.append(numbers[1:])
        users.append(np.full(len(numbers) - 1, lineno - 1, dtype=np.int64))
    if not items or not sum(len(i) for i in items):
        raise DataError(f"{path} has no interactions")
    user_codes, user_ids = int_codes(np.concatenate(users), sort=True)
    item_codes, item_ids = int_codes(np.concatenate(items), sort=False)
    return Interactions(user_codes, item_codes, None, user_ids, item_ids, source="citeulike")


# ---- tables with a header: ratings.csv, generic csv/tsv, parquet ------------------------------


def _pick(names: list[str], given: str | None, candidates: tuple[str, ...], role: str,
          path: Path, required: bool = True) -> str | None:
    if given is not None:
        if given not in names:
            raise DataError(f"{path} has no {role} column {given!r}; its columns are {names}")
        return given
    found = next((c for c in candidates if c in names), None)
    if found is None and required:
        raise DataError(
            f"{path}: cannot tell the {role} column among {names}; "
            f"pass --{role}-col (tried {', '.join(candidates)})"
        )
    return found


def _read_table(path: Path, fmt: str, sep: str, user_col: str | None, item_col: str | None,
                rating_col: str | None) -> Interactions:
    with path.open("rb") as fh:
        magic = fh.read(4)
    if magic == b"PAR1":
        raise DataError(f"{path} is a Parquet file, not {fmt}: pass --format parquet (or auto)")
    header_line = _first_lines(path, 1)
    if not header_line:
        raise DataError(f"{path} is empty")
    if "\x00" in header_line[0] or "\ufffd" in header_line[0]:
        raise DataError(
            f"{path} is not a {fmt} text file: its first line is not UTF-8 text (binary data?); "
            f"pass the file's --format ({', '.join(FORMATS)})"
        )
    try:
        names = next(csv.reader(header_line, delimiter=sep))
    except csv.Error as exc:
        raise DataError(f"{path}: the header line is not valid {fmt}: {exc}") from exc
    user = _pick(names, user_col, USER_COLUMNS, "user", path)
    item = _pick(names, item_col, ITEM_COLUMNS, "item", path)
    value = _pick(names, rating_col, RATING_COLUMNS, "rating", path, required=False)
    assert user is not None  # required=True never returns None
    assert item is not None
    kinds = {names.index(value): "float"} if value is not None else {}
    check = field_check(sep, len(names), kinds, quoted=True)
    # Ids of our own datasets' layouts are inferred (int64 when numeric); a generic file's ids
    # stay strings, so that SKUs like "007" and "7" remain two items. Ratings are float32.
    types: dict[str, pa.DataType] = {value: pa.float32()} if value is not None else {}
    if fmt in ("csv", "tsv"):
        types.update({user: pa.string(), item: pa.string()})
    wanted = [user, item] + ([value] if value is not None else [])
    table = _arrow_csv(path, check, sep, None, types, wanted, True)
    inter = _to_interactions(path, table[user], table[item],
                             table[value] if value is not None else None, fmt, check, 1)
    if fmt == "ml-20m":
        inter.titles = _titles_csv(path.parent / "movies.csv", inter.item_ids)
    return inter


def _read_parquet(path: Path, user_col: str | None, item_col: str | None,
                  rating_col: str | None) -> Interactions:
    try:
        schema = pq.read_schema(path)
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{path} is not a readable parquet file: {exc}") from exc
    names = list(schema.names)
    user = _pick(names, user_col, USER_COLUMNS, "user", path)
    item = _pick(names, item_col, ITEM_COLUMNS, "item", path)
    value = _pick(names, rating_col, RATING_COLUMNS, "rating", path, required=False)
    assert user is not None
    assert item is not None
    for name, role, accepts in (
        (user, "user id", _is_id_type), (item, "item id", _is_id_type),
        (value, "rating", pa.types.is_floating),
    ):  # fmt: skip
        if name is None:
            continue
        kind = schema.field(name).type
        if pa.types.is_dictionary(kind):
            kind = kind.value_type
        if not (accepts(kind) or (role == "rating" and pa.types.is_integer(kind))):
            wanted = "strings or integers" if role != "rating" else "numbers"
            raise DataError(
                f"{path}: column {name!r} ({role}) has type {schema.field(name).type}; "
                f"it must hold {wanted}, one interaction per row (explode list columns first)"
            )
    table = pq.read_table(path, columns=[c for c in (user, item, value) if c is not None])
    if table.num_rows == 0:
        raise DataError(f"{path} has no interactions")
    return _to_interactions(path, table[user], table[item],
                            table[value] if value is not None else None, "parquet", None, 0)


def _is_id_type(kind: pa.DataType) -> bool:
    return bool(
        pa.types.is_integer(kind) or pa.types.is_string(kind) or pa.types.is_large_string(kind)
    )


# ---- arrow columns -> codes ------------------------------------------------------------------


def _to_interactions(
    path: Path, user: pa.ChunkedArray, item: pa.ChunkedArray, value: pa.ChunkedArray | None,
    fmt: str, check: LineCheck | None, skip: int,
) -> Interactions:
    for col, role in ((user, "user id"), (item, "item id"), (value, "rating")):
        if col is None or (col.null_count == 0 and not _has_empty_string(col)):
            continue
        if check is not None:
            raise locate_bad_line(path, check, skip, f"empty or non-numeric {role}")
        row = int(pc.index(pc.is_null(col), True).as_py())  # parquet: name the row instead
        raise MalformedLineError(path, row + 1, f"a {role} in every row", "null")
    user_codes, user_ids = encode_ids(user, sort=True)
    item_codes, item_ids = encode_ids(item, sort=False)
    values = None
    if value is not None:
        values = value.to_numpy().astype(np.float32, copy=False)
        if not np.isfinite(values).all():
            bad = int(np.flatnonzero(~np.isfinite(values))[0])
            raise MalformedLineError(path, bad + 1 + skip, "a finite rating", str(values[bad]))
    return Interactions(user_codes, item_codes, values, user_ids, item_ids, source=fmt)


def _has_empty_string(col: pa.ChunkedArray) -> bool:
    """An empty id field parses as the id "" (string columns are never null): reject it."""
    if pa.types.is_dictionary(col.type):
        return any(pc.any(pc.equal(c.dictionary, "")).as_py() for c in col.chunks)
    if pa.types.is_string(col.type) or pa.types.is_large_string(col.type):
        return bool(pc.any(pc.equal(col, "")).as_py())
    return False


def encode_ids(col: pa.ChunkedArray, sort: bool) -> tuple[NDArray[np.int32], NDArray[Any]]:
    """(int32 codes, ids): ascending ids when ``sort``, else in order of first appearance.

    Integer (or integral float) ids stay int64 so "ascending" is numeric; anything else is
    dictionary-encoded and only the distinct strings become Python objects.
    """
    if pa.types.is_floating(col.type):
        floats = col.to_numpy()
        if np.all(floats == np.round(floats)):
            col = pa.chunked_array([floats.astype(np.int64)])
        else:
            col = col.cast(pa.string())
    if pa.types.is_integer(col.type):
        return int_codes(col.to_numpy().astype(np.int64, copy=False), sort)
    if not pa.types.is_dictionary(col.type):
        col = col.cast(pa.string()).dictionary_encode()
    # Per-block dictionaries differ; unify them, then work on int32 indices only.
    col = pa.table({"c": col}).unify_dictionaries()["c"]
    dictionary = (col.chunk(0).dictionary if col.num_chunks else pa.array([], pa.string()))
    indices = np.concatenate([c.indices.to_numpy(zero_copy_only=False) for c in col.chunks])
    strings = np.asarray(dictionary.to_pylist(), dtype=object)
    codes, uniques = pd.factorize(indices, sort=False)
    ids = strings[uniques]
    if sort:
        if all(_CANONICAL_INT.fullmatch(s) for s in ids):
            ids = ids.astype(np.int64)  # "ascending user id" is numeric order when it can be
        order = np.argsort(ids, kind="stable")
        rank = np.empty(len(order), dtype=np.int64)
        rank[order] = np.arange(len(order))
        codes, ids = rank[codes], ids[order]
    return codes.astype(np.int32), ids


_CANONICAL_INT = re.compile(r"0|-?[1-9][0-9]{0,17}")


# ---- titles (optional sibling files) ---------------------------------------------------------

_ML1M_LINE = re.compile(r"^(\d+)::(.*)::[^:]*$")


def _titles_100k(path: Path, ids: NDArray[Any]) -> dict[str, str]:
    src, keep = path.parent / "u.item", present_ids(ids)
    if not src.is_file():
        return {}
    titles: dict[str, str] = {}
    for line in src.read_text(encoding="latin-1").splitlines():
        fields = line.split("|")
        if len(fields) > 1 and fields[0] in keep:
            titles[fields[0]] = fields[1]
    return titles


def _titles_1m(path: Path, ids: NDArray[Any]) -> dict[str, str]:
    src, keep = path.parent / "movies.dat", present_ids(ids)
    if not src.is_file():
        return {}
    raw = src.read_bytes()
    try:
        text = raw.decode("utf-8")  # ML-10M is UTF-8
    except UnicodeDecodeError:
        text = raw.decode("latin-1")  # ML-1M is latin-1
    titles: dict[str, str] = {}
    for line in text.splitlines():
        match = _ML1M_LINE.match(line)
        if match and match.group(1) in keep:
            titles[match.group(1)] = match.group(2)
    return titles


def _titles_csv(src: Path, ids: NDArray[Any]) -> dict[str, str]:
    if not src.is_file():
        return {}
    keep = present_ids(ids)
    try:
        movies = pd.read_csv(src, usecols=["movieId", "title"], dtype=str, keep_default_na=False)
    except (ValueError, pd.errors.ParserError):
        return {}  # titles are a nicety; a broken movies.csv must not stop training
    return {m: t for m, t in zip(movies["movieId"], movies["title"], strict=True) if m in keep}
