"""Tiny random Qwen2.5-VL / Qwen3-VL models and batches for the sharding tests (built in code, no hub).

Shared by test_sharding.py (in-process, fake process group) and shard_worker.py (torchrun, gloo).
"""

from __future__ import annotations

import torch

VOCAB = 256
IMAGE_TOKEN, VIDEO_TOKEN, VSTART, VEND = 251, 252, 253, 254


def build_tiny(arch: str, *, tie: bool = False, seed: int = 0) -> tuple[torch.nn.Module, int]:
    """A randomly initialised tiny model (2 vision blocks, 2 decoder layers) and its ViT patch size."""
    torch.manual_seed(seed)
    text = dict(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=0,
    )
    special = dict(
        image_token_id=IMAGE_TOKEN,
        video_token_id=VIDEO_TOKEN,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
        tie_word_embeddings=tie,
    )
    if arch == "qwen2_5_vl":
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

        cfg = Qwen2_5_VLConfig(
            text_config={
                **text,
                "rope_parameters": {"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]},
            },
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=14,
                spatial_merge_size=2,
                temporal_patch_size=2,
                window_size=56,
                fullatt_block_indexes=[1],
            ),
            **special,
        )
        return Qwen2_5_VLForConditionalGeneration(cfg), 14
    if arch == "qwen3_vl":
        from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

        cfg = Qwen3VLConfig(
            text_config={
                **text,
                "head_dim": 16,
                "rope_parameters": {
                    "rope_type": "default",
                    "rope_theta": 5e6,
                    "mrope_section": [2, 3, 3],
                    "mrope_interleaved": True,
                },
            },
            vision_config=dict(
                depth=2,
                hidden_size=32,
                intermediate_size=64,
                num_heads=2,
                out_hidden_size=64,
                patch_size=16,
                spatial_merge_size=2,
                temporal_patch_size=2,
                num_position_embeddings=64,
                deepstack_visual_indexes=[0],
            ),
            **special,
        )
        return Qwen3VLForConditionalGeneration(cfg), 16
    raise ValueError(f"arch must be qwen2_5_vl or qwen3_vl, got {arch!r}")


def make_batch(patch: int, seed: int, bsz: int = 4, grid=(1, 4, 4), text_len: int = 12) -> dict[str, torch.Tensor]:
    """<vision_start> <image_pad>*N <vision_end> text...; pixel_values already patchified (one row per patch)."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = grid
    n_patches = t * h * w
    n_img = n_patches // 4  # spatial_merge_size 2
    rows = [
        torch.cat(
            [
                torch.tensor([VSTART]),
                torch.full((n_img,), IMAGE_TOKEN),
                torch.tensor([VEND]),
                torch.randint(2, 250, (text_len,), generator=g),
            ]
        )
        for _ in range(bsz)
    ]
    input_ids = torch.stack(rows)
    return dict(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        pixel_values=torch.randn(bsz * n_patches, 3 * 2 * patch * patch, generator=g),
        image_grid_thw=torch.tensor([list(grid)] * bsz),
        mm_token_type_ids=(input_ids == IMAGE_TOKEN).long(),
    )


def rows(batch: dict[str, torch.Tensor], start: int, stop: int, patch_rows_per_item: int) -> dict[str, torch.Tensor]:
    """Rows start:stop of a make_batch batch (pixel_values sliced by patches)."""
    out = {k: v[start:stop] for k, v in batch.items() if k != "pixel_values"}
    out["pixel_values"] = batch["pixel_values"][start * patch_rows_per_item : stop * patch_rows_per_item]
    return out


def chunked_nll(model: torch.nn.Module, batch: dict[str, torch.Tensor], chunk: int = 5) -> torch.Tensor:
    """Mean next-token NLL of the text tokens from the last hidden state and lm_head.weight, in position chunks.

    The recipe's log-prob pattern (never [B, T, V] logits at once). Meant to run inside call_in_root_forward.
    """
    hidden = model.model(**batch).last_hidden_state  # [B, T, H]
    ids = batch["input_ids"]
    n_img = int((ids[0] == IMAGE_TOKEN).sum()) + 2
    w = model.lm_head.weight  # [V, H]
    total, count = hidden.new_zeros(()), 0
    for s in range(n_img, ids.shape[1] - 1, chunk):
        e = min(s + chunk, ids.shape[1] - 1)
        logits = hidden[:, s:e].float() @ w.float().T  # [B, c, V]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[:, s + 1 : e + 1, None]).squeeze(-1)
        total = total - lp.sum()
        count += lp.numel()
    return total / count
