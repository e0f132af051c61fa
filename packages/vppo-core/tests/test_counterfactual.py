"""CFPO's value-mean intervention: a hand-worked case, and equality with recomputing the attention with the salient
image values replaced by the per-head value mean (an independent, loop-level computation) on random inputs."""

from __future__ import annotations

import math
import random

import pytest
import torch

from vppo_core import cross_modal_value_mean_attention, image_spans, value_mean_correction

F64 = torch.float64


# ---------------------------------------------------------------- independent reference (plain, per-entry)


def _threshold(entries: torch.Tensor, lam: float) -> float | None:
    """τ = mean + λ·std (torch.std: unbiased) of the entries > 1e-8; None when fewer than 2."""
    sel = entries[entries > 1e-8]
    if sel.numel() < 2:
        return None
    return float(sel.mean() + lam * sel.std()) if math.isfinite(lam) else math.inf


def _replaced_output(probs: torch.Tensor, values: torch.Tensor, replace: torch.Tensor, vbar: torch.Tensor):
    """out[h, q] = Σ_j P[h,q,j]·(V̄[h] if replace[h,q,j] else V[h,j]) with a per-(h, q, j) value tensor."""
    heads, nq, nk = probs.shape
    per_query = values[:, None, :, :].expand(heads, nq, nk, values.shape[-1])
    per_query = torch.where(replace[..., None], vbar[:, None, None, None].expand_as(per_query), per_query)
    return torch.einsum("hqj,hqjd->hqd", probs, per_query)


def _reference_attention(q, k, v, allowed, spans, qmask, lam, scaling):
    """Eager attention in which, per row and per span, every salient (h, q, i) reads V̄[h] instead of V[h, i]."""
    batch, heads, seq, _ = q.shape
    groups = heads // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    out = torch.zeros_like(q)
    for b in range(batch):
        scores = (q[b] @ k[b].transpose(-1, -2)) * scaling
        scores = scores.masked_fill(~allowed[b], -math.inf)
        probs = torch.softmax(scores, -1)  # padded query rows may be NaN: never read below
        replace = torch.zeros(heads, seq, seq, dtype=torch.bool)
        image = [i for s, e in spans[b] for i in range(s, e)]
        vbar = v[b][:, image].mean(dim=(1, 2)) if image else None
        for s, e in spans[b]:
            queries = [t for t in range(e, seq) if qmask[b, t]]
            if not queries:
                continue
            tau = _threshold(probs[:, queries, s:e], lam)
            if tau is None:
                continue
            for t in queries:
                replace[:, t, s:e] |= probs[:, t, s:e] > tau
        for t in range(seq):
            if qmask[b, t]:
                row = probs[:, t : t + 1]
                if vbar is None:
                    out[b, :, t] = (row @ v[b])[:, 0]
                else:
                    out[b, :, t] = _replaced_output(row, v[b], replace[:, t : t + 1], vbar)[:, 0]
    return out.transpose(1, 2)


