"""DyCo-RL's attention recorder (vppo_recipes.methods.dyco, ALGORITHMS.md §9.13) on the tiny Qwen2.5-VL / Qwen3-VL
models: its signals equal the plain ones from transformers' own eager attention (plain_dyco.py), the forward's
output is unchanged, and the layer's attention implementation is restored, also on error."""

from __future__ import annotations

import pytest
import torch
from _tiny_models import IMAGE_TOKEN, build_tiny
from plain_dyco import SIGNALS, plain_signals
from test_counterfactual import _batch

from vppo_recipes.methods.dyco import last_layer_attention_signals
from vppo_recipes.sharding import find_blocks

P = 20  # the first 20 positions are the "prompt" (the image and some text), the rest the "response"


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def tiny(request):
    model, patch = build_tiny(request.param)
    return model.eval(), patch


def test_signals_equal_eager_attention_and_the_output_is_unchanged(tiny):
    model, patch = tiny
    batch = _batch(patch, 0, [(1, 12), (2, 6), (1, 30)])
    ids, L = batch["input_ids"], batch["input_ids"].shape[1] - P
    with torch.no_grad():
        with last_layer_attention_signals(model, ids, batch["attention_mask"], P, L, IMAGE_TOKEN) as got:
            recorded = model.model(**batch, use_cache=False).last_hidden_state
        plain = model.model(**batch, use_cache=False).last_hidden_state
    assert torch.equal(recorded, plain)
    want = plain_signals(model, batch, P, L, IMAGE_TOKEN)
    valid = batch["attention_mask"][:, P:] > 0
    for k in SIGNALS:
        a, b = got[k].double()[valid], want[k][valid]
        if k.startswith("fr_"):  # compared as Bhattacharyya coefficients (plain_dyco.dyco_factors)
            a, b = torch.cos(a / 2), torch.cos(b / 2)
        assert torch.allclose(a, b, atol=1e-5), k
    assert got["has_image"].eq(1).all()


def test_the_attention_implementation_is_restored_also_on_error(tiny):
    model, patch = tiny
    attn = find_blocks(model)[1][-1].self_attn
    config, impl = attn.config, attn.config._attn_implementation
    batch = _batch(patch, 1, [(1, 12)])
    with pytest.raises(RuntimeError, match="boom"):
        with last_layer_attention_signals(model, batch["input_ids"], batch["attention_mask"], P, 10, IMAGE_TOKEN):
            raise RuntimeError("boom")
    assert attn.config is config and config._attn_implementation == impl
