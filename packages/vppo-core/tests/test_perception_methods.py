"""The perception-aware methods after VPPO (ToR, CGPO, PEPO, VEPO, PGPO, PAPO, DVRP; ALGORITHMS.md §9) side by side
with the transcription of the fork ``zsxm1998/awesome-perception-aware-rlvr`` (tests/fork_reference.py).

Each function gets hand-worked cases (numbers worked out in the comments), hypothesis properties, bad-input errors
that name the argument, and a seeded loop of ≥ 200 random inputs against the fork's arithmetic.

Deliberate differences between vppo and the fork (each shown by a test here; condition → what differs):

top_fraction_mask (fork ``_compute_top_quantile_mask``)
  * response scope: the fork computes k = ceil(float32(n)·q) in float32, which overshoots: (n, q) = (50, 0.3) →
    fork 16, vppo 15; (25, 0.6) → 16 vs 15; (3000, 0.001) → 4 vs 3; (1572869, 0.9) → 1415582 vs 1415583 (here the
    float32 product undershoots). No difference for q ∈ {0.1, 0.2, 0.25, 0.4, 0.5, 0.7, 0.8}, n ≤ 2·10⁶.
  * batch scope, float32 values: k = ceil(float32(n·q)) agrees for the paper's q up to n = 2·10⁶, except q = 0.95 at
    n = 1103779 (fork 1048590, vppo 1048591, the float32 rounding of 1048590.05).
  * batch scope, bf16 values: k is rounded to bf16 first: (n, q) = (107, 0.3) → fork 32, vppo 33; (19, 0.95) → 18
    vs 19.
  * ties: vppo breaks them by position (row-major); the fork by an unstable sort (or a seeded permutation).
  * vppo returns the mask only (no threshold / fraction).
minmax_by_response: float64 input stays float64 in vppo; the fork always returns float32.
tor_token_weights: positions of the sets outside ``mask`` get 0 in vppo; the fork weighs whatever sets it is given
  (it ANDs them with the response mask beforehand).
cgpo_response_factors: one α per response (the fork expands to where(perception, α_i, 1) per token); fewer than 2
  valid responses → α ≡ 1 in vppo, where the fork has no shaping context and raises.
pepo_visual_prior: the prior of every position [B, T] (the caller slices the response positions [-R:]); the fork
  returns [B, R] and zeroes invalid response positions. Mean of cosines computed as a dot product with the mean
  unit vector (same value up to float32 rounding, ≤ 1e-6 here).
pepo_token_weights: an empty response row gives zeros; the fork raises.
view_divergences_from_hidden: no eps, no "safe log" clamp (log m a log-sum-exp; below JSD 1e-4 the JSD and the
  entropy gap through the log-ratio log q − log p, which keeps views that barely differ apart). The fork's JSD takes
  log(m + 1e-8), which lowers it by Σ_v m_v·log(1 + 1e-8/m_v) ≤ V·1e-8 (≈ 1.5e-3 for Qwen's V = 151936 and a flat
  distribution) and then clamps at 0: a near-identical pair of views (JSD below that bias) gets 0 in the fork.
  The fork's entropies use log p clamped at log(1e-8) (a change below 1e-9 here).
top_p_entropy_from_hidden: the fork's nucleus rule, on max-shifted logits (H = log mass + lse − Σ k·z; ≤ 1e-6 from
  the fork's here); top_p = 1 is the full entropy, as the fork special-cases it.
abs_log_ratio: 0 on padding (the fork does not mask).
pgpo_token_weights (fork ``_compute_pgpo_token_scaling``); they agree to 1e-6 for every switch combination when
  vppo gets eps = 1e-12 and rows whose log1p spread is in (0, 1e-4) are left out. Differences:
  * I = (Ŝ − min)/(max − min + eps) with eps = 1e-6 (paper) vs the fork's /clamp(max − min, 1e-8): with the default
    eps the top token's I is spread/(spread + 1e-6) < 1 (spread 1e-3 → 3 vs 2.99667 without mass normalisation);
    a spread in (0, 1e-8) gives the fork I ∈ [0, spread/1e-8], vppo I ∈ [0, ≈1].
  * below = I/(τ + eps), above = 1 + β(I − τ)/(1 − τ + eps) vs the fork's clamp(τ, eps) and clamp(1 − τ, eps).
  * degenerate rows with mass normalisation: vppo gives ω̃ ≡ 1 when max Ŝ − min Ŝ ≤ eps (1e-6 by default); the
    fork normalises any row whose raw sum is > 1e-8, so a spread of 1e-7 gives the fork [0, 2], vppo [1, 1].
  * negative S: the fork takes log1p(clamp(S, 0)); vppo takes log1p(S) on (−1, 0) and raises for S ≤ −1.
  * vppo computes in S's dtype (float64 stays float64, bf16 stays bf16); the fork in float32, cast back.
policy_loss vs ``compute_perception_reasoning_policy_loss``: the fork adds the decremental / incremental entropy of
  the no-grad views (coef · mean(−q)), constants without gradient; vppo omits them. Gradients are compared as they
  are, values after subtracting those constants. ``seq`` mode: the fork averages over all rows and dp_actor
  rescales by rows / non-empty rows; vppo averages over non-empty rows: equal after that rescale (applied here).
  VEPO's normalize_pg_loss_by_selected_tokens is vppo's token_weights = sel · (N_valid / N_sel) (token-mean; per
  row n_i / n_sel,i for seq-mean-token-mean); CGPO's A·α on perception tokens and (E ∪ P) selection is
  token_weights = where(P, α_i, 1) · (E | P), PEPO's A·w is token_weights = w (the clipped term is positively
  homogeneous in A).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from vppo_core.dependency import (
    abs_log_ratio,
    top_p_entropy_from_hidden,
    trajectory_dependency,
    vepo_token_scores,
    view_divergences_from_hidden,
)
from vppo_core.logprobs import logprobs_from_hidden
from vppo_core.losses import kl_penalty, policy_loss
from vppo_core.masking import tgf_mask, top_fraction_mask
from vppo_core.shaping import (
    cgpo_response_factors,
    minmax_by_response,
    pepo_token_weights,
    pepo_visual_prior,
    pgpo_token_weights,
    tor_token_weights,
)

sys.path.insert(0, str(Path(__file__).parent))

from fork_reference import (
    fork_advantage_scaling,
    fork_apply_advantage_scaling_schedule,
    fork_cgpo_response_scaling,
    fork_cgpo_shaping_context,
    fork_combine_full_vocab_scores,
    fork_dp_actor_micro_batch_loss,
    fork_full_vocab_components,
    fork_hidden_visual_scores,
    fork_minmax_normalize_by_response,
    fork_pepo_token_scaling,
    fork_perception_loss,
    fork_pgpo_token_scaling,
    fork_response_mean_scores,
    fork_sampled_abs_log_ratio,
    fork_top_p_entropy_from_logits,
    fork_top_quantile_mask,
    fork_tor_weight,
)

LN2 = math.log(2.0)
N_CASES = 200  # random side-by-side inputs per function (per switch combination for PGPO, per method for the loss)
HYP = settings(max_examples=50, deadline=None)


@pytest.fixture(autouse=True)
def _one_thread():
    # Tiny tensors gain nothing from intra-op threads, and on the 2 shared cores a busy neighbour makes two OpenMP
    # threads 10x slower than one (measured: the PEPO loop 0.3 s vs 3-7 s). Same as vppo-rollout's conftest.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)


def _close(actual, expected, atol=1e-6, rtol=0.0):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64),
        torch.as_tensor(expected, dtype=torch.float64),
        atol=atol,
        rtol=rtol,
    )


def _max_abs(t: torch.Tensor) -> float:
    return float(t.abs().max()) if t.numel() else 0.0


def _randint(g: torch.Generator, lo: int, hi: int) -> int:
    """Uniform integer in [lo, hi]."""
    return int(torch.randint(lo, hi + 1, (1,), generator=g))


def _uniform(g: torch.Generator, lo: float, hi: float) -> float:
    return lo + (hi - lo) * float(torch.rand((), generator=g))


def _rand_mask(g: torch.Generator, B: int, L: int, *, p_empty: float = 0.2, nonempty: int = 0) -> torch.Tensor:
    """Random bool [B, L] mask, scattered valid tokens, some rows empty; the first ``nonempty`` rows (at least) and
    every row when ``p_empty == 0`` keep at least one valid token."""
    mask = torch.rand(B, L, generator=g) < _uniform(g, 0.4, 1.0)
    mask[torch.rand(B, generator=g) < p_empty] = False
    keep = torch.zeros(B, dtype=torch.bool)
    keep[:nonempty] = True
    if p_empty == 0.0:
        keep[:] = True
    cols = torch.randint(0, L, (B,), generator=g)
    fix = keep & ~mask.any(dim=1)
    mask[fix.nonzero().flatten(), cols[fix]] = True
    return mask


# ============================================================================================ top_fraction_mask


def test_top_fraction_mask_hand_worked():
    scores = torch.tensor([[0.1, 0.5, 0.3, 0.9, 7.0], [2.0, 1.0, 0.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 0, 0, 0]])
    # response, 0.5: row 0 n = 4 → k = 2 → {0.9, 0.5} (the padding 7.0 is ignored); row 1 n = 2 → k = 1 → {2.0}
    got = top_fraction_mask(scores, mask, fraction=0.5, scope="response")
    assert got.tolist() == [[False, True, False, True, False], [True, False, False, False, False]]
    # batch, 0.5: N = 6 → k = 3 → the three largest valid scores 2.0, 1.0, 0.9
    got = top_fraction_mask(scores, mask, fraction=0.5, scope="batch")
    assert got.tolist() == [[False, False, False, True, False], [True, True, False, False, False]]
    # ceil(0.4 · 5) = 2 (the float product 2.0000000000000004 must not give 3)
    assert top_fraction_mask(torch.arange(5.0)[None], torch.ones(1, 5), fraction=0.4).tolist() == [
        [False, False, False, True, True]
    ]
    # ties by position: batch k = ceil(0.5 · 6) = 3 → the first row; response k = ceil(1.5) = 2 per row
    ties = torch.zeros(2, 3)
    assert top_fraction_mask(ties, torch.ones(2, 3), fraction=0.5, scope="batch").tolist() == [
        [True, True, True],
        [False, False, False],
    ]
    assert top_fraction_mask(ties, torch.ones(2, 3), fraction=0.5).tolist() == [[True, True, False]] * 2
    # an empty row selects nothing; padding may hold NaN
    pad = torch.tensor([[float("nan"), 1.0], [3.0, 2.0]])
    assert top_fraction_mask(pad, torch.tensor([[0, 0], [1, 1]]), fraction=1.0).tolist() == [
        [False, False],
        [True, True],
    ]
    # tgf_mask is the response scope
    assert torch.equal(tgf_mask(scores, mask, fraction=0.5), top_fraction_mask(scores, mask, fraction=0.5))


@HYP
@given(
    B=st.integers(1, 4),
    L=st.integers(1, 12),
    percent=st.integers(1, 100),
    scope=st.sampled_from(["response", "batch"]),
    seed=st.integers(0, 2**31 - 1),
)
def test_top_fraction_mask_counts_are_exact_and_select_the_top(B, L, percent, scope, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(B, L, generator=g).round(decimals=1)  # rounded: ties happen
    mask = _rand_mask(g, B, L)
    got = top_fraction_mask(scores, mask, fraction=percent / 100, scope=scope)
    assert not bool((got & ~mask).any())
    n = mask.sum(dim=1).tolist() if scope == "response" else [int(mask.sum())]
    k = [-(-percent * ni // 100) for ni in n]  # exact integer ceil(percent · n / 100)
    counts = got.sum(dim=1).tolist() if scope == "response" else [int(got.sum())]
    assert counts == k
    groups = range(B) if scope == "response" else [slice(None)]
    for r in groups:
        sel, rest = scores[r][got[r]], scores[r][mask[r] & ~got[r]]
        if sel.numel() and rest.numel():
            assert float(sel.min()) >= float(rest.max())
    assert torch.equal(
        tgf_mask(scores, mask, fraction=percent / 100), top_fraction_mask(scores, mask, fraction=percent / 100)
    )


@pytest.mark.parametrize("scope", ["response", "batch"])
def test_top_fraction_mask_side_by_side_with_fork(scope):
    # Continuous random scores: no ties, so the fork's unstable sort picks the same set. Fractions where the
    # fork's float32 k equals the exact ceil (see the module docstring; 0.3 only in batch scope).
    fractions = [0.1, 0.2, 0.25, 0.4, 0.5, 0.7, 0.8, 1.0] + ([0.3] if scope == "batch" else [])
    g = torch.Generator().manual_seed(11)
    for _ in range(N_CASES):
        B, L = _randint(g, 1, 6), _randint(g, 1, 40)
        scores = torch.randn(B, L, generator=g)
        mask = _rand_mask(g, B, L)
        q = fractions[_randint(g, 0, len(fractions) - 1)]
        ours = top_fraction_mask(scores, mask, fraction=q, scope=scope)
        fork, _, _ = fork_top_quantile_mask(scores, mask, q, scope)
        assert torch.equal(ours, fork), (B, L, q, scope)


def test_top_fraction_mask_differs_from_fork_where_its_float32_k_is_off():
    # response scope: fork k = ceil(float32(50)·0.3) = ceil(15.000001) = 16; exact ceil(15) = 15
    for n, q, fork_k, our_k in ((50, 0.3, 16, 15), (25, 0.6, 16, 15), (3000, 0.001, 4, 3)):
        scores, valid = torch.randn(1, n), torch.ones(1, n, dtype=torch.bool)
        assert int(fork_top_quantile_mask(scores, valid, q, "response")[0].sum()) == fork_k
        assert int(top_fraction_mask(scores, valid, fraction=q).sum()) == our_k
    # batch scope with bf16 values: k = ceil(bf16(107 · 0.3)) = ceil(32.0) = 32; exact ceil(32.1) = 33
    scores = torch.randn(1, 107).to(torch.bfloat16)
    assert int(fork_top_quantile_mask(scores, torch.ones(1, 107), 0.3, "batch")[0].sum()) == 32
    assert int(top_fraction_mask(scores, torch.ones(1, 107), fraction=0.3, scope="batch").sum()) == 33
    # batch scope, float32 values, large n: float32(1103779 · 0.95 = 1048590.05) = 1048590.0
    n = 1103779
    assert math.ceil(torch.tensor(n * 0.95, dtype=torch.float32).item()) == 1048590
    assert int(top_fraction_mask(torch.randn(1, n), torch.ones(1, n), fraction=0.95, scope="batch").sum()) == 1048591


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"fraction": 0.0}, "fraction"),
        ({"fraction": 1.5}, "fraction"),
        ({"fraction": float("nan")}, "fraction"),
        ({"fraction": True}, "fraction"),
        ({"fraction": 0.5, "scope": "rows"}, "scope"),
        ({"fraction": 0.5, "mask": torch.ones(2, 4)}, "mask"),
        ({"fraction": 0.5, "mask": torch.full((2, 3), 2.0)}, "mask"),
        ({"fraction": 0.5, "scores": torch.tensor([[1.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])}, "scores"),
        ({"fraction": 0.5, "scores": torch.ones(2, 3, dtype=torch.long)}, "scores"),
        ({"fraction": 0.5, "scores": torch.ones(6)}, "scores"),
    ],
)
def test_top_fraction_mask_bad_inputs_name_the_argument(kwargs, match):
    args = {"scores": torch.zeros(2, 3), "mask": torch.ones(2, 3)} | kwargs
    with pytest.raises(ValueError, match=match):
        top_fraction_mask(args.pop("scores"), args.pop("mask"), **args)


# ============================================================================================ minmax_by_response


def test_minmax_by_response_hand_worked():
    x = torch.tensor([[1.0, 3.0, 2.0, 100.0], [5.0, 5.0, 5.0, 5.0], [0.0, 0.0, 0.0, 0.0], [0.0, 5e-9, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 0, 0]])
    # row 0: (x − 1)/2 = [0, 1, .5], padding 0; equal row → 0; empty row → 0;
    # row 3: spread 5e-9 < 1e-8 → divided by 1e-8, not by the spread: [0, .5] (the fork does the same)
    expected = [[0.0, 1.0, 0.5, 0.0], [0.0] * 4, [0.0] * 4, [0.0, 0.5, 0.0, 0.0]]
    _close(minmax_by_response(x, mask), expected)
    _close(fork_minmax_normalize_by_response(x, mask.bool()), expected)


@HYP
@given(B=st.integers(1, 4), L=st.integers(1, 10), seed=st.integers(0, 2**31 - 1))
def test_minmax_by_response_is_in_unit_interval_with_min_zero_and_max_one(B, L, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(B, L, generator=g) * 5
    mask = _rand_mask(g, B, L)
    y = minmax_by_response(x, mask)
    assert bool(((y >= 0) & (y <= 1)).all()) and not bool(y[~mask].any())
    for r in range(B):
        if int(mask[r].sum()) >= 2:
            assert float(y[r][mask[r]].min()) == 0.0 and float(y[r][mask[r]].max()) == 1.0


def test_minmax_by_response_side_by_side_with_fork():
    g = torch.Generator().manual_seed(12)
    for _ in range(N_CASES):
        B, L = _randint(g, 1, 6), _randint(g, 1, 30)
        x = torch.randn(B, L, generator=g) * _uniform(g, 1e-3, 10.0) + _uniform(g, -5, 5)
        mask = _rand_mask(g, B, L)
        x[~mask] = float("nan")  # padding may hold anything
        # same float32 operations → bitwise equal
        torch.testing.assert_close(
            minmax_by_response(x, mask), fork_minmax_normalize_by_response(x, mask), rtol=0, atol=0
        )
        # float64 input: vppo stays float64, the fork computes in float32
        x64 = x.double()
        ours = minmax_by_response(x64, mask)
        assert ours.dtype == torch.float64
        torch.testing.assert_close(ours, fork_minmax_normalize_by_response(x64, mask).double(), rtol=0, atol=1e-6)


def test_minmax_by_response_bad_inputs_name_the_argument():
    with pytest.raises(ValueError, match="x contains NaN"):
        minmax_by_response(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="mask"):
        minmax_by_response(torch.ones(1, 2), torch.ones(1, 3))
    with pytest.raises(ValueError, match="x must"):
        minmax_by_response(torch.ones(2), torch.ones(2))


# ============================================================================================= tor_token_weights


def test_tor_token_weights_hand_worked_and_padding():
    E = torch.tensor([[1, 0, 0, 1, 1]], dtype=torch.bool)
    P = torch.tensor([[1, 1, 0, 0, 1]], dtype=torch.bool)
    mask = torch.tensor([[1, 1, 1, 1, 0]])
    # γ_r on E, γ_p on P ∖ E, 0 elsewhere: [1, .5, 0, 1 | pad]
    _close(tor_token_weights(E, P, mask, reasoning_weight=1.0, perception_weight=0.5), [[1.0, 0.5, 0.0, 1.0, 0.0]])
    # the fork weighs the sets as given (its callers AND them with the response mask first): 1 on the padding
    _close(fork_tor_weight(E, P, 1.0, 0.5), [[1.0, 0.5, 0.0, 1.0, 1.0]])
    _close(tor_token_weights(E, P, mask, reasoning_weight=2.0, perception_weight=3.0), [[2.0, 3.0, 0.0, 2.0, 0.0]])


@HYP
@given(
    B=st.integers(1, 4),
    L=st.integers(1, 10),
    gamma_r=st.floats(0.0, 3.0),
    gamma_p=st.floats(0.0, 3.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_tor_token_weights_take_only_the_three_values(B, L, gamma_r, gamma_p, seed):
    g = torch.Generator().manual_seed(seed)
    E, P = torch.rand(B, L, generator=g) < 0.4, torch.rand(B, L, generator=g) < 0.4
    mask = _rand_mask(g, B, L)
    w = tor_token_weights(E, P, mask, reasoning_weight=gamma_r, perception_weight=gamma_p)
    assert w.dtype == torch.float32
    values = {0.0, float(torch.tensor(gamma_r)), float(torch.tensor(gamma_p))}
    assert set(w.flatten().tolist()) <= values
    assert torch.equal(w[E & mask], torch.full_like(w[E & mask], gamma_r))
    assert torch.equal(w[P & ~E & mask], torch.full_like(w[P & ~E & mask], gamma_p))
    assert not bool(w[~mask].any()) and not bool(w[~E & ~P].any())


def test_tor_token_weights_side_by_side_with_fork():
    g = torch.Generator().manual_seed(13)
    for _ in range(N_CASES):
        B, L = _randint(g, 1, 6), _randint(g, 1, 30)
        mask = _rand_mask(g, B, L)
        # the sets as the fork builds them: top 30 % of the batch's valid tokens, ANDed with the mask
        E = top_fraction_mask(torch.randn(B, L, generator=g), mask, fraction=0.3, scope="batch")
        P = top_fraction_mask(torch.randn(B, L, generator=g), mask, fraction=0.3, scope="batch")
        gr, gp = _uniform(g, 0.0, 2.0), _uniform(g, 0.0, 2.0)
        ours = tor_token_weights(E, P, mask, reasoning_weight=gr, perception_weight=gp)
        torch.testing.assert_close(ours, fork_tor_weight(E, P, gr, gp), rtol=0, atol=0)


def test_tor_token_weights_bad_inputs_name_the_argument():
    ones = torch.ones(1, 2)
    with pytest.raises(ValueError, match="reasoning_weight"):
        tor_token_weights(ones, ones, ones, reasoning_weight=-1.0)
    with pytest.raises(ValueError, match="perception_weight"):
        tor_token_weights(ones, ones, ones, perception_weight=float("inf"))
    with pytest.raises(ValueError, match="perception_set"):
        tor_token_weights(ones, torch.ones(1, 3), ones)
    with pytest.raises(ValueError, match="reasoning_set"):
        tor_token_weights(torch.full((1, 2), 2.0), ones, ones)
    with pytest.raises(ValueError, match="mask"):
        tor_token_weights(ones, ones, torch.ones(2))


# ========================================================================================= cgpo_response_factors


def test_cgpo_response_factors_hand_worked():
    # valid s = [.1, .3, .5, .9]: lower median .3; |s − .3| = [.2, 0, .2, .6] → lower median .2;
    # α = 1 + .1·tanh((s − .3)/.2) = 1 + .1·tanh([−1, 0, 1, 3]); the invalid 5th response keeps 1
    s = torch.tensor([0.1, 0.3, 0.5, 0.9, 7.0])
    valid = torch.tensor([1, 1, 1, 1, 0])
    expected = [1 + 0.1 * math.tanh(-1.0), 1.0, 1 + 0.1 * math.tanh(1.0), 1 + 0.1 * math.tanh(3.0), 1.0]
    _close(cgpo_response_factors(s, valid, coef=0.1), expected, atol=2e-6)
    # the fork from token scores whose response means are s (row 1 = mean of .2 and .4), context over the batch
    tokens = torch.tensor([[0.1, 0.0], [0.2, 0.4], [0.5, 0.0], [0.9, 0.0], [0.0, 0.0]])
    tmask = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0], [0, 0]])
    ctx = fork_cgpo_shaping_context(*fork_response_mean_scores(tokens, tmask))
    _close(fork_cgpo_response_scaling(tokens, tmask, 0.1, ctx), expected, atol=2e-6)
    # MAD = 0 (most responses equal): (s − med)/1e-8 saturates tanh → 1 ± λ
    _close(cgpo_response_factors(torch.tensor([0.2, 0.2, 0.2, 0.3, 0.1]), coef=0.2), [1, 1, 1, 1.2, 0.8])


def test_cgpo_response_factors_fewer_than_two_valid_responses_give_one_where_the_fork_raises():
    s, valid = torch.tensor([0.4, 0.9]), torch.tensor([True, False])
    assert torch.equal(cgpo_response_factors(s, valid), torch.ones(2))
    assert torch.equal(cgpo_response_factors(torch.tensor([0.4])), torch.ones(1))
    assert fork_cgpo_shaping_context(s, valid) is None
    with pytest.raises(ValueError, match="shaping_context"):
        fork_cgpo_response_scaling(torch.tensor([[0.4], [0.9]]), torch.tensor([[1], [0]]), 0.1, None)


@HYP
@given(
    values=st.lists(st.floats(0.0, 5.0, allow_nan=False), min_size=2, max_size=24),
    coef=st.floats(0.0, 1.0),
)
def test_cgpo_alpha_is_bounded_and_monotone(values, coef):
    s = torch.tensor(values, dtype=torch.float64)
    alpha = cgpo_response_factors(s, coef=coef)
    assert bool((alpha >= 1 - coef - 1e-12).all()) and bool((alpha <= 1 + coef + 1e-12).all())
    order = torch.argsort(s)
    assert bool((alpha[order].diff() >= -1e-12).all())
    assert alpha.dtype == torch.float64 and not alpha.requires_grad


def test_cgpo_response_factors_side_by_side_with_fork():
    g = torch.Generator().manual_seed(14)
    for _ in range(N_CASES):
        B, L = _randint(g, 2, 10), _randint(g, 1, 12)
        S = torch.rand(B, L, generator=g) * _uniform(g, 0.01, 3.0)
        mask = _rand_mask(g, B, L, nonempty=2)
        coef = _uniform(g, 0.0, 0.5)
        valid = mask.any(dim=1)
        ours = cgpo_response_factors(trajectory_dependency(S, mask), valid, coef=coef)
        ctx = fork_cgpo_shaping_context(*fork_response_mean_scores(S, mask.float()))
        # float32 means summed in the same order; median/MAD pass through .item() in the fork
        torch.testing.assert_close(ours, fork_cgpo_response_scaling(S, mask.float(), coef, ctx), rtol=0, atol=2e-6)
        # the token expansion of the fork, where(perception, α_i, 1)
        P = top_fraction_mask(torch.randn(B, L, generator=g), mask, fraction=0.3, scope="batch")
        fork_f = fork_advantage_scaling(
            "cgpo", S, mask.float(), shaping_context=ctx, perception_mask=P, cgpo_response_scaling_coef=coef
        )
        torch.testing.assert_close(torch.where(P, ours[:, None], 1.0), fork_f, rtol=0, atol=2e-6)


def test_cgpo_response_factors_bad_inputs():
    with pytest.raises(ValueError, match="coef"):
        cgpo_response_factors(torch.tensor([0.1, 0.2]), coef=-0.1)
    with pytest.raises(ValueError, match="valid"):
        cgpo_response_factors(torch.tensor([0.1, 0.2]), torch.ones(3))
    # NB: the two errors below name "traj_dep" (the shared TAS check), not cgpo's argument name "traj_score"
    with pytest.raises(ValueError, match=r"shape \[B\]"):
        cgpo_response_factors(torch.ones(2, 2))
    with pytest.raises(ValueError, match="NaN"):
        cgpo_response_factors(torch.tensor([float("nan"), 1.0]))


# ======================================================================================================== PEPO


def test_pepo_visual_prior_hand_worked():
    # one row [vis, r0, r1]: h_vis = (1, 0), h_r0 = (1, 1), h_r1 = (0, 1); cos to the visual token: [1, 1/√2, 0];
    # a second layer 2·h has the same cosines → mean over layers unchanged
    layer = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    prior = pepo_visual_prior([layer, 2.0 * layer], torch.tensor([[True, False, False]]))
    _close(prior, [[1.0, 1 / math.sqrt(2.0), 0.0]])
    # the fork's scores are the response positions [-2:]
    fork = fork_hidden_visual_scores([layer, 2.0 * layer], torch.tensor([[99, 5, 6]]), 2, torch.ones(1, 2), [99])
    _close(fork, prior[:, -2:])
    # two visual tokens (1, 0), (0, 1): h = (1, 1) → (1/√2 + 1/√2)/2 = 1/√2; h = (1, 0) → (1 + 0)/2 = .5
    layer = torch.tensor([[[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
    _close(pepo_visual_prior((layer,), torch.tensor([[1, 1, 0]])), [[0.5, 0.5, 1 / math.sqrt(2.0)]])


def test_pepo_token_weights_hand_worked():
    # v = [0, 1], H = [0, 0]: v̂ = [0, 1], Ĥ = [0, 0] (equal row); m = [0, 1], m̄ = .5; g = 1 ∓ α·tanh(.5);
    # logits = v·g/T = [0, (1 + α·tanh .5)/T]; w = 2·softmax; α = .05, T = 1.8:
    # tanh(.5) = .46212, logit = 1.02311/1.8 = .56839, w = 2·[1, e^.56839]/(1 + e^.56839) = [.72322, 1.27678]
    a, T = 0.05, 1.8
    z = (1 + a * math.tanh(0.5)) / T
    w = [2 / (1 + math.exp(z)), 2 * math.exp(z) / (1 + math.exp(z))]
    _close(w, [0.72322, 1.27678], atol=1e-5)
    prior, entropy = torch.tensor([[0.0, 1.0, 9.0]]), torch.tensor([[0.0, 0.0, 9.0]])
    mask = torch.tensor([[1, 1, 0]])
    _close(pepo_token_weights(prior, entropy, mask, gate_alpha=a, temperature=T), [[w[0], w[1], 0.0]])
    # linear schedule λ = .5: 1 + .5(w − 1) = [.86161, 1.13839]; still sums to n = 2
    half = pepo_token_weights(prior, entropy, mask, gate_alpha=a, temperature=T, progress=0.5)
    _close(half, [[1 + 0.5 * (w[0] - 1), 1 + 0.5 * (w[1] - 1), 0.0]])
    # λ = 0 → 1 on valid tokens (GRPO)
    _close(pepo_token_weights(prior, entropy, mask, progress=0.0), [[1.0, 1.0, 0.0]])


def test_pepo_token_weights_empty_row_gives_zeros_where_the_fork_raises():
    prior, entropy = torch.rand(2, 3), torch.rand(2, 3)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    w = pepo_token_weights(prior, entropy, mask)
    assert torch.equal(w[1], torch.zeros(3)) and float(w[0].sum()) == pytest.approx(2.0, abs=1e-5)
    with pytest.raises(ValueError, match="at least one valid token"):
        fork_pepo_token_scaling(prior, entropy, mask)


@HYP
@given(
    B=st.integers(1, 4),
    L=st.integers(1, 12),
    gate_alpha=st.floats(0.0, 1.0),
    temperature=st.floats(0.1, 5.0),
    progress=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_pepo_rows_sum_to_their_length_and_are_positive(B, L, gate_alpha, temperature, progress, seed):
    g = torch.Generator().manual_seed(seed)
    prior, entropy = torch.randn(B, L, generator=g), torch.rand(B, L, generator=g) * 3
    mask = _rand_mask(g, B, L)
    w = pepo_token_weights(prior, entropy, mask, gate_alpha=gate_alpha, temperature=temperature, progress=progress)
    torch.testing.assert_close(w.sum(dim=1), mask.sum(dim=1).float(), rtol=1e-5, atol=1e-4)
    # ≥ 0, not > 0: with a small temperature the float32 softmax underflows to 0 (and then 1 + λ(0 − 1) = 0 at λ = 1)
    assert bool((w[mask] >= 0).all()) and not bool(w[~mask].any())
    if progress < 0.999:
        assert bool((w[mask] > 0).all())


def test_pepo_side_by_side_with_fork():
    g = torch.Generator().manual_seed(15)
    visual_id = 99
    for _ in range(N_CASES):
        B, R, D, n_layers = _randint(g, 1, 4), _randint(g, 1, 8), _randint(g, 2, 8), _randint(g, 1, 3)
        T = R + _randint(g, 1, 6)  # prompt of T − R tokens, at least one of them visual
        visual = torch.zeros(B, T, dtype=torch.bool)
        visual[:, : T - R] = torch.rand(B, T - R, generator=g) < 0.5
        visual[torch.arange(B), torch.randint(0, T - R, (B,), generator=g)] = True
        input_ids = torch.where(visual, visual_id, torch.randint(0, 50, (B, T), generator=g))
        layers = [torch.randn(B, T, D, generator=g) * _uniform(g, 0.1, 5.0) for _ in range(n_layers)]
        response_mask = _rand_mask(g, B, R, p_empty=0.0)  # PEPO: the fork raises on an empty response
        # prior: ours at every position, sliced to the response positions; the fork zeroes invalid positions
        prior = pepo_visual_prior(layers, visual)
        fork_prior = fork_hidden_visual_scores(layers, input_ids, R, response_mask, [visual_id])
        # float32 cosine means, two summation orders: |Δ| ≤ a few ulp of values ≤ 1
        torch.testing.assert_close(prior[:, -R:] * response_mask, fork_prior, rtol=0, atol=1e-6)
        # token weights with the linear schedule
        entropy = torch.rand(B, R, generator=g) * _uniform(g, 0.1, 5.0)
        a, temp, lam = _uniform(g, 0.0, 0.5), _uniform(g, 0.2, 4.0), _uniform(g, 0.0, 1.0)
        ours = pepo_token_weights(prior[:, -R:], entropy, response_mask, gate_alpha=a, temperature=temp, progress=lam)
        fork = fork_apply_advantage_scaling_schedule(
            fork_pepo_token_scaling(fork_prior, entropy, response_mask, a, temp), response_mask, "linear", lam
        )
        # float32 softmax × n (n ≤ 8): a few ulp of weights ≤ n
        torch.testing.assert_close(ours, fork, rtol=1e-5, atol=1e-6)


def test_pepo_bad_inputs_name_the_argument():
    layer = torch.randn(2, 3, 4)
    with pytest.raises(ValueError, match=r"rows \[1\] have no visual token"):
        pepo_visual_prior([layer], torch.tensor([[1, 0, 0], [0, 0, 0]]))
    with pytest.raises(ValueError, match="hidden_states"):
        pepo_visual_prior([], torch.ones(2, 3))
    with pytest.raises(ValueError, match=r"hidden_states\[1\]"):
        pepo_visual_prior([layer, torch.randn(2, 3, 5)], torch.ones(2, 3))
    with pytest.raises(ValueError, match="visual_mask"):
        pepo_visual_prior([layer], torch.ones(2, 4))
    prior, mask = torch.rand(1, 3), torch.ones(1, 3)
    for kwargs, match in (
        ({"temperature": 0.0}, "temperature"),
        ({"gate_alpha": -0.1}, "gate_alpha"),
        ({"progress": 1.5}, "progress"),
    ):
        with pytest.raises(ValueError, match=match):
            pepo_token_weights(prior, prior, mask, **kwargs)
    with pytest.raises(ValueError, match="entropy"):
        pepo_token_weights(prior, torch.rand(1, 4), mask)
    with pytest.raises(ValueError, match="prior contains NaN"):
        pepo_token_weights(torch.tensor([[float("nan"), 0.0, 0.0]]), prior, mask)


# ======================================================================================================== VEPO


def _bias_of_fork_jsd(z: torch.Tensor, z_alt: torch.Tensor) -> torch.Tensor:
    """Σ_v m_v·log(1 + 1e-8/m_v): what the fork's log(m + 1e-8) takes off the JSD (float64)."""
    m = 0.5 * (torch.softmax(z.double(), -1) + torch.softmax(z_alt.double(), -1))
    return (m * torch.log1p(1e-8 / m)).sum(-1)


