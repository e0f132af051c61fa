"""policy_loss / kl_penalty (ALGORITHMS.md §6).

The reference below is written independently of vppo_core.losses, in the textbook PPO form (maximise
``min(r·A, clip(r)·A)``, dual clip ``max(·, c·A)`` for ``A < 0``), one token at a time.
"""

from __future__ import annotations

import itertools
import math
import zlib

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vppo_core.losses import kl_penalty, policy_loss, truncated_is_weights
from vppo_core.masking import tgf_mask
from vppo_core.shaping import pgpo_token_weights


def _reference_token_loss(lp_new, lp_old, a, clip_low, clip_high, dual_clip):
    ratio = torch.exp(lp_new - lp_old)
    surrogate = torch.min(ratio * a, torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * a)
    if dual_clip is not None and a < 0:
        surrogate = torch.max(surrogate, dual_clip * a)
    return -surrogate


def _reference_kl(lp, ref, estimator):
    if estimator == "k1":
        return lp - ref
    if estimator == "k2":
        return 0.5 * (lp - ref) ** 2
    return torch.exp(ref - lp) - (ref - lp) - 1.0


def reference_loss(
    lp_new,
    lp_old,
    adv,
    mask,
    *,
    weights=None,
    clip_low=0.2,
    clip_high=0.28,
    dual_clip=3.0,
    entropy_coef=0.0,
    aggregation="token-mean",
    denominator=None,
    ref=None,
    kl_coef=0.0,
    kl_estimator="k3",
):
    B, L = lp_new.shape
    rows = []
    for b in range(B):
        tokens = []
        for t in range(L):
            if not mask[b, t]:
                continue
            a = adv[b] if adv.dim() == 1 else adv[b, t]
            w = 1.0 if weights is None else weights[b, t]
            term = _reference_token_loss(lp_new[b, t], lp_old[b, t], a, clip_low, clip_high, dual_clip) * w
            term = term + entropy_coef * (-lp_new[b, t])
            if ref is not None:
                term = term + kl_coef * _reference_kl(lp_new[b, t], ref[b, t], kl_estimator)
            tokens.append(term)
        rows.append(tokens)
    if aggregation == "token-mean":
        n = denominator if denominator is not None else sum(len(r) for r in rows)
        return sum(sum(r) for r in rows if r) / n
    per_seq = [sum(r) / (len(r) if aggregation == "seq-mean-token-mean" else 1) for r in rows if r]
    n = denominator if denominator is not None else len(per_seq)
    return sum(per_seq) / n


