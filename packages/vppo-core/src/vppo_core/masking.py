"""Token selection: VPPO's Token-level Gradient Filtering (TGF, ALGORITHMS.md §4), the top-fraction sets of
ToR, CGPO and VEPO (§9) and CPPO's perception tokens (§9.11)."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vppo_core.validation import check_finite_where, check_mask, check_token_tensor

__all__ = ["SELECTION_SCOPES", "cppo_perception_mask", "policy_gradient_share", "tgf_mask", "top_fraction_mask"]

# ρ·n is computed in float64 and shrunk by this relative amount before the ceiling: ρ = 0.4 is stored as
# 0.40000000000000002, so 0.4 * 5 == 2.0000000000000004 and a bare ceil would give 3 instead of 2. The float
# error of ρ·n is ≤ 2.3e-16 relative; a genuine fractional part of ρ·n is ≥ 1/10^d for a ρ with d decimals,
# far above 1e-12·ρ·n for any response length, so no real ceiling is ever lost.
_CEIL_REL_TOL = 1e-12


SELECTION_SCOPES = ("response", "batch")


def _check_fraction(fraction: float) -> None:
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
        raise ValueError(f"fraction must be a float in (0, 1], got {fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1] (the share of tokens kept), got {fraction!r}")


def _ceil_fraction(n: Tensor, fraction: float) -> Tensor:
    return torch.ceil(n.to(torch.float64) * fraction * (1.0 - _CEIL_REL_TOL)).to(torch.long)


def top_fraction_mask(
    scores: Tensor, mask: Tensor, *, fraction: float, scope: str = "response", generator: torch.Generator | None = None
) -> Tensor:
    """Mark the valid tokens with the largest ``scores``: the top ``ceil(fraction · n)`` of each response, or of the
    whole batch (ALGORITHMS.md §4 and §9).

    ``scope="response"`` is VPPO's TGF (ρ = 0.4), VEPO's selection (0.2); ``scope="batch"`` is ToR's and CGPO's
    entropy and perception sets (0.3 of all response tokens of the rollout batch: pass the batch gathered from
    every rank, then take your rows).

    Args:
        scores: ``[B, L]`` float — any real values on valid positions; padding ignored (may hold NaN).
        mask: ``[B, L]`` bool or 0/1 — 1 on real response tokens.
        fraction: in (0, 1].
        scope: ``"response"`` (k_i = ceil(fraction · n_i) per row) | ``"batch"`` (k = ceil(fraction · Σ n_i)).
        generator: optional; ties are then broken in a random order drawn from it (one uniform key per entry), as
            the public re-implementation does for its batch-level sets. Without it, by position.

    Returns:
        ``[B, L]`` bool. Exactly k selected (per row or in all), never a padding position; without ``generator``
        ties are broken by position (row-major: earlier row, then earlier token first). ``ceil`` has no float
        overshoot (a product within 1e-12 relative of an integer is that integer: ``ceil(0.4 · 5) = 2``).
        Ties matter where many scores are equal: CGPO's dependency is exactly 0 on every token of a response that
        names no box, and by position the batch set would then be filled with the batch's first tokens.
    """
    check_token_tensor(scores, "scores")
    valid = check_mask(mask, scores.shape)
    _check_fraction(fraction)
    if scope not in SELECTION_SCOPES:
        raise ValueError(f"scope must be one of {SELECTION_SCOPES}, got {scope!r}")
    check_finite_where(scores, valid, "scores")
    # Padding sorts last; a stable descending sort keeps equal scores in position order.
    keyed = torch.where(valid, scores.to(torch.float64), torch.full_like(scores, -math.inf, dtype=torch.float64))
    if scope == "batch":
        keyed, counts = keyed.reshape(1, -1), valid.sum().reshape(1)
    else:
        counts = valid.sum(dim=1)
    k = _ceil_fraction(counts, fraction)  # [rows]
    if generator is None:
        order = torch.sort(keyed, dim=1, descending=True, stable=True).indices
    else:  # two stable sorts: by a random key, then by score; equal scores keep the random order
        shuffle = torch.rand(keyed.shape, generator=generator, device=generator.device).to(keyed.device)
        by_key = shuffle.argsort(dim=1, stable=True)
        order = by_key.gather(1, torch.sort(keyed.gather(1, by_key), dim=1, descending=True, stable=True).indices)
    positions = torch.arange(keyed.shape[1], device=scores.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[r, j] = place of entry j in row r
    return (rank < k[:, None]).reshape(scores.shape) & valid


def tgf_mask(S: Tensor, mask: Tensor, *, fraction: float = 0.4) -> Tensor:
    """Per response, mark the ``k_i = ceil(fraction · n_i)`` valid tokens with the largest dependency (§4).

    Args:
        S: ``[B, L]`` float — token visual dependency (any real values on valid positions; padding ignored).
        mask: ``[B, L]`` bool or 0/1 — 1 on real response tokens.
        fraction: ρ in (0, 1]; the paper's value is 0.4.

    Returns:
        ``[B, L]`` bool, True on selected tokens: `top_fraction_mask` with ``scope="response"`` (exactly
        ``ceil(ρ·n_i)`` per row, ties broken by position, an empty row selects nothing).

    The mask multiplies the per-token policy-gradient term only; the loss keeps dividing by all valid tokens
    (`policy_loss` with ``token_weights=tgf_mask(...)``).
    """
    check_token_tensor(S, "S")
    check_finite_where(S, check_mask(mask, S.shape), "S")  # name the caller's argument in the message
    return top_fraction_mask(S, mask, fraction=fraction, scope="response")


def policy_gradient_share(
    advantages: Tensor, lp_old: Tensor, S: Tensor, mask: Tensor, *, fraction: float = 0.4
) -> Tensor:
    """How much of a uniform-credit policy gradient lands on each response's most visually dependent tokens.

    A diagnostic (the CPU demo logs it for every algorithm): per valid token ``g_t = |A_i| · (1 − π_old(y_t))``,
    the norm of ``d(A_i · log π(y_t)) / d(logits_t)`` up to a factor in ``[1, √2]`` (the logit gradient is
    ``A_i · (onehot(y_t) − π_t)``, whose norm is ``|A_i|·sqrt((1 − π(y_t))² + Σ_{v≠y_t} π(v)²)``). "Most dependent"
    is ``tgf_mask(S, mask, fraction=fraction)``. DAPO / GRPO put ``on_top / total`` of their update there; VPPO's
    TGF keeps exactly that share and zeroes the rest.

    Args:
        advantages: ``[B]`` float — each response's (shaped) advantage.
        lp_old: ``[B, L]`` float — log π_old of the sampled tokens.
        S: ``[B, L]`` float — token visual dependency. mask: ``[B, L]`` bool or 0/1 — 1 on real response tokens.
        fraction: ρ in (0, 1], as in `tgf_mask`.

    Returns:
        ``[2]`` float64 ``(Σ_top g, Σ g)``: sums, so shards can be added before dividing.
    """
    check_token_tensor(lp_old, "lp_old")
    valid = check_mask(mask, lp_old.shape)
    if advantages.shape != lp_old.shape[:1]:
        raise ValueError(f"advantages has shape {tuple(advantages.shape)}, expected [B]=({lp_old.shape[0]},)")
    top = tgf_mask(S, mask, fraction=fraction)
    g = advantages.to(torch.float64).abs()[:, None] * (1.0 - lp_old.to(torch.float64).exp())
    g = torch.where(valid, g, torch.zeros_like(g))
    return torch.stack([(g * top).sum(), g.sum()])


def cppo_perception_mask(
    entropy: Tensor, entropy_alt: Tensor, mask: Tensor, *, fraction: float = 0.5, eps: float = 1e-6
) -> Tensor:
    """CPPO's perception tokens (ALGORITHMS.md §9.11): per response, the tokens whose entropy rises most, relative
    to the altered view's entropy, when the image loses its information.

    With ``Δ_t = H_alt,t − H_t`` and ``r_t = max(Δ_t, 0) / (H_alt,t + eps)``: among the valid tokens with Δ > 0
    (``n⁺_i`` of them), ``k_i = max(1, floor(fraction · n⁺_i))`` (the product in float32, as the official code),
    and a token is kept iff Δ > 0 and ``r_t ≥`` the k-th largest r of its response. Ties at the threshold are all
    kept (so more than k_i may be); a response without a positive Δ keeps nothing.

    Args:
        entropy: ``[B, L]`` float — the analytic entropy of the policy on the clean image.
        entropy_alt: ``[B, L]`` float — the same under the information-removing view (CPPO's negative view).
        mask: ``[B, L]`` bool or 0/1 — 1 on real response tokens.
        fraction: in (0, 1] (the published 0.5).
        eps: added to ``H_alt`` in the denominator (1e-6 in the official code).

    Returns:
        ``[B, L]`` bool, never a padding position.
    """
    check_token_tensor(entropy, "entropy")
    check_token_tensor(entropy_alt, "entropy_alt")
    if entropy_alt.shape != entropy.shape:
        raise ValueError(f"entropy_alt has shape {tuple(entropy_alt.shape)}, expected {tuple(entropy.shape)}")
    valid = check_mask(mask, entropy.shape)
    _check_fraction(fraction)
    if not (isinstance(eps, (int, float)) and eps >= 0):
        raise ValueError(f"eps must be a number >= 0, got {eps!r}")
    check_finite_where(entropy, valid, "entropy")
    check_finite_where(entropy_alt, valid, "entropy_alt")
    delta = entropy_alt - entropy
    positive = (delta > 0) & valid
    ratio = torch.relu(delta) / (entropy_alt + eps)
    keyed = torch.where(positive, ratio, torch.full_like(ratio, -math.inf))
    ordered = torch.sort(keyed, dim=1, descending=True).values
    k = (positive.sum(dim=1).to(torch.float32) * float(fraction)).clamp(min=1).to(torch.long)
    threshold = ordered.gather(1, (k - 1)[:, None])  # -inf for a response without a positive Δ
    return positive & (ratio >= threshold)
