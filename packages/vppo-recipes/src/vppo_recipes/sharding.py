"""FSDP2 sharding of Qwen2.5-VL / Qwen3-VL policies: the ONE function the RL recipe, the SFT recipe and the memory
planner (`vppo_recipes.plan`) call.

Units (each one is all-gathered before its forward and resharded after it):

    vision block 0 .. vision block D-1        one unit each (`Qwen2_5_VLVisionBlock` / `Qwen3VLVisionBlock`)
    decoder layer 0 .. decoder layer N-1      one unit each (`Qwen2_5_VLDecoderLayer` / `Qwen3VLTextDecoderLayer`)
    embed_tokens                              its own unit (unless tied to lm_head, then it stays in the root)
    root                                      everything left: lm_head, final norm, vision patch embed, patch
                                              merger(s) (Qwen3-VL: also the deepstack mergers), rotary buffers

Blocks are found by structure, not by one attribute path: the vision tower is the module that owns a `patch_embed`
and a `blocks` ModuleList, the text model the module that owns an `embed_tokens` Embedding and a `layers`
ModuleList. Both must be found exactly once, and each block's class must be one of the model's
`_no_split_modules` (transformers' own list of "never split this module" classes), so an unknown architecture is
an error, never a silently unsharded model.
"""

from __future__ import annotations

import types
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import (
    CheckpointImpl,
    apply_activation_checkpointing,
    checkpoint_wrapper,
)
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

__all__ = ["call_in_root_forward", "find_blocks", "mixed_precision", "policy_mesh", "shard_policy"]

HSDP_DIM_NAMES = ("replicate", "shard")
_ROOT_CALL = "_vppo_root_call"


def find_blocks(model: nn.Module) -> tuple[list[nn.Module], list[nn.Module]]:
    """Return (vision_blocks, decoder_layers) of a Qwen-VL style model, found by structure.

    model: a transformers `Qwen2_5_VLForConditionalGeneration` / `Qwen3VLForConditionalGeneration` (or any model
    with one vision tower owning `patch_embed` + `blocks` and one text model owning `embed_tokens` + `layers`).
    Raises ValueError naming what was missing when the structure is not recognised.
    """
    towers = [
        m
        for m in model.modules()
        if hasattr(m, "patch_embed") and isinstance(getattr(m, "blocks", None), nn.ModuleList)
    ]
    texts = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "embed_tokens", None), nn.Embedding)
        and isinstance(getattr(m, "layers", None), nn.ModuleList)
    ]
    name = type(model).__name__
    if len(towers) != 1 or len(texts) != 1:
        raise ValueError(
            f"shard_policy: model {name} is not a supported vision-language architecture: expected exactly one vision "
            f"tower (a module with `patch_embed` and a `blocks` ModuleList; found {len(towers)}) and one text model "
            f"(a module with an `embed_tokens` Embedding and a `layers` ModuleList; found {len(texts)}). Supported: "
            "Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration."
        )
    vision, layers = list(towers[0].blocks), list(texts[0].layers)
    allowed = set(getattr(model, "_no_split_modules", None) or [])
    for kind, blocks in (("vision block", vision), ("decoder layer", layers)):
        if not blocks:
            raise ValueError(f"shard_policy: model {name} has no {kind}s (empty ModuleList)")
        classes = {_model_class(_unwrapped(b)).__name__ for b in blocks}
        if allowed and not classes <= allowed:
            raise ValueError(
                f"shard_policy: {kind} classes {sorted(classes)} of {name} are not in its _no_split_modules "
                f"{sorted(allowed)}; this architecture is not supported (Qwen2.5-VL / Qwen3-VL are)"
            )
    return vision, layers


def _unwrapped(module: nn.Module) -> nn.Module:
    """The module inside a checkpoint wrapper (or the module itself)."""
    return getattr(module, "_checkpoint_wrapped_module", module)


