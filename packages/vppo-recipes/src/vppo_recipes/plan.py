"""Per-GPU memory plan of a recipe config, computed without GPUs: `vppo-recipes plan CONFIG|all`.

The full-size model is built with transformers on the meta device from its stored architecture config
(`vppo_recipes/arch/*.json`, the public config.json values) and sharded with THE recipe's own
`vppo_recipes.sharding.shard_policy` under a fake process group of the config's world size (1-D FSDP over
nnodes x nproc_per_node ranks, or the 2-D HSDP mesh (replicate, shard)). Per rank (rank 0 holds the largest,
padded shard, so it is the worst case):

    params      local shard of every parameter, float32 master weights (the recipe keeps fp32 masters and casts to
                model.dtype for compute with FSDP2's MixedPrecisionPolicy), for every optimizer
                LoRA (`model.lora.rank > 0`): peft's adapters are injected into the meta model (`inject_lora`, the
                language model's decoder-layer projections named by model.lora.target_modules) before sharding;
                the adapter parameters are the only trainable ones (fp32 masters, grads, optimizer states), the
                frozen base is counted in model.dtype (local shard, no master, no grad, no optimizer state)
    grads       same size and dtype as the local shard (LoRA: of the adapter parameters only)
    optimizer   torch.optim.AdamW: exp_avg + exp_avg_sq in fp32 (8 B/param); torchao.optim.AdamW8bit: two uint8
                code tensors + one fp32 scale per 256-element block each (2 x (1 + 4/256) B/param, + 1 KiB qmap per
                state; measured on torchao 0.15: 1.03125 B/param/state on a 65,536-element tensor = 1 + 4/256 +
                1024/65536); torchao.optim._AdamW: two fp32 states, as AdamW (its bf16 stochastic rounding is
                refused by the config check: it cannot round FSDP2 shards with torchao <= 0.15)
    activations ESTIMATE. Bytes saved for backward by ONE decoder layer (and one vision block) are traced, not
                guessed: the layer's forward runs on meta tensors at [micro_batch, prompt + response, hidden] under
                torch.autograd.graph.saved_tensors_hooks, and the distinct storages it saves are summed (parameters
                and the shared rotary cos/sin excluded). Attention is traced with a flash-attention-like kernel that
                saves q, k, v, out and the fp32 log-sum-exp (no [T, T] matrix), as flash attention / cuDNN SDPA do
                on GPU. Then:
                  without checkpointing: n_layers x saved(layer)
                  with checkpointing:    n_layers x (layer input [mb, T, H] in bf16) + saved(layer) (the one layer
                                         recomputed during backward)
                and likewise for the vision tower with mb images at max_pixels (mb x max_pixels / patch^2 patches).
                With batch.max_tokens_per_micro_batch = B the micro-batch is traced at min(mb, ceil(B / T)) rows of
                T (`micro_batch_geometry` says why that bounds every micro-batch within the budget), and the vision
                tower at min(mb x max_pixels / patch^2, B x merge^2) patches (image tokens are among the B).
                The traced decoder-layer bytes equal a hand derivation term by term
                (text_layer_saved_bytes_formula; tests/test_plan.py checks both models at two sizes).
                LoRA: the traced layer is the adapter-injected one with its base frozen: the adapters' own saved
                tensors (lora_A's input, lora_B's input [mb, T, rank]) are traced, and so is what the frozen base no
                longer saves (a frozen Linear does not save its input, a frozen RMSNorm not its normalised input;
                tests/test_plan.py derives both by hand). The vision tower is frozen and its input needs no
                gradient, so it saves nothing (traced: 0) and checkpointing keeps no vision block input.
                Not counted: allocator fragmentation, NCCL/CUDA context (covered by the safety margin).
    transient   largest short-lived working set: the root unit gathered in model.dtype (lm_head, final norm, vision
                patch embed + mergers; FSDP2 keeps the root gathered through forward and backward), two gathered
                block units (the one computing + the prefetched next one), one block's unsharded fp32 gradient
                before its reduce-scatter (LoRA: the block's adapter parameters), and the log-prob block: loss.chunk_size x V logits (a [B*L, block]
                slice of the vocabulary, vppo_core.logprobs_from_hidden), counted as three fp32 blocks (two float
                buffers and the model-dtype matmul output or gradient block: 3 x chunk x V x 4 B, an upper bound).
    sampler     rollout.engine=vllm (colocated, sleep mode): while sampling, vLLM holds gpu_memory_utilization x
                GPU memory beside the trainer's params + optimizer states; while training it is asleep and keeps a
                residue (an ASSUMPTION, default 2 GiB, set with --vllm-sleep-gib: CUDA graphs and context; not
                measured here). rollout.engine=transformers: a full model.dtype copy of the policy on every rank.

    scoring     the no-grad passes before the update (`RLRecipeDistributed.no_grad_passes`), one micro-batch at a
                time: the clean pass and each altered view of the method (`Method.views()`) is a forward without
                saved activations (working set ESTIMATED as one decoder layer's saved bytes + its input, output and
                the final norm output, [mb, T, H] each), and every pass keeps the last hidden state at the response
                positions, [mb, response, H] in model.dtype, until the method has scored the micro-batch: (1 +
                views) of them at the last view. PEPO's clean pass also reduces every layer's hidden state to its
                prior; the recipe does it layer by layer (`forward._pepo_layer_sums`), one float32 [mb, T, H] at a
                time (holding all of them would be (layers + 1) x [mb, T, H]). A method that asks the clean pass for
                the whole last hidden state (VGPO) keeps [mb, T, H] in model.dtype and a float32 [mb, response, H]. `method_passes` is what the method
                adds to this phase over DAPO (no views, no prior); the phase holds params + optimizer + the sleeping
                sampler + transient + the passes (no gradients: zero_grad freed them).

peak = max(rollout phase, training phase, scoring phase); the check passes when peak <= (1 - margin) x GPU memory (80 GiB and a
5 % margin by default).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from vppo_recipes.sharding import find_blocks, policy_mesh, shard_policy

__all__ = ["ARCH_FILES", "PUBLISHED_PARAMS", "Plan", "load_arch_config", "main", "plan_config", "render_plan"]

GIB = 1024**3
PACKAGE_DIR = Path(__file__).resolve().parent
ARCH_DIR = PACKAGE_DIR / "arch"
CONFIG_DIR = PACKAGE_DIR / "configs"

# Hugging Face repo name -> stored architecture config (the public config.json values; each file names its source).
ARCH_FILES = {
    "Qwen2.5-VL-7B-Instruct": "qwen2_5_vl_7b_instruct.json",
    "Qwen2.5-VL-32B-Instruct": "qwen2_5_vl_32b_instruct.json",
    "Qwen3-VL-8B-Instruct": "qwen3_vl_8b_instruct.json",
}
# Sizes shown on the model cards (safetensors parameter count, rounded there).
PUBLISHED_PARAMS = {
    "Qwen2.5-VL-7B-Instruct": 8.29e9,
    "Qwen2.5-VL-32B-Instruct": 33.5e9,
    "Qwen3-VL-8B-Instruct": 8.77e9,
}
DTYPE_BYTES = {"float32": 4, "bfloat16": 2}
_PLAN_ATTENTION = "vppo_plan_saved_set"  # no "flash" in the name: transformers would look for a kernel


# ---------------------------------------------------------------------------------------------------------------
# Architecture and meta model
# ---------------------------------------------------------------------------------------------------------------


def load_arch_config(model_path: str, arch: str):
    """The transformers config of `model_path`: a local folder's config.json, else the stored copy named by the path's
    last component (`Qwen/Qwen2.5-VL-7B-Instruct` -> arch/qwen2_5_vl_7b_instruct.json)."""
    from transformers import Qwen2_5_VLConfig, Qwen3VLConfig

    local = Path(model_path).expanduser() / "config.json"
    if local.is_file():
        values = json.loads(local.read_text())
    else:
        name = Path(model_path).name
        if name not in ARCH_FILES:
            raise ValueError(
                f"model.path={model_path!r}: no local config.json there and no stored architecture for {name!r}; "
                f"stored: {sorted(ARCH_FILES)} (or point model.path at a downloaded model folder)"
            )
        values = json.loads((ARCH_DIR / ARCH_FILES[name]).read_text())
    values = {k: v for k, v in values.items() if not k.startswith("_")}
    model_type = values.get("model_type")
    classes = {"qwen2_5_vl": Qwen2_5_VLConfig, "qwen3_vl": Qwen3VLConfig}
    if model_type not in classes:
        raise ValueError(f"model.path={model_path!r} holds model_type={model_type!r}; supported: {sorted(classes)}")
    if model_type != arch:
        raise ValueError(
            f"model.arch={arch!r} but {model_path!r} is a {model_type!r} model; set model.arch={model_type}"
        )
    return classes[model_type](**values)


def build_meta_model(hf_config) -> nn.Module:
    """The full-size policy on the meta device (float32 parameters, no memory)."""
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    cls = (
        Qwen2_5_VLForConditionalGeneration if hf_config.model_type == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    )
    with torch.device("meta"):
        return cls(hf_config).to(torch.float32)


@contextlib.contextmanager
def fake_process_group(world_size: int) -> Iterator[None]:
    """A single-process fake process group of `world_size` ranks (this process is rank 0; collectives are no-ops)."""
    from torch.testing._internal.distributed.fake_pg import FakeStore

    if dist.is_initialized():
        raise RuntimeError("fake_process_group: a process group is already initialised in this process")
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


def make_mesh(world_size: int, hsdp_replicas: int):
    """The recipe's own mesh (`policy_mesh`) on the fake process group's CPU devices."""
    return policy_mesh("cpu", world_size, hsdp_replicas)


@dataclass(frozen=True)
class Unit:
    """One FSDP unit: parameters it manages, in elements (full model and this rank's padded shard)."""

    name: str
    numel: int
    local_numel: int
    tensors: tuple[int, ...]  # local numel of each trainable parameter (the optimizer keeps one state per parameter)
    frozen_local_numel: int = 0  # local elements of the parameters that need no gradient (LoRA's frozen base)


def fsdp_units(model: nn.Module) -> list[Unit]:
    """The FSDP units of a sharded model, each with the parameters that belong to it (nearest enclosing unit);
    trainable (requires_grad) and frozen parameters are told apart."""
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    unit_names = [n for n, m in model.named_modules() if isinstance(m, FSDPModule)]
    by_unit: dict[str, list[tuple[int, int, bool]]] = {n: [] for n in unit_names}
    for pname, p in model.named_parameters():
        owner = max((u for u in unit_names if u == "" or pname.startswith(u + ".")), key=len)
        local = p.to_local().numel() if isinstance(p, DTensor) else p.numel()
        by_unit[owner].append((p.numel(), local, p.requires_grad))
    return [
        Unit(
            name or "<root>",
            numel=sum(a for a, _, _ in ps),
            local_numel=sum(b for _, b, _ in ps),
            tensors=tuple(b for _, b, trains in ps if trains),
            frozen_local_numel=sum(b for _, b, trains in ps if not trains),
        )
        for name, ps in by_unit.items()
    ]


# ---------------------------------------------------------------------------------------------------------------
# LoRA: peft adapters on the meta model
# ---------------------------------------------------------------------------------------------------------------

# The language model's attention and MLP projections (the default of model.lora.target_modules).
LORA_DEFAULT_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraSettings:
    """`model.lora` as the planner reads it (rank > 0)."""

    rank: int
    alpha: float
    dropout: float
    target_modules: tuple[str, ...]


def lora_settings(cfg: dict[str, Any]) -> LoraSettings | None:
    """`model.lora` of a config, or None when it is absent or its rank is 0 (full fine-tuning).

    The vision tower keeps no adapter here: `model.lora.vision: true` is refused by name (the planner does not
    size adapters in the vision blocks)."""
    section = _get(cfg, "model.lora") or {}
    rank = int(section.get("rank", 0) or 0)
    if rank <= 0:
        return None
    if section.get("vision", False):
        raise ValueError(
            "model.lora.vision=true: the planner sizes LoRA on the language model only (vision tower frozen); "
            "plan with model.lora.vision=false"
        )
    targets = tuple(section.get("target_modules") or LORA_DEFAULT_TARGETS)
    unknown = sorted(set(targets) - set(LORA_DEFAULT_TARGETS))
    if unknown:
        raise ValueError(
            f"model.lora.target_modules: {unknown} are no decoder-layer projection; choose from {list(LORA_DEFAULT_TARGETS)}"
        )
    return LoraSettings(
        rank=rank,
        alpha=float(section.get("alpha", rank)),
        dropout=float(section.get("dropout", 0.0)),
        target_modules=targets,
    )


def inject_lora(model: nn.Module, lora: LoraSettings) -> nn.Module:
    """peft's LoRA adapters (adapter "default") on the decoder layers' `lora.target_modules` of `model`, in place.

    `peft.inject_adapter_in_model` leaves module paths as they are and marks only the adapter parameters
    trainable; the adapters are meta tensors (float32, like the meta model)."""
    import peft

    names = "|".join(lora.target_modules)
    config = peft.LoraConfig(
        r=lora.rank,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=rf"(.*\.)?language_model\.layers\.\d+\.(self_attn|mlp)\.({names})",
    )
    # low_cpu_mem_usage: peft creates the adapters on the meta device (not allocated and initialised on the CPU first,
    # ~20 s for 7B's 161M adapter parameters)
    return peft.inject_adapter_in_model(config, model, low_cpu_mem_usage=True)


# ---------------------------------------------------------------------------------------------------------------
# Activations: trace the saved tensors of one block on meta tensors
# ---------------------------------------------------------------------------------------------------------------


class _FlashLikeAttention(torch.autograd.Function):
    """softmax(q k^T * scale) v that saves what flash attention saves (q, k, v, out, fp32 log-sum-exp), not [T, T].

    q: [B, Hq, T, D]; k, v: [B, Hkv, T, D] (grouped-query attention: Hq a multiple of Hkv). Backward recomputes.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, causal):
        out = torch.nn.functional.scaled_dot_product_attention(
            q, k, v, is_causal=causal, scale=scale, enable_gqa=q.shape[1] != k.shape[1]
        )
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.scale, ctx.causal = scale, causal
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, _, _ = ctx.saved_tensors
        with torch.enable_grad():
            q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
            out = torch.nn.functional.scaled_dot_product_attention(
                q, k, v, is_causal=ctx.causal, scale=ctx.scale, enable_gqa=q.shape[1] != k.shape[1]
            )
            gq, gk, gv = torch.autograd.grad(out, (q, k, v), grad_out)
        return gq, gk, gv, None, None


def _plan_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """transformers attention-interface function around _FlashLikeAttention; returns ([B, T, Hq, D], None)."""
    causal = bool(getattr(module, "is_causal", True)) and query.shape[2] > 1
    out = _FlashLikeAttention.apply(query, key, value, scaling, causal)
    return out.transpose(1, 2).contiguous(), None


def _register_plan_attention() -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(_PLAN_ATTENTION, _plan_attention)


def saved_bytes(module: nn.Module, *args: Any, exclude: Sequence[torch.Tensor] = (), **kwargs: Any) -> int:
    """Bytes of the distinct storages `module(*args, **kwargs)` saves for backward (meta tensors welcome).

    Parameters of `module` and the storages of `exclude` (inputs shared by all layers, like rotary cos/sin) are not
    counted. Tensors viewing one storage are counted once, at the storage's size.
    """
    skip = {p.untyped_storage()._cdata for p in module.parameters()}
    skip |= {t.untyped_storage()._cdata for t in exclude}
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        s = t.untyped_storage()
        if s._cdata not in skip:
            storages[s._cdata] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        module(*args, **kwargs)
    return sum(storages.values())


@contextlib.contextmanager
def _plan_attention_on(block: nn.Module) -> Iterator[None]:
    """Route `block`'s attention through _plan_attention while tracing; the (shared) config is restored after."""
    _register_plan_attention()
    configs = {id(c): c for m in block.modules() if hasattr(c := getattr(m, "config", None), "_attn_implementation")}
    before = {k: c._attn_implementation for k, c in configs.items()}
    try:
        for c in configs.values():
            c._attn_implementation = _PLAN_ATTENTION
        yield
    finally:
        for k, c in configs.items():
            c._attn_implementation = before[k]


def text_layer_saved_bytes(model: nn.Module, micro_batch: int, seq_len: int, dtype: torch.dtype) -> int:
    """Saved-for-backward bytes of one decoder layer at [micro_batch, seq_len, hidden] in `dtype` (meta trace)."""
    _, layers = find_blocks(model)
    layer = layers[0].to(dtype)
    cfg = model.config.text_config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    x = torch.empty(micro_batch, seq_len, cfg.hidden_size, device="meta", dtype=dtype, requires_grad=True)
    cos = torch.empty(micro_batch, seq_len, head_dim, device="meta", dtype=dtype)
    sin = torch.empty_like(cos)
    with _plan_attention_on(layer):
        return saved_bytes(layer, x, attention_mask=None, position_embeddings=(cos, sin), exclude=(cos, sin))


def vision_block_saved_bytes(model: nn.Module, n_patches: int, dtype: torch.dtype) -> int:
    """Saved-for-backward bytes of one vision block over `n_patches` patches (one attention window; meta trace)."""
    vision, _ = find_blocks(model)
    block = vision[0].to(dtype)
    cfg = model.config.vision_config
    head_dim = cfg.hidden_size // cfg.num_heads
    # a tower whose parameters are all frozen (LoRA on the language model) gets an input that needs no gradient
    trained = any(p.requires_grad for b in vision for p in b.parameters())
    x = torch.empty(n_patches, cfg.hidden_size, device="meta", dtype=dtype, requires_grad=trained)
    cos = torch.empty(n_patches, head_dim, device="meta", dtype=dtype)
    sin = torch.empty_like(cos)
    cu = torch.tensor([0, n_patches], dtype=torch.int32)  # on CPU: the eager path splits by its values
    with _plan_attention_on(block):
        return saved_bytes(block, x, cu_seqlens=cu, position_embeddings=(cos, sin), exclude=(cos, sin))


def text_layer_saved_bytes_formula(text_config, micro_batch: int, seq_len: int) -> int:
    """The same quantity as text_layer_saved_bytes for a bf16 Qwen2.5-VL / Qwen3-VL decoder layer, derived by hand.

    Per token, in bytes (H hidden, Hq = heads x head_dim, Hkv = kv_heads x head_dim, I intermediate; the HF RMSNorm
    computes in fp32):
      2 RMSNorms            2 x (4H fp32 input copy + 4 rsqrt + 2H normalised + 2H output)      = 16H + 8
      attention             q, k, v after RoPE (2Hq + 4Hkv), output (2Hq), fp32 lse (4 x heads)
      o_proj input          the output transposed to [T, Hq] (2Hq)
      SwiGLU MLP            gate out, SiLU(gate), up out, product (4 x 2I)                       = 8I
      Qwen3-VL q/k norms    RMSNorm over head_dim on q and k: 6Hq + 6Hkv + 4 x (heads + kv_heads)
    RoPE saves nothing but cos/sin (shared by all layers; not counted); residual adds save nothing.
    """
    h, heads, kv = text_config.hidden_size, text_config.num_attention_heads, text_config.num_key_value_heads
    d = getattr(text_config, "head_dim", None) or h // heads
    hq, hkv, inter = heads * d, kv * d, text_config.intermediate_size
    per_token = 16 * h + 8 + 6 * hq + 4 * hkv + 4 * heads + 8 * inter
    if text_config.model_type == "qwen3_vl_text":
        per_token += 6 * hq + 6 * hkv + 4 * (heads + kv)
    return per_token * micro_batch * seq_len


# ---------------------------------------------------------------------------------------------------------------
# Optimizer state sizes
# ---------------------------------------------------------------------------------------------------------------


def optimizer_bytes(component: str, tensor_numels: Sequence[int]) -> tuple[int, int, int]:
    """(param bytes, grad bytes, optimizer-state bytes) on one rank for the local shards `tensor_numels`.

    component: optimizer._component_ of the config.
    """
    n = sum(tensor_numels)
    if component in ("torch.optim.AdamW", "torch.optim.Adam"):
        return 4 * n, 4 * n, 8 * n
    if component == "torchao.optim.AdamW8bit":
        block = 256
        per_state = sum(k + 4 * math.ceil(k / block) + 256 * 4 for k in tensor_numels)
        return 4 * n, 4 * n, 2 * per_state
    if component == "torchao.optim._AdamW":  # float32 masters (no bf16 stochastic rounding): like AdamW
        return 4 * n, 4 * n, 8 * n
    raise ValueError(
        f"optimizer._component_={component!r} is not one the planner knows; use torch.optim.AdamW, "
        "torchao.optim.AdamW8bit or torchao.optim._AdamW"
    )


# ---------------------------------------------------------------------------------------------------------------
# The plan
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Plan:
    """Per-rank memory plan of one config (bytes unless named otherwise)."""

    name: str
    model: str
    world: str
    total_params: int
    adapter_params: int  # LoRA adapter parameters (the trainable ones); 0 without LoRA
    published_params: float | None
    units: int
    params: int
    grads: int
    optimizer: int
    activations: int
    act_text_layer: int
    act_vision_block: int
    transient: int
    transient_parts: dict[str, int]
    sampler_rollout: int
    sampler_training: int
    rollout_phase: int
    training_phase: int
    scoring_phase: int
    method: str
    method_passes: int
    gpu_bytes: int
    margin: float
    notes: list[str] = field(default_factory=list)
    pass_geometry: dict[str, int] = field(default_factory=dict)  # method_pass_bytes' keyword arguments

    def with_method(self, algorithm: dict[str, Any], diagnostics: bool = False) -> Plan:
        """This plan with another `algorithm` section: only the scoring phase depends on the method."""
        cfg = {"algorithm": algorithm, "diagnostics": {"dependency": diagnostics}}
        name, passes = method_pass_bytes(cfg, **self.pass_geometry)
        scoring = self.scoring_phase - self.method_passes + passes["method"]
        return dataclasses.replace(self, method=name, method_passes=passes["method"], scoring_phase=scoring)

    @property
    def peak(self) -> int:
        return max(self.rollout_phase, self.training_phase, self.scoring_phase)

    @property
    def limit(self) -> int:
        return int(self.gpu_bytes * (1.0 - self.margin))

    @property
    def fits(self) -> bool:
        return self.peak <= self.limit


def _get(cfg: Any, path: str, default: Any = None) -> Any:
    node = cfg
    for key in path.split("."):
        if not isinstance(node, dict) or key not in node:
            return default
        node = node[key]
    return node


def load_config(path: Path) -> dict[str, Any]:
    """A recipe YAML as a plain dict (interpolations resolved)."""
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.load(path), resolve=True)


