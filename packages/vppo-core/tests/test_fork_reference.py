"""Hand-worked checks of tests/fork_reference.py (the transcription of the fork's arithmetic), to catch typos.

The expected numbers are worked out by hand (in the comments) from the formulas, not by running the fork.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

from fork_reference import (
    fork_apply_advantage_scaling_schedule,
    fork_cgpo_response_scaling,
    fork_cgpo_shaping_context,
    fork_combine_full_vocab_scores,
    fork_compute_noise_schedule,
    fork_full_vocab_components,
    fork_hidden_visual_scores,
    fork_perception_loss,
    fork_pgpo_token_scaling,
    fork_response_mean_scores,
    fork_sampled_abs_log_ratio,
    fork_sampled_low_var_kl,
    fork_top_p_entropy_from_logits,
    fork_top_quantile_mask,
    fork_tor_weight,
    fork_vp_diffusion_noise,
    fork_vppo_response_scaling,
    fork_vppo_shaping_context,
)

LN2 = math.log(2.0)


def _close(actual, expected, atol=1e-6):
    torch.testing.assert_close(
        torch.as_tensor(actual, dtype=torch.float64), torch.as_tensor(expected, dtype=torch.float64), atol=atol, rtol=0
    )


def test_sampled_metrics_tor_weight_and_top_p_entropy():
    # k3 with d = q − ref = −ln 2: e^d − d − 1 = 0.5 + ln 2 − 1; d = 0 → 0; d = −30 → clamp −20 → 19 + e^−20 → 10
    q = torch.tensor([math.log(0.25), math.log(0.5), -30.0])
    ref = torch.tensor([math.log(0.5), math.log(0.5), 0.0])
    _close(fork_sampled_low_var_kl(q, ref, "old"), [LN2 - 0.5, 0.0, 10.0])
    _close(fork_sampled_abs_log_ratio(q, ref), [LN2, 0.0, 30.0])
    # ToR: E = [1,0,0,1], P = [1,1,0,0] → γ_r on E, γ_p on P∧¬E
    e = torch.tensor([[True, False, False, True]])
    p = torch.tensor([[True, True, False, False]])
    _close(fork_tor_weight(e, p, 1.0, 0.5), [[1.0, 0.5, 0.0, 1.0]])
    # top-p 0.6 of (0.5, 0.3, 0.2): mass above = (0, .5, .8) < .6 keeps (.5, .3) → (.625, .375)
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    _close(fork_top_p_entropy_from_logits(logits, 0.6), [-(0.625 * math.log(0.625) + 0.375 * math.log(0.375))])
    _close(fork_top_p_entropy_from_logits(logits, 0.45), [0.0])  # only the top-1 is kept


def test_top_quantile_mask_batch_response_and_tie_break():
    # batch: N = 10, q = 0.3 → ceil(float32(3.0000000000000004)) = 3 (math.ceil of the float64 product would be 4)
    values = torch.arange(10, dtype=torch.float32).reshape(2, 5)
    mask, threshold, fraction = fork_top_quantile_mask(values, torch.ones(2, 5), 0.3, "batch")
    assert mask.tolist() == [[False] * 5, [False, False, True, True, True]]
    _close(threshold, 7.0)
    _close(fraction, 0.3)
    # ties with a generator: a stable sort of the permuted (all-equal) values keeps the permutation's order
    ties = torch.ones(1, 4)
    mask, _, _ = fork_top_quantile_mask(
        ties, torch.ones(1, 4), 0.5, "batch", generator=torch.Generator().manual_seed(7)
    )
    expected = torch.zeros(1, 4, dtype=torch.bool)
    expected[0, torch.randperm(4, generator=torch.Generator().manual_seed(7))[:2]] = True
    assert torch.equal(mask, expected)
    # response: row 0 L = 3, k = ceil(1.5) = 2 → {3, 2}, k-th = 2; row 1 L = 1, k = 1 → {9}, k-th = 9
    values = torch.tensor([[1.0, 3.0, 2.0, 100.0], [9.0, 50.0, 50.0, 50.0]])
    valid = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]])
    mask, threshold, fraction = fork_top_quantile_mask(values, valid, 0.5, "response")
    assert mask.tolist() == [[False, True, True, False], [True, False, False, False]]
    _close(threshold, (2.0 + 9.0) / 2)
    _close(fraction, 3 / 4)


def test_pgpo_absolute_quantile_floor_and_mass_normalization():
    # S = [0, e − 1, e² − 1] → log1p = [0, 1, 2] → I = [0, .5, 1]
    S = torch.tensor([[0.0, math.e - 1.0, math.e**2 - 1.0, 5.0]])
    valid = torch.tensor([[1, 1, 1, 0]])
    # absolute τ = .4: [0/.4, 1 + 2·.1/.6, 1 + 2·.6/.6] = [0, 4/3, 3]; Σ = 13/3; ·3/Σ → [0, 12/13, 27/13]
    w, _ = fork_pgpo_token_scaling(S, valid, 0.4, 2.0)
    _close(w, [[0.0, 12 / 13, 27 / 13, 0.0]], atol=2e-6)
    # no mass norm, floor .1: below = max(0, .1)
    w, _ = fork_pgpo_token_scaling(S, valid, 0.4, 2.0, low_weight_floor=0.1, mass_normalization=False)
    _close(w, [[0.1, 4 / 3, 3.0, 0.0]], atol=2e-6)
    # quantile: idx = min(floor(3·.4), 2) = 1 → τ = .5; I = .5 is not < τ → 1 + 0; I = 1 → 1 + 2·.5/.5 = 3
    w, tau = fork_pgpo_token_scaling(S, valid, 0.4, 2.0, threshold_mode="quantile", mass_normalization=False)
    _close(tau, [[0.5]])
    _close(w, [[0.0, 1.0, 3.0, 0.0]], atol=2e-6)
    # all-equal response, absolute, mass norm: I ≡ 0 → raw ≡ 0 → fallback 1 on valid tokens
    w, _ = fork_pgpo_token_scaling(torch.full((1, 3), 0.7), torch.tensor([[1, 1, 0]]), 0.4, 2.0)
    _close(w, [[1.0, 1.0, 0.0]])


def test_vppo_cgpo_response_factors_and_schedule():
    # response means over the rollout batch: [.1, .3, .5, .9] (second row has two tokens .2 and .4)
    tokens = torch.tensor([[0.1, 0.0], [0.2, 0.4], [0.5, 0.0], [0.9, 0.0]])
    valid = torch.tensor([[1, 0], [1, 1], [1, 0], [1, 0]])
    means, ok = fork_response_mean_scores(tokens, valid)
    _close(means, [0.1, 0.3, 0.5, 0.9])
    vppo_ctx = fork_vppo_shaping_context(means, ok)
    _close([vppo_ctx["global_min_score"], vppo_ctx["global_max_score"]], [0.1, 0.9])
    # micro-batch of rows 0 and 2: n = [0, .5], μ = .25, β_max = .9 + .1/.25 = 1.3, f = .9 + n·.4 = [.9, 1.1]
    f = fork_vppo_response_scaling(tokens[[0, 2]], valid[[0, 2]], 0.9, vppo_ctx)
    _close(f, [0.9, 1.1])
    # CGPO: lower median of [.1,.3,.5,.9] = .3; |s − .3| = [.2, 0, .2, .6] → lower median .2
    cgpo_ctx = fork_cgpo_shaping_context(means, ok)
    _close([cgpo_ctx["global_median_score"], cgpo_ctx["global_mad_score"]], [0.3, 0.2])
    a = fork_cgpo_response_scaling(tokens, valid, 0.1, cgpo_ctx)
    _close(a, [1 + 0.1 * math.tanh(-1.0), 1.0, 1 + 0.1 * math.tanh(1.0), 1 + 0.1 * math.tanh(3.0)], atol=2e-6)
    # linear schedule λ = .5: 1 + .5(f − 1) on valid tokens, 0 on padding
    out = fork_apply_advantage_scaling_schedule(
        torch.tensor([[2.0, 0.5, 3.0]]), torch.tensor([[1, 1, 0]]), "linear", 0.5
    )
    _close(out, [[1.5, 0.75, 0.0]])


def test_vepo_components_fusion_and_hidden_cosine():
    # P = (.5, .5), Q = (.9, .1), M = (.7, .3)
    comps = fork_full_vocab_components(
        torch.zeros(1, 1, 2), torch.log(torch.tensor([[[0.9, 0.1]]])), {"jsd", "abs_entropy_gap", "entropy"}
    )
    h_p = LN2
    h_q = -(0.9 * math.log(0.9) + 0.1 * math.log(0.1))
    jsd = 0.5 * (0.5 * math.log(0.5 / 0.7) + 0.5 * math.log(0.5 / 0.3)) + 0.5 * (
        0.9 * math.log(0.9 / 0.7) + 0.1 * math.log(0.1 / 0.3)
    )
    _close(comps["entropy"], [[h_p]])
    _close(comps["abs_entropy_gap"], [[h_p - h_q]])
    _close(comps["jsd"], [[jsd]])
    # fusion, α = .7, one row of 4 valid tokens + padding: ĵ = [0,.25,.5,1], ĝ = [0,.5,.25,1], Ĥ = [0,1/3,2/3,1]
    comps = {
        "jsd": torch.tensor([[0.0, 0.25, 0.5, 1.0, 7.0]]),
        "abs_entropy_gap": torch.tensor([[0.0, 0.5, 0.25, 1.0, 7.0]]),
        "entropy": torch.tensor([[0.0, 1.0, 2.0, 3.0, 7.0]]),
    }
    s = fork_combine_full_vocab_scores(comps, torch.tensor([[1, 1, 1, 1, 0]]), "vepo", 0.7, "normal_entropy")

    def fused(j, g):
        return 1.0 - (1.0 - j) ** 0.7 * (1.0 - g) ** 0.3

    _close(s, [[0.0, fused(0.25, 0.5) / 3, fused(0.5, 0.25) * 2 / 3, 1.0, 0.0]])
    # hidden cosine: input [vis, r0, r1], response = the last 2 positions; h_vis = (1,0), h_r0 = (1,1), h_r1 = (0,1)
    layer = torch.tensor([[[1.0, 0.0], [1.0, 1.0], [0.0, 1.0]]])
    scores = fork_hidden_visual_scores(
        [layer, 2.0 * layer], torch.tensor([[99, 5, 6]]), 2, torch.tensor([[1, 1]]), [99]
    )
    _close(scores, [[1 / math.sqrt(2.0), 0.0]])


def test_perception_loss_value_and_gradient():
    # one row, two tokens, p = p_old (ratio 1), A = 1 → PG terms −1; perception mask selects token 0
    log_prob = torch.log(torch.tensor([[0.5, 0.25]])).requires_grad_(True)
    old = torch.log(torch.tensor([[0.5, 0.25]]))
    q_dec = torch.log(torch.tensor([[0.25, 0.25]]))
    loss, parts = fork_perception_loss(
        log_prob,
        old,
        torch.ones(1, 2),
        torch.ones(1, 2),
        decremental_old_log_probs=q_dec,
        perception_mask=torch.tensor([[True, False]]),
        normalize_pg_loss_by_selected_tokens=True,
        visual_sensitivity_loss_coef=0.1,
        invariant_entropy_coef=0.05,
    )
    # pg = −1 (over the 1 selected token); k3 = [ln2 − .5, 0] → −.1·mean; entropy .05·mean(ln2, 2 ln2)
    _close(parts["pg_loss"], -1.0)
    _close(parts["pg_loss_raw"], -1.0)
    _close(parts["sensitivity_loss"], -0.1 * (LN2 - 0.5) / 2)
    _close(parts["invariant_entropy_loss"], 0.05 * 1.5 * LN2)
    _close(loss, -1.0 - 0.1 * (LN2 - 0.5) / 2 + 0.05 * 1.5 * LN2)
    loss.backward()
    # d/dlog p: PG −A·r = [−1, 0]; k3' = 1 − q/p = [.5, 0] → −.1/2·[.5, 0]; entropy .05/2·(−1)
    _close(log_prob.grad, [[-1.0 - 0.025 - 0.025, -0.025]])
    # DVRP noise: progress .5 → t = 500·sigmoid(0) = 250; image (0, 128, 255) with β = .36 and ε = (0, 1, −1):
    # .8·x + .6·ε = (0, .8·128/255 + .6 → clip 1, .2) → (0, 255, 51)
    t, beta = fork_compute_noise_schedule(5, 10, 500.0, 10.0, 1000.0)
    _close(t, 250.0)
    betas = [1 / (1 + math.exp(-(-6 + 12 * i / 999))) * (0.5e-2 - 1e-5) + 1e-5 for i in range(251)]
    _close(beta, 1.0 - math.prod(1.0 - b for b in betas), atol=1e-5)
    image = torch.tensor([[[0, 128, 255]]], dtype=torch.uint8)
    noisy = fork_vp_diffusion_noise(image, 0.36, torch.tensor([[[0.0, 1.0, -1.0]]]))
    assert noisy.tolist() == [[[0, 255, 51]]]
