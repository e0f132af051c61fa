"""Tests of vppo_core.attention: the mask itself, and its effect inside real (tiny) Qwen2.5-VL / Qwen3-VL models."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vppo_core.attention import text_only_attention

IMG = 7  # image placeholder id in the hand-made examples


def test_hand_worked_mask_with_left_padding_and_two_visual_tokens():
    # row: [pad, text, img, img, text, text]
    ids = torch.tensor([[0, 1, IMG, IMG, 2, 3]])
    am = torch.tensor([[0, 1, 1, 1, 1, 1]])
    m = text_only_attention(ids, IMG, am)[0, 0].int()
    expected = torch.tensor(
        [
            [1, 0, 0, 0, 0, 0],  # padding query: only itself
            [0, 1, 0, 0, 0, 0],
            [0, 1, 1, 0, 0, 0],  # visual query: text before it + itself
            [0, 1, 0, 1, 0, 0],
            [0, 1, 0, 0, 1, 0],  # text after the image: never sees the image
            [0, 1, 0, 0, 1, 1],
        ]
    )
    assert torch.equal(m, expected)


def test_additive_float_mask_is_zero_where_allowed_and_dtype_min_elsewhere():
    ids = torch.tensor([[1, IMG, 2]])
    b = text_only_attention(ids, IMG)
    f = text_only_attention(ids, IMG, dtype=torch.bfloat16)
    assert f.dtype == torch.bfloat16 and f.shape == (1, 1, 3, 3)
    assert torch.equal(f == 0, b)
    assert bool((f[~b] == torch.finfo(torch.bfloat16).min).all())


def test_several_visual_ids_are_all_hidden():
    ids = torch.tensor([[1, IMG, 8, 2]])
    m = text_only_attention(ids, (IMG, 8))[0, 0]
    assert not m[3, 1] and not m[3, 2] and m[3, 0] and m[3, 3]


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 3), st.integers(1, 10), st.integers(0, 2**16))
def test_mask_is_causal_hides_visual_and_padding_keys_and_every_row_has_a_key(batch, seq, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, 10, (batch, seq), generator=g)
    am = torch.randint(0, 2, (batch, seq), generator=g)
    m = text_only_attention(ids, IMG, am)[:, 0]
    assert bool(m.any(-1).all()), "a row without any key would give NaN in softmax"
    off_diag = ~torch.eye(seq, dtype=torch.bool)
    assert not bool((m & torch.ones(seq, seq).triu(1).bool()).any()), "not causal"
    hidden_key = (ids == IMG) | (am == 0)
    assert not bool((m & hidden_key[:, None, :] & off_diag).any()), "a visual/padding key is visible"
    readable = (am == 1) & (ids != IMG)
    causal = torch.ones(seq, seq).tril().bool()
    assert torch.equal(m & off_diag, causal & readable[:, None, :] & off_diag), "a readable key was hidden"


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda: text_only_attention(torch.zeros(4, dtype=torch.long), IMG), "input_ids must be"),
        (lambda: text_only_attention(torch.zeros(1, 4), IMG), "input_ids must be"),
        (lambda: text_only_attention(torch.zeros(1, 4, dtype=torch.long), "7"), "image_token_id"),
        (lambda: text_only_attention(torch.zeros(1, 4, dtype=torch.long), []), "image_token_id"),
        (lambda: text_only_attention(torch.zeros(1, 4, dtype=torch.long), IMG, torch.ones(1, 5)), "attention_mask"),
        (lambda: text_only_attention(torch.zeros(1, 2, dtype=torch.long), IMG, torch.tensor([[2, 1]])), "only 0 and 1"),
        (lambda: text_only_attention(torch.zeros(1, 2, dtype=torch.long), IMG, dtype=torch.long), "dtype"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(call, match):
    with pytest.raises(ValueError, match=match):
        call()