def test_view_divergences_hand_worked():
    # W = I: logits = h. P = (.5, .5), Q = (.9, .1), M = (.7, .3)
    W = torch.eye(2)
    h, h_alt = torch.zeros(1, 1, 2), torch.log(torch.tensor([[[0.9, 0.1]]]))
    out = view_divergences_from_hidden(h, h_alt, W, torch.ones(1, 1))
    jsd = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) + 0.5 * (
        0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    )
    _close(out["jsd"], [[jsd]])
    _close(out["entropy"], [[LN2]])
    _close(out["entropy_alt"], [[-(0.9 * math.log(0.9) + 0.1 * math.log(0.1))]])
    # temperature 2 on logits (0, 2 ln 3): P = (1/4, 3/4) against itself → 0; entropy of (1/4, 3/4)
    h = torch.tensor([[[0.0, 2 * math.log(3.0)]]])
    out = view_divergences_from_hidden(h, h, W, torch.ones(1, 1), temperature=2.0)
    _close(out["jsd"], [[0.0]])
    _close(out["entropy"], [[-(0.25 * math.log(0.25) + 0.75 * math.log(0.75))]])
    # disjoint views: JSD = log 2
    out = view_divergences_from_hidden(
        torch.tensor([[[60.0, 0.0]]]), torch.tensor([[[0.0, 60.0]]]), W, torch.ones(1, 1)
    )
    _close(out["jsd"], [[LN2]])
    # padding → 0 even with NaN hidden states there
    h = torch.tensor([[[0.0, 1.0], [float("nan"), 0.0]]])
    out = view_divergences_from_hidden(h, h.flip(-1), W, torch.tensor([[1, 0]]))
    assert all(float(v[0, 1]) == 0.0 for v in out.values())


