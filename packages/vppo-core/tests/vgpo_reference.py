"""Transcription of VGPO's arithmetic, for the side-by-side test ``test_vgpo_reference.py`` (ALGORITHMS.md §9.9).

Two public sources, each transcribed in its own operation order, with its epsilons, loops, ``.item()`` round trips,
clamps and dtypes. Our own code, not a copy: logging, metrics, config plumbing and the FSDP / DataProto parts are
left out; the steps that matter are kept line for line.

Official code: ``wzb-bupt/VGPO`` at commit ``d773c71d6c31a1019a4ec663474e080d134c6dd2`` (2026-04-14, "update
README.md"), read from a local snapshot with ``git show``:

* ``verl/workers/actor/dp_actor.py``: ``DataParallelPPOActor._compute_visual_attention_weights`` (lines 89-208),
  ``_compute_visual_compensation_factor`` (211-286), ``_forward_micro_batch`` (289-508: the padding-free path pads
  the last hidden state back with zeros, ``prompt_length = input_ids.size(1) - response_length``), and the VGPO block
  of ``update_policy`` (572-1006: from "Token-Level Visual Weighting" at 623, the intra-trajectory weights, the gate,
  the min-max, the factor clamp at 753, then the inter-trajectory factors with
  ``rollout_n = getattr(self.config, 'rollout_n', 8)`` at 959, then ``advantages * inter`` and ``* intra`` at 1006,
  before ``compute_policy_loss`` at 1010).
* ``verl/trainer/core_algos.py``: ``compute_trajectory_visual_weighting`` (lines 372-475).
* ``train_vgpo_7B.sh``: β 0.3, γ (start ratio) 0.5, κ 0.2, all four switches true.

Fork: ``zsxm1998/awesome-perception-aware-rlvr``, ``verl/trainer/perception_reasoning_loss.py`` at commit
``160666da5d81cbe043d31e63fba6862187df8177``, ``compute_vgpo_advantage_factors`` (read_file page 48000), and its test
``tests/test_vgpo.py@69f023215cf228afc7e2ac3f3292bf662092f51e``.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

# ------------------------------------------------------------------------------------------------ official (d773c71)


def official_visual_attention_weights(hidden_states, input_ids, response_length, prompt_length, image_token_id):
    """``_compute_visual_attention_weights``: cosine of each response position's last hidden state to the mean
    hidden state of the row's image tokens, stored as ``torch.tensor(..., dtype=hidden_states.dtype)``, then one
    min-max over the whole micro-batch (every response position is "valid": ``gen_pos < seqlen`` always holds)."""
    batch_size = hidden_states.size(0)
    weights = []
    for b in range(batch_size):
        visual_positions = (input_ids[b] == image_token_id).nonzero(as_tuple=True)[0]
        if len(visual_positions) == 0:
            weights.append([0.0] * response_length)
            continue
        visual_hidden_mean = hidden_states[b, visual_positions, :].mean(dim=0)
        row = []
        for gen_idx in range(response_length):
            gen_pos = prompt_length + gen_idx
            if gen_pos >= hidden_states.size(1):
                row.append(0.0)
                continue
            gen_hidden = hidden_states[b, gen_pos, :]
            row.append(F.cosine_similarity(gen_hidden.unsqueeze(0), visual_hidden_mean.unsqueeze(0), dim=1).item())
        weights.append(row)
    weights = torch.tensor(weights, device=hidden_states.device, dtype=hidden_states.dtype)
    valid_mask = torch.ones_like(weights, dtype=torch.bool)  # gen_pos < seqlen for every response position
    valid = torch.masked_select(weights, valid_mask)
    global_min, global_max = valid.min(), valid.max()
    weights = (weights - global_min) / (global_max - global_min + 1e-8)
    weights[~valid_mask] = 0.0
    return weights


def official_compensation_factor(response_mask, strength=0.5, start_ratio=0.0):
    """``_compute_visual_compensation_factor`` with ``modulation_type="linear"`` (the default and the script's)."""
    batch_size, response_length = response_mask.shape
    compensation = torch.zeros_like(response_mask, dtype=torch.float32)
    positions = torch.arange(response_length, device=response_mask.device, dtype=torch.float32)
    positions = positions.unsqueeze(0).expand(batch_size, -1)
    for b in range(batch_size):
        valid_mask = response_mask[b].bool()
        if not valid_mask.any():
            continue
        valid_positions = positions[b, valid_mask]
        max_pos = valid_positions.max().item() if valid_positions.numel() > 0 else 1.0
        min_pos = valid_positions.min().item() if valid_positions.numel() > 0 else 0.0
        pos_range = max_pos - min_pos + 1e-8
        normalized_pos = (valid_positions - min_pos) / pos_range
        start_mask = normalized_pos >= start_ratio
        if start_mask.any():
            mod_pos = (normalized_pos[start_mask] - start_ratio) / (1.0 - start_ratio + 1e-8)
            comp_values = strength * mod_pos
            compensation[b, valid_mask] = torch.where(start_mask, comp_values, torch.zeros_like(comp_values))
    return compensation


def official_trajectory_weighting(visual_weights, response_mask, rollout_n=1, clamp_min=0.9, clamp_max=2.0):
    """``core_algos.compute_trajectory_visual_weighting`` (normalization "minmax"): ϕ_i = Σ w over valid tokens, then
    per run of ``rollout_n`` adjacent rows (or the whole batch when it has fewer rows) α = clamp(1 + ŝ − mean ŝ);
    rows past the last whole run keep 1."""
    batch_size, _ = visual_weights.shape
    factors = torch.ones(batch_size, device=visual_weights.device, dtype=torch.float32)
    scores = []
    for b in range(batch_size):
        valid_mask = response_mask[b].bool()
        if not valid_mask.any():
            scores.append(0.0)
            continue
        scores.append(visual_weights[b, valid_mask].sum().item())
    scores = torch.tensor(scores, device=visual_weights.device, dtype=torch.float32)
    if rollout_n > 1 and batch_size >= rollout_n:
        for g in range(batch_size // rollout_n):
            start, end = g * rollout_n, (g + 1) * rollout_n
            group = scores[start:end]
            normalized = (group - group.min()) / (group.max() - group.min() + 1e-8)
            factors[start:end] = torch.clamp(1.0 + (normalized - normalized.mean()), min=clamp_min, max=clamp_max)
    else:
        normalized = (scores - scores.min()) / (scores.max() - scores.min() + 1e-8)
        factors = torch.clamp(1.0 + (normalized - normalized.mean()), min=clamp_min, max=clamp_max)
    return factors


def official_intra_weights(visual_attention_weights, response_mask, strength=0.3, gate_start=0.5, gate_top=0.2,
                           compensation=True, gated=True):  # fmt: skip
    """The intra-trajectory block of ``update_policy``: w = weights·(1 + gate·compensation), per-row min-max (ŵ),
    ψ = clamp(1 + ŵ − mean ŵ, 0.1, 2) with 1 on padding. Returns (ψ, ŵ, gating factors or None)."""
    mask = response_mask.bool()
    intra = visual_attention_weights.clone()
    intra[~mask] = 0.0
    gating = None
    if compensation:
        comp = official_compensation_factor(response_mask, strength=strength, start_ratio=0.0)
        if gated:
            gating = torch.zeros_like(intra, dtype=torch.float32)
            for b in range(intra.size(0)):
                valid_mask = mask[b]
                if valid_mask.any():
                    valid_weights = intra[b, valid_mask]
                    if valid_weights.numel() > 0:
                        num_valid = valid_weights.numel()
                        start_idx = int(num_valid * gate_start)
                        if start_idx < num_valid:
                            range_weights = valid_weights[start_idx:]
                            num_range = len(range_weights)
                            if num_range > 0:
                                num_top_k = max(1, int(num_range * gate_top))
                                sorted_weights, _ = torch.sort(range_weights, descending=True)
                                threshold_value = sorted_weights[num_top_k - 1]
                                range_top_k_mask = range_weights >= threshold_value
                                valid_indices = torch.nonzero(valid_mask).squeeze(-1)
                                gating[b, valid_indices[start_idx:]] = range_top_k_mask.to(gating.dtype)
            intra = intra * (1.0 + gating * comp)
        else:
            intra = intra * (1.0 + comp)
    for b in range(intra.size(0)):
        valid_mask = mask[b]
        if valid_mask.any():
            valid_weights = intra[b, valid_mask]
            w_min, w_max = valid_weights.min(), valid_weights.max()
            intra[b, valid_mask] = (valid_weights - w_min) / (w_max - w_min + 1e-8)
    intra[~mask] = 0.0
    factors = torch.ones_like(intra)
    for b in range(intra.size(0)):
        valid_mask = mask[b]
        if valid_mask.any():
            valid_weights = intra[b, valid_mask]
            factors[b, valid_mask] = 1.0 + (valid_weights - valid_weights.mean())
    factors = torch.clamp(factors, min=0.1, max=2.0)
    factors[~mask] = 1.0
    return factors, intra, gating


def official_advantage_factors(hidden_states, input_ids, response_mask, image_token_id, *, strength=0.3,
                               gate_start=0.5, gate_top=0.2, rollout_n=8):  # fmt: skip
    """One update micro-batch of the released code with the script's switches (intra, inter, compensation, gate all
    on): the factor each token's advantage is multiplied by, ``inter[:, None] * intra``. ``hidden_states`` is the
    padded-back last hidden state (zeros where ``attention_mask`` is 0, as the padding-free path leaves them)."""
    response_length = response_mask.shape[1]
    prompt_length = input_ids.size(1) - response_length
    weights = official_visual_attention_weights(hidden_states, input_ids, response_length, prompt_length,
                                                image_token_id)  # fmt: skip
    intra, w_hat, _ = official_intra_weights(weights, response_mask, strength, gate_start, gate_top)
    inter = official_trajectory_weighting(w_hat, response_mask, rollout_n=rollout_n)
    return inter.unsqueeze(1) * intra


# ------------------------------------------------------------------------------------------------ fork (160666d)

FORK_TOKEN_FACTOR_RANGE = (0.1, 2.0)
FORK_RESPONSE_FACTOR_RANGE = (0.9, 2.0)


def fork_vgpo_advantage_factors(cosine, response_mask, uids, compensation_strength=0.3, gate_tail_ratio=0.5,
                                gate_top_ratio=0.2, score_offset="official", trajectory_score="compensated"):  # fmt: skip
    """PRL ``compute_vgpo_advantage_factors`` without its metrics: f_inter(response) · f_intra(token)."""
    mask = response_mask.to(torch.bool)
    cosine = cosine.float()
    if score_offset == "official":
        valid = cosine[mask]
        offset = min(0.0, valid.min().item()) if valid.numel() > 0 else 0.0
    else:
        offset = -1.0
    rho = (cosine - offset).masked_fill(~mask, 0.0)
    batch_size, response_length = rho.shape
    lengths = mask.sum(-1)
    positions = torch.arange(response_length, device=rho.device).unsqueeze(0).expand(batch_size, -1)
    span = (lengths - 1).clamp_min(0).float().unsqueeze(-1) + 1e-8
    compensation = compensation_strength * (positions.float() / span) / (1.0 + 1e-8)
    start = torch.floor(lengths.double() * (1.0 - gate_tail_ratio)).long()
    tail = mask & (positions >= start.unsqueeze(-1))
    num_tail = tail.sum(-1)
    k = torch.floor(num_tail.double() * gate_top_ratio).long().clamp_min(1)
    sorted_tail = rho.masked_fill(~tail, float("-inf")).sort(dim=-1, descending=True).values
    threshold = sorted_tail.gather(-1, (k - 1).clamp_max(response_length - 1).unsqueeze(-1))
    gate = tail & (rho >= threshold) & (num_tail > 0).unsqueeze(-1)
    weights = (rho * (1.0 + gate.float() * compensation)).masked_fill(~mask, 0.0)
    big = torch.finfo(torch.float32).max
    w_min = weights.masked_fill(~mask, big).min(dim=-1, keepdim=True).values
    w_max = weights.masked_fill(~mask, -big).max(dim=-1, keepdim=True).values
    w_hat = ((weights - w_min) / (w_max - w_min + 1e-8)).masked_fill(~mask, 0.0)
    w_mean = w_hat.sum(-1, keepdim=True) / lengths.clamp_min(1).unsqueeze(-1)
    intra = torch.clamp(1.0 + w_hat - w_mean, *FORK_TOKEN_FACTOR_RANGE).masked_fill(~mask, 1.0)
    scores = (w_hat if trajectory_score == "compensated" else weights).sum(-1)
    _, group = np.unique(np.asarray(uids).astype(str), return_inverse=True)
    group = torch.as_tensor(group.reshape(-1), device=rho.device)
    num_groups = int(group.max()) + 1 if batch_size > 0 else 0
    group_min = torch.full((num_groups,), big, device=rho.device).scatter_reduce(0, group, scores, "amin")
    group_max = torch.full((num_groups,), -big, device=rho.device).scatter_reduce(0, group, scores, "amax")
    normalized = (scores - group_min[group]) / (group_max[group] - group_min[group] + 1e-8)
    group_sum = torch.zeros(num_groups, device=rho.device).index_add(0, group, normalized)
    group_size = torch.zeros(num_groups, device=rho.device).index_add(0, group, torch.ones_like(normalized))
    inter = torch.clamp(1.0 + normalized - (group_sum / group_size)[group], *FORK_RESPONSE_FACTOR_RANGE)
    return inter.unsqueeze(-1) * intra
