"""Prompts + sampled responses -> the tensors of one Qwen-VL forward pass (training / re-scoring layout).

Layout: prompt LEFT-padded to P, response RIGHT-padded to L, so response token j of every row sits at position
P + j and its logit (the prediction of it) at position P - 1 + j:

    row 0: [pad pad <prompt 0 .........>][r r r r pad pad]
    row 1: [<prompt 1 ................>][r r r r r r pad]
            |<------------ P ---------->||<----- L ----->|

M-RoPE position ids are computed explicitly with the model's own `get_rope_index` (the function transformers
calls inside `forward`), so a second pass that changes the attention mask (PGPO's text-only pass) or the pixels
(VPPO's perturbed pass) keeps exactly the positions of the clean pass.
"""

from __future__ import annotations

import types
from collections.abc import Callable, Sequence

import torch

from vppo_rollout.prompts import Prompt

RopeIndexFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
# Keys of the collated dict that are forward() kwargs (the rest are for the loss).
MODEL_INPUT_KEYS = (
    "input_ids",
    "attention_mask",
    "position_ids",
    "mm_token_type_ids",
    "pixel_values",
    "image_grid_thw",
)


def rope_index_fn(model_or_config) -> RopeIndexFn:
    """transformers' `get_rope_index` of a Qwen2.5-VL / Qwen3-VL model, or built from its config alone.

    Accepts the `...ForConditionalGeneration` (FSDP-wrapped too), its inner `.model`, or the `PretrainedConfig`.
    With a config, the upstream method is bound to the config only (it reads nothing else), so the collator
    needs no weights. Returns `fn(input_ids, mm_token_type_ids, image_grid_thw=None, attention_mask=None)
    -> (position_ids [3, B, S] long, rope_deltas [B, 1])`.
    """
    for obj in (model_or_config, getattr(model_or_config, "model", None)):
        if obj is not None and hasattr(obj, "get_rope_index") and hasattr(obj, "config"):
            return obj.get_rope_index
    config = model_or_config
    model_type = getattr(config, "model_type", None)
    if model_type == "qwen2_5_vl":
        from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLModel as inner
    elif model_type == "qwen3_vl":
        from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLModel as inner
    else:
        raise ValueError(
            f"model: expected a Qwen2.5-VL / Qwen3-VL model or config (model_type qwen2_5_vl | qwen3_vl), "
            f"got {type(model_or_config).__name__} with model_type={model_type!r}"
        )
    shim = types.SimpleNamespace(config=config)
    shim.get_vision_position_ids = types.MethodType(inner.get_vision_position_ids, shim)
    return types.MethodType(inner.get_rope_index, shim)


def _process_prompt(processor, prompt: Prompt) -> dict:
    """Run the model's own processor on one prompt (expands image tokens, normalises pixels)."""
    if not isinstance(prompt, Prompt):
        raise ValueError(f"prompts: expected vppo_rollout.Prompt items, got {type(prompt).__name__}")
    enc = processor(text=[prompt.text], images=prompt.images or None, return_tensors="pt")
    if "mm_token_type_ids" not in enc:
        # Without it Qwen2.5-VL silently falls back to 1-D positions (ENVIRONMENT.md); build it from the ids.
        mm = torch.zeros_like(enc["input_ids"])
        mm[enc["input_ids"] == processor.image_token_id] = 1
        enc["mm_token_type_ids"] = mm
    return enc


def encode_prompts(processor, prompts: Sequence[Prompt], *, pad_token_id: int | None = None) -> dict:
    """Processor outputs of B prompts, LEFT-padded to the longest (the layout `generate` and the trainer need).

    Each distinct prompt object is processed once (a prompt repeated G times costs one image preprocessing).
    Returns input_ids [B, P] long, attention_mask [B, P] long, mm_token_type_ids [B, P] int32,
    pixel_values [N_patches, D] | None, image_grid_thw [N_images, 3] long | None.
    """
    if len(prompts) == 0:
        raise ValueError("prompts: empty batch")
    pad = processor.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        raise ValueError("pad_token_id: the tokenizer has no pad token; pass pad_token_id=")
    cache: dict[int, dict] = {}
    encs = []
    for p in prompts:
        if id(p) not in cache:
            cache[id(p)] = _process_prompt(processor, p)
        encs.append(cache[id(p)])
    B, P = len(encs), max(e["input_ids"].shape[1] for e in encs)
    input_ids = torch.full((B, P), pad, dtype=torch.long)
    attention_mask = torch.zeros((B, P), dtype=torch.long)
    mm_token_type_ids = torch.zeros((B, P), dtype=torch.int32)
    pixel_values, grids = [], []
    for b, enc in enumerate(encs):
        n = enc["input_ids"].shape[1]
        input_ids[b, P - n :] = enc["input_ids"][0]
        attention_mask[b, P - n :] = enc["attention_mask"][0]
        mm_token_type_ids[b, P - n :] = enc["mm_token_type_ids"][0].to(torch.int32)
        if enc.get("pixel_values") is not None:
            pixel_values.append(enc["pixel_values"])
            grids.append(enc["image_grid_thw"])
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_token_type_ids,
        "pixel_values": torch.cat(pixel_values) if pixel_values else None,
        "image_grid_thw": torch.cat(grids) if grids else None,
    }