def _random_case(rng: random.Random, seed: int, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    batch, kv_heads, groups = rng.randint(1, 3), rng.randint(1, 2), rng.randint(1, 3)
    heads, seq, dim = kv_heads * groups, rng.randint(3, 16), rng.randint(1, 4)
    scale = rng.choice([0.5, 2.0, 6.0, 15.0])  # large: many probabilities below 1e-8
    q = torch.randn(batch, heads, seq, dim, generator=g, dtype=dtype) * scale
    k = torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=dtype)
    v = torch.randn(batch, kv_heads, seq, dim, generator=g, dtype=dtype)
    qmask = torch.zeros(batch, seq, dtype=torch.bool)
    spans = []
    for b in range(batch):
        n = rng.randint(max(1, seq // 2), seq)
        lo = rng.choice([0, seq - n])  # right or left padding
        qmask[b, lo : lo + n] = True
        row, pos = [], lo
        for _ in range(rng.randint(0, 2)):
            if pos + 1 >= lo + n:
                break
            s = rng.randint(pos, lo + n - 2)
            e = rng.randint(s + 1, lo + n - 1)
            row.append((s, e))
            pos = e + 1
        spans.append(row)
    causal = torch.ones(seq, seq, dtype=torch.bool).tril()
    allowed = (causal[None] & qmask[:, None, :])[:, None]  # [B, 1, T, T], True = may attend
    return q, k, v, allowed, spans, qmask


# ---------------------------------------------------------------- value_mean_correction


def test_hand_worked_case():
    # one head, 2 queries, 3 image keys: entries 0.1 ×5 and 0.7 → μ = 0.2, σ² = (5·0.01 + 0.25)/5 = 0.06
    probs = torch.tensor([[[0.1, 0.1, 0.7], [0.1, 0.1, 0.1]]], dtype=F64)
    values = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]]], dtype=F64)
    vbar = values.mean(dim=(1, 2))  # 3.5
    # λ = 2: τ = 0.2 + 2·0.2449 = 0.690 < 0.7 → only key 2 of query 0 is salient: 0.7·(3.5 − [5, 6])
    expected = torch.tensor([[[-1.05, -1.75], [0.0, 0.0]]], dtype=F64)
    torch.testing.assert_close(value_mean_correction(probs, values, vbar), expected)
    # λ = 2.5: τ = 0.2 + 2.5·0.2449 = 0.812 > 0.7 → nothing salient
    assert torch.equal(value_mean_correction(probs, values, vbar, std_multiplier=2.5), torch.zeros(1, 2, 2, dtype=F64))
    # λ = 0: τ = μ = 0.2 → still only the 0.7 entry
    torch.testing.assert_close(value_mean_correction(probs, values, vbar, std_multiplier=0), expected)
    # query 0 masked out: statistics over the five 0.1 entries (σ = 0, τ = 0.1, not exceeded) → nothing
    masked = value_mean_correction(probs, values, vbar, torch.tensor([False, True]))
    assert torch.equal(masked, torch.zeros(1, 2, 2, dtype=F64))


