"""Strong generalisation: whole users are held out, their histories split 80/20 fold-in/targets.

This is the reference notebook's procedure (REFERENCE.md, "The split", steps 3-6), draw for
draw: the same legacy numpy stream (``RandomState(seed)`` gives exactly what
``np.random.seed(seed)`` followed by ``np.random.permutation``/``choice`` gives, without
touching numpy's global state), the same user order, the same "file order" of items.

Users too short to split. The notebook puts a held-out user with fewer than 5 (known) items
wholly into fold-in and gives them no targets, which makes their Recall/NDCG 0/0. We drop
such users from ``HeldOut`` (every row has >= 1 target) but count their clicks in
``val_fold_in``/``test_fold_in`` exactly as the notebook does, so the stats reproduce
REFERENCE.md's tables; ``val_fold_in_short``/``test_fold_in_short`` say how many of those
clicks belong to dropped users: ``HeldOut.fold_in.nnz == <g>_fold_in - <g>_fold_in_short``.
A held-out user all of whose items are unknown to training counts as dropped-short too.
"""

from __future__ import annotations

import hashlib
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp
from numpy.typing import NDArray

from multvae.errors import DataError
from multvae.items import ItemIndex
from training.dataset import HeldOut, Interactions, Split
from training.preprocess import first_occurrences

MIN_ITEMS_TO_SPLIT = 5  # the notebook's threshold: 5 items give int(0.2 * 5) = 1 target
DEFAULT_HELDOUT_FRACTION = 0.1
DEFAULT_HELDOUT_CAP = 10_000  # ML-20M's paper value; larger data keeps 10,000 unless told


def resolve_heldout(n_users: int, n_heldout: int | float | None = None) -> int:
    """Users per held-out group (each of validation and test gets this many).

    ``None``: 10 % of the users, at most 10,000 (at least 1). A float in (0, 1): that fraction
    of the users. An integer (or integral float) >= 1: that count. At least one training user
    must remain, i.e. ``2 * H < n_users``.
    """
    if n_heldout is None:
        h = max(1, min(DEFAULT_HELDOUT_CAP, round(DEFAULT_HELDOUT_FRACTION * n_users)))
    elif isinstance(n_heldout, bool) or n_heldout <= 0:
        raise DataError(f"held-out users {n_heldout!r}: give a count >= 1 or a fraction in (0, 1)")
    elif n_heldout < 1:
        h = max(1, round(n_heldout * n_users))
    elif n_heldout == int(n_heldout):
        h = int(n_heldout)
    else:
        raise DataError(f"held-out users {n_heldout!r} is neither a whole count nor a fraction < 1")
    if 2 * h >= n_users:
        raise DataError(
            f"cannot hold out 2 x {h} users (validation + test) from {n_users} users: "
            "at least one training user must remain; give fewer held-out users"
        )
    return h


def strong_generalisation_split(
    inter: Interactions,
    n_heldout: int | float | None = None,
    seed: int = 98765,
    target_fraction: float = 0.2,
) -> Split:
    """Split preprocessed interactions (rows in file order) into train / validation / test."""
    user, item = inter.user, inter.item
    first = first_occurrences(user, item)
    if not first.all():  # a repeated click must not count twice or be fold-in and target
        user, item = user[first], item[first]
    activity = np.bincount(user, minlength=len(inter.user_ids))
    present = np.flatnonzero(activity)
    ascending = present[np.argsort(inter.user_ids[present], kind="stable")]  # codes by id
    n_users = len(ascending)
    h = resolve_heldout(n_users, n_heldout)

    rs = np.random.RandomState(seed)
    permuted = ascending[rs.permutation(n_users)]
    train_users = permuted[: n_users - 2 * h]
    group = np.zeros(len(inter.user_ids), dtype=np.int8)  # 0 train, 1 validation, 2 test
    group[permuted[n_users - 2 * h : n_users - h]] = 1
    group[permuted[n_users - h :]] = 2
    row_group = group[user]

    # Vocabulary: items clicked by training users, in order of first appearance.
    train_rows = np.flatnonzero(row_group == 0)
    vocab = pd.unique(item[train_rows])
    column = np.full(len(inter.item_ids), -1, dtype=np.int32)  # int32 gathers: N x 4 bytes
    column[vocab] = np.arange(len(vocab))
    n_items = len(vocab)
    row_of_user = np.full(len(inter.user_ids), -1, dtype=np.int32)
    row_of_user[train_users] = np.arange(len(train_users))  # rows in permutation order
    train = _binary_csr(row_of_user[user[train_rows]], column[item[train_rows]],
                        (len(train_users), n_items))
    popularity = np.bincount(train.indices, minlength=n_items).astype(np.int64)

    rank = np.empty(len(inter.user_ids), dtype=np.int64)
    rank[ascending] = np.arange(n_users)
    stats: dict[str, int] = {
        "users": n_users, "train_users": len(train_users), "items": n_items,
        "train_clicks": int(train.nnz), "heldout_clicks_dropped_unknown_item": 0,
        "heldout_users_dropped_short": 0,
    }
    parts: list[HeldOut] = []
    for g, name in ((1, "val"), (2, "test")):
        rows = np.flatnonzero(row_group == g)
        cols = column[item[rows]]
        known = cols >= 0
        stats["heldout_clicks_dropped_unknown_item"] += int((~known).sum())
        part, part_stats = _split_group(
            inter, user[rows[known]], cols[known], rank, ascending, n_items,
            seed, target_fraction,
        )
        stats["heldout_users_dropped_short"] += h - part.n_users
        stats |= {f"{name}_{key}": v for key, v in part_stats.items()}
        parts.append(part)
        if part.n_users == 0:
            raise DataError(
                f"no {name} user has {MIN_ITEMS_TO_SPLIT} or more items known to training; "
                "hold out more users or relax the preprocessing"
            )
    titles = None
    if inter.titles:
        titles = [inter.titles.get(str(i)) for i in inter.item_ids[vocab].tolist()]
    items = ItemIndex.build(inter.item_ids[vocab].tolist(), popularity, titles)
    return Split(train, parts[0], parts[1], items, seed, stats)


