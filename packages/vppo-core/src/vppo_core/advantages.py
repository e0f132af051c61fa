"""Group-relative advantages and the online (dynamic-sampling) filter — ALGORITHMS.md §2; VAPO's perception reward
and its anchors — §9.12.

Responses are laid out group by group: the ``group_size`` responses of prompt 0, then those of prompt 1, ...
(the order `vppo_rollout.Rollouts` uses), so group ``g`` is ``rewards[g * G:(g + 1) * G]``.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor

__all__ = [
    "ANCHOR_SEPARATORS",
    "anchor_cutoffs",
    "anchor_decisions",
    "anchor_perception_score",
    "anchor_positions",
    "anchor_query",
    "anchor_think_span",
    "group_advantages",
    "keep_groups",
    "vapo_rewards",
]


def _grouped(values: Tensor, group_size: int, name: str) -> Tensor:
    """Check a per-response vector and view it as ``[B // G, G]``."""
    if not isinstance(values, Tensor):
        raise ValueError(f"{name} must be a torch.Tensor of shape [B], got {type(values).__name__}")
    if values.dim() != 1:
        raise ValueError(f"{name} must have shape [B] (one value per response), got shape {tuple(values.shape)}")
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size < 1:
        raise ValueError(f"group_size must be a positive int, got {group_size!r}")
    if values.numel() % group_size != 0:
        raise ValueError(
            f"group_size={group_size} does not divide the number of responses in {name} ({values.numel()}); "
            "pass all G responses of every prompt, grouped prompt by prompt"
        )
    if values.is_floating_point() and not bool(torch.isfinite(values).all()):
        raise ValueError(f"{name} contains NaN or inf; fix the reward function or filter those responses first")
    return values.reshape(-1, group_size)


def group_advantages(rewards: Tensor, group_size: int, *, eps: float = 1e-6) -> Tensor:
    """GRPO outcome advantage, ``A_i = (R_i − mean_g R) / (std_g R + eps)`` with the unbiased (n−1) std (§2).

    Args:
        rewards: ``[B]`` float (or int/bool) — one scalar reward per response, grouped prompt by prompt.
        group_size: G, the number of responses per prompt; must divide B and be ≥ 2 (the unbiased std of one
            sample is undefined).
        eps: added to the std; must be > 0.

    Returns:
        ``[B]`` advantages, float32 (float64 if ``rewards`` is float64).

    A group whose rewards are all identical gets advantage exactly 0 (not ``rounding_error / eps``): such a group
    carries no learning signal, and the online filter (`keep_groups`) usually drops it anyway.
    """
    grouped = _grouped(rewards, group_size, "rewards")
    if group_size < 2:
        raise ValueError("group_size must be ≥ 2: GRPO's unbiased std needs at least two responses per prompt")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps!r}")
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    grouped = grouped.to(dtype)
    mean = grouped.mean(dim=1, keepdim=True)
    std = grouped.std(dim=1, keepdim=True, unbiased=True)
    adv = (grouped - mean) / (std + eps)
    # mean() of identical floats can differ from them by one ulp; dividing that by eps would invent a signal.
    identical = grouped.amax(dim=1, keepdim=True) == grouped.amin(dim=1, keepdim=True)
    adv = torch.where(identical, torch.zeros_like(adv), adv)
    return adv.reshape(-1)


def keep_groups(accuracy: Tensor, group_size: int, low: float = 0.01, high: float = 0.99) -> Tensor:
    """DAPO dynamic-sampling filter: keep a group iff ``low < mean_g(accuracy) < high`` (strict), §2.

    Args:
        accuracy: ``[B]`` float/int/bool — per-response accuracy (usually 0/1), grouped prompt by prompt.
        group_size: G; must divide B.
        low, high: the open interval the group mean must fall in; ``low < high``.

    Returns:
        ``[B // G]`` bool — True for the groups to keep. ``keep.repeat_interleave(G)`` gives the per-response mask.
    """
    grouped = _grouped(accuracy, group_size, "accuracy")
    if not low < high:
        raise ValueError(f"low must be < high, got low={low!r}, high={high!r}")
    mean = grouped.to(torch.float64).mean(dim=1)
    return (mean > low) & (mean < high)


