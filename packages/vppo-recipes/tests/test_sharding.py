"""shard_policy: which modules become FSDP units, bad input, and numerical equality with a single process.

In-process tests run under a fake process group (torch's FakeProcessGroup: this process is rank 0 of N, collectives
are no-ops), which is enough for the structure of the sharding. The numerical test launches 2 real gloo processes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn
from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, Shard

from vppo_recipes.plan import fake_process_group
from vppo_recipes.sharding import call_in_root_forward, count_units, find_blocks, shard_policy

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import build_tiny

HERE = Path(__file__).parent
ARCHS = ["qwen2_5_vl", "qwen3_vl"]


@pytest.mark.parametrize("arch", ARCHS)
def test_find_blocks_returns_every_vision_block_and_decoder_layer(arch):
    model, _ = build_tiny(arch)
    vision, layers = find_blocks(model)
    assert vision == list(model.model.visual.blocks)
    assert layers == list(model.model.language_model.layers)


def test_find_blocks_rejects_a_model_without_a_vision_tower():
    from transformers import Qwen2Config, Qwen2ForCausalLM

    text_only = Qwen2ForCausalLM(
        Qwen2Config(
            vocab_size=64,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    with pytest.raises(ValueError, match="not a supported vision-language architecture"):
        find_blocks(text_only)
    with pytest.raises(ValueError, match="not a supported"):
        find_blocks(nn.Sequential(nn.Linear(2, 2)))


@pytest.mark.parametrize("arch", ARCHS)
def test_each_block_embedding_and_root_is_one_unit_with_dim0_shards(arch):
    model, _ = build_tiny(arch)
    n_params = sum(p.numel() for p in model.parameters())
    with fake_process_group(4):
        shard_policy(model, init_device_mesh("cpu", (4,)))
        vision, layers = find_blocks(model)
        assert all(isinstance(b, FSDPModule) for b in vision + layers)
        assert isinstance(model.model.language_model.embed_tokens, FSDPModule)
        assert not isinstance(model.lm_head, FSDPModule)  # in the root unit, see shard_policy's docstring
        assert isinstance(model, FSDPModule)
        assert count_units(model) == len(vision) + len(layers) + 2
        for p in model.parameters():
            assert isinstance(p, DTensor) and p.placements == (Shard(0),)
            assert p.to_local().shape[0] == -(-p.shape[0] // 4)  # rank 0 holds ceil(dim0 / 4) rows
        assert sum(p.numel() for p in model.parameters()) == n_params


def test_tied_embeddings_stay_in_the_root_unit():
    model, _ = build_tiny("qwen3_vl", tie=True)
    assert model.lm_head.weight is model.model.language_model.embed_tokens.weight
    with fake_process_group(2):
        shard_policy(model, init_device_mesh("cpu", (2,)))
        assert not isinstance(model.model.language_model.embed_tokens, FSDPModule)
        assert count_units(model) == 2 + 2 + 1


def test_hsdp_mesh_replicates_across_and_shards_within():
    model, _ = build_tiny("qwen2_5_vl")
    with fake_process_group(8):
        mesh = init_device_mesh("cpu", (2, 4), mesh_dim_names=("replicate", "shard"))
        shard_policy(model, mesh)
        p = model.model.language_model.layers[0].mlp.down_proj.weight
        assert p.device_mesh.ndim == 2
        assert p.to_local().shape[0] == p.shape[0] // 4  # sharded over the 4 ranks of a node only


def test_activation_checkpointing_wraps_blocks_and_keeps_state_dict_keys():
    model, _ = build_tiny("qwen2_5_vl")
    keys = set(model.state_dict())
    with fake_process_group(2):
        shard_policy(model, init_device_mesh("cpu", (2,)), activation_checkpointing=True)
        vision, layers = find_blocks(model)
        assert all(isinstance(b, CheckpointWrapper) and isinstance(b, FSDPModule) for b in vision + layers)
        assert set(model.state_dict()) == keys


def test_bad_mesh_and_double_sharding_raise_value_errors():
    model, _ = build_tiny("qwen2_5_vl")
    with pytest.raises(ValueError, match="DeviceMesh"):
        shard_policy(model, "cpu")
    with fake_process_group(4):
        with pytest.raises(ValueError, match="mesh_dim_names"):
            shard_policy(model, init_device_mesh("cpu", (2, 2), mesh_dim_names=("dp", "fsdp")))
        shard_policy(model, init_device_mesh("cpu", (4,)))
        with pytest.raises(ValueError, match="already sharded"):
            shard_policy(model, init_device_mesh("cpu", (4,)))


def test_call_in_root_forward_is_a_plain_call_on_an_unsharded_model():
    model, _ = build_tiny("qwen2_5_vl")
    assert call_in_root_forward(model, lambda m, x: (m is model, x), 3) == (True, 3)


@pytest.mark.distributed
def test_two_gloo_ranks_match_a_single_process_after_three_adamw_steps():
    """FSDP / FSDP+AC / HSDP+AC / tied embeddings, both architectures: losses and gathered fp32 params equal a
    single-process run on the full batches (tolerances in shard_worker.py)."""
    from vppo_recipes.offline import OFFLINE_ENV

    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(HERE / "shard_worker.py"),
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    assert out.count("SCENARIO") == 4 and " FAIL " not in out and "ALL OK" in out, out[-4000:]
