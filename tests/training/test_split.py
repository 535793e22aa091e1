"""Strong-generalisation split: the reference statistics, exactly, and its invariants."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from multvae.errors import DataError
from training.catalog import PRESETS
from training.dataset import Interactions, Split
from training.preprocess import filter_interactions
from training.readers import read_interactions
from training.split import data_fingerprint, resolve_heldout, strong_generalisation_split
from training.synthetic import generate

DATA = Path(__file__).parents[2].parent / "shared" / "data"  # ../shared/data beside the repo
COLUMNS = ("users", "train_users", "items", "train_clicks", "val_fold_in", "val_targets",
           "test_fold_in", "test_targets")
# REFERENCE.md, "Split statistics": dataset -> seed -> the table's row.
REFERENCE = {
    "ml-100k": {
        98765: (938, 738, 1415, 43606, 4839, 1161, 4612, 1105),
        12345: (938, 738, 1416, 43089, 4827, 1159, 5043, 1207),
        2024: (938, 738, 1404, 42259, 5561, 1342, 4960, 1188),
    },
    "ml-latest-small": {
        98765: (603, 503, 5697, 39618, 4141, 1008, 2546, 609),
        12345: (603, 503, 5990, 42143, 2690, 649, 2232, 529),
        2024: (603, 503, 5893, 40479, 3149, 758, 3023, 726),
    },
}
FILES = {"ml-100k": "ml-100k/u.data", "ml-latest-small": "ml-latest-small/ratings.csv"}


def reference_data(name: str) -> Interactions:
    path = DATA / FILES[name]
    if not path.is_file():
        pytest.skip(f"{path} is absent (the shared data folder sits beside the repository)")
    kept, _ = filter_interactions(read_interactions(path), PRESETS[name].preprocessing)
    return kept


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_reference_split_statistics_exactly(name: str) -> None:
    kept = reference_data(name)
    for seed, row in REFERENCE[name].items():
        split = strong_generalisation_split(kept, PRESETS[name].n_heldout, seed=seed)
        assert tuple(split.stats[c] for c in COLUMNS) == row, (name, seed)
        check_invariants(split)
        # The one test user of ml-latest-small/98765 with < 5 known items: counted, not scored.
        short = split.stats["heldout_users_dropped_short"]
        assert split.stats["test_users"] + split.stats["val_users"] + short == 2 * (
            PRESETS[name].n_heldout)


def test_targets_are_the_notebooks_draws() -> None:
    """Rebuild the notebook's held-out targets with pandas (groupby visits users ascending)."""
    kept = reference_data("ml-100k")
    seed, h = 98765, 100
    split = strong_generalisation_split(kept, h, seed=seed)
    frame = pd.DataFrame({"uid": kept.user_ids[kept.user], "sid": kept.item_ids[kept.item]})
    uids = np.unique(frame["uid"])
    uids = uids[np.random.RandomState(seed).permutation(len(uids))]
    train_sids = pd.unique(frame.loc[frame["uid"].isin(uids[: -2 * h]), "sid"])
    assert list(split.items.ids) == [str(s) for s in train_sids]
    test = frame[frame["uid"].isin(uids[-h:]) & frame["sid"].isin(train_sids)]
    rs = np.random.RandomState(seed)
    expected: dict[int, set[str]] = {}
    for uid, group in test.groupby("uid"):
        n = len(group)
        if n >= 5:
            picked = rs.choice(n, size=int(0.2 * n), replace=False)
            expected[int(str(uid))] = {str(s) for s in group["sid"].to_numpy()[picked]}
    got = {int(u): {split.items.ids[c] for c in split.test.targets[r].indices}
           for r, u in enumerate(split.test.user_ids)}
    assert got == expected


def check_invariants(split: Split) -> None:
    n_items = split.n_items
    assert split.train.shape[1] == n_items == len(split.items)
    assert (np.diff(split.train.tocsc().indptr) == split.items.popularity).all()
    assert (split.items.popularity > 0).all()  # the vocabulary is what training users clicked
    seen: set[object] = set()
    for part in (split.validation, split.test):
        assert part.fold_in.shape == part.targets.shape == (part.n_users, n_items)
        sizes = np.diff(part.targets.indptr)
        assert (sizes >= 1).all()  # nobody is scored against an empty target set
        total = sizes + np.diff(part.fold_in.indptr)
        assert (sizes == (0.2 * total).astype(int)).all()  # 80/20, as int(0.2 * n)
        assert part.fold_in.multiply(part.targets).nnz == 0  # disjoint
        for m in (part.fold_in, part.targets, split.train):
            assert isinstance(m, sp.csr_matrix)
            assert (m.data == 1).all()
        ids = set(part.user_ids.tolist())
        assert not ids & seen
        seen |= ids
        assert list(part.user_ids) == sorted(part.user_ids)  # ascending original id