@pytest.mark.parametrize("seed", range(250))
def test_correction_equals_attention_with_salient_values_replaced(seed):
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)
    heads, nq, nk, extra, dim = rng.randint(1, 4), rng.randint(1, 8), rng.randint(1, 6), rng.randint(0, 6), 3
    logits = torch.randn(heads, nq, nk + extra, generator=g, dtype=F64) * rng.choice([1.0, 4.0, 12.0])
    logits[:, :, :nk] += torch.randn(nk, generator=g, dtype=F64) * 2  # some keys draw more attention
    if rng.random() < 0.3:
        logits[..., torch.randperm(nk + extra, generator=g)[: (nk + extra) // 2]] = -math.inf  # masked keys: P = 0
        logits[..., -1] = 0.0  # every row keeps a key
    probs_full = torch.softmax(logits, -1)
    values_full = torch.randn(heads, nk + extra, dim, generator=g, dtype=F64)
    vbar = torch.randn(heads, generator=g, dtype=F64)
    qmask = torch.rand(nq, generator=g) < 0.8
    lam = rng.choice([0.0, 0.5, 1.0, 2.0, 3.0])

    got = value_mean_correction(probs_full[:, :, :nk], values_full[:, :nk], vbar, qmask, std_multiplier=lam)

    image_probs = probs_full[:, qmask, :nk]
    tau = _threshold(image_probs, lam)
    replace = torch.zeros(heads, nq, nk + extra, dtype=torch.bool)
    if tau is not None:
        replace[:, :, :nk] = (probs_full[:, :, :nk] > tau) & qmask[None, :, None]
    expected = _replaced_output(probs_full, values_full, replace, vbar) - probs_full @ values_full
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_huge_multiplier_and_too_few_valid_entries_change_nothing():
    g = torch.Generator().manual_seed(0)
    probs = torch.softmax(torch.randn(3, 5, 9, generator=g, dtype=F64) * 3, -1)[:, :, :4]
    values = torch.randn(3, 4, 2, generator=g, dtype=F64)
    vbar = values.mean(dim=(1, 2))
    assert value_mean_correction(probs, values, vbar).abs().sum() > 0  # default λ: something is salient
    for lam in (1e6, math.inf):
        assert torch.equal(
            value_mean_correction(probs, values, vbar, std_multiplier=lam), torch.zeros(3, 5, 2, dtype=F64)
        )
    one = torch.zeros(2, 3, 4, dtype=F64)
    one[1, 2, 3] = 0.9  # a single entry > 1e-8: σ is NaN, nothing salient
    one[0, 0, 0] = 1e-9  # at or below 1e-8: not an attention entry
    assert torch.equal(
        value_mean_correction(one, torch.ones(2, 4, 2, dtype=F64), torch.zeros(2, dtype=F64)),
        torch.zeros(2, 3, 2, dtype=F64),
    )
    none = torch.zeros(2, 3, 4, dtype=F64)
    assert torch.equal(
        value_mean_correction(none, torch.ones(2, 4, 2, dtype=F64), torch.zeros(2, dtype=F64)),
        torch.zeros(2, 3, 2, dtype=F64),
    )
    qmask = torch.tensor([True, False, False])
    two = torch.zeros(2, 3, 4, dtype=F64)
    two[:, 1:] = 0.5  # valid entries only on masked queries
    assert torch.equal(
        value_mean_correction(two, torch.ones(2, 4, 2, dtype=F64), torch.zeros(2, dtype=F64), qmask),
        torch.zeros(2, 3, 2, dtype=F64),
    )


@pytest.mark.parametrize("seed", range(40))
def test_bf16_threshold_is_rounded_like_the_official_code(seed):
    """Official CFPO (qwen2_vl_cmve.py GMM_mask): torch.mean / torch.std of the bf16 entries > 1e-8 (bf16 results),
    thres = mean + 2·std in bf16, mask = P > thres; correction = (P·mask) @ (V̄ − V) in bf16."""
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(4, 12, 40, generator=g) * 2, -1)[:, :, :16].to(torch.bfloat16)
    values = torch.randn(4, 16, 8, generator=g).to(torch.bfloat16)
    vbar = torch.randn(4, generator=g).to(torch.bfloat16)
    valid = probs[probs > 1e-8]
    thres = torch.mean(valid) + 2 * torch.std(valid)
    assert thres.dtype == torch.bfloat16
    mask = (probs > thres).to(torch.bfloat16)
    expected = torch.matmul(probs * mask, vbar[:, None, None] - values)
    got = value_mean_correction(probs, values, vbar)
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(probs=torch.zeros(2, 3)), "probs"),
        (dict(probs=torch.zeros(2, 3, 4, dtype=torch.long)), "probs"),
        (dict(values=torch.zeros(2, 5, 2)), "values"),
        (dict(values=torch.zeros(2, 4, 2, dtype=F64)), "values"),
        (dict(value_mean=torch.zeros(3)), "value_mean"),
        (dict(query_mask=torch.ones(4, dtype=torch.bool)), "query_mask"),
        (dict(query_mask=torch.full((3,), 2)), "query_mask"),
        (dict(std_multiplier=-1.0), "std_multiplier"),
        (dict(std_multiplier=math.nan), "std_multiplier"),
        (dict(std_multiplier=True), "std_multiplier"),
        (dict(std_multiplier="2"), "std_multiplier"),
    ],
)
def test_value_mean_correction_bad_inputs_name_the_argument(kwargs, match):
    args = dict(probs=torch.zeros(2, 3, 4), values=torch.zeros(2, 4, 2), value_mean=torch.zeros(2), query_mask=None)
    args.update(kwargs)
    std_multiplier = args.pop("std_multiplier", 2.0)
    with pytest.raises(ValueError, match=match):
        value_mean_correction(**args, std_multiplier=std_multiplier)


# ---------------------------------------------------------------- cross_modal_value_mean_attention


