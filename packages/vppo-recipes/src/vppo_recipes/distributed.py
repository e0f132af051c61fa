"""What both recipes do the same way: join (or create) the process group, load the policy, shard it, the dtypes their
config names, and the checkpoint they save.

Each recipe still reads top to bottom in its own file; these are the steps whose every line is the same for RL and
SFT, kept in one place so the two cannot drift.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import torch
import torch.distributed as dist
from omegaconf import DictConfig

from vppo_recipes.checkpoint_weights import DTYPES, restore_master_weights
from vppo_recipes.checkpointing import save_checkpoint
from vppo_recipes.sharding import mixed_precision, policy_mesh, shard_policy
from vppo_rollout.loading import checkpoint_arch, load_policy


def init_distributed(device: torch.device) -> str | None:
    """Join torchrun's process group, or make a 1-rank one for a plain `tune run` (no `--nproc_per_node`).

    torchrun / `tune run --nproc_per_node N` set RANK etc.; a plain `tune run` does not: then a 1-rank group (file
    rendezvous) so the single-process run takes exactly the FSDP2 code path of the multi-process one, and
    RANK / LOCAL_RANK / WORLD_SIZE are set to 0 / 0 / 1 for code that reads them (vLLM's external launcher).
    Returns the rendezvous file to delete after `destroy_process_group` (None under torchrun or when a group
    already exists).
    """
    if dist.is_initialized():
        return None
    backend = "nccl" if device.type == "cuda" else "gloo"
    if "RANK" in os.environ:
        dist.init_process_group(backend)
        return None
    store = tempfile.NamedTemporaryFile(prefix="vppo_rdzv_", delete=False).name
    dist.init_process_group(backend, init_method=f"file://{store}", rank=0, world_size=1)
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    return store


def load_training_policy(cfg: DictConfig, weights: str) -> torch.nn.Module:
    """The HF policy in float32 on CPU (the master weights), checked against `model.arch`, without a KV cache.

    weights: model.path, or a checkpoint folder being resumed (an HF folder with the same config). A vppo checkpoint
    exported in bfloat16 from float32 master weights gives back those exact master weights
    (`checkpoint_weights.restore_master_weights`), whether it is resumed or is the next run's model.path.
    """
    arch = checkpoint_arch(cfg.model.path)
    if arch != cfg.model.arch:
        raise ValueError(f"model.arch={cfg.model.arch} but {cfg.model.path} holds a {arch} checkpoint")
    model = load_policy(weights, dtype=torch.float32, device="cpu", trust_remote_code=cfg.model.trust_remote_code)
    restore_master_weights(model, weights)
    model.config.use_cache = False
    return model


def shard_and_place(
    model: torch.nn.Module, cfg: DictConfig, *, device: torch.device, world: int, dtype: torch.dtype
) -> torch.nn.Module:
    """FSDP2 over the recipe's mesh (vision blocks, decoder layers, root; HSDP per `world.hsdp_replicas`), compute
    in `dtype`, then moved to `device` in training mode. Sharding before the move means a GPU never holds the whole
    float32 model."""
    mesh = policy_mesh(device.type, world, int(cfg.world.hsdp_replicas))
    model = shard_policy(
        model,
        mesh,
        mp_policy=mixed_precision(dtype),
        activation_checkpointing=cfg.training.activation_checkpointing,
    )
    model.to(device)
    model.train()
    return model


def checkpoint_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype checkpoints write the HF weights in: `checkpoint.dtype`, or the training dtype `model.dtype` when
    that is null (the default)."""
    return DTYPES[cfg.checkpoint.dtype or cfg.model.dtype]


def training_dtype(cfg: DictConfig) -> torch.dtype:
    """The dtype the policy computes in under FSDP2's mixed precision: `model.dtype` (the master weights stay
    float32)."""
    return DTYPES[cfg.model.dtype]


def save_run_checkpoint(
    cfg: DictConfig,
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    training_state: dict,
) -> Path:
    """`checkpointing.save_checkpoint` as both recipes call it: `<output_dir>/checkpoints/step_N` with the HF-format
    model in `checkpoint_dtype(cfg)`, the processor files of `model.path`, `model.arch`, the config (a resumed run
    compares its own against it) and the recipe's `training_state`; with `model.lora` the adapter alone (a peft
    adapter folder on model.path). Collective: every rank calls it; returns the checkpoint folder."""
    return save_checkpoint(
        output_dir,
        step,
        model=model,
        optimizer=optimizer,
        processor_source=cfg.model.path,
        training_state=training_state,
        arch=cfg.model.arch,
        config=cfg,
        dtype=checkpoint_dtype(cfg),
        lora_base=cfg.model.path if cfg.model.lora.rank else None,
    )
