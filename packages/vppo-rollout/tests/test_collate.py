import pytest
import torch

from vppo_rollout.collate import collate_rollout, model_inputs, response_logits, rope_index_fn
from vppo_rollout.prompts import build_prompt

from .conftest import make_image


def _prompts(processor):
    return [
        build_prompt(processor, "How many red circles?", [make_image(56, 56, 0)]),
        # multi-image, placeholders inside the question, different sizes -> different image-token counts
        build_prompt(
            processor,
            "Left: <image> right: <image> Which has more squares?",
            [make_image(90, 60, 1), make_image(40, 120, 2)],
        ),
        build_prompt(processor, "What is 2 + 3?", []),  # text only
    ]


def _responses(processor):
    tok = processor.tokenizer
    return [
        tok("<think>three red shapes</think> The answer is \\boxed{3}<|im_end|>")["input_ids"],
        tok("<think>left</think> \\boxed{left}")["input_ids"],  # no stop token: hit max length
        tok("\\boxed{5}<|im_end|>")["input_ids"],
    ]


def _reference_logits(model, processor, prompt, response):
    """Plain per-example forward: the processor's own encoding + the response, positions left to transformers."""
    enc = processor(text=[prompt.text], images=prompt.images or None, return_tensors="pt")
    r = torch.tensor([response])
    enc["input_ids"] = torch.cat([enc["input_ids"], r], dim=1)
    enc["attention_mask"] = torch.ones_like(enc["input_ids"])
    enc["mm_token_type_ids"] = torch.cat(
        [enc["mm_token_type_ids"], torch.zeros_like(r, dtype=enc["mm_token_type_ids"].dtype)], 1
    )
    n = enc["input_ids"].shape[1] - len(response)
    with torch.no_grad():
        logits = model(**enc).logits
    return logits[0, n - 1 : n - 1 + len(response)]


def test_collated_logits_equal_per_example_forward(tiny_model, tiny_processor):
    prompts, responses = _prompts(tiny_processor), _responses(tiny_processor)
    batch = collate_rollout(tiny_processor, prompts, responses, model=tiny_model)
    P, L = batch["prompt_length"], batch["responses"].shape[1]
    with torch.no_grad():
        logits = response_logits(tiny_model(**model_inputs(batch)).logits, P, L)
    for b, (p, r) in enumerate(zip(prompts, responses)):
        ref = _reference_logits(tiny_model, tiny_processor, p, r)
        torch.testing.assert_close(logits[b, : len(r)], ref, rtol=1e-4, atol=1e-5)


def test_layout_left_padded_prompt_right_padded_response(tiny_model, tiny_processor):
    prompts, responses = _prompts(tiny_processor), _responses(tiny_processor)
    batch = collate_rollout(tiny_processor, prompts, responses, model=tiny_model, response_length=40)
    P = batch["prompt_length"]
    assert batch["responses"].shape == (3, 40) and batch["response_mask"].dtype == torch.float32
    for b, r in enumerate(responses):
        assert batch["responses"][b, : len(r)].tolist() == r
        assert batch["response_mask"][b].tolist() == [1.0] * len(r) + [0.0] * (40 - len(r))
        assert batch["attention_mask"][b, P - 1] == 1  # the last prompt token is always real
        assert batch["attention_mask"][b, P + len(r) :].sum() == 0
    # the longest prompt has no left padding, the text-only one has some
    n_img = (batch["input_ids"] == tiny_processor.image_token_id).sum().item()
    assert n_img == batch["image_grid_thw"].prod(-1).sum().item() // 4
    assert batch["mm_token_type_ids"].sum().item() == n_img
    assert batch["position_ids"].shape == (3, 3, P + 40)
    # M-RoPE: image tokens have differing height/width positions, text tokens equal ones
    img = batch["input_ids"][0] == tiny_processor.image_token_id
    assert not torch.equal(batch["position_ids"][1, 0, img], batch["position_ids"][2, 0, img])


def test_rope_index_from_config_equals_model_method(tiny_model, tiny_processor):
    prompts, responses = _prompts(tiny_processor), _responses(tiny_processor)
    a = collate_rollout(tiny_processor, prompts, responses, model=tiny_model)
    b = collate_rollout(tiny_processor, prompts, responses, config=tiny_model.config)
    assert torch.equal(a["position_ids"], b["position_ids"])


def test_repeated_prompt_object_gives_identical_rows(tiny_model, tiny_processor):
    p = build_prompt(tiny_processor, "How many?", [make_image(56, 84, 3)])
    batch = collate_rollout(tiny_processor, [p] * 4, [[10, 11], [12], [13, 14, 15], []], model=tiny_model)
    assert batch["image_grid_thw"].shape[0] == 4
    assert torch.equal(batch["input_ids"][0, : batch["prompt_length"]], batch["input_ids"][3, : batch["prompt_length"]])
    assert batch["response_mask"][3].sum() == 0


def test_bad_inputs_name_the_argument(tiny_model, tiny_processor):
    p = build_prompt(tiny_processor, "q", [])
    with pytest.raises(ValueError, match="lengths differ"):
        collate_rollout(tiny_processor, [p, p], [[1]], model=tiny_model)
    with pytest.raises(ValueError, match="exactly one of model= or config="):
        collate_rollout(tiny_processor, [p], [[1]])
    with pytest.raises(ValueError, match="response_length"):
        collate_rollout(tiny_processor, [p], [[1, 2, 3]], model=tiny_model, response_length=2)
    with pytest.raises(ValueError, match="Prompt"):
        collate_rollout(tiny_processor, ["text"], [[1]], model=tiny_model)
    with pytest.raises(ValueError, match="model_type"):
        rope_index_fn(object())


def test_response_with_image_placeholder_is_rejected_by_name(tiny_model, tiny_processor):
    p = build_prompt(tiny_processor, "q", [make_image(56, 56, 0)])
    with pytest.raises(ValueError, match=r"response_ids\[1\] contains the image/video placeholder"):
        collate_rollout(tiny_processor, [p, p], [[1], [2, tiny_processor.image_token_id]], model=tiny_model)
