"""VGPO's focus and token weights the plain way (ALGORITHMS.md §9.9), for the whole-step test
(`test_rl_step_independent.py`): float64 Python loops over each response from the formulas, not vppo-core's
functions, over every row of the rollout batch at once (the response groups are the rows' prompts)."""

from __future__ import annotations

import torch


def plain_vgpo_focus(model, inputs, prompt_length: int, length: int, image_token_id: int) -> torch.Tensor:
    """cos(h_t, mean of the image tokens' h) of the last hidden state, at the response tokens' own positions P + t."""
    states = model.model(**inputs, use_cache=False).last_hidden_state.double()
    out = torch.zeros(states.shape[0], length, dtype=torch.float64)
    for b in range(states.shape[0]):
        prototype = states[b][inputs["input_ids"][b] == image_token_id].mean(0)
        for t in range(length):
            x = states[b, prompt_length + t]
            out[b, t] = (x @ prototype) / (x.norm() * prototype.norm())
    return out


def _clamp(x: float, low: float, high: float) -> float:
    return min(max(x, low), high)


def _minmax(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [(v - lo) / (hi - lo + 1e-8) for v in values]


def plain_vgpo_weights(focus: list[torch.Tensor], masks: list[torch.Tensor], uids: list[list[int]], a) -> list:
    """Token weights α_i·ψ_t ([b, L] per micro-batch, 0 on padding) from the focus of every micro-batch."""
    rows = []  # (micro-batch, row, the valid focus values)
    for i, (f, m) in enumerate(zip(focus, masks)):
        for r in range(m.shape[0]):
            n = int(m[r].sum())
            assert m[r, :n].all() and not m[r, n:].any(), "the response mask is a prefix"
            rows.append((i, r, [float(x) for x in f[r, :n]]))
    every = [x for _, _, s in rows for x in s]
    offset = -1.0 if a.vgpo_score_offset == "paper" else min(0.0, min(every))
    psi, phi = [], []
    for _, _, s in rows:
        n = len(s)
        rho = [x - offset for x in s]
        if a.vgpo_token_level and n:
            start = int(n * a.vgpo_gate_start)
            tail = rho[start:]
            gate = [True] * n
            if a.vgpo_gated:
                k = max(1, int(len(tail) * a.vgpo_gate_top))
                threshold = sorted(tail, reverse=True)[k - 1] if tail else float("inf")
                gate = [t >= start and rho[t] >= threshold for t in range(n)]
            beta = a.vgpo_compensation_strength
            w = [rho[t] * (1.0 + (beta * t / (n - 1) if gate[t] and n > 1 else 0.0)) for t in range(n)]
        else:
            w = rho
        w_hat = _minmax(w) if n else []
        mean = sum(w_hat) / n if n else 0.0
        psi.append([_clamp(1.0 + x - mean, 0.1, 2.0) if a.vgpo_token_level else 1.0 for x in w_hat])
        phi.append(sum(w_hat if a.vgpo_trajectory_score == "compensated" else w))
    prompt = [uids[i][r] for i, r, _ in rows]
    alpha = [1.0] * len(rows)
    if a.vgpo_response_level:
        for uid in set(prompt):
            members = [j for j, p in enumerate(prompt) if p == uid]
            s_hat = _minmax([phi[j] for j in members])
            mean = sum(s_hat) / len(members)
            for j, x in zip(members, s_hat):
                alpha[j] = _clamp(1.0 + x - mean, 0.9, 2.0)
    out = [torch.zeros(m.shape, dtype=torch.float32) for m in masks]
    for j, (i, r, _) in enumerate(rows):
        for t, x in enumerate(psi[j]):
            out[i][r, t] = alpha[j] * x
    return out
