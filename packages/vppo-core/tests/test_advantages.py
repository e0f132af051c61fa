"""group_advantages / keep_groups (ALGORITHMS.md §2)."""

from __future__ import annotations

import math
import statistics

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vppo_core.advantages import group_advantages, keep_groups

rewards_strategy = st.floats(min_value=-10.0, max_value=10.0, allow_nan=False, width=32)


def test_group_advantages_hand_worked_binary_group():
    # mean 0.5, unbiased std sqrt(1/3) -> ±0.5 / (0.57735 + 1e-6)
    adv = group_advantages(torch.tensor([1.0, 0.0, 1.0, 0.0]), 4)
    expected = 0.5 / (math.sqrt(1.0 / 3.0) + 1e-6)
    torch.testing.assert_close(adv, torch.tensor([expected, -expected, expected, -expected]))


def test_group_advantages_groups_are_independent_and_in_order():
    adv = group_advantages(torch.tensor([1.0, 0.0, 5.0, 5.0, 2.0, 4.0]), 2)
    k1 = 0.5 / (math.sqrt(0.5) + 1e-6)  # [1, 0]: mean 0.5, std sqrt(1/2)
    k3 = 1.0 / (math.sqrt(2.0) + 1e-6)  # [2, 4]: mean 3, std sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([k1, -k1, 0.0, 0.0, -k3, k3]))


@settings(max_examples=60, deadline=None)
@given(
    group_size=st.integers(2, 6),
    groups=st.integers(1, 4),
    data=st.data(),
)
def test_group_advantages_match_python_statistics_reference(group_size, groups, data):
    values = data.draw(st.lists(rewards_strategy, min_size=group_size * groups, max_size=group_size * groups))
    rewards = torch.tensor(values, dtype=torch.float64)
    adv = group_advantages(rewards, group_size)
    for g in range(groups):
        chunk = values[g * group_size : (g + 1) * group_size]
        mean, std = statistics.fmean(chunk), statistics.stdev(chunk)
        for j, r in enumerate(chunk):
            expected = 0.0 if len(set(chunk)) == 1 else (r - mean) / (std + 1e-6)
            assert adv[g * group_size + j].item() == pytest.approx(expected, rel=1e-9, abs=1e-9)


@settings(max_examples=60, deadline=None)
@given(value=rewards_strategy, group_size=st.integers(2, 16), groups=st.integers(1, 3))
def test_identical_rewards_give_exactly_zero_advantage(value, group_size, groups):
    # 0.7 repeated 7 times: float32 rounding makes the naive formula give A ≈ 0.056 to every response, not 0.
    adv = group_advantages(torch.full((group_size * groups,), value), group_size)
    assert torch.equal(adv, torch.zeros_like(adv))


def test_identical_rewards_where_the_naive_formula_is_not_zero():
    rewards = torch.full((7,), 0.7)
    naive = (rewards - rewards.mean()) / (rewards.std() + 1e-6)
    assert naive.abs().max() > 0.05  # the rounding this function must not turn into a signal
    assert torch.equal(group_advantages(rewards, 7), torch.zeros(7))


def test_group_advantages_dtypes():
    assert group_advantages(torch.tensor([1, 0, 0, 1]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([True, False]), 2).dtype == torch.float32
    assert group_advantages(torch.tensor([1.0, 0.0], dtype=torch.float64), 2).dtype == torch.float64


@pytest.mark.parametrize(
    ("rewards", "group_size", "match"),
    [
        (torch.zeros(6), 4, "group_size=4 does not divide"),
        (torch.zeros(6), 1, "group_size must be ≥ 2"),
        (torch.zeros(6), 0, "group_size must be a positive int"),
        (torch.zeros(2, 3), 3, r"rewards must have shape \[B\]"),
        (torch.tensor([1.0, float("nan")]), 2, "rewards contains NaN"),
        (torch.tensor([1.0, float("inf")]), 2, "rewards contains NaN or inf"),
        ([1.0, 0.0], 2, "rewards must be a torch.Tensor"),
    ],
)
def test_group_advantages_bad_input(rewards, group_size, match):
    with pytest.raises(ValueError, match=match):
        group_advantages(rewards, group_size)


def test_group_advantages_rejects_non_positive_eps():
    with pytest.raises(ValueError, match="eps must be > 0"):
        group_advantages(torch.tensor([1.0, 0.0]), 2, eps=0.0)


def test_keep_groups_strict_bounds():
    G = 100
    acc = torch.zeros(6 * G)
    acc[G : G + 1] = 1  # group 1: mean 0.01 -> dropped (strict)
    acc[2 * G : 2 * G + 2] = 1  # group 2: mean 0.02 -> kept
    acc[3 * G : 3 * G + 99] = 1  # group 3: mean 0.99 -> dropped (strict)
    acc[4 * G : 5 * G] = 1  # group 4: all correct -> dropped
    acc[5 * G : 5 * G + 50] = 1  # group 5: 0.5 -> kept
    assert keep_groups(acc, G).tolist() == [False, False, True, False, False, True]


def test_keep_groups_custom_bounds_and_bool_input():
    acc = torch.tensor([True, False, True, True])
    assert keep_groups(acc, 2, low=0.0, high=1.0).tolist() == [True, False]
    assert keep_groups(acc, 2, low=-0.1, high=1.1).tolist() == [True, True]


@pytest.mark.parametrize(
    ("acc", "kwargs", "match"),
    [
        (torch.zeros(5), {"group_size": 2}, "group_size=2 does not divide"),
        (torch.tensor([0.0, float("nan")]), {"group_size": 2}, "accuracy contains NaN"),
        (torch.zeros(4), {"group_size": 2, "low": 0.5, "high": 0.5}, "low must be < high"),
        (torch.zeros(2, 2), {"group_size": 2}, r"accuracy must have shape \[B\]"),
    ],
)
def test_keep_groups_bad_input(acc, kwargs, match):
    with pytest.raises(ValueError, match=match):
        keep_groups(acc, **kwargs)