@pytest.mark.parametrize("seed", range(200))
def test_batched_attention_equals_the_replaced_value_reference(seed):
    rng = random.Random(1000 + seed)
    q, k, v, allowed, spans, qmask = _random_case(rng, seed)
    lam = rng.choice([0.0, 1.0, 2.0, 2.0, 3.0])
    scaling = rng.choice([None, 0.3])
    mask_form = rng.choice(["bool", "additive", "none"])
    if mask_form == "none":  # causal, no padding
        qmask[:] = True
        allowed = torch.ones_like(allowed).tril()
        mask = None
    elif mask_form == "bool":
        mask = allowed
    else:
        mask = torch.where(allowed, torch.tensor(0.0, dtype=F64), torch.tensor(torch.finfo(F64).min, dtype=F64))
    chunk = rng.randint(1, q.shape[2] + 2)
    got = cross_modal_value_mean_attention(
        q,
        k,
        v,
        mask,
        spans,
        qmask if mask_form != "none" else None,
        scaling=scaling,
        std_multiplier=lam,
        query_chunk_size=chunk,
    )
    expected = _reference_attention(
        q, k, v, allowed, spans, qmask, lam, q.shape[-1] ** -0.5 if scaling is None else scaling
    )
    assert got.shape == (q.shape[0], q.shape[2], q.shape[1], q.shape[3])
    valid = qmask[:, :, None, None].expand_as(got)
    torch.testing.assert_close(got[valid], expected[valid], rtol=1e-9, atol=1e-12)


def test_batched_attention_with_infinite_multiplier_is_eager_attention():
    rng = random.Random(7)
    q, k, v, allowed, spans, qmask = _random_case(rng, 7)
    got = cross_modal_value_mean_attention(q, k, v, allowed, spans, qmask, std_multiplier=math.inf)
    groups = q.shape[1] // k.shape[1]
    scores = (q @ k.repeat_interleave(groups, 1).transpose(-1, -2)) * q.shape[-1] ** -0.5
    scores = scores.masked_fill(~allowed, torch.finfo(F64).min)
    eager = (torch.softmax(scores, -1) @ v.repeat_interleave(groups, 1)).transpose(1, 2)
    torch.testing.assert_close(got, eager, rtol=1e-12, atol=1e-12)


def test_batched_attention_is_row_independent():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(3, 4, 10, 4, generator=g) * 4
    k, v = torch.randn(3, 2, 10, 4, generator=g), torch.randn(3, 2, 10, 4, generator=g)
    spans = [[(1, 4)], [(0, 2), (3, 8)], []]
    out = cross_modal_value_mean_attention(q, k, v, None, spans, query_chunk_size=3)
    assert not torch.equal(out[0], cross_modal_value_mean_attention(q, k, v, None, spans, std_multiplier=math.inf)[0])
    for b in range(3):
        alone = cross_modal_value_mean_attention(q[b : b + 1], k[b : b + 1], v[b : b + 1], None, spans[b : b + 1])
        torch.testing.assert_close(alone[0], out[b], rtol=1e-6, atol=1e-6)
    # no span, or a span at the very end (no query after it): plain attention for that row
    plain = cross_modal_value_mean_attention(q, k, v, None, [[(7, 10)], [], []], std_multiplier=2.0)
    torch.testing.assert_close(plain, cross_modal_value_mean_attention(q, k, v, None, [[], [], []]))


