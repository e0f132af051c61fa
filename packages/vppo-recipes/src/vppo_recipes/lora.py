"""LoRA adapters on a Qwen2.5-VL / Qwen3-VL policy (`model.lora` in both recipes), with peft.

The adapters are peft's own LoRA layers, put in place by `peft.inject_adapter_in_model` (adapter name "default"),
so every module keeps its Hugging Face path: a targeted `nn.Linear` at `P` becomes a peft `lora.Linear` holding the
frozen layer at `P.base_layer` and the adapter at `P.lora_A.default` ([r, in]) and `P.lora_B.default` ([out, r]);
its output is base(x) + scaling * B(A(dropout(x))) with scaling = alpha / r. No `PeftModel` wrapper: the recipes, FSDP2
sharding and the forward passes see the transformers model itself.

What this module gives the recipes (each a small function):

    lora_settings(cfg)            the `model.lora` section -> LoraSettings, or None when rank is 0 (LoRA off)
    apply_lora(model, settings)   freeze every weight, inject the adapters (decoder layers' projections by default)
    trainable_parameters(model)   what the optimizer gets: the adapter parameters only
    adapters_disabled(model)      context: the frozen base model (adapters off), e.g. a reference policy
    adapter_state_dict(model)     the adapter weights, gathered to full tensors, in peft's file names (collective)
    merged_full_tensors(model)    the full HF state dict of base + adapter, W + scaling * B @ A, LoRA names dropped
                                  (collective, one tensor at a time: what the rollout engines load)
    save_adapter / load_adapter   a peft adapter folder (adapter_model.safetensors + adapter_config.json)
    export_merged(...)            an adapter folder merged into its base, written as a Hugging Face folder
    export_lora_checkpoint(...)   `vppo-recipes export-lora CKPT OUT`: OUT/adapter (peft) and OUT/merged (HF)

The adapter folder is what `peft.PeftModel.from_pretrained(base, folder)` loads: weights under peft's names
("base_model.model.<module path>.lora_A.weight", the adapter name dropped) and a LoraConfig whose target_modules are
the full module paths adapted, with `base_model_name_or_path` the run's `model.path`.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.distributed.tensor import DTensor

from vppo_recipes.sharding import find_blocks

__all__ = [
    "ADAPTER",
    "ADAPTER_CONFIG_FILE",
    "ADAPTER_WEIGHTS_FILE",
    "LM_PROJECTIONS",
    "LoraSettings",
    "adapter_state_dict",
    "adapters_disabled",
    "apply_lora",
    "export_lora_checkpoint",
    "export_merged",
    "load_adapter",
    "lora_scalings",
    "lora_settings",
    "merge_lora_weight",
    "merged_full_tensors",
    "merged_tensors",
    "save_adapter",
    "target_module_names",
    "trainable_parameters",
]

ADAPTER = "default"  # peft's adapter name; module paths hold it (`lora_A.default`), peft's files do not
ADAPTER_WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_CONFIG_FILE = "adapter_config.json"
PEFT_PREFIX = "base_model.model."  # what PeftModel adds before the model's own module paths in its files
# The decoder layers' attention and MLP projections of Qwen2.5-VL and Qwen3-VL (the LoRA RL default of verl/EasyR1)
LM_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
_WRAPPER = "_checkpoint_wrapped_module."  # activation checkpointing's prefix in module names (not in state_dict)


@dataclass(frozen=True)
class LoraSettings:
    """`model.lora`: rank r, alpha (scaling = alpha / r), dropout on the adapter's input, the projection names adapted
    in the decoder layers, and whether the vision blocks' linear layers get adapters too."""

    rank: int
    alpha: float
    dropout: float = 0.0
    target_modules: tuple[str, ...] = LM_PROJECTIONS
    vision: bool = False

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def lora_settings(cfg: Any) -> LoraSettings | None:
    """The validated config's `model.lora` as LoraSettings, or None when LoRA is off (rank 0)."""
    section = cfg["model"]["lora"]
    if not section["rank"]:
        return None
    return LoraSettings(
        rank=int(section["rank"]),
        alpha=float(section["rank"] if section["alpha"] is None else section["alpha"]),
        dropout=float(section["dropout"]),
        target_modules=tuple(section["target_modules"]),
        vision=bool(section["vision"]),
    )


def _module_names(model: nn.Module) -> dict[int, str]:
    return {id(m): name for name, m in model.named_modules()}


