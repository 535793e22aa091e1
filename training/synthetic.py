"""Synthetic clustered click data whose right answer is known, at the paper datasets' sizes.

Users belong to one of C clusters; each cluster has its own block of items. A click is, with
probability ``in_cluster`` (0.8), an item of the user's block drawn from a power law over the
block, else an item drawn from a global Zipf law. So a model that learns the clusters ranks a
user's held-out items far above popularity, while popularity is still a sane baseline. User
activity is lognormal with a floor (>= 5 clicks, >= 20 for MSD, so that the paper's
preprocessing keeps every user), and every item gets a floor of distinct users.

Rating shapes add ~15 % extra rows rated 1-3 on random popular items, which the paper's
"> 3.5" binarisation removes; what remains has the named shape (users and items exactly,
clicks within a few percent). Everything is vectorised numpy over int32 arrays.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from numpy.typing import NDArray

from multvae.errors import DataError
from training.dataset import Interactions
from training.preprocess import first_occurrences


@dataclass(frozen=True)
class Shape:
    """Target sizes *after* the paper's preprocessing, and how the data is drawn."""

    n_users: int
    n_items: int
    n_clicks: int
    n_clusters: int
    values: str  # "rating" (1-5 stars; clicks are 4-5) or "count" (play counts)
    min_user_clicks: int = 5
    min_item_users: int = 1
    in_cluster: float = 0.8
    description: str = ""


SHAPE_SPECS: dict[str, Shape] = {
    "small": Shape(2_000, 500, 60_000, 5, "rating",
                   description="2,000 users x 500 items, ~60k clicks, 5 clusters (tests, demos)"),
    "ml-20m": Shape(136_677, 20_108, 10_000_000, 50, "rating",
                    description="ML-20M after preprocessing: 136,677 x 20,108, 10.0M clicks"),
    "netflix": Shape(463_435, 17_769, 56_900_000, 50, "rating",
                     description="Netflix after preprocessing: 463,435 x 17,769, 56.9M clicks"),
    "msd": Shape(571_355, 41_140, 33_600_000, 100, "count", min_user_clicks=20,
                 min_item_users=200,
                 description="MSD after preprocessing: 571,355 x 41,140, 33.6M play counts"),
    "1m-items": Shape(200_000, 1_000_000, 10_000_000, 1_000, "count",
                      description="a million-item catalogue: 200,000 users x 1,000,000 items, "
                      "10M play counts, 1,000 clusters (bench/large_catalogue.py)"),
}
SHAPES: dict[str, str] = {name: spec.description for name, spec in SHAPE_SPECS.items()}
WRITE_FORMATS = ("csv", "tsv", "parquet", "msd")

_BLOCK_HEAD = 0.02  # Zipf offsets, as a fraction of the items ranked (see _zipf_ranks)
_GLOBAL_HEAD = 0.0005
_NEGATIVE_FRACTION = 0.15
_TOP_UP_ROUNDS = 8
_OVERDRAW = 1.3


@dataclass
class GroundTruth:
    """The hidden structure: cluster of every user code and block of every item code."""

    user_cluster: NDArray[np.int32]
    item_cluster: NDArray[np.int32]


class _Sampler:
    """Draws items for users from their cluster's block mixed with global popularity."""

    def __init__(self, spec: Shape, rng: np.random.Generator,
                 user_cluster: NDArray[np.int32], activity: NDArray[np.int64]) -> None:
        self.rng, self.user_cluster = rng, user_cluster
        edges = np.arange(spec.n_clusters + 1, dtype=np.int64) * spec.n_items // spec.n_clusters
        self.block_start, self.block_size = edges[:-1], np.diff(edges)
        self.item_block = np.repeat(np.arange(spec.n_clusters, dtype=np.int32), self.block_size)
        # Heavy users draw at most half their block from it (the rest is popular items), as
        # real heavy users range beyond one niche; it also keeps repeats, and top-ups, few.
        half_block = 0.5 * self.block_size[user_cluster]
        self.p_in = np.minimum(spec.in_cluster, half_block / np.maximum(activity, 1))
        # Global popularity is spread over blocks at random, not aligned with block heads.
        self.global_order = rng.permutation(spec.n_items).astype(np.int32)

    def items(self, user: NDArray[np.int32]) -> NDArray[np.int32]:
        out = self.global_items(len(user))
        inside = self.rng.random(len(user)) < self.p_in[user]
        c = self.user_cluster[user[inside]]
        size = self.block_size[c]
        pos = _zipf_ranks(size, np.maximum(1.0, _BLOCK_HEAD * size), self.rng.random(len(c)))
        out[inside] = (self.block_start[c] + pos).astype(np.int32)
        return out

    def long_tail(self, n: int) -> NDArray[np.int32]:
        """Uniform items: top-ups for heavy users, who have taken their block and the hits."""
        return self.rng.integers(0, len(self.global_order), n).astype(np.int32)

    def global_items(self, n: int) -> NDArray[np.int32]:
        n_items = len(self.global_order)
        ranks = _zipf_ranks(np.full(n, n_items), max(1.0, _GLOBAL_HEAD * n_items),
                            self.rng.random(n))
        return self.global_order[ranks]


