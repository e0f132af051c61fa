"""The learning-rate schedule both recipes use (ALGORITHMS.md §7: constant lr, optionally after a linear warmup)."""

from __future__ import annotations

import torch

__all__ = ["constant_with_warmup"]


def constant_with_warmup(optimizer: torch.optim.Optimizer, warmup_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """Constant lr after a linear warmup: factor (k + 1) / warmup_steps at optimizer step k < warmup_steps, then 1.

    The first step already trains at lr / warmup_steps (transformers' `get_constant_schedule_with_warmup` starts at
    lr 0, i.e. spends its first step doing nothing). `warmup_steps=0`: constant from the first step.
    """
    if warmup_steps < 0:
        raise ValueError(f"lr_scheduler.warmup_steps must be >= 0, got {warmup_steps}")

    def factor(opt_step: int) -> float:
        return 1.0 if warmup_steps == 0 else min(1.0, (opt_step + 1) / warmup_steps)

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
