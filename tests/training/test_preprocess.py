"""Preprocessing: thresholds, repeats, filter order and file order on hand-built data."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd
import pytest

from multvae.errors import DataError
from training.catalog import PRESETS, Preprocessing
from training.dataset import Interactions
from training.preprocess import default_preprocessing, filter_interactions, first_occurrences


def make(rows: Sequence[tuple[Any, Any, float]], values: bool = True) -> Interactions:
    """Interactions from (user id, item id, value) rows, coded the way the readers code them."""
    users = pd.Series([r[0] for r in rows])
    items = pd.Series([r[1] for r in rows])
    user_codes, user_ids = pd.factorize(users, sort=True)
    item_codes, item_ids = pd.factorize(items, sort=False)
    value = np.asarray([r[2] for r in rows], dtype=np.float32) if values else None
    return Interactions(user_codes.astype(np.int32), item_codes.astype(np.int32), value,
                        np.asarray(user_ids), np.asarray(item_ids))


def triples(inter: Interactions) -> list[tuple[Any, Any]]:
    return list(zip(inter.user_ids[inter.user].tolist(), inter.item_ids[inter.item].tolist(),
                    strict=True))


def test_presets_follow_the_paper() -> None:
    for name in ("ml-20m", "netflix"):
        prep = PRESETS[name].preprocessing
        assert (prep.min_rating, prep.min_user_clicks, prep.min_item_users) == (3.5, 5, 0)
    assert PRESETS["ml-20m"].n_heldout == 10_000
    assert PRESETS["netflix"].n_heldout == 40_000
    msd = PRESETS["msd"]
    assert (msd.preprocessing.min_rating, msd.preprocessing.min_user_clicks,
            msd.preprocessing.min_item_users, msd.n_heldout) == (None, 20, 200, 50_000)
    assert default_preprocessing(True) == Preprocessing(3.5, 5, 0)
    assert default_preprocessing(False) == Preprocessing(None, 5, 0)


def test_binarise_strictly_above_and_drop_light_users() -> None:
    rows = [("a", i, 4.0) for i in range(5)] + [("a", 9, 3.5)]  # a: 5 kept, 3.5 is not > 3.5
    rows += [("b", i, 5.0) for i in range(4)] + [("b", 8, 3.0)]  # b: only 4 kept -> dropped
    kept, stats = filter_interactions(make(rows), Preprocessing(3.5, 5, 0))
    assert triples(kept) == [("a", i) for i in range(5)]
    assert kept.user_ids.tolist() == ["a"]
    assert kept.item_ids.tolist() == [0, 1, 2, 3, 4]
    assert stats["rows_below_rating"] == 2
    assert stats["users_dropped"] == 1
    assert (stats["rows"], stats["users"], stats["items"]) == (5, 1, 5)


def test_repeats_collapse_to_first_kept_row_and_file_order_survives() -> None:
    rows = [("b", "x", 5.0), ("a", "y", 2.0), ("a", "z", 4.0), ("a", "y", 5.0),
            ("b", "x", 4.0), ("a", "x", 4.0)]
    kept, stats = filter_interactions(make(rows), Preprocessing(3.5, 1, 0))
    assert triples(kept) == [("b", "x"), ("a", "z"), ("a", "y"), ("a", "x")]
    assert kept.value is not None
    assert kept.value.tolist() == [5.0, 4.0, 5.0, 4.0]
    assert kept.item_ids.tolist() == ["x", "z", "y"]  # recoded by first appearance
    assert stats["duplicate_rows"] == 1


def test_msd_order_items_first_then_users_once() -> None:
    # Item "rare" has 2 users (< 3) and goes first; that leaves u2 with 1 song (< 2), so u2
    # goes too, which takes "mid" below 3 users -- but the item filter is not run again.
    rows = [("u1", "hit", 1), ("u1", "mid", 1), ("u2", "hit", 1), ("u2", "rare", 1),
            ("u3", "hit", 1), ("u3", "mid", 1), ("u3", "rare", 1), ("u4", "mid", 1)]
    kept, stats = filter_interactions(make(rows), Preprocessing(None, 2, 3))
    assert triples(kept) == [("u1", "hit"), ("u1", "mid"), ("u3", "hit"), ("u3", "mid")]
    assert stats["items_dropped"] == 1
    assert stats["users_dropped"] == 2  # u2 and u4 (1 song each after the item filter)


def test_threshold_without_values_is_an_error() -> None:
    inter = make([("a", 1, 0.0)], values=False)
    with pytest.raises(DataError, match="needs ratings"):
        filter_interactions(inter, Preprocessing(3.5, 1, 0))
    kept, _ = filter_interactions(inter, Preprocessing(None, 1, 0))
    assert len(kept) == 1
    with pytest.raises(DataError, match="no interactions left"):
        filter_interactions(inter, Preprocessing(None, 5, 0))


@pytest.mark.parametrize("grouped", ["user", "item", "none"])
def test_first_occurrences_matches_hashing(grouped: str) -> None:
    rng = np.random.default_rng(3)
    user = rng.integers(0, 40, 3000).astype(np.int32)
    item = rng.integers(0, 25, 3000).astype(np.int32)
    if grouped == "user":
        user = np.sort(user)
    elif grouped == "item":
        item = np.sort(item)
    expected = ~pd.Series(user.astype(np.int64) * 25 + item).duplicated().to_numpy()
    assert (first_occurrences(user, item) == expected).all()
    assert first_occurrences(user[:0], item[:0]).shape == (0,)


def test_filmtrust_ratings_binarise_at_three_by_default(tmp_path: Any) -> None:
    """FilmTrust's 0.5-4 scale: ratings >= 3 are clicks unless the flags say otherwise."""
    from training.pipeline import DataSpec, prepare

    assert default_preprocessing(True, "filmtrust") == Preprocessing(2.5, 5, 0)
    lines = [f"{u} {i} {3.0 if i < 5 else 2.5}" for u in range(1, 41) for i in range(7)]
    (tmp_path / "ratings_0.txt").write_text("\r\n".join(lines) + "\r\n")
    data = prepare(DataSpec(path=str(tmp_path)))
    assert data.preprocessing.min_rating == 2.5
    assert data.filter_stats["rows_below_rating"] == 40 * 2  # the 2.5s
    assert data.split.n_items == 5
    keep_all = prepare(DataSpec(path=str(tmp_path), keep_all_ratings=True))
    assert keep_all.filter_stats["rows_below_rating"] == 0
