"""VPPO Token-level Gradient Filtering (TGF) — ALGORITHMS.md §4."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from vppo_core.validation import check_finite_where, check_mask, check_token_tensor

__all__ = ["policy_gradient_share", "tgf_mask"]

# ρ·n is computed in float64 and shrunk by this relative amount before the ceiling: ρ = 0.4 is stored as
# 0.40000000000000002, so 0.4 * 5 == 2.0000000000000004 and a bare ceil would give 3 instead of 2. The float
# error of ρ·n is ≤ 2.3e-16 relative; a genuine fractional part of ρ·n is ≥ 1/10^d for a ρ with d decimals,
# far above 1e-12·ρ·n for any response length, so no real ceiling is ever lost.
_CEIL_REL_TOL = 1e-12


def tgf_mask(S: Tensor, mask: Tensor, *, fraction: float = 0.4) -> Tensor:
    """Per response, mark the ``k_i = ceil(fraction · n_i)`` valid tokens with the largest dependency (§4).

    Args:
        S: ``[B, L]`` float — token visual dependency (any real values on valid positions; padding ignored).
        mask: ``[B, L]`` bool or 0/1 — 1 on real response tokens.
        fraction: ρ in (0, 1]; the paper's value is 0.4.

    Returns:
        ``[B, L]`` bool, True on selected tokens. Exactly ``ceil(ρ·n_i)`` per row, without float overshoot (a
        product within 1e-12 relative of an integer is that integer: ``ceil(0.4 · 5) = 2``, ``ceil(0.28 · 25) = 7``
        although ``0.28 * 25 == 7.000000000000001``), never a padding position, ties broken by position (earlier
        token first), so the result is deterministic. An empty row (``n_i = 0``) selects nothing.

    The mask multiplies the per-token policy-gradient term only; the loss keeps dividing by all valid tokens
    (`policy_loss` with ``token_weights=tgf_mask(...)``).
    """
    check_token_tensor(S, "S")
    valid = check_mask(mask, S.shape)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not math.isfinite(fraction):
        raise ValueError(f"fraction must be a float in (0, 1], got {fraction!r}")
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"fraction must be in (0, 1] (the share of each response's tokens kept), got {fraction!r}")
    check_finite_where(S, valid, "S")

    n = valid.sum(dim=1, dtype=torch.float64)
    k = torch.ceil(n * fraction * (1.0 - _CEIL_REL_TOL)).to(torch.long)  # [B]
    # Padding sorts last; a stable descending sort keeps equal scores in position order.
    keyed = torch.where(valid, S.to(torch.float64), torch.full_like(S, -math.inf, dtype=torch.float64))
    order = torch.sort(keyed, dim=1, descending=True, stable=True).indices  # [B, L]
    positions = torch.arange(S.shape[1], device=S.device).expand_as(order)
    rank = torch.empty_like(order).scatter_(1, order, positions)  # rank[b, j] = place of token j in row b
    return (rank < k[:, None]) & valid


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
