"""PGPO's text-only pass end to end on real Qwen-VL models: vppo_core's 4-D mask + the collator's explicit M-RoPE ids.

What transformers 5.23 does with the mask (read in masking_utils.py / integrations/sdpa_attention.py /
eager_attention_forward): a 4-D `attention_mask` is returned as-is by `_preprocess_mask_arguments` and handed to
the attention function. SDPA accepts bool (True = attend) or an additive float mask; eager *adds* the mask to the
scores, so it needs the additive float form (a bool mask would be added as 0/1 and silently hide nothing).
FlashAttention-2 takes no 4-D masks. The position ids must be passed explicitly: Qwen-VL derives M-RoPE ids from
a 2-D mask only.
"""

import pytest
import torch

from vppo_core.attention import text_only_attention
from vppo_rollout.collate import collate_rollout, model_inputs
from vppo_rollout.loading import load_policy
from vppo_rollout.prompts import build_prompt

from .conftest import make_image


def _batch(processor, model, seed):
    prompts = [
        build_prompt(processor, "How many red circles?", [make_image(56, 56, seed)]),
        build_prompt(
            processor,
            "Left <image> right <image> which?",
            [make_image(90, 60, seed + 1), make_image(40, 120, seed + 2)],
        ),
    ]
    tok = processor.tokenizer
    responses = [tok("<think>three</think> \\boxed{3}<|im_end|>")["input_ids"], tok("\\boxed{left}")["input_ids"]]
    return collate_rollout(processor, prompts, responses, model=model)


def _text_only_logits(model, batch, mask_dtype):
    cfg = model.config
    mask = text_only_attention(
        batch["input_ids"], (cfg.image_token_id, cfg.video_token_id), batch["attention_mask"], dtype=mask_dtype
    )
    inputs = model_inputs(batch)
    inputs["attention_mask"] = mask
    with torch.no_grad():
        return model(**inputs).logits


@pytest.mark.parametrize(
    ("attn", "mask_dtype"), [("sdpa", torch.bool), ("sdpa", torch.float32), ("eager", torch.float32)]
)
def test_text_logits_ignore_pixels_and_differ_from_the_image_pass(tiny_dir, tiny_processor, attn, mask_dtype):
    model = load_policy(tiny_dir, attn_implementation=attn)
    a, b = _batch(tiny_processor, model, 0), _batch(tiny_processor, model, 10)  # same tokens, other pixels
    assert torch.equal(a["input_ids"], b["input_ids"]) and not torch.equal(a["pixel_values"], b["pixel_values"])
    text = (a["attention_mask"] == 1) & (a["input_ids"] != model.config.image_token_id)
    la, lb = _text_only_logits(model, a, mask_dtype), _text_only_logits(model, b, mask_dtype)
    torch.testing.assert_close(la[text], lb[text], rtol=0, atol=1e-6)
    with torch.no_grad():
        full = model(**model_inputs(a)).logits
    P = a["prompt_length"]
    assert (full[:, P - 1 :] - la[:, P - 1 :]).abs().amax() > 1e-3  # hiding the image changes the response logits


def test_text_only_pass_equals_dropping_visual_tokens_with_original_positions(tiny_dir, tiny_processor):
    """The mask means 'text-only, every token at its original M-RoPE position' — check against that literally."""
    model = load_policy(tiny_dir)
    batch = _batch(tiny_processor, model, 0)
    masked = _text_only_logits(model, batch, torch.bool)
    keep = batch["input_ids"] != model.config.image_token_id
    for b in range(batch["input_ids"].shape[0]):
        k = keep[b]
        with torch.no_grad():
            ref = model(
                input_ids=batch["input_ids"][b : b + 1, k],
                attention_mask=batch["attention_mask"][b : b + 1, k],
                position_ids=batch["position_ids"][:, b : b + 1, k],
            ).logits[0]
        real = batch["attention_mask"][b, k] == 1
        torch.testing.assert_close(masked[b, k][real], ref[real], rtol=1e-4, atol=1e-5)


def test_eager_attention_with_a_bool_mask_is_silently_wrong(tiny_dir, tiny_processor):
    """Why the float form is required for eager: the bool mask is added to the scores as 0/1, hiding nothing."""
    model = load_policy(tiny_dir, attn_implementation="eager")
    a, b = _batch(tiny_processor, model, 0), _batch(tiny_processor, model, 10)
    text = (a["attention_mask"] == 1) & (a["input_ids"] != model.config.image_token_id)
    la, lb = _text_only_logits(model, a, torch.bool), _text_only_logits(model, b, torch.bool)
    assert (la[text] - lb[text]).abs().amax() > 1e-4
