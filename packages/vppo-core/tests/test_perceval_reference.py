"""Perceval (ALGORITHMS.md §9.14) side by side with the transcription of its official code (`perceval_reference.py`,
RUCAIBox/Perceval@4ef2db6), on ≥ 200 seeded random inputs per function, plus hand-worked cases of the paper's Eq. 3.

Deliberate differences (rows of the README's differences table), each shown exactly here:
- spans are given unpadded (the official code pads them with -100 and skips such regions): equal after padding;
- a substring that is no str is refused (the official finder fails on it and drops it; vppo's PRM adapter helper
  `parse_prm_answer` drops such items before): equal after dropping them;
- the group advantage is vppo-core's `group_advantages` (a group of identical rewards gets exactly 0; the official
  code divides its rounding error by 1e-6; G = 1 is refused, the official code uses mean 0, std 1): equal on groups
  of G ≥ 2, identical groups included (the rewards here are exact binary fractions, whose mean has no rounding
  error, so the official value is exactly 0 too);
- token weights (`perceval_token_weights`, α ≤ 1) instead of token advantages: `A_i·w` equals the official value.
"""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from perceval_reference import (
    official_extract_judgement,
    official_pad_nested_list,
    official_penalty_mask,
    official_positions,
    official_trm_advantage,
)

from vppo_core.advantages import group_advantages
from vppo_core.shaping import (
    flagged_token_spans,
    perceval_penalty_mask,
    perceval_token_advantages,
    perceval_token_weights,
)

CASES = 300


def _random_offsets(rng: random.Random, n_chars: int) -> list[tuple[int, int]]:
    """A tokenizer's offsets: mostly contiguous tokens of 1-4 characters; sometimes gaps, zero-width tokens and
    repeated offsets (byte-level BPE gives several tokens the same character span for one multi-byte character); and
    now and then arbitrary unordered pairs, where the order of the official scan's tests decides."""
    kind = rng.random()
    if kind > 0.85:
        pairs = [sorted((rng.randint(0, n_chars), rng.randint(0, n_chars))) for _ in range(rng.randint(0, 12))]
        return [(a, b) for a, b in pairs]
    offsets, c = [], 0
    while c < n_chars:
        width = rng.randint(1, 4)
        if kind < 0.5:
            offsets.append((c, min(c + width, n_chars)))
        else:
            r = rng.random()
            if r < 0.15:
                offsets.append((c, c))  # zero-width
            elif r < 0.3 and offsets:
                offsets.append(offsets[-1])  # repeated
            elif r < 0.4:
                c += 1  # gap
                continue
            else:
                offsets.append((c, min(c + width, n_chars)))
        c += width
    return offsets


def _random_substrings(rng: random.Random, text: str) -> list[str]:
    subs = []
    for _ in range(rng.randint(0, 5)):
        r = rng.random()
        if r < 0.6 and text:
            a = rng.randrange(len(text))
            subs.append(text[a : a + rng.randint(1, 12)])
        elif r < 0.8:
            subs.append("".join(rng.choice("xyz") for _ in range(rng.randint(1, 4))))  # usually absent
        elif r < 0.9:
            subs.append("")
        elif subs:
            subs.append(subs[-1])  # duplicate
    return subs


def test_flagged_token_spans_equal_the_official_position_finder():
    rng = random.Random(0)
    for _ in range(CASES):
        text = "".join(rng.choice("ab c.") for _ in range(rng.randint(0, 40)))
        offsets = _random_offsets(rng, len(text))
        subs = _random_substrings(rng, text)
        want = [tuple(r) for r in official_positions(text, subs, offsets)]
        assert flagged_token_spans(text, subs, offsets) == want, (text, subs, offsets)


def test_a_flag_that_is_no_string_is_refused_and_the_official_finder_drops_it():
    text, offsets = "a cat on a mat", [(0, 1), (1, 5), (5, 8), (8, 10), (10, 14)]
    with pytest.raises(ValueError, match="sequence of str"):
        flagged_token_spans(text, ["cat", 3], offsets)
    assert official_positions(text, ["cat", 3], offsets) == [
        list(s) for s in flagged_token_spans(text, ["cat"], offsets)
    ]


def test_penalty_mask_equals_the_official_mask_of_the_padded_spans():
    gen = random.Random(1)
    for _ in range(CASES):
        B, L = gen.randint(1, 5), gen.randint(0, 12)
        spans = [
            [
                sorted((gen.randint(0, L + 3), gen.randint(0, L + 3)))[:: gen.choice((1, -1))]
                for _ in range(gen.randint(0, 4))
            ]
            for _ in range(B)
        ]
        response_mask = torch.ones(B, L, dtype=torch.int64)
        want = official_penalty_mask(official_pad_nested_list(spans, padding_value=-100), response_mask)
        got = perceval_penalty_mask([[tuple(s) for s in row] for row in spans], L)
        assert got.dtype == torch.bool and torch.equal(got.long(), want), (spans, L)


def test_a_negative_start_is_refused():
    with pytest.raises(ValueError, match="≥ 0"):
        perceval_penalty_mask([[(-1, 3)]], 5)


