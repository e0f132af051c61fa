"""Checkpoints: the model in Hugging Face format plus the training state, written atomically, resumable.

Layout of one checkpoint (`<output_dir>/checkpoints/step_000004/`), which is itself a Hugging Face model folder
(`from_pretrained`, vLLM and vppo-eval load it directly; they ignore the extra files):

    config.json, generation_config.json, model.safetensors   the policy (`save_pretrained`, original key names), in
                                                              the export dtype, which config.json's `dtype` names
    master_weights_low16.safetensors                          only when float32 master weights were exported in
                                                              bfloat16: their low 16 bits (see below)
    tokenizer / processor files                               copied from the model folder the run started from
    training_state.pt                                         step, data position, anything else the recipe passes
    training_config.yaml                                      the run's resolved config (checked on resume)
    optimizer.pt                                              optimizer state (full, keyed by parameter FQN), or
    optimizer_rank{r}.pt                                      each rank's shard of it (low-bit torchao states)
    rng_state_rank{r}.pt                                      torch / python / numpy (/ cuda) RNG of each rank
    vppo_checkpoint.json                                      format version, step, arch, world size, and the
                                                              size and SHA-256 of every other file; written last

Atomicity: everything is written into `checkpoints/.tmp_step_000004/`, which rank 0 renames to `step_000004/`
(`os.replace`, atomic on POSIX) only after every rank has finished. A run killed mid-save leaves a `.tmp_*`
folder that `find_latest_checkpoint` ignores (and the next save removes), never a half checkpoint as "latest".
A save that fails on any rank (a full disk: "no space left on <path>") removes its `.tmp_*` folder on every rank's
say-so and raises `CheckpointWriteError` on every rank, so no rank waits forever at the next collective; the
previous checkpoint is untouched.

Trust: `find_resumable_checkpoint` (what the recipes resume from) checks the newest checkpoint's files against its
manifest (sizes, then hashes) and, when one is missing, truncated or altered, says so loudly, naming the file, and
falls back to the newest checkpoint that verifies. The manifest's `format_version` decides what it must hold: a
format-2 manifest missing a field or a file entry is damaged (never read as format 1); checkpoints of format 1 (no
manifest) are accepted unverified, and a format this code does not know is refused.

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

Everything is saved with plain tensors / Python containers and read back with `torch.load(weights_only=True)`.
The optimizer state is the *full* state dict keyed by parameter FQN (`get_optimizer_state_dict(full_state_dict=
True, cpu_offload=True)`), so a run may resume on a different number of ranks. On resume it is loaded back into
the FSDP2-sharded optimizer with `set_optimizer_state_dict(full_state_dict=True, broadcast_from_rank0=True)`:
only rank 0 reads the file. Rank 0 holds the whole model + optimizer state in CPU memory while saving (as
torchtune's full-finetune recipes do); the checkpoint folder must be on a file system every rank can see.

torchao's low-bit optimizers (AdamW8bit, AdamW4bit, AdamWFp8) keep their states as quantized tensor subclasses
that cannot be all-gathered into a full state dict (torch 2.13 / torchao 0.15). For them each rank writes its own
shard instead, as plain tensors (the subclass's codes / scales / lookup table, from its `__tensor_flatten__`), and
reads it back on the same mesh: `optimizer_format` in vppo_checkpoint.json says which of the two a checkpoint
holds, and a sharded one refuses, with the fix, to load on another world size. torch's distributed checkpoint
(DCP) would also save them, but it reads its metadata and non-tensor entries with unrestricted pickle.

All functions that take `model` / `optimizer` are collective under torch.distributed: call them on every rank.
"""

from __future__ import annotations

import errno
import hashlib
import importlib
import json
import os
import random
import re
import shutil
import sys
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from omegaconf import OmegaConf
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor

__all__ = [
    "DTYPES",
    "FORMAT_VERSION",
    "CheckpointWriteError",
    "apply_optimizer_settings",
    "capture_rng_state",
    "check_checkpoint_matches",
    "check_resume_config",
    "checkpoint_dir",
    "final_checkpoint_line",
    "find_latest_checkpoint",
    "find_resumable_checkpoint",
    "gather_full_state_dict",
    "holds_master_weights",
    "join_float32",
    "load_sharded_optimizer_state",
    "load_training_state",
    "model_type_of",
    "restore_master_weights",
    "restore_rng_state",
    "save_checkpoint",
    "sharded_optimizer_state",
    "split_float32",
    "verify_checkpoint",
]