def make_batch(seed, B=6, L=8, adv_2d=False, empty_row=True):
    g = torch.Generator().manual_seed(seed)
    lp_old = -2.0 * torch.rand(B, L, generator=g, dtype=torch.float64)
    # Moves of std 0.5 in log-space: ratios beyond 1.28, below 0.8 and above 1.2 are all common.
    lp_new = (lp_old + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)).requires_grad_()
    lengths = torch.randint(L // 2, L + 1, (B,), generator=g)
    if empty_row:
        lengths[-1] = 0
    mask = torch.arange(L)[None, :] < lengths[:, None]
    shape = (B, L) if adv_2d else (B,)
    adv = torch.randn(shape, generator=g, dtype=torch.float64).abs() + 0.1
    sign = torch.tensor([1.0, -1.0], dtype=torch.float64).repeat(B)[:B]  # both signs in every batch
    adv = adv * (sign[:, None] if adv_2d else sign)
    if adv_2d:
        adv = adv * torch.where(torch.rand(B, L, generator=g) < 0.3, -1.0, 1.0).double()
    S = torch.rand(B, L, generator=g, dtype=torch.float64)
    ref = lp_old + 0.1 * torch.randn(B, L, generator=g, dtype=torch.float64)
    return lp_new, lp_old, adv, mask, S, ref


def _grad(loss, x):
    return torch.autograd.grad(loss, x)[0]


@pytest.mark.parametrize(
    ("aggregation", "weights_kind", "adv_2d", "entropy_coef", "dual_clip"),
    list(
        itertools.product(
            ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"],
            ["none", "tgf", "pgpo"],
            [False, True],
            [0.0, 0.06],
            [1.2, None],  # 1.2, not 3.0: with these ratios the dual clip is then actually hit
        )
    ),
)
def test_policy_loss_value_and_gradient_match_reference(aggregation, weights_kind, adv_2d, entropy_coef, dual_clip):
    # The first seed (from a per-case start) whose batch hits every branch of the clipped objective on tokens with
    # non-zero weight, so the comparison never degenerates to the unclipped case alone.
    start = zlib.crc32(repr((aggregation, weights_kind, adv_2d, entropy_coef, dual_clip)).encode()) % 1000
    for seed in range(start, start + 50):
        lp_new, lp_old, adv, mask, S, _ = make_batch(seed, adv_2d=adv_2d)
        kinds = {"none": None, "tgf": tgf_mask(S, mask, fraction=0.4), "pgpo": pgpo_token_weights(S, mask)}
        weights = kinds[weights_kind]
        _, m = policy_loss(lp_new, lp_old, adv, mask, token_weights=weights, dual_clip=dual_clip)
        if m["clipfrac_high"] > 0 and m["clipfrac_low"] > 0 and (dual_clip is None or m["clipfrac_dual"] > 0):
            break
    else:
        pytest.fail("no batch hit every clip branch")
    loss, _ = policy_loss(
        lp_new,
        lp_old,
        adv,
        mask,
        token_weights=weights,
        entropy_coef=entropy_coef,
        aggregation=aggregation,
        dual_clip=dual_clip,
    )
    expected = reference_loss(
        lp_new,
        lp_old,
        adv,
        mask,
        weights=weights,
        entropy_coef=entropy_coef,
        aggregation=aggregation,
        dual_clip=dual_clip,
    )
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(_grad(loss, lp_new), _grad(expected, lp_new))


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_kl_term_value_and_gradient_match_reference(estimator):
    lp_new, lp_old, adv, mask, _, ref = make_batch(7)
    loss, metrics = policy_loss(lp_new, lp_old, adv, mask, ref_logprobs=ref, kl_coef=0.05, kl_estimator=estimator)
    expected = reference_loss(lp_new, lp_old, adv, mask, ref=ref, kl_coef=0.05, kl_estimator=estimator)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(_grad(loss, lp_new), _grad(expected, lp_new))
    assert "kl_ref" in metrics


def test_gspo_matches_a_sequence_level_reference():
    lp_new, lp_old, adv, mask, *_ = make_batch(3)
    loss, _ = policy_loss(
        lp_new, lp_old, adv, mask, loss_type="gspo", aggregation="seq-mean-token-mean", dual_clip=None, clip_low=0.05
    )
    objectives = []
    for b in range(mask.shape[0]):
        if not mask[b].any():
            continue
        s = torch.exp((lp_new[b][mask[b]] - lp_old[b][mask[b]]).mean())
        objectives.append(torch.min(s * adv[b], torch.clamp(s, 0.95, 1.28) * adv[b]))
    expected = -sum(objectives) / len(objectives)
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(_grad(loss, lp_new), _grad(expected, lp_new))


def test_gspo_ratio_is_shared_by_all_tokens_of_a_response():
    lp_old = torch.zeros(1, 3, dtype=torch.float64)
    lp_new = torch.tensor([[0.3, -0.1, 0.1]], dtype=torch.float64, requires_grad=True)  # mean Δ = 0.1
    _, m = policy_loss(lp_new, lp_old, torch.ones(1, dtype=torch.float64), torch.ones(1, 3), loss_type="gspo")
    assert m["ratio_mean"].item() == pytest.approx(math.exp(0.1)) and m["ratio_max"].item() == pytest.approx(
        math.exp(0.1)
    )


def test_gspo_token_gradient_is_sequence_ratio_times_token_advantage():
    # GSPO-token: s_{i,t} = sg(s_i) · π_t / sg(π_t) — value s_i, gradient s_i · ∇lp_t, so with token advantages
    # (unclipped) d loss / d lp_t = -A_t · s_i / N under token-mean.
    lp_old = torch.zeros(1, 4, dtype=torch.float64)
    lp_new = torch.tensor([[0.05, -0.02, 0.01, 0.0]], dtype=torch.float64, requires_grad=True)
    adv = torch.tensor([[1.0, -2.0, 0.5, 3.0]], dtype=torch.float64)
    loss, m = policy_loss(lp_new, lp_old, adv, torch.ones(1, 4), loss_type="gspo", dual_clip=None)
    s = math.exp(0.04 / 4)
    assert m["clipfrac_high"].item() == 0 and m["clipfrac_low"].item() == 0
    torch.testing.assert_close(_grad(loss, lp_new), -adv * s / 4)
    assert loss.item() == pytest.approx(-(adv.sum().item()) * s / 4)


def test_token_mean_with_global_num_tokens_sums_over_micro_batches_to_the_full_batch_loss():
    lp_new, lp_old, adv, mask, S, _ = make_batch(11, B=6)
    w = tgf_mask(S, mask)
    full, _ = policy_loss(lp_new, lp_old, adv, mask, token_weights=w, entropy_coef=0.06)
    total = int(mask.sum())
    parts = [
        policy_loss(
            lp_new[sl], lp_old[sl], adv[sl], mask[sl], token_weights=w[sl], entropy_coef=0.06, num_tokens=total
        )[0]
        for sl in (slice(0, 2), slice(2, 5), slice(5, 6))
    ]
    torch.testing.assert_close(sum(parts), full)
    torch.testing.assert_close(_grad(sum(parts), lp_new), _grad(full, lp_new))


def test_seq_mean_with_global_num_sequences_sums_over_micro_batches_to_the_full_batch_loss():
    lp_new, lp_old, adv, mask, *_ = make_batch(12, B=6)
    full, _ = policy_loss(lp_new, lp_old, adv, mask, aggregation="seq-mean-token-mean")
    n_seq = int(mask.any(dim=1).sum())
    parts = [
        policy_loss(lp_new[sl], lp_old[sl], adv[sl], mask[sl], aggregation="seq-mean-token-mean", num_sequences=n_seq)[
            0
        ]
        for sl in (slice(0, 3), slice(3, 6))
    ]
    torch.testing.assert_close(sum(parts), full)


def test_tgf_loss_is_divided_by_all_valid_tokens_not_by_the_selected_ones():
    lp_old = torch.zeros(1, 5, dtype=torch.float64)
    lp_new = torch.zeros(1, 5, dtype=torch.float64, requires_grad=True)  # ratio 1: ℓ = -A per token
    keep = torch.tensor([[True, True, False, False, False]])
    loss, m = policy_loss(
        lp_new, lp_old, torch.tensor([2.0], dtype=torch.float64), torch.ones(1, 5), token_weights=keep
    )
    assert loss.item() == pytest.approx(-2.0 * 2 / 5)
    assert m["token_weight_nonzero_frac"].item() == pytest.approx(0.4)
    # no gradient reaches the filtered tokens
    assert torch.equal(_grad(loss, lp_new)[0, 2:], torch.zeros(3, dtype=torch.float64))


def test_pgpo_weights_equal_pgpo_token_advantages():
    lp_new, lp_old, adv, mask, S, _ = make_batch(5, empty_row=False)
    w = pgpo_token_weights(S, mask)
    weighted, _ = policy_loss(lp_new, lp_old, adv, mask, token_weights=w)
    token_adv, _ = policy_loss(lp_new, lp_old, adv[:, None] * w, mask)
    torch.testing.assert_close(weighted, token_adv)
    torch.testing.assert_close(_grad(weighted, lp_new), _grad(token_adv, lp_new))


def test_hand_worked_clip_branches_and_metrics():
    # tokens: (A=+1, r=1.5) clip-high; (A=-1, r=0.5) clip-low; (A=-1, r=4) dual clip; (A=+1, r=1) unclipped
    adv = torch.tensor([[1.0, -1.0, -1.0, 1.0]], dtype=torch.float64)
    lp_old = torch.full((1, 4), -2.0, dtype=torch.float64)
    lp_new = (lp_old + torch.log(torch.tensor([[1.5, 0.5, 4.0, 1.0]], dtype=torch.float64))).requires_grad_()
    loss, m = policy_loss(lp_new, lp_old, adv, torch.ones(1, 4), entropy_coef=0.5)
    # ℓ = (-1.28, max(0.5, 0.8) = 0.8, min(4, 3) = 3, -1); entropy term 0.5 * mean(-lp_new)
    pg = (-1.28 + 0.8 + 3.0 - 1.0) / 4
    ent = -lp_new.detach().mean().item()
    assert m["pg_loss"].item() == pytest.approx(pg)
    assert loss.item() == pytest.approx(pg + 0.5 * ent)
    assert m["entropy"].item() == pytest.approx(ent)
    assert (m["clipfrac_high"].item(), m["clipfrac_low"].item(), m["clipfrac_dual"].item()) == (0.25, 0.25, 0.25)
    assert m["approx_kl"].item() == pytest.approx(-math.log(1.5 * 0.5 * 4.0) / 4)
    assert m["ratio_max"].item() == pytest.approx(4.0)
    assert m["num_tokens"].item() == 4.0
    # only the unclipped token carries a policy gradient: d(-A r)/d lp = -r = -1; entropy adds -0.5/4 everywhere
    g = _grad(loss, lp_new)[0]
    torch.testing.assert_close(g, torch.tensor([0.0, 0.0, 0.0, -0.25], dtype=torch.float64) - 0.125)
    assert all(v.dim() == 0 and not v.requires_grad and v.dtype == torch.float32 for v in m.values())


def test_analytic_entropy_option_replaces_the_sampled_token_nll():
    lp_new, lp_old, adv, mask, *_ = make_batch(2)
    H = torch.rand_like(lp_old).requires_grad_()
    base, _ = policy_loss(lp_new, lp_old, adv, mask)
    loss, m = policy_loss(lp_new, lp_old, adv, mask, entropy_coef=0.1, entropy=H)
    expected_term = 0.1 * H[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, base + expected_term)
    torch.testing.assert_close(_grad(loss, H), _grad(expected_term, H))
    assert m["entropy_analytic"].item() == pytest.approx(H[mask].mean().item())


def test_padding_may_hold_nan_and_gets_zero_gradient():
    lp_new, lp_old, adv, mask, _, ref = make_batch(4)
    clean, _ = policy_loss(lp_new, lp_old, adv, mask, entropy_coef=0.06, ref_logprobs=ref, kl_coef=0.1)
    poisoned_new = torch.where(mask, lp_new, torch.tensor(float("nan"), dtype=torch.float64))
    poisoned_old = torch.where(mask, lp_old, torch.tensor(float("inf"), dtype=torch.float64))
    poisoned_adv = torch.where(mask, adv[:, None].expand_as(mask), torch.tensor(float("nan"), dtype=torch.float64))
    loss, _ = policy_loss(
        poisoned_new, poisoned_old, poisoned_adv, mask, entropy_coef=0.06, ref_logprobs=ref, kl_coef=0.1
    )
    torch.testing.assert_close(loss, clean)
    grad = _grad(loss, lp_new)
    assert torch.isfinite(grad).all()
    assert torch.equal(grad[~mask], torch.zeros_like(grad[~mask]))
    torch.testing.assert_close(grad, _grad(clean, lp_new))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_all_padding_batch_gives_zero_loss_that_still_backpropagates(aggregation):
    lp_new = torch.randn(2, 3, requires_grad=True)
    loss, m = policy_loss(lp_new, lp_new.detach(), torch.ones(2), torch.zeros(2, 3), aggregation=aggregation)
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp_new.grad, torch.zeros(2, 3))
    assert m["num_tokens"].item() == 0.0 and m["token_weight_nonzero_frac"].item() == 0.0


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"])
def test_all_zero_token_weights_on_valid_tokens_give_a_finite_policy_term_with_no_gradient(aggregation):
    """TGF with nothing selected (or PGPO weights all 0): the policy term vanishes, no NaN, the mean stays over the
    valid tokens (the normaliser does not shrink to the zero active tokens)."""
    lp_new = torch.randn(2, 3, requires_grad=True)
    mask = torch.ones(2, 3)
    loss, m = policy_loss(
        lp_new, lp_new.detach() - 0.1, torch.tensor([1.0, -1.0]), mask, token_weights=torch.zeros(2, 3),
        aggregation=aggregation,
    )  # fmt: skip
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(lp_new.grad, torch.zeros(2, 3))
    assert m["num_tokens"].item() == 6.0 and m["token_weight_nonzero_frac"].item() == 0.0


