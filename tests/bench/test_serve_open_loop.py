"""The pure helpers of bench/serve_open_loop.py: the in-process reference at a mean pass size."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

SCRIPT = Path(__file__).resolve().parents[2] / "bench" / "serve_open_loop.py"


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    spec = importlib.util.spec_from_file_location("serve_open_loop", SCRIPT)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(
    ("mean", "sizes"), [(1.0, [1]), (0.0, [1]), (1.02, [1, 2]), (3.0, [3]), (3.6, [3, 4])]
)
def test_pass_sizes_are_the_integers_around_the_mean(
    bench: ModuleType, mean: float, sizes: list[int]
) -> None:
    assert bench.pass_sizes(mean) == sizes


def test_reference_interpolates_the_cost_of_a_pass(bench: ModuleType) -> None:
    # A pass of 1 costs 100, a pass of 2 costs 2 * 60 = 120: a pass of 1.5 costs 110.
    assert bench.reference_us({1: 100.0, 2: 60.0}, 1.5) == pytest.approx(110 / 1.5)
    assert bench.reference_us({1: 100.0, 2: 60.0}, 1.0) == pytest.approx(100.0)
    assert bench.reference_us({1: 100.0, 2: 60.0}, 2.0) == pytest.approx(60.0)
    # Outside the sizes timed: the nearest size's cost per history.
    assert bench.reference_us({3: 50.0, 4: 40.0}, 1.0) == pytest.approx(50.0)
    assert bench.reference_us({3: 50.0, 4: 40.0}, 9.0) == pytest.approx(40.0)


def test_reference_is_the_median_of_the_rounds(bench: ModuleType) -> None:
    # One round hit by a neighbour's burst does not move the median.
    rounds = [{1: 100.0}, {1: 104.0}, {1: 180.0}, {1: 98.0}, {1: 101.0}]
    assert bench.reference_stats(rounds, 1.0) == {
        "median_us": pytest.approx(101.0),
        "min_us": pytest.approx(98.0),
        "max_us": pytest.approx(180.0),
    }
    # Each round is interpolated at the mean pass before the median is taken.
    two = [{1: 100.0, 2: 60.0}, {1: 120.0, 2: 80.0}, {1: 90.0, 2: 50.0}]
    stats = bench.reference_stats(two, 1.5)
    assert stats["median_us"] == pytest.approx(110 / 1.5)
    assert stats["min_us"] == pytest.approx(95 / 1.5)
    assert stats["max_us"] == pytest.approx(140 / 1.5)
