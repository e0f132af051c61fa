"""vppo-recipes: torchtune-style FSDP2 recipes (RL: VPPO / PGPO / DAPO / GRPO and the
methods that followed VPPO: PAPO, CFPO, DVRP, ToR, PEPO, CGPO, VEPO; SFT) for Qwen2.5-VL / Qwen3-VL.

The recipes themselves are run with `vppo-recipes run` or `tune run` (see `vppo_recipes.cli`); this module exposes
the building blocks they share. Names are imported on first use (PEP 562), so `vppo-recipes ls` does not pay for
importing torch, torchtune and transformers.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    # config_schema
    "ConfigError": "config_schema",
    "check_world_size": "config_schema",
    "validate_config": "config_schema",
    # data
    "DEFAULT_COLUMNS": "data",
    "Example": "data",
    "ExampleStream": "data",
    "PromptIterator": "data",
    "SkipRow": "data",
    "VisualQADataset": "data",
    "build_response": "data",
    "load_source": "data",
    "rank_slice": "data",
    # checkpointing
    "CheckpointWriteError": "checkpointing",
    "capture_rng_state": "checkpointing",
    "check_checkpoint_matches": "checkpointing",
    "checkpoint_dir": "checkpointing",
    "find_latest_checkpoint": "checkpointing",
    "find_resumable_checkpoint": "checkpointing",
    "gather_full_state_dict": "checkpoint_weights",
    "load_training_state": "checkpointing",
    "restore_rng_state": "checkpointing",
    "save_checkpoint": "checkpointing",
    "verify_checkpoint": "checkpointing",
    # lora
    "LoraSettings": "lora",
    "adapters_disabled": "lora",
    "apply_lora": "lora",
    "export_merged": "lora",
    "merged_full_tensors": "lora",
    # metric_logging
    "JsonlLogger": "metric_logging",
    "NullLogger": "metric_logging",
    "build_metric_logger": "metric_logging",
    "read_jsonl": "metric_logging",
    # sharding
    "call_in_root_forward": "sharding",
    "shard_policy": "sharding",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'vppo_recipes' has no attribute {name!r}")
    value = getattr(importlib.import_module(f"vppo_recipes.{module}"), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