def test_bf16_log_probs_are_upcast_to_float32():
    lp_new, lp_old, adv, mask, *_ = make_batch(9)
    loss, _ = policy_loss(lp_new.to(torch.bfloat16), lp_old.to(torch.bfloat16), adv.float(), mask)
    assert loss.dtype == torch.float32


def test_kl_penalty_hand_worked_values():
    lp = torch.tensor([[-1.0, -2.0, -1.0]])
    ref = torch.tensor([[-2.0, -1.0, -40.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k1"), torch.tensor([[1.0, -1.0, 39.0]]))
    torch.testing.assert_close(kl_penalty(lp, ref, "k2"), torch.tensor([[0.5, 0.5, 760.5]]))
    # k3 = e^x - x - 1 with x = ref - lp: (e^-1, e - 2, clamp at 10 [x clamped to -20: 19 + e^-20])
    expected_k3 = torch.tensor([[math.exp(-1.0), math.e - 2.0, 10.0]])
    torch.testing.assert_close(kl_penalty(lp, ref, "k3"), expected_k3)
    assert bool((kl_penalty(torch.randn(4, 5), torch.randn(4, 5)) >= 0).all())


def _call(**overrides):
    lp_new, lp_old, adv, mask, *_ = make_batch(0, B=4, L=7)
    kwargs = {"lp_new": lp_new, "lp_old": lp_old, "advantages": adv, "mask": mask}
    kwargs.update(overrides)
    return policy_loss(
        kwargs.pop("lp_new"), kwargs.pop("lp_old"), kwargs.pop("advantages"), kwargs.pop("mask"), **kwargs
    )


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"lp_old": torch.zeros(4, 6)}, r"lp_old has shape \(4, 6\), expected the shape of lp_new \(4, 7\)"),
        ({"lp_new": torch.zeros(4)}, r"lp_new must have shape \[B, L\]"),
        ({"mask": torch.ones(4, 6)}, r"mask has shape \(4, 6\), expected \(4, 7\)"),
        ({"mask": torch.full((4, 7), 0.5)}, "mask must hold only 0/1"),
        ({"advantages": torch.zeros(3)}, r"advantages has shape \(3,\), expected \[B\]=\(4,\)"),
        ({"advantages": torch.zeros(4, dtype=torch.long)}, "advantages must be a float tensor"),
        ({"advantages": torch.tensor([0.0, float("nan"), 0.0, 0.0])}, "advantages contains NaN"),
        ({"lp_new": torch.full((4, 7), float("nan"))}, "lp_new contains NaN or inf on valid"),
        ({"lp_old": torch.full((4, 7), -float("inf"))}, "lp_old contains NaN or inf on valid"),
        ({"token_weights": -torch.ones(4, 7)}, "token_weights must be ≥ 0"),
        ({"token_weights": torch.ones(4, 6)}, r"token_weights has shape \(4, 6\)"),
        ({"clip_low": 1.0}, r"clip_low must be in \[0, 1\)"),
        ({"clip_high": -0.1}, "clip_high must be a finite float ≥ 0"),
        ({"dual_clip": 1.0}, "dual_clip must be a finite float > 1"),
        ({"aggregation": "mean"}, "aggregation must be one of"),
        ({"loss_type": "ppo"}, "loss_type must be one of"),
        ({"kl_estimator": "k4"}, "kl_estimator must be one of"),
        ({"kl_coef": 0.1}, "kl_coef != 0 needs ref_logprobs"),
        ({"entropy_coef": float("nan")}, "entropy_coef must be a finite float"),
        ({"num_tokens": 3}, r"num_tokens=3 is smaller than this micro-batch's own count"),
        ({"num_tokens": 0}, "num_tokens must be a single positive finite count"),
        ({"num_sequences": 10}, "num_sequences is for the seq-mean-\\* aggregations"),
        ({"num_tokens": 100, "aggregation": "seq-mean-token-mean"}, "num_tokens is for aggregation='token-mean'"),
        ({"entropy": torch.zeros(4, 6)}, r"entropy has shape \(4, 6\)"),
        ({"ref_logprobs": torch.zeros(4, 6)}, r"ref_logprobs has shape \(4, 6\)"),
    ],
)
def test_policy_loss_bad_input_names_the_argument(overrides, match):
    with pytest.raises(ValueError, match=match):
        _call(**overrides)


