"""Checkpoint weights: the model's full state dict, exported in the checkpoint dtype, and the float32 master
weights split into that export and their low 16 bits, and joined back (`vppo_recipes.checkpointing` writes them).

Weights' dtype: the HF weights are written in `dtype` (the recipes pass `checkpoint.dtype`, by default the training
dtype `model.dtype`), so a bf16 run's checkpoint is a bf16 model (half the bytes of float32) and an engine loading it
with `dtype="auto"` gets bf16. The recipes train float32 master weights, though, and resuming from their bf16
rounding would not continue the run exactly. So a float32 tensor exported in bfloat16 is *split*, bit for bit:
the export holds its upper half rounded to nearest (ties away from zero, `split_float32`), and
`master_weights_low16.safetensors` its low 16 bits; `restore_master_weights` (which `load_training_policy` calls on
every folder it trains from) joins them back into the exact float32 value. The export plus the low bits take as many
bytes as the float32 export did; the optimizer state stays float32 as before. Round to nearest-even (what
`tensor.to(torch.bfloat16)` does) would not do: for an even bf16 value, 65,537 float32 values round to it, one more
than 16 bits can tell apart. The export therefore differs from `.to(torch.bfloat16)` in exact ties only (about 1 in
65,536 values, by one bf16 ulp, both roundings being equally near).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

__all__ = [
    "DTYPES",
    "MASTER_LOW_BITS_FILE",
    "gather_full_state_dict",
    "holds_master_weights",
    "join_float32",
    "restore_master_weights",
    "split_float32",
]

MASTER_LOW_BITS_FILE = "master_weights_low16.safetensors"
# The config's dtype names (model.dtype, checkpoint.dtype) -> torch dtypes: the one map both recipes read
# (`distributed.training_dtype`, `distributed.checkpoint_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) model state dict on CPU, on rank 0; `{}` on the other ranks. Collective.

    Works for an FSDP2 (`fully_shard`) model and for a plain one (then every rank gets the full dict).
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _to_int16(values: torch.Tensor) -> torch.Tensor:
    """int64 holding 16-bit patterns (0 .. 0xFFFF, or any value: taken mod 2**16) -> int16 with those bits."""
    return (((values & 0xFFFF) ^ 0x8000) - 0x8000).to(torch.int16)


def split_float32(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Split a float32 tensor into (bfloat16 rounded to nearest with ties away from zero, int16 low 16 bits) such
    that `join_float32(*split_float32(t))` is `t` bit for bit.

    t: float32, any shape. Returns (high [same shape] bfloat16, low [same shape] int16). Round-to-nearest-even is
    not invertible this way (module docstring); ties away from zero is: the upper half is incremented exactly when
    the low half is >= 0x8000. NaNs are exported as torch's bfloat16 NaN and come back NaN (not the same payload);
    a finite value just below float32's largest bf16-representable magnitude may round to inf in the export and
    still comes back exact.
    """
    if t.dtype != torch.float32:
        raise ValueError(f"split_float32 takes float32 tensors, got {t.dtype}")
    bits = t.contiguous().view(torch.int32).to(torch.int64) & 0xFFFFFFFF
    low = bits & 0xFFFF
    high = (bits >> 16) + (low >= 0x8000).to(torch.int64)
    high = _to_int16(high).view(torch.bfloat16)
    high = torch.where(torch.isnan(t), t.to(torch.bfloat16), high)
    return high, _to_int16(low)


def join_float32(high: torch.Tensor, low: torch.Tensor) -> torch.Tensor:
    """Inverse of `split_float32`: high [*] bfloat16, low [*] int16 -> float32 [*]."""
    if high.dtype != torch.bfloat16 or low.dtype != torch.int16 or high.shape != low.shape:
        raise ValueError(
            f"join_float32 takes a bfloat16 and an int16 tensor of one shape, got {high.dtype} {tuple(high.shape)} "
            f"and {low.dtype} {tuple(low.shape)}"
        )
    h = high.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    lo = low.to(torch.int64) & 0xFFFF
    upper = (h - (lo >= 0x8000).to(torch.int64)) & 0xFFFF
    bits = (upper << 16) | lo
    return (((bits ^ 0x80000000) - 0x80000000).to(torch.int32)).view(torch.float32)


