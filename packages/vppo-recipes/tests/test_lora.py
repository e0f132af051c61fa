"""vppo_recipes.lora on the tiny Qwen2.5-VL, in process: where the adapters go, the merge against peft's own
merge_and_unload, the frozen base behind `adapters_disabled`, the adapter folder that peft loads, the merged
Hugging Face folder that transformers loads with the training model's logits, and the `model.lora` config keys."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"
SETTINGS = dict(rank=4, alpha=8.0)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    from vppo_rollout.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("lora") / "tiny", "qwen2_5_vl", seed=0)


def _adapted(base: Path, seed: int = 1, **settings):
    """The base with adapters whose B is random (a freshly injected B is 0, which would hide a wrong merge)."""
    from vppo_recipes.lora import LoraSettings, apply_lora
    from vppo_rollout.loading import load_policy

    model = apply_lora(load_policy(str(base), dtype=torch.float32, device="cpu"), LoraSettings(**(SETTINGS | settings)))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    return model.eval()


def _batch(base: Path):
    """Two prompts with an image and a response each, as the model's forward inputs."""
    from PIL import Image
    from transformers import AutoConfig

    from vppo_rollout.collate import collate_rollout, model_inputs
    from vppo_rollout.loading import load_processor
    from vppo_rollout.prompts import build_prompt

    processor = load_processor(base)
    image = Image.new("RGB", (56, 56), (200, 30, 30))
    prompts = [build_prompt(processor, q, [image]) for q in ("left or right?", "which side?")]
    ids = [processor.tokenizer(t)["input_ids"] for t in ("<think>x</think> \\boxed{2}", "\\boxed{left}")]
    return model_inputs(collate_rollout(processor, prompts, ids, config=AutoConfig.from_pretrained(base)))


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def test_default_targets_are_the_decoder_projections_and_only_adapters_train(base):
    from vppo_recipes.lora import LM_PROJECTIONS, trainable_parameters

    model = _adapted(base)
    lora = [n for n, p in model.named_parameters() if p.requires_grad]
    assert len(trainable_parameters(model)) == len(lora) == 2 * len(LM_PROJECTIONS) * 2  # A, B x 7 x 2 layers
    assert all(".language_model.layers." in n and (".lora_A." in n or ".lora_B." in n) for n in lora)
    with_vision = _adapted(base, vision=True)
    vision = [n for n, p in with_vision.named_parameters() if p.requires_grad and ".visual." in n]
    assert len(vision) == 2 * 5 * 2  # qkv, proj, gate/up/down of 2 blocks; never the merger
    with pytest.raises(ValueError, match="q_prj"):
        _adapted(base, target_modules=("q_prj",))


def test_merged_tensors_equal_peft_merge_and_unload_and_disabled_adapters_give_the_base(base):
    from peft.tuners.lora import LoraLayer

    from vppo_recipes.lora import adapters_disabled, lora_scalings, merged_tensors
    from vppo_rollout.loading import load_policy

    model = _adapted(base)
    merged = dict(merged_tensors(model.state_dict().items(), lora_scalings(model)))
    plain = load_policy(str(base), dtype=torch.float32, device="cpu").eval()
    assert merged.keys() == plain.state_dict().keys()
    inputs = _batch(base)
    adapted = _logits(model, inputs)
    with adapters_disabled(model):
        assert torch.equal(_logits(model, inputs), _logits(plain, inputs))  # the frozen reference, no copy
    assert (adapted - _logits(plain, inputs)).abs().max() > 1e-3  # the adapters change the policy
    assert all(p.requires_grad for n, p in model.named_parameters() if ".lora_" in n)  # restored
    for layer in (m for m in model.modules() if isinstance(m, LoraLayer)):  # peft's own merge, layer by layer
        layer.merge(adapter_names=["default"])
    peft_merged = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if ".lora_" not in k}
    worst = max((merged[k] - peft_merged[k]).abs().max().item() for k in merged)
    assert worst < 1e-6, worst


