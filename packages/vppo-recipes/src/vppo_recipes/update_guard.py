"""The non-finite-update guard both recipes use: clip the gradients, then check what the optimizer would apply.

Checking only the norm `clip_grad_norm_` returns is not enough: that is the norm *before* clipping, while the clip
scales the gradients in place by `max_norm / norm`. A non-finite scale (`training.grad_clip=.nan` once passed
validation) then turns finite gradients into NaN behind a finite norm, and AdamW writes NaN into every weight. So
the guard measures the clipped gradients themselves (one more fused norm over them) and skips the step unless both
norms, and whatever else the caller needs finite (the RL loss), are finite.

Under FSDP2 the gradients are DTensor shards: both norms are reduced over the mesh (`full_tensor`), so every rank
gets the same global values and takes the same decision (a NaN in one rank's shard skips the step on all ranks).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch.distributed.tensor import DTensor

__all__ = ["clip_and_check_update"]


def _global(t: torch.Tensor) -> torch.Tensor:
    """A norm as a plain tensor holding the global value (a DTensor norm is partial per rank until reduced)."""
    return t.full_tensor() if isinstance(t, DTensor) else t


def clip_and_check_update(
    parameters: Iterable[torch.nn.Parameter], max_norm: float | None, *, also: Sequence[torch.Tensor] = ()
) -> tuple[list[float], bool]:
    """Clip the gradients of `parameters` in place to total 2-norm `max_norm` (None: no clipping) and say whether the
    update they make is finite. Collective under FSDP2 (call on every rank).

    also: 0-d tensors (e.g. the step's all-reduced loss) moved to the host in the same sync and required finite too.
    Returns ([norm before clipping, norm of the clipped gradients, *also] as floats, finite), the same on every
    rank; finite is False when any of them is NaN or ±inf: the caller must then skip the step (and zero the grads).
    One host sync.
    """
    params = [p for p in parameters if p.grad is not None]
    limit = math.inf if max_norm is None else float(max_norm)
    before = _global(torch.nn.utils.clip_grad_norm_(params, max_norm=limit))
    applied = _global(torch.nn.utils.get_total_norm([p.grad for p in params]))  # what optimizer.step() reads
    device = before.device
    values = torch.stack([before.double(), applied.double().to(device), *(a.double().to(device) for a in also)])
    host = values.tolist()
    return host, all(math.isfinite(v) for v in host)