def plan_config(
    cfg: dict[str, Any],
    *,
    name: str = "config",
    gpu_gib: float = 80.0,
    margin: float = 0.05,
    vllm_sleep_gib: float = 2.0,
    hsdp_replicas: int | None = None,
    optimizer: str | None = None,
) -> Plan:
    """The per-rank memory plan of recipe config `cfg` (see the module docstring for every term).

    hsdp_replicas / optimizer override world.hsdp_replicas / optimizer._component_ (to plan the variants of one
    config, e.g. the 32B config on a 4 x 8 HSDP mesh).
    """
    model_path, arch = _get(cfg, "model.path"), _get(cfg, "model.arch")
    dtype_name = _get(cfg, "model.dtype", "bfloat16")
    nnodes, nproc = int(_get(cfg, "world.nnodes", 1)), int(_get(cfg, "world.nproc_per_node", 1))
    replicas = int(hsdp_replicas if hsdp_replicas is not None else _get(cfg, "world.hsdp_replicas", 1))
    world = nnodes * nproc
    cap = int(_get(cfg, "batch.micro_batch_size"))
    response = int(_get(cfg, "rollout.max_new_tokens"))
    seq = int(_get(cfg, "data.max_prompt_length")) + response
    budget = _get(cfg, "batch.max_tokens_per_micro_batch")
    micro, response_positions = micro_batch_geometry(cap, seq, response, budget)
    ac = bool(_get(cfg, "training.activation_checkpointing", False))
    opt_name = optimizer or _get(cfg, "optimizer._component_")
    engine = _get(cfg, "rollout.engine")
    chunk = int(_get(cfg, "loss.chunk_size", 1024))
    act_bytes = DTYPE_BYTES[dtype_name]
    act_dtype = torch.bfloat16 if dtype_name == "bfloat16" else torch.float32

    lora = lora_settings(cfg)
    hf_config = load_arch_config(model_path, arch)
    tc, vc = hf_config.text_config, hf_config.vision_config

    def policy() -> nn.Module:
        model = build_meta_model(hf_config)
        return model if lora is None else inject_lora(model, lora)

    model = policy()
    total_params = sum(p.numel() for p in model.parameters())
    adapter_params = sum(p.numel() for p in model.parameters() if p.requires_grad) if lora else 0
    n_layers, depth = tc.num_hidden_layers, vc.depth
    blocks = [*find_blocks(model)[0], *find_blocks(model)[1]]
    max_layer_params = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    max_layer_trainable = max(sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks)

    # Activations, traced on an unsharded copy of one block (sharding does not change what a block saves).
    layer_saved = text_layer_saved_bytes(model, micro, seq, act_dtype)
    max_pixels = _get(cfg, "model.max_pixels")
    if not max_pixels:
        raise ValueError(
            "model.max_pixels is null: the planner sizes the vision activations for one image of max_pixels per "
            "response; set model.max_pixels (the shipped full-size configs use 1003520)"
        )
    patches_per_image = max_pixels // (vc.patch_size**2)
    patches = cap * patches_per_image  # one image per response at max_pixels
    if budget is not None:  # a micro-batch's image tokens are among its <= budget positions (merge^2 patches each)
        patches = min(patches, int(budget) * vc.spatial_merge_size**2)
    vision_saved = vision_block_saved_bytes(model, patches, act_dtype)
    if ac:
        activations = n_layers * micro * seq * tc.hidden_size * act_bytes + layer_saved
        if vision_saved:  # a frozen tower saves nothing, and checkpointing keeps no input of it either
            activations += depth * patches * vc.hidden_size * act_bytes + vision_saved
    else:
        activations = n_layers * layer_saved + depth * vision_saved
    # Final norm output and the hidden states the chunked log-prob reads: [mb, T, H] twice.
    activations += 2 * micro * seq * tc.hidden_size * act_bytes

    with fake_process_group(world):
        mesh = make_mesh(world, replicas)
        model = policy()
        shard_policy(model, mesh, activation_checkpointing=ac)
        units = fsdp_units(model)
    local_numels = [n for u in units for n in u.tensors]
    params, grads, opt_state = optimizer_bytes(opt_name, local_numels)
    frozen_local = sum(u.frozen_local_numel for u in units)
    params += frozen_local * act_bytes  # LoRA's frozen base: model.dtype, no master copy (0 without LoRA)
    root = next(u for u in units if u.name == "<root>")
    transient_parts = {
        "root gathered": root.numel * act_bytes,
        "2 blocks gathered": 2 * max_layer_params * act_bytes,
        "block grad fp32": max_layer_trainable * 4,
        "log-prob chunk": 3 * chunk * tc.vocab_size * 4,
    }
    transient = sum(transient_parts.values())

    gpu_bytes = int(gpu_gib * GIB)
    notes = []
    if lora:
        notes.append(
            f"LoRA rank {lora.rank} alpha {lora.alpha:g} on {','.join(lora.target_modules)}: "
            f"{adapter_params:,} adapter params trained (fp32 masters, grads, optimizer states), "
            f"{total_params - adapter_params:,} base params frozen in {dtype_name} (sharded); vision tower frozen"
        )
    if engine == "vllm":
        util = float(_get(cfg, "rollout.gpu_memory_utilization", 0.35))
        sampler_rollout, sampler_training = int(util * gpu_bytes), int(vllm_sleep_gib * GIB)
        notes.append(f"vLLM colocated: {util:.2f} x {gpu_gib:g} GiB awake, {vllm_sleep_gib:g} GiB asleep (assumed)")
    else:
        full_copy = total_params * act_bytes
        sampler_rollout = sampler_training = full_copy
        notes.append("transformers sampler: a full model.dtype copy of the policy on every rank (+ its KV cache)")
    # Rollout: the trainer keeps its sharded params and optimizer states (grads are freed by zero_grad).
    rollout_phase = params + opt_state + sampler_rollout
    training_phase = params + grads + opt_state + activations + transient + sampler_training
    geometry = dict(
        micro=micro, seq=seq, response=response, hidden=tc.hidden_size, act_bytes=act_bytes, layer_saved=layer_saved,
        response_positions=response_positions,
    )  # fmt: skip
    method_name, passes = method_pass_bytes(cfg, **geometry)
    scoring_phase = params + opt_state + sampler_training + transient + passes["base"] + passes["method"]
    world_desc = f"{nnodes} node(s) x {nproc} GPUs, " + (
        f"HSDP {replicas} replicas x {world // replicas} shards" if replicas > 1 else f"FSDP over {world}"
    )
    return Plan(
        name=name,
        model=Path(model_path).name,
        world=world_desc,
        total_params=total_params,
        adapter_params=adapter_params,
        published_params=PUBLISHED_PARAMS.get(Path(model_path).name),
        units=len(units),
        params=params,
        grads=grads,
        optimizer=opt_state,
        activations=activations,
        act_text_layer=layer_saved,
        act_vision_block=vision_saved,
        transient=transient,
        transient_parts=transient_parts,
        sampler_rollout=sampler_rollout,
        sampler_training=sampler_training,
        rollout_phase=rollout_phase,
        training_phase=training_phase,
        scoring_phase=scoring_phase,
        method=method_name,
        method_passes=passes["method"],
        gpu_bytes=gpu_bytes,
        margin=margin,
        notes=[
            f"{opt_name}, model.dtype={dtype_name}, micro_batch={micro}, T={seq} (prompt+response), "
            + (f"token budget {budget} (micro_batch_size {cap} at most), " if budget is not None else "")
            + f"activation_checkpointing={ac}, {patches} vision patches, chunk={chunk}",
            *notes,
        ],
        pass_geometry=geometry,
    )