def _model_class(module: nn.Module) -> type:
    """The module's own class, seen through FSDP2's dynamic `FSDP<Class>` subclass."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule))


def _text_model(model: nn.Module) -> nn.Module:
    return next(
        m
        for m in model.modules()
        if isinstance(getattr(m, "embed_tokens", None), nn.Embedding) and hasattr(m, "layers")
    )


def policy_mesh(device_type: str, world_size: int, hsdp_replicas: int = 1) -> DeviceMesh:
    """The mesh `shard_policy` expects: 1-D over `world_size` ranks, or the 2-D HSDP mesh (replicate, shard) of
    `hsdp_replicas` x (world_size / hsdp_replicas) when `hsdp_replicas > 1` (config key `world.hsdp_replicas`)."""
    from torch.distributed.device_mesh import init_device_mesh

    if hsdp_replicas > 1:
        if world_size % hsdp_replicas:
            raise ValueError(f"world.hsdp_replicas={hsdp_replicas} must divide the world size {world_size}")
        return init_device_mesh(
            device_type, (hsdp_replicas, world_size // hsdp_replicas), mesh_dim_names=HSDP_DIM_NAMES
        )
    return init_device_mesh(device_type, (world_size,))


def mixed_precision(dtype: torch.dtype) -> MixedPrecisionPolicy | None:
    """FSDP2 policy for `model.dtype`: None for float32 (no casts); otherwise compute in `dtype`, reduce gradients
    in float32 (fp32 master weights stay in the sharded parameters)."""
    return None if dtype == torch.float32 else MixedPrecisionPolicy(param_dtype=dtype, reduce_dtype=torch.float32)


def _validate_mesh(mesh: DeviceMesh) -> None:
    if not isinstance(mesh, DeviceMesh):
        raise ValueError(
            f"shard_policy: mesh must be a torch.distributed.device_mesh.DeviceMesh, got {type(mesh).__name__}; build "
            "one with init_device_mesh(device_type, (world,)) or, for HSDP, init_device_mesh(device_type, "
            "(replicas, world // replicas), mesh_dim_names=('replicate', 'shard'))"
        )
    if mesh.ndim == 2 and tuple(mesh.mesh_dim_names or ()) != HSDP_DIM_NAMES:
        raise ValueError(
            f"shard_policy: a 2-D mesh is HSDP and must have mesh_dim_names={HSDP_DIM_NAMES}, got "
            f"{mesh.mesh_dim_names}; pass mesh_dim_names=('replicate', 'shard') to init_device_mesh"
        )
    if mesh.ndim not in (1, 2):
        raise ValueError(f"shard_policy: mesh must be 1-D (FSDP) or 2-D (HSDP), got {mesh.ndim}-D")


def shard_policy(
    model: nn.Module,
    mesh: DeviceMesh,
    *,
    mp_policy: MixedPrecisionPolicy | None = None,
    reshard_after_forward: bool = True,
    activation_checkpointing: bool = False,
) -> nn.Module:
    """Shard a Qwen2.5-VL / Qwen3-VL model in place with FSDP2 (`fully_shard`) and return it.

    model: `Qwen2_5_VLForConditionalGeneration` or `Qwen3VLForConditionalGeneration`, on any device (meta included:
        the planner shards meta models under a fake process group).
    mesh: 1-D DeviceMesh (FSDP: every parameter sharded on dim 0 across all ranks) or 2-D DeviceMesh with
        mesh_dim_names ("replicate", "shard") (HSDP: sharded within a node, replicated across nodes; gradients are
        reduce-scattered within and all-reduced across).
    mp_policy: FSDP2 MixedPrecisionPolicy (e.g. param_dtype=bfloat16, reduce_dtype=float32 on GPU); None keeps
        the parameters' own dtype.
    reshard_after_forward: applies to the block units and embed_tokens (False trades memory for one all-gather
        less per block in backward). The root is never resharded after forward (FSDP2 keeps it gathered for
        backward).
    activation_checkpointing: wrap every vision block and decoder layer in torch's non-reentrant checkpoint
        wrapper before sharding (only each block's input is saved; the block is recomputed in backward).
        Note: `model.named_parameters()` then contains `._checkpoint_wrapped_module.` in block names;
        `model.state_dict()` and `torch.distributed.checkpoint.state_dict.get_model_state_dict` strip it, so
        HF-format checkpoints and weight pushes to the sampler should go through those.

    Why lm_head is NOT its own unit (and embed_tokens is): the recipe computes log-probs from the last hidden
    state and the lm_head weight in chunks over positions (never [B, T, V] logits), i.e. it reads
    `lm_head.weight` once per chunk outside `lm_head.forward`. FSDP2 only all-gathers a unit around a module's
    forward, so as its own unit lm_head would either be all-gathered (and its gradient reduce-scattered) once per
    chunk, or be read while still sharded. In the root unit it is gathered once per forward and stays gathered
    through backward (FSDP2 never reshards the root after forward), which is exactly the lifetime the chunked
    log-prob needs; the cost is V x H params held per step (7B: 0.55 B params, 1.09 GB in bf16). Run that
    computation through `call_in_root_forward(model, fn, ...)` so the root's all-gather and gradient hooks fire
    even though `model.forward` (which would build full logits) is not called. embed_tokens is used only through
    its own forward at the start, so as a separate unit it is freed right after the lookup. With tied embeddings
    (lm_head.weight is embed_tokens.weight) it stays in the root, since one parameter cannot be in two units.

    Returns the same model object, now an FSDPModule whose parameters are DTensors.
    """
    _validate_mesh(mesh)
    if isinstance(model, FSDPModule):
        raise ValueError("shard_policy: model is already sharded (an FSDPModule); call shard_policy once per model")
    vision, layers = find_blocks(model)
    block_ids = {id(b) for b in vision + layers}
    if activation_checkpointing:
        # Checkpoint before sharding so each FSDP unit is the wrapper: recompute in backward re-gathers the unit.
        apply_activation_checkpointing(
            model,
            checkpoint_wrapper_fn=lambda m: checkpoint_wrapper(m, checkpoint_impl=CheckpointImpl.NO_REENTRANT),
            check_fn=lambda m: id(m) in block_ids,
        )
        vision, layers = find_blocks(model)
    kw: dict[str, Any] = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if mp_policy is not None:
        kw["mp_policy"] = mp_policy
    for block in [*vision, *layers]:
        fully_shard(block, **kw)
    embed = _text_model(model).embed_tokens
    lm_head = getattr(model, "lm_head", None)
    tied = lm_head is not None and getattr(lm_head, "weight", None) is embed.weight
    if not tied:
        fully_shard(embed, **kw)
    fully_shard(model, **{**kw, "reshard_after_forward": False})
    return model


def call_in_root_forward(model: nn.Module, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """Run `fn(model, *args, **kwargs)` as if it were `model.forward` for FSDP2 and return its result.

    The root unit's parameters (lm_head, final norm, vision patch embed / merger) are all-gathered before `fn`
    and its gradient reduce-scatter is scheduled for backward, exactly as for a `model(...)` call. Use it for the
    chunked log-prob pass: `fn` runs `model.model(...)` for the last hidden state and reads `model.lm_head.weight`
    per chunk. On an unsharded model this is a plain call. Tensor arguments are cast like forward inputs when the
    MixedPrecisionPolicy says so (cast_forward_inputs).
    """
    if not isinstance(model, FSDPModule):
        return fn(model, *args, **kwargs)
    if not hasattr(model, _ROOT_CALL):
        setattr(model, _ROOT_CALL, types.MethodType(lambda self, f, *a, **k: f(self, *a, **k), model))
        register_fsdp_forward_method(model, _ROOT_CALL)
    return getattr(model, _ROOT_CALL)(fn, *args, **kwargs)


def count_units(model: nn.Module) -> int:
    """Number of FSDP units (modules that are FSDPModule) in `model`."""
    return sum(isinstance(m, FSDPModule) for m in model.modules())


def param_dtype_of(mp_policy: MixedPrecisionPolicy | None, default: torch.dtype) -> torch.dtype:
    """The dtype parameters are all-gathered in under `mp_policy` (the parameters' own dtype when None)."""
    return default if mp_policy is None or mp_policy.param_dtype is None else mp_policy.param_dtype
