"""The memory planner: parameter counts against the published sizes, the traced activation bytes against their
hand derivation, the exact shard sizes, and the fit of every shipped full-size config on 80 GB GPUs."""

from __future__ import annotations

import copy

import pytest
import torch
from omegaconf import OmegaConf

from vppo_recipes.plan import (
    ARCH_FILES,
    CONFIG_DIR,
    FULL_SIZE_CONFIGS,
    GIB,
    PUBLISHED_PARAMS,
    build_meta_model,
    fake_process_group,
    fsdp_units,
    load_arch_config,
    load_config,
    main,
    make_mesh,
    optimizer_bytes,
    plan_config,
    text_layer_saved_bytes,
    text_layer_saved_bytes_formula,
)
from vppo_recipes.sharding import shard_policy

ARCH_OF = {
    "Qwen2.5-VL-7B-Instruct": "qwen2_5_vl",
    "Qwen2.5-VL-32B-Instruct": "qwen2_5_vl",
    "Qwen3-VL-8B-Instruct": "qwen3_vl",
}
# Half a unit of the last digit the model card shows (8.29B, 33.5B, 8.77B).
ROUNDING = {"Qwen2.5-VL-7B-Instruct": 0.005e9, "Qwen2.5-VL-32B-Instruct": 0.05e9, "Qwen3-VL-8B-Instruct": 0.005e9}


@pytest.mark.parametrize("name", sorted(ARCH_FILES))
def test_stored_architecture_builds_the_published_parameter_count(name):
    model = build_meta_model(load_arch_config(f"Qwen/{name}", ARCH_OF[name]))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - PUBLISHED_PARAMS[name]) <= ROUNDING[name], (
        f"{name}: {n:,} vs published {PUBLISHED_PARAMS[name]:,.0f}"
    )


def test_load_arch_config_rejects_unknown_model_and_wrong_arch():
    with pytest.raises(ValueError, match="no stored architecture"):
        load_arch_config("Qwen/Qwen2.5-VL-72B-Instruct", "qwen2_5_vl")
    with pytest.raises(ValueError, match=r"set model\.arch=qwen3_vl"):
        load_arch_config("Qwen/Qwen3-VL-8B-Instruct", "qwen2_5_vl")


@pytest.mark.parametrize("name", ["Qwen2.5-VL-7B-Instruct", "Qwen3-VL-8B-Instruct"])
@pytest.mark.parametrize("micro,seq", [(1, 128), (4, 4096)])
def test_traced_decoder_layer_activations_equal_the_hand_derivation(name, micro, seq):
    hf = load_arch_config(f"Qwen/{name}", ARCH_OF[name])
    model = build_meta_model(hf)
    traced = text_layer_saved_bytes(model, micro, seq, torch.bfloat16)
    assert traced == text_layer_saved_bytes_formula(hf.text_config, micro, seq)