# VAPO (§9.12): the characters after which an anchor may be placed (`_find_cutoff_positions`' separators).
ANCHOR_SEPARATORS = (",", ".", "\n", "!", "?", ";", ":")


def anchor_think_span(response: str) -> str:
    """VAPO's reasoning span of a decoded response (§9.12): the text before the first ``</think>``; without one,
    before the first ``\\boxed``; without either, the whole response."""
    end = response.find("</think>")
    if end == -1:
        end = response.find("\\boxed")
    return response if end == -1 else response[:end]


def anchor_cutoffs(
    think: str, *, max_pos: int | None = None, separators: Sequence[str] = ANCHOR_SEPARATORS, min_sep: int = 2
) -> list[int]:
    """VAPO's candidate anchor positions (§9.12): the character indices ``p < max_pos`` of ``think`` holding a
    separator, scanned left to right, each kept only if ``p − (last kept) ≥ min_sep`` (the first is kept when
    ``p ≥ 0``, i.e. always). ``max_pos`` None: ``len(think)``. Returns the kept indices, increasing."""
    if isinstance(min_sep, bool) or not isinstance(min_sep, int) or min_sep < 0:
        raise ValueError(f"min_sep must be an int >= 0, got {min_sep!r}")
    limit = len(think) if max_pos is None else max_pos
    chars = set(separators)
    kept, last = [], -min_sep - 1
    for pos, char in enumerate(think[: max(limit, 0)]):
        if char in chars and pos - last >= min_sep:
            kept.append(pos)
            last = pos
    return kept


def anchor_positions(
    response: str, k: int, *, generator: torch.Generator, num_tokens: int = 0, token_limit: int = 6000,
    tail_buffer: int = 128, separators: Sequence[str] = ANCHOR_SEPARATORS, min_sep: int = 2,
) -> list[int]:  # fmt: skip
    """VAPO's k anchor positions in one decoded response (§9.12), character indices, sorted.

    The candidates are `anchor_cutoffs` of `anchor_think_span(response)`, searched up to ``len(think) − tail_buffer``
    when ``num_tokens > token_limit`` (``num_tokens``: the sequence's prompt + response tokens, the public code's
    attention-mask sum), else the whole span. With ``n ≥ k`` candidates: a uniformly random k-subset (without
    replacement, from ``generator``), sorted; with ``0 < n < k``: all of them, then the last repeated; with none:
    ``len(response) − 1``, k times.
    """
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    think = anchor_think_span(response)
    max_pos = len(think) - tail_buffer if num_tokens > token_limit else len(think)
    cut = anchor_cutoffs(think, max_pos=max_pos, separators=separators, min_sep=min_sep)
    if not cut:
        return [len(response) - 1] * k
    if len(cut) < k:
        return cut + [cut[-1]] * (k - len(cut))
    chosen = torch.randperm(len(cut), generator=generator)[:k].tolist()
    return sorted(cut[i] for i in chosen)


def anchor_query(prompt: str, response: str, position: int, claim: str) -> str:
    """The text VAPO's policy answers at one anchor (§9.12): the chat prompt, the response up to and including the
    character at ``position``, then ``"\\n<anchor>{claim} Is this claim correct? Answer (Yes/No): "``. The next
    token, greedy over the yes / no tokens (`anchor_decisions`), is the policy's verdict on the claim."""
    return f"{prompt}{response[: position + 1]}\n<anchor>{claim} Is this claim correct? Answer (Yes/No): "