def _zipf_ranks(size: NDArray[np.int64], head: NDArray[np.float64] | float,
                u: NDArray[np.float64]) -> NDArray[np.int64]:
    """Ranks in [0, size) with P(r) ~ 1 / (r + head), by the inverse of the continuous CDF.

    A pure 1/r law puts a quarter of all draws on the top ten items, so heavy users would
    draw the same few items over and over; the ``head`` offset flattens just the top.
    """
    ranks = head * ((size + head) / head) ** u - head
    return np.minimum(ranks.astype(np.int64), size - 1)


def generate(shape: str, seed: int = 0) -> Interactions:
    """Synthetic interactions of the named shape (see :data:`SHAPES`), deterministic in seed."""
    return generate_with_truth(shape, seed)[0]


def generate_with_truth(shape: str, seed: int = 0) -> tuple[Interactions, GroundTruth]:
    """:func:`generate` plus the clusters it planted (for tests of "the model found them")."""
    if shape not in SHAPE_SPECS:
        raise DataError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPE_SPECS)}")
    spec = SHAPE_SPECS[shape]
    rng = np.random.default_rng(seed)
    user_cluster = rng.integers(0, spec.n_clusters, spec.n_users).astype(np.int32)
    target = _activity(spec, rng)
    sampler = _Sampler(spec, rng, user_cluster, target)
    # Draw ~30 % more than each user needs (repeats collapse), keep the first `target`
    # distinct items of each user; the few users still short get top-up rounds.
    drawn = np.ceil(target * _OVERDRAW).astype(np.int64)
    user = np.repeat(np.arange(spec.n_users, dtype=np.int32), drawn)
    user, item = _dedupe(user, sampler.items(user))  # rows stay grouped by user
    first_row = np.searchsorted(user, np.arange(spec.n_users))
    within = np.arange(len(user)) < first_row[user] + target[user]
    user, item = user[within], item[within]
    for _ in range(_TOP_UP_ROUNDS):  # repeats collapsed: draw again for the users short of target
        deficit = target - np.bincount(user, minlength=spec.n_users)
        if deficit.max() <= 0:
            break
        extra = np.repeat(np.arange(spec.n_users, dtype=np.int32), np.maximum(deficit, 0))
        short = deficit[user] > 0  # only these users' rows can gain repeats: dedupe just them
        again_user, again_item = _dedupe(np.r_[user[short], extra],
                                         np.r_[item[short], sampler.long_tail(len(extra))])
        user, item = np.r_[user[~short], again_user], np.r_[item[~short], again_item]
    user, item = _item_floor(spec, user, item, user_cluster, sampler, rng)
    n_clicks = len(user)
    value: NDArray[np.float32]
    if spec.values == "rating":
        value = np.where(rng.random(n_clicks) < 0.55, 4.0, 5.0).astype(np.float32)
        neg_user = user[rng.integers(0, n_clicks, int(_NEGATIVE_FRACTION * n_clicks))]
        neg_item = sampler.global_items(len(neg_user))
        neg_value = rng.integers(1, 4, len(neg_user)).astype(np.float32)
        user, item = np.r_[user, neg_user], np.r_[item, neg_item]
        value = np.r_[value, neg_value]
        keep = first_occurrences(user, item)  # a rated-low repeat of a click is dropped
        user, item, value = user[keep], item[keep], value[keep]
    else:
        value = np.minimum(rng.zipf(2.0, n_clicks), 500).astype(np.float32)
    # File order: grouped by user, as MovieLens files are. Draws are i.i.d., so the order
    # within a user is already random (top-ups and low ratings merely come last).
    order = np.argsort(user, kind="stable")
    user, item, value = user[order], item[order], value[order]
    item_codes, first_seen = pd.factorize(item, sort=False)
    first_seen = np.asarray(first_seen, dtype=np.int64)
    external = rng.permutation(spec.n_items).astype(np.int64) + 1  # ids hide the blocks
    if spec.values == "count":
        user_ids: NDArray[Any] = np.array([f"U{u:07d}" for u in range(1, spec.n_users + 1)],
                                          dtype=object)
        item_ids: NDArray[Any] = np.array([f"S{i:07d}" for i in external[first_seen]],
                                          dtype=object)
    else:
        user_ids = np.arange(1, spec.n_users + 1, dtype=np.int64)
        item_ids = external[first_seen]
    inter = Interactions(user, item_codes.astype(np.int32), value, user_ids, item_ids,
                         source=f"synthetic-{shape}")
    return inter, GroundTruth(user_cluster, sampler.item_block[first_seen])