def _split_group(
    inter: Interactions, user: NDArray[np.int32], cols: NDArray[np.int32],
    rank: NDArray[np.int64], ascending: NDArray[np.int64], n_items: int,
    seed: int, target_fraction: float,
) -> tuple[HeldOut, dict[str, int]]:
    """One held-out group's clicks (file order, known columns) -> HeldOut and its counts."""
    order = np.argsort(rank[user], kind="stable")  # ascending user id, file order within
    user, cols = user[order], cols[order]
    starts = np.flatnonzero(np.r_[True, user[1:] != user[:-1]]) if len(user) else np.zeros(0, int)
    counts = np.diff(np.r_[starts, len(user)])
    is_target = np.zeros(len(user), dtype=bool)
    evaluated = np.zeros(len(starts), dtype=bool)
    rs = np.random.RandomState(seed)  # re-seeded per group, as the notebook does
    for u, (start, n) in enumerate(zip(starts.tolist(), counts.tolist(), strict=True)):
        if n >= MIN_ITEMS_TO_SPLIT:
            picked = rs.choice(n, size=int(target_fraction * n), replace=False)
            is_target[start + picked] = True
            evaluated[u] = len(picked) > 0
    click_evaluated = np.repeat(evaluated, counts)
    row = np.repeat(np.cumsum(evaluated) - 1, counts)
    shape = (int(evaluated.sum()), n_items)
    fold = click_evaluated & ~is_target
    fold_in = _binary_csr(row[fold], cols[fold], shape)
    targets = _binary_csr(row[is_target], cols[is_target], shape)
    user_ids = inter.user_ids[user[starts[evaluated]]]
    n_targets = int(is_target.sum())
    stats = {
        "fold_in": len(user) - n_targets,  # the notebook's count: short users' clicks included
        "fold_in_short": int((~click_evaluated).sum()),
        "targets": n_targets,
        "users": shape[0],
    }
    return HeldOut(fold_in=fold_in, targets=targets, user_ids=user_ids), stats


def _binary_csr(rows: NDArray[Any], cols: NDArray[Any], shape: tuple[int, int]) -> sp.csr_matrix:
    data = np.ones(len(rows), dtype=np.float32)
    matrix = sp.csr_matrix((data, (rows, cols)), shape=shape)
    matrix.sort_indices()
    return matrix


def data_fingerprint(inter: Interactions) -> str:
    """16 hex digits of sha256 over codes, values and ids: which data a model was trained on."""
    digest = hashlib.sha256()
    for array in (inter.user, inter.item, inter.value):
        digest.update(b"none" if array is None else np.ascontiguousarray(array).tobytes())
    for ids in (inter.user_ids, inter.item_ids):
        if ids.dtype.kind in "iu":
            digest.update(np.ascontiguousarray(ids, dtype=np.int64).tobytes())
        else:
            digest.update("\x1f".join(map(str, ids.tolist())).encode())
    return digest.hexdigest()[:16]
