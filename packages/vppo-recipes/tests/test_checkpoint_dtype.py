"""Checkpoints in the training dtype (issue 24): a bf16 run writes a bf16 Hugging Face model whose config.json says
so, half the bytes of a float32 one, and still resumes exactly, because the float32 master weights come back bit for
bit from the export plus their low 16 bits (`checkpoint_weights.split_float32`)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from vppo_recipes.checkpoint_weights import join_float32, restore_master_weights, split_float32
from vppo_recipes.checkpointing import load_training_state, save_checkpoint
from vppo_recipes.config_schema import ConfigError, validate_config
from vppo_rollout.loading import load_policy, load_processor
from vppo_rollout.tiny import build_tiny_checkpoint

sys.path.insert(0, str(Path(__file__).parent))
from test_checkpointing import _batch, _train_steps
from test_rl_distributed import _cfg, _train_in_process


def _float32_patterns() -> torch.Tensor:
    """Every 65,521st 32-bit pattern (a prime stride: all low halves and exponents are hit) plus the edge cases:
    exact ties (low half 0x8000) on even and odd upper halves, signed zeros, subnormals, the largest finite floats
    (which round to inf in bf16), infinities and NaNs."""
    stride = torch.arange(-(2**31), 2**31, 65521, dtype=torch.int64)
    edges = torch.tensor(
        [0x00000000, 0x80000000, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000, 0xBF808000, 0x7F7F8000,
         0x7F7FFFFF, 0xFF7FFFFF, 0x7F800000, 0xFF800000, 0x7FC00000, 0x7F800001, 0x7FFFFFFF, 0xFFFF8000],
        dtype=torch.int64,
    )  # fmt: skip
    bits = torch.cat([stride, edges])
    return (((bits & 0xFFFFFFFF) ^ 0x80000000) - 0x80000000).to(torch.int32).view(torch.float32)


def test_split_float32_is_exact_and_rounds_to_nearest_like_torch_except_on_ties():
    x = _float32_patterns()
    high, low = split_float32(x)
    assert high.dtype == torch.bfloat16 and low.dtype == torch.int16 and high.shape == low.shape == x.shape
    back = join_float32(high, low)
    nan = torch.isnan(x)
    assert torch.equal(back[~nan].view(torch.int32), x[~nan].view(torch.int32))  # bit for bit
    assert torch.isnan(high[nan]).all() and torch.isnan(back[nan]).all()
    # The export is a nearest bf16 value: as near as torch's round-to-nearest-even, equal but on exact ties.
    rne = x.to(torch.bfloat16)
    finite = torch.isfinite(rne) & torch.isfinite(high)
    err, err_rne = (high.double() - x.double()).abs(), (rne.double() - x.double()).abs()
    assert torch.equal(err[finite], err_rne[finite])
    differs = (high.view(torch.int16) != rne.view(torch.int16)) & ~nan
    ties = (x.view(torch.int32) & 0xFFFF) == 0x8000
    assert differs.any() and not (differs & ~ties).any()


def test_join_float32_refuses_mismatched_inputs():
    with pytest.raises(ValueError, match="bfloat16 and an int16 tensor of one shape"):
        join_float32(torch.zeros(3, dtype=torch.bfloat16), torch.zeros(2, dtype=torch.int16))
    with pytest.raises(ValueError, match="float32"):
        split_float32(torch.zeros(3, dtype=torch.bfloat16))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "qwen2_5_vl", seed=0)


def _dtypes(folder: Path) -> set[str]:
    with safe_open(folder / "model.safetensors", "pt") as f:
        return {str(f.get_slice(k).get_dtype()) for k in f.keys()}


def test_a_bfloat16_checkpoint_is_half_the_size_says_so_and_restores_the_master_weights_exactly(tiny, tmp_path):
    """save_checkpoint(dtype=bfloat16) of float32 master weights: bf16 tensors, config.json `dtype: bfloat16`,
    about half the bytes of the float32 export; `from_pretrained(dtype="auto")` gets bf16; and the float32
    master weights, optimizer and all, continue exactly like the run that saved them."""
    from transformers import AutoModelForImageTextToText

    model, processor = load_policy(tiny), load_processor(tiny)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = _batch(model, processor)
    _train_steps(model, optimizer, batch, 1)  # float32 values with all 32 bits in use
    bf16 = save_checkpoint(tmp_path / "bf16", 1, model=model, optimizer=optimizer, dtype=torch.bfloat16)
    fp32 = save_checkpoint(tmp_path / "fp32", 1, model=model, optimizer=optimizer, dtype=torch.float32)

    assert _dtypes(bf16) == {"BF16"} and _dtypes(fp32) == {"F32"}
    for folder, name in ((bf16, "bfloat16"), (fp32, "float32")):
        cfg = json.loads((folder / "config.json").read_text())
        assert cfg["dtype"] == cfg["text_config"]["dtype"] == cfg["vision_config"]["dtype"] == name
    ratio = (bf16 / "model.safetensors").stat().st_size / (fp32 / "model.safetensors").stat().st_size
    assert 0.49 < ratio < 0.52, ratio
    meta = json.loads((bf16 / "vppo_checkpoint.json").read_text())
    assert meta["weights_dtype"] == "bfloat16" and meta["master_low_bits"] is True
    assert "master_weights_low16.safetensors" in meta["files"]  # in the manifest: verified like the rest
    assert not (fp32 / "master_weights_low16.safetensors").exists()
    assert AutoModelForImageTextToText.from_pretrained(str(bf16), dtype="auto").dtype == torch.bfloat16

    _train_steps(model, optimizer, batch, 1)  # the uninterrupted run
    resumed = load_policy(bf16, dtype=torch.float32)
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), resumed.parameters()))  # bf16 alone: not
    assert restore_master_weights(resumed, bf16) is True
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    load_training_state(bf16, model=resumed, optimizer=resumed_opt)
    _train_steps(resumed, resumed_opt, batch, 1)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    assert restore_master_weights(load_policy(fp32), fp32) is False  # a float32 export is the master weights


def test_tied_embeddings_are_exported_once_and_restored_exactly(tmp_path):
    """Qwen3-VL with tie_word_embeddings: the bf16 export holds the same tensors as the float32 one (lm_head is not
    written twice) and the tied weight comes back exact."""
    sys.path.insert(0, str(Path(__file__).parent))
    from _tiny_models import build_tiny

    model, _ = build_tiny("qwen3_vl", tie=True)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # float32 values off the bf16 grid
    bf16 = save_checkpoint(tmp_path / "bf16", 1, model=model, dtype=torch.bfloat16)
    fp32 = save_checkpoint(tmp_path / "fp32", 1, model=model, dtype=torch.float32)
    with safe_open(bf16 / "model.safetensors", "pt") as a, safe_open(fp32 / "model.safetensors", "pt") as b:
        assert sorted(a.keys()) == sorted(b.keys())
    resumed = load_policy(bf16, dtype=torch.float32)
    assert resumed.lm_head.weight is resumed.model.language_model.embed_tokens.weight
    assert restore_master_weights(resumed, bf16)
    for (name, p), q in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(p, q), name


def test_restore_master_weights_refuses_a_model_not_loaded_from_the_export(tiny, tmp_path):
    model = load_policy(tiny)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # float32 values off the bf16 grid
    ckpt = save_checkpoint(tmp_path, 1, model=model, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"is not .*bfloat16 export in float32"):
        restore_master_weights(load_policy(tiny), ckpt)


def test_checkpoint_dtype_is_schema_checked_and_defaults_to_the_training_dtype():
    from vppo_recipes.distributed import checkpoint_dtype, training_dtype

    cfg, _ = _cfg("tiny_dapo")
    assert cfg.checkpoint.dtype is None and checkpoint_dtype(cfg) == training_dtype(cfg) == torch.float32
    cfg, _ = _cfg("tiny_dapo", **{"model.dtype": "bfloat16"})
    assert checkpoint_dtype(cfg) == training_dtype(cfg) == torch.bfloat16
    cfg, _ = _cfg("tiny_dapo", **{"model.dtype": "bfloat16", "checkpoint.dtype": "float32"})
    assert checkpoint_dtype(cfg) == torch.float32 and training_dtype(cfg) == torch.bfloat16
    with pytest.raises(ConfigError, match=r"'checkpoint.dtype' is 'float16'; allowed values: 'float32', 'bfloat16'"):
        _cfg("tiny_dapo", **{"checkpoint.dtype": "float16"})
    assert validate_config(cfg, "rl").checkpoint.dtype == "float32"


def test_a_bf16_rl_run_writes_bf16_checkpoints_and_resumes_exactly(tmp_path, monkeypatch):
    """The RL recipe in process with model.dtype=bfloat16: 2 steps uninterrupted vs 1 step, then a resumed launch
    to step 2. Every checkpoint is bf16 (config.json too), and the resumed step 2 equals the uninterrupted one:
    metrics and the restored float32 master weights, bit for bit."""

    from _rl_rewards import alternate_rewards

    alternate_rewards(monkeypatch)  # the random model earns 0 everywhere: no update otherwise
    bf16 = {"model.dtype": "bfloat16"}
    full = _train_in_process(tmp_path / "full", "tiny_dapo", {"training.max_steps": 2, **bf16})
    _train_in_process(tmp_path / "cut", "tiny_dapo", {"training.max_steps": 1, **bf16})
    cut = _train_in_process(tmp_path / "cut", "tiny_dapo", {"training.max_steps": 2, **bf16})
    assert [m["step"] for m in full] == [m["step"] for m in cut] == [1, 2]
    assert full[1]["optimizer_steps"] > 0 and math.isfinite(full[1]["loss"]) and full[1]["grad_norm"] > 0
    timing = ("time/", "throughput/", "memory/")
    for a, b in zip(full, cut):
        diff = {k: (v, b.get(k)) for k, v in a.items() if not k.startswith(timing) and v != b.get(k)}
        assert not diff, diff

    masters = []
    for run in ("full", "cut"):
        ckpt = tmp_path / run / "run" / "checkpoints" / "step_000002"
        assert _dtypes(ckpt) == {"BF16"} and json.loads((ckpt / "config.json").read_text())["dtype"] == "bfloat16"
        model = load_policy(ckpt, dtype=torch.float32)
        assert restore_master_weights(model, ckpt)
        masters.append(model.state_dict())
    first = load_policy(tmp_path / "full" / "run" / "checkpoints" / "step_000001", dtype=torch.float32)
    restore_master_weights(first, tmp_path / "full" / "run" / "checkpoints" / "step_000001")
    assert any(not torch.equal(masters[0][k], v) for k, v in first.state_dict().items()), "step 2 did not train"
    for k, v in masters[0].items():
        assert torch.equal(v, masters[1][k]), k


def test_a_vllm_sampler_gets_the_restored_master_weights_not_the_bf16_export(tiny, tmp_path, monkeypatch):
    """vLLM loads a checkpoint's bf16 export, which is not the trainer's float32 master weights: setup pushes those
    into it before the first rollout (a recording stand-in for the engine; vLLM itself runs in nox -s tests_vllm)."""
    import torch.distributed as dist

    import vppo_recipes.rl.rl_distributed as rl
    from vppo_eval.synthetic import build_visual_task

    model = load_policy(tiny)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 1e-3)  # float32 values off the bf16 grid
    master = {k: v.clone() for k, v in model.state_dict().items()}
    start = save_checkpoint(tmp_path / "sft", 1, model=model, processor_source=tiny, dtype=torch.bfloat16)
    build_visual_task(tmp_path / "task", n_train=4, n_test=1, seed=0, tasks=("side",))

    class RecordingSampler:
        def __init__(self) -> None:
            self.pushed: dict[str, torch.Tensor] = {}

        def update_weights(self, named_tensors) -> None:
            self.pushed.update({name: t.clone() for name, t in named_tensors})

    monkeypatch.setattr(rl.RLRecipeDistributed, "_setup_sampler", lambda self, cfg: RecordingSampler())
    cfg, _ = _cfg(
        "tiny_dapo",
        **{"model.path": start, "data.source": tmp_path / "task", "output_dir": tmp_path / "run",
           "world.nproc_per_node": 1, "validation.every_n_steps": 0, "rollout.engine": "vllm",
           "metric_logger.log_dir": tmp_path / "run" / "logs"},
    )  # fmt: skip
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        recipe = rl.RLRecipeDistributed(cfg)
        recipe.setup(cfg)
        recipe.metric_logger.close()
    finally:
        dist.destroy_process_group()
    pushed = recipe.sampler.pushed
    assert pushed.keys() == master.keys()
    for name, value in master.items():
        assert torch.equal(pushed[name], value), name