def test_batched_attention_keeps_the_gradient_path():
    g = torch.Generator().manual_seed(5)
    q = (torch.randn(1, 2, 6, 3, generator=g) * 3).requires_grad_()
    k, v = torch.randn(1, 2, 6, 3, generator=g), torch.randn(1, 2, 6, 3, generator=g).requires_grad_()
    cross_modal_value_mean_attention(q, k, v, None, [[(1, 3)]]).sum().backward()
    assert q.grad is not None and v.grad is not None and torch.isfinite(q.grad).all()


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(query=torch.zeros(1, 2, 5)), "query"),
        (dict(key=torch.zeros(1, 2, 4, 3)), "key"),
        (dict(value=torch.zeros(1, 3, 5, 3)), "value"),
        (dict(key=torch.zeros(1, 4, 5, 3), value=torch.zeros(1, 4, 5, 3)), "key and value"),
        (dict(attention_mask=torch.ones(1, 1, 5, 4, dtype=torch.bool)), "attention_mask"),
        (dict(image_spans=[[(3, 2)]]), "image_spans"),
        (dict(image_spans=[[(0, 6)]]), "image_spans"),
        (dict(image_spans=[[(0, 3), (2, 4)]]), "image_spans"),
        (dict(image_spans=[[], []]), "image_spans"),
        (dict(query_mask=torch.ones(1, 4, dtype=torch.bool)), "query_mask"),
        (dict(std_multiplier=-0.5), "std_multiplier"),
        (dict(query_chunk_size=0), "query_chunk_size"),
    ],
)
def test_batched_attention_bad_inputs_name_the_argument(change, match):
    args = dict(
        query=torch.zeros(1, 6, 5, 3),
        key=torch.zeros(1, 2, 5, 3),
        value=torch.zeros(1, 2, 5, 3),
        attention_mask=None,
        image_spans=[[(1, 3)]],
        query_mask=None,
    )
    kw = {}
    for name in ("std_multiplier", "query_chunk_size"):
        if name in change:
            kw[name] = change.pop(name)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        cross_modal_value_mean_attention(**args, **kw)


# ---------------------------------------------------------------- image_spans

IDS = dict(vision_start_id=7, vision_end_id=8, image_pad_id=9)


def test_image_spans_per_row_with_padding():
    ids = torch.tensor(
        [
            [7, 9, 9, 8, 1, 7, 9, 8, 2, 0],  # two images, right padding
            [0, 0, 3, 7, 9, 9, 9, 8, 4, 5],  # left padding
            [7, 9, 8, 1, 2, 3, 4, 5, 6, 7],  # a vision_start on padding is ignored
            [1, 2, 3, 4, 5, 6, 9, 9, 1, 2],  # text only: pad ids outside markers are not a span
        ]
    )
    mask = torch.ones_like(ids)
    mask[0, 9] = 0
    mask[1, :2] = 0
    mask[2, 9] = 0
    assert image_spans(ids, attention_mask=mask, **IDS) == [[(1, 3), (6, 7)], [(4, 7)], [(1, 2)], []]


def test_image_spans_bad_rows_name_input_ids():
    with pytest.raises(ValueError, match=r"input_ids row 0.*1 vision_start"):
        image_spans(torch.tensor([[7, 9, 9, 1]]), **IDS)
    with pytest.raises(ValueError, match=r"input_ids row 1.*out of order"):
        image_spans(torch.tensor([[1, 1, 1, 1], [8, 9, 7, 1]]), **IDS)
    with pytest.raises(ValueError, match=r"input_ids row 0.*out of order"):
        image_spans(torch.tensor([[7, 8, 1, 1]]), **IDS)
    with pytest.raises(ValueError, match="other than image_pad_id"):
        image_spans(torch.tensor([[7, 9, 5, 8]]), **IDS)
    with pytest.raises(ValueError, match="holds padding"):
        image_spans(torch.tensor([[7, 9, 9, 8]]), attention_mask=torch.tensor([[1, 0, 1, 1]]), **IDS)
    with pytest.raises(ValueError, match="input_ids"):
        image_spans(torch.zeros(4), **IDS)
    with pytest.raises(ValueError, match="image_pad_id"):
        image_spans(torch.zeros(1, 4, dtype=torch.long), vision_start_id=7, vision_end_id=8, image_pad_id=None)
    with pytest.raises(ValueError, match="attention_mask"):
        image_spans(torch.zeros(1, 4, dtype=torch.long), attention_mask=torch.ones(1, 3), **IDS)
