"""Clipped policy-gradient losses (DAPO form, GSPO sequence ratio), entropy and KL terms — ALGORITHMS.md §6.

Everything here takes per-token log-probs of the sampled tokens, ``[B, L]``, and an explicit response mask; no
model, no vocabulary-sized tensor.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from torch import Tensor

from vppo_core.validation import check_finite_where, check_mask, check_token_tensor

__all__ = ["AGGREGATIONS", "KL_ESTIMATORS", "LOSS_TYPES", "cppo_contrastive_loss", "kl_penalty", "policy_loss"]

LOSS_TYPES = ("dapo", "gspo")
AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum")
KL_ESTIMATORS = ("k1", "k2", "k3")

# Log-ratios are clamped before exp() so a stale or corrupted log-prob cannot overflow to inf (ratio ≤ e^20).
_LOG_RATIO_BOUND = 20.0
# k3 is clamped to this, as verl's "low_var_kl" does, so one far-off token cannot dominate the penalty.
_K3_MAX = 10.0


def kl_penalty(lp: Tensor, ref_lp: Tensor, estimator: Literal["k1", "k2", "k3"] = "k3") -> Tensor:
    """Per-token estimate of KL(π_θ ‖ π_ref) from the log-probs of the sampled tokens (Schulman's k1/k2/k3).

    With ``x = ref_lp − lp``: ``k1 = −x``; ``k2 = x² / 2``; ``k3 = exp(x) − x − 1`` with ``x`` clamped to [−20, 20]
    and the result clamped to ≤ 10 (verl's ``low_var_kl``; gradient 0 where clamped). k1 is unbiased but can be
    negative, k3 is unbiased and non-negative, k2 is biased with k1's gradient of the true KL in expectation.

    Args:
        lp: ``[B, L]`` float — log-probs under the policy being trained (carries the gradient).
        ref_lp: ``[B, L]`` float — log-probs of the same tokens under the reference policy (treated as constant).
        estimator: ``"k1" | "k2" | "k3"``.

    Returns:
        ``[B, L]`` per-token KL estimate (no masking: aggregate it with the response mask).
    """
    check_token_tensor(lp, "lp")
    check_token_tensor(ref_lp, "ref_lp")
    if ref_lp.shape != lp.shape:
        raise ValueError(f"ref_lp has shape {tuple(ref_lp.shape)}, expected the shape of lp {tuple(lp.shape)}")
    if estimator not in KL_ESTIMATORS:
        raise ValueError(f"estimator must be one of {KL_ESTIMATORS}, got {estimator!r}")
    x = ref_lp.detach() - lp
    if estimator == "k1":
        return -x
    if estimator == "k2":
        return 0.5 * x.square()
    x = x.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    return (torch.exp(x) - x - 1.0).clamp(max=_K3_MAX)


def cppo_contrastive_loss(lp: Tensor, lp_pos: Tensor, lp_neg: Tensor, *, tau: float = 0.1) -> Tensor:
    """CPPO's per-token contrastive perception loss (ALGORITHMS.md §9.11).

    ``softplus((k3(lp, lp_pos) − k3(lp, lp_neg)) / τ)`` with ``k3 = kl_penalty(·, ·, "k3")`` (verl's
    ``low_var_kl``): small when the policy's token stays close to the information-preserving view (positive) and
    far from the information-removing one (negative). Aggregate it over the perception tokens
    (``cppo_perception_mask``, gated to positive advantages) with the loss's aggregation.

    Args:
        lp: ``[B, L]`` float — log-probs of the sampled tokens under the policy being trained (the gradient).
        lp_pos: ``[B, L]`` float — the same tokens under the information-preserving view (constant).
        lp_neg: ``[B, L]`` float — the same tokens under the information-removing view (constant).
        tau: temperature τ > 0 (the published 0.1).

    Returns:
        ``[B, L]`` per-token loss, no masking.
    """
    check_token_tensor(lp_neg, "lp_neg")
    if lp_neg.shape != lp.shape:
        raise ValueError(f"lp_neg has shape {tuple(lp_neg.shape)}, expected the shape of lp {tuple(lp.shape)}")
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not (math.isfinite(tau) and tau > 0):
        raise ValueError(f"tau must be a finite number > 0, got {tau!r}")
    margin = kl_penalty(lp, lp_pos, "k3") - kl_penalty(lp, lp_neg, "k3")
    return torch.nn.functional.softplus(margin / float(tau))


def truncated_is_weights(lp_old: Tensor, lp_rollout: Tensor, mask: Tensor, *, cap: float) -> Tensor:
    """Truncated importance-sampling weights that correct for a sampler that is not the trainer's policy.

    ``w = min(exp(lp_old − lp_rollout), cap)`` per valid token, 0 on padding, where ``lp_rollout`` are the log-probs
    the rollout engine (vLLM) reported for the tokens it sampled and ``lp_old`` the trainer's for the same tokens
    with the same weights. Passed to `policy_loss` as (a factor of) ``token_weights``, it reweights the policy
    term token by token (truncated IS of Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy
    RL training"; verl's ``tis_imp_ratio_cap``). The weight is a constant: no gradient flows through it.

    Args:
        lp_old: ``[B, L]`` float — the trainer's log-probs of the sampled tokens (before any update).
        lp_rollout: ``[B, L]`` float — the sampler's log-probs of the same tokens.
        mask: ``[B, L]`` bool or 0/1 — 1 on real response tokens.
        cap: C > 0; weights above C are set to C.
    Returns:
        ``[B, L]`` in the inputs' dtype (at least float32).
    """
    check_token_tensor(lp_old, "lp_old")
    check_token_tensor(lp_rollout, "lp_rollout")
    if lp_rollout.shape != lp_old.shape:
        raise ValueError(f"lp_rollout has shape {tuple(lp_rollout.shape)}, expected {tuple(lp_old.shape)}")
    valid = check_mask(mask, lp_old.shape)
    if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not (math.isfinite(cap) and cap > 0):
        raise ValueError(f"cap must be a finite number > 0 (the largest importance weight kept), got {cap!r}")
    check_finite_where(lp_old, valid, "lp_old")
    check_finite_where(lp_rollout, valid, "lp_rollout")
    dtype = torch.promote_types(torch.promote_types(lp_old.dtype, lp_rollout.dtype), torch.float32)
    delta = _zero_pad(lp_old.detach().to(dtype) - lp_rollout.detach().to(dtype), valid)
    return torch.where(valid, delta.clamp(max=math.log(cap)).exp(), torch.zeros_like(delta))


def _check_count(
    value: int | float | Tensor | None, name: str, at_least: Tensor, validate: bool = True
) -> Tensor | None:
    """A global normaliser: positive, and not below what this micro-batch alone holds (checked when `validate`)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float, Tensor)):
        raise ValueError(f"{name} must be a positive number or a 0-dim tensor, got {value!r}")
    t = torch.as_tensor(value, dtype=torch.float64, device=at_least.device).reshape(-1)
    if not validate:
        return t.reshape(())
    if t.numel() != 1 or not bool(torch.isfinite(t).all()) or not bool(t > 0):
        raise ValueError(f"{name} must be a single positive finite count, got {value!r}")
    if bool(t < at_least):
        raise ValueError(
            f"{name}={t.item():g} is smaller than this micro-batch's own count ({int(at_least)}); it must be the "
            "count over the whole batch the loss is averaged over (all micro-batches and ranks)"
        )
    return t[0]


def _aggregate(
    values: Tensor, valid: Tensor, aggregation: str, num_tokens: Tensor | None, num_sequences: Tensor | None
) -> Tensor:
    """Reduce per-token ``values [B, L]`` to a scalar; padding contributes exactly 0 whatever it holds."""
    values = torch.where(valid, values, torch.zeros_like(values))
    if aggregation == "token-mean":
        denom = num_tokens if num_tokens is not None else valid.sum().clamp(min=1)
        return values.sum() / denom.to(values.dtype)
    per_seq = values.sum(dim=1)
    if aggregation == "seq-mean-token-mean":
        per_seq = per_seq / valid.sum(dim=1).clamp(min=1).to(values.dtype)
    # Empty responses are not sequences of the batch: they add 0 and are not counted.
    denom = num_sequences if num_sequences is not None else valid.any(dim=1).sum().clamp(min=1)
    return per_seq.sum() / denom.to(values.dtype)


def _zero_pad(x: Tensor, valid: Tensor) -> Tensor:
    return torch.where(valid, x, torch.zeros_like(x))


def _masked_mean(x: Tensor, where: Tensor) -> Tensor:
    x = torch.where(where, x, torch.zeros_like(x))
    return (x.sum() / where.sum().clamp(min=1)).float()


def policy_loss(
    lp_new: Tensor,
    lp_old: Tensor,
    advantages: Tensor,
    mask: Tensor,
    *,
    token_weights: Tensor | None = None,
    clip_low: float = 0.2,
    clip_high: float = 0.28,
    dual_clip: float | None = 3.0,
    entropy_coef: float = 0.0,
    entropy: Tensor | None = None,
    aggregation: Literal["token-mean", "seq-mean-token-mean", "seq-mean-token-sum"] = "token-mean",
    num_tokens: int | float | Tensor | None = None,
    num_sequences: int | float | Tensor | None = None,
    loss_type: Literal["dapo", "gspo"] = "dapo",
    ref_logprobs: Tensor | None = None,
    kl_coef: float = 0.0,
    kl_estimator: Literal["k1", "k2", "k3"] = "k3",
    aux_terms: dict[str, tuple[float, Tensor]] | None = None,
    validate: bool = True,
) -> tuple[Tensor, dict[str, Tensor]]:
    """The clipped policy-gradient loss of §6, plus optional entropy and reference-KL terms.

    Per token, with ``Δ = lp_new − lp_old``:
    ``r = exp(clamp(Δ, −20, 20))``, ``r̃ = exp(clamp(Δ, log(1 − clip_low), log(1 + clip_high)))``,
    ``ℓ = max(−A·r, −A·r̃)``; where ``A < 0``: ``ℓ = min(ℓ, −A·dual_clip)``; then ``ℓ · w`` with
    ``w = token_weights``. ``loss = agg(ℓ·w) + entropy_coef · agg(h) + kl_coef · agg(kl)`` where ``h = −lp_new``
    (the sampled-token NLL, the reference form) or ``entropy`` when given, and ``kl = kl_penalty(lp_new,
    ref_logprobs, kl_estimator)``; plus ``Σ_name coef · agg(term)`` over ``aux_terms``. Token weights touch the
    policy term only.

    ``loss_type="gspo"``: the ratio of every token of response i is GSPO's sequence ratio
    ``s_i = exp(mean_t Δ_{i,t})`` (valid tokens), with gradient ``s_i · ∇lp_new_t`` per token
    (``lp_new − sg(lp_new) + sg(mean Δ)``), clipped like ``r``. GSPO as published uses
    ``aggregation="seq-mean-token-mean"``, clip ranges of about 3e-4/4e-4 and no dual clip (``dual_clip=None``).

    Args:
        lp_new: ``[B, L]`` float — log-probs of the sampled tokens under the current policy (carries the gradient;
            bf16 is upcast to float32).
        lp_old: ``[B, L]`` float — under the policy that sampled them (treated as a constant).
        advantages: ``[B]`` (one per response, broadcast over tokens) or ``[B, L]`` float (constant), already
            shaped (TAS α applied by the caller).
        mask: ``[B, L]`` bool or 0/1 — 1 on real response tokens. Padding may hold any value, even NaN.
        token_weights: optional ``[B, L]`` bool or float ≥ 0 (constant) — the TGF mask (`tgf_mask`) or PGPO's ω̃
            (`pgpo_token_weights`). Since ``ℓ`` is positively homogeneous in ``A``, ``ℓ(A)·ω̃ = ℓ(A·ω̃)``: weighting
            the loss is PGPO's token advantage ``A·ω̃``.
        clip_low, clip_high: ε_lo in [0, 1), ε_hi ≥ 0 (DAPO clip-higher: 0.2, 0.28).
        dual_clip: c > 1 or None to disable (dual-clip PPO; 3.0).
        entropy_coef: λ; ``+λ·agg(h)`` is added, so λ > 0 penalises entropy (VPPO: 0.06), λ < 0 is the usual bonus.
        entropy: optional ``[B, L]`` analytic entropy of π_θ at each position (with gradient); when given, the
            entropy term uses it instead of the sampled-token NLL.
        aggregation: ``"token-mean"``: ``Σ / num_tokens`` (all valid tokens, whatever the token weights; default
            num_tokens = this call's valid tokens). ``"seq-mean-token-mean"``: GRPO's mean over each response, then
            the mean over non-empty responses (or ``/ num_sequences``). ``"seq-mean-token-sum"``: sum per response,
            mean over non-empty responses (or ``/ num_sequences``).
        num_tokens: the global token count (all micro-batches and ranks of one optimizer step) for
            ``"token-mean"``; then summing the losses of every micro-batch (and all-reducing the gradient as a
            sum) gives the global token-mean. ``num_sequences``: the same for the ``seq-mean-*`` aggregations.
        loss_type: ``"dapo"`` (token ratio) or ``"gspo"`` (sequence ratio).
        ref_logprobs: optional ``[B, L]`` log-probs under a reference policy; required when ``kl_coef != 0``.
        kl_coef, kl_estimator: weight and estimator of the reference KL term.
        aux_terms: optional ``{name: (coef, term)}``, each ``term`` a ``[B, L]`` per-token tensor (it may carry a
            gradient), added as ``coef · agg(term)`` with this loss's aggregation and counts: the perception KL
            terms of PAPO / CFPO / DVRP (ALGORITHMS.md §9.1), e.g.
            ``{"visual_kl": (-γ, kl_penalty(lp_new, lp_masked, "k3"))}``. Each is logged as ``aux/<name>``
            (mean over valid tokens).
        validate: check the values of the inputs (0/1 mask, finite log-probs, advantages and weights, weights ≥ 0,
            counts ≥ this call's own). Shapes, dtypes and options are always checked. ``False`` skips only the
            checks that read data (each one a device-to-host sync on a GPU), for a caller that checked its inputs
            once per step; non-finite values then reach the loss instead of raising.

    Returns:
        ``(loss, metrics)``: a scalar tensor (float32, or float64 for float64 inputs) and a dict of detached 0-dim
        float32 tensors: ``loss``, ``pg_loss``, ``entropy`` (mean −lp_new over valid tokens), ``entropy_analytic``
        (when ``entropy`` given), ``kl_ref`` (when ``ref_logprobs`` given), ``approx_kl`` (mean lp_old − lp_new),
        ``ratio_mean``, ``ratio_max``, ``clipfrac_high`` (A > 0 and r > 1 + ε_hi), ``clipfrac_low`` (A < 0 and
        r < 1 − ε_lo), ``clipfrac_dual`` (A < 0 and r > c) — clip fractions over tokens with non-zero weight —,
        ``token_weight_nonzero_frac`` (over valid tokens), ``num_tokens`` (valid tokens in this call). Token means
        are over this call's tokens, whatever ``num_tokens`` says. An all-padding batch gives ``loss = 0`` still
        connected to ``lp_new`` (backward works and yields zero gradients).
    """
    check_token_tensor(lp_new, "lp_new")
    check_token_tensor(lp_old, "lp_old")
    if lp_old.shape != lp_new.shape:
        raise ValueError(f"lp_old has shape {tuple(lp_old.shape)}, expected the shape of lp_new {tuple(lp_new.shape)}")
    valid = check_mask(mask, lp_new.shape, values=validate)
    B, L = lp_new.shape
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")
    if kl_estimator not in KL_ESTIMATORS:
        raise ValueError(f"kl_estimator must be one of {KL_ESTIMATORS}, got {kl_estimator!r}")
    if not (isinstance(clip_low, (int, float)) and 0.0 <= clip_low < 1.0):
        raise ValueError(f"clip_low must be in [0, 1) (the ratio is clipped at 1 - clip_low), got {clip_low!r}")
    if not (isinstance(clip_high, (int, float)) and 0.0 <= clip_high < math.inf):
        raise ValueError(f"clip_high must be a finite float ≥ 0, got {clip_high!r}")
    if dual_clip is not None and not (isinstance(dual_clip, (int, float)) and 1.0 < dual_clip < math.inf):
        raise ValueError(f"dual_clip must be a finite float > 1, or None to disable it, got {dual_clip!r}")
    for name, coef in (("entropy_coef", entropy_coef), ("kl_coef", kl_coef)):
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise ValueError(f"{name} must be a finite float, got {coef!r}")

    dtype = torch.float64 if lp_new.dtype == torch.float64 else torch.float32
    lp_new = lp_new.to(dtype)
    lp_old = lp_old.detach().to(dtype)
    if validate:
        check_finite_where(lp_new.detach(), valid, "lp_new")
        check_finite_where(lp_old, valid, "lp_old")

    if not isinstance(advantages, Tensor) or not advantages.is_floating_point():
        raise ValueError("advantages must be a float tensor of shape [B] or [B, L]")
    if advantages.shape == (B,):
        adv = advantages.detach().to(dtype)[:, None].expand(B, L)
        if validate and not bool(torch.isfinite(adv).all()):
            raise ValueError("advantages contains NaN or inf")
    elif advantages.shape == (B, L):
        adv = advantages.detach().to(dtype)
        if validate:
            check_finite_where(adv, valid, "advantages")
    else:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B]=({B},) or [B, L]=({B}, {L})")

    if token_weights is None:
        weights = torch.ones_like(lp_old)
    else:
        if not isinstance(token_weights, Tensor) or token_weights.shape != lp_new.shape:
            shape = tuple(token_weights.shape) if isinstance(token_weights, Tensor) else type(token_weights).__name__
            raise ValueError(f"token_weights has shape {shape}, expected [B, L]=({B}, {L}) (TGF mask or PGPO ω̃)")
        weights = token_weights.detach().to(dtype)
        if validate:
            check_finite_where(weights, valid, "token_weights")
        if validate and not bool(((weights >= 0) | ~valid).all()):
            raise ValueError("token_weights must be ≥ 0 on valid tokens (a TGF mask or PGPO weights)")
    if entropy is not None:
        check_token_tensor(entropy, "entropy")
        if entropy.shape != lp_new.shape:
            raise ValueError(f"entropy has shape {tuple(entropy.shape)}, expected [B, L]=({B}, {L})")
        entropy = entropy.to(dtype)
        if validate:
            check_finite_where(entropy.detach(), valid, "entropy")
    if ref_logprobs is not None:
        check_token_tensor(ref_logprobs, "ref_logprobs")
        if ref_logprobs.shape != lp_new.shape:
            raise ValueError(f"ref_logprobs has shape {tuple(ref_logprobs.shape)}, expected [B, L]=({B}, {L})")
        if validate:
            check_finite_where(ref_logprobs.detach(), valid, "ref_logprobs")
    elif kl_coef != 0.0:
        raise ValueError("kl_coef != 0 needs ref_logprobs (log-probs of the responses under the reference policy)")

    aux = {}
    for name, item in (aux_terms or {}).items():
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[1], Tensor)):
            raise ValueError(f"aux_terms[{name!r}] must be a pair (coef, [B, L] tensor), got {type(item).__name__}")
        coef, term = item
        if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not math.isfinite(coef):
            raise ValueError(f"aux_terms[{name!r}]: coef must be a finite float, got {coef!r}")
        if term.shape != lp_new.shape or not term.is_floating_point():
            raise ValueError(f"aux_terms[{name!r}] has shape {tuple(term.shape)}, expected [B, L]=({B}, {L}) float")
        if validate:
            check_finite_where(term.detach(), valid, f"aux_terms[{name!r}]")
        aux[name] = (float(coef), term.to(dtype))

    if aggregation == "token-mean" and num_sequences is not None:
        raise ValueError("num_sequences is for the seq-mean-* aggregations; token-mean divides by num_tokens")
    if aggregation != "token-mean" and num_tokens is not None:
        raise ValueError(f"num_tokens is for aggregation='token-mean'; {aggregation!r} divides by num_sequences")
    n_tok = _check_count(num_tokens, "num_tokens", valid.sum(), validate)
    n_seq = _check_count(num_sequences, "num_sequences", valid.any(dim=1).sum(), validate)

    # Padding is set to 0 in every input before any arithmetic: NaN/inf there must reach neither the loss nor, via
    # 0 * NaN in a backward pass, the model's gradient.
    lp_new, lp_old, adv, weights = (_zero_pad(x, valid) for x in (lp_new, lp_old, adv, weights))
    if entropy is not None:
        entropy = _zero_pad(entropy, valid)
    if ref_logprobs is not None:
        ref_logprobs = _zero_pad(ref_logprobs.detach().to(dtype), valid)
    delta = lp_new - lp_old
    if loss_type == "dapo":
        log_ratio = delta
    else:
        seq_log_ratio = delta.sum(dim=1) / valid.sum(dim=1).clamp(min=1).to(dtype)
        log_ratio = _zero_pad(lp_new - lp_new.detach() + seq_log_ratio.detach()[:, None], valid)
    log_ratio = log_ratio.clamp(-_LOG_RATIO_BOUND, _LOG_RATIO_BOUND)
    ratio = torch.exp(log_ratio)
    clipped_ratio = torch.exp(log_ratio.clamp(math.log(1.0 - clip_low), math.log1p(clip_high)))
    per_token = torch.maximum(-adv * ratio, -adv * clipped_ratio)
    if dual_clip is not None:
        per_token = torch.where(adv < 0, torch.minimum(per_token, -adv * dual_clip), per_token)
    pg_loss = _aggregate(per_token * weights, valid, aggregation, n_tok, n_seq)

    loss = pg_loss
    neg_lp = -lp_new
    if entropy_coef != 0.0:
        loss = loss + entropy_coef * _aggregate(
            entropy if entropy is not None else neg_lp, valid, aggregation, n_tok, n_seq
        )
    kl = None
    if ref_logprobs is not None:
        kl = kl_penalty(lp_new, ref_logprobs, kl_estimator)
        if kl_coef != 0.0:
            loss = loss + kl_coef * _aggregate(kl, valid, aggregation, n_tok, n_seq)

    aux = {name: (coef, _zero_pad(term, valid)) for name, (coef, term) in aux.items()}
    for coef, term in aux.values():
        if coef != 0.0:
            loss = loss + coef * _aggregate(term, valid, aggregation, n_tok, n_seq)

    with torch.no_grad():
        active = valid & (weights != 0)
        lr = log_ratio.detach()
        metrics = {
            "loss": loss.detach().float(),
            "pg_loss": pg_loss.detach().float(),
            "entropy": _masked_mean(neg_lp.detach(), valid),
            "approx_kl": _masked_mean(-delta.detach(), valid),
            "ratio_mean": _masked_mean(ratio.detach(), valid),
            "ratio_max": torch.where(valid, ratio.detach(), torch.zeros_like(lr)).amax().float()
            if valid.numel()
            else torch.zeros((), dtype=torch.float32, device=lp_new.device),
            "clipfrac_high": _masked_mean(((adv > 0) & (lr > math.log1p(clip_high))).float(), active),
            "clipfrac_low": _masked_mean(((adv < 0) & (lr < math.log(1.0 - clip_low))).float(), active),
            "clipfrac_dual": _masked_mean(((adv < 0) & (lr > math.log(dual_clip))).float(), active)
            if dual_clip is not None
            else torch.zeros((), dtype=torch.float32, device=lp_new.device),
            "token_weight_nonzero_frac": (active.sum() / valid.sum().clamp(min=1)).float(),
            "num_tokens": valid.sum().float(),
        }
        if entropy is not None:
            metrics["entropy_analytic"] = _masked_mean(entropy.detach(), valid)
        if kl is not None:
            metrics["kl_ref"] = _masked_mean(kl.detach(), valid)
        for name, (_, term) in aux.items():
            metrics[f"aux/{name}"] = _masked_mean(term.detach(), valid)
    return loss, metrics
