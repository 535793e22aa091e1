"""Top-N through a FAISS inner-product index: candidates scored exactly equal exact top-N."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE
from multvae.recommend import Query, Recommender
from multvae.topn_index import IndexSpec, TopNIndex

pytest.importorskip(
    "faiss", reason="faiss is not installed: pip install 'multvae-rec[faiss]' (in the dev extra)"
)


def _model(n_items: int, seed: int = 0) -> MultVAE:
    torch.manual_seed(seed)
    model = MultVAE(ModelConfig(p_dims=(8, 32, n_items)))
    with torch.no_grad():  # a spread of popularity, as a trained output layer has
        model.output_layer.bias.copy_(torch.randn(n_items))
    return model.eval()


def _items(n_items: int) -> ItemIndex:
    return ItemIndex.build([f"i{c}" for c in range(n_items)], np.arange(n_items)[::-1].copy())


def _queries(n_items: int, count: int, rng: np.random.Generator) -> list[Query]:
    out = []
    for _ in range(count):
        history = rng.choice(n_items, size=rng.integers(1, 30), replace=False)
        exclude = rng.choice(n_items, size=3, replace=False)
        out.append(Query([f"i{c}" for c in history], 20, [f"i{c}" for c in exclude]))
    return out


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
def test_exhaustive_index_gives_exactly_the_exact_top_n(metric: str) -> None:
    model, items = _model(500), _items(500)
    exact = Recommender(model, items)
    spec = IndexSpec("Flat", "", 0, metric)  # type: ignore[arg-type]
    indexed = Recommender(model, items, index=TopNIndex(model, spec))
    queries = _queries(500, 40, np.random.default_rng(0))
    for want, got in zip(exact.recommend_batch(queries), indexed.recommend_batch(queries),
                         strict=True):  # fmt: skip
        assert [i for i, _ in got.items] == [i for i, _ in want.items]
        assert [s for _, s in got.items] == pytest.approx([s for _, s in want.items], abs=1e-5)


@pytest.mark.parametrize("metric", ["inner_product", "l2"])
@pytest.mark.parametrize("factory", ["HNSW32,Flat", "IVF16,Flat"])
def test_an_index_searching_everything_equals_exact(factory: str, metric: str) -> None:
    # efSearch / nprobe at the catalogue's size: the approximate indexes become exhaustive.
    model, items = _model(400, seed=1), _items(400)
    search = "efSearch=400" if factory.startswith("HNSW") else "nprobe=16"
    spec = IndexSpec(factory, search, 50, metric)  # type: ignore[arg-type]
    indexed = Recommender(model, items, index=TopNIndex(model, spec))
    assert indexed.index_recall() == 1.0
    assert Recommender(model, items).index_recall() is None
    exact = Recommender(model, items)
    queries = _queries(400, 20, np.random.default_rng(1))
    for want, got in zip(exact.recommend_batch(queries), indexed.recommend_batch(queries),
                         strict=True):  # fmt: skip
        assert [i for i, _ in got.items] == [i for i, _ in want.items]


def test_recall_at_100_on_a_larger_catalogue() -> None:
    # Random weights with a wide bias: the L2 reduction's case (inner product finds ~0.6 here;
    # on the trained million-item model HNSW finds more by inner product, IVF by the L2
    # reduction, bench/RESULTS.md).
    n_items = 20_000
    model, items = _model(n_items, seed=2), _items(n_items)
    spec = IndexSpec(metric="l2")  # HNSW32,Flat, efSearch=128: the defaults otherwise
    indexed = Recommender(model, items, index=TopNIndex(model, spec))
    exact = Recommender(model, items)
    queries = [
        Query(q.items, 100, q.exclude) for q in _queries(n_items, 50, np.random.default_rng(2))
    ]
    recalls = [
        len({i for i, _ in got.items} & {i for i, _ in want.items}) / 100
        for want, got in zip(exact.recommend_batch(queries), indexed.recommend_batch(queries),
                             strict=True)
    ]  # fmt: skip
    assert np.mean(recalls) >= 0.99, np.mean(recalls)
    probe = indexed.index_recall()
    assert probe is not None
    assert probe >= 0.95


def test_query_candidates_and_cold_start_are_answered_as_without_the_index() -> None:
    model, items = _model(300, seed=3), _items(300)
    exact = Recommender(model, items)
    indexed = Recommender(model, items, index=TopNIndex(model, IndexSpec("HNSW16,Flat", "", 0)))
    queries = [
        Query(["i1", "i2"], 5, candidates=["i7", "i9", "i9", "i200", "i2", "i42", "nope"]),
        Query([], 10, exclude=["i0"]),
        Query(["i3", "unknown"], 10, candidates=["i5"]),
    ]
    assert indexed.recommend_batch(queries) == exact.recommend_batch(queries)


def test_the_index_must_belong_to_the_model() -> None:
    small = _model(50)
    with pytest.raises(ValueError, match="index has 50 items, the model 60"):
        Recommender(_model(60), _items(60), index=TopNIndex(small, IndexSpec("Flat", "", 0)))


def test_bad_index_settings_say_what_is_accepted() -> None:
    with pytest.raises(ValueError, match="not a FAISS index-factory string"):
        IndexSpec("HNSW,Bogus").check()
    with pytest.raises(ValueError, match=r"does not apply to a HNSW32,Flat index.*nprobe=32"):
        IndexSpec("HNSW32,Flat", "nprobe=4").check()
    IndexSpec("IVF64,Flat", "nprobe=4").check()
