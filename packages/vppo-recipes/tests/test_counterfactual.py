"""cross_modal_value_mean on the tiny Qwen2.5-VL / Qwen3-VL models: λ = inf is the plain forward, the default equals
an independent eager re-implementation that replaces the salient image values, rows are independent, the attention
implementation is restored (also on error), the vision tower is left alone, and an FSDP2-wrapped model gives the
same logits."""

from __future__ import annotations

import copy
import math
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vppo_recipes.counterfactual import ATTENTION_NAME, cross_modal_value_mean

sys.path.insert(0, str(Path(__file__).parent))
from _tiny_models import IMAGE_TOKEN, VEND, VSTART, build_tiny

ARCHS = ["qwen2_5_vl", "qwen3_vl"]
GRID = (1, 8, 8)  # 64 patches -> 16 image tokens per image
REFERENCE = "vppo_test_cfpo_reference"


@pytest.fixture(scope="module", params=ARCHS)
def tiny(request):
    model, patch = build_tiny(request.param)
    return model.eval(), patch


def _batch(patch: int, seed: int, rows: list[tuple[int, int]]) -> dict[str, torch.Tensor]:
    """One row per (n_images, text_len): (<vision_start> <image_pad>*16 <vision_end> text*text_len) * n_images,
    right-padded with 0."""
    g = torch.Generator().manual_seed(seed)
    t, h, w = GRID
    n_patches = t * h * w
    seqs = []
    for n_images, text_len in rows:
        parts = []
        for _ in range(n_images):
            parts += [torch.tensor([VSTART]), torch.full((n_patches // 4,), IMAGE_TOKEN), torch.tensor([VEND])]
            parts.append(torch.randint(2, 250, (text_len,), generator=g))
        seqs.append(torch.cat(parts))
    length = max(len(s) for s in seqs)
    input_ids = torch.zeros(len(rows), length, dtype=torch.long)
    attention_mask = torch.zeros_like(input_ids)
    for i, s in enumerate(seqs):
        input_ids[i, : len(s)] = s
        attention_mask[i, : len(s)] = 1
    n_images = sum(n for n, _ in rows)
    return dict(
        input_ids=input_ids,
        attention_mask=attention_mask,
        pixel_values=torch.randn(n_images * n_patches, 3 * 2 * patch * patch, generator=g),
        image_grid_thw=torch.tensor([list(GRID)] * n_images),
        mm_token_type_ids=(input_ids == IMAGE_TOKEN).long(),
    )


def _first_row(batch: dict[str, torch.Tensor], n_images: int) -> dict[str, torch.Tensor]:
    n = int(batch["attention_mask"][0].sum())
    per_image = math.prod(GRID)
    out = {k: batch[k][:1, :n] for k in ("input_ids", "attention_mask", "mm_token_type_ids")}
    out["pixel_values"] = batch["pixel_values"][: n_images * per_image]
    out["image_grid_thw"] = batch["image_grid_thw"][:n_images]
    return out


def _plain(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


def _cf(model, batch, **kwargs) -> torch.Tensor:
    """Logits of the counterfactual forward (default λ = 2 unless std_multiplier is given)."""
    with torch.no_grad():
        with cross_modal_value_mean(model, batch["input_ids"], attention_mask=batch["attention_mask"], **kwargs):
            return model(**batch).logits


# ---------------------------------------------------------------- independent reference


def _reference_spans(input_ids, attention_mask):
    """Runs of image-pad tokens among the real tokens of each row."""
    spans = []
    for ids, valid in zip(input_ids.tolist(), attention_mask.tolist()):
        row, start = [], None
        for i, (tok, ok) in enumerate(zip([*ids, -1], [*valid, 0])):
            is_image = tok == IMAGE_TOKEN and ok
            if is_image and start is None:
                start = i
            elif not is_image and start is not None:
                row.append((start, i))
                start = None
        spans.append(row)
    return spans


def _reference_attention(spans, qmask, lam):
    """Eager attention in which each salient (head, query, image key) reads V̄[head] instead of V[head, key]:
    per row and per span, τ = mean + λ·std (torch.std) of the probabilities > 1e-8 of the real queries at or after
    the span's end on its keys; V̄ = mean over the row's image tokens and the head dimension."""

    def attention(module, query, key, value, attention_mask, scaling, dropout=0.0, **kwargs):
        groups = module.num_key_value_groups
        k, v = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = (query @ k.transpose(-1, -2)) * scaling + attention_mask
        probs = torch.softmax(scores, -1, dtype=torch.float32).to(query.dtype)
        out = probs @ v
        heads, seq, dim = query.shape[1], query.shape[2], query.shape[3]
        for b, row in enumerate(spans):
            if not row:
                continue
            vbar = v[b][:, [i for s, e in row for i in range(s, e)]].mean(dim=(1, 2))
            replace = torch.zeros(heads, seq, seq, dtype=torch.bool)
            for s, e in row:
                queries = [t for t in range(e, seq) if qmask[b, t]]
                entries = probs[b][:, queries, s:e]
                entries = entries[entries > 1e-8]
                if entries.numel() < 2:
                    continue
                tau = entries.mean() + lam * entries.std()
                for t in queries:
                    replace[:, t, s:e] |= probs[b][:, t, s:e] > tau
            per_query = v[b][:, None].expand(heads, seq, seq, dim)
            per_query = torch.where(replace[..., None], vbar[:, None, None, None].expand_as(per_query), per_query)
            out[b] = torch.einsum("hqj,hqjd->hqd", probs[b], per_query)
        return out.transpose(1, 2).contiguous(), None

    return attention


def _reference_logits(model, batch, lam=2.0) -> torch.Tensor:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    spans = _reference_spans(batch["input_ids"], batch["attention_mask"])
    AttentionInterface.register(REFERENCE, _reference_attention(spans, batch["attention_mask"].bool(), lam))
    AttentionMaskInterface.register(REFERENCE, eager_mask)
    text = model.model.language_model.config
    before = text._attn_implementation
    text._attn_implementation = REFERENCE
    try:
        with torch.no_grad():
            return model(**batch).logits
    finally:
        text._attn_implementation = before


# ---------------------------------------------------------------- tests


def test_infinite_multiplier_is_the_plain_forward(tiny):
    model, patch = tiny
    batch = _batch(patch, 0, [(1, 6), (2, 5)])
    valid = batch["attention_mask"].bool()
    plain = _plain(model, batch)
    for lam in (math.inf, 1e9):
        torch.testing.assert_close(_cf(model, batch, std_multiplier=lam)[valid], plain[valid], rtol=1e-5, atol=1e-5)


def test_default_equals_the_replaced_value_reference_and_changes_the_logits(tiny):
    model, patch = tiny
    batch = _batch(patch, 1, [(2, 6), (1, 9)])  # row 0: two images (V̄ over both), row 1: right padding
    valid = batch["attention_mask"].bool()
    cf = _cf(model, batch)  # λ = 2
    torch.testing.assert_close(cf[valid], _reference_logits(model, batch)[valid], rtol=1e-5, atol=1e-5)
    plain = _plain(model, batch)
    # the first tokens (up to the first image's end) see no correction; later ones do
    first_end = 1 + 16
    torch.testing.assert_close(cf[:, :first_end], plain[:, :first_end], rtol=1e-5, atol=1e-5)
    for row in range(2):
        assert (cf[row, first_end:] - plain[row, first_end:])[valid[row, first_end:]].abs().max() > 1e-3
    # another λ goes through the same path
    lam = 0.5
    torch.testing.assert_close(
        _cf(model, batch, std_multiplier=lam)[valid],
        _reference_logits(model, batch, lam)[valid],
        rtol=1e-5,
        atol=1e-5,
    )


def test_vision_markers_sampled_in_a_response_are_text_not_an_image(tiny):
    """Found by bench_methods (issue 26): the random tiny policy sampled <|vision_start|> in a response and CFPO's
    view raised 'unbalanced markers'. With prompt_length, only the prompt is searched for images: the run goes
    through, the other row is untouched, and on a batch without such tokens prompt_length changes nothing. (Row 0's
    own logits may change everywhere: CFPO's saliency statistics are over all of the row's queries.)"""
    model, patch = tiny
    batch = _batch(patch, 3, [(1, 8), (1, 8)])
    prompt_length = 1 + 16 + 1 + 4  # one image, 4 text tokens; the last 4 tokens play the response
    sampled = {**batch, "input_ids": batch["input_ids"].clone()}
    sampled["input_ids"][0, prompt_length + 1] = VSTART  # a lone marker in row 0's response
    with pytest.raises(ValueError, match=r"row 0: 2 vision_start token\(s\) but 1 vision_end"):
        _cf(model, sampled)
    got = _cf(model, sampled, prompt_length=prompt_length)
    want = _cf(model, batch, prompt_length=prompt_length)
    torch.testing.assert_close(got[1], want[1], rtol=0, atol=0)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(_cf(model, batch, prompt_length=prompt_length), _cf(model, batch), rtol=0, atol=0)


def test_a_rows_output_does_not_depend_on_the_other_rows(tiny):
    model, patch = tiny
    batch = _batch(patch, 2, [(1, 5), (2, 9)])  # row 0 is right-padded in the batch
    alone = _first_row(batch, n_images=1)
    n = alone["input_ids"].shape[1]
    in_batch = _cf(model, batch)[0, :n]
    torch.testing.assert_close(_cf(model, alone)[0], in_batch, rtol=1e-5, atol=1e-5)
    assert (in_batch - _plain(model, alone)[0]).abs().max() > 1e-3


def test_attention_implementation_is_restored_and_the_vision_tower_untouched(tiny, monkeypatch):
    import vppo_recipes.counterfactual as cf

    model, patch = tiny
    batch = _batch(patch, 3, [(1, 4)])
    text, vision, top = model.model.language_model.config, model.model.visual.config, model.config
    before = (text._attn_implementation, vision._attn_implementation, top._attn_implementation)
    calls = []
    real = cf.cross_modal_value_mean_attention
    monkeypatch.setattr(
        cf, "cross_modal_value_mean_attention", lambda q, *a, **k: calls.append(q.shape) or real(q, *a, **k)
    )

    with cross_modal_value_mean(model, batch["input_ids"]) as spans:
        assert spans == [[(1, 17)]]
        assert text._attn_implementation == ATTENTION_NAME
        assert (vision._attn_implementation, top._attn_implementation) == before[1:]
        with torch.no_grad():
            model(**batch)
        with pytest.raises(RuntimeError, match="already active"):
            with cross_modal_value_mean(model, batch["input_ids"]):
                pass
    assert (text._attn_implementation, vision._attn_implementation, top._attn_implementation) == before
    # one call per decoder layer, all on the text sequence (never the vision tower's patches)
    seq = batch["input_ids"].shape[1]
    assert len(calls) == model.config.text_config.num_hidden_layers
    assert all(shape[0] == 1 and shape[2] == seq for shape in calls)

    with pytest.raises(ZeroDivisionError):
        with cross_modal_value_mean(model, batch["input_ids"]):
            raise ZeroDivisionError
    assert text._attn_implementation == before[0]

    two = _batch(patch, 3, [(1, 4), (1, 4)])
    with pytest.raises(ValueError, match="same input_ids"):  # the forward is not the one the context was given
        with cross_modal_value_mean(model, batch["input_ids"]), torch.no_grad():
            model(**two)
    assert text._attn_implementation == before[0]


def test_bad_arguments_raise_value_errors_naming_them(tiny):
    model, patch = tiny
    ids = _batch(patch, 4, [(1, 3)])["input_ids"]
    for kwargs, match in [
        (dict(std_multiplier=-1.0), "std_multiplier"),
        (dict(std_multiplier=math.nan), "std_multiplier"),
        (dict(query_chunk_size=0), "query_chunk_size"),
        (dict(attention_mask=torch.ones(1, 3)), "attention_mask"),
    ]:
        with pytest.raises(ValueError, match=match):
            with cross_modal_value_mean(model, ids, **kwargs):
                pass
    with pytest.raises(ValueError, match="input_ids row 0"):
        with cross_modal_value_mean(model, ids[:, 1:]):  # vision_start cut off
            pass
    with pytest.raises(ValueError, match="not a supported"):
        with cross_modal_value_mean(torch.nn.Linear(2, 2), ids, vision_start_id=1, vision_end_id=2, image_pad_id=3):
            pass


def test_an_fsdp2_wrapped_model_gives_the_same_logits():
    from torch.distributed.device_mesh import init_device_mesh

    from vppo_recipes.sharding import shard_policy

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    model, patch = build_tiny("qwen3_vl")
    model.eval()
    batch = _batch(patch, 5, [(1, 5), (2, 4)])
    valid = batch["attention_mask"].bool()
    expected = _cf(model, batch)
    sharded = copy.deepcopy(model)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_policy(sharded, init_device_mesh("cpu", (1,)))
        torch.testing.assert_close(_cf(sharded, batch)[valid], expected[valid], rtol=1e-5, atol=1e-5)
    finally:
        dist.destroy_process_group()