def _activity(spec: Shape, rng: np.random.Generator) -> NDArray[np.int64]:
    """Clicks per user: lognormal, floored at the minimum, scaled to the target total."""
    raw = rng.lognormal(0.0, 1.0, spec.n_users)
    cap = max(spec.min_user_clicks, spec.n_items // 4)
    scale = spec.n_clicks / raw.sum()
    for _ in range(20):  # the floor and the cap move the total: rescale a few times
        counts = np.clip(np.round(raw * scale), spec.min_user_clicks, cap)
        scale *= spec.n_clicks / counts.sum()
    return np.clip(np.round(raw * scale), spec.min_user_clicks, cap).astype(np.int64)


def _dedupe(user: NDArray[np.int32], item: NDArray[np.int32]
            ) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    keep = first_occurrences(user, item)
    return user[keep], item[keep]


def _item_floor(
    spec: Shape, user: NDArray[np.int32], item: NDArray[np.int32],
    user_cluster: NDArray[np.int32], sampler: _Sampler, rng: np.random.Generator,
) -> tuple[NDArray[np.int32], NDArray[np.int32]]:
    """Give every item at least ``min_item_users`` users, drawn from the item's own cluster."""
    members = np.argsort(user_cluster, kind="stable").astype(np.int32)
    cluster_start = np.searchsorted(user_cluster[members], np.arange(spec.n_clusters))
    cluster_size = np.bincount(user_cluster, minlength=spec.n_clusters)
    for _ in range(_TOP_UP_ROUNDS):
        deficit = spec.min_item_users - np.bincount(item, minlength=spec.n_items)
        if deficit.max() <= 0:
            break
        extra_item = np.repeat(np.arange(spec.n_items, dtype=np.int32), np.maximum(deficit, 0))
        c = sampler.item_block[extra_item]
        pick = cluster_start[c] + (rng.random(len(c)) * np.maximum(cluster_size[c], 1))
        extra_user = members[np.minimum(pick.astype(np.int64), spec.n_users - 1)]
        user, item = _dedupe(np.r_[user, extra_user], np.r_[item, extra_item])
    return user, item


def write(inter: Interactions, path: str | Path, fmt: str = "csv") -> None:
    """Write interactions so that :func:`training.readers.read_interactions` reads them back.

    ``csv``/``tsv``: header ``userId,movieId,rating,timestamp`` (ML-20M's layout; the value
    column is ``count`` for play counts, ``rating`` otherwise, absent when there is none).
    ``msd``: ``user<TAB>item<TAB>count`` lines without a header (auto-detected when the ids
    are not numeric). ``parquet``: the csv columns.
    """
    if fmt not in WRITE_FORMATS:
        raise DataError(f"cannot write format {fmt!r}; choose one of {', '.join(WRITE_FORMATS)}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    users = pa.DictionaryArray.from_arrays(pa.array(inter.user), _id_array(inter.user_ids))
    items = pa.DictionaryArray.from_arrays(pa.array(inter.item), _id_array(inter.item_ids))
    counts = inter.source.endswith("msd")
    if fmt == "msd":
        plays = np.ones(len(inter), np.int64) if inter.value is None else inter.value
        table = pa.table({"user": users, "item": items,
                          "count": pa.array(np.rint(plays).astype(np.int64))})
        options = pacsv.WriteOptions(include_header=False, delimiter="\t", quoting_style="none")
        pacsv.write_csv(table, path, options)
        return
    columns: dict[str, pa.Array] = {"userId": users, "movieId": items}
    if inter.value is not None:
        columns["count" if counts else "rating"] = pa.array(inter.value)
    # Timestamps only make the file look like MovieLens; nothing reads them.
    columns["timestamp"] = pa.array(1_000_000_000 + np.arange(len(inter), dtype=np.int64))
    table = pa.table(columns)
    if fmt == "parquet":
        pq.write_table(table, path)
        return
    sep = "\t" if fmt == "tsv" else ","
    with path.open("wb") as fh:  # arrow quotes header names; MovieLens headers are bare
        fh.write((sep.join(table.column_names) + "\n").encode())
        options = pacsv.WriteOptions(include_header=False, delimiter=sep)
        pacsv.write_csv(table, fh, options)


def _id_array(ids: NDArray[Any]) -> pa.Array:
    return pa.array(ids.astype(np.int64) if ids.dtype.kind in "iu" else ids.astype(str))
