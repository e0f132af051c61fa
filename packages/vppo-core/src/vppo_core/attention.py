"""PGPO's "text-only" pass: an attention mask that hides the visual tokens (ALGORITHMS.md §1, PGPO); DyCo-RL's
per-token attention signals (§9.13): modality attention ratios and Fisher–Rao distances between adjacent rows.

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

__all__ = ["dyco_attention_signals", "fisher_rao_distance", "text_only_attention"]


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


# DyCo-RL's official code clamps every probability at 1e-12 before renormalising (`_batched_M_FR`) and divides each
# attention row and region by its sum + 1e-8 (the Qwen2.5-VL model-forward patch).
_FR_FLOOR = 1e-12
_ROW_EPS = 1e-8


def fisher_rao_distance(p: torch.Tensor, q: torch.Tensor, support: torch.Tensor | None = None) -> torch.Tensor:
    """Fisher–Rao geodesic distance between two distributions: ``2·arccos(Σ_i sqrt(p̂_i·q̂_i))`` (ALGORITHMS.md §9.13).

    p, q: [B, ..., N] non-negative weights (float). support: [B, ..., N] bool (broadcastable), the entries that belong to
    the distributions (None: all). Inside the support each weight is floored at 1e-12 and the vector divided by its
    sum (floored at 1e-12): p̂, q̂. The Bhattacharyya coefficient is clamped to [0, 1] before the arccos, and a
    non-finite distance is 0 (as DyCo-RL's ``_batched_M_FR``). An empty support gives π (coefficient 0).
    Returns [B, ...] float32, in [0, π].
    """
    if not isinstance(p, torch.Tensor) or not isinstance(q, torch.Tensor) or p.shape != q.shape:
        raise ValueError(
            f"p and q must be tensors of one shape, got {getattr(p, 'shape', p)}, {getattr(q, 'shape', q)}"
        )
    if p.dim() < 1 or not p.is_floating_point() or not q.is_floating_point():
        raise ValueError(f"p and q must be floating tensors [..., N], got {p.dtype} {tuple(p.shape)}")
    p, q = p.float().clamp(min=_FR_FLOOR), q.float().clamp(min=_FR_FLOOR)
    if support is not None:
        support = support.to(torch.bool)
        p, q = torch.where(support, p, torch.zeros_like(p)), torch.where(support, q, torch.zeros_like(q))
    p = p / p.sum(-1, keepdim=True).clamp(min=_FR_FLOOR)
    q = q / q.sum(-1, keepdim=True).clamp(min=_FR_FLOOR)
    bc = (p * q).sqrt().sum(-1).clamp(0.0, 1.0)
    fr = 2.0 * torch.arccos(bc)
    return torch.where(torch.isfinite(fr), fr, torch.zeros_like(fr))


def dyco_attention_signals(
    rows: torch.Tensor, key_end: torch.Tensor, image_start: torch.Tensor, image_end: torch.Tensor
) -> dict[str, torch.Tensor]:
    """DyCo-RL's per-step attention signals from consecutive attention rows (ALGORITHMS.md §9.13).

    rows: [B, n, K] one attention row per decoding step (the last decoder layer's attention probabilities of the
        query that predicts the step's token, averaged over heads), steps in order; entries at or beyond
        ``key_end`` are ignored.
    key_end: [B, n] long, row j's keys are [0, key_end[b, j]) (the step's KV length).
    image_start, image_end: [B] long, the image region [image_start, image_end) of each row's keys; the text region
        of step j is [image_end, key_end[b, j]). (DyCo-RL takes the first and the last image-pad position, so the last
        image pad counts as text, and the tokens before the image as neither.)

    Each row is clamped at 0 and divided by its sum + 1e-8: ``a_j``. Then
    ``image_ratio_j = Σ_image a_j``, ``text_ratio_j = Σ_text(j) a_j``; the region distributions
    ``v_j = a_j|region / (Σ_region a_j + 1e-8)``; ``fr_image_j = FR(v^img_{j-1}, v^img_j)`` and
    ``fr_text_j = FR(v^txt_{j-1}, v^txt_j)`` over the text keys both steps have ([image_end, key_end[j-1]): the
    official code cuts both to the shorter length), ``FR`` = :func:`fisher_rao_distance`. Step 0 has no previous
    row: its distances are 0.

    Returns {"image_ratio", "text_ratio", "fr_image", "fr_text"}: each [B, n] float32.
    """
    if not isinstance(rows, torch.Tensor) or rows.dim() != 3 or not rows.is_floating_point():
        raise ValueError(f"rows must be a float tensor [B, n, K], got {getattr(rows, 'shape', type(rows))}")
    batch, n, keys = rows.shape
    if tuple(key_end.shape) != (batch, n):
        raise ValueError(f"key_end must be [B, n] = {(batch, n)}, got {tuple(key_end.shape)}")
    if tuple(image_start.shape) != (batch,) or tuple(image_end.shape) != (batch,):
        raise ValueError(f"image_start and image_end must be [B] = ({batch},)")
    a = rows.float().clamp(min=0)
    a = a / (a.sum(-1, keepdim=True) + _ROW_EPS)
    pos = torch.arange(keys, device=rows.device)
    image = (pos >= image_start[:, None, None]) & (pos < image_end[:, None, None])  # [B, 1, K]
    text = (pos >= image_end[:, None, None]) & (pos < key_end[..., None])  # [B, n, K]
    a_image, a_text = a * image, a * text
    image_ratio, text_ratio = a_image.sum(-1), a_text.sum(-1)
    v_image = a_image / (image_ratio[..., None] + _ROW_EPS)
    v_text = a_text / (text_ratio[..., None] + _ROW_EPS)
    fr_image = torch.zeros(batch, n, device=rows.device)
    fr_text = torch.zeros(batch, n, device=rows.device)
    if n > 1:
        fr_image[:, 1:] = fisher_rao_distance(v_image[:, :-1], v_image[:, 1:], image)
        fr_text[:, 1:] = fisher_rao_distance(v_text[:, :-1], v_text[:, 1:], text[:, :-1] & text[:, 1:])
    return {"image_ratio": image_ratio, "text_ratio": text_ratio, "fr_image": fr_image, "fr_text": fr_text}
