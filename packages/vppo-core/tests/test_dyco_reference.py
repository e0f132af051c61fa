"""DyCo-RL (ALGORITHMS.md §9.13) side by side with the transcription of its public code (tests/dyco_reference.py,
Sammy20207109/DyCo-RL@c73247f), plus hand-worked cases from the paper's equations and bad-input errors.

The official pipeline is run on what its generation loop sees: one attention tensor [B, H, q, P + t] of the last
layer per decoding step (the prefill first); vppo's on the same rows as one [B, T, K] tensor (each step's row
averaged over heads and queries, zero beyond its keys). Deliberate differences (each shown here):

* z-score set: per group of responses to one prompt (`group`); the official code z-scores over the batch of one
  `generate` call, which in the published layout (per-device batch 4 = num_generations 4) is one group. Shown:
  two groups in vppo = the official code run on each group's batch.
* steps counted: vppo counts the response's own steps (`valid`); the official code counts every decoding step of
  the call, also those after a response ended (padding). Shown: equal on full-length responses, and a shorter
  response's score = the official one of its own steps.
* precision: the score and the z-score in float64 (official float32); z agrees to float32 rounding divided by the
  group's std (`_z_atol`).
* the short-response bound is the setting `min_length` (official: 150 when the model has more than 5e9 parameters,
  else 60); shown for both.
* image region per row (the official code takes the batch's first image pad of its first row and last image pad
  of its last row for every row; equal on the published one-prompt batches); the rows come
  from a teacher-forced forward (step 0: the causal mean over the real prompt queries; official: its patched flash
  forward's unmasked softmax over every prompt query and key, padding included), in float32 (official: bf16
  weights). These are outside vppo-core's functions: the recorder is checked against transformers' eager attention
  in the whole-step test (packages/vppo-recipes/tests/plain_dyco.py).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch

from vppo_core import dyco_advantage_weights, dyco_attention_signals, dyco_response_scores, fisher_rao_distance

sys.path.insert(0, str(Path(__file__).parent))
from dyco_reference import batched_m_fr, reweighted_advantages, sample_scores

N_RANDOM = 200


def _z_atol(raw: torch.Tensor) -> float:
    """How far the official float32 z-score can be from vppo's float64 one: a few float32 ulps of the scores
    (~1e-7 at 0.7) divided by the group's std (z = tanh((x − mean)/std), tanh' ≤ 1)."""
    std = float(raw.double().std()) if raw.numel() > 1 else 1.0
    return 1e-5 + 1e-6 / max(std, 1e-12)


def _random_case(g: torch.Generator):
    B = int(torch.randint(2, 7, (1,), generator=g))
    H = int(torch.randint(1, 5, (1,), generator=g))
    P = int(torch.randint(8, 24, (1,), generator=g))
    T = int(torch.randint(2, 14, (1,), generator=g))
    img = int(torch.randint(1, P - 5, (1,), generator=g))
    qs = int(torch.randint(img + 2, P - 1, (1,), generator=g))
    scale = float(torch.empty(1).uniform_(0.5, 4.0, generator=g))
    steps = [torch.softmax(torch.randn(B, H, P, P, generator=g) * scale, -1)]  # the prefill (unmasked, official)
    steps += [torch.softmax(torch.randn(B, H, 1, P + t, generator=g) * scale, -1) for t in range(1, T)]
    return B, P, T, img, qs, steps


def _vppo_rows(steps, P: int, T: int) -> torch.Tensor:
    """[B, T, K] each step's head-and-query mean row, zero beyond its P + t keys (t >= 1; the prefill: P)."""
    K = P + T - 1
    rows = torch.zeros(steps[0].shape[0], T, K)
    for t, a in enumerate(steps):
        m = a.mean(dim=(1, 2))
        rows[:, t, : m.shape[1]] = m
    return rows


def _vppo_scores(steps, P, T, img, qs, valid=None, tau=0.05):
    rows = _vppo_rows(steps, P, T)
    B = rows.shape[0]
    sig = dyco_attention_signals(rows, (P + torch.arange(T)).expand(B, T), torch.full((B,), img), torch.full((B,), qs))
    if valid is None:
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[:, 0] = False
    return dyco_response_scores(sig["image_ratio"], sig["text_ratio"], sig["fr_image"], sig["fr_text"], valid, tau=tau)


