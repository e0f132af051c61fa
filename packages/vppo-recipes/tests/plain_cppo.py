"""CPPO's auxiliary term (ALGORITHMS.md §9.11) the plain way, for the whole-step test: written from the formula with
loops and torch ops, not with vppo-core's `cppo_perception_mask` / `cppo_contrastive_loss`."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _k3(new: torch.Tensor, view: torch.Tensor) -> torch.Tensor:
    """verl's low_var_kl of the sampled token: x = clamp(view − new, ±20), clamp(e^x − x − 1, ±10)."""
    x = (view - new).clamp(-20, 20)
    return (torch.exp(x) - x - 1).clamp(-10, 10)


def plain_perception_tokens(H, H_alt, mask, advantages, *, fraction: float, use_mask: bool, gating: bool):
    """[B, L] bool: per response with a positive advantage (when gating), among its valid tokens whose entropy rises
    (Δ = H_alt − H > 0), those whose Δ / (H_alt + 1e-6) is at least the k-th largest, k = max(1, floor(fraction·n⁺))."""
    B, L = mask.shape
    chosen = torch.zeros(B, L, dtype=torch.bool)
    for b in range(B):
        if gating and not advantages[b] > 0:
            continue
        valid = [t for t in range(L) if mask[b, t] > 0]
        if not use_mask:
            chosen[b, valid] = True
            continue
        rising = [t for t in valid if float(H_alt[b, t]) > float(H[b, t])]
        if not rising:
            continue
        ratio = torch.relu(H_alt[b] - H[b]) / (H_alt[b] + 1e-6)  # float32, as the recipe's values
        k = max(1, int(len(rising) * fraction))
        threshold = sorted((float(ratio[t]) for t in rising), reverse=True)[k - 1]
        for t in rising:
            chosen[b, t] = float(ratio[t]) >= threshold
    return chosen


def plain_cppo_term(new, mini: list[dict], advantages, algorithm, aggregation: str) -> torch.Tensor:
    """The CPL per token of one global mini-batch, times the weights that make the loss's aggregation over all
    valid tokens the same aggregation over the chosen ones. new: [B, L] log-probs with gradient (rows of `mini`)."""
    width = new.shape[1]
    cat = lambda key: torch.cat([F.pad(mb[key], (0, width - mb[key].shape[1])) for mb in mini])  # noqa: E731
    mask = cat("mask")
    chosen = plain_perception_tokens(
        cat("entropy").float(), cat("entropy_alt").float(), mask, advantages, fraction=algorithm.cpl_top_fraction,
        use_mask=algorithm.cpl_perception_mask, gating=algorithm.cpl_advantage_gating,
    )  # fmt: skip
    negative, positive = cat("lp_alt").to(new.dtype), cat("lp_alt2").to(new.dtype)  # the method's views, in order
    cpl = F.softplus((_k3(new, positive) - _k3(new, negative)) / algorithm.cpl_tau)
    weights = chosen.to(new.dtype)
    if aggregation == "token-mean":  # a mean over the chosen tokens of the mini-batch
        n = weights.sum()
        weights = weights * (mask.sum() / n) if n > 0 else weights
    elif aggregation == "seq-mean-token-mean":  # each response's mean over its chosen tokens
        weights = weights * mask.sum(1, keepdim=True) / weights.sum(1, keepdim=True).clamp(min=1)
    return cpl * weights
