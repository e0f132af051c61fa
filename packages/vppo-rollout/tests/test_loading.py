import json
import shutil

import pytest
import torch

from vppo_rollout.loading import checkpoint_arch, load_policy, load_processor

from .conftest import make_image


def test_load_policy_dtype_and_eval_mode(tiny_dir, arch):
    m = load_policy(tiny_dir, dtype=torch.bfloat16)
    assert {p.dtype for p in m.parameters()} == {torch.bfloat16}
    assert not m.training
    assert m.config.model_type == arch


def test_load_processor_pixel_bounds_change_the_number_of_image_tokens(tiny_dir, arch):
    factor = 28 if arch == "qwen2_5_vl" else 32
    small = load_processor(tiny_dir, min_pixels=factor * factor * 4, max_pixels=factor * factor * 4)
    large = load_processor(tiny_dir, min_pixels=factor * factor * 16, max_pixels=factor * factor * 16)
    img = make_image(100, 100, 1)
    assert small.image_processor(images=[img], return_tensors="pt")["image_grid_thw"].prod().item() == 16
    assert large.image_processor(images=[img], return_tensors="pt")["image_grid_thw"].prod().item() == 64


def test_load_processor_rejects_inverted_bounds(tiny_dir):
    with pytest.raises(ValueError, match="min_pixels"):
        load_processor(tiny_dir, min_pixels=10_000, max_pixels=100)


def test_load_processor_reads_a_legacy_layout_with_separate_preprocessor_config(tiny_dir, tmp_path):
    """Downloaded Qwen2.5-VL folders (transformers 4.x era) keep the image processor in preprocessor_config.json."""
    legacy = tmp_path / "legacy"
    shutil.copytree(tiny_dir, legacy)
    proc_cfg = json.loads((legacy / "processor_config.json").read_text())
    image_cfg = proc_cfg.pop("image_processor")
    image_cfg["processor_class"] = proc_cfg["processor_class"]
    (legacy / "preprocessor_config.json").write_text(json.dumps(image_cfg))
    (legacy / "processor_config.json").unlink()
    p = load_processor(legacy)
    ref = load_processor(tiny_dir)
    img = make_image(60, 90, 2)
    a = p(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[img], return_tensors="pt")
    b = ref(text=["<|vision_start|><|image_pad|><|vision_end|>hi"], images=[img], return_tensors="pt")
    assert torch.equal(a["input_ids"], b["input_ids"])
    torch.testing.assert_close(a["pixel_values"], b["pixel_values"])


def test_missing_folder_and_uncached_hub_id_offline_give_clear_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not an existing folder"):
        load_policy(tmp_path / "nope")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    with pytest.raises(OSError, match="offline"):
        load_processor("Qwen/Qwen2.5-VL-7B-Instruct")


def test_unsupported_model_type_is_rejected(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(ValueError, match="qwen2_5_vl"):
        checkpoint_arch(tmp_path)
    with pytest.raises(ValueError, match="dtype"):
        load_policy(tmp_path, dtype=torch.int8)


def test_load_processor_never_falls_back_silently_when_auto_processor_fails(tiny_dir, monkeypatch):
    """With torchvision present the folder must load the way vLLM loads it; a failure names the folder and cause."""
    import transformers

    def broken(*args, **kwargs):
        raise RuntimeError("operator torchvision::nms does not exist")

    monkeypatch.setattr(transformers.utils, "is_torchvision_available", lambda: True)
    monkeypatch.setattr(transformers.AutoProcessor, "from_pretrained", broken)
    with pytest.raises(OSError, match=r"cannot load '.*' \(RuntimeError: operator torchvision::nms") as e:
        load_processor(tiny_dir)
    assert str(tiny_dir) in str(e.value) and "uninstall it" in str(e.value)


@pytest.mark.parametrize(
    "remove", [("tokenizer.json",), ("processor_config.json",), ("tokenizer.json", "processor_config.json")]
)
def test_a_model_folder_without_its_processor_names_the_missing_files_and_the_fix(tiny_dir, tmp_path, remove):
    """It used to end in a raw transformers traceback ("Can't load image processor ... make sure you don't have a
    local directory with the same name")."""
    folder = tmp_path / "model"
    shutil.copytree(tiny_dir, folder)
    for name in remove:
        (folder / name).unlink()
    with pytest.raises(FileNotFoundError) as info:
        load_processor(folder)
    message = str(info.value)
    missing, fix = message.split(". Copy", 1)
    assert missing.startswith(f"{folder} has the model but not its processor: missing")
    assert ("tokenizer.json or vocab.json" in missing) == ("tokenizer.json" in remove)
    assert ("preprocessor_config.json or processor_config.json" in missing) == ("processor_config.json" in remove)
    assert "processor.save_pretrained" in fix