def _export(full_sd: dict[str, torch.Tensor], dtype: torch.dtype | None):
    """(tensors to save_pretrained in `dtype`, low 16 bits of the float32 ones exported in bfloat16 ({} if none)).

    dtype None keeps every tensor's own dtype; otherwise floating tensors are cast to it (float32 -> bfloat16 by
    `split_float32`, so the float32 value can be restored exactly), others kept. Empties `full_sd` as it goes, so
    each gathered float32 tensor is freed once converted: rank 0 holds the model's bytes once, not twice.
    Tied weights (one tensor under two names) stay one tensor in the export, which save_pretrained then writes
    once, and have their low bits under the first name only.
    """
    if dtype is None:
        return dict(full_sd), {}
    if dtype not in DTYPES.values():
        raise ValueError(f"checkpoint dtype must be one of {sorted(DTYPES)}, got {dtype}")
    exported, low_bits = {}, {}
    converted: dict[tuple, torch.Tensor] = {}  # a source tensor's memory and layout -> its export
    for name in list(full_sd):
        t = full_sd.pop(name)
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride()) if t.numel() else None
        if key is not None and key in converted:
            exported[name] = converted[key]
        elif t.dtype == torch.float32 and dtype == torch.bfloat16:
            exported[name], low_bits[name] = split_float32(t)
        elif t.is_floating_point():
            exported[name] = t.to(dtype)
        else:
            exported[name] = t
        converted[key] = exported[name]
    return exported, low_bits


def _set_config_dtype(folder: Path, dtype: torch.dtype) -> None:
    """Make `<folder>/config.json` name the exported weights' dtype: `dtype` at the top and in every sub-config
    (text_config, vision_config) that has one. transformers' `save_pretrained` writes the dtype of the model's own
    parameters (the float32 master weights), not of the state dict it saved."""
    name = str(dtype).removeprefix("torch.")

    def rewrite(node: dict[str, Any], top: bool) -> None:
        for key in ("dtype", "torch_dtype"):
            if key in node or (top and key == "dtype"):
                node[key] = name
        for value in node.values():
            if isinstance(value, dict):
                rewrite(value, False)

    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    rewrite(cfg, True)
    path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def holds_master_weights(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds the low 16 bits of float32 master weights exported in bfloat16."""
    return (Path(folder) / MASTER_LOW_BITS_FILE).is_file()


def restore_master_weights(model: torch.nn.Module, folder: str | os.PathLike) -> bool:
    """Put the exact float32 master weights back into `model`, a plain (unsharded) float32 model just loaded from
    `folder`'s bfloat16 export, when `folder` holds their low bits; returns whether it did (False: nothing to do).

    Raises ValueError when the low bits name a tensor the model lacks, or a loaded value is not the export's
    (the model was not loaded from this folder, or not in float32).
    """
    if not holds_master_weights(folder):
        return False
    from safetensors.torch import load_file

    low_bits = load_file(str(Path(folder) / MASTER_LOW_BITS_FILE))
    state = model.state_dict()
    missing = sorted(set(low_bits) - set(state))
    if missing:
        raise ValueError(f"{folder}/{MASTER_LOW_BITS_FILE} names tensors the model lacks: {missing[:5]}")
    done: set[int] = set()  # tied weights (lm_head = embed_tokens) are one tensor under two names
    with torch.no_grad():
        for name, low in low_bits.items():
            target = state[name]
            if target.data_ptr() in done:
                continue
            done.add(target.data_ptr())
            high = target.to(torch.bfloat16)
            exported = target.dtype == torch.float32 and torch.equal(  # compared as bits: NaN-safe
                high.float().view(torch.int32), target.view(torch.int32)
            )
            if not exported:
                raise ValueError(
                    f"{name}: the loaded value is not {folder}'s bfloat16 export in float32 ({target.dtype}); load the "
                    "model from this folder in float32 before restore_master_weights"
                )
            target.copy_(join_float32(high, low))
    return True