def test_invariants_and_determinism_on_synthetic_data() -> None:
    inter = generate("small", seed=1)
    kept, _ = filter_interactions(inter, PRESETS["ml-20m"].preprocessing)
    a = strong_generalisation_split(kept, 150, seed=7)
    b = strong_generalisation_split(kept, 150, seed=7)
    c = strong_generalisation_split(kept, 150, seed=8)
    check_invariants(a)
    assert (a.train - b.train).count_nonzero() == 0
    assert (a.test.targets - b.test.targets).count_nonzero() == 0
    assert a.items.ids == b.items.ids
    assert a.stats == b.stats
    assert a.seed == 7
    assert set(a.test.user_ids.tolist()) != set(c.test.user_ids.tolist())
    assert a.stats["val_users"] == a.stats["test_users"] == 150
    assert a.stats["train_users"] == len(kept.user_ids) - 300 == a.train.shape[0]


def hand_built() -> Interactions:
    """10 users; user 9 (id 90) clicks an item no one else does, user 8 (id 80) has 3 items."""
    users, items = [], []
    for u in range(8):
        for i in range(10):
            users.append(u)
            items.append((u + i) % 12)
    users += [8, 8, 8, 9, 9, 9, 9, 9, 9]
    items += [0, 1, 2, 0, 1, 2, 3, 4, 99]
    item_codes, item_ids = pd.factorize(np.asarray(items), sort=False)
    return Interactions(np.asarray(users, np.int32), item_codes.astype(np.int32), None,
                        np.arange(10, dtype=np.int64) * 10, np.asarray(item_ids),
                        titles={"0": "zero", "1": "one"})


def test_short_users_and_unknown_items_are_counted() -> None:
    inter = hand_built()
    for seed in range(40):  # find seeds putting users 80 and 90 in the held-out groups
        split = strong_generalisation_split(inter, 2, seed=seed)
        heldout = set(split.validation.user_ids.tolist()) | set(split.test.user_ids.tolist())
        stats = split.stats
        if stats["heldout_users_dropped_short"] and stats["heldout_clicks_dropped_unknown_item"]:
            break
    else:
        pytest.fail("no seed held out both special users")
    assert 80 not in heldout  # too short: dropped from evaluation ...
    assert stats["val_fold_in_short"] + stats["test_fold_in_short"] == 3  # ... clicks counted
    assert "99" not in split.items.ids
    for name, part in (("val", split.validation), ("test", split.test)):
        assert part.fold_in.nnz == stats[f"{name}_fold_in"] - stats[f"{name}_fold_in_short"]
        assert part.targets.nnz == stats[f"{name}_targets"]
    assert split.items.titles is not None
    assert split.items.titles[split.items.ids.index("0")] == "zero"
    assert split.items.titles[split.items.ids.index("5")] is None


def test_resolve_heldout() -> None:
    assert resolve_heldout(136_677) == 10_000
    assert resolve_heldout(938) == 94
    assert resolve_heldout(938, 100) == 100
    assert resolve_heldout(938, 100.0) == 100
    assert resolve_heldout(1000, 0.05) == 50
    assert resolve_heldout(3) == 1
    for bad in (0, -1, 2.5, True):
        with pytest.raises(DataError):
            resolve_heldout(1000, bad)
    with pytest.raises(DataError, match="at least one training user"):
        resolve_heldout(10, 5)
    with pytest.raises(DataError):
        resolve_heldout(2)


def test_no_evaluable_user_is_an_error() -> None:
    inter = Interactions(np.asarray([0, 0, 1, 2], np.int32), np.asarray([0, 1, 0, 1], np.int32),
                         None, np.asarray([1, 2, 3]), np.asarray([5, 6]))
    with pytest.raises(DataError, match="no val user"):
        strong_generalisation_split(inter, 1)


def test_fingerprint_is_stable_and_sensitive() -> None:
    inter = hand_built()
    assert data_fingerprint(inter) == data_fingerprint(hand_built())
    assert len(data_fingerprint(inter)) == 16
    inter.item[0] = 5
    assert data_fingerprint(inter) != data_fingerprint(hand_built())
