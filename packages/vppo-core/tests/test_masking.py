"""tgf_mask (ALGORITHMS.md §4)."""

from __future__ import annotations

import math
from fractions import Fraction

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vppo_core.masking import tgf_mask


def test_ceil_of_fraction_times_length_has_no_float_error():
    # The paper's k is ceil(ρ·n) with ρ a decimal. Floating point overshoots some integers: 0.28 * 25 ==
    # 7.000000000000001 in float64 and 0.3 * 50 == 15.000000953674316 in float32 — a bare ceil keeps one token
    # too many (8 and 16).
    assert 0.28 * 25 > 7 and (torch.tensor([50.0]) * 0.3).item() > 15
    for fraction, n, k in [(0.4, 5, 2), (0.4, 6, 3), (0.28, 25, 7), (0.3, 50, 15), (0.07, 100, 7), (0.55, 100, 55)]:
        assert int(tgf_mask(torch.rand(1, n), torch.ones(1, n), fraction=fraction).sum()) == k, (fraction, n)
    S = torch.tensor([[5.0, 4.0, 3.0, 2.0, 1.0]])
    assert tgf_mask(S, torch.ones(1, 5), fraction=0.4).tolist() == [[True, True, False, False, False]]


def test_hand_worked_rows_with_padding_and_ties():
    S = torch.tensor(
        [
            [0.1, 0.9, 0.5, 0.7, 0.3, 99.0],  # 5 valid -> k = 2: positions 1 (0.9) and 3 (0.7); padding 99 ignored
            [1.0, 1.0, 1.0, 1.0, 0.0, 0.0],  # 4 valid, all tied -> k = 2: the first two positions
            [0.0, 2.0, 2.0, 0.0, 0.0, 0.0],  # 3 valid -> k = 2: 2.0 at positions 1 and 2
            [5.0, 5.0, 5.0, 5.0, 5.0, 5.0],  # empty row -> nothing
        ]
    )
    mask = torch.tensor(
        [
            [1, 1, 1, 1, 1, 0],
            [1, 1, 1, 1, 0, 0],
            [1, 1, 1, 0, 0, 0],
            [0, 0, 0, 0, 0, 0],
        ]
    )
    expected = [
        [False, True, False, True, False, False],
        [True, True, False, False, False, False],
        [False, True, True, False, False, False],
        [False] * 6,
    ]
    assert tgf_mask(S, mask, fraction=0.4).tolist() == expected


def test_padding_may_hold_nan_or_inf():
    S = torch.tensor([[0.5, 0.1, float("nan"), float("inf")]])
    out = tgf_mask(S, torch.tensor([[True, True, False, False]]), fraction=0.5)
    assert out.tolist() == [[True, False, False, False]]


def test_fraction_one_selects_every_valid_token():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]], dtype=torch.float32)
    assert torch.equal(tgf_mask(torch.randn(2, 3), mask, fraction=1.0), mask.bool())


def test_float_mask_and_bool_mask_agree():
    S = torch.randn(3, 7)
    mask = (torch.rand(3, 7) > 0.3).float()
    assert torch.equal(tgf_mask(S, mask), tgf_mask(S, mask.bool()))


@settings(max_examples=80, deadline=None)
@given(
    B=st.integers(1, 4),
    L=st.integers(1, 110),
    fraction=st.sampled_from(
        [0.07, 0.14, 0.28, 0.55, 0.56, 0.05, 0.1, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.7, 0.75, 0.8, 0.9, 0.99, 1.0]
    ),
    data=st.data(),
)
def test_selects_exactly_ceil_fraction_of_valid_tokens_largest_first_ties_by_position(B, L, fraction, data):
    # Few distinct values, so ties are common.
    values = data.draw(st.lists(st.integers(0, 3), min_size=B * L, max_size=B * L))
    valid = data.draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L))
    S = torch.tensor(values, dtype=torch.float32).reshape(B, L)
    mask = torch.tensor(valid).reshape(B, L)
    out = tgf_mask(S, mask, fraction=fraction)
    assert out.dtype == torch.bool
    assert not bool((out & ~mask).any()), "a padding position was selected"
    for b in range(B):
        n = int(mask[b].sum())
        k = math.ceil(Fraction(repr(fraction)) * n)  # exact decimal arithmetic
        assert int(out[b].sum()) == k
        sel = [j for j in range(L) if out[b, j]]
        rest = [j for j in range(L) if mask[b, j] and not out[b, j]]
        for i in sel:
            for j in rest:
                assert S[b, i] > S[b, j] or (S[b, i] == S[b, j] and i < j)


