"""Advantage shaping from visual dependency: VPPO's TAS (ALGORITHMS.md §3), PGPO's token weights (§5), and the
token credit of the methods that followed: ToR, CGPO, PEPO, VGPO, Perceval, DyCo-RL (§9)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from vppo_core.validation import check_finite_where, check_mask, check_token_tensor

__all__ = [
    "PGPO_THRESHOLD_MODES",
    "VGPO_RESPONSE_FACTOR_RANGE",
    "VGPO_TOKEN_FACTOR_RANGE",
    "cgpo_response_factors",
    "dyco_advantage_weights",
    "dyco_response_scores",
    "flagged_token_spans",
    "minmax_by_response",
    "pepo_layer_cosines",
    "pepo_prior_mean",
    "pepo_token_weights",
    "pepo_visual_prior",
    "pepo_visual_weights",
    "perceval_penalty_mask",
    "perceval_token_advantages",
    "perceval_token_weights",
    "pgpo_token_weights",
    "tas_bounds",
    "tas_scale",
    "tas_scale_reference",
    "tor_token_weights",
    "vgpo_compensated_scores",
    "vgpo_response_factors",
    "vgpo_token_factors",
    "vgpo_visual_focus",
]

# §3 fallback: a statistics set whose dependencies span no more than this gets α ≡ 1.
_TAS_MIN_SPREAD = 1e-6
# The reference code divides by mean(n) + 1e-8 (dp_actor.py, "epsilon = 1e-8"); only the reference mode uses it.
_REFERENCE_MEAN_EPS = 1e-8


def _check_traj(traj_dep: Tensor, valid: Tensor | None) -> Tensor:
    """Check ``traj_dep [B]`` and return the bool ``valid [B]`` (all True when not given)."""
    if not isinstance(traj_dep, Tensor) or traj_dep.dim() != 1 or not traj_dep.is_floating_point():
        shape = tuple(traj_dep.shape) if isinstance(traj_dep, Tensor) else type(traj_dep).__name__
        raise ValueError(f"traj_dep must be a float tensor of shape [B] (one S̄ per response), got {shape}")
    if valid is None:
        valid = torch.ones_like(traj_dep, dtype=torch.bool)
    else:
        valid = check_mask(valid, traj_dep.shape, "valid")
    check_finite_where(traj_dep, valid, "traj_dep")
    return valid


def _check_beta_min(beta_min: float) -> None:
    if isinstance(beta_min, bool) or not isinstance(beta_min, (int, float)) or not 0.0 <= beta_min <= 1.0:
        raise ValueError(f"beta_min must be a float in [0, 1] (the smallest scale α can take), got {beta_min!r}")


def tas_bounds(traj_dep: Tensor, valid: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """``(m, M)``: min and max of ``traj_dep`` over the valid responses — the §3 statistics of one set.

    Args:
        traj_dep: ``[B]`` float — S̄ per response (`trajectory_dependency`).
        valid: optional ``[B]`` bool/0-1 — False for responses excluded from the statistics (empty responses).

    Returns:
        Two 0-dim tensors (dtype of ``traj_dep``). With no valid response they are ``(+inf, -inf)``, the identities
        of min/max, so a distributed caller can ``all_reduce`` them with ``MIN``/``MAX`` unconditionally; `tas_scale`
        treats ``M − m ≤ 1e-6`` (including this case and a single valid response) as the α ≡ 1 fallback.
    """
    valid = _check_traj(traj_dep, valid)
    inf = torch.tensor(math.inf, dtype=traj_dep.dtype, device=traj_dep.device)
    m = torch.where(valid, traj_dep, inf).amin() if traj_dep.numel() else inf.clone()
    big = torch.where(valid, traj_dep, -inf).amax() if traj_dep.numel() else -inf
    return m, big


def tas_scale(
    traj_dep: Tensor,
    *,
    beta_min: float = 0.9,
    bounds: tuple[Tensor | float, Tensor | float] | None = None,
    valid: Tensor | None = None,
) -> Tensor:
    """VPPO Trajectory-level Advantage Shaping factor α (§3).

    ``n_i = clamp((S̄_i − m) / (M − m), 0, 1)``, ``α_i = β_min + (1 − β_min) · n_i / mean(n)``, where ``m, M`` are
    ``bounds`` (or the min/max over ``traj_dep`` itself) and ``mean(n)`` is over the valid entries of ``traj_dep``.
    Multiply every token's advantage of response i by ``α_i``, whatever its sign.

    Args:
        traj_dep: ``[B]`` float — S̄ per response.
        beta_min: β_min in [0, 1] (paper: 0.9).
        bounds: optional ``(m, M)`` computed over a larger set (`tas_bounds`, all-reduced MIN/MAX across ranks, or
            over the rank's whole mini-batch for the reference mode); ``None``: from ``traj_dep`` itself.
        valid: optional ``[B]`` bool/0-1 — responses to scale; the others (e.g. empty responses, whose S̄ is 0 by
            convention) get α = 1 and are left out of ``mean(n)``. Pass ``response_mask.sum(-1) > 0``.

    Returns:
        ``[B]`` α (detached), dtype of ``traj_dep``. The mean of α over the valid entries is 1 up to rounding,
        except in the fallbacks: ``M − m ≤ 1e-6`` (which covers fewer than 2 valid responses in the statistics
        set) → α ≡ 1; ``mean(n) = 0`` (every valid S̄ at or below m) → α ≡ β_min on valid entries.

    Global statistics (the project default) on several ranks: all-gather ``traj_dep``/``valid`` and call this on the
    full vector, then take your slice — both ``m, M`` and ``mean(n)`` are then sharding-independent. The reference
    code's per-rank mini-batch bounds with per-micro-batch ``mean(n)`` is `tas_scale_reference`.
    """
    valid = _check_traj(traj_dep, valid)
    _check_beta_min(beta_min)
    traj_dep = traj_dep.detach()  # α is a constant scale on the advantage, never a path for gradients
    if bounds is None:
        m, big = tas_bounds(traj_dep, valid)
    else:
        if not isinstance(bounds, (tuple, list)) or len(bounds) != 2:
            raise ValueError(f"bounds must be a pair (min, max) of S̄ over the statistics set, got {bounds!r}")
        m, big = (torch.as_tensor(b, dtype=traj_dep.dtype, device=traj_dep.device) for b in bounds)
        if m.numel() != 1 or big.numel() != 1 or torch.isnan(m) or torch.isnan(big):
            raise ValueError(f"bounds must be two scalars (min, max), not NaN, got {bounds!r}")
    ones = torch.ones_like(traj_dep)
    spread = big - m
    if not bool(spread > _TAS_MIN_SPREAD) or not bool(valid.any()):
        return ones
    n = ((traj_dep - m) / spread).clamp(0.0, 1.0)
    n = torch.where(valid, n, torch.zeros_like(n))
    mean_n = n.sum() / valid.sum()
    if not bool(mean_n > 0):
        return torch.where(valid, torch.full_like(traj_dep, beta_min), ones)
    alpha = beta_min + (1.0 - beta_min) * n / mean_n
    return torch.where(valid, alpha, ones)


def tas_scale_reference(
    traj_dep: Tensor, micro_batch_size: int, *, beta_min: float = 0.9, valid: Tensor | None = None
) -> Tensor:
    """α exactly as the official VPPO code computes it, for one rank's PPO mini-batch (§3, "Reference code").

    ``m, M`` over the valid responses of the whole ``traj_dep`` (the rank's mini-batch, not synchronised across
    ranks); it is then split into consecutive micro-batches of ``micro_batch_size`` (the last may be shorter),
    and in each ``α_i = β_min + n_i · (1 − β_min) / (mean_micro(n) + 1e-8)`` with the mean over that micro-batch's
    valid responses. Fewer than 2 valid responses or ``M − m ≤ 1e-6`` → α ≡ 1; invalid responses → α = 1.
    α therefore depends on sharding and micro-batch size; its mean is 1 only per micro-batch.

    Args:
        traj_dep: ``[B]`` float — S̄ of the rank's mini-batch, in the order it is split into micro-batches.
        micro_batch_size: responses per micro-batch (fixed-size splits; the reference's dynamic batching is not
            modelled).
        beta_min: β_min in [0, 1].
        valid: optional ``[B]`` — the reference marks a response valid iff it has at least one token.

    Returns:
        ``[B]`` α, dtype of ``traj_dep``.
    """
    valid = _check_traj(traj_dep, valid)
    _check_beta_min(beta_min)
    traj_dep = traj_dep.detach()
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size must be a positive int, got {micro_batch_size!r}")
    alpha = torch.ones_like(traj_dep)
    if int(valid.sum()) < 2:
        return alpha
    m, big = tas_bounds(traj_dep, valid)
    if not bool(big - m > _TAS_MIN_SPREAD):
        return alpha
    n_all = ((traj_dep - m) / (big - m)).clamp(0.0, 1.0)
    for start in range(0, traj_dep.numel(), micro_batch_size):
        sl = slice(start, start + micro_batch_size)
        v, n = valid[sl], n_all[sl]
        if not bool(v.any()):
            continue
        mean_n = n[v].mean()
        # Same operation order as the reference (target_max first), so the result matches it bit for bit.
        target_max = beta_min + (1.0 - beta_min) / (mean_n + _REFERENCE_MEAN_EPS)
        scaled = beta_min + n * (target_max - beta_min)
        alpha[sl] = torch.where(v, scaled, alpha[sl])
    return alpha


PGPO_THRESHOLD_MODES = ("absolute", "quantile")


def pgpo_token_weights(
    S: Tensor,
    mask: Tensor,
    *,
    tau: float = 0.4,
    beta: float = 2.0,
    eps: float = 1e-6,
    threshold_mode: str = "absolute",
    weight_floor: float = 0.0,
    mass_normalization: bool = True,
) -> Tensor:
    """PGPO's threshold-gated, mass-conserving token weights ω̃ (§5); token advantage ``Ã_{i,t} = A_i · ω̃_{i,t}``.

    Per response over its valid tokens: ``Ŝ = log(1 + S)``, ``I = (Ŝ − min Ŝ) / (max Ŝ − min Ŝ + eps)``,
    ``ω = I / (τ_i + eps)`` if ``I < τ_i`` else ``1 + β (I − τ_i) / (1 − τ_i + eps)``, ``ω̃ = ω · n / Σ ω``.
    The defaults are the paper's (``τ_i = τ``, no floor, mass normalisation on). Three switches give what the
    authors' development code is described to do (ALGORITHMS.md §5): ``threshold_mode="quantile"`` takes ``τ_i`` as
    the response's own ascending ``I`` at index ``min(floor(n_i·τ), n_i − 1)``; ``weight_floor`` raises the
    below-threshold weights to at least that value; ``mass_normalization=False`` returns ω itself.

    Args:
        S: ``[B, L]`` float — token dependency; non-negative by construction, must be > −1 (log1p) and finite on
            valid positions.
        mask: ``[B, L]`` bool or 0/1.
        tau: τ in (0, 1) (paper: 0.4; in quantile mode the quantile).  beta: β ≥ 0 (paper: 2.0).
        eps: ε > 0 (paper: 1e-6).
        threshold_mode: "absolute" (paper) | "quantile".
        weight_floor: in [0, 1] (above 1 a below-threshold token would outweigh one above), lower bound of the
            below-threshold weights (paper: 0; development code: 0.1).
        mass_normalization: rescale each row to sum to n_i (paper: True).

    Returns:
        ``[B, L]`` float (dtype of ``S``, detached), ≥ 0, zero on padding, order-preserving within a row
        (``S_a ≤ S_b`` ⇒ ``ω̃_a ≤ ω̃_b``). With mass normalisation each row sums to its valid-token count n_i.
        Degenerate rows, where the formula is 0/0: an empty row is all zeros; with mass normalisation, a row whose
        ``max Ŝ − min Ŝ ≤ eps`` (all tokens equally dependent, including a single token) gets ω̃ = 1 on every valid
        token — the GRPO weighting. Without that rule a spread of, say, 1e-9 would hand a row's whole advantage mass
        to its top token. Without mass normalisation there is no division by Σω and the formula applies as is.
    """
    check_token_tensor(S, "S")
    valid = check_mask(mask, S.shape)
    for name, value, ok in (
        ("tau", tau, 0.0 < tau < 1.0),
        ("beta", beta, beta >= 0.0),
        ("eps", eps, eps > 0.0),
        ("weight_floor", weight_floor, 0.0 <= weight_floor <= 1.0),
    ):
        if not ok or not math.isfinite(value):
            raise ValueError(
                f"{name} out of range: got {value!r} (need 0 < tau < 1, beta ≥ 0, eps > 0, 0 ≤ weight_floor ≤ 1)"
            )
    if threshold_mode not in PGPO_THRESHOLD_MODES:
        raise ValueError(f"threshold_mode must be one of {PGPO_THRESHOLD_MODES}, got {threshold_mode!r}")
    check_finite_where(S, valid, "S")
    if not bool((S > -1.0)[valid].all()):
        raise ValueError("S must be > -1 on valid positions (it is a non-negative KL estimate; log1p(S) is taken)")

    s_hat = torch.log1p(torch.where(valid, S.detach(), torch.zeros_like(S)))  # weights are constants
    inf = torch.full_like(s_hat, math.inf)
    lo = torch.where(valid, s_hat, inf).amin(dim=1, keepdim=True)
    hi = torch.where(valid, s_hat, -inf).amax(dim=1, keepdim=True)
    spread = hi - lo  # -inf on empty rows
    importance = ((s_hat - lo) / (spread + eps)).nan_to_num(0.0)
    n_valid = valid.sum(dim=1, keepdim=True)
    if threshold_mode == "quantile":
        index = torch.minimum((n_valid.to(S.dtype) * tau).long(), (n_valid - 1).clamp(min=0))
        ascending = torch.where(valid, importance, inf).sort(dim=1).values
        threshold = torch.where(n_valid > 0, ascending.gather(1, index), torch.zeros_like(index, dtype=S.dtype))
    else:
        threshold = torch.full_like(lo, tau)
    below = importance / (threshold + eps)
    if weight_floor > 0.0:
        below = below.clamp(min=weight_floor)
    omega = torch.where(importance < threshold, below, 1.0 + beta * (importance - threshold) / (1.0 - threshold + eps))
    omega = torch.where(valid, omega, torch.zeros_like(omega))
    if not mass_normalization:
        return omega
    n = n_valid.to(S.dtype)
    total = omega.sum(dim=1, keepdim=True)
    degenerate = ~(spread > eps)  # also True on empty rows (spread = -inf)
    # Σω > 0 whenever spread > eps: the top token has I = spread / (spread + eps) > 0, so ω ≥ 1 or I / (τ_i + ε) > 0.
    weights = omega * (n / torch.where(degenerate, torch.ones_like(total), total))
    return torch.where(degenerate, valid.to(S.dtype), weights)


# --------------------------------------------------------------------------------------------------------------------
# The methods that followed VPPO (ALGORITHMS.md §9): ToR, CGPO, PEPO token credit
# --------------------------------------------------------------------------------------------------------------------

# Per-response min-max: a spread at or below this is "all tokens equal" (the fork's clamp, eps 1e-8).
_MINMAX_EPS = 1e-8
# CGPO divides by MAD + 1e-8 (perception_reasoning_loss.py, _compute_cgpo_response_scaling).
_CGPO_MAD_EPS = 1e-8


def _check_real(name: str, value: float, ok: bool, need: str) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok:
        raise ValueError(f"{name} must be {need}, got {value!r}")


def minmax_by_response(x: Tensor, mask: Tensor) -> Tensor:
    """Per-response min-max ``(x − min_i) / max(max_i − min_i, 1e-8)`` over each row's valid tokens (§9: PEPO, VEPO).

    Args:
        x: ``[B, L]`` float (finite on valid positions; padding may hold anything).
        mask: ``[B, L]`` bool or 0/1.

    Returns:
        ``[B, L]`` float32 (float64 for float64 input) in [0, 1], detached; 0 on padding, and 0 on every token of a
        row whose values are all equal. A spread below 1e-8 is divided by 1e-8 (``[0, 5e-9]`` gives ``[0, 0.5]``), as
        in the fork's ``minmax_normalize_by_response``.
    """
    check_token_tensor(x, "x")
    valid = check_mask(mask, x.shape)
    check_finite_where(x, valid, "x")
    dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
    x = torch.where(valid, x.detach().to(dtype), torch.zeros((), dtype=dtype, device=x.device))
    inf = torch.full_like(x, math.inf)
    lo = torch.where(valid, x, inf).amin(dim=1, keepdim=True)
    hi = torch.where(valid, x, -inf).amax(dim=1, keepdim=True)
    scaled = ((x - lo) / (hi - lo).clamp(min=_MINMAX_EPS)).clamp(0.0, 1.0)
    return torch.where(valid, scaled, torch.zeros_like(scaled))


def tor_token_weights(
    reasoning_set: Tensor, perception_set: Tensor, mask: Tensor, *, reasoning_weight: float = 1.0,
    perception_weight: float = 0.5,
) -> Tensor:  # fmt: skip
    """ToR's token weights (§9.3): ``w = γ_r·1[t ∈ T_r] + γ_p·1[t ∈ T_p ∖ T_r]``, 0 for every other token.

    ``T_r`` is the high-entropy set, ``T_p`` the high-perception set (`top_fraction_mask` with ``scope="batch"``,
    0.3 each). The weights multiply the clipped per-token policy-gradient terms (`policy_loss` ``token_weights``);
    the loss still divides by every valid token.

    Args:
        reasoning_set, perception_set: ``[B, L]`` bool or 0/1.  mask: ``[B, L]`` bool or 0/1.
        reasoning_weight: γ_r ≥ 0 (paper: 1.0).  perception_weight: γ_p ≥ 0 (paper: 0.5).

    Returns:
        ``[B, L]`` float32, 0 on padding.
    """
    if not isinstance(mask, Tensor) or mask.dim() != 2:
        raise ValueError(f"mask must be a [B, L] tensor, got {getattr(mask, 'shape', type(mask).__name__)}")
    valid = check_mask(mask, tuple(mask.shape))
    t_r = check_mask(reasoning_set, valid.shape, "reasoning_set")
    t_p = check_mask(perception_set, valid.shape, "perception_set")
    _check_real("reasoning_weight", reasoning_weight, reasoning_weight >= 0, "a finite float ≥ 0")
    _check_real("perception_weight", perception_weight, perception_weight >= 0, "a finite float ≥ 0")
    w = reasoning_weight * t_r.float() + perception_weight * (t_p & ~t_r).float()
    return torch.where(valid, w, torch.zeros_like(w))


def _lower_median(x: Tensor) -> Tensor:
    """``torch.median`` semantics: the lower of the two middle values for an even count."""
    return x.sort().values[(x.numel() - 1) // 2]


def cgpo_response_factors(traj_score: Tensor, valid: Tensor | None = None, *, coef: float = 0.1) -> Tensor:
    """CGPO's response factor (§9.5): ``α_i = 1 + λ·tanh((s_i − median) / (MAD + 1e-8))``.

    ``median`` and ``MAD = median(|s − median|)`` are over the valid responses of the whole statistics set (the
    rollout batch: gather it from every rank), both the lower median for an even count (``torch.median``).

    Args:
        traj_score: ``[B]`` float — each response's mean counterfactual sensitivity s_i.
        valid: optional ``[B]`` bool/0-1 — responses with at least one token; the others get α = 1.
        coef: λ in [0, 1] (paper / fork default: 0.1), so that α ≥ 0 (a negative α would flip the sign of a
            perception token's gradient).

    Returns:
        ``[B]`` α in [1 − λ, 1 + λ] (detached, dtype of ``traj_score``). With fewer than 2 valid responses α ≡ 1 (the
        fork raises there instead: it has no statistics).
    """
    if not isinstance(traj_score, Tensor) or traj_score.dim() != 1 or not traj_score.is_floating_point():
        shape = tuple(traj_score.shape) if isinstance(traj_score, Tensor) else type(traj_score).__name__
        raise ValueError(f"traj_score must be a float tensor of shape [B] (one s_i per response), got {shape}")
    valid = (
        torch.ones_like(traj_score, dtype=torch.bool) if valid is None else check_mask(valid, traj_score.shape, "valid")
    )
    check_finite_where(traj_score, valid, "traj_score")
    _check_real("coef", coef, 0 <= coef <= 1, "in [0, 1] (α = 1 ± λ must stay ≥ 0)")
    s = traj_score.detach()
    ones = torch.ones_like(s)
    if int(valid.sum()) < 2:
        return ones
    median = _lower_median(s[valid])
    mad = _lower_median((s[valid] - median).abs())
    alpha = 1.0 + coef * torch.tanh((s - median) / (mad + _CGPO_MAD_EPS))
    return torch.where(valid, alpha, ones)


def pepo_visual_prior(hidden_states: Sequence[Tensor], visual_mask: Tensor) -> Tensor:
    """PEPO's perception prior (§9.4): ``v_t = mean_ℓ mean_j cos(h_t^ℓ, h_j^ℓ)`` over the row's visual tokens j.

    The mean of cosines to the visual tokens equals the dot product of ``h_t^ℓ / ‖h_t^ℓ‖`` with the mean of the
    visual tokens' unit vectors, which is how it is computed here (float32, no ``[T, n_visual]`` matrix). The sum
    over layers is `pepo_layer_cosines` added in layer order, so a caller that adds each layer's term as the forward
    produces it (and drops the layer) gets the same bits without holding every layer.

    Args:
        hidden_states: the layers' hidden states, each ``[B, T, H]`` (what ``output_hidden_states=True`` returns:
            the embedding output and every decoder layer's).
        visual_mask: ``[B, T]`` bool — True on the image/video placeholder tokens of each row.

    Returns:
        ``[B, T]`` float32 prior of every position (take the response positions), detached.

    Raises:
        ValueError: no layers, shape mismatches, a row without visual tokens (named), or NaN/inf hidden states.
    """
    if not isinstance(hidden_states, (list, tuple)) or not hidden_states:
        raise ValueError("hidden_states must be a non-empty sequence of [B, T, H] tensors (one per layer)")
    shape = tuple(hidden_states[0].shape)
    if len(shape) != 3:
        raise ValueError(f"hidden_states[0] must be [B, T, H], got shape {shape}")
    weights = pepo_visual_weights(visual_mask, shape[:2])
    prior = torch.zeros(shape[:2], dtype=torch.float32, device=hidden_states[0].device)
    for i, h in enumerate(hidden_states):
        if tuple(h.shape) != shape:
            raise ValueError(f"hidden_states[{i}] has shape {tuple(h.shape)}, expected {shape}")
        prior += pepo_layer_cosines(h, weights)
    return pepo_prior_mean(prior, len(hidden_states))


def pepo_visual_weights(visual_mask: Tensor, shape: tuple[int, int] | None = None) -> Tensor:
    """``[B, T]`` float32: 1 / (number of visual tokens of the row) on its visual tokens, 0 elsewhere (rows sum to 1).

    Raises ValueError for a row without visual tokens (named) or a mask that is not ``[B, T]`` bool of `shape`."""
    visual = check_mask(visual_mask, tuple(shape) if shape is not None else tuple(visual_mask.shape), "visual_mask")
    empty = (~visual.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no visual token: PEPO's prior needs the image placeholder tokens")
    return visual.float() / visual.sum(dim=1, keepdim=True)


def pepo_layer_cosines(hidden: Tensor, visual_weights: Tensor) -> Tensor:
    """One layer's term of `pepo_visual_prior`: ``[B, T]`` float32 mean cosine of each position to the row's visual
    tokens, from ``hidden`` ``[B, T, H]`` (any float dtype, detached here) and `pepo_visual_weights` ``[B, T]``."""
    unit = F.normalize(hidden.detach().float(), dim=-1)
    anchor = torch.einsum("bt,bth->bh", visual_weights, unit)  # mean unit vector of the visual tokens
    return torch.einsum("bth,bh->bt", unit, anchor)


def pepo_prior_mean(total: Tensor, n_layers: int) -> Tensor:
    """The sum of `n_layers` layer terms ``[B, T]`` -> the prior (their mean); raises ValueError if not finite."""
    prior = total / n_layers
    if not bool(torch.isfinite(prior).all()):
        raise ValueError("hidden_states contain NaN or inf: PEPO's prior is not finite")
    return prior


def pepo_token_weights(
    prior: Tensor, entropy: Tensor, mask: Tensor, *, gate_alpha: float = 0.05, temperature: float = 1.8,
    progress: float = 1.0,
) -> Tensor:  # fmt: skip
    """PEPO's token weights (§9.4); token advantage ``A_i · w_t``.

    ``m_t = minmax(v)_t + minmax(H)_t`` (per response), ``g_t = 1 + α·tanh(m_t − mean_i m)``,
    ``w_t = n_i · softmax_{valid t}(v_t · g_t / T)`` (the softmax of the *raw* prior times the gate), then the
    linear schedule ``w' = 1 + λ(w − 1)`` with λ = ``progress``.

    Args:
        prior: ``[B, L]`` float — `pepo_visual_prior` at the response positions.
        entropy: ``[B, L]`` float — the policy's entropy at each response position (temperature-scaled).
        mask: ``[B, L]`` bool or 0/1.
        gate_alpha: α ≥ 0 (0.05).  temperature: T > 0 (1.8).
        progress: λ in [0, 1]: ``clamp((step − 1) / (total_steps − 1), 0, 1)`` (1 for a 1-step run).

    Returns:
        ``[B, L]`` float32, detached, ≥ 0 on valid tokens (> 0 unless the softmax underflows at a tiny T), 0 on
        padding; each row's valid weights sum to n_i (mean 1), for every λ. An empty row is all zeros (the fork
        raises).
    """
    check_token_tensor(prior, "prior")
    check_token_tensor(entropy, "entropy")
    if entropy.shape != prior.shape:
        raise ValueError(f"entropy has shape {tuple(entropy.shape)}, expected prior's {tuple(prior.shape)}")
    valid = check_mask(mask, prior.shape)
    _check_real("gate_alpha", gate_alpha, gate_alpha >= 0, "a finite float ≥ 0")
    _check_real("temperature", temperature, temperature > 0, "a finite float > 0")
    _check_real("progress", progress, 0.0 <= progress <= 1.0, "in [0, 1]")
    check_finite_where(prior, valid, "prior")
    check_finite_where(entropy, valid, "entropy")
    v = torch.where(valid, prior.detach().float(), torch.zeros((), device=prior.device))
    mixed = minmax_by_response(prior.float(), valid) + minmax_by_response(entropy.float(), valid)
    n = valid.sum(dim=1, keepdim=True).float()
    centred = mixed - mixed.sum(dim=1, keepdim=True) / n.clamp(min=1)
    gate = 1.0 + gate_alpha * torch.tanh(centred)
    logits = torch.where(valid, v * gate / temperature, torch.full_like(v, -math.inf))
    weights = torch.softmax(logits, dim=1).nan_to_num(0.0) * n  # empty rows: softmax of all -inf is NaN -> 0
    scheduled = 1.0 + progress * (weights - 1.0)
    return torch.where(valid, scheduled, torch.zeros_like(scheduled))


# VGPO (§9.9): visual focus from the last hidden state, compensated, re-weighted within and across responses
# --------------------------------------------------------------------------------------------------------------------

# The clamps of the two factors in the released code (dp_actor.py `torch.clamp(..., min=0.1, max=2.0)`,
# core_algos.py `compute_trajectory_visual_weighting(clamp_min=0.9, clamp_max=2.0)`); the paper has none.
VGPO_TOKEN_FACTOR_RANGE = (0.1, 2.0)
VGPO_RESPONSE_FACTOR_RANGE = (0.9, 2.0)
# Every min-max and the position schedule of the released code add 1e-8 to the range (not a clamp).
_VGPO_EPS = 1e-8


def vgpo_visual_focus(hidden: Tensor, visual_mask: Tensor, positions: slice | None = None) -> Tensor:
    """VGPO's visual focus score (§9.9, Eq. 4 before the offset): ``S_t = cos(h_t, mean_j h_j)``.

    ``h`` is the last hidden state (after the final norm) and ``j`` runs over the row's visual placeholder tokens:
    the cosine to the *mean hidden state* of the image tokens (the visual prototype), not PEPO's mean of cosines.

    Args:
        hidden: ``[B, T, H]`` the last hidden state of every position (any float dtype; computed in float32).
        visual_mask: ``[B, T]`` bool or 0/1 — True on the row's image/video placeholder tokens.
        positions: the positions to score (``slice(P, P + L)``: the response tokens' own positions); all if None.
            Only these and the visual tokens are cast to float32.

    Returns:
        ``[B, T']`` float32 focus at ``positions``, detached; ``torch.nn.functional.cosine_similarity`` semantics
        (eps 1e-8 on the product of the norms).

    Raises:
        ValueError: shape mismatches, a row without visual tokens (named), or NaN/inf hidden states.
    """
    if not isinstance(hidden, Tensor) or hidden.dim() != 3 or not hidden.is_floating_point():
        shape = tuple(hidden.shape) if isinstance(hidden, Tensor) else type(hidden).__name__
        raise ValueError(f"hidden must be a floating [B, T, H] tensor, got {shape}")
    visual = check_mask(visual_mask, hidden.shape[:2], "visual_mask")
    empty = (~visual.any(dim=1)).nonzero().flatten().tolist()
    if empty:
        raise ValueError(f"rows {empty} have no visual token: VGPO's focus needs the image placeholder tokens")
    h = hidden.detach()
    prototype = torch.stack([h[b, visual[b]].float().mean(dim=0) for b in range(h.shape[0])])  # [B, H]
    tokens = h[:, positions if positions is not None else slice(None)].float()
    focus = F.cosine_similarity(tokens, prototype[:, None, :].expand_as(tokens), dim=-1, eps=_VGPO_EPS)
    if not bool(torch.isfinite(focus).all()):
        raise ValueError("hidden contains NaN or inf: VGPO's focus is not finite")
    return focus


def vgpo_compensated_scores(
    focus: Tensor, mask: Tensor, *, offset: float | Tensor = 0.0, strength: float = 0.3, gate_start: float = 0.5,
    gate_top: float = 0.2, gated: bool = True,
) -> tuple[Tensor, Tensor]:  # fmt: skip
    """VGPO's compensated scores (§9.9, Eqs. 4-6): ``w_t = ρ_t · (1 + G_t · β · t̃)``, ``ρ_t = S_t − m``.

    ``t̃ = (t − t_first) / (t_last − t_first + 1e-8) / (1 + 1e-8)`` is the token's column between the row's first
    and last valid column (``t / (T − 1)`` for a response mask that is a prefix). The gate ``G_t`` is 1 on the tokens
    of the tail ``[⌊n·gate_start⌋, n)`` (by rank among the row's n valid tokens) whose ρ is at least the
    ``max(1, ⌊n_tail·κ⌋)``-th largest ρ of that tail (ties included), 0 elsewhere; ``gated=False``: ``G ≡ 1``.

    Args:
        focus: ``[B, L]`` float — `vgpo_visual_focus` at the response tokens.  mask: ``[B, L]`` bool or 0/1.
        offset: m, a float or a 0-dim tensor. The released code min-max normalises the focus over its micro-batch,
            padding (cosine 0) included, which for everything downstream equals ``m = min(0, smallest focus)``; the
            paper's Eq. 4 ``(S + 1)/2`` equals ``m = −1`` (a positive scale changes nothing downstream).
        strength: β ≥ 0 (0.3).  gate_start: in [0, 1), where the tail starts (0.5; the released
            ``gated_visual_compensation_start_ratio``).  gate_top: κ in (0, 1] (0.2).

    Returns:
        (``w`` ``[B, L]`` float32, 0 on padding, detached; ``gate`` ``[B, L]`` bool, False on padding).
    """
    check_token_tensor(focus, "focus")
    valid = check_mask(mask, focus.shape)
    check_finite_where(focus, valid, "focus")
    _check_real("strength", strength, strength >= 0, "a finite float ≥ 0")
    _check_real("gate_start", gate_start, 0 <= gate_start < 1, "in [0, 1)")
    _check_real("gate_top", gate_top, 0 < gate_top <= 1, "in (0, 1]")
    zero = torch.zeros((), dtype=torch.float32, device=focus.device)
    offset = torch.as_tensor(offset, dtype=torch.float32, device=focus.device)
    rho = torch.where(valid, focus.detach().float() - offset, zero)
    B, L = rho.shape
    cols = torch.arange(L, device=rho.device, dtype=torch.float32).expand(B, L)
    first = torch.where(valid, cols, torch.full_like(cols, math.inf)).amin(dim=1, keepdim=True)
    last = torch.where(valid, cols, torch.full_like(cols, -math.inf)).amax(dim=1, keepdim=True)
    span = torch.where(valid.any(dim=1, keepdim=True), last - first, torch.zeros_like(last)) + _VGPO_EPS
    schedule = strength * (((cols - first) / span) / (1.0 + _VGPO_EPS))
    if gated:
        n = valid.sum(dim=1, keepdim=True)
        rank = valid.long().cumsum(dim=1) - 1  # the token's index among the row's valid tokens
        start = torch.floor(n.double() * gate_start).long()
        tail = valid & (rank >= start)
        n_tail = tail.sum(dim=1, keepdim=True)
        k = torch.floor(n_tail.double() * gate_top).long().clamp(min=1)
        ranked = torch.where(tail, rho, torch.full_like(rho, -math.inf)).sort(dim=1, descending=True).values
        threshold = ranked.gather(1, (k - 1).clamp(max=L - 1))
        gate = tail & (rho >= threshold) & (n_tail > 0)
    else:
        gate = valid
    w = rho * (1.0 + gate.float() * schedule)
    return torch.where(valid, w, zero), gate


def vgpo_token_factors(scores: Tensor, mask: Tensor) -> tuple[Tensor, Tensor]:
    """VGPO's token factor (§9.9, Eqs. 7-8): ``ψ_t = clamp(1 + ŵ_t − mean_i ŵ, 0.1, 2)``.

    ``ŵ = (w − min_i) / (max_i − min_i + 1e-8)`` over each row's valid tokens (the released code's min-max, 1e-8
    added to the range); the clamp is the released code's (``VGPO_TOKEN_FACTOR_RANGE``).

    Args:
        scores: ``[B, L]`` float — `vgpo_compensated_scores` (or the uncompensated ρ).  mask: ``[B, L]`` bool or 0/1.

    Returns:
        (``ψ`` ``[B, L]`` float32, 1 on padding; ``ŵ`` ``[B, L]`` float32 in [0, 1], 0 on padding); both detached.
        A row whose scores are all equal has ŵ ≡ 0 and ψ ≡ 1.
    """
    check_token_tensor(scores, "scores")
    valid = check_mask(mask, scores.shape)
    check_finite_where(scores, valid, "scores")
    w = torch.where(valid, scores.detach().float(), torch.zeros((), device=scores.device))
    lo = torch.where(valid, w, torch.full_like(w, math.inf)).amin(dim=1, keepdim=True)
    hi = torch.where(valid, w, torch.full_like(w, -math.inf)).amax(dim=1, keepdim=True)
    has = valid.any(dim=1, keepdim=True)
    lo, hi = torch.where(has, lo, torch.zeros_like(lo)), torch.where(has, hi, torch.zeros_like(hi))
    w_hat = torch.where(valid, (w - lo) / (hi - lo + _VGPO_EPS), torch.zeros_like(w))
    mean = w_hat.sum(dim=1, keepdim=True) / valid.sum(dim=1, keepdim=True).clamp(min=1)
    psi = (1.0 + w_hat - mean).clamp(*VGPO_TOKEN_FACTOR_RANGE)
    return torch.where(valid, psi, torch.ones_like(psi)), w_hat


def vgpo_response_factors(traj_score: Tensor, group: Tensor) -> Tensor:
    """VGPO's response factor (§9.9, Eqs. 10-11): ``α_i = clamp(1 + ŝ_i − mean_g ŝ, 0.9, 2)``.

    ``ŝ_i = (s_i − min_g) / (max_g − min_g + 1e-8)`` over the responses of i's group g (the responses to the same
    prompt: pass the whole rollout batch, gathered from every rank); the clamp is the released code's
    (``VGPO_RESPONSE_FACTOR_RANGE``). A group of one response gets α = 1.

    Args:
        traj_score: ``[B]`` float — each response's visual accumulation ϕ_i (``ŵ.sum(1)`` in the released code).
        group: ``[B]`` integer — the group (prompt) of each response, any ids, in any order.

    Returns:
        ``[B]`` float32 α in [0.9, 2], detached.
    """
    if not isinstance(traj_score, Tensor) or traj_score.dim() != 1 or not traj_score.is_floating_point():
        shape = tuple(traj_score.shape) if isinstance(traj_score, Tensor) else type(traj_score).__name__
        raise ValueError(f"traj_score must be a float tensor of shape [B] (one ϕ_i per response), got {shape}")
    if not isinstance(group, Tensor) or tuple(group.shape) != tuple(traj_score.shape) or group.is_floating_point():
        shape = tuple(group.shape) if isinstance(group, Tensor) else type(group).__name__
        raise ValueError(f"group must be an integer tensor of shape {tuple(traj_score.shape)}, got {shape}")
    check_finite_where(traj_score, torch.ones_like(traj_score, dtype=torch.bool), "traj_score")
    s = traj_score.detach().float()
    if s.numel() == 0:
        return s.clone()
    _, index = torch.unique(group, return_inverse=True)
    n_groups = int(index.max()) + 1
    lo = torch.full((n_groups,), math.inf, device=s.device).scatter_reduce(0, index, s, "amin")
    hi = torch.full((n_groups,), -math.inf, device=s.device).scatter_reduce(0, index, s, "amax")
    s_hat = (s - lo[index]) / (hi[index] - lo[index] + _VGPO_EPS)
    total = torch.zeros(n_groups, device=s.device).index_add(0, index, s_hat)
    size = torch.zeros(n_groups, device=s.device).index_add(0, index, torch.ones_like(s_hat))
    return (1.0 + s_hat - (total / size)[index]).clamp(*VGPO_RESPONSE_FACTOR_RANGE)


# --------------------------------------------------------------------------------------------------------------------
# Perceval (§9.14): token penalties on the spans a perception process reward model flags
# --------------------------------------------------------------------------------------------------------------------


def flagged_token_spans(
    text: str, substrings: Sequence[str], offsets: Sequence[tuple[int, int]]
) -> list[tuple[int, int]]:
    """Token spans ``[start, end)`` of the substrings a perception PRM flagged in a response (§9.14).

    Each substring is located at its **first** occurrence in ``text`` (``str.find``), characters ``[c0, c1)``, and
    mapped to tokens through ``offsets`` (the tokenizer's ``offset_mapping`` of ``text``, one ``(char_start,
    char_end)`` per token, ``add_special_tokens=False``), as Perceval's official `SerialTokenPositionFinder` does:
    ``start`` is the first token with ``s ≤ c0 < e``; scanning the tokens in order, ``end`` is ``i + 1`` at the first
    token with ``s < c1 ≤ e`` or ``i`` at the first with ``s == c1`` (the scan stops there); a start not found is the
    first token with ``s ≥ c0`` (else the token count), an end not found the first with ``s ≥ c1`` (else the count).
    A substring that does not occur, or whose span would end before it starts, is dropped (the official code drops
    both: status ``not_found`` / ``error``).

    Args:
        text: the response text the PRM read (decoded without special tokens).
        substrings: the PRM's flagged sub-sentences, in its order.
        offsets: ``[(char_start, char_end)]`` per token of ``text``.

    Returns:
        ``[(start, end)]``, one per substring found, in the order given (duplicates kept).
    """
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if isinstance(substrings, str) or not all(isinstance(x, str) for x in substrings):
        raise ValueError("substrings must be a sequence of str (the PRM's flagged sub-sentences)")
    n = len(offsets)
    spans = []
    for sub in substrings:
        c0 = text.find(sub)
        if c0 < 0:
            continue
        c1 = c0 + len(sub)
        start = end = None
        for i, (s, e) in enumerate(offsets):
            if start is None and s <= c0 < e:
                start = i
            if s < c1 <= e or s == c1:
                end = i + 1 if s < c1 else i
                break
        if start is None:
            start = next((i for i, (s, _) in enumerate(offsets) if s >= c0), n)
        if end is None:
            end = next((i for i, (s, _) in enumerate(offsets) if s >= c1), n)
        if start <= end:
            spans.append((start, end))
    return spans


def perceval_penalty_mask(
    spans: Sequence[Sequence[tuple[int, int]]], length: int, *, device: torch.device | str | None = None
) -> Tensor:
    """``[B, L]`` bool: ``m[i, t]`` is True iff ``start ≤ t < end`` for one of response i's flagged token spans
    (§9.14; the official ``create_penalty_mask_vectorized``). A span starting at or after ``L`` marks nothing, one
    ending after it is cut at ``L``, an empty one (``end ≤ start``) marks nothing.

    Args:
        spans: per response, its ``[(start, end)]`` token spans (`flagged_token_spans`), ``start ≥ 0``.
        length: ``L``, the padded response length of the batch.
        device: where the mask is made.

    Returns:
        ``[B, L]`` bool (padding positions may be marked; `perceval_token_advantages` zeroes them).
    """
    if isinstance(length, bool) or not isinstance(length, int) or length < 0:
        raise ValueError(f"length must be an int ≥ 0, got {length!r}")
    out = torch.zeros(len(spans), length, dtype=torch.bool)
    for i, row in enumerate(spans):
        for span in row:
            start, end = (int(x) for x in span)
            if start < 0:
                raise ValueError(f"spans[{i}] has the span {tuple(span)}: token positions must be ≥ 0")
            if start < length and end > start:
                out[i, start : min(end, length)] = True
    return out.to(device) if device is not None else out


def _check_perceval(
    advantages: Tensor, flagged: Tensor, mask: Tensor, penalty: float, high: float
) -> tuple[Tensor, Tensor]:
    if not isinstance(advantages, Tensor) or advantages.dim() != 1 or not advantages.is_floating_point():
        shape = tuple(advantages.shape) if isinstance(advantages, Tensor) else type(advantages).__name__
        raise ValueError(f"advantages must be a float tensor of shape [B] (one A_i per response), got {shape}")
    if not isinstance(mask, Tensor) or mask.dim() != 2 or mask.shape[0] != advantages.shape[0]:
        raise ValueError(
            f"mask must be a [B, L] tensor with B = {advantages.shape[0]}, got "
            f"{getattr(mask, 'shape', type(mask).__name__)}"
        )
    valid = check_mask(mask, tuple(mask.shape))
    m = check_mask(flagged, valid.shape, "flagged")
    _check_real("penalty", penalty, 0.0 <= penalty <= high, f"a finite float in [0, {high:g}]")
    if not bool(torch.isfinite(advantages).all()):
        raise ValueError("advantages contain NaN or inf")
    return valid, m


def perceval_token_advantages(advantages: Tensor, flagged: Tensor, mask: Tensor, *, penalty: float = 0.1) -> Tensor:
    """Perceval's token advantages (§9.14, the paper's Eq. 3): ``Â'_{i,t} = Â_i − α·m_{i,t}·|Â_i|``.

    Flagged tokens of a response with ``Â_i > 0`` get ``(1 − α)·Â_i``, of one with ``Â_i < 0`` get ``(1 + α)·Â_i``;
    every other valid token keeps ``Â_i``.

    Args:
        advantages: ``[B]`` float — the GRPO group advantage of each response.
        flagged: ``[B, L]`` bool or 0/1 — `perceval_penalty_mask`.
        mask: ``[B, L]`` bool or 0/1.
        penalty: α ≥ 0 (published 0.1).

    Returns:
        ``[B, L]`` float32 (float64 for float64 advantages), 0 on padding.
    """
    valid, m = _check_perceval(advantages, flagged, mask, penalty, math.inf)
    dtype = torch.float64 if advantages.dtype == torch.float64 else torch.float32
    a = torch.where(valid, advantages.detach().to(dtype)[:, None], torch.zeros((), dtype=dtype, device=valid.device))
    return torch.where(m, a - penalty * a.abs(), a)


def perceval_token_weights(advantages: Tensor, flagged: Tensor, mask: Tensor, *, penalty: float = 0.1) -> Tensor:
    """Perceval's Eq. 3 as token weights on the group advantage: ``w_{i,t} = 1 − α·m_{i,t}·sign(Â_i)``, so that
    ``Â_i·w_{i,t}`` is `perceval_token_advantages`. With ``α ≤ 1`` every weight is ≥ 0, and a weight multiplying the
    clipped term ``ℓ(Â_i)`` equals the clipped term of ``Â_i·w`` (ℓ is positively homogeneous in A, §9).

    Args:
        advantages: ``[B]`` float.  flagged: ``[B, L]`` bool or 0/1.  mask: ``[B, L]`` bool or 0/1.
        penalty: α in [0, 1] (published 0.1).

    Returns:
        ``[B, L]`` float32: ``1 − α`` on the flagged tokens of a response with ``Â_i > 0``, ``1 + α`` with ``Â_i < 0``,
        1 on every other valid token (and on every token of a response with ``Â_i = 0``), 0 on padding.
    """
    valid, m = _check_perceval(advantages, flagged, mask, penalty, 1.0)
    sign = torch.sign(advantages.detach().float())[:, None].expand(valid.shape)
    w = torch.where(m, 1.0 - penalty * sign, torch.ones_like(sign))
    return torch.where(valid, w, torch.zeros_like(w))


def dyco_response_scores(
    image_ratio: Tensor, text_ratio: Tensor, fr_image: Tensor, fr_text: Tensor, valid: Tensor, *, tau: float = 0.05
) -> dict[str, Tensor]:
    """DyCo-RL's per-response alignment score from its attention signals (ALGORITHMS.md §9.13, Eq. 6-9).

    image_ratio, text_ratio, fr_image, fr_text: [B, L] (`vppo_core.dyco_attention_signals`, step t aligned with the
    response token it predicts). valid: [B, L] the steps that count (bool or 0/1; the official code counts every
    decoding step, vppo the response's own tokens after the first). tau >= 0: the margin of a text-role token.

    Relative ratios ``r̃^vis = r^vis / max(r^vis + r^txt, 1e-8)``, ``r̃^txt`` alike; roles from the distances
    ``d_t = FR^img_t − FR^txt_t``: perception (``d_t > 0``), reasoning (``d_t < −tau``), else neutral; the token
    score ``s_t = r̃^vis·[perception] + r̃^txt·[reasoning]``; the response's score ``σ(mean of s_t over its
    perception and reasoning tokens)``, 0.5 when it has none.

    Returns {"score": [B] float64 in (0, 1), "perception": [B, L] bool, "reasoning": [B, L] bool}.
    """
    check_token_tensor(image_ratio, "image_ratio")
    mask = check_mask(valid, image_ratio.shape, "valid")
    for name, x in (("text_ratio", text_ratio), ("fr_image", fr_image), ("fr_text", fr_text)):
        if not isinstance(x, Tensor) or x.shape != image_ratio.shape:
            raise ValueError(f"{name} must have the shape of image_ratio {tuple(image_ratio.shape)}")
    _check_real("tau", tau, tau >= 0, ">= 0")
    # float64: a group's scores can lie within 1e-4 of each other, where float32 rounding (1e-7) would move the
    # z-score of `dyco_advantage_weights` by 1e-3
    total = (image_ratio.double() + text_ratio.double()).clamp(min=1e-8)
    r_vis, r_txt = image_ratio.double() / total, text_ratio.double() / total
    d = fr_image.double() - fr_text.double()
    perception, reasoning = mask & (d > 0), mask & (d < -tau)
    s = r_vis * perception + r_txt * reasoning
    active = perception | reasoning
    n = active.sum(1)
    mean = (s * active).sum(1) / n.clamp(min=1)
    score = torch.where(n > 0, torch.sigmoid(mean), torch.full_like(mean, 0.5))
    return {"score": score, "perception": perception, "reasoning": reasoning}


def dyco_advantage_weights(
    score: Tensor, group: Tensor, length: Tensor, *, min_length: int = 150, alpha: float = 0.2,
    low: float = 0.8, high: float = 1.2,
) -> dict[str, Tensor]:  # fmt: skip
    """DyCo-RL's advantage factor of each response (ALGORITHMS.md §9.13).

    score: [B] the responses' alignment scores (`dyco_response_scores`). group: [B] integer ids, the responses of
    one prompt share one. length: [B] response lengths in tokens.

    Within each group, ``z = tanh((score − mean) / std)`` (unbiased std; 0 for the whole group when its std is not
    above 1e-8, or it has one response); then ``z = −1`` where ``length < min_length``; the factor
    ``w = clamp(1 + alpha·z, low, high)``, which multiplies the response's advantage.

    Returns {"weight": [B] float32, "z": [B] float32}.
    """
    if not isinstance(score, Tensor) or score.dim() != 1 or not score.is_floating_point():
        raise ValueError(f"score must be a float tensor [B], got {getattr(score, 'shape', type(score))}")
    if tuple(group.shape) != tuple(score.shape) or tuple(length.shape) != tuple(score.shape):
        raise ValueError(f"group and length must be [B] = {tuple(score.shape)}")
    _check_real("alpha", alpha, alpha >= 0, ">= 0")
    _check_real("low", low, low <= high, "<= high")
    x = score.double()  # float64 statistics (see dyco_response_scores)
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)
    k = counts.numel()
    mean = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inverse, x) / counts
    sq = torch.zeros(k, dtype=x.dtype, device=x.device).index_add_(0, inverse, (x - mean[inverse]) ** 2)
    std = (sq / (counts - 1).clamp(min=1)).sqrt()
    spread = (counts > 1) & (std > 1e-8)
    z = torch.tanh((x - mean[inverse]) / std[inverse].clamp(min=1e-30))
    z = torch.where(spread[inverse], z, torch.zeros_like(x))
    z = torch.where(length.to(x.device) < min_length, torch.full_like(z, -1.0), z)
    return {"weight": (1.0 + alpha * z).clamp(low, high).float(), "z": z.float()}
