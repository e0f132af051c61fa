"""Micro-batches by token budget (`vppo_recipes.micro_batching`, `batch.max_tokens_per_micro_batch`): the grouping,
the count balancing across ranks, the padding count and the config rules, each against a plain computation."""

from __future__ import annotations

import itertools
import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vppo_recipes.micro_batching import (
    fixed_micro_batches,
    padded_positions,
    padding_counts,
    split_to_count,
    token_budget_micro_batches,
)

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"


def _plain_width(rows, prompts, responses) -> int:
    """Positions of one collated forward, counted the plain way: the longest prompt, the longest response (>= 1)."""
    longest_prompt = 0
    longest_response = 1
    for i in rows:
        longest_prompt = max(longest_prompt, prompts[i])
        longest_response = max(longest_response, responses[i])
    return len(rows) * (longest_prompt + longest_response)


def test_padded_positions_hand_worked():
    # prompts 5 and 7, responses 3 and 0: 2 rows x (7 + 3)
    assert padded_positions([5, 7], [3, 0]) == 20
    assert padded_positions([4], [0]) == 5  # an empty response still takes one position (collate_rollout)
    assert padded_positions([], []) == 0


def test_fixed_micro_batches_keep_data_order():
    assert fixed_micro_batches(5, 2) == [[0, 1], [2, 3], [4]]


def test_token_budget_hand_worked_longest_first():
    prompts = [10, 10, 10, 10, 10]
    responses = [90, 5, 40, 6, 38]  # totals 100, 15, 50, 16, 48
    got = token_budget_micro_batches(prompts, responses, max_tokens=120, max_rows=8)
    # longest first: 0 (100) alone (2 x 100 > 120); 2 and 4 (2 x 50 = 100), + 3 would be 3 x 50 = 150; 3 and 1
    assert got == [[0], [2, 4], [1, 3]]
    # the row cap: at most 1 row each
    assert token_budget_micro_batches(prompts, responses, max_tokens=10_000, max_rows=1) == [[0], [2], [4], [3], [1]]


def test_a_row_longer_than_the_budget_is_refused_naming_the_key():
    with pytest.raises(ValueError, match=r"batch.max_tokens_per_micro_batch=50: raise it"):
        token_budget_micro_batches([10, 10], [45, 5], max_tokens=50, max_rows=4)


lengths = st.lists(st.tuples(st.integers(1, 60), st.integers(0, 200)), min_size=1, max_size=40)


@settings(deadline=None)  # a shared CPU
@given(lengths, st.integers(260, 2000), st.integers(1, 16))
def test_token_budget_partitions_the_rows_within_budget_and_cap(rows, budget, cap):
    prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    groups = token_budget_micro_batches(prompts, responses, max_tokens=budget, max_rows=cap)
    assert sorted(itertools.chain(*groups)) == list(range(len(rows)))  # every row once, none dropped
    for g in groups:
        assert g == sorted(g) and 1 <= len(g) <= cap
        assert _plain_width(g, prompts, responses) <= budget
    # deterministic: the same lengths give the same grouping
    assert groups == token_budget_micro_batches(prompts, responses, max_tokens=budget, max_rows=cap)


@settings(deadline=None)
@given(lengths, st.integers(260, 2000), st.data())
def test_split_to_count_reaches_the_count_and_keeps_the_budget(rows, budget, data):
    prompts, responses = [p for p, _ in rows], [r for _, r in rows]
    groups = token_budget_micro_batches(prompts, responses, max_tokens=budget, max_rows=len(rows))
    count = data.draw(st.integers(len(groups), len(rows)))
    split = split_to_count(groups, count)
    assert len(split) == count and all(split)
    assert sorted(itertools.chain(*split)) == list(range(len(rows)))
    assert all(_plain_width(g, prompts, responses) <= budget for g in split)


def test_split_to_count_refuses_more_micro_batches_than_rows():
    with pytest.raises(ValueError, match="into 3 non-empty"):
        split_to_count([[0], [1]], 3)


def test_padding_counts_equal_a_plain_count():
    rng = random.Random(0)
    masks = []
    for _ in range(5):
        b, t = rng.randint(1, 4), rng.randint(1, 9)
        masks.append(torch.tensor([[rng.random() < 0.6 for _ in range(t)] for _ in range(b)], dtype=torch.long))
    computed = padding = 0
    for m in masks:
        for row in m.tolist():
            for x in row:
                computed += 1
                padding += x == 0
    assert padding_counts(masks) == (float(computed), float(padding))
    assert padding_counts([]) == (0.0, 0.0)


def test_with_sorted_lengths_the_padding_is_small():
    """The point of the budget: on long-tailed lengths, grouping longest first leaves little padding where fixed
    micro-batches in data order of the same peak size leave much."""
    rng = random.Random(1)
    responses = [min(2048, int(rng.lognormvariate(6.0, 0.8))) for _ in range(256)]
    prompts = [300] * len(responses)
    real = sum(p + r for p, r in zip(prompts, responses))
    budget = 4 * (300 + 2048)  # what fixed micro-batches of 4 need at the worst
    groups = token_budget_micro_batches(prompts, responses, max_tokens=budget, max_rows=64)
    by_budget = sum(_plain_width(g, prompts, responses) for g in groups)
    fixed = sum(_plain_width(g, prompts, responses) for g in fixed_micro_batches(len(prompts), 4))
    assert 1 - real / by_budget < 0.10 < 1 - real / fixed


# ---------------------------------------------------------------------------------------------- the config rules


def _rl_cfg(**overrides):
    from omegaconf import OmegaConf

    from vppo_recipes.config_schema import validate_config

    raw = OmegaConf.merge(
        OmegaConf.load(CONFIGS / "tiny_vppo.yaml"),
        OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]),
    )
    return validate_config(raw, "rl")


def test_the_budget_defaults_to_null_and_must_hold_one_sequence():
    from vppo_recipes.config_schema import ConfigError

    assert _rl_cfg().batch.max_tokens_per_micro_batch is None
    assert _rl_cfg(**{"batch.max_tokens_per_micro_batch": 560}).batch.max_tokens_per_micro_batch == 560
    with pytest.raises(ConfigError, match=r"max_tokens_per_micro_batch=500 is smaller than one sequence.*at least 560"):
        _rl_cfg(**{"batch.max_tokens_per_micro_batch": 500})  # tiny_vppo: 512 prompt + 48 response


def test_reference_tas_statistics_with_a_budget_are_refused_with_the_reason():
    from vppo_recipes.config_schema import ConfigError

    with pytest.raises(ConfigError, match="tas_statistics=reference computes mean"):
        _rl_cfg(**{"batch.max_tokens_per_micro_batch": 1024, "algorithm.tas_statistics": "reference"})
