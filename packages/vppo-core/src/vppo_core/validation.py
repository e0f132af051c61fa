"""Input checks every token-level function of vppo-core shares (a response mask is the one input they all take).

Each raises ValueError naming the argument and what was expected; none changes its input.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["check_finite_where", "check_mask", "check_token_tensor"]


def check_mask(mask: Tensor, shape: torch.Size | tuple[int, ...], name: str = "mask", *, values: bool = True) -> Tensor:
    """Return ``mask`` as bool after checking its shape and (``values=True``) that it only holds 0/1 (any dtype).

    ``values=False`` skips the one check that reads the data (a device-to-host sync on a GPU).
    """
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(mask).__name__}")
    if tuple(mask.shape) != tuple(shape):
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {tuple(shape)} (one entry per token)")
    if mask.dtype == torch.bool:
        return mask
    if values and not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 (1 on real response tokens, 0 on padding)")
    return mask != 0


def check_finite_where(x: Tensor, valid: Tensor, name: str) -> None:
    """ValueError if ``x`` holds NaN/inf on a valid position (padding may hold anything); names the first one."""
    bad = valid & ~torch.isfinite(x)
    if bool(bad.any()):
        raise ValueError(
            f"{name} contains NaN or inf on valid (mask == 1) positions: not finite at {int(bad.sum())} position(s), "
            f"first at {bad.nonzero()[0].tolist()}; positions where mask is 0 may hold anything"
        )


def check_token_tensor(x: Tensor, name: str) -> None:
    """``x`` must be a floating ``[B, L]`` tensor."""
    if not isinstance(x, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B, L], got {type(x).__name__}")
    if x.dim() != 2:
        raise ValueError(f"{name} must have shape [B, L], got shape {tuple(x.shape)}")
    if not x.is_floating_point():
        raise ValueError(f"{name} must be a floating-point tensor, got dtype {x.dtype}")
