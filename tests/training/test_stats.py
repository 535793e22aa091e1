"""Paired t-tests: the paper's stars, degenerate inputs, quintile grouping."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from scipy import stats as sps

from training.evaluate import Evaluation
from training.stats import paired_tests, paired_ttest, quintile_tests, stars


def evaluation(ndcg: np.ndarray, sizes: np.ndarray) -> Evaluation:
    per_user = {"recall@20": ndcg * 0.5, "ndcg@100": ndcg}
    return Evaluation(per_user, sizes.astype(np.int64))


def test_identical_inputs_are_not_significant() -> None:
    x = np.random.default_rng(0).random(50)
    test = paired_ttest(x, x.copy(), "ndcg@100")
    assert (test.t, test.p, test.diff, test.stars) == (0.0, 1.0, 0.0, "")
    assert not test.significant()
    json.dumps(test.to_json(), allow_nan=False)


def test_constant_nonzero_difference_is_significant_without_nan() -> None:
    x = np.linspace(0, 1, 20)
    test = paired_ttest(x + 0.1, x)
    assert test.p == 0.0
    assert test.t == math.inf
    assert test.stars == "***"
    assert test.to_json()["t"] is None  # JSON has no infinity
    json.dumps(test.to_json(), allow_nan=False)


def test_matches_scipy_and_pairs_users() -> None:
    rng = np.random.default_rng(1)
    user_effect = rng.random(200)  # large between-user spread, as with per-user NDCG
    a = user_effect + 0.02 + rng.normal(0, 0.01, 200)
    b = user_effect
    test = paired_ttest(a, b, "ndcg@100")
    expected = sps.ttest_rel(a, b)
    assert test.t == pytest.approx(expected.statistic)
    assert test.p == pytest.approx(expected.pvalue)
    assert test.diff == pytest.approx(0.02, abs=0.005)
    assert test.stars == "***"
    # An unpaired test drowns the same difference in the between-user spread.
    assert sps.ttest_ind(a, b).pvalue > 0.05


def test_single_user_cannot_be_tested() -> None:
    test = paired_ttest([0.3], [0.1])
    assert (test.n, test.p, test.stars) == (1, 1.0, "")


def test_stars_thresholds() -> None:
    assert [stars(p) for p in (0.0005, 0.001, 0.005, 0.04, 0.05, 0.5)] == [
        "***",
        "**",
        "**",
        "*",
        "",
        "",
    ]


def test_paired_tests_require_the_same_users() -> None:
    sizes = np.arange(10)
    a = evaluation(np.full(10, 0.5), sizes)
    with pytest.raises(ValueError, match="same held-out users"):
        paired_tests(a, evaluation(np.full(9, 0.5), sizes[:9]))
    tests = paired_tests(a, evaluation(np.full(10, 0.5), sizes))
    assert set(tests) == {"recall@20", "ndcg@100"}
    assert all(t.p == 1.0 for t in tests.values())


def test_quintile_tests_group_users_as_evaluation_quintiles() -> None:
    rng = np.random.default_rng(4)
    sizes = rng.integers(4, 200, 53)
    a = evaluation(rng.random(53), sizes)
    b = evaluation(rng.random(53), sizes)
    tests = quintile_tests(a, b)
    assert [t.n for t in tests] == [q["users"] for q in a.quintiles()]
    assert [t.mean_a for t in tests] == pytest.approx([q["mean"] for q in a.quintiles()])
    assert [t.mean_b for t in tests] == pytest.approx([q["mean"] for q in b.quintiles()])