def test_side_by_side_with_the_official_code_on_random_decoding_runs():
    g = torch.Generator().manual_seed(0)
    worst = 0.0
    for case in range(N_RANDOM):
        B, P, T, img, qs, steps = _random_case(g)
        raw = _vppo_scores(steps, P, T, img, qs)["score"]
        official_raw = sample_scores(steps, img, qs, zscore=False)
        assert torch.allclose(raw.float(), official_raw, atol=1e-5), case
        # the published layout: the generate call's batch is one group
        lengths = torch.randint(40, 200, (B,), generator=g)
        mask = (torch.arange(200)[None] < lengths[:, None]).int()
        adv = torch.randn(B, generator=g)
        official = sample_scores(steps, img, qs)
        for params, min_length in ((7e9, 150), (3e9, 60)):
            w = dyco_advantage_weights(raw, torch.zeros(B, dtype=torch.long), lengths, min_length=min_length)
            want = reweighted_advantages(adv, official, mask, params)
            gap = float((adv * w["weight"] - want).abs().max())
            worst = max(worst, gap)
            assert gap <= 0.2 * float(adv.abs().max()) * _z_atol(raw), case
    assert worst < 1e-3


def test_fisher_rao_equals_the_official_helper_on_random_vectors():
    g = torch.Generator().manual_seed(1)
    for _ in range(N_RANDOM):
        B, N = int(torch.randint(1, 6, (1,), generator=g)), int(torch.randint(1, 30, (1,), generator=g))
        a, b = torch.rand(B, N, generator=g) ** 3, torch.rand(B, N, generator=g) ** 3
        if bool(torch.rand(1, generator=g) < 0.2):
            a[:, : N // 2] = 0  # zeros go through the 1e-12 floor
        assert torch.allclose(fisher_rao_distance(a, b), batched_m_fr(a, b)[1], atol=1e-5)
        # a support mask = the official code on the cut vectors
        n = int(torch.randint(1, N + 1, (1,), generator=g))
        support = torch.arange(N) < n
        assert torch.allclose(fisher_rao_distance(a, b, support), batched_m_fr(a[:, :n], b[:, :n])[1], atol=1e-5)


def test_groups_are_z_scored_apart_as_the_official_code_does_per_generate_call():
    g = torch.Generator().manual_seed(2)
    for case in range(50):
        runs = [_random_case(g) for _ in range(2)]
        raws, officials = [], []
        for _, P, T, img, qs, steps in runs:
            raws.append(_vppo_scores(steps, P, T, img, qs)["score"])
            officials.append(sample_scores(steps, img, qs))
        group = torch.cat([torch.full((r.numel(),), i) for i, r in enumerate(raws)])
        length = torch.full_like(group, 500)
        z = dyco_advantage_weights(torch.cat(raws), group, length)["z"]
        for i, raw in enumerate(raws):
            assert torch.allclose(z[group == i], officials[i], atol=_z_atol(raw)), case


def test_a_shorter_response_scores_its_own_steps_only():
    """The official code would also count the steps after the response ended; vppo's `valid` stops at its end."""
    g = torch.Generator().manual_seed(3)
    for case in range(50):
        B, P, T, img, qs, steps = _random_case(g)
        if T < 4:
            continue
        n = int(torch.randint(2, T, (1,), generator=g))  # row 0 ends after n steps
        valid = torch.ones(B, T, dtype=torch.bool)
        valid[:, 0] = False
        valid[0, n:] = False
        ours = _vppo_scores(steps, P, T, img, qs, valid)["score"][0]
        own = [s[:1] for s in steps[:n]]
        assert torch.allclose(ours.float(), sample_scores(own, img, qs, zscore=False)[0], atol=1e-5), case


def test_hand_worked_fisher_rao():
    # p = (1/2, 1/2), q = (1, 0): BC = √½ → FR = 2·arccos(√½) = π/2 (the 1e-12 floor moves it by ~1e-6)
    fr = fisher_rao_distance(torch.tensor([[0.5, 0.5]]), torch.tensor([[1.0, 0.0]]))
    assert fr.item() == pytest.approx(math.pi / 2, abs=1e-5)
    # weights are normalised first: (2, 2) and (1, 1) are the same distribution
    assert fisher_rao_distance(torch.tensor([2.0, 2.0]), torch.tensor([1.0, 1.0])).item() == pytest.approx(0, abs=1e-3)
    # disjoint supports: BC = 0 → π
    fr = fisher_rao_distance(torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]))
    assert fr.item() == pytest.approx(math.pi, abs=1e-5)