def micro_batch_geometry(cap: int, seq: int, response: int, budget: int | None) -> tuple[int, int]:
    """(rows, response positions) of the largest micro-batch the plan sizes, at `seq` = prompt + response positions
    per row (the longest a row can be).

    Fixed micro-batches (budget None): `cap` = batch.micro_batch_size rows of seq, cap x response response positions.
    With batch.max_tokens_per_micro_batch = B, a micro-batch is b <= cap rows of t <= seq padded positions with
    b·t <= B. Every per-micro-batch term of the plan is either linear in b·t (each tensor a decoder layer saves is
    [b, t, ·]: traced, and equal to the per-token formula; the final norm and the passes' [b, t, H]) or per row
    (a method's one-row-at-a-time scoring, largest at t = seq). Both are bounded at rows = min(cap, ceil(B / seq))
    rows of seq positions: b·t <= min(B, cap·seq) <= rows·seq, and t <= seq. (Tracing at [1, B] gives the same
    linear terms when seq divides B, but would size the per-row terms at a row of B positions, which no row has.)
    The response positions b·L are at most min(B, cap x response).
    """
    if budget is None:
        return cap, cap * response
    return min(cap, -(-int(budget) // seq)), min(int(budget), cap * response)


def method_pass_bytes(
    cfg: dict[str, Any],
    *,
    micro: int,
    seq: int,
    response: int,
    hidden: int,
    act_bytes: int,
    layer_saved: int,
    response_positions: int | None = None,
) -> tuple[str, dict[str, int]]:
    """(the method's name, {"base": what any RL step's clean no-grad pass holds, "method": what the config's method
    adds over it}) in bytes per rank; see "scoring" in the module docstring.

    The method is built from the config's `algorithm` section as the recipe builds it (`vppo_recipes.methods`), so
    a method's own views are counted, built-in or not."""
    from vppo_recipes.methods import build_method, method_class

    section = cfg.get("algorithm") or {}
    method = build_method(section)
    name = section.get("name") or section.get("_component_") or method_class(section).__name__
    if response_positions is None:
        response_positions = micro * response
    kept = response_positions * hidden * act_bytes  # one pass's last hidden state at the response positions
    base = layer_saved + 3 * micro * seq * hidden * act_bytes + kept
    views = len(method.views()) or int(bool(_get(cfg, "diagnostics.dependency", False)))  # diagnostics: VPPO's view
    extra = views * kept
    if method.clean_prior:  # one float32 layer at a time, the [mb, T] running sum
        extra += micro * seq * hidden * 4 + micro * seq * 4
    if method.clean_full_hidden:  # the whole last hidden state, and a float32 copy of its response positions
        extra += micro * seq * hidden * act_bytes + response_positions * hidden * 4
    extra += method.scoring_bytes(micro=micro, seq=seq, response=response, hidden=hidden, act_bytes=act_bytes)
    return str(name), {"base": base, "method": extra}


def _gib(n: float) -> str:
    return f"{n / GIB:6.2f}"


def render_plan(plan: Plan) -> str:
    """A plain-text (markdown) table of `plan`, in GiB per GPU."""
    pub = f" (published {plan.published_params / 1e9:.2f}B)" if plan.published_params else ""
    rows = [
        (
            "parameters (local shard)",
            plan.params,
            "exact (fake-PG shard_policy)" + ("; LoRA: adapter fp32 + frozen base" if plan.adapter_params else ""),
        ),
        ("gradients", plan.grads, "exact"),
        ("optimizer states", plan.optimizer, "exact"),
        ("activations", plan.activations, "estimate (traced saved tensors)"),
        ("transient (largest working set)", plan.transient, "estimate"),
        ("sampler while training", plan.sampler_training, "config / assumption"),
        ("= training phase", plan.training_phase, ""),
        ("sampler while sampling", plan.sampler_rollout, "config"),
        ("= rollout phase", plan.rollout_phase, "params + optimizer + sampler"),
        (f"method's no-grad passes ({plan.method})", plan.method_passes, "estimate, over DAPO's"),
        ("= scoring phase", plan.scoring_phase, "params + optimizer + sampler asleep + transient + passes"),
    ]
    out = [
        f"### {plan.name}: {plan.model}, {plan.world}, {plan.total_params / 1e9:.3f}B params{pub}, "
        f"{plan.units} FSDP units",
        "",
        "| per GPU | GiB | how |",
        "|---|---:|---|",
    ]
    out += [f"| {label} | {_gib(v)} | {how} |" for label, v, how in rows]
    verdict = "fits" if plan.fits else "DOES NOT FIT"
    out.append(
        f"| **peak** | **{_gib(plan.peak)}** | {verdict}: limit {plan.limit / GIB:.1f} GiB "
        f"({plan.gpu_bytes / GIB:g} GiB - {plan.margin:.0%} margin) |"
    )
    parts = ", ".join(f"{k} {v / GIB:.2f}" for k, v in plan.transient_parts.items())
    out += [
        "",
        f"- activations: {plan.act_text_layer / GIB:.3f} GiB saved per decoder layer, "
        f"{plan.act_vision_block / GIB:.3f} GiB per vision block; transient GiB: {parts}",
        *[f"- {n}" for n in plan.notes],
    ]
    return "\n".join(out)


# Variants printed for a shipped config beside its own settings: (label, hsdp_replicas, optimizer).
VARIANTS = {
    "qwen2_5_vl_32b_vppo": [("HSDP 4x8, AdamW8bit", 4, "torchao.optim.AdamW8bit")],
}
FULL_SIZE_CONFIGS = (
    "qwen2_5_vl_7b_vppo",
    "qwen2_5_vl_7b_pgpo",
    "qwen2_5_vl_7b_dapo",
    "qwen2_5_vl_7b_grpo",
    "qwen3_vl_8b_vppo",
    "qwen2_5_vl_32b_vppo",
    "qwen2_5_vl_7b_vppo_lora",
    "qwen3_vl_8b_vppo_lora",
)


def plans_for(name_or_path: str, overrides: Sequence[str] = (), **kwargs: Any) -> list[Plan]:
    """The plan of one config (a shipped name or a YAML path) with its `key=value` overrides (read as the recipe
    reads them: `vppo_recipes.config_overrides`, so `algorithm.name=pepo` plans PEPO), and of its listed variants."""
    path = Path(name_or_path)
    if not path.is_file():
        stem = name_or_path[:-5] if name_or_path.endswith(".yaml") else name_or_path
        path = CONFIG_DIR / f"{stem}.yaml"
        if not path.is_file():
            raise SystemExit(
                f"vppo-recipes plan: {name_or_path!r} is neither a YAML file nor a shipped config; "
                f"shipped full-size configs: {', '.join(FULL_SIZE_CONFIGS)}"
            )
    cfg = load_config(path)
    if overrides:
        from argparse import Namespace

        from omegaconf import OmegaConf

        from vppo_recipes.config_overrides import merge_config_and_overrides

        raw = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
        cfg = OmegaConf.to_container(merge_config_and_overrides(Namespace(**raw), list(overrides))[0], resolve=True)
    plans = [plan_config(cfg, name=path.stem, **kwargs)]
    for label, replicas, opt in VARIANTS.get(path.stem, []):
        plans.append(plan_config(cfg, name=f"{path.stem} ({label})", hsdp_replicas=replicas, optimizer=opt, **kwargs))
    return plans


def main(argv: Sequence[str] | None = None) -> int:
    """`vppo-recipes plan CONFIG|all [key=value ...] [--gpu-gib 80] [--margin 0.05] [--vllm-sleep-gib 2]`.

    Exit status: 0 all fit, 1 one does not fit, 2 a config the planner cannot size (message on stderr).
    """
    ap = argparse.ArgumentParser(prog="vppo-recipes plan", description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "configs", nargs="+",
        help="'all' (every shipped full-size config), shipped names or YAML paths, then key=value overrides for "
        "all of them (algorithm.name=pepo plans PEPO)",
    )  # fmt: skip
    ap.add_argument("--gpu-gib", type=float, default=80.0, help="memory of one GPU in GiB (default 80)")
    ap.add_argument("--margin", type=float, default=0.05, help="fraction kept free (context, NCCL, fragmentation)")
    ap.add_argument("--vllm-sleep-gib", type=float, default=2.0, help="assumed residue of a sleeping vLLM engine")
    args = ap.parse_args(argv)
    overrides = [a for a in args.configs if "=" in a]
    names = [a for a in args.configs if "=" not in a]
    names = list(FULL_SIZE_CONFIGS) if names == ["all"] else names
    ok = True
    for name in names:
        try:
            plans = plans_for(
                name, overrides, gpu_gib=args.gpu_gib, margin=args.margin, vllm_sleep_gib=args.vllm_sleep_gib
            )
        except ValueError as e:  # a config the planner cannot size: say why, no traceback
            print(f"vppo-recipes plan {name}: {e}", file=sys.stderr)
            return 2
        for plan in plans:
            print(render_plan(plan), end="\n\n", flush=True)
            ok &= plan.fits
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