def test_view_divergences_fork_jsd_is_biased_down_by_its_eps():
    # A flat distribution over V = 4000 tokens against one tilted by ±δ (H = 1, W = ±1 alternating, h = 0 vs δ):
    # p_v = 1/V, q_v = (1 ± t)/V with t = tanh δ, m_v = (1 ± t/2)/V. JSD = ½KL(p‖m) + ½KL(q‖m) (closed form
    # below) ≈ t²/8 = 1.25e-5 for δ = .01, while the fork's log(m + 1e-8) takes off Σ_v m_v·log(1 + 1e-8/m_v) ≈
    # V·1e-8 = 4e-5 > JSD → the fork clamps the JSD to 0.
    V, delta = 4000, 0.01
    t = math.tanh(delta)
    kl_pm = 0.5 * (math.log(1 / (1 + t / 2)) + math.log(1 / (1 - t / 2)))
    kl_qm = 0.5 * ((1 + t) * math.log((1 + t) / (1 + t / 2)) + (1 - t) * math.log((1 - t) / (1 - t / 2)))
    W = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(V // 2)[:, None]
    h, h_alt = torch.zeros(1, 1, 1, dtype=torch.float64), torch.full((1, 1, 1), delta, dtype=torch.float64)
    ours = view_divergences_from_hidden(h, h_alt, W, torch.ones(1, 1))["jsd"]
    _close(ours, [[0.5 * (kl_pm + kl_qm)]], atol=1e-12)
    _close(ours, [[t**2 / 8]], atol=1e-8)
    z, z_alt = F.linear(h, W), F.linear(h_alt, W)
    assert float(fork_full_vocab_components(z, z_alt, {"jsd"})["jsd"]) == 0.0
    assert float(_bias_of_fork_jsd(z, z_alt)) == pytest.approx(V * 1e-8, rel=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_view_divergences_chunk_invariance_and_jsd_bounds(dtype):
    g = torch.Generator().manual_seed(16)
    for scale in (0.1, 3.0, 60.0):
        h = torch.randn(3, 5, 8, generator=g, dtype=dtype) * scale
        h_alt = torch.randn(3, 5, 8, generator=g, dtype=dtype) * scale
        W = torch.randn(33, 8, generator=g, dtype=dtype)
        mask = _rand_mask(g, 3, 5)
        ref = view_divergences_from_hidden(h, h_alt, W, mask, temperature=0.7, chunk_size=1)
        for chunk in (2, 7, 15, None):
            got = view_divergences_from_hidden(h, h_alt, W, mask, temperature=0.7, chunk_size=chunk)
            for key in ref:
                torch.testing.assert_close(got[key], ref[key], rtol=1e-6, atol=1e-6)
        # 0 ≤ jsd ≤ log 2, up to one float32 ulp above log 2 (float32(log .5) is rounded: disjoint views at
        # scale 60 give log 2 + 1.2e-7 in float32)
        slack = 2.5e-7 if dtype == torch.float32 else 1e-15
        assert bool((ref["jsd"] >= 0).all()) and bool((ref["jsd"] <= LN2 + slack).all())
        assert all(not bool(v[~mask].any()) for v in ref.values())


def test_view_divergences_side_by_side_with_fork():
    # Measured on these inputs (float32): |ours − fork| ≤ 3.4e-6 for jsd, whose fork-side bias Σ m log(1 + 1e-8/m)
    # is ≤ V·1e-8 ≤ 2e-6 here; after adding that bias back the residual is ≤ 1.03e-6. That residual is not the
    # formula: against a float64 JSD of the same float32 logits the fork is within 1e-7, ours within 1.04e-6,
    # because ours computes the logits chunk by chunk (another matmul blocking, logits differ by an ulp, ≈ 4e-6 at
    # |z| ≈ 40, and the JSD moves by at most about half of that). Entropies: ≤ 6.3e-6 (same logit ulps; the
    # fork's safe-log clamp changes < 1e-9). Tolerances: jsd residual 2e-6, jsd raw V·1e-8 + 3e-6, entropies 1e-5.
    g = torch.Generator().manual_seed(17)
    for i in range(N_CASES):
        B, L, H, V = _randint(g, 1, 3), _randint(g, 1, 6), 8, _randint(g, 2, 200)
        scale = (0.5, 2.0, 5.0, 10.0, 20.0)[i % 5]
        h = torch.randn(B, L, H, generator=g) * scale / math.sqrt(H)
        h_alt = h + torch.randn(B, L, H, generator=g) * _uniform(g, 0.0, 1.0) * scale / math.sqrt(H)
        W = torch.randn(V, H, generator=g)
        T = _uniform(g, 0.5, 1.5)
        mask = _rand_mask(g, B, L)
        ours = view_divergences_from_hidden(h, h_alt, W, mask, temperature=T, chunk_size=_randint(g, 1, 8))
        z, z_alt = F.linear(h, W) / T, F.linear(h_alt, W) / T
        fork = fork_full_vocab_components(z, z_alt, {"jsd", "abs_entropy_gap", "entropy"})
        m = mask
        diff = ours["jsd"].double() - fork["jsd"].double()
        assert _max_abs(diff[m]) <= V * 1e-8 + 3e-6
        resid = diff - _bias_of_fork_jsd(z, z_alt)
        # where the fork clamped to 0 the bias overshoots the exact JSD: only check where the fork's JSD is > 0
        resid_ok = m & (fork["jsd"] > 0)
        assert _max_abs(resid[resid_ok]) <= 2e-6
        torch.testing.assert_close(ours["entropy"][m], fork["entropy"][m], rtol=0, atol=1e-5)
        torch.testing.assert_close(ours["entropy_alt"][m], fork["corrupted_entropy"][m], rtol=0, atol=1e-5)
        torch.testing.assert_close(
            (ours["entropy_alt"] - ours["entropy"]).abs()[m], fork["abs_entropy_gap"][m], rtol=0, atol=2e-5
        )


def test_vepo_token_scores_hand_worked():
    # α = .7, one row of 4 valid tokens + padding: ĵ = [0, .25, .5, 1], ĝ = |H_alt − H| normalised = [0, .5, .25, 1],
    # Ĥ = [0, 1/3, 2/3, 1]; s = (1 − (1 − ĵ)^.7 (1 − ĝ)^.3)·Ĥ
    jsd = torch.tensor([[0.0, 0.25, 0.5, 1.0, 7.0]])
    entropy = torch.tensor([[0.0, 1.0, 2.0, 3.0, 7.0]])
    entropy_alt = entropy + torch.tensor([[0.0, 0.5, 0.25, 1.0, 3.0]])
    mask = torch.tensor([[1, 1, 1, 1, 0]])

    def fused(j, gap):
        return 1.0 - (1.0 - j) ** 0.7 * (1.0 - gap) ** 0.3

    expected = [[0.0, fused(0.25, 0.5) / 3, fused(0.5, 0.25) * 2 / 3, 1.0, 0.0]]
    _close(vepo_token_scores(jsd, entropy, entropy_alt - entropy, mask, jsd_weight=0.7), expected)
    # α = 1: only the JSD, gated by the entropy: [0, .25/3, .5·2/3, 1]
    _close(
        vepo_token_scores(jsd, entropy, entropy_alt - entropy, mask, jsd_weight=1.0), [[0.0, 0.25 / 3, 1 / 3, 1.0, 0.0]]
    )


@HYP
@given(
    B=st.integers(1, 4),
    L=st.integers(1, 10),
    alpha=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_vepo_token_scores_are_in_unit_interval(B, L, alpha, seed):
    g = torch.Generator().manual_seed(seed)
    jsd, entropy, entropy_alt = (torch.rand(B, L, generator=g) * LN2 for _ in range(3))
    mask = _rand_mask(g, B, L)
    s = vepo_token_scores(jsd, entropy, entropy_alt - entropy, mask, jsd_weight=alpha)
    assert s.dtype == torch.float32
    assert bool(((s >= 0) & (s <= 1)).all()) and not bool(s[~mask].any())


def test_vepo_token_scores_side_by_side_with_fork():
    g = torch.Generator().manual_seed(18)
    for _ in range(N_CASES):
        B, L = _randint(g, 1, 6), _randint(g, 1, 30)
        jsd = torch.rand(B, L, generator=g) * LN2
        entropy, entropy_alt = torch.rand(B, L, generator=g) * 5, torch.rand(B, L, generator=g) * 5
        mask = _rand_mask(g, B, L)
        alpha = (0.0, 0.5, 0.7, 1.0, _uniform(g, 0.0, 1.0))[_randint(g, 0, 4)]
        ours = vepo_token_scores(jsd, entropy, entropy_alt - entropy, mask, jsd_weight=alpha)
        comps = {"jsd": jsd, "abs_entropy_gap": (entropy_alt - entropy).abs(), "entropy": entropy}
        fork = fork_combine_full_vocab_scores(comps, mask, "vepo", alpha, "normal_entropy")
        torch.testing.assert_close(ours, fork, rtol=0, atol=1e-6)


def test_vepo_bad_inputs_name_the_argument():
    W, h, ones = torch.randn(5, 4), torch.randn(1, 2, 4), torch.ones(1, 2)
    with pytest.raises(ValueError, match="weight"):
        view_divergences_from_hidden(h, h, torch.randn(5, 3), ones)
    with pytest.raises(ValueError, match="weight"):
        view_divergences_from_hidden(h, h, W.double(), ones)
    with pytest.raises(ValueError, match="hidden_alt"):
        view_divergences_from_hidden(h, torch.randn(1, 3, 4), W, ones)
    with pytest.raises(ValueError, match="temperature"):
        view_divergences_from_hidden(h, h, W, ones, temperature=0.0)
    with pytest.raises(ValueError, match="chunk_size"):
        view_divergences_from_hidden(h, h, W, ones, chunk_size=0)
    with pytest.raises(ValueError, match="mask"):
        view_divergences_from_hidden(h, h, W, torch.ones(2, 2))
    s = torch.rand(1, 2)
    with pytest.raises(ValueError, match="jsd_weight"):
        vepo_token_scores(s, s, s, ones, jsd_weight=1.5)
    with pytest.raises(ValueError, match="entropy_gap"):
        vepo_token_scores(s, s, torch.rand(1, 3), ones)
    with pytest.raises(ValueError, match="mask"):
        vepo_token_scores(s, s, s, torch.ones(1, 3))


# =================================================================================================== top-p entropy


def test_top_p_entropy_hand_worked():
    # W = I: logits = log(.5, .3, .2). top-p .6: mass before = (0, .5, .8) < .6 keeps (.5, .3) → (.625, .375);
    # top-p .45 keeps only the top token → 0; top-p 1 is the full entropy of (.5, .3, .2)
    W = torch.eye(3)
    h = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    one = torch.ones(1, 1)
    _close(top_p_entropy_from_hidden(h, W, one, top_p=0.6), [[-(0.625 * math.log(0.625) + 0.375 * math.log(0.375))]])
    _close(top_p_entropy_from_hidden(h, W, one, top_p=0.45), [[0.0]])
    _close(top_p_entropy_from_hidden(h, W, one, top_p=1.0), [[-sum(p * math.log(p) for p in (0.5, 0.3, 0.2))]])


def test_top_p_entropy_side_by_side_with_fork_and_full_entropy_at_one():
    # Measured: |ours − fork| ≤ 1e-6 (float32 exp(log_softmax) vs softmax; no token on the top-p border flipped
    # here). top_p = 1 (the full entropy) vs logprobs_from_hidden's entropy, V ≤ 128: ≤ 5e-6. Tolerances 1e-5.
    g = torch.Generator().manual_seed(19)
    for i in range(N_CASES):
        B, L, H, V = _randint(g, 1, 3), _randint(g, 1, 6), 8, _randint(g, 2, 128)
        h = torch.randn(B, L, H, generator=g) * (0.5, 2.0, 5.0, 10.0)[i % 4] / math.sqrt(H)
        W = torch.randn(V, H, generator=g)
        T = _uniform(g, 0.5, 1.5)
        mask = _rand_mask(g, B, L)
        top_p = _uniform(g, 0.05, 0.99)
        ours = top_p_entropy_from_hidden(h, W, mask, top_p=top_p, temperature=T, chunk_size=_randint(g, 1, 8))
        fork = fork_top_p_entropy_from_logits(F.linear(h, W) / T, top_p) * mask
        torch.testing.assert_close(ours, fork, rtol=0, atol=1e-5)
        full = top_p_entropy_from_hidden(h, W, mask, top_p=1.0, temperature=T)
        labels = torch.randint(0, V, (B, L), generator=g)
        _, entropy = logprobs_from_hidden(h, W, labels, temperature=T, return_entropy=True)
        torch.testing.assert_close(full, entropy * mask, rtol=0, atol=1e-5)
        torch.testing.assert_close(
            full, fork_top_p_entropy_from_logits(F.linear(h, W) / T, 1.0) * mask, rtol=0, atol=1e-5
        )


def test_top_p_entropy_bad_inputs_name_the_argument():
    W, h, ones = torch.randn(5, 4), torch.randn(1, 2, 4), torch.ones(1, 2)
    for top_p in (0.0, 1.5, True):
        with pytest.raises(ValueError, match="top_p"):
            top_p_entropy_from_hidden(h, W, ones, top_p=top_p)
    with pytest.raises(ValueError, match="weight"):
        top_p_entropy_from_hidden(h, torch.randn(5, 2), ones)
    with pytest.raises(ValueError, match="hidden"):
        top_p_entropy_from_hidden(torch.randn(2, 4), W, ones)
    with pytest.raises(ValueError, match="temperature"):
        top_p_entropy_from_hidden(h, W, ones, temperature=-1.0)


# ================================================================================================= abs_log_ratio


def test_abs_log_ratio_hand_worked_and_side_by_side_with_fork():
    # |log .25 − log .5| = ln 2; equal → 0; |−30 − 0| = 30; padding → 0 even when NaN
    lp = torch.tensor([[math.log(0.25), math.log(0.5), -30.0, float("nan")]])
    lp_alt = torch.tensor([[math.log(0.5), math.log(0.5), 0.0, 1.0]])
    _close(abs_log_ratio(lp, lp_alt, torch.tensor([[1, 1, 1, 0]])), [[LN2, 0.0, 30.0, 0.0]])
    g = torch.Generator().manual_seed(20)
    for _ in range(N_CASES):
        B, L = _randint(g, 1, 6), _randint(g, 1, 30)
        lp, lp_alt = -torch.rand(B, L, generator=g) * 10, -torch.rand(B, L, generator=g) * 10
        mask = _rand_mask(g, B, L)
        ours = abs_log_ratio(lp, lp_alt, mask)
        torch.testing.assert_close(ours, fork_sampled_abs_log_ratio(lp_alt, lp) * mask, rtol=0, atol=0)
        assert ours.dtype == torch.float32 and bool((ours >= 0).all())
    # bf16 inputs: float32 result, as the fork's .float()
    lp16, alt16 = lp.to(torch.bfloat16), lp_alt.to(torch.bfloat16)
    torch.testing.assert_close(abs_log_ratio(lp16, alt16, mask), fork_sampled_abs_log_ratio(alt16, lp16) * mask)


def test_abs_log_ratio_bad_inputs_name_the_argument():
    ones = torch.ones(1, 2)
    with pytest.raises(ValueError, match="lp_alt"):
        abs_log_ratio(ones, torch.ones(1, 3), ones)
    with pytest.raises(ValueError, match="lp contains NaN"):
        abs_log_ratio(torch.tensor([[float("nan"), 0.0]]), ones, ones)
    with pytest.raises(ValueError, match="lp must"):
        abs_log_ratio(torch.ones(2), torch.ones(2), ones)
    with pytest.raises(ValueError, match="mask"):
        abs_log_ratio(ones, ones, torch.ones(2, 2))


# ========================================================================================================== PGPO


def test_pgpo_hand_worked_matches_fork():
    # S = [0, e − 1, e² − 1] → Ŝ = log1p(S) = [0, 1, 2] → I = Ŝ/(2 + eps) ≈ [0, .5, 1]
    S = torch.tensor([[0.0, math.e - 1.0, math.e**2 - 1.0, 5.0]])
    valid = torch.tensor([[1, 1, 1, 0]])
    # absolute τ = .4, β = 2: ω = [0/.4, 1 + 2·.1/.6, 1 + 2·.6/.6] = [0, 4/3, 3]; Σ = 13/3 → ·3/Σ = [0, 12/13, 27/13]
    expected = [[0.0, 12 / 13, 27 / 13, 0.0]]
    _close(pgpo_token_weights(S, valid, tau=0.4, beta=2.0), expected, atol=5e-6)  # eps = 1e-6: I_top = 2/(2 + 1e-6)
    _close(pgpo_token_weights(S, valid, tau=0.4, beta=2.0, eps=1e-12), expected, atol=1e-6)
    _close(fork_pgpo_token_scaling(S, valid, 0.4, 2.0)[0], expected, atol=1e-6)
    # quantile τ_i = sorted I at min(floor(3·.4), 2) = 1 → .5; I = .5 is not < τ → 1; I = 1 → 1 + 2·.5/.5 = 3
    kwargs = {"tau": 0.4, "beta": 2.0, "eps": 1e-12, "threshold_mode": "quantile", "mass_normalization": False}
    _close(pgpo_token_weights(S, valid, **kwargs), [[0.0, 1.0, 3.0, 0.0]], atol=1e-6)
    # floor .1 without mass normalisation: the below-threshold 0 is raised to .1
    _close(
        pgpo_token_weights(S, valid, tau=0.4, beta=2.0, eps=1e-12, weight_floor=0.1, mass_normalization=False),
        [[0.1, 4 / 3, 3.0, 0.0]],
        atol=1e-6,
    )


def test_pgpo_deliberate_differences_from_fork():
    # (1) eps inside I: spread 1e-3, no mass normalisation → the fork's top token has I = 1 → 1 + β = 3; vppo's
    # I = 1e-3/(1e-3 + 1e-6) = .999 → 1 + 2(.999 − .4)/(.6 + 1e-6) = 2.99667
    S = torch.expm1(torch.tensor([[0.0, 1e-3]]))
    one_row = torch.ones(1, 2)
    fork_w = fork_pgpo_token_scaling(S, one_row, 0.4, 2.0, mass_normalization=False)[0]
    ours = pgpo_token_weights(S, one_row, mass_normalization=False)
    _close(fork_w[0, 1], 3.0, atol=1e-5)
    _close(ours[0, 1], 1 + 2 * (1e-3 / (1e-3 + 1e-6) - 0.4) / (0.6 + 1e-6), atol=1e-5)
    assert float(fork_w[0, 1] - ours[0, 1]) > 3e-3
    # (2) degenerate rule: spread 1e-7 ∈ (1e-8, 1e-6]: the fork normalises ω = [0, 3] → [0, 2]; vppo → [1, 1]
    S = torch.tensor([[0.0, 1e-7]])
    _close(fork_pgpo_token_scaling(S, one_row, 0.4, 2.0)[0], [[0.0, 2.0]], atol=1e-5)
    _close(pgpo_token_weights(S, one_row), [[1.0, 1.0]])
    _close(pgpo_token_weights(S, one_row, eps=1e-12), [[0.0, 2.0]], atol=1e-4)  # with a tiny eps as the fork
    # (3) negative S: the fork clamps at 0 → Ŝ = [0, 0, ln 2] → I = [0, 0, 1] → ω = [0, 0, 3];
    # vppo: Ŝ = [ln .5, 0, ln 2] → I = [0, .5, 1] → ω = [0, 1 + 2·.1/.6, 3] = [0, 4/3, 3]
    S, valid3 = torch.tensor([[-0.5, 0.0, 1.0]]), torch.ones(1, 3)
    _close(fork_pgpo_token_scaling(S, valid3, 0.4, 2.0, mass_normalization=False)[0], [[0.0, 0.0, 3.0]], atol=1e-6)
    _close(pgpo_token_weights(S, valid3, eps=1e-12, mass_normalization=False), [[0.0, 4 / 3, 3.0]], atol=1e-6)
    with pytest.raises(ValueError, match="S must be > -1"):
        pgpo_token_weights(torch.tensor([[-1.0, 0.0]]), one_row)
    # (4) a spread below 1e-8, no mass normalisation: the fork divides by 1e-8 → I_top = 5e-9/1e-8 = .5 →
    # 1 + 2(.5 − .4)/.6 = 4/3; vppo (eps 1e-12): I_top = 5e-9/(5e-9 + 1e-12) ≈ .9998 → ≈ 3
    S = torch.tensor([[0.0, 5e-9]], dtype=torch.float64)
    _close(
        fork_pgpo_token_scaling(S, one_row, 0.4, 2.0, mass_normalization=False)[0],
        [[0.0, 1 + 2 * 0.1 / 0.6]],
        atol=1e-6,
    )
    _close(pgpo_token_weights(S, one_row, eps=1e-12, mass_normalization=False), [[0.0, 3.0]], atol=1e-3)
    # (5) dtype: float64 stays float64 in vppo; the fork computes in float32 and casts back
    S = torch.tensor([[0.0, 0.1, 0.2, 0.30000001]], dtype=torch.float64)
    ours, fork_w = pgpo_token_weights(S, torch.ones(1, 4), eps=1e-12), fork_pgpo_token_scaling(S, torch.ones(1, 4))[0]
    assert ours.dtype == fork_w.dtype == torch.float64
    torch.testing.assert_close(ours, fork_w, rtol=0, atol=1e-6)


@pytest.mark.parametrize("threshold_mode", ["absolute", "quantile"])
@pytest.mark.parametrize("weight_floor", [0.0, 0.1])
@pytest.mark.parametrize("mass_normalization", [True, False])
def test_pgpo_side_by_side_with_fork(threshold_mode, weight_floor, mass_normalization):
    # With eps = 1e-12 vppo's I, τ and ω are the fork's float32 values (measured: ≤ 5e-7 apart, the order of the
    # mass-normalisation product); rows whose log1p spread is in (0, 1e-4) are left out (there eps placement
    # matters, see the docstring). Tolerance 2e-6 absolute + 1e-6 relative (weights ≤ ~1 + β).
    g = torch.Generator().manual_seed(21)
    checked = 0
    for _ in range(N_CASES):
        B, L = _randint(g, 1, 5), _randint(g, 1, 12)
        S = torch.rand(B, L, generator=g) * torch.rand(B, 1, generator=g) * 3
        mask = _rand_mask(g, B, L)
        tau, beta = _uniform(g, 0.1, 0.9), _uniform(g, 0.0, 3.0)
        s_hat = torch.log1p(S)
        spread = torch.where(mask, s_hat, -math.inf).amax(1) - torch.where(mask, s_hat, math.inf).amin(1)
        keep = ~((spread > 0) & (spread < 1e-4))
        ours = pgpo_token_weights(
            S,
            mask,
            tau=tau,
            beta=beta,
            eps=1e-12,
            threshold_mode=threshold_mode,
            weight_floor=weight_floor,
            mass_normalization=mass_normalization,
        )
        fork, _ = fork_pgpo_token_scaling(S, mask, tau, beta, threshold_mode, weight_floor, mass_normalization)
        torch.testing.assert_close(ours[keep], fork[keep], rtol=1e-6, atol=2e-6)
        checked += int(keep.sum())
    assert checked > N_CASES  # the filter leaves almost every row in


@HYP
@given(
    B=st.integers(1, 4),
    L=st.integers(1, 12),
    tau=st.floats(0.05, 0.95),
    beta=st.floats(0.0, 4.0),
    threshold_mode=st.sampled_from(["absolute", "quantile"]),
    weight_floor=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 2**31 - 1),
)
def test_pgpo_mass_is_conserved_weights_are_non_negative_and_order_preserving(
    B, L, tau, beta, threshold_mode, weight_floor, seed
):
    g = torch.Generator().manual_seed(seed)
    S = (torch.rand(B, L, generator=g, dtype=torch.float64) * 2).round(decimals=1)  # ties and equal rows happen
    mask = _rand_mask(g, B, L)
    kwargs = {"tau": tau, "beta": beta, "threshold_mode": threshold_mode, "weight_floor": weight_floor}
    w = pgpo_token_weights(S, mask, **kwargs)
    torch.testing.assert_close(w.sum(dim=1), mask.sum(dim=1).double(), rtol=1e-9, atol=1e-9)
    assert bool((w >= 0).all()) and not bool(w[~mask].any())
    for r in range(B):
        s, v = S[r][mask[r]], w[r][mask[r]]
        order = torch.argsort(s, stable=True)
        assert bool((v[order].diff() >= -1e-12).all())
    raw = pgpo_token_weights(S, mask, mass_normalization=False, **kwargs)
    assert bool((raw >= 0).all()) and not bool(raw[~mask].any())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"tau": 1.0}, "tau"),
        ({"tau": 0.0}, "tau"),
        ({"beta": -1.0}, "beta"),
        ({"eps": 0.0}, "eps"),
        ({"weight_floor": 1.5}, "weight_floor"),
        ({"threshold_mode": "median"}, "threshold_mode"),
    ],
)
def test_pgpo_bad_inputs_name_the_argument(kwargs, match):
    with pytest.raises(ValueError, match=match):
        pgpo_token_weights(torch.rand(2, 3), torch.ones(2, 3), **kwargs)


