"""VAPO (ALGORITHMS.md §9.12): vppo-core's functions side by side with the transcription of the official code
(`vapo_reference.py`, xytian1008/VAPO@67687cf) on seeded random inputs (≥ 200 each), plus hand-worked cases of the
paper's Eq. 4 and the reward.

Deliberate differences (the core README's table), each shown exactly here:
- the draw of the k anchors among the candidates: a torch generator instead of numpy's unseeded ``default_rng``
  (equal when the transcription's ``choice`` takes the same subset: `test_positions_match_with_the_same_draw`);
- the label an anchor is compared with: the label of the claim it asked about, not ``label_{j+1}``
  (`test_label_of_the_chosen_claim`: equal when the claims are taken in order, different otherwise).
"""

from __future__ import annotations

import math
import random
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vppo_core import (
    ANCHOR_SEPARATORS,
    anchor_cutoffs,
    anchor_decisions,
    anchor_perception_score,
    anchor_positions,
    anchor_query,
    anchor_think_span,
    vapo_rewards,
)

sys.path.insert(0, str(Path(__file__).parent))

import vapo_reference as ref

N_CASES = 300
PIECES = ["a", "bc", " ", "word", ",", ".", "\n", "!", "?", ";", ":", ",,", "</think>", "\\boxed{3}", "<think>", "x."]


def _text(rng: random.Random, n_max: int = 40) -> str:
    return "".join(rng.choice(PIECES) for _ in range(rng.randint(0, n_max)))


def test_separators_are_the_codes():
    assert set(ANCHOR_SEPARATORS) == ref.SEPARATORS


def test_think_span_and_cutoffs_match_the_code():
    rng = random.Random(0)
    for _ in range(N_CASES):
        text = _text(rng)
        think = anchor_think_span(text)
        assert think == ref.extract_think_part(text)
        max_pos = rng.randint(-3, len(think) + 3)
        min_sep = rng.randint(0, 4)
        want = ref.find_cutoff_positions(think, max_pos, ref.SEPARATORS, min_sep).tolist()
        assert anchor_cutoffs(think, max_pos=max_pos, min_sep=min_sep) == want
    assert anchor_cutoffs("a, b. c,, d") == [1, 4, 7]  # the comma at 8 is 1 < 2 after the one at 7


class _SameDraw:
    """numpy's ``rng.choice(positions, size=k, replace=False)`` taking the subset a torch generator takes."""

    def __init__(self, seed: int):
        self.g = torch.Generator().manual_seed(seed)

    def choice(self, positions, size, replace):
        assert not replace
        return np.asarray(positions)[torch.randperm(len(positions), generator=self.g)[:size].numpy()]


def test_positions_match_with_the_same_draw():
    """Every branch (no candidate, fewer than k, a random k-subset, the long-response window) equals the code once
    the code's numpy draw takes the same subset: the only difference is where the randomness comes from."""
    rng = random.Random(1)
    branches = {"none": 0, "fewer": 0, "subset": 0, "long": 0}
    for case in range(N_CASES):
        text = _text(rng, 60) or "x"
        k = rng.randint(1, 8)
        tokens = rng.choice([10, 5999, 6000, 6001, 9000])
        if tokens > 6000:
            text = "".join(rng.choice([",", "ab", "."]) for _ in range(100)) + text  # long enough for the buffer
        got = anchor_positions(text, k, generator=torch.Generator().manual_seed(case), num_tokens=tokens)
        want = ref.anchor_positions(text, tokens, k, _SameDraw(case)).tolist()
        assert got == want, (text, k, tokens)
        think = ref.extract_think_part(text)
        n = len(ref.find_cutoff_positions(think, len(think), ref.SEPARATORS, ref.MIN_SEP_DIST))
        branches["none" if n == 0 else "fewer" if n < k else "subset"] += 1
        branches["long"] += tokens > 6000
    assert min(branches.values()) >= 10, branches