def target_module_names(model: nn.Module, settings: LoraSettings) -> list[str]:
    """Full paths of the `nn.Linear` modules to adapt: in every decoder layer those whose own name is one of
    `settings.target_modules`; with `settings.vision`, also every linear layer of the vision blocks (attention qkv /
    proj and the MLP; the patch merger and lm_head never). Raises ValueError for a target name that no decoder layer
    has, naming the ones it has."""
    vision_blocks, layers = find_blocks(model)
    names = _module_names(model)
    found: list[str] = []
    present: set[str] = set()
    for layer in layers:
        prefix = names[id(layer)]
        for sub, module in layer.named_modules():
            if isinstance(module, nn.Linear):
                present.add(sub.rsplit(".", 1)[-1])
                if sub.rsplit(".", 1)[-1] in settings.target_modules:
                    found.append(f"{prefix}.{sub}")
    unknown = sorted(set(settings.target_modules) - present)
    if unknown:
        raise ValueError(
            f"model.lora.target_modules: {unknown} name no linear layer of the decoder layers of "
            f"{type(model).__name__}; they have {sorted(present)}"
        )
    if settings.vision:
        for block in vision_blocks:
            prefix = names[id(block)]
            found += [f"{prefix}.{sub}" for sub, m in block.named_modules() if isinstance(m, nn.Linear)]
    return found