@pytest.mark.parametrize("world,replicas,shards", [(8, 1, 8), (32, 1, 32), (32, 4, 8)])
def test_rank0_shard_is_the_padded_ceil_of_every_parameter(world, replicas, shards):
    hf = load_arch_config("Qwen/Qwen2.5-VL-7B-Instruct", "qwen2_5_vl")
    full = build_meta_model(hf)
    expected = sum(-(-p.shape[0] // shards) * (p.numel() // p.shape[0]) for p in full.parameters())
    with fake_process_group(world):
        model = build_meta_model(hf)
        shard_policy(model, make_mesh(world, replicas))
        units = fsdp_units(model)
    assert sum(u.local_numel for u in units) == expected
    assert sum(u.numel for u in units) == sum(p.numel() for p in full.parameters())
    assert len(units) == 32 + 28 + 2  # vision blocks, decoder layers, embed_tokens, root


def test_optimizer_bytes_per_parameter():
    assert optimizer_bytes("torch.optim.AdamW", [1024]) == (4096, 4096, 8192)
    # torchao AdamW8bit: uint8 codes + one fp32 scale per 256 elements + a 256-entry fp32 qmap, per state.
    assert optimizer_bytes("torchao.optim.AdamW8bit", [65536])[2] == 2 * (65536 + 4 * 256 + 1024)
    assert optimizer_bytes("torchao.optim._AdamW", [10]) == (40, 40, 80)  # float32 masters, like AdamW
    with pytest.raises(ValueError, match=r"optimizer\._component_"):
        optimizer_bytes("torch.optim.SGD", [10])


@pytest.mark.slow
def test_plan_fails_a_config_that_cannot_fit():
    cfg = copy.deepcopy(load_config(CONFIG_DIR / "qwen2_5_vl_7b_vppo.yaml"))
    cfg["training"]["activation_checkpointing"] = False  # 28 layers x ~3.5 GiB of saved activations
    plan = plan_config(cfg, name="no-ac")
    assert not plan.fits and plan.peak > 80 * GIB


@pytest.mark.slow
@pytest.mark.parametrize("name", FULL_SIZE_CONFIGS)
def test_shipped_full_size_config_fits_80gb_gpus(name, capsys):
    assert main([name]) == 0, capsys.readouterr().out
    out = capsys.readouterr().out
    assert "DOES NOT FIT" not in out and "| **peak** |" in out


def test_cli_exits_2_with_a_message_for_a_config_it_cannot_size(tmp_path, capsys):
    cfg = load_config(CONFIG_DIR / "qwen2_5_vl_7b_vppo.yaml")
    cfg["model"]["max_pixels"] = None
    OmegaConf.save(OmegaConf.create(cfg), tmp_path / "no_pixels.yaml")
    assert main([str(tmp_path / "no_pixels.yaml")]) == 2
    assert "set model.max_pixels" in capsys.readouterr().err
    assert main([str(CONFIG_DIR / "tiny_vppo.yaml")]) == 2  # a local checkpoint path that does not exist here
    assert "no stored architecture" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------------- LoRA
def _small_lora_cfg(tmp_path, name, arch, *, layers=2, rank=8, targets=None):
    """A shipped LoRA config whose model.path is a local config.json of the full-size architecture cut to `layers`
    decoder layers and vision blocks (every per-layer size stays the full-size one; planning takes seconds)."""
    import json

    from vppo_recipes.plan import ARCH_DIR

    values = json.loads((ARCH_DIR / ARCH_FILES[name]).read_text())
    text = values.get("text_config", values)
    text["num_hidden_layers"] = layers
    values["vision_config"]["depth"] = layers
    if "deepstack_visual_indexes" in values["vision_config"]:
        values["vision_config"]["deepstack_visual_indexes"] = [0]
    if "num_hidden_layers" in values:
        values["num_hidden_layers"] = layers
    folder = tmp_path / name
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(values))
    config = {"qwen2_5_vl": "qwen2_5_vl_7b_vppo_lora", "qwen3_vl": "qwen3_vl_8b_vppo_lora"}[arch]
    cfg = copy.deepcopy(load_config(CONFIG_DIR / f"{config}.yaml"))
    cfg["model"]["path"] = str(folder)
    cfg["model"]["lora"]["rank"] = rank
    if targets is not None:
        cfg["model"]["lora"]["target_modules"] = list(targets)
    return cfg


def _adapter_params_by_hand(text_config, rank: int, targets) -> int:
    """Every adapted Linear [in -> out] gets A [rank, in] and B [out, rank]; summed over the decoder layers."""
    h, heads, kv = text_config.hidden_size, text_config.num_attention_heads, text_config.num_key_value_heads
    d = getattr(text_config, "head_dim", None) or h // heads
    i = text_config.intermediate_size
    shapes = {
        "q_proj": (h, heads * d), "k_proj": (h, kv * d), "v_proj": (h, kv * d), "o_proj": (heads * d, h),
        "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h),
    }  # fmt: skip
    return text_config.num_hidden_layers * sum(rank * (a + b) for name, (a, b) in shapes.items() if name in targets)


@pytest.mark.parametrize(
    "name,targets",
    [
        ("Qwen2.5-VL-7B-Instruct", None),
        ("Qwen3-VL-8B-Instruct", ("q_proj", "v_proj")),
    ],
)
def test_lora_plan_trains_only_the_adapters_and_keeps_the_base_in_bf16(tmp_path, name, targets):
    from vppo_recipes.plan import LORA_DEFAULT_TARGETS

    cfg = _small_lora_cfg(tmp_path, name, ARCH_OF[name], rank=8, targets=targets)
    hf = load_arch_config(cfg["model"]["path"], ARCH_OF[name])
    base = sum(p.numel() for p in build_meta_model(hf).parameters())  # no peft involved
    adapter = _adapter_params_by_hand(hf.text_config, 8, targets or LORA_DEFAULT_TARGETS)
    plan = plan_config(cfg, name="lora")  # world 1: the local shard is the whole model
    assert plan.adapter_params == adapter and plan.total_params == base + adapter
    assert plan.params == 4 * adapter + 2 * base  # fp32 adapter masters + the frozen base in bf16
    assert plan.grads == 4 * adapter and plan.optimizer == 8 * adapter  # AdamW: exp_avg + exp_avg_sq in fp32
    assert plan.act_vision_block == 0  # frozen tower, input without gradient: nothing saved
    assert plan.transient_parts["block grad fp32"] == 4 * adapter // hf.text_config.num_hidden_layers
    # full fine-tuning of the same model: every parameter trains, vision activations come back
    cfg["model"]["lora"]["rank"] = 0
    full = plan_config(cfg, name="full")
    assert full.adapter_params == 0 and full.params == full.grads == 4 * base and full.optimizer == 8 * base
    assert full.act_vision_block > 0


@pytest.mark.parametrize("name", ["Qwen2.5-VL-7B-Instruct", "Qwen3-VL-8B-Instruct"])
@pytest.mark.parametrize("targets", [None, ("q_proj", "o_proj", "down_proj")])
def test_traced_lora_layer_saves_the_base_layers_tensors_plus_each_adapters_rank_activation(tmp_path, name, targets):
    """Hand derivation from text_layer_saved_bytes_formula (the fully trained layer), per token in bf16 bytes:

    frozen base: a Linear whose weight needs no gradient does not save its input, and `weight * normalised` in a
    frozen RMSNorm does not save the normalised tensor: - 2H x 2 (normalised) - 2H x 2 (the norms' outputs, the
    projections' inputs) - 2Hq (o_proj's input) - 2I (down_proj's input) [- 2Hq - 2Hkv: Qwen3-VL's q/k norms];
    adapters: lora_A saves its input x (once per storage: q/k/v share one, gate/up another) and lora_B saves A's
    output [mb, T, rank]; the scaling and the add save nothing: + 2 x rank per adapted Linear."""
    from vppo_recipes.plan import LORA_DEFAULT_TARGETS, inject_lora, lora_settings

    rank, micro, seq = 16, 2, 256
    cfg = _small_lora_cfg(tmp_path, name, ARCH_OF[name], layers=1, rank=rank, targets=targets)
    hf = load_arch_config(cfg["model"]["path"], ARCH_OF[name])
    model = inject_lora(build_meta_model(hf), lora_settings(cfg))
    traced = text_layer_saved_bytes(model, micro, seq, torch.bfloat16)
    tc, adapted = hf.text_config, set(targets or LORA_DEFAULT_TARGETS)
    h, inter = tc.hidden_size, tc.intermediate_size
    d = getattr(tc, "head_dim", None) or h // tc.num_attention_heads
    hq, hkv = tc.num_attention_heads * d, tc.num_key_value_heads * d
    frozen = 4 * h + 4 * h + 2 * hq + 2 * inter
    if tc.model_type == "qwen3_vl_text":
        frozen += 2 * hq + 2 * hkv
    inputs = (
        2 * h * bool(adapted & {"q_proj", "k_proj", "v_proj"})
        + 2 * hq * ("o_proj" in adapted)
        + 2 * h * bool(adapted & {"gate_proj", "up_proj"})
        + 2 * inter * ("down_proj" in adapted)
    )
    per_token = -frozen + inputs + 2 * rank * len(adapted)
    assert traced == text_layer_saved_bytes_formula(tc, micro, seq) + per_token * micro * seq


def test_lora_settings_read_defensively_and_refuse_what_the_planner_cannot_size():
    from vppo_recipes.plan import lora_settings

    assert lora_settings({"model": {}}) is None and lora_settings({"model": {"lora": {"rank": 0}}}) is None
    assert lora_settings({"model": {"lora": {"rank": 4}}}).alpha == 4.0
    with pytest.raises(ValueError, match=r"model\.lora\.vision=true.*plan with model\.lora\.vision=false"):
        lora_settings({"model": {"lora": {"rank": 4, "vision": True}}})
    with pytest.raises(ValueError, match=r"model\.lora\.target_modules: \['qkv'\]"):
        lora_settings({"model": {"lora": {"rank": 4, "target_modules": ["qkv"]}}})


@pytest.mark.parametrize(
    ("cap", "seq", "response", "budget"),
    [(16, 4096, 2048, 16384), (8, 6144, 4096, 12288), (4, 100, 60, 130), (3, 100, 60, 1000), (8, 50, 10, 123)],
)
def test_the_budget_geometry_bounds_every_micro_batch_the_budget_allows(cap, seq, response, budget):
    """`micro_batch_geometry`: its rows x seq are at least the positions of any micro-batch of b <= cap rows of
    t <= seq positions with b·t <= budget (counted by brute force), and less than one row more than the largest;
    its response positions bound b x L for rows of at least one prompt token."""
    from vppo_recipes.plan import micro_batch_geometry

    rows, response_positions = micro_batch_geometry(cap, seq, response, budget)
    largest = max(b * t for b in range(1, cap + 1) for t in range(1, seq + 1) if b * t <= budget)
    assert largest <= rows * seq < largest + seq and rows <= cap
    most = max(b * L for b in range(1, cap + 1) for L in range(0, response + 1) if b * (1 + L) <= budget)
    assert most <= response_positions <= budget
    assert micro_batch_geometry(cap, seq, response, None) == (cap, cap * response)