FORMAT_VERSION = 2  # 2: vppo_checkpoint.json holds the files' manifest
META_FILE = "vppo_checkpoint.json"
TRAINING_STATE_FILE = "training_state.pt"
CONFIG_FILE = "training_config.yaml"
OPTIMIZER_FILE = "optimizer.pt"
OPTIMIZER_SHARD_FILE = "optimizer_rank{rank}.pt"
MASTER_LOW_BITS_FILE = "master_weights_low16.safetensors"
# The config's dtype names (model.dtype, checkpoint.dtype) -> torch dtypes: the one map both recipes read
# (`distributed.training_dtype`, `distributed.checkpoint_dtype`).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# Quantized optimizer-state tensor subclasses a sharded optimizer file may name (rebuilt from their parts).
_STATE_SUBCLASSES = {
    "torchao.optim.subclass_8bit.OptimState8bit",
    "torchao.optim.subclass_4bit.OptimState4bit",
    "torchao.optim.subclass_fp8.OptimStateFp8",
}
_STEP_DIR = re.compile(r"^step_(\d+)$")
# Files of a model folder that describe the tokenizer / processor (copied into every checkpoint).
_NOT_PROCESSOR_FILES = {"config.json", "generation_config.json", META_FILE}
_PROCESSOR_SUFFIXES = (".json", ".jinja", ".txt", ".model", ".tiktoken")
# Fields whose mismatch means "another model": compared between a checkpoint's config.json and the run's model.
_STRUCTURE_FIELDS = {
    "text_config": (
        "vocab_size",
        "hidden_size",
        "intermediate_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
    ),
    "vision_config": ("depth", "hidden_size", "intermediate_size", "num_heads", "patch_size", "out_hidden_size"),
}


def _rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _barrier() -> None:
    if _world() > 1:
        dist.barrier()


def checkpoint_dir(output_dir: str | os.PathLike, step: int) -> Path:
    """`<output_dir>/checkpoints/step_{step:06d}`."""
    return Path(output_dir) / "checkpoints" / f"step_{step:06d}"


def find_latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint with the highest step under `<output_dir>/checkpoints`, or None.

    Complete = a `step_N` folder (never a `.tmp_*` one) holding `vppo_checkpoint.json`.
    """
    root = Path(output_dir) / "checkpoints"
    if not root.is_dir():
        return None
    best: tuple[int, Path] | None = None
    for child in root.iterdir():
        m = _STEP_DIR.match(child.name)
        if m and (child / META_FILE).is_file() and (best is None or int(m.group(1)) > best[0]):
            best = (int(m.group(1)), child)
    return None if best is None else best[1]


def checkpoint_of_step(output_dir: str | os.PathLike, step: int) -> Path | None:
    """The checkpoint a run that ended at `step` leaves, absolute: its own step's folder when it saved one (a folder
    can hold a later step of an earlier run, e.g. after `training.resume=never`), else the latest; None if none."""
    own = checkpoint_dir(output_dir, step)
    latest = own if own.is_dir() else find_latest_checkpoint(output_dir)
    return None if latest is None else latest.resolve()


def final_checkpoint_line(recipe: str, step: int, output_dir: str | os.PathLike) -> str:
    """What both recipes print on rank 0 when a run ends, e.g. "RL done at step 40; final checkpoint:
    /runs/x/checkpoints/step_000040" (`checkpoint_of_step`)."""
    return f"{recipe} done at step {step}; final checkpoint: {checkpoint_of_step(output_dir, step)}"


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def _manifest(folder: Path) -> dict[str, dict[str, Any]]:
    """{file name: {"bytes", "sha256"}} of every file in `folder` except the metadata file."""
    return {
        f.name: {"bytes": f.stat().st_size, "sha256": _sha256(f)}
        for f in sorted(folder.iterdir())
        if f.is_file() and f.name != META_FILE
    }


# What vppo_checkpoint.json must hold, by its format_version: the version decides, so a manifest that lost a field
# is damaged, never taken for an older format. Format 1 (before manifests) holds nothing that can be verified.
_REQUIRED_META: dict[int, dict[str, tuple[type, ...]]] = {
    1: {},
    2: {
        "step": (int,),
        "arch": (str, type(None)),
        "model_type": (str, type(None)),
        "world_size": (int,),
        "optimizer_format": (str, type(None)),
        "files": (dict,),
    },
}


