"""PEPO's prior reduced layer by layer during the forward (`forward._pepo_layer_sums`) equals, bit for bit, the
prior over every layer's hidden state that `output_hidden_states=True` returns (issue 26: the pass no longer keeps
(layers + 1) x [B, T, H]); on both architectures (Qwen3-VL adds its deepstack features after early layers), also
with the decoder layers wrapped for activation checkpointing as the recipe wraps them."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import IMAGE_TOKEN, build_tiny, make_batch

from vppo_core.shaping import pepo_visual_prior
from vppo_recipes.forward import response_pass


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
@pytest.mark.parametrize("checkpointed", [False, True])
def test_the_streamed_prior_equals_the_prior_over_all_hidden_states(arch, checkpointed):
    model, patch = build_tiny(arch, seed=3)
    model.eval()
    batch = make_batch(patch, seed=4, bsz=3)
    prompt_length = 8
    responses = batch["input_ids"][:, prompt_length:]
    layers = model.model.language_model.layers
    with torch.no_grad():
        full = model.model(**batch, use_cache=False, output_hidden_states=True)
        assert len(full.hidden_states) == model.config.text_config.num_hidden_layers + 1
        want = pepo_visual_prior(list(full.hidden_states), batch["input_ids"] == IMAGE_TOKEN)
        if checkpointed:
            from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

            for i, layer in enumerate(layers):
                layers[i] = checkpoint_wrapper(layer)
        hooks_before = [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in layers]
        got = response_pass(
            model, batch, responses, prompt_length, temperature=1.0, chunk_size=4, visual_token_id=IMAGE_TOKEN
        )
    L = responses.shape[1]
    assert torch.equal(got["prior"], want[:, prompt_length : prompt_length + L])
    assert [(len(m._forward_hooks), len(m._forward_pre_hooks)) for m in layers] == hooks_before  # all removed


def test_a_row_without_image_tokens_is_named():
    model, patch = build_tiny("qwen2_5_vl", seed=3)
    batch = make_batch(patch, seed=4, bsz=2)
    with torch.no_grad(), pytest.raises(ValueError, match=r"rows \[0, 1\] have no visual token"):
        response_pass(model, batch, batch["input_ids"][:, 8:], 8, temperature=1.0, chunk_size=4, visual_token_id=7)
