"""Collectives over the data-parallel ranks that the RL recipe and its methods share (gloo on CPU, NCCL on GPUs).

Each moves what a step reduces in as few host transfers as it can: a list of numbers in one all-reduce, a
variable-length tensor of every rank in two all-gathers.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


def all_reduce_list(values: list, op=dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a list of Python numbers and/or 0-dim tensors (float64, on CPU with gloo / on the GPU with NCCL);
    one host transfer for the whole list."""
    if not values:
        return []
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.stack(
        [
            v.detach().to(device=device, dtype=torch.float64).reshape(())
            if isinstance(v, torch.Tensor)
            else torch.tensor(float(v), dtype=torch.float64, device=device)
            for v in values
        ]
    )
    dist.all_reduce(t, op=op)
    return t.tolist()


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate an equal-length 1-D tensor from every rank, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def all_gather_var(t: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from every rank, in rank order (for exact global quantiles)."""
    return all_gather_var_with_offset(t)[0]


def all_gather_var_with_offset(t: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`all_gather_var`, and where this rank's `t` starts in the result: (gathered [sum of lengths], offset)."""
    n = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    lengths = [int(s.item()) for s in sizes]
    buf = torch.zeros(max(lengths), dtype=t.dtype, device=t.device)
    buf[: t.numel()] = t
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    offset = sum(lengths[: dist.get_rank()])
    return torch.cat([p[:length] for p, length in zip(parts, lengths)]), offset
