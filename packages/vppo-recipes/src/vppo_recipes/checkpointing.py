"""Checkpoints: the model in Hugging Face format plus the training state, written atomically, resumable.

Layout of one checkpoint (`<output_dir>/checkpoints/step_000004/`), which is itself a Hugging Face model folder
(`from_pretrained`, vLLM and vppo-eval load it directly; they ignore the extra files):

    config.json, generation_config.json, model.safetensors   the policy (`save_pretrained`, original key names)
    tokenizer / processor files                               copied from the model folder the run started from
    training_state.pt                                         step, data position, anything else the recipe passes
    optimizer.pt                                              optimizer state (full, keyed by parameter FQN)
    rng_state_rank{r}.pt                                      torch / python / numpy (/ cuda) RNG of each rank
    vppo_checkpoint.json                                      format version, step, arch, world size; written last

Atomicity: everything is written into `checkpoints/.tmp_step_000004/`, which rank 0 renames to `step_000004/`
(`os.replace`, atomic on POSIX) only after every rank has finished. A run killed mid-save leaves a `.tmp_*`
folder that `find_latest_checkpoint` ignores (and the next save removes), never a half checkpoint as "latest".

Everything is saved with plain tensors / Python containers and read back with `torch.load(weights_only=True)`.
The optimizer state is the *full* state dict keyed by parameter FQN (`get_optimizer_state_dict(full_state_dict=
True, cpu_offload=True)`), so a run may resume on a different number of ranks. On resume it is loaded back into
the FSDP2-sharded optimizer with `set_optimizer_state_dict(full_state_dict=True, broadcast_from_rank0=True)`:
only rank 0 reads the file. Rank 0 holds the whole model + optimizer state in CPU memory while saving (as
torchtune's full-finetune recipes do); the checkpoint folder must be on a file system every rank can see.

All functions that take `model` / `optimizer` are collective under torch.distributed: call them on every rank.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

__all__ = [
    "FORMAT_VERSION",
    "capture_rng_state",
    "check_checkpoint_matches",
    "checkpoint_dir",
    "find_latest_checkpoint",
    "gather_full_state_dict",
    "load_training_state",
    "model_type_of",
    "restore_rng_state",
    "save_checkpoint",
]

FORMAT_VERSION = 1
META_FILE = "vppo_checkpoint.json"
TRAINING_STATE_FILE = "training_state.pt"
OPTIMIZER_FILE = "optimizer.pt"
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


def gather_full_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Full (unsharded) model state dict on CPU, on rank 0; `{}` on the other ranks. Collective.

    Works for an FSDP2 (`fully_shard`) model and for a plain one (then every rank gets the full dict).
    """
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


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
) -> Path:
    """Write checkpoint `step` atomically and return its folder. Collective: call on every rank.

    Args:
        output_dir: the run folder; the checkpoint goes to `<output_dir>/checkpoints/step_{step:06d}`.
        step: optimizer steps done so far.
        model: the (FSDP2-sharded or plain) Hugging Face model; saved with `save_pretrained` from the gathered
            full state dict, in the parameters' dtype, with the original checkpoint key names.
        optimizer: saved as its full FQN-keyed state dict (None: model only).
        processor_source: model folder whose tokenizer / processor files are copied (the run's `model.path`).
        processor: alternatively, a processor object saved with `save_pretrained`.
        training_state: anything else to restore (data iterator state, sampler seed, metrics counters):
            tensors, numbers, strings, lists, tuples, dicts only (it is read back with weights_only=True).
        arch: recorded in vppo_checkpoint.json ("qwen2_5_vl" | "qwen3_vl").
    """
    rank, world = _rank(), _world()
    final = checkpoint_dir(output_dir, step)
    tmp = final.parent / f".tmp_{final.name}"
    if rank == 0:
        if tmp.exists():  # left over by a run killed mid-save
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    torch.save(capture_rng_state(), tmp / f"rng_state_rank{rank}.pt")

    full_sd = gather_full_state_dict(model)
    if rank == 0:
        model.save_pretrained(str(tmp), state_dict=full_sd, is_main_process=True)
        if processor is not None:
            processor.save_pretrained(str(tmp))
        elif processor_source is not None:
            _copy_processor_files(Path(processor_source), tmp)
    del full_sd

    optim_sd = None
    if optimizer is not None:
        optim_sd = get_optimizer_state_dict(
            model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
        )
    if rank == 0:
        torch.save({"step": int(step), "state": dict(training_state or {})}, tmp / TRAINING_STATE_FILE)
        if optim_sd is not None:
            torch.save(optim_sd, tmp / OPTIMIZER_FILE)
    del optim_sd
    _barrier()  # every rank's RNG file is in place
    if rank == 0:
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        _write_json_durably(
            tmp / META_FILE,
            {
                "format_version": FORMAT_VERSION,
                "step": int(step),
                "arch": arch,
                "model_type": model_type,
                "world_size": world,
            },
        )
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
        if not (ckpt / OPTIMIZER_FILE).is_file():
            raise ValueError(f"{ckpt} holds no optimizer state (it was saved with optimizer=None)")
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
