import hashlib
import json

import pytest
import torch

from vppo_rollout.loading import load_policy, load_processor
from vppo_rollout.tiny import build_tiny_checkpoint, build_tokenizer

from .conftest import make_image


def _digest(folder):
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_build_is_deterministic_from_seed_and_seed_changes_weights(tmp_path, arch):
    a = _digest(build_tiny_checkpoint(tmp_path / "a", arch, seed=3))
    b = _digest(build_tiny_checkpoint(tmp_path / "b", arch, seed=3))
    c = _digest(build_tiny_checkpoint(tmp_path / "c", arch, seed=4))
    assert a == b
    assert a["model.safetensors"] != c["model.safetensors"]
    assert a["tokenizer.json"] == c["tokenizer.json"]


def test_folder_looks_like_a_downloaded_checkpoint(tiny_dir, arch):
    cfg = json.loads((tiny_dir / "config.json").read_text())
    assert cfg["model_type"] == arch
    assert (tiny_dir / "model.safetensors").is_file()
    proc_cfg = json.loads((tiny_dir / "processor_config.json").read_text())
    # the upstream class name, so AutoProcessor works where torchvision is installed
    assert proc_cfg["processor_class"] == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[arch]


def test_tokenizer_encodes_the_answer_format_compactly_and_round_trips():
    tok = build_tokenizer()
    text = "<think>three red shapes</think> The answer is \\boxed{3}"
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    pieces = tok.convert_ids_to_tokens(ids)
    assert pieces[0] == "<think>" and "</think>" in pieces  # single tokens, as in Qwen3's vocabulary
    assert len(ids) <= 16  # learnt merges, not bytes
    for word in [
        "red",
        "green",
        "blue",
        "yellow",
        "purple",
        "orange",
        "circle",
        "square",
        "triangle",
        "left",
        "right",
        "top",
        "bottom",
    ]:
        assert len(tok(" " + word)["input_ids"]) == 1, word
    for special in ["<|im_start|>", "<|im_end|>", "<|image_pad|>", "<|vision_start|>", "<|vision_end|>"]:
        assert tok.convert_tokens_to_ids(special) != tok.unk_token_id
    # byte-level: arbitrary text survives
    odd = "Ω ≥ 3.5 ∑ 日本"
    assert tok.decode(tok(odd)["input_ids"]) == odd


def test_embedding_is_padded_beyond_tokenizer_like_real_qwen(tiny_model, tiny_processor):
    v = tiny_model.config.text_config.vocab_size
    assert v % 64 == 0 and v > len(tiny_processor.tokenizer)


def test_reload_gives_identical_logits_and_backward_reaches_every_parameter(tiny_dir, tiny_model, tiny_processor):
    proc = tiny_processor
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "How many red circles?"}]}]
    text = proc.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    batch = proc(text=[text], images=[make_image(56, 56, 0)], return_tensors="pt")
    with torch.no_grad():
        a = tiny_model(**batch).logits
        b = load_policy(tiny_dir)(
            **load_processor(tiny_dir)(text=[text], images=[make_image(56, 56, 0)], return_tensors="pt")
        ).logits
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert torch.isfinite(a).all()
    m = load_policy(tiny_dir).train()
    m(**batch).logits.logsumexp(-1).mean().backward()
    grads = [p.grad for p in m.parameters() if p.grad is not None]
    assert len(grads) == sum(1 for _ in m.parameters())  # the vision tower is reached too


def test_unknown_size_override_names_the_closest_key(tmp_path):
    with pytest.raises(ValueError, match="num_hidden_layers"):
        build_tiny_checkpoint(tmp_path, "qwen2_5_vl", num_hiden_layers=3)
    with pytest.raises(ValueError, match="arch"):
        build_tiny_checkpoint(tmp_path, "llava")


def test_size_overrides_reach_the_config(tmp_path):
    d = build_tiny_checkpoint(tmp_path, "qwen3_vl", num_hidden_layers=3, hidden_size=96, num_attention_heads=4)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 3
    assert cfg["text_config"]["hidden_size"] == 96
    assert cfg["vision_config"]["out_hidden_size"] == 96


def test_default_sizes_stay_tiny_but_not_degenerate(tiny_model):
    n = sum(p.numel() for p in tiny_model.parameters())
    assert 100_000 < n < 500_000  # ~0.25 M: fast on one core, yet several layers of real computation
    assert tiny_model.config.text_config.num_hidden_layers == 2 and tiny_model.config.vision_config.depth == 2