def _meta_problems(meta: Any, where: Path) -> list[str]:
    """What is missing or malformed in a parsed vppo_checkpoint.json, for its format_version ([] = complete).

    `where`: the file, named in each message. Checks the fields `_REQUIRED_META` lists, every manifest entry's
    {"bytes": int, "sha256": str}, and (format 2) that the manifest lists the files every checkpoint has: config.json,
    training_state.pt, the weights (model.safetensors or its index), each rank's RNG state and the optimizer file(s)
    `optimizer_format` names.
    """
    if not isinstance(meta, dict):
        return [f"{where}: not a JSON object"]
    version = meta.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        return [f"{where}: format_version is {version!r}, not a version number (damaged?)"]
    if version not in _REQUIRED_META:
        return [
            f"{where}: format_version {version}, but this vppo reads formats {sorted(_REQUIRED_META)} (written by a "
            "newer vppo? upgrade it, or set training.resume=never)"
        ]
    problems = []
    for field, types in _REQUIRED_META[version].items():
        if field not in meta:
            problems.append(f"{where}: format_version {version} but no {field!r} field (damaged)")
        elif isinstance(meta[field], bool) or not isinstance(meta[field], types):
            problems.append(f"{where}: {field!r} is {meta[field]!r} (damaged)")
    if problems or version < 2:
        return problems
    files = meta["files"]
    for name, entry in files.items():
        if not (
            isinstance(entry, dict)
            and isinstance(entry.get("bytes"), int)
            and not isinstance(entry.get("bytes"), bool)
            and isinstance(entry.get("sha256"), str)
        ):
            problems.append(f"{where}: the manifest entry of {name!r} is {entry!r}, not {{bytes, sha256}} (damaged)")
    required = ["config.json", TRAINING_STATE_FILE, *(f"rng_state_rank{r}.pt" for r in range(meta["world_size"]))]
    if meta["optimizer_format"] == "full":
        required.append(OPTIMIZER_FILE)
    elif meta["optimizer_format"] == "sharded":
        required += [OPTIMIZER_SHARD_FILE.format(rank=r) for r in range(meta["world_size"])]
    elif meta["optimizer_format"] is not None:
        problems.append(f"{where}: 'optimizer_format' is {meta['optimizer_format']!r} (damaged)")
    if "model.safetensors" not in files and "model.safetensors.index.json" not in files:
        required.append("model.safetensors")
    missing = [name for name in required if name not in files]
    if missing:
        problems.append(f"{where}: the manifest does not list {', '.join(missing)} (damaged)")
    return problems


def verify_checkpoint(ckpt_dir: str | os.PathLike, *, hashes: bool = True) -> list[str]:
    """What is wrong with a complete checkpoint's files, as messages naming each file ([] = it verifies).

    First the manifest itself (`_meta_problems`): its format_version decides which fields and which listed files it
    must hold, so a format-2 manifest that lost its file list is damaged, not a format-1 one. Then every file it
    lists: present, same size, and (`hashes`) same SHA-256; a sharded weights index must list shards that are in
    the manifest too. A format-1 checkpoint has no manifest: [] (it cannot be verified).
    """
    ckpt = Path(ckpt_dir)
    try:
        meta = json.loads((ckpt / META_FILE).read_text())
    except (OSError, ValueError) as err:
        return [f"{ckpt / META_FILE}: unreadable ({type(err).__name__}: {err})"]
    problems = _meta_problems(meta, ckpt / META_FILE)
    if problems:
        return problems
    for name, expected in (meta.get("files") or {}).items():
        path = ckpt / name
        if not path.is_file():
            problems.append(f"{path}: missing")
            continue
        size = path.stat().st_size
        if size != expected["bytes"]:
            problems.append(f"{path}: {size} bytes, the checkpoint recorded {expected['bytes']} (truncated?)")
        elif hashes and _sha256(path) != expected["sha256"]:
            problems.append(f"{path}: contents differ from the recorded SHA-256 (damaged or altered)")
    index = ckpt / "model.safetensors.index.json"
    if not problems and "model.safetensors.index.json" in (meta.get("files") or {}):
        try:
            shards = set(json.loads(index.read_text())["weight_map"].values())
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
            return [f"{index}: unreadable weights index ({type(err).__name__}: {err})"]
        unlisted = sorted(shards - set(meta["files"]))
        if unlisted:
            problems.append(f"{index}: names weight files the manifest does not list: {', '.join(unlisted)} (damaged)")
    return problems


