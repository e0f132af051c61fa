"""CFPO's counterfactual forward on a Qwen2.5-VL / Qwen3-VL policy: the cross-modal attention value-mean intervention.

    with torch.no_grad(), cross_modal_value_mean(model, batch["input_ids"], attention_mask=batch["attention_mask"]):
        logits_cf = model(**batch).logits          # or the chunked log-prob pass (call_in_root_forward)

Inside the context every self-attention layer of the *language* model computes eager attention with
:func:`vppo_core.cross_modal_value_mean_attention` (the math and its sources are in ``vppo_core.counterfactual``):
the saliency statistics are taken per row, per image span and per layer, so a row's output does not depend on the
other rows of the batch. The vision tower's attention is not touched.

How: a transformers attention function (``AttentionInterface``) and its mask function (``sdpa_mask``: a bool mask,
or None for plain causal) are registered under the name ``vppo_cross_modal_value_mean``, and the text model's config
``_attn_implementation`` is switched to it for the duration — restored on exit, also on error. The text config is a
separate object from the vision config (and FSDP2's ``fully_shard`` leaves both as they are), so sharded and
unsharded models work alike. The per-batch state (image spans, padding) lives in a ``ContextVar``: an attention call
outside the context that set it raises instead of silently computing something else.

Limits: one full forward of the ``input_ids`` given (no cache, no generation step), one sample per row (padded
batches, not packed sequences), images only (a span holding video pads raises), no attention dropout. Meant for
the no-grad auxiliary forward: with gradient checkpointing, a recomputation after the context exits would use the
restored attention.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass

import torch
from torch import nn

from vppo_core import cross_modal_value_mean_attention, image_spans
from vppo_recipes.sharding import find_blocks

__all__ = ["ATTENTION_NAME", "cross_modal_value_mean"]

ATTENTION_NAME = "vppo_cross_modal_value_mean"


@dataclass(frozen=True)
class _State:
    spans: list[list[tuple[int, int]]]
    query_mask: torch.Tensor  # [B, T] bool, True on real tokens
    std_multiplier: float
    query_chunk_size: int


_ACTIVE: ContextVar[_State | None] = ContextVar("vppo_cross_modal_value_mean", default=None)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function: [B, H, T, D] states in, ([B, T, H, D] output, None) out."""
    state = _ACTIVE.get()
    if state is None:
        raise RuntimeError(
            f"attention implementation {ATTENTION_NAME!r} called outside cross_modal_value_mean(); "
            "the config's _attn_implementation should have been restored"
        )
    if dropout:
        raise ValueError(
            f"cross_modal_value_mean applies no attention dropout, but the layer asks for dropout={dropout}; "
            "run the counterfactual forward in eval mode or with attention_dropout=0"
        )
    batch, seq = state.query_mask.shape
    if query.shape[0] != batch or query.shape[2] != seq or key.shape[2] != seq:
        raise ValueError(
            f"cross_modal_value_mean was given input_ids of shape [B, T] = [{batch}, {seq}], but an attention layer "
            f"got {query.shape[0]} rows, {query.shape[2]} queries and {key.shape[2]} keys: pass the same input_ids to "
            "the model, in one full forward (no cache, no generation step)"
        )
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    out = cross_modal_value_mean_attention(
        query,
        key,
        value,
        attention_mask,
        state.spans,
        state.query_mask.to(query.device),
        scaling=scaling,
        is_causal=bool(is_causal),
        std_multiplier=state.std_multiplier,
        query_chunk_size=state.query_chunk_size,
    )
    return out, None


def _register() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION_NAME, _attention)
    AttentionMaskInterface.register(ATTENTION_NAME, sdpa_mask)


def _text_configs(model: nn.Module) -> list:
    """The config objects the language model reads ``_attn_implementation`` from (its own, its layers')."""
    find_blocks(model)  # ValueError for anything but a Qwen-VL style model
    texts = [
        m
        for m in model.modules()
        if isinstance(getattr(m, "embed_tokens", None), nn.Embedding)
        and isinstance(getattr(m, "layers", None), nn.ModuleList)
    ]
    configs: dict[int, object] = {}
    for m in texts[0].modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            configs[id(config)] = config
    return list(configs.values())


