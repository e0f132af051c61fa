"""Tests of vppo_core.dependency: the k3 estimator and its clamps, exact chunked KL, trajectory means, bad input."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vppo_core.dependency import (
    exact_token_dependency,
    exact_token_dependency_from_hidden,
    token_dependency,
    trajectory_dependency,
)


def _ref_kl(a, b, temperature=1.0):
    la = torch.log_softmax(a.double() / temperature, -1)
    lb = torch.log_softmax(b.double() / temperature, -1)
    return (la.exp() * (la - lb)).sum(-1)


def test_token_dependency_hand_worked_values_and_clamps():
    lp = torch.zeros(1, 5)
    # d = lp_alt - lp = (0, 1, -1, 30 -> clamped to 20, -30 -> -20)
    lp_alt = torch.tensor([[0.0, 1.0, -1.0, 30.0, -30.0]])
    s = token_dependency(lp, lp_alt, torch.ones(1, 5))
    # S = exp(d) - d - 1: 0, e - 2, e^-1; d = 20 gives e^20 - 21 and d = -20 gives 19 + e^-20, both clamped to 10.
    expected = torch.tensor([[0.0, math.e - 2.0, math.exp(-1.0), 10.0, 10.0]])
    torch.testing.assert_close(s, expected)
    # Below the S clamp the plain formula holds (the log-ratio clamp only guards exp() against overflow).
    s2 = token_dependency(torch.zeros(1, 2), torch.tensor([[-5.0, -9.0]]), torch.ones(1, 2))
    torch.testing.assert_close(s2, torch.tensor([[math.exp(-5.0) + 4.0, math.exp(-9.0) + 8.0]]))


def test_token_dependency_is_zero_on_masked_positions_even_if_they_hold_nan():
    lp = torch.tensor([[-1.0, float("nan"), -2.0]])
    lp_alt = torch.tensor([[-3.0, 0.0, float("-inf")]])
    s = token_dependency(lp, lp_alt, torch.tensor([[1, 0, 0]]))
    assert s[0, 1] == 0 and s[0, 2] == 0
    assert s[0, 0].item() == pytest.approx(math.exp(-2.0) + 1.0)


@settings(max_examples=50, deadline=None)
@given(
    st.lists(st.floats(-50, 0, allow_nan=False), min_size=1, max_size=12),
    st.lists(st.floats(-50, 0, allow_nan=False), min_size=1, max_size=12),
)
def test_token_dependency_is_in_zero_ten_and_zero_iff_equal(a, b):
    n = min(len(a), len(b))
    lp, lp_alt = torch.tensor([a[:n]]), torch.tensor([b[:n]])
    s = token_dependency(lp, lp_alt, torch.ones(1, n))
    assert bool((s >= 0).all()) and bool((s <= 10).all())
    assert bool((token_dependency(lp, lp, torch.ones(1, n)) == 0).all())


def test_token_dependency_has_no_gradient():
    lp = torch.zeros(1, 2, requires_grad=True)
    assert not token_dependency(lp, lp + 1, torch.ones(1, 2)).requires_grad


def test_trajectory_dependency_is_masked_mean_and_zero_for_empty_response():
    s = torch.tensor([[1.0, 2.0, 3.0, 100.0], [5.0, 5.0, 5.0, 5.0]])
    mask = torch.tensor([[1, 1, 1, 0], [0, 0, 0, 0]])
    torch.testing.assert_close(trajectory_dependency(s, mask), torch.tensor([2.0, 0.0]))
    torch.testing.assert_close(trajectory_dependency(s, mask.bool()), torch.tensor([2.0, 0.0]))


def test_exact_dependency_hand_worked_two_token_kl():
    # p = (1/2, 1/2), q = (1/4, 3/4): KL = 1/2 log(2) + 1/2 log(2/3)
    a = torch.zeros(1, 1, 2)
    b = torch.tensor([[[0.0, math.log(3.0)]]])
    expected = 0.5 * math.log(2.0) + 0.5 * math.log(2.0 / 3.0)
    assert exact_token_dependency(a, b, torch.ones(1, 1)).item() == pytest.approx(expected, abs=1e-7)


@settings(max_examples=40, deadline=None)
@given(
    batch=st.integers(1, 3),
    length=st.integers(1, 8),
    vocab=st.integers(2, 40),
    chunk_size=st.integers(1, 30),
    temperature=st.floats(0.5, 2.0),
    scale=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**16),
)
def test_exact_dependency_any_chunk_size_equals_reference_is_nonnegative(
    batch, length, vocab, chunk_size, temperature, scale, seed
):
    g = torch.Generator().manual_seed(seed)
    a = 3 * torch.randn(batch, length, vocab, generator=g)
    b = a + scale * torch.randn(batch, length, vocab, generator=g)
    mask = torch.randint(0, 2, (batch, length), generator=g)
    s = exact_token_dependency(a, b, mask, temperature=temperature, chunk_size=chunk_size)
    whole = exact_token_dependency(a, b, mask, temperature=temperature, chunk_size=batch * length)
    ref = (_ref_kl(a, b, temperature) * mask).float()
    torch.testing.assert_close(s, whole, atol=1e-6, rtol=1e-6)  # float32: kernels may reorder per chunk shape
    torch.testing.assert_close(s, ref, atol=1e-5, rtol=1e-5)
    a64, b64 = a.double(), b.double()
    s64 = exact_token_dependency(a64, b64, mask, temperature=temperature, chunk_size=chunk_size)
    whole64 = exact_token_dependency(a64, b64, mask, temperature=temperature, chunk_size=batch * length)
    torch.testing.assert_close(s64, whole64, atol=1e-12, rtol=0)  # chunking itself is exact
    assert bool((s >= 0).all())
    assert bool((s[mask == 0] == 0).all())
    assert bool((exact_token_dependency(a, a.clone(), mask, chunk_size=chunk_size) == 0).all())


def test_exact_dependency_bf16_and_non_contiguous_slices_match_float32_reference():
    torch.manual_seed(0)
    full_a, full_b = torch.randn(2, 10, 33), torch.randn(2, 10, 33)
    a, b = full_a[:, 3:-1].bfloat16(), full_b[:, 3:-1].bfloat16()
    s = exact_token_dependency(a, b, torch.ones(2, 6), chunk_size=4)
    assert s.dtype == torch.float32
    torch.testing.assert_close(s, _ref_kl(a.float(), b.float()).float(), atol=1e-5, rtol=1e-5)


def test_exact_dependency_from_hidden_equals_logits_version():
    torch.manual_seed(0)
    h, h_alt, w = torch.randn(2, 5, 6), torch.randn(2, 5, 6), torch.randn(17, 6)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    s = exact_token_dependency_from_hidden(h, h_alt, w, mask, temperature=0.9, chunk_size=3)
    s_ref = exact_token_dependency(h @ w.T, h_alt @ w.T, mask, temperature=0.9, chunk_size=100)
    torch.testing.assert_close(s, s_ref, atol=1e-5, rtol=1e-5)
    assert bool((exact_token_dependency_from_hidden(h, h, w, mask) == 0).all())


def test_sampled_estimator_is_unbiased_for_the_exact_kl():
    # E_{t ~ p}[exp(d) - d - 1] with d = log q(t) - log p(t) equals KL(p || q) when no clamp is active.
    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(1, 1, 6, generator=g), torch.randn(1, 1, 6, generator=g)
    lpa, lpb = torch.log_softmax(a, -1)[0, 0], torch.log_softmax(b, -1)[0, 0]
    n = 200_000
    t = torch.multinomial(lpa.exp(), n, replacement=True, generator=g)
    s = token_dependency(lpa[t][None], lpb[t][None], torch.ones(1, n))
    exact = exact_token_dependency(a, b, torch.ones(1, 1)).item()
    assert s.mean().item() == pytest.approx(exact, rel=0.03)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: token_dependency(torch.zeros(2, 3), torch.zeros(2, 4), torch.ones(2, 3)), "lp_alt has shape"),
        (lambda: token_dependency(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2, 4)), "mask has shape"),
        (lambda: token_dependency(torch.zeros(6), torch.zeros(6), torch.ones(6)), "lp must be"),
        (
            lambda: token_dependency(torch.zeros(1, 2), torch.zeros(1, 2), torch.tensor([[0.5, 1]])),
            "mask must hold only 0/1",
        ),
        (
            lambda: token_dependency(torch.tensor([[float("nan")]]), torch.zeros(1, 1), torch.ones(1, 1)),
            "lp contains NaN or inf on valid",
        ),
        (
            lambda: token_dependency(torch.zeros(1, 1), torch.tensor([[float("-inf")]]), torch.ones(1, 1)),
            "lp_alt contains NaN or inf on valid",
        ),
        (lambda: trajectory_dependency(torch.zeros(2, 3), torch.ones(3, 2)), "mask has shape"),
        (
            lambda: trajectory_dependency(torch.tensor([[float("inf")]]), torch.ones(1, 1)),
            "S contains NaN or inf on valid",
        ),
        (
            lambda: exact_token_dependency(torch.zeros(1, 2, 3), torch.zeros(1, 2, 4), torch.ones(1, 2)),
            "logits_alt has shape",
        ),
        (lambda: exact_token_dependency(torch.zeros(2, 3), torch.zeros(2, 3), torch.ones(2)), "logits must be"),
        (
            lambda: exact_token_dependency(
                torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.ones(1, 2), temperature=-1
            ),
            "temperature",
        ),
        (
            lambda: exact_token_dependency_from_hidden(
                torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(5, 4), torch.ones(1, 2)
            ),
            "weight must be",
        ),
        (
            lambda: exact_token_dependency_from_hidden(
                torch.zeros(1, 2, 3), torch.zeros(1, 3, 3), torch.zeros(5, 3), torch.ones(1, 2)
            ),
            "hidden_alt has shape",
        ),
        (
            lambda: exact_token_dependency_from_hidden(
                torch.zeros(1, 2, 3), torch.zeros(1, 2, 3).double(), torch.zeros(5, 3), torch.ones(1, 2)
            ),
            "hidden_alt is torch.float64, expected hidden's torch.float32",
        ),
        (
            lambda: exact_token_dependency_from_hidden(
                torch.zeros(1, 2, 3), torch.zeros(1, 2, 3), torch.zeros(5, 3).double(), torch.ones(1, 2)
            ),
            "weight .* must share one dtype",
        ),
    ],
)
def test_bad_input_raises_value_error_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_exact_dependency_non_finite_logit_at_valid_position_raises_but_masked_is_ignored(bad):
    a, b = torch.zeros(1, 2, 4), torch.zeros(1, 2, 4)
    b[0, 1, 2] = bad
    with pytest.raises(ValueError, match="not finite"):
        exact_token_dependency(a, b, torch.ones(1, 2))
    s = exact_token_dependency(a, b, torch.tensor([[1, 0]]))
    assert s.tolist() == [[0.0, 0.0]]
