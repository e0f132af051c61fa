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
