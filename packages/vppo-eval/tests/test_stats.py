"""vppo_eval.stats against plain loops and hand-worked cases."""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vppo_eval.stats import area_under_curve, paired_difference, steps_to_reach


def _plain_bootstrap(a, b, n_boot, seed, confidence=0.95):
    """The documented procedure with Python loops: same draws, grid mean by explicit sums."""
    rng = np.random.Generator(np.random.PCG64(seed))
    S, N = len(a), len(a[0])
    means = []
    for _ in range(n_boot):
        seeds = rng.integers(0, S, S)
        items = rng.integers(0, N, N)
        total = 0.0
        for s in seeds:
            for i in items:
                total += a[s][i] - b[s][i]
        means.append(total / (S * N))
    means.sort()

    # numpy's default quantile: linear interpolation between order statistics at (n - 1) * q
    def q(p):
        h = (len(means) - 1) * p
        lo = math.floor(h)
        return means[lo] + (h - lo) * (means[min(lo + 1, len(means) - 1)] - means[lo])

    tail = (1 - confidence) / 2
    return q(tail), q(1 - tail)


def test_bootstrap_equals_plain_loops_on_a_random_grid():
    r = random.Random(3)
    a = [[r.random() for _ in range(7)] for _ in range(4)]
    b = [[r.random() for _ in range(7)] for _ in range(4)]
    got = paired_difference(a, b, n_boot=300, seed=11, chunk=64)
    low, high = _plain_bootstrap(a, b, 300, 11)
    assert got.low == pytest.approx(low, abs=1e-12) and got.high == pytest.approx(high, abs=1e-12)
    assert got.mean == pytest.approx(sum(x - y for ra, rb in zip(a, b) for x, y in zip(ra, rb)) / 28, abs=1e-12)
    assert (got.n_seeds, got.n_items, got.n_boot) == (4, 7, 300)


def test_hand_worked_cases():
    # a constant difference has a zero-width interval at that difference
    a = [[0.75, 0.5], [1.0, 0.25]]
    b = [[0.5, 0.25], [0.75, 0.0]]
    d = paired_difference(a, b, n_boot=200)
    assert d.mean == d.low == d.high == pytest.approx(0.25)
    assert d.excludes_zero()
    # identical runs: exactly zero
    z = paired_difference(a, a, n_boot=50)
    assert (z.mean, z.low, z.high) == (0.0, 0.0, 0.0) and not z.excludes_zero()
    # one seed, one item: the difference itself
    one = paired_difference([[1.0]], [[0.25]], n_boot=10)
    assert (one.low, one.high) == (0.75, 0.75)


def test_reproducible_and_independent_of_chunking():
    rng = np.random.default_rng(0)
    a, b = rng.random((5, 40)), rng.random((5, 40))
    x = paired_difference(a, b, n_boot=1000, seed=2, chunk=1000)
    y = paired_difference(a, b, n_boot=1000, seed=2, chunk=7)
    assert x == y


@settings(max_examples=40, deadline=None)
@given(
    st.integers(1, 5),
    st.integers(1, 9),
    st.integers(0, 2**31),
)
def test_interval_bounds_the_possible_means(S, N, seed):
    rng = np.random.default_rng(seed)
    a, b = rng.random((S, N)), rng.random((S, N))
    d = paired_difference(a, b, n_boot=200, seed=seed)
    diff = a - b
    assert diff.min() - 1e-12 <= d.low <= d.high <= diff.max() + 1e-12
    assert d.mean == pytest.approx(diff.mean())


def test_bad_input_is_rejected_with_the_reason():
    with pytest.raises(ValueError, match="same"):
        paired_difference([[1.0, 0.0]], [[1.0]])
    with pytest.raises(ValueError, match="non-finite"):
        paired_difference([[math.nan]], [[1.0]])
    with pytest.raises(ValueError, match=r"\[seeds, items\]"):
        paired_difference([1.0, 2.0], [1.0, 2.0])


def test_area_under_curve_hand_worked():
    # trapezoids: (0..10) mean of 0.2, 0.4 = 0.3 ; (10..20) mean of 0.4, 0.6 = 0.5 -> (3 + 5) / 20 = 0.4
    assert area_under_curve([0, 10, 20], [0.2, 0.4, 0.6]) == pytest.approx(0.4)
    # unequal spacing: (0..5) 0.5 * 5 = 2.5 ; (5..20) 1.0 * 15 = 15 -> 17.5 / 20
    assert area_under_curve([0, 5, 20], [0.0, 1.0, 1.0]) == pytest.approx(17.5 / 20)
    assert area_under_curve([3], [0.7]) == 0.7
    with pytest.raises(ValueError, match="increasing"):
        area_under_curve([0, 0], [1, 1])


def test_steps_to_reach():
    steps, vals = [0, 5, 10, 15], [0.3, 0.45, 0.5, 0.44]
    assert steps_to_reach(steps, vals, 0.45) == 5
    assert steps_to_reach(steps, vals, 0.5) == 10
    assert steps_to_reach(steps, vals, 0.3) == 0
    assert steps_to_reach(steps, vals, 0.51) is None
