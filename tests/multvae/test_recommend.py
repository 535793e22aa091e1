"""The shared fold-in path: ids in, (item, score) out; masking, candidates, cold start,
batching equals single calls and the offline ranking."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.sparse as sp
import torch

from multvae.errors import UnknownItemError
from multvae.items import ItemIndex
from multvae.model import ModelConfig, MultVAE, SparseRows
from multvae.recommend import Query, Recommender, rank_rows

N_ITEMS = 50


def _id(column: int) -> str:
    return f"i{column}"  # never equal to the column, so a leaked column shows


def _ids(columns: list[int]) -> list[str]:
    return [_id(c) for c in columns]


def _recommender() -> Recommender:
    torch.manual_seed(0)
    model = MultVAE(ModelConfig.default("multvae", N_ITEMS))
    pop = np.zeros(N_ITEMS, dtype=np.int64)
    pop[[7, 3, 11]] = [30, 20, 10]
    return Recommender(model, ItemIndex.build(_ids(list(range(N_ITEMS))), pop), "v1")


def _reference(model: MultVAE, columns: list[int]) -> torch.Tensor:
    x = torch.zeros(1, N_ITEMS)
    x[0, columns] = 1.0
    with torch.no_grad():
        mu, _ = model.encode(SparseRows.from_csr(sp.csr_matrix(x.numpy())))
        return model.decode(mu)[0]


def test_history_and_exclude_are_never_returned() -> None:
    rec = _recommender()
    out = rec.recommend(_ids([1, 2, 3]), 50, _ids([4, 5]))
    returned = [item for item, _ in out.items]
    assert not set(returned) & set(_ids([1, 2, 3, 4, 5]))
    assert len(returned) == 45  # every other item, no -inf padding
    assert np.all(np.diff([score for _, score in out.items]) <= 0)
    assert out.fallback is None
    assert out.unknown == []


def test_scores_are_decoder_logits_at_the_mean() -> None:
    rec = _recommender()
    out = rec.recommend(_ids([4, 9, 9]), 5)  # a repeated click counts once
    logits = _reference(rec.model, [4, 9])
    logits[[4, 9]] = -torch.inf
    top = torch.topk(logits, 5)
    assert [item for item, _ in out.items] == _ids(top.indices.tolist())
    np.testing.assert_allclose([s for _, s in out.items], top.values.numpy(), rtol=1e-6)


def test_unknown_history_ids_are_reported_and_ignored() -> None:
    rec = _recommender()
    out = rec.recommend(["nope", _id(4), "never"], 5)
    assert out.unknown == ["nope", "never"]
    assert out.items == rec.recommend([_id(4)], 5).items
    assert rec.unknown(["nope", _id(4)]) == ["nope"]


def test_candidates_limit_the_ranking_to_a_set() -> None:
    rec = _recommender()
    candidates = [*_ids([0, 1, 2, 30, 31]), "not-an-item"]
    out = rec.recommend(_ids([1, 9]), 10, _ids([30]), candidates=candidates)
    logits = _reference(rec.model, [1, 9])
    expected = sorted([0, 2, 31], key=lambda c: -float(logits[c]))  # 1 clicked, 30 excluded
    assert [item for item, _ in out.items] == _ids(expected)


def test_empty_history_falls_back_to_popularity() -> None:
    rec = _recommender()
    out = rec.recommend([], 2, [_id(7)])
    assert out.fallback == "popularity"
    assert out.items == [(_id(3), 20.0), (_id(11), 10.0)]
    within = rec.recommend(["unknown"], 5, candidates=_ids([11, 40, 7]))
    assert [item for item, _ in within.items] == _ids([7, 11, 40])
    assert within.unknown == ["unknown"]


def test_batch_equals_single_calls_and_offline_ranking() -> None:
    rec = _recommender()
    queries = [
        Query(_ids([1, 2]), 5, _ids([5])),
        Query([], 3),
        Query(_ids([10, 20, 30]), 7),
        Query(_ids([10, 20, 30]), 4, candidates=_ids(list(range(0, 50, 2)))),
    ]
    batch = rec.recommend_batch(queries)
    for query, got in zip(queries, batch, strict=True):
        single = rec.recommend(query.items, query.n, query.exclude, query.candidates)
        assert [i for i, _ in got.items] == [i for i, _ in single.items]
        np.testing.assert_allclose([s for _, s in got.items], [s for _, s in single.items], 1e-6)
    fold_in = sp.csr_matrix((np.ones(5), ([0, 0, 1, 1, 1], [1, 2, 10, 20, 30])), shape=(2, 50))
    offline = rank_rows(rec.model, fold_in, 7)
    assert _ids(offline[1].tolist()) == [i for i, _ in batch[2].items]
    assert _ids(offline[0][:5].tolist()) == [i for i, _ in rec.recommend(_ids([1, 2]), 5).items]


def test_ranking_sees_weights_changed_in_place() -> None:
    # Training evaluates between optimiser steps, which update the weights in place: no
    # copy of them may be served stale.
    rec = _recommender()
    fold_in = sp.csr_matrix((np.ones(2), ([0, 0], [1, 2])), shape=(1, N_ITEMS))
    with torch.no_grad():
        rec.model.output_layer.weight.mul_(-1.0)
        rec.model.output_layer.bias.mul_(-1.0)
    expected = _reference(rec.model, [1, 2])
    expected[[1, 2]] = -torch.inf
    top = torch.topk(expected, 5).indices.tolist()
    assert rank_rows(rec.model, fold_in, 5)[0].tolist() == top
    assert [i for i, _ in rec.recommend(_ids([1, 2]), 5).items] == _ids(top)


def test_similar_is_the_cosine_of_the_output_layer_rows() -> None:
    rec = _recommender()
    weight = rec.model.output_layer.weight.detach().numpy()
    unit = weight / np.linalg.norm(weight, axis=1, keepdims=True)
    cosine = unit @ unit[4]
    cosine[4] = -np.inf  # the item itself is never returned
    expected = np.argsort(-cosine, kind="stable")[:6]
    out = rec.similar(_id(4), 6)
    assert [item for item, _ in out.items] == _ids(expected.tolist())
    np.testing.assert_allclose([s for _, s in out.items], cosine[expected], rtol=1e-5)
    assert out.fallback is None


def test_similar_known_answer_and_restrictions() -> None:
    rec = _recommender()
    with torch.no_grad():
        weight = rec.model.output_layer.weight
        weight.normal_(0.0, 0.01)
        weight[0] = 0.0
        weight[0, 0] = 1.0
        weight[1] = 0.0
        weight[1, :2] = torch.tensor([3.0, 0.3])  # nearly parallel to item 0, three times longer
        weight[2] = 0.0
        weight[2, 1] = 1.0  # orthogonal
        weight[3] = -weight[0]  # opposite
    rec = Recommender(rec.model, rec.items, "v1")  # norms are taken when it is built
    assert rec.similar(_id(0), 1).items[0][0] == _id(1)
    scores = dict(rec.similar(_id(0), N_ITEMS).items)
    assert scores[_id(1)] > 0.99
    assert abs(scores[_id(2)]) < 1e-6
    assert scores[_id(3)] == min(scores.values())
    assert scores[_id(3)] < -0.99
    assert _id(0) not in scores
    assert len(scores) == N_ITEMS - 1
    assert next(i for i, _ in rec.similar(_id(0), 2, exclude=_ids([1])).items) != _id(1)
    restricted = rec.similar(_id(0), 5, candidates=_ids([2, 3, 0, 99]))
    assert [i for i, _ in restricted.items] == _ids([2, 3])


def test_similar_refuses_an_unknown_item() -> None:
    with pytest.raises(UnknownItemError, match="'nope' is not one of the 50 items of model"):
        _recommender().similar("nope", 5)


def test_a_model_with_non_finite_weights_fails_the_finite_check() -> None:
    from multvae.errors import VerificationError

    model = MultVAE(ModelConfig(p_dims=(4, 8, 20))).eval()
    items = ItemIndex.build([f"i{c}" for c in range(20)], np.arange(20))
    Recommender(model, items).check_finite()  # a healthy model passes
    with torch.no_grad():
        model.decoder[-1].weight[3, 0] = float("nan")
    with pytest.raises(VerificationError, match="NaN or infinite"):
        Recommender(model, items).check_finite()