def test_positions_draw_uniform_subsets_like_the_code():
    """Without the shared draw: both are sorted k-subsets of the candidates with every candidate taken k/n of the
    time (numpy's ``default_rng`` as the code, torch's generator as vppo)."""
    text = "<think>" + "ab, " * 10 + "</think>"  # 10 candidates
    k, draws = 3, 4000
    cut = anchor_cutoffs(anchor_think_span(text))
    ours, theirs = np.zeros(len(text)), np.zeros(len(text))
    g, npr = torch.Generator().manual_seed(0), np.random.default_rng(0)
    for _ in range(draws):
        a = anchor_positions(text, k, generator=g)
        b = ref.anchor_positions(text, 0, k, npr).tolist()
        for got in (a, b):
            assert got == sorted(got) and len(set(got)) == k and set(got) <= set(cut)
        ours[a] += 1
        theirs[b] += 1
    expected = draws * k / len(cut)
    sd = math.sqrt(draws * (k / len(cut)) * (1 - k / len(cut)))
    assert np.all(np.abs(ours[cut] - expected) < 5 * sd) and np.all(np.abs(theirs[cut] - expected) < 5 * sd)


def test_query_text_matches_the_code():
    rng = random.Random(2)
    for _ in range(N_CASES):
        prompt, response = "<|im_start|>user " + _text(rng, 5), _text(rng) or "y"
        claims = [f"claim {i} {_text(rng, 3)}" for i in range(ref.NUM_CLAIMS)]
        anchors = sorted(rng.randrange(len(response)) for _ in range(3))
        chosen = rng.sample(range(ref.NUM_CLAIMS), 3)
        want = ref.anchored_sequences(prompt, response, anchors, claims, chosen)
        assert [anchor_query(prompt, response, p, claims[c]) for p, c in zip(anchors, chosen)] == want


def test_decisions_match_vllm_greedy_over_the_allowed_ids():
    """vppo reads only the allowed rows of the LM head; the code's vLLM call masks the full logits and takes the
    argmax. Integer-valued logits make ties frequent: both give them to the smaller token id."""
    rng = np.random.default_rng(3)
    ties = 0
    for _ in range(N_CASES):
        V, H, N = int(rng.integers(12, 40)), int(rng.integers(1, 6)), int(rng.integers(1, 6))
        allowed = rng.choice(V, size=int(rng.integers(2, min(V, 10) + 1)), replace=False).tolist()
        half = len(allowed) // 2
        yes, no = allowed[:half], allowed[half:]
        hidden = torch.from_numpy(rng.integers(-2, 3, size=(N, H)).astype(np.float32))
        weight = torch.from_numpy(rng.integers(-2, 3, size=(V, H)).astype(np.float32))
        got = anchor_decisions(hidden, weight, yes, no)
        logits = (hidden @ weight.T).numpy()
        order = yes + no  # the code's list: yes ids, then no ids
        tokens = [ref.greedy_allowed_token(row, order) for row in logits]
        assert got.tolist() == [bool(x) for x in ref.predicted_labels(tokens, order)]
        ties += sum(int((row[order] == row[order].max()).sum() > 1) for row in logits)
    assert ties > 50


def test_perception_score_matches_eq4_of_the_code():
    rng = np.random.default_rng(4)
    for _ in range(N_CASES):
        n, k = int(rng.integers(1, 6)), int(rng.integers(0, 21))
        lengths = rng.integers(1, 500, size=n)
        positions = np.stack([np.sort(rng.integers(0, L, size=k)) for L in lengths])
        correct = rng.random((n, k)) < rng.random()
        got = anchor_perception_score(
            torch.from_numpy(correct), torch.from_numpy(positions), torch.from_numpy(lengths), beta=1.5
        )
        want = [ref.anchor_reward("x" * int(L), c, p) for L, c, p in zip(lengths, correct, positions)]
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-12)


def test_rewards_match_compute_score():
    rng = np.random.default_rng(5)
    for _ in range(N_CASES):
        n = int(rng.integers(1, 9))
        acc, fmt, p = rng.integers(0, 2, n).astype(float), rng.integers(0, 2, n).astype(float), rng.random(n)
        fw, aw = float(rng.choice([0.1, 0.0, 0.2])), float(rng.choice([0.1, 0.0, 0.3]))
        got = vapo_rewards(torch.tensor(acc), torch.tensor(fmt), torch.tensor(p), format_weight=fw, anchor_weight=aw)
        want = [ref.overall(a, f, s, fw, aw) for a, f, s in zip(acc, fmt, p)]
        np.testing.assert_allclose(got.numpy(), want, rtol=0, atol=1e-15)
    # anchor_weight 0 is the code's branch without anchors (the published run's reward)
    got = vapo_rewards(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), torch.ones(3), anchor_weight=0)
    assert got.tolist() == pytest.approx([ref.overall(1, 1, None), ref.overall(0, 1, None), ref.overall(1, 0, None)])