def apply_lora(model: nn.Module, settings: LoraSettings, *, base_dtype: torch.dtype | None = None) -> nn.Module:
    """Freeze every parameter of `model` and inject peft LoRA adapters (A: kaiming-uniform, B: zeros, so the adapted
    model starts equal to the base) into `target_module_names`; returns the same model. Call before sharding.

    base_dtype: store the frozen base in this dtype (the recipes pass the compute dtype `model.dtype`): a frozen
    weight needs no float32 master, and FSDP2's MixedPrecisionPolicy would cast it to that dtype for every forward
    anyway (the same rounding), so bfloat16 halves the base's bytes and changes no result. The adapters stay in the
    model's dtype (float32 masters)."""
    from peft import LoraConfig, inject_adapter_in_model

    targets = target_module_names(model, settings)
    model.requires_grad_(False)
    config = LoraConfig(
        r=settings.rank,
        lora_alpha=settings.alpha,
        lora_dropout=settings.dropout,
        target_modules=targets,
        bias="none",
    )
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)  # (peft gives adapters their base layer's dtype)
    if base_dtype is not None:  # after injecting: the adapters keep the float32 masters
        for p in model.parameters():
            if not p.requires_grad:
                p.data = p.data.to(base_dtype)
    return model


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters that require gradients (with LoRA: the adapters' A and B, nothing of the base)."""
    return [p for p in model.parameters() if p.requires_grad]


def _lora_layers(model: nn.Module) -> list[nn.Module]:
    from peft.tuners.lora import LoraLayer

    return [m for m in model.modules() if isinstance(m, LoraLayer)]


@contextlib.contextmanager
def adapters_disabled(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block `model` computes its frozen base (every adapter off), at no memory cost: the reference policy
    of a LoRA run. Restores the adapters (and their requires_grad) on exit. Use in no-grad passes only."""
    layers = _lora_layers(model)
    for layer in layers:
        layer.enable_adapters(False)
    try:
        yield model
    finally:
        for layer in layers:
            layer.enable_adapters(True)


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor of the whole value (a DTensor shard is all-gathered: collective)."""
    return (t.full_tensor() if isinstance(t, DTensor) else t).detach()


def is_lora_key(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """{peft file name: full tensor on CPU} of the adapter weights (A and B of every adapted layer, in their own dtype:
    the float32 masters). Collective under FSDP2: every rank gathers every adapter tensor, in the same order."""
    from peft import get_peft_model_state_dict

    full = {name: _full(t).cpu() for name, t in model.state_dict().items() if is_lora_key(name)}
    own = get_peft_model_state_dict(model, state_dict=full, adapter_name=ADAPTER)
    return {PEFT_PREFIX + name: t.contiguous() for name, t in own.items()}


def save_adapter(
    folder: str | Path, tensors: Mapping[str, torch.Tensor], model: nn.Module, *, base_model: str | Path
) -> None:
    """Write a peft adapter folder: `tensors` (from `adapter_state_dict`) as adapter_model.safetensors and the
    model's LoraConfig, naming `base_model` (the run's model.path), as adapter_config.json. Rank 0 only."""
    import copy

    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(dict(tensors), str(folder / ADAPTER_WEIGHTS_FILE), metadata={"format": "pt"})
    config = copy.copy(model.peft_config[ADAPTER])
    config.base_model_name_or_path = str(base_model)
    config.inference_mode = True
    config.save_pretrained(str(folder))


def load_adapter(model: nn.Module, folder: str | Path) -> None:
    """Load `folder`'s adapter weights into a model that `apply_lora` adapted with the same settings (before
    sharding). Raises ValueError naming the file when a tensor is missing, unexpected, or of another shape."""
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from safetensors.torch import load_file

    path = Path(folder) / ADAPTER_WEIGHTS_FILE
    if not path.is_file():
        raise ValueError(
            f"{folder} holds no LoRA adapter ({ADAPTER_WEIGHTS_FILE}): it is a full fine-tuning checkpoint; resume it "
            "with model.lora.rank=0, or start the LoRA run in another output_dir"
        )
    saved = load_file(str(path))
    stripped = {k.removeprefix(PEFT_PREFIX): v for k, v in saved.items()}
    expected = get_peft_model_state_dict(model, adapter_name=ADAPTER)
    missing, unexpected = sorted(set(expected) - set(stripped)), sorted(set(stripped) - set(expected))
    shapes = [k for k in set(expected) & set(stripped) if expected[k].shape != stripped[k].shape]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not fit this model's adapters (model.lora rank / target_modules / vision must be the "
            f"checkpoint's): missing {missing[:3]}, unexpected {unexpected[:3]}, other shapes {shapes[:3]}"
        )
    set_peft_model_state_dict(model, stripped, adapter_name=ADAPTER)


def merge_lora_weight(weight: torch.Tensor, lora_A: torch.Tensor, lora_B: torch.Tensor, scaling: float) -> torch.Tensor:
    """The merged weight of one adapted linear layer: W + scaling * B @ A, in float32.

    weight [out, in] (any float dtype), lora_A [r, in], lora_B [out, r]; returns [out, in] float32 (the caller's
    engine or export casts it)."""
    return weight.float() + scaling * (lora_B.float() @ lora_A.float())


def lora_scalings(model: nn.Module) -> dict[str, float]:
    """{module path as state_dict names it: scaling} of every adapted layer (activation-checkpoint prefixes dropped)."""
    from peft.tuners.lora import LoraLayer

    return {
        name.replace(_WRAPPER, ""): float(m.scaling[ADAPTER])
        for name, m in model.named_modules()
        if isinstance(m, LoraLayer)
    }


def merged_tensors(
    named: Iterable[tuple[str, torch.Tensor]], scalings: Mapping[str, float]
) -> Iterator[tuple[str, torch.Tensor]]:
    """Stream an adapted model's (name, full tensor) pairs as the plain HF model's: `P.base_layer.weight` with its
    `P.lora_A.default.weight` and `P.lora_B.default.weight` becomes `P.weight` = merge_lora_weight(...) with
    scalings[P]; `P.base_layer.bias` becomes `P.bias`; every other tensor passes unchanged. A layer's tensors are
    held only until its three have arrived (state_dict order keeps them together). Raises ValueError if one is
    missing at the end."""
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in named:
        for part in ("base_layer.weight", f"lora_A.{ADAPTER}.weight", f"lora_B.{ADAPTER}.weight"):
            if name.endswith("." + part):
                module = name[: -len(part) - 1]
                parts = pending.setdefault(module, {})
                parts[part.split(".")[0]] = t
                if len(parts) == 3:
                    del pending[module]
                    yield (
                        f"{module}.weight",
                        merge_lora_weight(parts["base_layer"], parts["lora_A"], parts["lora_B"], scalings[module]),
                    )
                break
        else:
            if ".lora_" in name:  # another adapter's or a LoRA variant's tensor: never silently dropped
                raise ValueError(f"merged_tensors: {name!r} is no tensor of a plain LoRA adapter {ADAPTER!r}")
            yield name.replace(".base_layer.", "."), t
    if pending:
        raise ValueError(f"merged_tensors: incomplete adapted layers (a tensor missing): {sorted(pending)[:3]}")


def merged_full_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """`merged_tensors` of the (FSDP2-sharded or plain) adapted model, each tensor gathered to full when it is
    reached. Collective: every rank must consume the whole iterator."""
    full = ((name, _full(t)) for name, t in model.state_dict().items())
    return merged_tensors(full, lora_scalings(model))


def export_merged(
    adapter_dir: str | Path,
    out: str | Path,
    *,
    base_model: str | Path | None = None,
    dtype: torch.dtype = torch.bfloat16,
    trust_remote_code: bool = False,
) -> Path:
    """Merge a peft adapter folder into its base and write a Hugging Face folder that transformers and vLLM load.

    base_model: the base folder (default: the adapter's `base_model_name_or_path`). The base is loaded in float32,
    each adapted weight replaced in place by W + scaling * B @ A (one copy of the model in memory), and saved in
    `dtype` with the base's generation_config.json and tokenizer / processor files. Returns `out`."""
    from safetensors.torch import load_file

    from vppo_recipes.checkpoint_weights import _set_config_dtype
    from vppo_recipes.checkpointing import _copy_processor_files
    from vppo_rollout.loading import load_policy

    adapter_dir, out = Path(adapter_dir), Path(out)
    config = json.loads((adapter_dir / ADAPTER_CONFIG_FILE).read_text())
    base = Path(base_model or config["base_model_name_or_path"])
    scaling = _plain_lora_scaling(config, adapter_dir)
    weights = load_file(str(adapter_dir / ADAPTER_WEIGHTS_FILE))
    model = load_policy(str(base), dtype=torch.float32, device="cpu", trust_remote_code=trust_remote_code)
    with torch.no_grad():
        for key, lora_A in weights.items():
            if ".lora_A." not in key:
                continue
            module = key.removeprefix(PEFT_PREFIX).rsplit(".lora_A.", 1)[0]
            lora_B = weights[key.replace(".lora_A.", ".lora_B.")]
            linear = model.get_submodule(module)
            linear.weight.copy_(merge_lora_weight(linear.weight, lora_A, lora_B, scaling))
    out.mkdir(parents=True, exist_ok=True)
    state = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in model.state_dict().items()}
    model.save_pretrained(str(out), state_dict=state)
    _set_config_dtype(out, dtype)
    _copy_processor_files(base, out)  # tokenizer, processor, chat template
    if (base / "generation_config.json").is_file():  # save_pretrained writes one from config.json: keep the base's
        shutil.copy2(base / "generation_config.json", out / "generation_config.json")
    return out


def export_lora_checkpoint(
    checkpoint: str | Path, out: str | Path, *, base_model: str | Path | None = None, dtype: str = "bfloat16"
) -> tuple[Path, Path]:
    """`vppo-recipes export-lora`: a LoRA run's checkpoint -> (OUT/adapter, a peft adapter folder with the processor
    files; OUT/merged, `export_merged` in `dtype`). Raises ValueError when `checkpoint` holds no LoRA adapter."""
    from vppo_recipes.checkpoint_weights import DTYPES
    from vppo_recipes.checkpointing import _copy_processor_files

    checkpoint, out = Path(checkpoint), Path(out)
    meta_file = checkpoint / "vppo_checkpoint.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {}
    if meta.get("weights_format") != "lora_adapter" or not (checkpoint / ADAPTER_WEIGHTS_FILE).is_file():
        raise ValueError(
            f"{checkpoint} is no LoRA checkpoint (its vppo_checkpoint.json must say weights_format: lora_adapter); a "
            "full fine-tuning checkpoint is already a Hugging Face folder"
        )
    adapter = out / "adapter"
    adapter.mkdir(parents=True, exist_ok=True)
    for name in (ADAPTER_WEIGHTS_FILE, ADAPTER_CONFIG_FILE):
        shutil.copy2(checkpoint / name, adapter / name)
    _copy_processor_files(checkpoint, adapter)
    merged = export_merged(checkpoint, out / "merged", base_model=base_model, dtype=DTYPES[dtype])
    return adapter, merged


def _plain_lora_scaling(config: Mapping[str, Any], where: Path) -> float:
    """alpha / r of a peft LoraConfig dict, refusing the variants whose merge is not W + alpha/r * B @ A."""
    variants = {
        "use_rslora": config.get("use_rslora"),
        "use_dora": config.get("use_dora"),
        "rank_pattern": config.get("rank_pattern"),
        "alpha_pattern": config.get("alpha_pattern"),
        "fan_in_fan_out": config.get("fan_in_fan_out"),
    }
    used = {k: v for k, v in variants.items() if v}
    if used or config.get("peft_type", "LORA") != "LORA":
        raise ValueError(
            f"{where / ADAPTER_CONFIG_FILE}: only plain LoRA adapters (what model.lora trains) can be merged here; "
            f"this one uses {used or config.get('peft_type')}: merge it with peft's merge_and_unload instead"
        )
    return float(config["lora_alpha"]) / float(config["r"])
