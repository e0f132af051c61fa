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

A LoRA run's checkpoint (`model.lora.rank` > 0, `weights_format: "lora_adapter"` in vppo_checkpoint.json) holds the
adapter instead of the model, and is itself a peft adapter folder (`PeftModel.from_pretrained(base, folder)`):

    adapter_model.safetensors, adapter_config.json            the adapter weights (float32 masters, peft's names)
                                                              and LoraConfig; base_model_name_or_path = model.path
    config.json, generation_config.json                       the base model's (the architecture check on resume)
    tokenizer / processor files, training_state.pt, training_config.yaml, optimizer.pt (the adapters' state
    only), rng_state_rank{r}.pt, vppo_checkpoint.json         as above

It resumes from model.path plus the adapter; `vppo-recipes export-lora` writes it as a merged Hugging Face folder.

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
dtype `model.dtype`); float32 master weights exported in bfloat16 are split bit for bit into the export and
`master_weights_low16.safetensors`, and joined back by `restore_master_weights` (`vppo_recipes.checkpoint_weights`).

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
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from vppo_recipes.checkpoint_optimizer import _is_state_subclass, load_sharded_optimizer_state, sharded_optimizer_state
from vppo_recipes.checkpoint_weights import (
    MASTER_LOW_BITS_FILE,
    _export,
    _set_config_dtype,
    gather_full_state_dict,
    holds_master_weights,
)

# The weights' export and master weights are in vppo_recipes.checkpoint_weights, the sharded optimizer state in
# vppo_recipes.checkpoint_optimizer.
__all__ = [
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
    "load_training_state",
    "model_type_of",
    "restore_rng_state",
    "save_checkpoint",
    "verify_checkpoint",
]

FORMAT_VERSION = 2  # 2: vppo_checkpoint.json holds the files' manifest
META_FILE = "vppo_checkpoint.json"
TRAINING_STATE_FILE = "training_state.pt"
CONFIG_FILE = "training_config.yaml"
OPTIMIZER_FILE = "optimizer.pt"
OPTIMIZER_SHARD_FILE = "optimizer_rank{rank}.pt"
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
WEIGHTS_FORMATS = ("full", "lora_adapter")  # vppo_checkpoint.json `weights_format` (absent: full)


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
    weights_format = meta.get("weights_format", "full")
    if weights_format not in WEIGHTS_FORMATS:
        problems.append(f"{where}: 'weights_format' is {weights_format!r} (damaged)")
    elif weights_format == "lora_adapter":
        from vppo_recipes.lora import ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE

        required += [ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE]
    elif "model.safetensors" not in files and "model.safetensors.index.json" not in files:
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


def _needs_sharded_optimizer_file(optimizer: torch.optim.Optimizer) -> bool:
    """Whether any rank holds a quantized state. Collective: torchao quantizes a state only when this rank's shard
    has >= 4096 elements, so with uneven shards ranks can differ, and all must take the same path."""
    mine = any(_is_state_subclass(v) for st in optimizer.state.values() for v in st.values())
    if _world() == 1:
        return mine
    flags: list[Any] = [None] * _world()
    dist.all_gather_object(flags, mine)
    return any(flags)


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


def _lora():
    """vppo_recipes.lora, imported when a LoRA checkpoint is written (it imports peft)."""
    from vppo_recipes import lora

    return lora


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
    lora_base: str | os.PathLike | None = None,
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
        lora_base: the base model folder of a LoRA-adapted `model` (vppo_recipes.lora): then the checkpoint holds the
            adapter alone, in its own dtype (float32 masters; `dtype` is not applied), as a peft adapter folder
            naming `lora_base`, with the base's config.json and generation_config.json (module docstring).
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

    full_sd = {} if lora_base is not None else gather_full_state_dict(model)  # collective: every rank takes part
    adapter = None if lora_base is None else _lora().adapter_state_dict(model)  # even after a local failure
    weights_dtype = None
    if rank == 0 and adapter is not None:
        weights_dtype = next((str(t.dtype).removeprefix("torch.") for t in adapter.values()), None)
        attempt(lambda: _lora().save_adapter(tmp, adapter, model, base_model=lora_base))
        for name in ("config.json", "generation_config.json"):
            if (Path(lora_base) / name).is_file():
                attempt(lambda name=name: shutil.copy2(Path(lora_base) / name, tmp / name))
        if processor is not None:
            attempt(lambda: processor.save_pretrained(str(tmp)))
        elif processor_source is not None:
            attempt(lambda: _copy_processor_files(Path(processor_source), tmp))
    adapter = None
    if rank == 0 and lora_base is None:
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
                    "weights_format": "full" if lora_base is None else "lora_adapter",
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
