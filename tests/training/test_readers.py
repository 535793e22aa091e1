"""Readers: each raw layout on tiny files written the way the real datasets are."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from multvae.errors import DataError, MalformedLineError
from training.catalog import FORMATS
from training.dataset import Interactions
from training.readers import detect_format, read_interactions

U_DATA = "196\t242\t3\t881250949\n186\t302\t3\t891717742\n196\t377\t5\t878887116\n22\t242\t4.5\t1\n"


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def test_ml100k_codes_follow_first_appearance_and_users_ascend(tmp_path: Path) -> None:
    path = write(tmp_path / "u.data", U_DATA)
    write(tmp_path / "u.item", "242|Kolya (1996)|24-Jan-1997||http://x|0|1\n"
          "302|L.A. Confidential (1997)|01-Jan-1997||http://x|0\n377|Fête (1990)|x\n", "latin-1")
    inter = read_interactions(path)
    assert inter.source == "ml-100k"
    assert inter.item_ids.tolist() == [242, 302, 377]  # first appearance, not sorted
    assert inter.item.tolist() == [0, 1, 2, 0]
    assert inter.user_ids.dtype == np.int64
    assert inter.user_ids.tolist() == [22, 186, 196]  # numeric ascending
    assert inter.user_ids[inter.user].tolist() == [196, 186, 196, 22]
    assert inter.value is not None
    assert inter.value.dtype == np.float32
    assert inter.value.tolist() == [3.0, 3.0, 5.0, 4.5]
    assert inter.user.dtype == np.int32
    assert inter.item.dtype == np.int32
    assert inter.titles == {"242": "Kolya (1996)", "302": "L.A. Confidential (1997)",
                            "377": "Fête (1990)"}


def test_ml1m_double_colon_layout_and_latin1_titles(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.dat", "1::1193::5::978300760\n1::661::3::978302109\n"
                 "2::1193::4.5::978298413\n")
    write(tmp_path / "movies.dat", "1193::One Flew Over the Cuckoo's Nest (1975)::Drama\n"
          "661::Amélie: le fabuleux (2001)::Comedy\n", "latin-1")
    inter = read_interactions(path)
    assert inter.source == "ml-1m"
    assert inter.item_ids.tolist() == [1193, 661]
    assert inter.user.tolist() == [0, 0, 1]
    assert inter.value is not None
    assert inter.value.tolist() == [5.0, 3.0, 4.5]
    assert inter.titles["661"] == "Amélie: le fabuleux (2001)"
    assert read_interactions(path, "ml-10m").item_ids.tolist() == [1193, 661]


def test_ml20m_csv_with_movies_titles(tmp_path: Path) -> None:
    path = write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n"
                 "2,50,3.5,1\n1,10,4.0,2\n2,10,5.0,3\n")
    write(tmp_path / "movies.csv", 'movieId,title,genres\n10,"Heat, the (1995)",Action\n'
          "50,Usual Suspects (1995),Crime\n")
    inter = read_interactions(path)
    assert inter.source == "ml-20m"
    assert inter.item_ids.tolist() == [50, 10]
    assert inter.user_ids.tolist() == [1, 2]
    assert inter.user.tolist() == [1, 0, 1]
    assert inter.titles == {"10": "Heat, the (1995)", "50": "Usual Suspects (1995)"}


NETFLIX_MOVIES = {
    1: "1:\n1488844,3,2005-09-06\n822109,5,2005-05-13\n",
    2: "2:\r\n2059652,4,2005-09-05\r\n1488844,1,2005-12-01\r\n",  # Windows line ends
    3: "3:\n822109,4,2004-01-01\n\n",
}


def expect_netflix(inter_user_ids: list[int], inter: Interactions) -> None:
    assert inter.source == "netflix"
    assert inter.value is not None
    assert inter.item_ids.tolist() == [1, 2, 3]
    assert inter.item.tolist() == [0, 0, 1, 1, 2]
    assert inter.user_ids.tolist() == inter_user_ids
    assert inter.user_ids[inter.user].tolist() == [1488844, 822109, 2059652, 1488844, 822109]
    assert inter.value.tolist() == [3.0, 5.0, 4.0, 1.0, 4.0]


@pytest.mark.parametrize("sub", ["", "training_set"])
def test_netflix_per_movie_files(tmp_path: Path, sub: str) -> None:
    for movie, text in NETFLIX_MOVIES.items():
        write(tmp_path / sub / f"mv_{movie:07d}.txt", text)
    write(tmp_path / "movie_titles.txt", "1,2003,Dinosaur Planet\n2,2004,Isle of Man, The\n"
          "3,1997,Character\n", "latin-1")
    inter = read_interactions(tmp_path)
    expect_netflix([822109, 1488844, 2059652], inter)
    assert inter.titles["2"] == "Isle of Man, The"


def test_netflix_combined_files_match_per_movie_files(tmp_path: Path) -> None:
    write(tmp_path / "combined_data_1.txt", NETFLIX_MOVIES[1] + NETFLIX_MOVIES[2])
    write(tmp_path / "combined_data_2.txt", NETFLIX_MOVIES[3])
    inter = read_interactions(tmp_path, "netflix")
    expect_netflix([822109, 1488844, 2059652], inter)
    assert inter.titles == {}


def test_netflix_bad_line_names_the_file_and_line(tmp_path: Path) -> None:
    write(tmp_path / "mv_0000001.txt", NETFLIX_MOVIES[1])
    bad = write(tmp_path / "mv_0000002.txt", "2:\n2059652,4,2005-09-05\n1488844,x,2005-12-01\n")
    with pytest.raises(MalformedLineError) as err:
        read_interactions(tmp_path)
    assert err.value.path == str(bad)
    assert err.value.line == 3
    assert "1488844,x" in str(err.value)


@pytest.mark.parametrize(
    ("text", "line"),
    [("822109,4,2004-01-01\n", 1), ("1:\n1,4,x\n\n2,4,x\n", 3), ("1:\n1,4,x\n2:x\n", 3)],
)
def test_netflix_combined_layout_errors(tmp_path: Path, text: str, line: int) -> None:
    write(tmp_path / "combined_data_1.txt", text)
    with pytest.raises(MalformedLineError) as err:
        read_interactions(tmp_path)
    assert err.value.line == line


def test_msd_triplets_keep_string_ids_and_counts(tmp_path: Path) -> None:
    path = write(tmp_path / "train_triplets.txt",
                 "b80344d063b5ccb3212f76538f3d9e43d87dca9e\tSOAKIMP12A8C130995\t1\n"
                 "b80344d063b5ccb3212f76538f3d9e43d87dca9e\tSOBBMDR12A8C13253B\t2\n"
                 "85c1f87fea955d09b4bec2e36aee110927aab90e\tSOAKIMP12A8C130995\t7\n")
    inter = read_interactions(path)
    assert inter.source == "msd"
    assert inter.item_ids.tolist() == ["SOAKIMP12A8C130995", "SOBBMDR12A8C13253B"]
    assert inter.user_ids.tolist() == ["85c1f87fea955d09b4bec2e36aee110927aab90e",
                                       "b80344d063b5ccb3212f76538f3d9e43d87dca9e"]
    assert inter.user.tolist() == [1, 1, 0]
    assert inter.item.tolist() == [0, 1, 0]
    assert inter.value is not None
    assert inter.value.tolist() == [1.0, 2.0, 7.0]


def test_generic_csv_tsv_and_parquet(tmp_path: Path) -> None:
    csv = write(tmp_path / "plays.csv",
                "ts,listener,track,plays\n1,u2,t9,3\n2,u1,t9,1\n3,u2,t1,2\n")
    inter = read_interactions(csv, user_col="listener", item_col="track", rating_col="plays")
    assert inter.source == "csv"
    assert inter.user_ids.tolist() == ["u1", "u2"]
    assert inter.item_ids.tolist() == ["t9", "t1"]
    assert inter.value is not None
    assert inter.value.tolist() == [3.0, 1.0, 2.0]
    clicks = read_interactions(csv, user_col="listener", item_col="track")
    assert clicks.value is None

    tsv = write(tmp_path / "x.tsv", "user_id\titem_id\trating\n5\t7\t4\n3\t7\t2\n")
    inter = read_interactions(tsv)  # common column names; "rating" is picked up
    assert inter.user_ids.tolist() == [3, 5]
    assert inter.value is not None

    semi = write(tmp_path / "semi.csv", "user;song\n1;a\n1;b\n")
    assert read_interactions(semi, sep=";").item_ids.tolist() == ["a", "b"]

    table = pa.table({"userId": ["b", "a", "b"], "movieId": [30, 10, 30],
                      "rating": [4.0, 5.0, 1.0]})
    pq.write_table(table, tmp_path / "r.parquet")
    inter = read_interactions(tmp_path / "r.parquet")
    assert inter.source == "parquet"
    assert inter.user_ids.tolist() == ["a", "b"]
    assert inter.item_ids.tolist() == [30, 10]
    assert inter.user.tolist() == [1, 0, 1]


def test_parquet_null_names_the_row(tmp_path: Path) -> None:
    pq.write_table(pa.table({"user": [1, None], "item": [2, 3]}), tmp_path / "n.parquet")
    with pytest.raises(MalformedLineError, match="line 2"):
        read_interactions(tmp_path / "n.parquet")


def test_unknown_columns_are_named(tmp_path: Path) -> None:
    path = write(tmp_path / "x.csv", "a,b\n1,2\n")
    with pytest.raises(DataError, match=r"user column.*\['a', 'b'\]"):
        read_interactions(path)
    with pytest.raises(DataError, match="no item column 'zz'"):
        read_interactions(path, user_col="a", item_col="zz")


@pytest.mark.parametrize(
    ("name", "text", "line", "what"),
    [
        ("u.data", "1\t2\t3\t4\n1\t3\t4\n", 2, "4 fields"),
        ("u.data", "1\t2\t3\t4\n1\t3\t4\t5\t6\n", 2, "4 fields"),
        ("u.data", "1\t2\t3\t4\n1\t3\tgood\t5\n", 2, "field 3 a number"),
        ("u.data", "1\t2\t3\t4\nx\t3\t4\t5\n", 2, "field 1 a number"),
        ("ratings.dat", "1::2::3::4\n1::2::3::4\n1:2::3::4\n", 3, "4 fields"),
        ("ratings.csv", "userId,movieId,rating,timestamp\n1,2,3,4\n1,2,,4\n", 3, "not empty"),
        ("train_triplets.txt", "u\ts\t1\nu\ts2\t1.5\n", 2, "field 3 a number"),
        ("train_triplets.txt", "u\ts\t1\n\ts2\t1\n", 2, "field 1 not empty"),
        ("ratings.csv", "userId,movieId,rating\na,2,3\n,2,4\n", 3, "field 1 not empty"),
    ],
)
def test_malformed_line_names_file_and_line(
    tmp_path: Path, name: str, text: str, line: int, what: str
) -> None:
    path = write(tmp_path / name, text)
    with pytest.raises(MalformedLineError) as err:
        read_interactions(path)
    assert err.value.path == str(path)
    assert err.value.line == line
    assert what in str(err.value)
    assert f"line {line}" in str(err.value)


def test_missing_empty_and_headeronly_files(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"nope\.csv"):
        read_interactions(tmp_path / "nope.csv")
    with pytest.raises(DataError, match="empty"):
        read_interactions(write(tmp_path / "u.data", ""))
    with pytest.raises(DataError, match="no interactions"):
        read_interactions(write(tmp_path / "ratings.csv", "userId,movieId,rating,timestamp\n"))
    with pytest.raises(DataError, match="neither"):
        read_interactions(tmp_path, "netflix")
    write(tmp_path / "nf" / "combined_data_1.txt", "\n")
    with pytest.raises(DataError, match="no ratings"):
        read_interactions(tmp_path / "nf")


def test_detect_format(tmp_path: Path) -> None:
    cases = {
        "u.data": ("1\t2\t3\t4\n", "ml-100k"),
        "ratings.dat": ("1::2::3::4\n", "ml-1m"),
        "ratings.csv": ("userId,movieId,rating,timestamp\n1,2,3,4\n", "ml-20m"),
        "other.csv": ("user,item\n1,2\n", "csv"),
        "x.tsv": ("user\titem\n1\t2\n", "tsv"),
        "train_triplets.txt": ("a\tb\t1\n", "msd"),
        "plays.txt": ("ab12\tSOX\t3\nab13\tSOY\t1\n", "msd"),
    }
    for name, (text, fmt) in cases.items():
        path = write(tmp_path / name.replace(".", "_") / name, text)
        assert detect_format(path) == (path, fmt), name
        if name in ("u.data", "ratings.dat", "ratings.csv", "train_triplets.txt"):
            assert detect_format(path.parent) == (path, fmt)  # the dataset's folder works too
    pq.write_table(pa.table({"user": [1], "item": [2]}), tmp_path / "a.parquet")
    assert detect_format(tmp_path / "a.parquet")[1] == "parquet"
    write(tmp_path / "nf" / "training_set" / "mv_0000001.txt", "1:\n1,2,x\n")
    assert detect_format(tmp_path / "nf")[1] == "netflix"
    mystery = write(tmp_path / "data.bin", "1 2 3\n")
    with pytest.raises(DataError) as err:
        read_interactions(mystery)
    assert all(fmt in str(err.value) for fmt in FORMATS)
    with pytest.raises(DataError, match="unknown format 'xml'"):
        read_interactions(mystery, "xml")


def test_generic_csv_keeps_ids_with_leading_zeros_apart(tmp_path: Path) -> None:
    path = tmp_path / "clicks.csv"
    path.write_text("user,item\n10,007\n10,7\n9,007\n")
    inter = read_interactions(path, "csv")
    assert sorted(str(i) for i in inter.item_ids) == ["007", "7"]
    assert inter.user_ids.tolist() == [9, 10]  # canonical integers still sort numerically


# ---- FilmTrust and CiteULike -----------------------------------------------------------------

SHARED = Path(__file__).parents[2].parent / "shared" / "data"  # ../shared/data beside the repo


def test_filmtrust_directory_concatenates_parts_in_number_order(tmp_path: Path) -> None:
    # Parts 0 and 2 CRLF, 1 and 10 LF, as released; "10" sorts after "2" by number.
    write(tmp_path / "ft" / "ratings_10.txt", "5 30 0.5\n")
    write(tmp_path / "ft" / "ratings_2.txt", "3 10 4\r\n3 20 2.5\r\n")
    write(tmp_path / "ft" / "ratings_1.txt", "1 20 3\n1 10 3.5\n")
    write(tmp_path / "ft" / "ratings_0.txt", "2 10 1\r\n")
    write(tmp_path / "ft" / "trust.txt", "1 2 1\r\n")
    assert detect_format(tmp_path / "ft") == (tmp_path / "ft", "filmtrust")
    inter = read_interactions(tmp_path / "ft")
    assert inter.source == "filmtrust"
    assert inter.user_ids.tolist() == [1, 2, 3, 5]
    assert inter.user_ids[inter.user].tolist() == [2, 1, 1, 3, 3, 5]
    assert inter.item_ids[inter.item].tolist() == [10, 20, 10, 10, 20, 30]
    assert inter.value is not None
    assert inter.value.tolist() == [1.0, 3.0, 3.5, 4.0, 2.5, 0.5]
    one = read_interactions(tmp_path / "ft" / "ratings_2.txt", "filmtrust")  # a part alone
    assert one.value is not None
    assert one.value.tolist() == [4.0, 2.5]


def test_filmtrust_errors_name_the_part_and_line(tmp_path: Path) -> None:
    write(tmp_path / "ft" / "ratings_0.txt", "1 10 3\r\n")
    write(tmp_path / "ft" / "ratings_1.txt", "1 11 3\n2 12 three\n")
    with pytest.raises(MalformedLineError) as err:
        read_interactions(tmp_path / "ft")
    assert err.value.path.endswith("ratings_1.txt")
    assert err.value.line == 2
    assert "3 fields separated by ' '" in str(err.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"no ratings_<n>\.txt"):
        read_interactions(tmp_path / "empty", "filmtrust")


def test_citeulike_users_dat_line_number_is_the_user(tmp_path: Path) -> None:
    path = write(tmp_path / "ct" / "users.dat", "2 7 3\n0\n3 3 9 7\r\n1 9\n")
    assert detect_format(tmp_path / "ct") == (path, "citeulike")
    inter = read_interactions(tmp_path / "ct", "citeulike-t")
    assert inter.source == "citeulike"
    assert inter.value is None  # implicit: every pair is a click
    assert inter.user_ids.tolist() == [0, 2, 3]  # user 1 saved nothing
    assert inter.user_ids[inter.user].tolist() == [0, 0, 2, 2, 2, 3]
    assert inter.item_ids[inter.item].tolist() == [7, 3, 3, 9, 7, 9]


@pytest.mark.parametrize("line", ["3 1 2", "2 1 x", "1 -4", "", "1.0 2"])
def test_citeulike_bad_line_says_what_a_line_holds(tmp_path: Path, line: str) -> None:
    path = write(tmp_path / "users.dat", f"1 5\n{line}\n1 6\n")
    with pytest.raises(MalformedLineError) as err:
        read_interactions(path)
    assert err.value.line == 2
    assert "item count n followed by n item ids" in str(err.value)


@pytest.mark.parametrize(
    ("folder", "fmt", "rows", "users", "items"),
    [("filmtrust", "filmtrust", 35_497, 1_508, 2_071),
     ("citeulike-t", "citeulike", 134_860, 7_947, 25_584)],
)
def test_shared_filmtrust_and_citeulike_match_their_notes(
    folder: str, fmt: str, rows: int, users: int, items: int
) -> None:
    path = SHARED / folder
    if not path.is_dir():
        pytest.skip(f"{path} is absent (the shared data folder sits beside the repository)")
    inter = read_interactions(path)  # auto-detected from the directory
    assert (inter.source, len(inter), len(inter.user_ids), len(inter.item_ids)) == (
        fmt, rows, users, items)