@pytest.mark.parametrize("fraction", [0.0, -0.1, 1.0000001, 2, float("nan"), float("inf"), True, "0.4"])
def test_fraction_outside_zero_one_is_rejected(fraction):
    with pytest.raises(ValueError, match="fraction"):
        tgf_mask(torch.zeros(1, 3), torch.ones(1, 3), fraction=fraction)


@pytest.mark.parametrize(
    ("S", "mask", "match"),
    [
        (torch.zeros(2, 3), torch.ones(2, 4), r"mask has shape \(2, 4\), expected \(2, 3\)"),
        (torch.zeros(3), torch.ones(3), r"S must have shape \[B, L\]"),
        (torch.zeros(2, 3, dtype=torch.long), torch.ones(2, 3), "S must be a floating-point tensor"),
        (torch.tensor([[0.0, float("nan")]]), torch.ones(1, 2), "S contains NaN or inf on valid"),
        (torch.zeros(1, 2), torch.tensor([[1.0, 2.0]]), "mask must hold only 0/1"),
    ],
)
def test_bad_input_names_the_argument(S, mask, match):
    with pytest.raises(ValueError, match=match):
        tgf_mask(S, mask)


# ---------------------------------------------------------------- policy_gradient_share (a diagnostic)


def _plain_share(adv, lp, S, mask, fraction):
    """Plain loops: per row, rank the valid tokens by S (ties: earlier first), take ceil(fraction * n)."""
    on_top = total = 0.0
    for i in range(len(adv)):
        valid = [j for j in range(len(mask[i])) if mask[i][j]]
        k = math.ceil(round(fraction * len(valid), 9))
        chosen = set(sorted(valid, key=lambda j: (-S[i][j], j))[:k])
        for j in valid:
            g = abs(adv[i]) * (1 - math.exp(lp[i][j]))
            total += g
            on_top += g if j in chosen else 0.0
    return on_top, total


def test_policy_gradient_share_hand_worked():
    from vppo_core.masking import policy_gradient_share

    # one response, 5 tokens, fraction 0.4 -> the 2 most dependent (positions 1 and 3)
    adv = torch.tensor([-2.0])
    lp = torch.log(torch.tensor([[0.5, 0.9, 1.0, 0.0 + 0.25, 0.5]]))
    S = torch.tensor([[0.1, 0.9, 0.0, 0.5, 0.2]])
    mask = torch.ones(1, 5)
    on_top, total = policy_gradient_share(adv, lp, S, mask, fraction=0.4).tolist()
    # g = 2 * (1 - p) = [1.0, 0.2, 0.0, 1.5, 1.0]
    assert on_top == pytest.approx(0.2 + 1.5) and total == pytest.approx(3.7)


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 4), st.integers(1, 9), st.sampled_from([0.2, 0.4, 1.0]), st.integers(0, 2**31))
def test_policy_gradient_share_equals_plain_loops(B, L, fraction, seed):
    from vppo_core.masking import policy_gradient_share

    g = torch.Generator().manual_seed(seed)
    adv = torch.randn(B, generator=g)
    lp = -torch.rand(B, L, generator=g) * 3
    S = torch.rand(B, L, generator=g)
    mask = torch.rand(B, L, generator=g) > 0.3
    got = policy_gradient_share(adv, lp, S, mask, fraction=fraction).tolist()
    want = _plain_share(adv.tolist(), lp.tolist(), S.tolist(), mask.tolist(), fraction)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-12)