def test_kl_penalty_bad_input():
    with pytest.raises(ValueError, match="ref_lp has shape"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(2, 2))
    with pytest.raises(ValueError, match="estimator must be one of"):
        kl_penalty(torch.zeros(2, 3), torch.zeros(2, 3), "k5")


def _official_vppo_micro_batch_loss(lp_new, lp_old, lp_aug, adv, response_mask, alpha, n_global, cfg):
    """One micro-batch of the official VPPO actor update (dp_actor.py + core_algos.py, token mode, world size 1),
    transcribed: k3 dependency, top-ρ mask by sort + scatter, TAS scale, DAPO loss, entropy penalty, rescaling."""
    diff = (lp_aug - lp_old).clamp(-20.0, 20.0)
    low_var_kl = torch.clamp(diff.exp() - diff - 1, min=0.0, max=10.0)
    for_sort = low_var_kl.clone()
    for_sort[~response_mask.bool()] = -torch.inf
    k = torch.ceil(response_mask.sum(dim=1) * cfg["top_p"]).int()
    _, sorted_indices = torch.sort(for_sort, dim=1, descending=True)
    rank_mask = torch.arange(for_sort.size(1)).expand_as(for_sort) < k.unsqueeze(1)
    top_p_mask = torch.zeros_like(for_sort, dtype=torch.bool).scatter_(1, sorted_indices, rank_mask)
    loss_token_mask = (top_p_mask & response_mask.bool()).to(lp_new.dtype)
    advantages = (adv * alpha).unsqueeze(1).expand_as(lp_new)

    def masked_mean(values, mask, eps=1e-8):
        return (values * mask).sum() / (mask.sum() + eps)

    nak = torch.clamp(lp_new - lp_old, -20.0, 20.0)
    ratio = torch.exp(nak)
    clipped_ratio = torch.exp(torch.clamp(nak, math.log(1.0 - cfg["low"]), math.log(1.0 + cfg["high"])))
    pg_loss, pg_loss2, pg_loss3 = -advantages * ratio, -advantages * clipped_ratio, -advantages * cfg["dual"]
    higher = torch.max(pg_loss, pg_loss2)
    final = torch.where(advantages < 0, torch.min(higher, pg_loss3), higher) * loss_token_mask.detach()
    loss = masked_mean(final, response_mask) + cfg["entropy"] * -masked_mean(lp_new, response_mask)
    clipfrac_higher = masked_mean((pg_loss < pg_loss2).float(), response_mask)
    clipfrac_lower = masked_mean((higher > pg_loss3).float() * (advantages < 0).float(), response_mask)
    return loss * response_mask.sum() / n_global, clipfrac_higher, clipfrac_lower