def test_pgpo_bad_tensors_name_the_argument():
    with pytest.raises(ValueError, match="S contains NaN"):
        pgpo_token_weights(torch.tensor([[float("nan"), 1.0]]), torch.ones(1, 2))
    with pytest.raises(ValueError, match="mask"):
        pgpo_token_weights(torch.rand(1, 2), torch.ones(1, 3))


# ===================================================================================== policy_loss vs the fork

CLIP = {"clip_low": 0.2, "clip_high": 0.3, "dual_clip": 3.0}
FORK_MODE = {"token-mean": "token", "seq-mean-token-mean": "seq"}
CONSTANT_PARTS = ("decremental_entropy_loss", "incremental_entropy_loss")  # the fork's no-grad view entropies


def _loss_case(g: torch.Generator, method: str, aggregation: str):
    """Random inputs of one method; returns (ours(leaves) -> loss, fork(leaves) -> (loss, parts), leaves)."""
    nonempty_all = method == "pepo"  # the fork's PEPO raises on an empty response
    B, L = _randint(g, 2 if method == "cgpo" else 1, 5), _randint(g, 1, 10)
    mask = _rand_mask(g, B, L, p_empty=0.0 if nonempty_all else 0.25, nonempty=2 if method == "cgpo" else 1)
    maskf = mask.float()
    lp_old = -torch.rand(B, L, generator=g) * 3
    lp_new = lp_old + torch.randn(B, L, generator=g) * 0.4  # ratios on both sides of the clip range
    adv = torch.randn(B, generator=g)
    adv_tok = adv[:, None].expand(B, L)
    leaves = {"lp": lp_new}
    mode = FORK_MODE[aggregation]
    fork_kw: dict = {"loss_avg_mode": mode}
    ours_kw: dict = {"aggregation": aggregation, **CLIP}
    ours_aux: dict = {}

    if method in ("papo", "dvrp"):
        q_dec = lp_old + torch.randn(B, L, generator=g) * 0.8  # mask view (no grad)
        gamma, eta, dec = _uniform(g, 0.0, 0.2), _uniform(g, -0.1, 0.1), _uniform(g, -0.1, 0.1)
        fork_kw.update(
            decremental_old_log_probs=q_dec,
            visual_sensitivity_loss_coef=gamma,
            visual_sensitivity_reference="current",
            invariant_entropy_coef=eta,
            decremental_entropy_coef=dec,
        )
        ours_kw["entropy_coef"] = eta
        ours_aux["visual_kl"] = (-gamma, lambda lp, q=q_dec: kl_penalty(lp, q, "k3"))
        if method == "dvrp":
            q_inc = lp_old + torch.randn(B, L, generator=g) * 0.5  # noise view (no grad)
            rob, inc = _uniform(g, 0.0, 0.2), _uniform(g, -0.1, 0.1)
            fork_kw.update(
                incremental_old_log_probs=q_inc, visual_robustness_loss_coef=rob, incremental_entropy_coef=inc
            )
            ours_aux["robustness_kl"] = (rob, lambda lp, q=q_inc: kl_penalty(lp, q, "k3"))
    elif method == "tor":
        E = top_fraction_mask(torch.randn(B, L, generator=g), mask, fraction=0.3, scope="batch")
        P = top_fraction_mask(torch.randn(B, L, generator=g), mask, fraction=0.3, scope="batch")
        gr, gp = _uniform(g, 0.5, 1.5), _uniform(g, 0.0, 1.0)
        fork_kw.update(
            entropy_mask=E, perception_mask=P, tor_use_token_weighting=True, tor_rsn_weight=gr, tor_prcp_weight=gp
        )
        ours_kw["token_weights"] = tor_token_weights(E, P, mask, reasoning_weight=gr, perception_weight=gp)
    elif method == "vepo":
        sel = top_fraction_mask(torch.rand(B, L, generator=g), mask, fraction=0.2)
        c = _uniform(g, 0.0, 0.05)
        leaves["entropy"] = torch.rand(B, L, generator=g) * 3
        fork_kw.update(
            perception_mask=sel,
            normalize_pg_loss_by_selected_tokens=True,
            invariant_entropy_coef=-c,
            entropy_loss_type="full",
        )
        if aggregation == "token-mean":
            scale = mask.sum() / sel.sum()
        else:  # per response n_i / n_sel,i (every non-empty response selects ≥ 1 token)
            scale = (mask.sum(1) / sel.sum(1).clamp(min=1))[:, None]
        ours_kw["token_weights"] = sel * scale
        ours_aux["entropy_bonus"] = (-c, None)  # the entropy leaf itself
    elif method == "cgpo":
        S = torch.rand(B, L, generator=g) * 2
        E = top_fraction_mask(torch.randn(B, L, generator=g), mask, fraction=0.3, scope="batch")
        P = top_fraction_mask(torch.randn(B, L, generator=g), mask, fraction=0.3, scope="batch")
        coef = _uniform(g, 0.0, 0.5)
        alpha = cgpo_response_factors(trajectory_dependency(S, mask), mask.any(1), coef=coef)
        ctx = fork_cgpo_shaping_context(*fork_response_mean_scores(S, maskf))
        factors = fork_advantage_scaling(
            "cgpo", S, maskf, shaping_context=ctx, perception_mask=P, cgpo_response_scaling_coef=coef
        )
        fork_kw.update(entropy_mask=E, perception_mask=P, scaling_factors=factors)
        ours_kw["token_weights"] = torch.where(P, alpha[:, None], 1.0) * (E | P)
    elif method == "pepo":
        prior, entropy = torch.randn(B, L, generator=g), torch.rand(B, L, generator=g) * 3
        a, temp, lam = _uniform(g, 0.0, 0.3), _uniform(g, 0.5, 3.0), _uniform(g, 0.0, 1.0)
        w = pepo_token_weights(prior, entropy, mask, gate_alpha=a, temperature=temp, progress=lam)
        factors = fork_apply_advantage_scaling_schedule(
            fork_pepo_token_scaling(prior, entropy, maskf, a, temp), maskf, "linear", lam
        )
        fork_kw["scaling_factors"] = factors
        ours_kw["token_weights"] = w
    else:
        raise AssertionError(method)

    def ours(lv):
        aux = {
            name: (coef, lv["entropy"] if make is None else make(lv["lp"])) for name, (coef, make) in ours_aux.items()
        }
        return policy_loss(lv["lp"], lp_old, adv, mask, aux_terms=aux or None, **ours_kw)[0]

    def fork(lv):
        return fork_perception_loss(lv["lp"], lp_old, adv_tok, maskf, entropy=lv.get("entropy"), **fork_kw)

    return ours, fork, leaves, maskf, mode


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
@pytest.mark.parametrize("method", ["papo", "dvrp", "tor", "vepo", "cgpo", "pepo"])
def test_policy_loss_side_by_side_with_fork_perception_loss(method, aggregation):
    # float32 throughout; the same per-token terms summed in the same order → default float32 assert_close
    # tolerances (rtol 1.3e-6, atol 1e-5) for the value and the gradients.
    g = torch.Generator().manual_seed(sum(map(ord, method + aggregation)))
    n_const = 0
    for _ in range(N_CASES // 2):  # × 2 aggregations = N_CASES per method
        ours_fn, fork_fn, leaves, maskf, mode = _loss_case(g, method, aggregation)
        ours_leaves = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        fork_leaves = {k: v.clone().requires_grad_(True) for k, v in leaves.items()}
        ours_loss = ours_fn(ours_leaves)
        fork_total, parts = fork_fn(fork_leaves)
        constants = [parts[k] for k in CONSTANT_PARTS if k in parts]
        assert all(not c.requires_grad for c in constants)
        n_const += len(constants)
        fork_loss = fork_total - sum(constants) if constants else fork_total
        # dp_actor's rescale (single rank, micro-batch = mini-batch): × rows / non-empty rows in seq mode
        fork_loss = fork_dp_actor_micro_batch_loss(fork_loss, maskf, mode, maskf)
        torch.testing.assert_close(ours_loss, fork_loss)
        ours_grads = torch.autograd.grad(ours_loss, list(ours_leaves.values()))
        fork_grads = torch.autograd.grad(fork_loss, list(fork_leaves.values()))
        for name, a, b in zip(ours_leaves, ours_grads, fork_grads, strict=True):
            torch.testing.assert_close(a, b, msg=lambda m, name=name: f"d loss / d {name}: {m}")
    if method in ("papo", "dvrp"):
        assert n_const > 0  # the fork's constant view-entropy terms were present and subtracted


def test_policy_loss_papo_hand_worked_against_fork():
    # one row, two tokens, p = p_old (ratio 1), A = 1 → PG terms −1 each, token mean −1;
    # k3(q ‖ p) with q − p = [ln(.25/.5), 0] = [−ln 2, 0] → [e^{−ln 2} + ln 2 − 1, 0] = [ln 2 − .5, 0]
    # γ = .1: −.1·mean(k3) = −.1(ln 2 − .5)/2; η = .05: .05·mean(−log p) = .05·(ln 2 + 2 ln 2)/2
    lp = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    old = lp.detach().clone()
    q = torch.log(torch.tensor([[0.25, 0.25]]))
    loss, _ = policy_loss(
        lp,
        old,
        torch.ones(1),
        torch.ones(1, 2),
        entropy_coef=0.05,
        aux_terms={"visual_kl": (-0.1, kl_penalty(lp, q, "k3"))},
        **CLIP,
    )
    _close(loss, -1.0 - 0.1 * (LN2 - 0.5) / 2 + 0.05 * 1.5 * LN2)
    (grad,) = torch.autograd.grad(loss, lp)
    # d/d log p: PG −A·r/2 = −.5 each; k3' = 1 − q/p = [.5, 0] → −.1/2·[.5, 0]; entropy −.05/2 each
    _close(grad, [[-0.5 - 0.025 - 0.025, -0.5 - 0.025]])
    fork_loss, _ = fork_perception_loss(
        lp,
        old,
        torch.ones(1, 2),
        torch.ones(1, 2),
        decremental_old_log_probs=q,
        visual_sensitivity_loss_coef=0.1,
        invariant_entropy_coef=0.05,
    )
    _close(fork_loss, loss)


def test_top_p_one_is_the_full_entropy_at_qwen_vocabulary_size():
    """Regression (found by the side-by-side review): at V = 151,936 a float32 cumulative sum reaches 1 before the
    last token, and a nucleus rule at top_p = 1 dropped ~12,000 tail tokens. top_p = 1 is now the full entropy."""
    from vppo_core.dependency import top_p_entropy_from_hidden
    from vppo_core.logprobs import logprobs_from_hidden

    g = torch.Generator().manual_seed(0)
    V, H = 151_936, 32
    h = torch.randn(1, 1, H, generator=g)
    W = torch.randn(V, H, generator=g) * 3 / H**0.5
    exact = -(torch.log_softmax((h[0] @ W.T).double(), -1).exp() * torch.log_softmax((h[0] @ W.T).double(), -1)).sum()
    got = top_p_entropy_from_hidden(h, W, torch.ones(1, 1), top_p=1.0)
    _, full = logprobs_from_hidden(h, W, torch.zeros(1, 1, dtype=torch.long), return_entropy=True)
    assert abs(float(got) - float(exact)) < 2e-5 and abs(float(got) - float(full)) < 2e-5


def test_jsd_of_views_that_barely_differ_keeps_its_relative_precision():
    """Regression (issue 16's whole-step test on the tiny model): under VEPO's noise a small model's two views differ
    by JSD ~1e-11, and the difference of two float32 log-softmaxes buried that in ~1e-8 of noise, so VEPO's
    per-response ranking was random. The log-ratio form keeps ~1e-3 relative precision there."""
    g = torch.Generator().manual_seed(3)
    V, H = 1_000, 16
    W = torch.randn(V, H, generator=g) * 0.5
    h = torch.randn(2, 6, H, generator=g)
    h_alt = h + 1e-5 * torch.randn(2, 6, H, generator=g)
    got = view_divergences_from_hidden(h, h_alt, W, torch.ones(2, 6))["jsd"].double()
    za, zb = (h @ W.T).double(), (h_alt @ W.T).double()  # the same float32 logits, in float64 from here
    p, q = za.softmax(-1), zb.softmax(-1)
    m = (p + q) / 2
    want = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    assert float(want.max()) < 1e-8  # the regime in question
    torch.testing.assert_close(got, want, rtol=2e-2, atol=1e-15)


def test_top_fraction_mask_breaks_ties_at_random_with_a_generator():
    """With a generator, equal scores are chosen in a random order (CGPO's all-zero dependency of responses that name
    no box would otherwise fill the batch set with the batch's first tokens); the count is still exact, and the
    strictly larger scores are still all taken."""
    scores = torch.zeros(1, 40)
    scores[0, 30] = 1.0  # one token above the tied rest
    mask = torch.ones(1, 40)
    by_position = top_fraction_mask(scores, mask, fraction=0.25, scope="batch")
    assert by_position[0, :9].all() and by_position[0, 30] and int(by_position.sum()) == 10
    picks = []
    for seed in range(20):
        chosen = top_fraction_mask(
            scores, mask, fraction=0.25, scope="batch", generator=torch.Generator().manual_seed(seed)
        )
        assert int(chosen.sum()) == 10 and bool(chosen[0, 30])
        picks.append(chosen)
        again = top_fraction_mask(
            scores, mask, fraction=0.25, scope="batch", generator=torch.Generator().manual_seed(seed)
        )
        assert torch.equal(chosen, again)
    hits = torch.stack(picks).float().mean(0)[0]
    assert float(hits[:30].max()) < 1.0 and float(hits[31:].sum()) > 0  # not always the first tokens
    # per response too, and with no ties the generator changes nothing
    g = torch.Generator().manual_seed(0)
    distinct = torch.randn(3, 9, generator=g)
    m = torch.ones(3, 9)
    assert torch.equal(
        top_fraction_mask(distinct, m, fraction=0.4, generator=torch.Generator().manual_seed(5)),
        top_fraction_mask(distinct, m, fraction=0.4),
    )
