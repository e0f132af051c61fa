"""text_only_attention inside real Qwen2.5-VL / Qwen3-VL models (needs transformers; skipped by `nox -s tests_core`)."""

from __future__ import annotations

import pytest
import torch

from vppo_core.attention import text_only_attention

# --- inside real models (transformers, tiny random weights, built in milliseconds) -------------------------------

transformers = pytest.importorskip("transformers")
VOCAB, PAD, V_START, V_END, IMAGE_PAD, VIDEO_PAD = 64, 0, 60, 61, 62, 63


def _tiny_model(arch: str, attn: str):
    text = {
        "vocab_size": VOCAB,
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 256,
        "pad_token_id": PAD,
    }
    ids = {
        "image_token_id": IMAGE_PAD,
        "video_token_id": VIDEO_PAD,
        "vision_start_token_id": V_START,
        "vision_end_token_id": V_END,
    }
    vision = {"depth": 1, "hidden_size": 16, "intermediate_size": 32, "num_heads": 2, "out_hidden_size": 32}
    if arch == "qwen2_5_vl":
        text["rope_parameters"] = {"rope_type": "default", "rope_theta": 1e4, "mrope_section": [2, 1, 1]}
        vision |= {"patch_size": 14, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 56}
        vision["fullatt_block_indexes"] = [0]
        config = transformers.Qwen2_5_VLConfig(text_config=text, vision_config=vision, **ids)
        cls = transformers.Qwen2_5_VLForConditionalGeneration
    else:
        text |= {"head_dim": 8}
        text["rope_parameters"] = {
            "rope_type": "default",
            "rope_theta": 1e4,
            "mrope_section": [2, 1, 1],
            "mrope_interleaved": True,
        }
        vision |= {"patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2}
        vision |= {"num_position_embeddings": 16, "deepstack_visual_indexes": [0]}
        config = transformers.Qwen3VLConfig(text_config=text, vision_config=vision, **ids)
        cls = transformers.Qwen3VLForConditionalGeneration
    config._attn_implementation = attn
    torch.manual_seed(0)
    return cls(config).eval()


def _batch(patch: int):
    """Two rows, the first left-padded; each: text, <vision_start>, 4 image tokens (a 4×4 patch grid), text."""
    g = torch.Generator().manual_seed(0)
    rows, am = [], []
    for pad in (2, 0):
        before = torch.randint(1, 50, (3,), generator=g).tolist()
        after = torch.randint(1, 50, (5,), generator=g).tolist()
        rows.append([PAD] * pad + before + [V_START] + [IMAGE_PAD] * 4 + [V_END] + after)
        am.append([0] * pad + [1] * (len(rows[-1]) - pad))
    width = max(map(len, rows))
    rows = [[PAD] * (width - len(r)) + r for r in rows]
    am = [[0] * (width - len(a)) + a for a in am]
    input_ids, attention_mask = torch.tensor(rows), torch.tensor(am)
    grid = torch.tensor([[1, 4, 4], [1, 4, 4]])
    pixel_values = torch.randn(32, 3 * 2 * patch * patch, generator=g)
    # Any explicit positions serve the comparison (the same ones are used in every pass): 1-D, padding-aware.
    pos = (attention_mask.cumsum(-1) - 1).clamp_min(0)
    return input_ids, attention_mask, grid, pixel_values, pos[None].expand(3, -1, -1)


@pytest.mark.parametrize("arch", ["qwen2_5_vl", "qwen3_vl"])
def test_text_tokens_cannot_read_the_image_and_equal_removing_it_at_kept_positions(arch):
    patch = 14 if arch == "qwen2_5_vl" else 16
    model = _tiny_model(arch, "sdpa")
    input_ids, am, grid, pv, pos = _batch(patch)
    text_only = text_only_attention(input_ids, model.config.image_token_id, am)
    common = {"input_ids": input_ids, "image_grid_thw": grid, "position_ids": pos, "use_cache": False}
    with torch.no_grad():
        a = model(pixel_values=pv, attention_mask=text_only, **common).logits
        b = model(pixel_values=torch.randn_like(pv), attention_mask=text_only, **common).logits
        normal = model(pixel_values=pv, attention_mask=am, **common).logits
    text = (am == 1) & (input_ids != IMAGE_PAD)
    assert bool(torch.isfinite(a).all()), "the text-only mask produced NaN/inf somewhere"
    torch.testing.assert_close(a[text], b[text], atol=1e-5, rtol=0)
    # Not vacuous: with the normal mask the text after the image does depend on the pixels.
    assert (normal[text] - a[text]).abs().max() > 1e-3
    # Same as deleting the image tokens while keeping every other token's position id.
    for row in range(input_ids.shape[0]):
        keep = text[row]
        with torch.no_grad():
            removed = model(
                input_ids=input_ids[row][keep][None], position_ids=pos[:, row][:, keep][:, None], use_cache=False
            ).logits[0]
        torch.testing.assert_close(a[row][keep], removed, atol=1e-5, rtol=1e-5)


def test_additive_mask_under_eager_attention_equals_boolean_mask_under_sdpa():
    input_ids, am, grid, pv, pos = _batch(14)
    common = {"input_ids": input_ids, "image_grid_thw": grid, "position_ids": pos, "use_cache": False}
    with torch.no_grad():
        sdpa = _tiny_model("qwen2_5_vl", "sdpa")(
            pixel_values=pv, attention_mask=text_only_attention(input_ids, IMAGE_PAD, am), **common
        ).logits
        eager = _tiny_model("qwen2_5_vl", "eager")(
            pixel_values=pv, attention_mask=text_only_attention(input_ids, IMAGE_PAD, am, dtype=torch.float32), **common
        ).logits
    torch.testing.assert_close(eager, sdpa, atol=1e-5, rtol=1e-5)
