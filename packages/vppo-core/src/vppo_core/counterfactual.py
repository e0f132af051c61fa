"""CFPO's counterfactual forward: the cross-modal attention value-mean intervention (ALGORITHMS.md §9, CFPO).

CFPO runs one extra no-grad forward in which every decoder self-attention layer hides the image values its text
queries rely on most. For each sample and each image span ``[s, e)`` (the ``<|image_pad|>`` tokens between
``<|vision_start|>`` at ``s - 1`` and ``<|vision_end|>`` at ``e``):

* queries: every valid (non-padding) position ``q >= e`` (the ``<|vision_end|>`` token and everything after it:
  the rest of the prompt and the response);
* attention: ``P[h, q, i]``, the probability of head ``h``'s query ``q`` on image key ``i``, taken from the model's
  own softmax over every key of the row (causal, padding masked), in the model dtype;
* statistics, per layer, per sample and per span: over the entries ``P > 1e-8`` pooled over heads, queries and the
  span's keys, the mean ``μ`` and the sample standard deviation ``σ`` (``n - 1``), accumulated in float32 (float64
  for float64 inputs); the threshold ``τ = μ + λ·σ`` is formed after rounding ``μ`` and ``σ`` to the model dtype,
  as the official code does (``torch.mean`` / ``torch.std`` of a bf16 tensor). With fewer than 2 valid entries
  ``σ`` is NaN and nothing is salient;
* value mean: ``V̄[h]``, the mean of the value states of head ``h`` over every image token of the sample (all its
  spans) and the head dimension — one scalar per head;
* correction: ``out[q, h] += Σ_i P[h, q, i]·1[P[h, q, i] > τ]·(V̄[h] − V[h, i])``, i.e. exactly the attention
  output obtained when the salient image values are replaced by ``V̄[h]``.

:func:`value_mean_correction` is that correction for one sample and one span; :func:`cross_modal_value_mean_attention`
is eager attention for a batch with the correction applied (the transformers attention-function layout);
:func:`image_spans` finds the spans in ``input_ids``. ``vppo_recipes.counterfactual`` routes a model's language
attention through them. Sources and every difference from the official and fork code:
docs/research/issue16_perception_aware_sources.md §4.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = ["cross_modal_value_mean_attention", "image_spans", "value_mean_correction"]

# Entries of P at or below this are not attention (masked keys): CFPO's `attention > 1e-8` validity mask.
VALID_ATTENTION_EPS = 1e-8


def _check_std_multiplier(std_multiplier: float) -> float:
    if isinstance(std_multiplier, bool) or not isinstance(std_multiplier, (int, float)):
        raise ValueError(f"std_multiplier must be a number >= 0, got {std_multiplier!r}")
    value = float(std_multiplier)
    if math.isnan(value) or value < 0:
        raise ValueError(f"std_multiplier must be >= 0 (inf disables the intervention), got {std_multiplier!r}")
    return value


def _as_bool_mask(mask: Tensor, shape: tuple[int, ...], name: str) -> Tensor:
    if not isinstance(mask, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape {shape}, got {type(mask).__name__}")
    if tuple(mask.shape) != shape:
        raise ValueError(f"{name} has shape {tuple(mask.shape)}, expected {shape}")
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise ValueError(f"{name} must be bool or integer 0/1 (1 = real token), got dtype {mask.dtype}")
    if not bool(((mask == 0) | (mask == 1)).all()):
        raise ValueError(f"{name} must hold only 0/1 (1 = real token, 0 = padding)")
    return mask != 0


def value_mean_correction(
    probs: Tensor,
    values: Tensor,
    value_mean: Tensor,
    query_mask: Tensor | None = None,
    *,
    std_multiplier: float = 2.0,
) -> Tensor:
    """CFPO's correction of the attention output of one sample's queries for one image span.

    Args:
        probs: [H, Q, K] floating (the model dtype) — the attention probabilities of the Q queries (positions at
            or after the span's end) on the span's K image keys, per query head: entries of the softmax over
            *every* key of the row (not renormalised over the image keys). Masked keys hold 0.
        values: [H, K, D] same dtype — the value states of those K keys, one per query head (after ``repeat_kv``
            for grouped-query attention).
        value_mean: [H] — V̄[h], the mean of head h's values over every image token of the sample and over D.
        query_mask: [Q] bool or 0/1 — the queries that count (False on padding): only they enter the statistics
            and get a correction. None: all.
        std_multiplier: λ >= 0 in τ = μ + λ·σ (CFPO's ``saliency_std_multiplier``, default 2.0); ``inf`` makes
            nothing salient.

    Returns:
        [H, Q, D] in probs' dtype: ``Σ_i P[h,q,i]·1[P[h,q,i] > τ]·(V̄[h] − values[h,i])``, to be added to the
        attention output of each query and head; zero for padded queries, and everywhere when fewer than 2 entries
        exceed 1e-8 (σ = NaN) or none exceeds τ.
    """
    lam = _check_std_multiplier(std_multiplier)
    if not isinstance(probs, Tensor) or probs.dim() != 3 or not probs.is_floating_point():
        raise ValueError(f"probs must be a floating tensor [H, Q, K], got {getattr(probs, 'shape', type(probs))}")
    heads, n_queries, n_keys = probs.shape
    if not isinstance(values, Tensor) or values.dim() != 3 or tuple(values.shape[:2]) != (heads, n_keys):
        raise ValueError(
            f"values must be [H, K, D] = [{heads}, {n_keys}, D] (one row per image key of probs), got "
            f"{getattr(values, 'shape', type(values))}"
        )
    if values.dtype != probs.dtype:
        raise ValueError(f"values must have probs' dtype {probs.dtype}, got {values.dtype}")
    if not isinstance(value_mean, Tensor) or tuple(value_mean.shape) != (heads,) or not value_mean.is_floating_point():
        raise ValueError(
            f"value_mean must be a floating tensor [H] = [{heads}] (one mean per head), got "
            f"{getattr(value_mean, 'shape', value_mean)}"
        )
    valid = probs > VALID_ATTENTION_EPS
    if query_mask is not None:
        valid = valid & _as_bool_mask(query_mask, (n_queries,), "query_mask").to(probs.device)[None, :, None]

    # Mean and sample std of the valid entries by masked sums: no data-dependent shapes, no host sync.
    acc = torch.promote_types(probs.dtype, torch.float32)
    x = probs.to(acc)
    count = valid.sum()
    mean = torch.where(valid, x, 0).sum() / count  # NaN when count == 0
    var = torch.where(valid, (x - mean).square(), 0).sum() / (count - 1)  # NaN (0/0) when count == 1
    std = var.sqrt()
    # the official code takes mean/std of the model-dtype probabilities (bf16 results): round, then form τ
    threshold = mean.to(probs.dtype) + lam * std.to(probs.dtype)
    salient = valid & (probs > threshold)  # NaN threshold: nothing salient
    weights = probs * salient.to(probs.dtype)
    delta = value_mean.reshape(heads, 1, 1).to(values.dtype) - values  # [H, K, D]
    return torch.matmul(weights, delta)


def _check_spans(spans: Sequence[Sequence[tuple[int, int]]], batch: int, seq: int) -> list[list[tuple[int, int]]]:
    if isinstance(spans, Tensor) or not isinstance(spans, Sequence) or len(spans) != batch:
        raise ValueError(f"image_spans must be a sequence of {batch} per-row span lists, got {spans!r}")
    out: list[list[tuple[int, int]]] = []
    for row, row_spans in enumerate(spans):
        checked: list[tuple[int, int]] = []
        prev_end = 0
        for span in row_spans:
            if (
                not isinstance(span, (tuple, list))
                or len(span) != 2
                or not all(isinstance(v, int) and not isinstance(v, bool) for v in span)
                or not prev_end <= span[0] < span[1] <= seq
            ):
                raise ValueError(
                    f"image_spans[{row}] must hold increasing, non-overlapping, non-empty half-open (start, end) int "
                    f"ranges within [0, {seq}]; got {list(row_spans)!r}"
                )
            checked.append((span[0], span[1]))
            prev_end = span[1]
        out.append(checked)
    return out


def cross_modal_value_mean_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    image_spans: Sequence[Sequence[tuple[int, int]]],
    query_mask: Tensor | None = None,
    *,
    scaling: float | None = None,
    is_causal: bool = True,
    std_multiplier: float = 2.0,
    query_chunk_size: int = 1024,
) -> Tensor:
    """Eager attention for a batch with CFPO's value-mean correction applied in every row (no dropout).

    The probabilities are transformers' eager attention: scores ``(q·kᵀ)·scaling`` in the model dtype, masked,
    softmax in float32, cast back to the model dtype; the output is ``P·V`` plus :func:`value_mean_correction` for
    each image span of each row (statistics per row, per span: a row's output does not depend on the other rows).
    Computed one row and ``query_chunk_size`` queries at a time; only the ``[H, T - e, K]`` probabilities of the
    queries after each span are kept for the statistics — never a ``[B, H, T, T]`` tensor.

    Args:
        query: [B, H, T, D] floating — query states after RoPE.
        key, value: [B, Hkv, T, D] — key / value states (H a multiple of Hkv; repeated per query head like
            ``repeat_kv``). No cache: keys are the same T positions as the queries.
        attention_mask: what transformers passes to the attention function: None (no mask: causal when
            ``is_causal``, else full), a bool [B, 1 or H, T, T] mask (True = may attend) or an additive float mask
            of the same shape (0 = may attend, a large negative number = hidden).
        image_spans: B sequences of half-open (start, end) image-token ranges per row, increasing and disjoint
            (:func:`image_spans` finds them).
        query_mask: [B, T] bool or 0/1 — real (non-padding) positions; padded queries are left out of the
            statistics and never corrected. None: all real.
        scaling: score scale; None = D ** -0.5.
        is_causal: with ``attention_mask=None``, whether key j > query i is hidden.
        std_multiplier: λ >= 0 of the saliency threshold (default 2.0; ``inf`` = plain eager attention).
        query_chunk_size: queries per score block.

    Returns:
        [B, T, H, D] in query's dtype (the layout transformers' attention functions return).
    """
    lam = _check_std_multiplier(std_multiplier)
    if not isinstance(query, Tensor) or query.dim() != 4 or not query.is_floating_point():
        raise ValueError(f"query must be a floating tensor [B, H, T, D], got {getattr(query, 'shape', type(query))}")
    batch, heads, seq, dim = query.shape
    for name, t in (("key", key), ("value", value)):
        if not isinstance(t, Tensor) or t.dim() != 4 or (t.shape[0], t.shape[2], t.shape[3]) != (batch, seq, dim):
            raise ValueError(
                f"{name} must be [B, Hkv, T, D] = [{batch}, Hkv, {seq}, {dim}] (no cache: the query positions), got "
                f"{getattr(t, 'shape', type(t))}"
            )
        if t.dtype != query.dtype:
            raise ValueError(f"{name} must have query's dtype {query.dtype}, got {t.dtype}")
    if key.shape[1] != value.shape[1] or key.shape[1] == 0 or heads % key.shape[1] != 0:
        raise ValueError(
            f"key and value must have the same number of heads Hkv dividing the {heads} query heads, got "
            f"{key.shape[1]} and {value.shape[1]}"
        )
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor) or attention_mask.dim() != 4:
            raise ValueError(f"attention_mask must be None or a [B, 1|H, T, T] tensor, got {attention_mask!r}")
        m_batch, m_heads, m_q, m_k = attention_mask.shape
        if m_batch != batch or m_heads not in (1, heads) or (m_q, m_k) != (seq, seq):
            raise ValueError(
                f"attention_mask must be [B, 1|H, T, T] = [{batch}, 1|{heads}, {seq}, {seq}], got "
                f"{tuple(attention_mask.shape)}"
            )
    spans = _check_spans(image_spans, batch, seq)
    valid_q = None if query_mask is None else _as_bool_mask(query_mask, (batch, seq), "query_mask").to(query.device)
    if isinstance(query_chunk_size, bool) or not isinstance(query_chunk_size, int) or query_chunk_size < 1:
        raise ValueError(f"query_chunk_size must be a positive int, got {query_chunk_size!r}")
    scale = dim**-0.5 if scaling is None else float(scaling)

    groups = heads // key.shape[1]
    dtype = query.dtype
    acc = torch.promote_types(dtype, torch.float32)
    min_value = torch.finfo(dtype).min
    positions = torch.arange(seq, device=query.device)
    out = query.new_empty(batch, heads, seq, dim)
    for b in range(batch):
        k_b = key[b].repeat_interleave(groups, dim=0) if groups > 1 else key[b]  # [H, T, D], as repeat_kv
        v_b = value[b].repeat_interleave(groups, dim=0) if groups > 1 else value[b]
        row_spans = spans[b]
        kept: list[list[Tensor]] = [[] for _ in row_spans]  # P[:, q >= e, s:e] per span, in query chunks
        for q0 in range(0, seq, query_chunk_size):
            q1 = min(seq, q0 + query_chunk_size)
            scores = torch.matmul(query[b, :, q0:q1], k_b.transpose(-1, -2)) * scale  # [H, c, T]
            if attention_mask is not None:
                block = attention_mask[b, :, q0:q1]
                if block.dtype == torch.bool:
                    scores = scores.masked_fill(~block, min_value)
                else:
                    scores = scores + block  # promotes like eager's `attn_weights + attention_mask`
            elif is_causal:
                scores = scores.masked_fill(positions[None, :] > positions[q0:q1, None], min_value)
            probs = torch.softmax(scores, dim=-1, dtype=acc).to(dtype)  # float32, as eager (float64 kept)
            out[b, :, q0:q1] = torch.matmul(probs, v_b)
            for j, (start, end) in enumerate(row_spans):
                if q1 > end:
                    kept[j].append(probs[:, max(q0, end) - q0 :, start:end].clone())  # not a view of the chunk
        if not row_spans:
            continue
        image_pos = torch.cat([positions[start:end] for start, end in row_spans])
        value_mean = v_b.index_select(1, image_pos).to(acc).mean(dim=(1, 2)).to(dtype)  # [H]
        for j, (start, end) in enumerate(row_spans):
            if end >= seq:
                continue  # no query after the image
            correction = value_mean_correction(
                torch.cat(kept[j], dim=1),
                v_b[:, start:end],
                value_mean,
                None if valid_q is None else valid_q[b, end:],
                std_multiplier=lam,
            )
            out[b, :, end:] = out[b, :, end:] + correction
    return out.transpose(1, 2).contiguous()


def image_spans(
    input_ids: Tensor,
    *,
    vision_start_id: int,
    vision_end_id: int,
    image_pad_id: int,
    attention_mask: Tensor | None = None,
) -> list[list[tuple[int, int]]]:
    """The image-token spans of each row: ``[s, e)`` with ``<|vision_start|>`` at ``s - 1`` and ``<|vision_end|>``
    at ``e``, every token between them ``image_pad_id``.

    Args:
        input_ids: [B, T] integer token ids (the prompt with its expanded image pads, then the response).
        vision_start_id, vision_end_id, image_pad_id: the model's ids (``config.vision_start_token_id``,
            ``config.vision_end_token_id``, ``config.image_token_id``).
        attention_mask: [B, T] 0/1 padding mask (1 = real token); markers on padding are ignored. None: no padding.

    Returns:
        B lists of (start, end) int pairs, increasing. Raises ValueError naming ``input_ids`` and the row when the
        markers are unbalanced or out of order, a span is empty, holds padding, or holds a token other than
        ``image_pad_id`` (a video: only images are supported).
    """
    if not isinstance(input_ids, Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
        raise ValueError(f"input_ids must be an integer tensor [B, T], got {getattr(input_ids, 'shape', input_ids)}")
    for name, v in (("vision_start_id", vision_start_id), ("vision_end_id", vision_end_id)):
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must be an int token id, got {v!r}")
    if isinstance(image_pad_id, bool) or not isinstance(image_pad_id, int):
        raise ValueError(f"image_pad_id must be an int token id, got {image_pad_id!r}")
    ids = input_ids.detach().cpu()
    valid = (
        torch.ones_like(ids, dtype=torch.bool)
        if attention_mask is None
        else _as_bool_mask(attention_mask, tuple(ids.shape), "attention_mask").cpu()
    )
    spans: list[list[tuple[int, int]]] = []
    for row in range(ids.shape[0]):
        starts = ((ids[row] == vision_start_id) & valid[row]).nonzero().flatten().tolist()
        ends = ((ids[row] == vision_end_id) & valid[row]).nonzero().flatten().tolist()
        if len(starts) != len(ends):
            raise ValueError(
                f"input_ids row {row}: {len(starts)} vision_start token(s) but {len(ends)} vision_end token(s)"
            )
        row_spans: list[tuple[int, int]] = []
        prev_end = -1
        for start_pos, end_pos in zip(starts, ends):
            s, e = start_pos + 1, end_pos
            if start_pos <= prev_end or s >= e:
                raise ValueError(
                    f"input_ids row {row}: vision_start/vision_end out of order or enclosing no token "
                    f"(starts {starts}, ends {ends})"
                )
            if not bool(valid[row, s:e].all()):
                raise ValueError(f"input_ids row {row}: the image span [{s}, {e}) holds padding")
            if not bool((ids[row, s:e] == image_pad_id).all()):
                raise ValueError(
                    f"input_ids row {row}: the span [{s}, {e}) between vision_start and vision_end holds tokens other "
                    f"than image_pad_id={image_pad_id} (a video?); only image spans are supported"
                )
            row_spans.append((s, e))
            prev_end = end_pos
        spans.append(row_spans)
    return spans