def test_label_of_the_chosen_claim():
    """Deliberate difference: vppo compares anchor j with the label of the claim it asked (``chosen[j]``); the code
    with ``label_{j+1}``. The same when the claims are taken in order; with the 7B script's k = 20 = all claims the
    code's draw is a permutation, so its labels are those of other claims."""
    rng = np.random.default_rng(6)
    differs = 0
    for _ in range(N_CASES):
        k = int(rng.integers(1, 21))
        labels = [["CORRECT" if x else "WRONG" for x in rng.random(ref.NUM_CLAIMS) < 0.5]]
        chosen = rng.choice(ref.NUM_CLAIMS, size=k, replace=False)
        pred = rng.integers(0, 2, size=k)
        ours = [bool(p == (labels[0][c] == "CORRECT")) for p, c in zip(pred, chosen)]
        in_order = ref.anchor_correct(pred, labels, k)[0].tolist()
        assert ours == in_order or list(chosen) != list(range(k))
        as_chosen = ref.anchor_correct(pred, [[labels[0][c] for c in chosen]], k)[0].tolist()
        assert ours == as_chosen  # the code's comparison once its labels follow the draw
        differs += ours != in_order
    assert differs > 50


def test_hand_worked_eq4_and_reward():
    """Two anchors at p/ℓ = 0 and 1, β = 1.5: weights 1 and e^1.5 = 4.48169."""
    pos, length = torch.tensor([[0, 10], [0, 10], [0, 10]]), torch.tensor([10, 10, 10])
    correct = torch.tensor([[True, False], [False, True], [True, True]])
    s = anchor_perception_score(correct, pos, length, beta=1.5)
    e = math.exp(1.5)
    # [1, 0]: 1/(1+e) = 0.18243 < 0.5 -> 0; [0, 1]: e/(1+e) = 0.81757 -> 0.63514; all correct -> 1
    assert s.tolist() == pytest.approx([0.0, 2 * e / (1 + e) - 1, 1.0], abs=1e-12)
    assert s[1].item() == pytest.approx(0.635149, abs=1e-6)
    # reward: 0.8·acc + 0.1·format + 0.1·1[acc = 1]·s
    r = vapo_rewards(torch.tensor([1.0, 0.0, 1.0]), torch.tensor([1.0, 1.0, 0.0]), s)
    assert r.tolist() == pytest.approx([0.9, 0.1, 0.9], abs=1e-12)  # s = 0; acc = 0 drops s; 0.8 + 0.1·1
    r = vapo_rewards(torch.tensor([1.0]), torch.tensor([1.0]), s[1:2])
    assert r.item() == pytest.approx(0.9 + 0.1 * 0.635149, abs=1e-6)
    # the weights grow with the position: a late correct anchor outweighs an early one
    late = anchor_perception_score(torch.tensor([[0, 0, 1]]), torch.tensor([[0, 5, 9]]), torch.tensor([10]))
    early = anchor_perception_score(torch.tensor([[1, 0, 0]]), torch.tensor([[0, 5, 9]]), torch.tensor([10]))
    w = [1.0, math.exp(0.75), math.exp(1.35)]  # 1, 2.117, 3.857: the last anchor's share 0.5531 > 0.5
    assert late.item() == pytest.approx(2 * w[2] / sum(w) - 1, abs=1e-12) and late.item() == pytest.approx(
        0.10616, abs=1e-5
    )
    assert early.item() == 0.0  # the first anchor's share 1/6.974 = 0.143, below chance


def test_argument_checks():
    with pytest.raises(ValueError):
        anchor_positions("a, b", 0, generator=torch.Generator())
    with pytest.raises(ValueError):
        anchor_decisions(torch.zeros(2, 3), torch.zeros(5, 3), [1], [1])
    with pytest.raises(ValueError):
        anchor_perception_score(torch.ones(2, 3), torch.ones(2, 3), torch.tensor([0, 4]))
    with pytest.raises(ValueError):
        vapo_rewards(torch.ones(2), torch.ones(3), torch.ones(2))
    assert anchor_perception_score(torch.ones(2, 0), torch.ones(2, 0), torch.tensor([1, 2])).tolist() == [0.0, 0.0]
