"""Interaction files -> :class:`Interactions`: each paper dataset's raw layout, generic tables.

Every big format is parsed by a C parser (pyarrow, or pandas for Netflix) with explicit
dtypes; Python only ever loops over a few lines (sniffing), per-movie headers, titles files,
or - when a parser fails - over the file once more to name the first bad line. CSV/TSV, the
headerless layouts and Parquet (a file or a directory of files) are streamed: each block of
rows is encoded to int32 codes as it comes (:class:`IdEncoder`) and dropped, so no table of
every row is ever held; only each batch's distinct ids become Python objects.
"""

from __future__ import annotations

import csv
import re
from collections.abc import Callable, Iterable, Iterator
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
BLOCK_BYTES = 1 << 24  # text read per batch
BATCH_ROWS = 1 << 20  # Parquet rows per batch

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
    if fmt == "parquet":
        return _read_parquet(path, user_col, item_col, rating_col)
    if path.is_dir():
        raise DataError(f"{path} is a directory; format {fmt!r} reads one file (parquet reads "
                        "a directory of .parquet files)")
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
        if any(path.rglob("*.parquet")):
            return path, "parquet"
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
    batches = _arrow_csv(path, check, delim, names, column_types, [user, item, value], False)
    inter = stream_interactions(path, batches, user, item, value, fmt, check, 0)
    if titles is not None:
        inter.titles = titles(path, inter.item_ids)
    return inter


def _arrow_csv(
    path: Path, check: LineCheck, delim: str, names: list[str] | None,
    column_types: dict[str, pa.DataType], include: list[str], header: bool,
) -> Iterator[tuple[Path, pa.RecordBatch]]:
    """The file's rows, one 16 MB block at a time (the types are fixed by the first block)."""
    read = pacsv.ReadOptions(column_names=names, skip_rows=0, block_size=BLOCK_BYTES)
    parse = pacsv.ParseOptions(delimiter=delim, quote_char='"' if header else False)
    convert = pacsv.ConvertOptions(
        column_types=column_types, include_columns=include,
        auto_dict_encode=True, auto_dict_max_cardinality=2**30,
    )
    try:
        reader = pacsv.open_csv(path, read_options=read, parse_options=parse,
                                convert_options=convert)
        for batch in reader:
            yield path, batch
    except (pa.ArrowInvalid, pa.ArrowTypeError) as exc:
        raise locate_bad_line(path, check, skip=int(header), cause=str(exc)) from exc


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
    for part in parts:
        if part.stat().st_size == 0:
            raise DataError(f"{part} is empty")
    batches = (pair for part in parts
               for pair in _arrow_csv(part, check, " ", names, types, names, False))
    return stream_interactions(path, batches, "user", "item", "rating", "filmtrust", check, 0)


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
    batches = _arrow_csv(path, check, sep, None, types, wanted, True)
    inter = stream_interactions(path, batches, user, item, value, fmt, check, 1)
    if fmt == "ml-20m":
        inter.titles = _titles_csv(path.parent / "movies.csv", inter.item_ids)
    return inter


def _read_parquet(path: Path, user_col: str | None, item_col: str | None,
                  rating_col: str | None) -> Interactions:
    """One Parquet file, or a directory of them (daily partitions, say) read as one data set.

    A directory's files (``*.parquet`` at any depth, none hidden) are read in path order, so
    dated names give chronological order; every file must have the columns the first has.
    """
    files = _parquet_files(path) if path.is_dir() else [path]
    try:
        schema = pq.read_schema(files[0])
    except (pa.ArrowInvalid, OSError) as exc:
        raise DataError(f"{files[0]} is not a readable parquet file: {exc}") from exc
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
                f"{files[0]}: column {name!r} ({role}) has type {schema.field(name).type}; "
                f"it must hold {wanted}, one interaction per row (explode list columns first)"
            )
    columns = [c for c in (user, item, value) if c is not None]
    batches = _parquet_batches(path, files, columns)
    return stream_interactions(path, batches, user, item, value, "parquet", None, 0)


def _parquet_files(directory: Path) -> list[Path]:
    files = sorted(
        p for p in directory.rglob("*.parquet")
        if p.is_file() and not any(part.startswith((".", "_"))
                                   for part in p.relative_to(directory).parts)
    )
    if not files:
        raise DataError(f"{directory} is a directory without .parquet files")
    return files


def _parquet_batches(
    path: Path, files: list[Path], columns: list[str]
) -> Iterator[tuple[Path, pa.RecordBatch]]:
    for file in files:
        try:
            parquet = pq.ParquetFile(file)
        except (pa.ArrowInvalid, OSError) as exc:
            raise DataError(f"{file} is not a readable parquet file: {exc}") from exc
        missing = [c for c in columns if c not in parquet.schema_arrow.names]
        if missing:
            raise DataError(
                f"{file} has no column {missing[0]!r}; every file of {path} needs the "
                f"columns {columns} (its columns are {parquet.schema_arrow.names})"
            )
        for batch in parquet.iter_batches(batch_size=BATCH_ROWS, columns=columns):
            yield file, batch


def _is_id_type(kind: pa.DataType) -> bool:
    # Floats too: whole-number float ids are read as integers, NaN is refused per batch.
    return bool(
        pa.types.is_integer(kind) or pa.types.is_floating(kind) or pa.types.is_string(kind)
        or pa.types.is_large_string(kind)
    )


# ---- arrow columns -> codes ------------------------------------------------------------------