def test_full_vppo_update_matches_a_transcription_of_the_official_code():
    from vppo_core.dependency import token_dependency, trajectory_dependency
    from vppo_core.shaping import tas_scale_reference

    cfg = {"top_p": 0.4, "low": 0.2, "high": 0.28, "dual": 1.5, "entropy": 0.06}
    g = torch.Generator().manual_seed(0)
    B, L, micro = 8, 12, 3
    lp_old = -3.0 * torch.rand(B, L, generator=g, dtype=torch.float64)
    lp_aug = lp_old - torch.rand(B, L, generator=g, dtype=torch.float64)
    lp_new = (lp_old + 0.5 * torch.randn(B, L, generator=g, dtype=torch.float64)).requires_grad_()
    lengths = torch.tensor([12, 5, 9, 0, 12, 7, 3, 10])
    mask = (torch.arange(L)[None, :] < lengths[:, None]).double()
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    n_global = mask.sum()

    S = token_dependency(lp_old, lp_aug, mask)
    alpha = tas_scale_reference(trajectory_dependency(S, mask), micro, beta_min=0.9, valid=lengths > 0)
    ours, theirs = 0.0, 0.0
    for sl in (slice(i, i + micro) for i in range(0, B, micro)):
        loss, m = policy_loss(
            lp_new[sl],
            lp_old[sl],
            alpha[sl] * adv[sl],
            mask[sl],
            token_weights=tgf_mask(S[sl], mask[sl], fraction=cfg["top_p"]),
            clip_low=cfg["low"],
            clip_high=cfg["high"],
            dual_clip=cfg["dual"],
            entropy_coef=cfg["entropy"],
            num_tokens=n_global,
        )
        # α: tas_scale_reference is checked bit for bit against the official TAS code in test_shaping.py
        official, higher, lower = _official_vppo_micro_batch_loss(
            lp_new[sl], lp_old[sl], lp_aug[sl], adv[sl], mask[sl], alpha[sl], n_global, cfg
        )
        ours, theirs = ours + loss, theirs + official
        if m["num_tokens"] > 0:
            # with no token weights the official "higher" is our high + low and its "lower" our dual clip
            _, m_all = policy_loss(
                lp_new[sl], lp_old[sl], alpha[sl] * adv[sl], mask[sl], dual_clip=cfg["dual"], clip_high=cfg["high"]
            )
            assert m_all["clipfrac_high"] + m_all["clipfrac_low"] == pytest.approx(higher.item(), abs=1e-6)
            assert m_all["clipfrac_dual"].item() == pytest.approx(lower.item(), abs=1e-6)
    torch.testing.assert_close(ours, theirs, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(_grad(ours, lp_new), _grad(theirs, lp_new), rtol=1e-7, atol=1e-9)


# --------------------------------------------------------------------------------------------------------------------
# truncated importance sampling (trainer-sampler mismatch correction)


def test_truncated_is_weights_hand_worked():
    lp_old = torch.tensor([[-1.0, -2.0, -0.5, 7.0]])
    lp_rollout = torch.tensor([[-1.0, -1.0, -3.0, float("nan")]])  # padding may hold anything
    mask = torch.tensor([[1, 1, 1, 0]])
    w = truncated_is_weights(lp_old, lp_rollout, mask, cap=2.0)
    # exp(0) = 1; exp(-1) = 0.3679; exp(2.5) = 12.18 -> capped at 2; padding -> 0
    assert torch.allclose(w, torch.tensor([[1.0, math.exp(-1.0), 2.0, 0.0]]))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(-30, 0), st.floats(-30, 0), st.booleans()),
        min_size=1,
        max_size=24,
    ),
    st.floats(0.01, 100.0),
)
def test_truncated_is_weights_equal_a_plain_per_token_computation(tokens, cap):
    lp_old = torch.tensor([[t[0] for t in tokens]], dtype=torch.float64)
    lp_rollout = torch.tensor([[t[1] for t in tokens]], dtype=torch.float64)
    mask = torch.tensor([[t[2] for t in tokens]])
    w = truncated_is_weights(lp_old, lp_rollout, mask, cap=cap)
    for j, (old, new, valid) in enumerate(tokens):
        expected = min(math.exp(old - new), cap) if valid else 0.0
        assert math.isclose(float(w[0, j]), expected, rel_tol=1e-6, abs_tol=1e-12)