def _random_batch(gen: torch.Generator, rng: random.Random):
    G, groups = rng.randint(2, 6), rng.randint(1, 4)
    B, L = G * groups, rng.randint(1, 10)
    rewards = torch.tensor([rng.choice((0.0, 0.5, 1.0, 1.25)) for _ in range(B)])
    lengths = torch.randint(1, L + 1, (B,), generator=gen)
    mask = (torch.arange(L)[None] < lengths[:, None]).long()
    flagged = torch.rand(B, L, generator=gen) < 0.4
    return G, B, L, rewards, mask, flagged


def test_token_advantages_equal_the_official_trm_estimator():
    rng, gen = random.Random(2), torch.Generator().manual_seed(2)
    for case in range(CASES):
        G, B, L, rewards, mask, flagged = _random_batch(gen, rng)
        alpha = rng.choice((0.0, 0.03, 0.1, 0.3, 1.0, rng.uniform(0, 2)))
        token_rewards = torch.zeros(B, L)
        token_rewards[:, 0] = rewards
        index = np.array([f"uid{i // G}" for i in range(B)], dtype=object)
        want, _ = official_trm_advantage(
            token_rewards, mask, flagged.long(), index, config={"penalty_percentage": alpha}
        )
        adv = group_advantages(rewards, G)
        got = perceval_token_advantages(adv, flagged, mask, penalty=alpha)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6, msg=f"case {case}")
        if alpha <= 1.0:  # the recipe's form: the group advantage times a token weight
            w = perceval_token_weights(adv, flagged, mask, penalty=alpha)
            torch.testing.assert_close(adv[:, None] * w, want, rtol=1e-6, atol=1e-6, msg=f"case {case}")
            assert bool((w >= 0).all()) and bool((w[mask == 0] == 0).all())


def test_the_official_judgement_parser_and_the_finder_agree_with_vppo_on_the_official_examples():
    """The official file's own `__main__` examples: its response, the flags a PRM output names, their tokens."""
    text = (
        "<think>The user asks about the animals. I see a cat on the mat and a dog under the table.</think>"
        "<answer>There is a cat and a dog.</answer>"
    )
    # a word-level tokenizer's offsets (runs of letters, then single characters)
    offsets, c = [], 0
    while c < len(text):
        e = c + 1
        while c < len(text) and text[c].isalpha() and e < len(text) and text[e].isalpha():
            e += 1
        offsets.append((c, e))
        c = e
    for output in ("<answer>['a dog under the table']</answer>", "<answer>['cat on the mat', 'dog under the table']</answer>",
                   "<answer>The response is correct</answer>", "no answer", "<answer>nonsense</answer>"):  # fmt: skip
        flags = official_extract_judgement(output) or []
        want = official_positions(text, flags, offsets)
        assert [list(s) for s in flagged_token_spans(text, flags, offsets)] == want
    assert official_extract_judgement("<answer>nonsense</answer>") is None  # falls off its end: no flag


def test_eq3_by_hand():
    """Â' = Â − α·m·|Â| (the paper's Eq. 3, α = 0.1) on a group of four with rewards 1, 0, 0, 1: mean 0.5, unbiased
    std √(1/3), so Â = ±0.5·√3 = ±0.8660254 (the 1e-6 in the denominator moves the 7th digit)."""
    adv = group_advantages(torch.tensor([1.0, 0.0, 0.0, 1.0]), 4)
    torch.testing.assert_close(adv, torch.tensor([0.8660239, -0.8660239, -0.8660239, 0.8660239]), rtol=0, atol=1e-6)
    flagged = torch.tensor([[True, False], [True, False], [False, False], [True, True]])
    mask = torch.tensor([[1, 1], [1, 1], [1, 1], [1, 0]])
    got = perceval_token_advantages(adv, flagged, mask, penalty=0.1)
    a = 0.8660239
    want = torch.tensor([[0.9 * a, a], [-1.1 * a, -a], [-a, -a], [0.9 * a, 0.0]])  # a correct response's flagged
    torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # tokens get less credit, a wrong one's more blame
    w = perceval_token_weights(adv, flagged, mask, penalty=0.1)
    torch.testing.assert_close(w, torch.tensor([[0.9, 1.0], [1.1, 1.0], [1.0, 1.0], [0.9, 0.0]]))
    # α = 1: a correct response's flagged tokens get no credit at all; a wrong one's twice the blame
    w1 = perceval_token_weights(adv, flagged, mask, penalty=1.0)
    assert w1[0, 0] == 0.0 and w1[1, 0] == 2.0
    with pytest.raises(ValueError, match=r"penalty must be a finite float in \[0, 1\]"):
        perceval_token_weights(adv, flagged, mask, penalty=1.5)


def test_spans_by_hand():
    """'a cat on the mat' tokenised as a / ␣cat / ␣on / ␣the / ␣mat: 'cat on' covers tokens 1-2 (its first character
    inside token 1, its last ending token 2); 'at o' starts inside token 1 and ends inside token 2; 'mat' is the end."""
    text = "a cat on the mat"
    offsets = [(0, 1), (1, 5), (5, 8), (8, 12), (12, 16)]
    assert flagged_token_spans(text, ["cat on", "at o", "mat", "dog"], offsets) == [(1, 3), (1, 3), (4, 5)]
    m = perceval_penalty_mask([[(1, 3), (4, 9)], [(7, 9)]], 6)
    assert m.long().tolist() == [[0, 1, 1, 0, 1, 1], [0, 0, 0, 0, 0, 0]]