@contextlib.contextmanager
def cross_modal_value_mean(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    attention_mask: torch.Tensor | None = None,
    vision_start_id: int | None = None,
    vision_end_id: int | None = None,
    image_pad_id: int | None = None,
    std_multiplier: float = 2.0,
    query_chunk_size: int = 1024,
    prompt_length: int | None = None,
) -> Iterator[list[list[tuple[int, int]]]]:
    """Run the model's language attention with CFPO's value-mean intervention for the forward of ``input_ids``.

    Args:
        model: a ``Qwen2_5_VLForConditionalGeneration`` / ``Qwen3VLForConditionalGeneration``, plain or wrapped by
            FSDP2 ``fully_shard`` (``vppo_recipes.sharding.shard_policy``).
        input_ids: [B, T] — exactly the ids the forward inside the context receives.
        attention_mask: [B, T] 0/1 padding mask of that forward (None: no padding). Padded positions neither
            enter the statistics nor are corrected.
        vision_start_id, vision_end_id, image_pad_id: token ids; None reads ``model.config``'s
            ``vision_start_token_id``, ``vision_end_token_id``, ``image_token_id``.
        std_multiplier: λ >= 0 of the saliency threshold μ + λ·σ (CFPO's ``saliency_std_multiplier``, 2.0);
            ``inf`` leaves every output as plain (eager) attention.
        query_chunk_size: queries per attention score block (memory: [heads, chunk, T] float32 per block).
        prompt_length: the images are looked for in the first `prompt_length` positions only (None: everywhere).
            A sampled response may contain `<|vision_start|>` / `<|vision_end|>` as plain tokens (a random or
            badly behaved policy does); they are text, not an image, and must not unbalance the spans.

    Yields:
        The image spans found, per row (``vppo_core.image_spans``). On exit the attention implementation of the
        text config is restored, also when the body raises. ValueError for bad arguments (named), RuntimeError when
        the context is already active on this model.
    """
    config = getattr(model, "config", None)

    def token_id(given: int | None, attr: str, name: str) -> int:
        if given is not None:
            return given
        found = getattr(config, attr, None)
        if found is None:
            raise ValueError(f"{name} not given and model.config has no {attr}")
        return found

    searched = slice(None) if prompt_length is None else slice(0, int(prompt_length))
    spans = image_spans(
        input_ids[:, searched],
        vision_start_id=token_id(vision_start_id, "vision_start_token_id", "vision_start_id"),
        vision_end_id=token_id(vision_end_id, "vision_end_token_id", "vision_end_id"),
        image_pad_id=token_id(image_pad_id, "image_token_id", "image_pad_id"),
        attention_mask=None if attention_mask is None else attention_mask[:, searched],
    )
    # checked here rather than in the first layer
    if isinstance(std_multiplier, bool) or not isinstance(std_multiplier, (int, float)) or not std_multiplier >= 0:
        raise ValueError(
            f"std_multiplier must be a number >= 0 (inf disables the intervention), got {std_multiplier!r}"
        )
    if isinstance(query_chunk_size, bool) or not isinstance(query_chunk_size, int) or query_chunk_size < 1:
        raise ValueError(f"query_chunk_size must be a positive int, got {query_chunk_size!r}")
    query_mask = (
        torch.ones(input_ids.shape, dtype=torch.bool, device=input_ids.device)
        if attention_mask is None
        else attention_mask.to(device=input_ids.device) != 0
    )
    configs = _text_configs(model)
    if any(c._attn_implementation == ATTENTION_NAME for c in configs):
        raise RuntimeError("cross_modal_value_mean is already active on this model (contexts do not nest)")
    _register()
    state = _State(spans, query_mask, float(std_multiplier), query_chunk_size)
    before = [c._attn_implementation for c in configs]
    token = _ACTIVE.set(state)
    try:
        for c in configs:
            c._attn_implementation = ATTENTION_NAME
        yield spans
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl
        _ACTIVE.reset(token)
