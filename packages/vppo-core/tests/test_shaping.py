"""tas_bounds / tas_scale / tas_scale_reference (ALGORITHMS.md §3) and pgpo_token_weights (§5)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from vppo_core.shaping import pgpo_token_weights, tas_bounds, tas_scale, tas_scale_reference

sys.path.insert(0, str(Path(__file__).parent))
from fork_reference import fork_pgpo_token_scaling

# ----------------------------------------------------------------------------------------------------- TAS (§3)


def test_tas_hand_worked_example():
    alpha = tas_scale(torch.tensor([0.0, 0.25, 0.5, 1.0]))
    torch.testing.assert_close(alpha, torch.tensor([0.900, 0.957, 1.014, 1.129]), atol=5e-4, rtol=0)
    # exact: mean(n) = 1.75 / 4
    expected = torch.tensor([0.9 + 0.1 * n / 0.4375 for n in (0.0, 0.25, 0.5, 1.0)])
    torch.testing.assert_close(alpha, expected)


def test_tas_is_affine_invariant_in_the_dependency():
    S = torch.tensor([0.0, 0.25, 0.5, 1.0])
    torch.testing.assert_close(tas_scale(3.0 * S + 7.0), tas_scale(S))


@settings(max_examples=80, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=2, max_size=32),
    beta_min=st.floats(0.0, 1.0),
)
def test_tas_alpha_has_mean_one_is_at_least_beta_min_and_is_monotone(values, beta_min):
    S = torch.tensor(values, dtype=torch.float64)
    assume(float(S.max() - S.min()) > 1e-6)
    alpha = tas_scale(S, beta_min=beta_min)
    assert alpha.mean().item() == pytest.approx(1.0, abs=1e-9)
    assert bool((alpha >= beta_min - 1e-12).all())
    order = torch.argsort(S)
    assert bool((alpha[order].diff() >= -1e-12).all())


def test_tas_fallback_identical_dependencies_give_alpha_one():
    assert torch.equal(tas_scale(torch.full((5,), 0.3)), torch.ones(5))
    assert torch.equal(tas_scale(torch.tensor([0.3, 0.3 + 1e-7])), torch.ones(2))  # spread ≤ 1e-6


def test_tas_fallback_fewer_than_two_valid_responses_give_alpha_one():
    assert torch.equal(tas_scale(torch.tensor([0.7])), torch.ones(1))
    assert torch.equal(tas_scale(torch.tensor([0.1, 0.9]), valid=torch.tensor([True, False])), torch.ones(2))
    assert torch.equal(tas_scale(torch.tensor([0.1, 0.9]), valid=torch.tensor([False, False])), torch.ones(2))
    assert torch.equal(tas_scale(torch.zeros(0)), torch.zeros(0))


def test_tas_fallback_mean_n_zero_gives_beta_min():
    # External bounds above every value: all n clamp to 0, mean(n) = 0 -> α ≡ β_min on valid responses.
    alpha = tas_scale(torch.tensor([0.5, 1.0, 0.2]), bounds=(1.0, 2.0), valid=torch.tensor([1, 1, 0]))
    torch.testing.assert_close(alpha, torch.tensor([0.9, 0.9, 1.0]))


def test_tas_external_bounds_clamp_and_take_mean_over_the_argument():
    # bounds (0, 2): n = (0, 0.5, 1 [clamped from 1.5]); mean(n) = 0.5
    alpha = tas_scale(torch.tensor([0.0, 1.0, 3.0]), bounds=(torch.tensor(0.0), torch.tensor(2.0)))
    torch.testing.assert_close(alpha, torch.tensor([0.9, 1.0, 1.1]))


def test_tas_invalid_responses_get_alpha_one_and_do_not_enter_the_statistics():
    S = torch.tensor([0.0, 5.0, 0.25, 0.5, -3.0, 1.0])
    valid = torch.tensor([True, False, True, True, False, True])
    alpha = tas_scale(S, valid=valid)
    torch.testing.assert_close(alpha[valid], tas_scale(S[valid]))
    assert torch.equal(alpha[~valid], torch.ones(2))


def test_tas_invalid_entries_may_hold_nan():
    alpha = tas_scale(torch.tensor([0.0, float("nan"), 1.0]), valid=torch.tensor([1, 0, 1]))
    torch.testing.assert_close(alpha, torch.tensor([0.9, 1.0, 1.1]))


def test_tas_global_statistics_are_sharding_independent_with_bounds_from_tas_bounds():
    # Two "ranks": bounds all-reduced (min of mins, max of maxes); α on the full vector is what a rank gets when it
    # takes its slice of tas_scale(all-gathered traj_dep).
    S = torch.rand(16, generator=torch.Generator().manual_seed(0))
    shards = S.chunk(2)
    lows, highs = zip(*(tas_bounds(s) for s in shards))
    bounds = (torch.stack(lows).min(), torch.stack(highs).max())
    full = tas_scale(S)
    torch.testing.assert_close(tas_scale(S, bounds=bounds), full)
    assert full.mean().item() == pytest.approx(1.0, abs=1e-6)


def test_tas_bounds_values_and_empty_identities():
    m, big = tas_bounds(torch.tensor([0.3, -1.0, 2.0]), valid=torch.tensor([1, 1, 0]))
    assert (m.item(), big.item()) == (-1.0, pytest.approx(0.3))
    m, big = tas_bounds(torch.tensor([0.3, 2.0]), valid=torch.tensor([False, False]))
    assert (m.item(), big.item()) == (math.inf, -math.inf)
    assert torch.equal(tas_scale(torch.tensor([0.3, 2.0]), bounds=(m, big)), torch.ones(2))


def _reference_transcription(scores, num_valid_tokens, micro_batch_size, target_min):
    """The official dp_actor.py TAS, transcribed line by line (mini-batch quantiles, micro-batch mean, +1e-8)."""
    valid_scores = scores[num_valid_tokens > 0]
    gmin = gmax = None
    if valid_scores.numel() > 1:
        gmin = torch.quantile(valid_scores, 0.0)
        gmax = torch.quantile(valid_scores, 1.0)
    out = []
    for s, nv in zip(scores.split(micro_batch_size), num_valid_tokens.split(micro_batch_size)):
        scaling_factor = torch.ones_like(s)
        if gmin is not None and gmax is not None and (gmax - gmin) > 1e-6:
            v = nv > 0
            normalized = torch.clamp((s[v] - gmin) / (gmax - gmin), 0.0, 1.0)
            mu_norm = normalized.mean()
            target_max = target_min + (1.0 - target_min) / (mu_norm + 1e-8)
            scaling_factor[v] = target_min + normalized * (target_max - target_min)
        out.append(scaling_factor)
    return torch.cat(out)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 3.0, allow_nan=False, width=32), min_size=1, max_size=24),
    micro_batch_size=st.integers(1, 8),
    beta_min=st.sampled_from([0.9, 0.5, 0.0, 1.0]),
    data=st.data(),
)
def test_tas_reference_mode_matches_the_official_code_bit_for_bit(values, micro_batch_size, beta_min, data):
    scores = torch.tensor(values, dtype=torch.float32)
    counts = torch.tensor(data.draw(st.lists(st.integers(0, 3), min_size=len(values), max_size=len(values))))
    scores = torch.where(counts > 0, scores, torch.zeros_like(scores))  # S̄ of an empty response is 0
    alpha = tas_scale_reference(scores, micro_batch_size, beta_min=beta_min, valid=counts > 0)
    expected = _reference_transcription(scores, counts.float(), micro_batch_size, beta_min)
    assert torch.equal(alpha, expected)


def test_tas_reference_mode_differs_from_global_mode_per_micro_batch():
    S = torch.tensor([0.0, 0.1, 0.2, 1.0])
    ref = tas_scale_reference(S, 2)
    # micro-batch 1: n = (0, .1) mean .05 -> α = (.9, 1.1); micro-batch 2: n = (.2, 1) mean .6
    torch.testing.assert_close(ref, torch.tensor([0.9, 1.1, 0.9 + 0.1 * 0.2 / 0.6, 0.9 + 0.1 / 0.6]), atol=1e-6, rtol=0)
    torch.testing.assert_close(tas_scale_reference(S, 4), tas_scale(S), atol=1e-6, rtol=0)
    assert not torch.allclose(ref, tas_scale(S))


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"traj_dep": torch.zeros(2, 2)}, r"traj_dep must be a float tensor of shape \[B\]"),
        ({"traj_dep": torch.tensor([1, 2])}, r"traj_dep must be a float tensor"),
        ({"traj_dep": torch.tensor([0.0, float("nan")])}, "traj_dep contains NaN or inf"),
        ({"traj_dep": torch.zeros(3), "valid": torch.ones(2)}, r"valid has shape \(2,\), expected \(3,\)"),
        ({"traj_dep": torch.zeros(3), "beta_min": 1.5}, r"beta_min must be a float in \[0, 1\]"),
        ({"traj_dep": torch.zeros(3), "bounds": (0.0,)}, "bounds must be a pair"),
        ({"traj_dep": torch.zeros(3), "bounds": (0.0, float("nan"))}, "bounds must be two scalars"),
    ],
)
def test_tas_bad_input_names_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tas_scale(kwargs.pop("traj_dep"), **kwargs)


def test_tas_reference_rejects_bad_micro_batch_size():
    with pytest.raises(ValueError, match="micro_batch_size must be a positive int"):
        tas_scale_reference(torch.zeros(3), 0)


# ---------------------------------------------------------------------------------------------------- PGPO (§5)


def test_pgpo_hand_worked_row():
    eps, tau, beta = 1e-6, 0.4, 2.0
    # Ŝ = log1p(S) = (1, 0, 0.5, padding)
    S = torch.tensor([[math.e - 1.0, 0.0, math.exp(0.5) - 1.0, 123.0]], dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0]])
    imp = [1.0 / (1.0 + eps), 0.0, 0.5 / (1.0 + eps)]
    omega = [i / (tau + eps) if i < tau else 1.0 + beta * (i - tau) / (1.0 - tau + eps) for i in imp]
    expected = [w * 3.0 / sum(omega) for w in omega] + [0.0]
    out = pgpo_token_weights(S, mask)
    torch.testing.assert_close(out, torch.tensor([expected], dtype=torch.float64))
    torch.testing.assert_close(out, torch.tensor([[2.0769, 0.0, 0.9231, 0.0]], dtype=torch.float64), atol=1e-4, rtol=0)


def test_pgpo_below_threshold_tokens_are_scaled_down_linearly():
    # Ŝ = (0, 0.2, 1): I = (0, ~0.2, ~1); ω = (0, 0.2/0.4 = 0.5, ~3)
    S = torch.tensor([[0.0, math.exp(0.2) - 1.0, math.e - 1.0]], dtype=torch.float64)
    out = pgpo_token_weights(S, torch.ones(1, 3))
    torch.testing.assert_close(out[0, 1] / out[0, 2], torch.tensor(0.5 / 3.0, dtype=torch.float64), atol=1e-5, rtol=0)


@settings(max_examples=80, deadline=None)
@given(
    B=st.integers(1, 4),
    L=st.integers(1, 30),
    tau=st.floats(0.05, 0.95),
    beta=st.floats(0.0, 5.0),
    data=st.data(),
)
def test_pgpo_rows_sum_to_valid_count_are_non_negative_and_order_preserving(B, L, tau, beta, data):
    values = data.draw(st.lists(st.floats(0.0, 10.0, allow_nan=False), min_size=B * L, max_size=B * L))
    valid = data.draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L))
    S = torch.tensor(values, dtype=torch.float64).reshape(B, L)
    mask = torch.tensor(valid).reshape(B, L)
    w = pgpo_token_weights(S, mask, tau=tau, beta=beta)
    torch.testing.assert_close(w.sum(dim=1), mask.sum(dim=1).double(), rtol=1e-9, atol=1e-9)
    assert bool((w >= 0).all()) and bool((w[~mask] == 0).all())
    for b in range(B):
        idx = mask[b].nonzero().flatten()
        s, ww = S[b, idx], w[b, idx]
        order = torch.argsort(s, stable=True)
        assert bool((ww[order].diff() >= -1e-12).all())


def test_pgpo_degenerate_rows():
    S = torch.tensor(
        [
            [0.3, 0.3, 0.3, 9.0],  # all valid tokens equal -> ones (GRPO weighting)
            [0.7, 0.0, 0.0, 0.0],  # one valid token -> 1
            [1.0, 2.0, 3.0, 4.0],  # empty row -> zeros
            [0.3, 0.3 + 1e-9, 0.3, 0.0],  # spread ≤ eps -> ones, not all mass on one token
        ],
        dtype=torch.float64,
    )
    assert S[3, 1] != S[3, 0]
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]])
    expected = torch.tensor([[1.0, 1, 1, 0], [1, 0, 0, 0], [0, 0, 0, 0], [1, 1, 1, 0]], dtype=torch.float64)
    assert torch.equal(pgpo_token_weights(S, mask), expected)


def test_pgpo_padding_may_hold_nan():
    S = torch.tensor([[0.0, 1.0, float("nan")]])
    out = pgpo_token_weights(S, torch.tensor([[1, 1, 0]]))
    assert torch.isfinite(out).all() and out[0, 2] == 0 and out[0, :2].sum().item() == pytest.approx(2.0)


@pytest.mark.parametrize(
    ("S", "mask", "kwargs", "match"),
    [
        (torch.zeros(2, 3), torch.ones(3, 3), {}, r"mask has shape \(3, 3\), expected \(2, 3\)"),
        (torch.tensor([[0.0, float("inf")]]), torch.ones(1, 2), {}, "S contains NaN or inf on valid"),
        (torch.tensor([[0.0, -1.0]]), torch.ones(1, 2), {}, "S must be > -1"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"tau": 1.0}, "tau"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"tau": 0.0}, "tau"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"beta": -1.0}, "beta"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"eps": 0.0}, "eps"),
        (torch.zeros(2), torch.ones(2), {}, r"S must have shape \[B, L\]"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"threshold_mode": "median"}, "threshold_mode must be one of"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"weight_floor": -0.1}, "weight_floor"),
        (torch.zeros(1, 2), torch.ones(1, 2), {"weight_floor": 1.5}, "weight_floor"),
    ],
)
def test_pgpo_bad_input_names_the_argument(S, mask, kwargs, match):
    with pytest.raises(ValueError, match=match):
        pgpo_token_weights(S, mask, **kwargs)


# ---------------------------------------------------------------------------------------------------------------
# PGPO's switches: the authors' development variants, and a side-by-side with the public re-implementation
# ---------------------------------------------------------------------------------------------------------------


def _row(s_hat: list[float]) -> torch.Tensor:
    """S giving exactly Ŝ = log1p(S) = s_hat (float64, so the hand-worked values are exact to 1e-12)."""
    return torch.expm1(torch.tensor([s_hat], dtype=torch.float64))


def test_pgpo_quantile_threshold_floor_and_no_mass_normalisation_hand_worked():
    S, mask = _row([0.0, 1.0, 2.0, 3.0, 4.0]), torch.ones(1, 5)
    # I = [0, .25, .5, .75, 1]; quantile τ = 0.4 -> index floor(5·0.4) = 2 -> τ_i = 0.5; β = 2:
    # ω = [0/.5, .25/.5, 1, 1 + 2·.25/.5, 1 + 2·.5/.5] = [0, .5, 1, 2, 3] (Σ 6.5)
    raw = torch.tensor([[0.0, 0.5, 1.0, 2.0, 3.0]], dtype=torch.float64)
    kw = {"eps": 1e-12, "threshold_mode": "quantile"}
    torch.testing.assert_close(pgpo_token_weights(S, mask, mass_normalization=False, **kw), raw)
    torch.testing.assert_close(pgpo_token_weights(S, mask, **kw), raw * 5 / 6.5)
    floored = torch.tensor([[0.1, 0.5, 1.0, 2.0, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(pgpo_token_weights(S, mask, weight_floor=0.1, mass_normalization=False, **kw), floored)
    # absolute τ = 0.4: ω = [0, .625, 1 + 2·.1/.6, 1 + 2·.35/.6, 1 + 2·.6/.6]
    absolute = torch.tensor([[0.0, 0.625, 1 + 0.2 / 0.6, 1 + 0.7 / 0.6, 3.0]], dtype=torch.float64)
    torch.testing.assert_close(pgpo_token_weights(S, mask, eps=1e-12, mass_normalization=False), absolute)


@settings(max_examples=150, deadline=None)
@given(
    st.integers(1, 4),
    st.integers(1, 9),
    st.sampled_from(["absolute", "quantile"]),
    st.sampled_from([0.0, 0.1, 1.0]),
    st.floats(0.05, 0.95),
    st.data(),
)
def test_pgpo_switches_keep_weights_non_negative_order_preserving_and_mass_conserving(B, L, mode, floor, tau, data):
    S = torch.tensor(data.draw(st.lists(st.floats(0, 20), min_size=B * L, max_size=B * L)), dtype=torch.float64)
    S = S.reshape(B, L)
    mask = torch.tensor(data.draw(st.lists(st.booleans(), min_size=B * L, max_size=B * L))).reshape(B, L)
    for mass in (True, False):
        w = pgpo_token_weights(S, mask, tau=tau, threshold_mode=mode, weight_floor=floor, mass_normalization=mass)
        assert (w >= 0).all() and (w[~mask] == 0).all()
        if mass:
            torch.testing.assert_close(w.sum(1), mask.sum(1).to(w.dtype))
        for b in range(B):
            v = mask[b].nonzero().flatten().tolist()
            for i in v:
                for j in v:
                    if S[b, i] <= S[b, j]:
                        assert w[b, i] <= w[b, j] + 1e-9


def _reimplementation_pgpo(S, mask, threshold, boost, threshold_mode, low_weight_floor, mass_normalization, eps=1e-8):
    """`_compute_pgpo_token_scaling` of zsxm1998/awesome-perception-aware-rlvr, from the one transcription of that
    file the tests keep (fork_reference.py)."""
    weights, _ = fork_pgpo_token_scaling(
        S, mask, threshold, boost, threshold_mode, low_weight_floor, mass_normalization, eps
    )  # fmt: skip
    return weights


@pytest.mark.parametrize("mode", ["absolute", "quantile"])
@pytest.mark.parametrize("floor", [0.0, 0.1])
@pytest.mark.parametrize("mass", [True, False])
def test_pgpo_equals_the_public_reimplementation_on_random_inputs(mode, floor, mass):
    """At least 200 random batches per setting. Inputs keep every row's spread of log1p(S) ≥ 1e-2 (with ≥ 2 valid tokens),
    where the two differ only by where ε enters (ours: + ε in the denominators; theirs: clamp at ε), and ε = 1e-8
    on both sides; degenerate rows are compared in the next test."""
    g = torch.Generator().manual_seed(11)
    compared = 0
    for _ in range(300):
        B, L = int(torch.randint(1, 5, (1,), generator=g)), int(torch.randint(2, 12, (1,), generator=g))
        S = torch.empty(B, L).exponential_(generator=g) * float(torch.rand(1, generator=g) * 3)
        mask = torch.rand(B, L, generator=g) < 0.8
        mask[:, :2] = True
        lo = torch.log1p(S).masked_fill(~mask, math.inf).min(1).values
        hi = torch.log1p(S).masked_fill(~mask, -math.inf).max(1).values
        if not ((hi - lo) >= 1e-2).all():
            continue
        ours = pgpo_token_weights(
            S, mask, eps=1e-8, threshold_mode=mode, weight_floor=floor, mass_normalization=mass
        )  # fmt: skip
        theirs = _reimplementation_pgpo(S, mask.float(), 0.4, 2.0, mode, floor, mass)
        torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)
        compared += 1
    assert compared >= 200, compared


def test_pgpo_degenerate_rows_differ_from_the_reimplementation_only_as_documented():
    """All-equal row: both give ones with mass normalisation. Without it, the formula applies as is: I = 0 -> ω = 0
    (or the floor) in both. A spread of 1e-9: ours (ε added, 1e-6) treats the row as equal (ones); theirs divides by
    clamp(1e-9, 1e-8) and ranks the tokens (README's table of differences)."""
    equal, mask = torch.full((1, 4), 0.3), torch.ones(1, 4)
    for mass in (True, False):
        for floor in (0.0, 0.1):
            torch.testing.assert_close(
                pgpo_token_weights(equal, mask, weight_floor=floor, mass_normalization=mass),
                _reimplementation_pgpo(equal, mask, 0.4, 2.0, "absolute", floor, mass),
            )
    tiny_spread = torch.tensor([[0.3, 0.3 + 1e-9 * 1.3, 0.3, 0.3]], dtype=torch.float64)
    torch.testing.assert_close(pgpo_token_weights(tiny_spread, mask), torch.ones(1, 4, dtype=torch.float64))