def test_adapter_folder_loads_in_peft_and_merged_export_gives_the_training_models_logits(base, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForImageTextToText

    from vppo_recipes.lora import adapter_state_dict, export_merged, load_adapter, save_adapter
    from vppo_rollout.loading import load_policy

    model = _adapted(base)
    save_adapter(tmp_path / "adapter", adapter_state_dict(model), model, base_model=base)
    inputs = _batch(base)
    training = _logits(model, inputs)
    peft_model = PeftModel.from_pretrained(load_policy(str(base), dtype=torch.float32), tmp_path / "adapter").eval()
    assert torch.equal(_logits(peft_model, inputs), training)
    reloaded = _adapted(base, seed=2)  # other adapter values, overwritten by the folder's
    load_adapter(reloaded, tmp_path / "adapter")
    assert torch.equal(_logits(reloaded, inputs), training)

    out = export_merged(tmp_path / "adapter", tmp_path / "merged", dtype=torch.float32)
    merged, info = AutoModelForImageTextToText.from_pretrained(str(out), output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    assert (out / "generation_config.json").read_text() == (base / "generation_config.json").read_text()
    worst = (_logits(merged.eval(), inputs) - training).abs().max().item()
    assert worst < 1e-4, worst  # W + s·B@A in one matmul vs two: float32 rounding only
    with pytest.raises(ValueError, match="fit"):
        load_adapter(_adapted(base, rank=2), tmp_path / "adapter")


def _cfg(name: str, *overrides: str):
    from vppo_recipes.config_schema import validate_config

    raw = OmegaConf.merge(OmegaConf.load(CONFIGS / f"{name}.yaml"), OmegaConf.from_dotlist(list(overrides)))
    return validate_config(raw, "rl" if name != "tiny_sft" else "sft")


def test_model_lora_keys_default_to_off_and_the_issue_command_line_validates():
    from vppo_recipes.config_schema import ConfigError
    from vppo_recipes.lora import LM_PROJECTIONS, lora_settings

    assert lora_settings(_cfg("tiny_vppo")) is None
    on = lora_settings(_cfg("tiny_vppo", "model.lora.rank=8"))
    assert (on.rank, on.scaling, on.target_modules, on.vision) == (8, 1.0, LM_PROJECTIONS, False)
    assert lora_settings(_cfg("tiny_sft", "model.lora.rank=8", "model.lora.dropout=0.05")).dropout == 0.05
    with pytest.raises(ConfigError, match=r"model\.lora\.dropout"):
        _cfg("tiny_vppo", "model.lora.rank=8", "model.lora.dropout=0.05")
    with pytest.raises(ConfigError, match=r"model\.lora\.rnak"):
        _cfg("tiny_vppo", "model.lora.rnak=8")
    with pytest.raises(ConfigError, match="target_modules"):
        _cfg("tiny_vppo", "model.lora.rank=8", "model.lora.target_modules=[]")


def test_resuming_a_pre_lora_checkpoint_config_is_no_change_and_a_lora_runs_base_must_stay():
    from vppo_recipes.config_schema import config_changes

    now = OmegaConf.to_container(_cfg("tiny_vppo"))
    saved = json.loads(json.dumps(now))
    del saved["model"]["lora"]  # written before model.lora existed
    assert config_changes(saved, now) == []
    lora = OmegaConf.to_container(_cfg("tiny_vppo", "model.lora.rank=8"))
    moved = json.loads(json.dumps(lora))
    moved["model"]["path"] = "/elsewhere"
    assert [c.split(":")[0] for c in config_changes(lora, moved)] == ["model.path"]
    assert config_changes({**now, "model": {**now["model"], "path": "/elsewhere"}}, now) == []


def test_a_bfloat16_run_stores_the_frozen_base_in_bfloat16_and_the_adapters_in_float32(base):
    from vppo_recipes.lora import LoraSettings, apply_lora
    from vppo_rollout.loading import load_policy

    model = apply_lora(load_policy(str(base), dtype=torch.float32), LoraSettings(**SETTINGS), base_dtype=torch.bfloat16)
    dtypes = {(p.requires_grad, p.dtype) for p in model.parameters()}
    assert dtypes == {(True, torch.float32), (False, torch.bfloat16)}
