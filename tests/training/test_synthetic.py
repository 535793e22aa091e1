"""Synthetic data: the promised sizes, a signal a model can find, and files the readers read."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from multvae.errors import DataError
from training.catalog import PRESETS
from training.dataset import Interactions
from training.preprocess import default_preprocessing, filter_interactions
from training.readers import read_interactions
from training.synthetic import SHAPE_SPECS, SHAPES, generate, generate_with_truth, write


def test_shapes_carry_the_papers_sizes() -> None:
    assert set(SHAPES) == {"small", "ml-20m", "netflix", "msd", "1m-items"}
    sizes = {name: (s.n_users, s.n_items, s.n_clicks) for name, s in SHAPE_SPECS.items()}
    assert sizes["ml-20m"] == (136_677, 20_108, 10_000_000)
    assert sizes["netflix"] == (463_435, 17_769, 56_900_000)
    assert sizes["msd"] == (571_355, 41_140, 33_600_000)
    # MSD must survive its own preset: users >= 20 songs, songs >= 200 users.
    msd = SHAPE_SPECS["msd"]
    assert msd.min_user_clicks >= 20
    assert msd.min_item_users >= 200
    assert msd.values == "count"
    assert all(isinstance(text, str) and text for text in SHAPES.values())


def test_small_shape_survives_preprocessing_at_size() -> None:
    inter = generate("small", seed=0)
    assert inter.user.dtype == np.int32
    assert inter.item.dtype == np.int32
    assert inter.value is not None
    assert set(np.unique(inter.value).tolist()) <= {1.0, 2.0, 3.0, 4.0, 5.0}
    kept, stats = filter_interactions(inter, default_preprocessing(True))
    assert (stats["users"], stats["items"]) == (2_000, 500)
    assert stats["users_dropped"] == 0
    assert abs(stats["rows"] - 60_000) < 0.05 * 60_000
    assert stats["rows_below_rating"] > 0  # low ratings exist and are filtered out
    assert np.bincount(kept.user).min() >= 5


def test_same_seed_same_data() -> None:
    a, b, c = generate("small", 3), generate("small", 3), generate("small", 4)
    assert np.array_equal(a.user, b.user)
    assert np.array_equal(a.item, b.item)
    assert np.array_equal(a.item_ids, b.item_ids)
    assert not np.array_equal(a.item_ids[a.item][:1000], c.item_ids[c.item][:1000])
    with pytest.raises(DataError, match="unknown shape"):
        generate("huge")


def recall_at(scores: np.ndarray, targets: sp.csr_matrix, k: int) -> float:
    top = np.argpartition(-scores, k, axis=1)[:, :k]
    hits = np.take_along_axis(targets.toarray(), top, axis=1).sum(axis=1)
    return float(np.mean(hits / np.minimum(k, targets.getnnz(axis=1))))


def test_clusters_beat_popularity() -> None:
    """Scoring by the true cluster's popularity ranks held-out clicks far above popularity."""
    inter, truth = generate_with_truth("small", seed=2)
    assert inter.value is not None
    keep = inter.value > 3.5
    user, item = inter.user[keep], inter.item[keep]
    clicks = sp.csr_matrix((np.ones(len(user)), (user, item)), shape=(2_000, 500))
    # Same-cluster clicks land in the cluster's own block far above chance (1 / 5).
    own = truth.user_cluster[user] == truth.item_cluster[item]
    assert own.mean() > 0.6
    train, test = clicks[:1_600], clicks[1_600:]
    rng = np.random.default_rng(0)
    hidden = test.copy()
    hidden.data = (rng.random(hidden.nnz) < 0.2).astype(float)
    hidden.eliminate_zeros()
    seen = (test - hidden).toarray() > 0
    members = sp.csr_matrix((np.ones(1_600), (truth.user_cluster[:1_600], np.arange(1_600))))
    cluster_pop = np.asarray((members @ train).todense())  # (C, I)
    by_cluster = cluster_pop[truth.user_cluster[1_600:]].astype(float)
    by_popularity = np.tile(np.asarray(train.sum(axis=0)).ravel().astype(float), (400, 1))
    for scores in (by_cluster, by_popularity):
        scores[seen] = -np.inf
    ok = hidden.getnnz(axis=1) > 0
    cluster, popular = (recall_at(s[ok], hidden[ok], 20) for s in (by_cluster, by_popularity))
    assert cluster > 1.5 * popular


def triples(inter: Interactions) -> list[tuple[str, str, float | None]]:
    values = inter.value.tolist() if inter.value is not None else [None] * len(inter)
    return list(zip(map(str, inter.user_ids[inter.user].tolist()),
                    map(str, inter.item_ids[inter.item].tolist()), values, strict=True))


@pytest.mark.parametrize("fmt", ["csv", "tsv", "parquet"])
def test_written_files_read_back(tmp_path: Path, fmt: str) -> None:
    inter = generate("small", seed=1)
    path = tmp_path / f"synthetic.{fmt}"
    write(inter, path, fmt)
    back = read_interactions(path)
    assert triples(back) == triples(inter)
    if fmt == "csv":
        assert path.read_text().splitlines()[0] == "userId,movieId,rating,timestamp"
        assert back.source == "ml-20m"  # auto-detected by the MovieLens header


def test_msd_triplets_read_back(tmp_path: Path) -> None:
    inter = generate("small", seed=1)
    inter.user_ids = np.asarray([f"U{u:05d}" for u in inter.user_ids.tolist()], dtype=object)
    inter.item_ids = np.asarray([f"S{i:05d}" for i in inter.item_ids.tolist()], dtype=object)
    inter.source = "synthetic-msd"
    write(inter, tmp_path / "plays.txt", "msd")
    back = read_interactions(tmp_path / "plays.txt")
    assert back.source == "msd"  # sniffed: TAB triplets, string ids, integer counts
    assert triples(back) == triples(inter)
    write(inter, tmp_path / "plays.csv", "csv")  # counts are not ratings: not read as one
    assert read_interactions(tmp_path / "plays.csv").value is None
    assert PRESETS["msd"].preprocessing.min_rating is None
