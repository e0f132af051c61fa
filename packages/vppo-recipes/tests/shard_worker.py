"""torchrun worker for test_sharding.py: shard_policy under a real gloo process group vs a single-process model.

Each rank takes its own half of every batch (the data-parallel split); FSDP averages the gradients, which equals
the gradient of the full-batch mean. After STEPS AdamW steps, the loss of every step and the gathered full state
dict must equal a single-process reference trained on the full batches (fp32).

Prints one line per scenario, "SCENARIO <name> OK max_param_diff=<x> max_loss_diff=<y> units=<n>", then "ALL OK".
"""

from __future__ import annotations

import copy
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor

sys.path.insert(0, os.path.dirname(__file__))
from _tiny_models import build_tiny, chunked_nll, make_batch, rows

from vppo_recipes.sharding import call_in_root_forward, count_units, shard_policy

STEPS = 3
LR = 1e-3
# fp32, but each rank sums its own half of the batch and gloo sums the halves: the reduction order differs from
# the single-process reference, and Adam's m / sqrt(v) amplifies those ~1e-7 gradient differences on elements whose
# gradient is near zero. Tolerances: loss 1e-5 absolute; parameters 10 % of one Adam step (0.1 * LR); a missing or doubled gradient reduction moves them by ~LR.
LOSS_TOL = 1e-5
PARAM_TOL = 0.1 * LR


def run(name: str, arch: str, mesh_shape: tuple[int, ...], *, ac: bool, tie: bool = False) -> None:
    rank, world = dist.get_rank(), dist.get_world_size()
    model, patch = build_tiny(arch, tie=tie)
    reference = copy.deepcopy(model)
    names = ("replicate", "shard") if len(mesh_shape) == 2 else None
    mesh = init_device_mesh("cpu", mesh_shape, mesh_dim_names=names)
    shard_policy(model, mesh, activation_checkpointing=ac)
    assert all(isinstance(p, DTensor) for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=0.01)
    ref_opt = torch.optim.AdamW(reference.parameters(), lr=LR, weight_decay=0.01)
    per = 4 // world
    max_loss_diff = 0.0
    for step in range(STEPS):
        batch = make_batch(patch, seed=step, bsz=4)
        mine = rows(batch, rank * per, (rank + 1) * per, patch_rows_per_item=16)
        loss = call_in_root_forward(model, chunked_nll, mine)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        mean_loss = loss.detach().clone()
        dist.all_reduce(mean_loss)
        ref_loss = chunked_nll(reference, batch)
        ref_loss.backward()
        torch.nn.utils.clip_grad_norm_(reference.parameters(), max_norm=1.0)
        ref_opt.step()
        ref_opt.zero_grad(set_to_none=True)
        max_loss_diff = max(max_loss_diff, abs(mean_loss.item() / world - ref_loss.item()))
    # Full (unsharded) state dict on every rank: what the checkpointer / weight push gathers.
    sd = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=False))
    ref_sd = reference.state_dict()
    assert set(sd) == set(ref_sd), sorted(set(sd) ^ set(ref_sd))[:5]
    diff = max((sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd)
    moved = max((ref_sd[k] - v).abs().max().item() for k, v in build_tiny(arch, tie=tie)[0].state_dict().items())
    ok = diff < PARAM_TOL and max_loss_diff < LOSS_TOL and moved > LR
    if rank == 0:
        print(
            f"SCENARIO {name} {'OK' if ok else 'FAIL'} max_param_diff={diff:.2e} max_loss_diff={max_loss_diff:.2e} "
            f"moved={moved:.2e} units={count_units(model)}",
            flush=True,
        )
    if not ok:
        raise SystemExit(1)


def main() -> None:
    dist.init_process_group("gloo")
    torch.set_num_threads(1)
    world = dist.get_world_size()
    run("qwen2_5_vl_fsdp", "qwen2_5_vl", (world,), ac=False)
    run("qwen3_vl_fsdp_ac", "qwen3_vl", (world,), ac=True)
    run("qwen2_5_vl_hsdp_ac", "qwen2_5_vl", (world, 1), ac=True)
    run("qwen3_vl_tied_fsdp", "qwen3_vl", (world,), ac=False, tie=True)
    if dist.get_rank() == 0:
        print("ALL OK", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    # Known gloo exit-time abort (ENVIRONMENT.md): skip C++ static destructors once all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