def anchor_decisions(hidden: Tensor, weight: Tensor, yes_ids: Sequence[int], no_ids: Sequence[int]) -> Tensor:
    """VAPO's verdicts (§9.12): the greedy next token restricted to ``yes_ids ∪ no_ids`` (vLLM's
    ``allowed_token_ids`` with temperature 0: every other logit −inf, then argmax; a tie goes to the smaller token
    id), True where it is a yes token.

    hidden: ``[B, H]`` the last hidden state at each query's last position. weight: ``[V, H]`` the LM-head weight
    (only the allowed rows are read: ``[B, |allowed|]`` logits, never ``[B, V]``). Returns ``[B]`` bool.
    The temperature does not change an argmax, so none is taken.
    """
    yes, no = [int(i) for i in yes_ids], [int(i) for i in no_ids]
    if not yes or not no or set(yes) & set(no):
        raise ValueError(f"yes_ids and no_ids must be non-empty and disjoint, got {yes} and {no}")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden must be [B, H] and weight [V, H], got {tuple(hidden.shape)}, {tuple(weight.shape)}")
    allowed = sorted(set(yes) | set(no))  # ascending ids: argmax's first maximum is the smallest id
    ids = torch.tensor(allowed, device=weight.device)
    logits = hidden.float() @ weight.index_select(0, ids).float().T
    best = ids[logits.argmax(dim=-1)]
    return torch.isin(best, torch.tensor(yes, device=weight.device))


def anchor_perception_score(correct: Tensor, positions: Tensor, lengths: Tensor, *, beta: float = 1.5) -> Tensor:
    """VAPO's perception score per response (§9.12, the paper's Eq. 4 and the chance rescaling of its reward code):
    ``s = Σ_j c_j·e^{β·p_j/ℓ} / Σ_j e^{β·p_j/ℓ}``, returned as ``max((s − 0.5)/0.5, 0)`` in [0, 1].

    correct: ``[B, K]`` bool / 0-1, the policy's verdict on anchor j agrees with the claim's label. positions:
    ``[B, K]`` the anchors' character positions. lengths: ``[B]`` the responses' character lengths (> 0).
    K = 0 gives 0 (no anchor). Returns ``[B]`` float64.
    """
    if correct.dim() != 2 or positions.shape != correct.shape or lengths.shape != correct.shape[:1]:
        raise ValueError(
            f"correct and positions must be [B, K] and lengths [B]; got {tuple(correct.shape)}, "
            f"{tuple(positions.shape)}, {tuple(lengths.shape)}"
        )
    if correct.shape[1] == 0:
        return torch.zeros(correct.shape[0], dtype=torch.float64, device=correct.device)
    if not bool((lengths > 0).all()):
        raise ValueError("every response length must be > 0 (an anchor sits on one of its characters)")
    w = torch.exp(beta * positions.double() / lengths.double()[:, None])
    s = (correct.double() * w).sum(1) / w.sum(1)
    return ((s - 0.5) / 0.5).clamp(min=0.0)


def vapo_rewards(
    accuracy: Tensor, format: Tensor, perception: Tensor, *, format_weight: float = 0.1, anchor_weight: float = 0.1
) -> Tensor:
    """VAPO's reward (§9.12): ``(1 − w_f − w_a)·acc + w_f·format + w_a·1[acc = 1]·perception``, all ``[B]``; the
    perception term counts only for correct responses. Returns ``[B]`` float64 (the group advantages take it)."""
    if not (accuracy.shape == format.shape == perception.shape) or accuracy.dim() != 1:
        raise ValueError(
            f"accuracy, format and perception must all be [B]; got {tuple(accuracy.shape)}, {tuple(format.shape)}, "
            f"{tuple(perception.shape)}"
        )
    acc = accuracy.double()
    bonus = torch.where(acc == 1.0, perception.double(), torch.zeros_like(acc))
    return (1.0 - format_weight - anchor_weight) * acc + format_weight * format.double() + anchor_weight * bonus