def collate_rollout(
    processor,
    prompts: Sequence[Prompt],
    response_ids: Sequence[Sequence[int]],
    *,
    model=None,
    config=None,
    response_length: int | None = None,
    pad_token_id: int | None = None,
) -> dict:
    """Collate B (prompt, response) pairs; `prompts[r]` is the prompt of response r (repeat a prompt G times).

    Args:
        processor: the checkpoint's processor (`load_processor`).
        prompts: B prompts (the same object may repeat; each distinct prompt is processed once).
        response_ids: B lists of sampled token ids (the stop token included when it was sampled).
        model / config: where the M-RoPE index comes from (see `rope_index_fn`); give one.
        response_length: pad responses to this L (default: the longest response); shorter than one -> error.
        pad_token_id: id for padding (default: the tokenizer's pad token).

    Returns dict:
        input_ids [B, P+L] long, attention_mask [B, P+L] long, mm_token_type_ids [B, P+L] int,
        position_ids [3, B, P+L] long, pixel_values [N_patches, C·T·p·p] float | None,
        image_grid_thw [N_images, 3] long | None, responses [B, L] long, response_mask [B, L] float32,
        prompt_length P (int). Use `model_inputs(batch)` for the forward kwargs.
    """
    if len(prompts) != len(response_ids):
        raise ValueError(f"prompts/response_ids: lengths differ ({len(prompts)} vs {len(response_ids)})")
    if (model is None) == (config is None):
        raise ValueError("collate_rollout: pass exactly one of model= or config= (for the M-RoPE index)")
    rope_index = rope_index_fn(model if model is not None else config)
    pad = processor.tokenizer.pad_token_id if pad_token_id is None else pad_token_id
    if pad is None:
        raise ValueError("pad_token_id: the tokenizer has no pad token; pass pad_token_id=")

    enc = encode_prompts(processor, prompts, pad_token_id=pad)
    lengths = [len(r) for r in response_ids]
    L = max(lengths) if response_length is None else response_length
    if max(lengths) > L:
        r = lengths.index(max(lengths))
        raise ValueError(f"response_length: response {r} has {lengths[r]} tokens > response_length={L}")
    L = max(L, 1)
    B, P = enc["input_ids"].shape

    input_ids = torch.cat([enc["input_ids"], torch.full((B, L), pad, dtype=torch.long)], dim=1)
    attention_mask = torch.cat([enc["attention_mask"], torch.zeros((B, L), dtype=torch.long)], dim=1)
    mm_token_type_ids = torch.cat([enc["mm_token_type_ids"], torch.zeros((B, L), dtype=torch.int32)], dim=1)
    response_mask = torch.zeros((B, L), dtype=torch.float32)
    placeholders = {processor.image_token_id, getattr(processor, "video_token_id", None)} - {None}
    for b, resp in enumerate(response_ids):
        k = len(resp)
        bad = placeholders.intersection(resp)
        if bad:
            raise ValueError(
                f"response_ids[{b}] contains the image/video placeholder token id(s) {sorted(bad)}; the model would "
                "expect image features for them. Samplers must suppress these ids (TransformersSampler and "
                "VLLMSampler do)."
            )
        if k:
            input_ids[b, P : P + k] = torch.as_tensor(list(resp), dtype=torch.long)
            attention_mask[b, P : P + k] = 1
            response_mask[b, :k] = 1.0

    image_grid_thw = enc["image_grid_thw"]
    position_ids, _ = rope_index(
        input_ids,
        mm_token_type_ids=mm_token_type_ids,
        image_grid_thw=image_grid_thw,
        attention_mask=attention_mask,
    )
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "mm_token_type_ids": mm_token_type_ids,
        "position_ids": position_ids,
        "pixel_values": enc["pixel_values"],
        "image_grid_thw": image_grid_thw,
        "responses": input_ids[:, P:].clone(),
        "response_mask": response_mask,
        "prompt_length": P,
    }


def model_inputs(batch: dict) -> dict:
    """The forward() kwargs of a collated batch (drops None entries and the loss-side keys)."""
    return {k: batch[k] for k in MODEL_INPUT_KEYS if batch.get(k) is not None}


def response_logits(logits: torch.Tensor, prompt_length: int, response_length: int) -> torch.Tensor:
    """logits [B, P+L, V] -> the logits that predict the response tokens, [B, L, V] (positions P-1 .. P+L-2)."""
    return logits[:, prompt_length - 1 : prompt_length - 1 + response_length]
