"""Perceval's token advantages the plain way, for test_rl_step_independent.py (ALGORITHMS.md §9.14).

Written from the formula and the official code's description, not with vppo-core's functions: the scorer's flags
(the configured scorer: in the tiny config the stand-in), each located at its first occurrence in the response
text, its tokens found by scanning the tokenizer's offsets in order as Perceval's official position finder does,
then `Â − α·|Â|` on those tokens (the policy loss then takes these [B, L] advantages directly, with no token
weights: the recipe's form, `Â` with weights `1 − α·sign(Â)`, must give the same step).
"""

from __future__ import annotations

import torch


def _first_hit(offsets, ok, default):
    for i, (s, e) in enumerate(offsets):
        if ok(s, e):
            return i
    return default


def plain_flagged(text: str, flags: list[str], offsets: list[tuple[int, int]], length: int) -> list[bool]:
    out = [False] * length
    n = len(offsets)
    for flag in flags:
        c0 = text.find(flag)
        if c0 == -1:
            continue
        c1 = c0 + len(flag)
        start, end = None, None
        for i, (s, e) in enumerate(offsets):
            if start is None and s <= c0 < e:
                start = i
            if s < c1 <= e:
                end = i + 1
                break
            if s == c1:
                end = i
                break
        start = _first_hit(offsets, lambda s, e, c0=c0: s >= c0, n) if start is None else start
        end = _first_hit(offsets, lambda s, e, c1=c1: s >= c1, n) if end is None else end
        for t in range(start, min(end, length)):
            out[t] = True
    return out


def plain_perceval_advantages(cfg, warm, adv: torch.Tensor, mini: list[dict]) -> torch.Tensor:
    """[B, L] token advantages of a global mini-batch (its micro-batches' rows in order, zero-padded to the
    longest L), from the group advantages `adv` [B]."""
    from torchtune.config._utils import _get_component_from_path
    from transformers import AutoTokenizer

    from vppo_recipes.methods.perceval import PerceptionCheck

    tokenizer = AutoTokenizer.from_pretrained(warm)
    scorer = _get_component_from_path(cfg.algorithm.perceval_scorer)()
    alpha = float(cfg.algorithm.perceval_penalty)
    width = max(mb["mask"].shape[1] for mb in mini)
    rows = []
    for mb in mini:
        checks = [PerceptionCheck(q, "", [], t) for q, t in zip(mb["questions"], mb["texts"])]
        for text, flags, valid in zip(mb["texts"], scorer(checks), mb["mask"]):
            offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
            rows.append([bool(f) and bool(v) for f, v in zip(plain_flagged(text, list(flags), offsets, width),
                                                             list(valid) + [0] * width)])  # fmt: skip
    flagged = torch.tensor(rows)
    mask = torch.cat([torch.nn.functional.pad(mb["mask"], (0, width - mb["mask"].shape[1])) for mb in mini])
    token_adv = adv[:, None].expand(-1, width) * mask
    token_adv = torch.where(flagged, token_adv - alpha * token_adv.abs(), token_adv)
    assert flagged.any(), "no token flagged: the check would not test the penalty"
    return token_adv