def find_resumable_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint whose files verify (`verify_checkpoint`), or None. Collective when
    torch.distributed is initialised: rank 0 reads and hashes, every rank gets its answer.

    A newer checkpoint that fails verification is reported on stderr and with a warning, naming its files, and
    skipped: the run resumes from the previous good one (a later save of that step replaces the damaged folder).
    """
    choice: list[Any] = [None]
    if _rank() == 0:
        root = Path(output_dir) / "checkpoints"
        steps = []
        if root.is_dir():
            for child in root.iterdir():
                m = _STEP_DIR.match(child.name)
                if m and (child / META_FILE).is_file():
                    steps.append((int(m.group(1)), child))
        for _, ckpt in sorted(steps, reverse=True):
            problems = verify_checkpoint(ckpt)
            if not problems:
                choice[0] = str(ckpt)
                break
            message = (
                f"CHECKPOINT DAMAGED, NOT RESUMING FROM IT: {ckpt}\n  "
                + "\n  ".join(problems)
                + "\n  -> falling back to the previous complete checkpoint (if any); delete the damaged folder "
                "to silence this"
            )
            print(message, file=sys.stderr, flush=True)
            warnings.warn(message, stacklevel=2)
    if _world() > 1:
        dist.broadcast_object_list(choice, src=0)
    return None if choice[0] is None else Path(choice[0])


class CheckpointWriteError(RuntimeError):
    """A checkpoint could not be written (the message says why and where); the previous checkpoints are intact."""


def _write_failure(err: BaseException, where: Path) -> str:
    """Why a write into `where` failed, in words: a full disk is named as such (torch.save reports it as
    "inline_container.cc ... unexpected pos", without errno)."""
    try:
        free = shutil.disk_usage(where if where.exists() else where.parent).free
    except OSError:
        free = None
    no_space = (isinstance(err, OSError) and err.errno == errno.ENOSPC) or (free is not None and free < 1 << 20)
    if no_space:
        return (
            f"no space left on {where} ({free if free is not None else '?'} bytes free): free space or point "
            f"output_dir at a larger disk ({type(err).__name__}: {err})"
        )
    return f"{type(err).__name__}: {err}"


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


def _is_state_subclass(t: Any) -> bool:
    """True for a quantized optimizer state (a tensor subclass), whether or not wrapped in a DTensor."""
    local = t.to_local() if isinstance(t, DTensor) else t
    return isinstance(local, torch.Tensor) and type(local) is not torch.Tensor


def _needs_sharded_optimizer_file(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any rank holds a quantized state. Collective: torchao quantizes a state only when this rank's shard
    has >= 4096 elements, so with uneven shards ranks can differ, and all must take the same path."""
    mine = any(_is_state_subclass(v) for st in optimizer.state.values() for v in st.values())
    if _world() == 1:
        return mine
    flags: list[Any] = [None] * _world()
    dist.all_gather_object(flags, mine)
    return any(flags)


