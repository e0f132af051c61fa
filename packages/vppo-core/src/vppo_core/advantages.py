"""Group-relative advantages and the online (dynamic-sampling) filter — ALGORITHMS.md §2.

Responses are laid out group by group: the ``group_size`` responses of prompt 0, then those of prompt 1, ...
(the order `vppo_rollout.Rollouts` uses), so group ``g`` is ``rewards[g * G:(g + 1) * G]``.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["group_advantages", "keep_groups"]


def _grouped(values: Tensor, group_size: int, name: str) -> Tensor:
    """Check a per-response vector and view it as ``[B // G, G]``."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B], got {type(values).__name__}")
    if values.dim() != 1:
        raise ValueError(f"{name} must have shape [B] (one value per response), got shape {tuple(values.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if values.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the number of responses in {name} ({values.numel()}); "
            "pass all G responses of every prompt, grouped prompt by prompt"
        )
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf; fix the reward function or filter those responses first")
    return values.reshape(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantage, ``A_i = (R_i − mean_g R) / (std_g R + eps)`` with the unbiased (n−1) std (§2).

    Args:
        rewards: ``[B]`` float (or int/bool) — one scalar reward per response, grouped prompt by prompt.
        group_size: G, the number of responses per prompt; must divide B and be ≥ 2 (the unbiased std of one
            sample is undefined).
        eps: added to the std; must be > 0.

    Returns:
        ``[B]`` advantages, float32 (float64 if ``rewards`` is float64).

    A group whose rewards are all identical gets advantage exactly 0 (not ``rounding_error / eps``): such a group
    carries no learning signal, and the online filter (`keep_groups`) usually drops it anyway.
    """
    grouped = _grouped(rewards, group_size, "rewards")
    if group_size < 2:
        raise ValueError("group_size must be ≥ 2: GRPO's unbiased std needs at least two responses per prompt")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    grouped = grouped.to(dtype)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    adv = (grouped - mean) / (std + eps)
    # mean() of identical floats can differ from them by one ulp; dividing that by eps would invent a signal.
    identical = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    adv = torch.where(identical, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def keep_groups(accuracy: Tensor, group_size: int, low: float = 0.01, high: float = 0.99) -> Tensor:
    """DAPO dynamic-sampling filter: keep a group iff ``low < mean_g(accuracy) < high`` (strict), §2.

    Args:
        accuracy: ``[B]`` float/int/bool — per-response accuracy (usually 0/1), grouped prompt by prompt.
        group_size: G; must divide B.
        low, high: the open interval the group mean must fall in; ``low < high``.

    Returns:
        ``[B // G]`` bool — True for the groups to keep. ``keep.repeat_interleave(G)`` gives the per-response mask.
    """
    grouped = _grouped(accuracy, group_size, "accuracy")
    if not low < high:
        raise ValueError(f"low must be < high, got low={low!r}, high={high!r}")
    mean = grouped.to(torch.float64).mean(dim=1)
    return (mean > low) & (mean < high)