def test_truncated_is_weights_are_constants_and_reject_bad_input():
    lp_old = torch.zeros(2, 3, requires_grad=True)
    w = truncated_is_weights(lp_old, torch.zeros(2, 3), torch.ones(2, 3), cap=2.0)
    assert not w.requires_grad
    with pytest.raises(ValueError, match="cap must be a finite number > 0"):
        truncated_is_weights(lp_old, torch.zeros(2, 3), torch.ones(2, 3), cap=0.0)
    with pytest.raises(ValueError, match="lp_rollout has shape"):
        truncated_is_weights(lp_old, torch.zeros(2, 4), torch.ones(2, 3), cap=2.0)
    with pytest.raises(ValueError, match="lp_rollout contains NaN"):
        truncated_is_weights(lp_old, torch.full((2, 3), math.nan), torch.ones(2, 3), cap=2.0)


def test_truncated_is_weights_reweight_the_policy_term_token_by_token():
    """policy_loss with token_weights = w equals the per-token reference loss times w, token-mean over all tokens."""
    g = torch.Generator().manual_seed(0)
    lp_old = -torch.rand(3, 5, generator=g, dtype=torch.float64) * 3
    lp_rollout = lp_old + 0.5 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    lp_new = lp_old + 0.1 * torch.randn(3, 5, generator=g, dtype=torch.float64)
    adv = torch.tensor([1.0, -0.5, 2.0], dtype=torch.float64)
    mask = torch.ones(3, 5)
    mask[1, 3:] = 0
    w = truncated_is_weights(lp_old, lp_rollout, mask, cap=1.5)
    loss, _ = policy_loss(lp_new, lp_old, adv, mask, token_weights=w, dual_clip=3.0)
    total, n = 0.0, 0
    for i in range(3):
        for j in range(5):
            if mask[i, j]:
                t = _reference_token_loss(lp_new[i, j], lp_old[i, j], adv[i], 0.2, 0.28, 3.0)
                total += float(t) * min(math.exp(float(lp_old[i, j] - lp_rollout[i, j])), 1.5)
                n += 1
    assert math.isclose(float(loss), total / n, rel_tol=1e-9)