def _param_names(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> list[list[str]]:
    """Parameter FQNs of each param group, in the optimizer's order (FSDP2 keeps the original names)."""
    names = {id(p): n for n, p in model.named_parameters(remove_duplicate=False)}
    try:
        return [[names[id(p)] for p in g["params"]] for g in optimizer.param_groups]
    except KeyError:
        raise ValueError("the optimizer holds a parameter that is not in the model") from None


def _encode_state(value: Any) -> Any:
    """One optimizer-state entry as weights_only-loadable plain data: this rank's shard of it, on CPU."""
    if not isinstance(value, torch.Tensor):
        return value
    local = value.to_local() if isinstance(value, DTensor) else value
    if type(local) is torch.Tensor:
        return {"tensor": local.detach().cpu().clone(), "dtensor": isinstance(value, DTensor)}
    cls = type(local)
    names, attributes = local.__tensor_flatten__()
    return {
        "subclass": f"{cls.__module__}.{cls.__qualname__}",
        "parts": {n: getattr(local, n).detach().cpu().clone() for n in names},
        "attributes": [tuple(a) if isinstance(a, torch.Size) else a for a in attributes],
        "dtensor": isinstance(value, DTensor),
    }


def _decode_state(entry: Any, param: torch.Tensor, where: str) -> Any:
    """Inverse of `_encode_state`, placed like `param` (the same DTensor spec, device)."""
    if not isinstance(entry, dict) or not ("tensor" in entry or "subclass" in entry):
        return entry
    device = param.device
    if "tensor" in entry:
        local = entry["tensor"].to(device)
    else:
        name = entry["subclass"]
        if name not in _STATE_SUBCLASSES:
            raise ValueError(f"{where}: unknown optimizer-state type {name!r} (known: {sorted(_STATE_SUBCLASSES)})")
        module, qualname = name.rsplit(".", 1)
        cls = getattr(importlib.import_module(module), qualname)
        parts = {k: v.to(device) for k, v in entry["parts"].items()}
        local = cls.__tensor_unflatten__(parts, list(entry["attributes"]), None, None)
    if not entry["dtensor"]:
        return local
    if not isinstance(param, DTensor):
        raise ValueError(f"{where}: saved from a sharded (FSDP2) model but loaded into an unsharded one")
    want = param.to_local().shape
    if local.shape != want:
        raise ValueError(
            f"{where}: this rank's saved shard has shape {tuple(local.shape)} but the parameter's shard is "
            f"{tuple(want)}: the checkpoint was written on another mesh; resume with the same world size and "
            "world.hsdp_replicas"
        )
    out = DTensor.from_local(
        local,
        device_mesh=param.device_mesh,
        placements=param.placements,
        run_check=False,
        shape=param.shape,
        stride=param.stride(),
    )
    return out.to(device)  # from_local moves to the mesh's device type; keep CPU-offloaded states on CPU


def sharded_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """This rank's shard of the optimizer state, keyed by parameter FQN, as plain weights_only-safe data.

    Tensor subclasses (torchao's quantized states) are stored as their parts (`__tensor_flatten__`), DTensors as
    their local shard. Not collective. Returns `{"state": {fqn: {key: entry}}, "param_groups": [...]}` where each
    group's "params" lists FQNs.
    """
    names = _param_names(model, optimizer)
    sd = optimizer.state_dict()
    index_to_name = {}
    for group, group_names in zip(sd["param_groups"], names):
        index_to_name.update(zip(group["params"], group_names))
    state = {index_to_name[i]: {k: _encode_state(v) for k, v in st.items()} for i, st in sd["state"].items()}
    groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": n} for g, n in zip(sd["param_groups"], names)]
    return {"state": state, "param_groups": groups}


def load_sharded_optimizer_state(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, payload: Mapping[str, Any], *, where: str = "optimizer"
) -> None:
    """Inverse of `sharded_optimizer_state` on the same mesh; ValueError naming the entry on any mismatch."""
    names = _param_names(model, optimizer)
    saved_names = [list(g["params"]) for g in payload["param_groups"]]
    if saved_names != names:
        raise ValueError(f"{where}: saved for parameters {saved_names[:1]}... but the optimizer has {names[:1]}...")
    params = {n: p for g, gn in zip(optimizer.param_groups, names) for p, n in zip(g["params"], gn)}
    # Hyperparameters (and torchao's tensor lr) through the regular path, states placed by hand: load_state_dict
    # would cast every state to the parameter's dtype, which a quantized state cannot take.
    index = 0
    groups = []
    for g in payload["param_groups"]:
        groups.append({**g, "params": list(range(index, index + len(g["params"])))})
        index += len(g["params"])
    optimizer.load_state_dict({"state": {}, "param_groups": groups})
    for fqn, st in payload["state"].items():
        if fqn not in params:
            raise ValueError(f"{where}: state for {fqn!r}, which the model does not have")
        optimizer.state[params[fqn]] = {
            k: _decode_state(v, params[fqn], f"{where}[{fqn!r}][{k!r}]") for k, v in st.items()
        }


def capture_rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU, python `random`, numpy global, CUDA if present), weights_only-safe."""
    np_state = np.random.get_state(legacy=False)
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np_state["state"]["key"].astype(np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    """Inverse of `capture_rng_state`."""
    torch.set_rng_state(state["torch"])
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _copy_processor_files(source: Path, dest: Path) -> list[str]:
    copied = []
    for f in sorted(source.iterdir()):
        if (
            f.is_file()
            and f.name not in _NOT_PROCESSOR_FILES
            and f.suffix in _PROCESSOR_SUFFIXES
            and not f.name.endswith(".index.json")
        ):
            shutil.copy2(f, dest / f.name)
            copied.append(f.name)
    return copied


def _write_json_durably(path: Path, payload: Mapping[str, Any]) -> None:
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True)
        fh.flush()
        os.fsync(fh.fileno())


def save_checkpoint(
    output_dir: str | os.PathLike,
    step: int,
    *,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    processor_source: str | os.PathLike | None = None,
    processor: Any = None,
    training_state: Mapping[str, Any] | None = None,
    arch: str | None = None,
    config: Any = None,
    dtype: torch.dtype | None = None,
) -> Path:
    """Write checkpoint `step` atomically and return its folder. Collective: call on every rank.

    Args:
        output_dir: the run folder; the checkpoint goes to `<output_dir>/checkpoints/step_{step:06d}`.
        step: optimizer steps done so far.
        model: the (FSDP2-sharded or plain) Hugging Face model; saved with `save_pretrained` from the gathered
            full state dict, in `dtype`, with the original checkpoint key names.
        optimizer: saved as its full FQN-keyed state dict, or per rank for quantized (torchao low-bit) states
            (None: model only).
        processor_source: model folder whose tokenizer / processor files are copied (the run's `model.path`).
        processor: alternatively, a processor object saved with `save_pretrained`.
        training_state: anything else to restore (data iterator state, sampler seed, metrics counters):
            tensors, numbers, strings, lists, tuples, dicts only (it is read back with weights_only=True).
        arch: recorded in vppo_checkpoint.json ("qwen2_5_vl" | "qwen3_vl").
        config: the run's config (DictConfig or mapping), saved resolved as training_config.yaml; a resumed run
            compares its own against it (`check_resume_config`).
        dtype: the HF weights' dtype (torch.float32 | torch.bfloat16; None: the parameters' own), named in
            config.json. float32 parameters exported in bfloat16 also get `MASTER_LOW_BITS_FILE`, so that
            `restore_master_weights` restores them exactly (module docstring).
    """
    rank, world = _rank(), _world()
    final = checkpoint_dir(output_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    failure: str | None = None  # this rank's write error; every rank learns whether any rank failed

    def attempt(write) -> None:
        nonlocal failure
        if failure is None:
            try:
                write()
            except (OSError, RuntimeError) as err:  # torch.save raises RuntimeError on a full disk
                failure = f"rank {rank}: {_write_failure(err, tmp)}"

    def any_failed() -> str | None:
        """Collective: the first failure of any rank (None if none), the same on every rank."""
        if world == 1:
            return failure
        failures: list[str | None] = [None] * world
        dist.all_gather_object(failures, failure)
        return next((f for f in failures if f is not None), None)

    def give_up(reason: str) -> None:
        if rank == 0:
            shutil.rmtree(tmp, ignore_errors=True)
        _barrier()
        raise CheckpointWriteError(
            f"checkpoint step {step} not written to {final}: {reason}. The previous checkpoints are intact "
            f"(latest: {find_latest_checkpoint(output_dir)})"
        )

    if rank == 0:

        def make_tmp() -> None:
            if tmp.exists():  # left over by a run killed mid-save
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

        attempt(make_tmp)
    if (reason := any_failed()) is not None:
        give_up(reason)
    attempt(lambda: torch.save(capture_rng_state(), tmp / f"rng_state_rank{rank}.pt"))

    full_sd = gather_full_state_dict(model)  # collective: every rank takes part even after a local failure
    weights_dtype = None
    if rank == 0:
        full_sd, low_bits = _export(full_sd, dtype)
        weights_dtype = next(
            (str(t.dtype).removeprefix("torch.") for t in full_sd.values() if t.is_floating_point()), None
        )
        attempt(lambda: model.save_pretrained(str(tmp), state_dict=full_sd, is_main_process=True))
        if dtype is not None:
            attempt(lambda: _set_config_dtype(tmp, dtype))
        if low_bits:
            from safetensors.torch import save_file

            attempt(lambda: save_file(low_bits, str(tmp / MASTER_LOW_BITS_FILE)))
        low_bits = None
        if processor is not None:
            attempt(lambda: processor.save_pretrained(str(tmp)))
        elif processor_source is not None:
            attempt(lambda: _copy_processor_files(Path(processor_source), tmp))
    full_sd = None  # free rank 0's full copy before the optimizer's

    optim_sd = None
    optimizer_format = None
    if optimizer is not None and _needs_sharded_optimizer_file(optimizer):
        optimizer_format = "sharded"
        shard = sharded_optimizer_state(model, optimizer)
        attempt(lambda: torch.save(shard, tmp / OPTIMIZER_SHARD_FILE.format(rank=rank)))
        shard = None
    elif optimizer is not None:
        optimizer_format = "full"
        optim_sd = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if rank == 0:
        attempt(lambda: torch.save({"step": int(step), "state": dict(training_state or {})}, tmp / TRAINING_STATE_FILE))
        if optim_sd is not None:
            attempt(lambda: torch.save(optim_sd, tmp / OPTIMIZER_FILE))
        if config is not None:
            attempt(lambda: OmegaConf.save(OmegaConf.create(config), tmp / CONFIG_FILE, resolve=True))
    optim_sd = None
    if (reason := any_failed()) is not None:  # also the barrier: every rank's files are in place
        give_up(reason)
    if rank == 0:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        attempt(
            lambda: _write_json_durably(
                tmp / META_FILE,
                {
                    "format_version": FORMAT_VERSION,
                    "step": int(step),
                    "arch": arch,
                    "model_type": model_type,
                    "world_size": world,
                    "optimizer_format": optimizer_format,
                    "weights_dtype": weights_dtype,
                    "master_low_bits": holds_master_weights(tmp),
                    "files": _manifest(tmp),
                },
            )
        )
    if (reason := any_failed()) is not None:
        give_up(reason)
    if rank == 0:
        if final.exists():  # re-saving a step (e.g. after a resume): swap, then drop the old copy
            old = final.parent / f".old_{final.name}"
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old)
        else:
            os.replace(tmp, final)
        fd = os.open(final.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _barrier()
    return final


def load_training_state(
    ckpt_dir: str | os.PathLike,
    *,
    model: torch.nn.Module | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    restore_rng: bool = True,
) -> dict[str, Any]:
    """Restore what `save_checkpoint` wrote besides the weights. Collective when `optimizer` is given.

    Loads the optimizer state into `optimizer` (sharded or not; only rank 0 reads it and FSDP broadcasts),
    restores this rank's RNG states (`restore_rng`), and returns `{"step": int, "state": training_state}`.
    The model weights themselves are loaded by building the policy from `ckpt_dir` (a Hugging Face folder).
    Raises ValueError if the folder is not a complete checkpoint.
    """
    ckpt = Path(ckpt_dir)
    if not (ckpt / META_FILE).is_file():
        raise ValueError(f"{ckpt} is not a complete vppo checkpoint (no {META_FILE}); pick a step_N folder")
    rank = _rank()
    payload = torch.load(ckpt / TRAINING_STATE_FILE, map_location="cpu", weights_only=True)
    if optimizer is not None:
        if model is None:
            raise ValueError("load_training_state: pass model= together with optimizer=")
        meta = json.loads((ckpt / META_FILE).read_text())
        if meta.get("optimizer_format") == "sharded":
            if meta["world_size"] != _world():
                raise ValueError(
                    f"{ckpt} holds a low-bit optimizer state sharded over {meta['world_size']} ranks, but this run "
                    f"has {_world()}: resume with the same world size (and world.hsdp_replicas), or set "
                    "training.resume=never to start over"
                )
            shard = ckpt / OPTIMIZER_SHARD_FILE.format(rank=rank)
            local = torch.load(shard, map_location="cpu", weights_only=True)
            load_sharded_optimizer_state(model, optimizer, local, where=str(shard))
            del local
        elif not (ckpt / OPTIMIZER_FILE).is_file():
            raise ValueError(f"{ckpt} holds no optimizer state (it was saved with optimizer=None)")
        else:
            # Only rank 0 reads the full optimizer state; FSDP scatters each rank's shard from it.
            full = torch.load(ckpt / OPTIMIZER_FILE, map_location="cpu", weights_only=True) if rank == 0 else {}
            set_optimizer_state_dict(
                model,
                optimizer,
                optim_state_dict=full,
                options=StateDictOptions(full_state_dict=True, broadcast_from_rank0=_world() > 1),
            )
            del full
    if restore_rng:
        rng_file = ckpt / f"rng_state_rank{rank}.pt"
        if not rng_file.is_file():
            warnings.warn(
                f"{ckpt} has no RNG state for rank {rank} (saved with fewer ranks); this rank continues from "
                "rank 0's RNG state, so sampling differs from an uninterrupted run",
                stacklevel=2,
            )
            rng_file = ckpt / "rng_state_rank0.pt"
        restore_rng_state(torch.load(rng_file, map_location="cpu", weights_only=True))
    return {"step": int(payload["step"]), "state": payload["state"]}


def model_type_of(model_dir: str | os.PathLike) -> str:
    """`model_type` from `<model_dir>/config.json` (e.g. "qwen2_5_vl"); ValueError if there is none."""
    cfg_file = Path(model_dir) / "config.json"
    if not cfg_file.is_file():
        raise ValueError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    return json.loads(cfg_file.read_text()).get("model_type", "")


def check_checkpoint_matches(
    ckpt_dir: str | os.PathLike, *, arch: str, model_dir: str | os.PathLike | None = None
) -> None:
    """Raise ValueError, before any compute, if `ckpt_dir` was written for another model.

    Checks the checkpoint's `config.json` `model_type` against `arch` ("qwen2_5_vl" | "qwen3_vl") and, when
    `model_dir` (the run's `model.path`) is given, that the sizes in `_STRUCTURE_FIELDS` are equal.
    """
    ckpt_type = model_type_of(ckpt_dir)
    if ckpt_type != arch:
        raise ValueError(
            f"checkpoint {ckpt_dir} holds a {ckpt_type!r} model but model.arch is {arch!r}; "
            f"resume from a checkpoint of this model, or set training.resume=never / another output_dir"
        )
    if model_dir is None:
        return
    a = json.loads((Path(ckpt_dir) / "config.json").read_text())
    b = json.loads((Path(model_dir) / "config.json").read_text())
    diffs = []
    for section, fields in _STRUCTURE_FIELDS.items():
        for field in fields:
            va, vb = a.get(section, {}).get(field), b.get(section, {}).get(field)
            if va != vb:
                diffs.append(f"{section}.{field}: checkpoint {va} vs model.path {vb}")
    if diffs:
        raise ValueError(
            f"checkpoint {ckpt_dir} was written for a different model than model.path={model_dir}: "
            + "; ".join(diffs)
            + ". Resume from a checkpoint of this model, or set training.resume=never / another output_dir"
        )


def check_resume_config(ckpt_dir: str | os.PathLike, cfg: Any) -> list[str]:
    """Compare this launch's config `cfg` with the one saved in `ckpt_dir`; raise ValueError listing every key that
    changes what is trained (`config_schema.config_changes`) unless `training.accept_config_changes` is true.

    Returns the accepted changes ([] when there are none, or when the checkpoint holds no config: written before
    configs were saved, reported as a warning). Call before any compute.
    """
    from vppo_recipes.config_schema import config_changes

    saved_file = Path(ckpt_dir) / CONFIG_FILE
    if not saved_file.is_file():
        warnings.warn(f"{ckpt_dir} holds no {CONFIG_FILE}: the resumed run's config cannot be compared", stacklevel=2)
        return []
    saved = OmegaConf.to_container(OmegaConf.load(saved_file), resolve=True)
    changes = config_changes(saved, OmegaConf.to_container(OmegaConf.create(cfg), resolve=True))
    if changes and not cfg.training.accept_config_changes:
        listed = "\n".join(f"  - {c}" for c in changes)
        raise ValueError(
            f"resuming from {ckpt_dir} with a config that changes what is trained:\n{listed}\n"
            "Restore those values, or pass training.accept_config_changes=true to continue with the new ones "
            "(or training.resume=never / another output_dir to start over)"
        )
    return changes


def apply_optimizer_settings(optimizer: torch.optim.Optimizer, lr_scheduler: Any, optimizer_cfg: Mapping) -> None:
    """Put the config's optimizer settings (lr, weight_decay, betas, ...) back after a resume restored the
    checkpoint's: `load_state_dict` brings back the saved param-group values and the scheduler's base lr, so
    without this an accepted lr change would be ignored. The scheduler keeps its position (warmup included)."""
    settings = {k: v for k, v in dict(optimizer_cfg).items() if k != "_component_"}
    for group in optimizer.param_groups:
        for key, value in settings.items():
            if key in group:
                group[key] = tuple(value) if isinstance(group[key], tuple) else value
        if "lr" in settings:
            group["initial_lr"] = settings["lr"]
    if "lr" in settings and lr_scheduler is not None:
        lr_scheduler.base_lrs = [settings["lr"]] * len(optimizer.param_groups)
        for group, factor in zip(optimizer.param_groups, lr_scheduler.lr_lambdas):
            group["lr"] = settings["lr"] * factor(lr_scheduler.last_epoch)