def test_hand_worked_signals():
    # keys 0..5: image [1, 3), text from 3 to the step's end; step 0 sees 5 keys, step 1 six
    rows = torch.tensor([[[0.1, 0.2, 0.2, 0.3, 0.2, 0.0], [0.0, 0.4, 0.1, 0.1, 0.1, 0.3]]])
    sig = dyco_attention_signals(rows, torch.tensor([[5, 6]]), torch.tensor([1]), torch.tensor([3]))
    # ratios: step 0 image 0.4, text 0.5; step 1 image 0.5, text 0.5
    assert sig["image_ratio"][0].tolist() == pytest.approx([0.4, 0.5], abs=1e-6)
    assert sig["text_ratio"][0].tolist() == pytest.approx([0.5, 0.5], abs=1e-6)
    # image: (1/2, 1/2) → (4/5, 1/5): BC = √(2/5) + √(1/10) = 0.948683; FR = 2·arccos(BC) = 0.643501
    assert sig["fr_image"][0].tolist() == pytest.approx([0.0, 0.643501], abs=1e-5)
    # text over the keys both have, [3, 5): (3/5, 2/5) → (1/2, 1/2): BC = √0.3 + √0.2 = 0.994936 → 0.201358
    assert sig["fr_text"][0].tolist() == pytest.approx([0.0, 0.201358], abs=1e-5)


def test_hand_worked_scores_and_weights():
    # token 1: d = 1.0 − 0.5 > 0 → perception, s = 0.6/0.8 = 0.75; token 2: d = −0.02, inside the τ band → neutral;
    # token 3: d = −0.3 < −τ → reasoning, s = 0.6/0.8 = 0.75; token 0 is not valid. σ(0.75) = 0.679179
    ir = torch.tensor([[0.3, 0.6, 0.2, 0.2]])
    tr = torch.tensor([[0.3, 0.2, 0.6, 0.6]])
    fi = torch.tensor([[0.0, 1.0, 0.5, 0.2]])
    ft = torch.tensor([[0.0, 0.5, 0.52, 0.5]])
    valid = torch.tensor([[False, True, True, True]])
    out = dyco_response_scores(ir, tr, fi, ft, valid)
    assert out["score"].item() == pytest.approx(1 / (1 + math.exp(-0.75)), abs=1e-6)
    assert out["perception"].tolist() == [[False, True, False, False]]
    assert out["reasoning"].tolist() == [[False, False, False, True]]
    # no perception or reasoning token: 0.5
    assert dyco_response_scores(ir, tr, fi, ft, torch.zeros(1, 4, dtype=torch.bool))["score"].item() == 0.5
    # group (0.6, 0.7, 0.8): mean 0.7, std 0.1 → z = tanh(−1), 0, tanh(1); w = 1 + 0.2 z; the 4th response is
    # alone in its group (z = 0) and short (z = −1 → w = 0.8)
    w = dyco_advantage_weights(
        torch.tensor([0.6, 0.7, 0.8, 0.9]), torch.tensor([7, 7, 7, 9]), torch.tensor([200, 200, 200, 100])
    )
    t = math.tanh(1.0)
    assert w["z"].tolist() == pytest.approx([-t, 0.0, t, -1.0], abs=1e-5)
    assert w["weight"].tolist() == pytest.approx([1 - 0.2 * t, 1.0, 1 + 0.2 * t, 0.8], abs=1e-5)
    # a group without spread: z = 0 for all
    same = dyco_advantage_weights(torch.full((3,), 0.6), torch.zeros(3, dtype=torch.long), torch.full((3,), 500))
    assert same["z"].tolist() == [0.0, 0.0, 0.0]


def test_bad_inputs_name_the_argument():
    s = torch.rand(2, 3)
    with pytest.raises(ValueError, match="p and q"):
        fisher_rao_distance(torch.rand(2, 3), torch.rand(2, 4))
    with pytest.raises(ValueError, match="rows"):
        dyco_attention_signals(torch.rand(2, 3), torch.zeros(2, 3, dtype=torch.long), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="key_end"):
        dyco_attention_signals(torch.rand(2, 3, 4), torch.zeros(2, 2, dtype=torch.long), torch.zeros(2), torch.zeros(2))
    with pytest.raises(ValueError, match="fr_text"):
        dyco_response_scores(s, s, s, torch.rand(2, 4), torch.ones(2, 3))
    with pytest.raises(ValueError, match="tau"):
        dyco_response_scores(s, s, s, s, torch.ones(2, 3), tau=-1.0)
    with pytest.raises(ValueError, match="group and length"):
        dyco_advantage_weights(torch.rand(3), torch.zeros(2, dtype=torch.long), torch.zeros(3))
    with pytest.raises(ValueError, match="low"):
        dyco_advantage_weights(torch.rand(3), torch.zeros(3), torch.zeros(3), low=1.5, high=1.2)
