"""PGPO's "text-only" pass: an attention mask that hides the visual tokens (ALGORITHMS.md §1, PGPO).

The second forward of PGPO keeps the sequence, the image features and every (M-RoPE) position id unchanged, and
only forbids attention *to* the visual tokens: no token can read image information, directly or through another
token. That is neither removing the tokens (positions would shift) nor a blank image (the model would still see
"an image").

:func:`text_only_attention` builds the 4-D mask that transformers models accept as a ready-made mask (a 4-D
``attention_mask`` is passed through unchanged by ``transformers.masking_utils``). Pass explicit ``position_ids``
with it (the M-RoPE ids of the normal pass): a Qwen-VL model can only derive them from a 2-D mask.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["text_only_attention"]


def text_only_attention(
    input_ids: torch.Tensor,
    image_token_id: int | Sequence[int],
    attention_mask: torch.Tensor | None = None,
    *,
    dtype: torch.dtype = torch.bool,
) -> torch.Tensor:
    """4-D attention mask of the PGPO text-only pass: causal, padding kept, visual tokens hidden.

    Query ``i`` may attend key ``j`` iff ``j <= i`` (causal), ``attention_mask[j] == 1`` (not padding) and token
    ``j`` is not visual — or ``j == i``. The diagonal is always allowed so that every row keeps at least one key
    (no softmax over an empty set, hence no NaN); it changes nothing for text queries (their own key is already
    allowed) and only lets a visual or padding query see itself, which no text token can read.

    Args:
        input_ids: [B, S] long token ids (prompt with its expanded ``<|image_pad|>`` tokens, then the response).
        image_token_id: the visual placeholder id, or several (e.g. ``(image_token_id, video_token_id)``); read
            them from the model config (``config.image_token_id``).
        attention_mask: [B, S] 0/1 padding mask (1 = real token); None means no padding.
        dtype: ``torch.bool`` (True = may attend; for SDPA/flex attention) or a floating dtype for an additive mask
            (0 = may attend, ``torch.finfo(dtype).min`` = hidden; what eager attention adds to the scores — use
            the model's compute dtype).

    Returns:
        mask: [B, 1, S, S] of ``dtype`` on input_ids' device.
    """
    if not isinstance(input_ids, torch.Tensor) or input_ids.ndim != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, S], got {getattr(input_ids, 'shape', None)}")
    ids = [image_token_id] if isinstance(image_token_id, int) else list(image_token_id)
    if not ids or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise ValueError(f"image_token_id must be an int or a non-empty sequence of ints, got {image_token_id!r}")
    batch, seq = input_ids.shape
    device = input_ids.device
    if attention_mask is None:
        key_valid = torch.ones(batch, seq, dtype=torch.bool, device=device)
    else:
        if not isinstance(attention_mask, torch.Tensor) or tuple(attention_mask.shape) != (batch, seq):
            raise ValueError(
                f"attention_mask must be the 2-D padding mask [B, S] = {(batch, seq)}, got "
                f"{getattr(attention_mask, 'shape', type(attention_mask))}"
            )
        if attention_mask.dtype != torch.bool and not bool(((attention_mask == 0) | (attention_mask == 1)).all()):
            raise ValueError("attention_mask must contain only 0 and 1 (1 = real token)")
        key_valid = attention_mask.to(device=device, dtype=torch.bool)
    if not (dtype == torch.bool or dtype.is_floating_point):
        raise ValueError(f"dtype must be torch.bool or a floating dtype, got {dtype}")

    visual = torch.isin(input_ids, torch.tensor(ids, dtype=input_ids.dtype, device=device))
    keys = key_valid & ~visual  # [B, S]: keys anyone may read
    pos = torch.arange(seq, device=device)
    causal = pos[None, :] <= pos[:, None]  # [S, S]: key j <= query i
    allowed = causal[None] & keys[:, None, :]
    allowed |= torch.eye(seq, dtype=torch.bool, device=device)[None]
    allowed = allowed[:, None]  # [B, 1, S, S]
    if dtype == torch.bool:
        return allowed
    zero = torch.zeros((), dtype=dtype, device=device)
    return torch.where(allowed, zero, torch.full((), torch.finfo(dtype).min, dtype=dtype, device=device))