def stream_interactions(
    path: Path, batches: Iterable[tuple[Path, pa.RecordBatch]], user: str, item: str,
    value: str | None, fmt: str, check: LineCheck | None, skip: int,
) -> Interactions:
    """Encode ``(source file, batch)`` pairs as they come; no table of every row is ever held.

    What is kept per row is the codes (int32 user, int32 item, float32 value); per distinct id
    one dictionary entry. A missing id or value names the first bad line (``check``: text
    files, whose lines it re-reads) or row (Parquet) of its source file.
    """
    users, items = IdEncoder(), IdEncoder()
    values: list[NDArray[np.float32]] = []
    source, offset, rows = path, 0, 0  # offset: rows of ``source`` before this batch
    for part, batch in batches:
        if part != source:
            source, offset = part, 0
        for encoder, name, role in ((users, user, "user id"), (items, item, "item id")):
            bad = encoder.add(batch.column(name), f"{source}: column {name!r}")
            if bad is not None:
                raise _missing(source, check, skip, role, offset + bad)
        if value is not None:
            column = batch.column(value)
            if column.null_count:
                bad = int(pc.index(pc.is_null(column), True).as_py())
                raise _missing(source, check, skip, "rating", offset + bad)
            numbers = column.to_numpy(zero_copy_only=False).astype(np.float32, copy=False)
            if not np.isfinite(numbers).all():
                bad = int(np.flatnonzero(~np.isfinite(numbers))[0])
                raise MalformedLineError(source, offset + bad + 1 + skip, "a finite rating",
                                         str(numbers[bad]))
            values.append(numbers)
        offset += batch.num_rows
        rows += batch.num_rows
    if rows == 0:
        raise DataError(f"{path} has no interactions")
    user_codes, user_ids = users.finish(sort=True)
    item_codes, item_ids = items.finish(sort=False)
    value_array = np.concatenate(values) if value is not None else None
    return Interactions(user_codes, item_codes, value_array, user_ids, item_ids, source=fmt)


def _missing(source: Path, check: LineCheck | None, skip: int, role: str, row: int) -> DataError:
    if check is not None:
        return locate_bad_line(source, check, skip, f"empty or non-numeric {role}")
    return MalformedLineError(source, row + 1, f"a {role} in every row", "null")


class IdEncoder:
    """Ids -> int32 codes in order of first appearance, fed one batch at a time.

    Integer (or, over the whole column, integral float) ids stay int64 so that "ascending" is
    numeric; anything else becomes strings. Only a batch's distinct ids reach Python (a dict
    from id to code); its rows stay numpy.
    """

    def __init__(self) -> None:
        self.codes: dict[Any, int] = {}
        self.chunks: list[NDArray[np.int32]] = []
        self.kind: str | None = None  # "int", "float" or "str": one per column

    def add(self, column: pa.Array, where: str) -> int | None:
        """Encode one batch's column; the position of its first missing id, if any."""
        if column.null_count:
            return int(pc.index(pc.is_null(column), True).as_py())
        if pa.types.is_integer(column.type) or pa.types.is_floating(column.type):
            kind = "float" if pa.types.is_floating(column.type) else "int"
            local, uniques = pd.factorize(column.to_numpy(zero_copy_only=False), sort=False)
            if (local < 0).any():  # NaN: no id
                return int(np.argmax(local < 0))
            keys = uniques.tolist()
        else:
            kind = "str"
            text = column.type.value_type if pa.types.is_dictionary(column.type) else column.type
            if not (pa.types.is_string(text) or pa.types.is_large_string(text)):
                raise DataError(f"{where} holds {column.type}; ids must be strings or integers, "
                                "one interaction per row (explode list columns first)")
            if not pa.types.is_dictionary(column.type):
                column = column.dictionary_encode()
            indices = column.indices.to_numpy(zero_copy_only=False)
            local, used = pd.factorize(indices, sort=False)
            keys = column.dictionary.take(pa.array(used)).cast(pa.string()).to_pylist()
            if "" in keys:  # an empty field parses as the id "": reject it
                return int(np.argmax(local == keys.index("")))
        if self.kind is not None and kind != self.kind:
            raise DataError(f"{where} holds {kind} ids where earlier rows had {self.kind} "
                            "ids; every file of a data set needs the same column types")
        self.kind = kind
        codes = self.codes
        known = np.fromiter((codes.setdefault(k, len(codes)) for k in keys), dtype=np.int32,
                            count=len(keys))
        self.chunks.append(known[local])
        return None

    def finish(self, sort: bool) -> tuple[NDArray[np.int32], NDArray[Any]]:
        """(codes, ids): ids in order of first appearance, or ascending when ``sort``."""
        codes = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int32)
        self.chunks = []
        ids: NDArray[Any]
        if self.kind == "float":
            floats = np.fromiter(self.codes, dtype=np.float64, count=len(self.codes))
            if np.all(floats == np.round(floats)):
                ids = floats.astype(np.int64)
            else:
                ids = np.asarray(pa.array(floats).cast(pa.string()).to_pylist(), dtype=object)
        elif self.kind == "int":
            ids = np.fromiter(self.codes, dtype=np.int64, count=len(self.codes))
        else:
            ids = np.asarray(list(self.codes), dtype=object)
        if sort:
            if ids.dtype == object and all(_CANONICAL_INT.fullmatch(s) for s in ids):
                ids = ids.astype(np.int64)  # "ascending user id" is numeric order when it can be
            order = np.argsort(ids, kind="stable")
            rank = np.empty(len(order), dtype=np.int32)
            rank[order] = np.arange(len(order), dtype=np.int32)
            codes, ids = rank[codes], ids[order]
        return codes, ids


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
