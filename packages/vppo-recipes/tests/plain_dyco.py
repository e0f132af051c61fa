"""DyCo-RL's advantage factors the plain way, for the whole-step test (test_rl_step_independent.py).

The last layer's attention comes from transformers' own eager attention (`output_attentions=True`), not from the
method's recorder; the signals, roles, scores and the group z-score are plain loops over the formulas of
ALGORITHMS.md §9.13, written without vppo-core.
"""

from __future__ import annotations

import math

import torch

SIGNALS = ("image_ratio", "text_ratio", "fr_image", "fr_text")


def _eager_last_layer_attention(model, inputs) -> torch.Tensor:
    """[B, S, S] the last decoder layer's attention probabilities, averaged over heads (eager attention)."""
    configs = [m.config for m in model.modules() if hasattr(getattr(m, "config", None), "_attn_implementation")]
    before = [c._attn_implementation for c in configs]
    try:
        for c in configs:
            c._attn_implementation = "eager"
        out = model.model(**inputs, use_cache=False, output_attentions=True)
    finally:
        for c, impl in zip(configs, before):
            c._attn_implementation = impl
    return out.attentions[-1].double().mean(1)


def _fr(p: list[float], q: list[float]) -> float:
    sp, sq = sum(p), sum(q)
    bc = sum(math.sqrt(a / sp * b / sq) for a, b in zip(p, q))
    return 2.0 * math.acos(min(1.0, max(0.0, bc)))


def plain_signals(model, inputs, prompt_length: int, length: int, image_token_id: int) -> dict[str, torch.Tensor]:
    """{"image_ratio", "text_ratio", "fr_image", "fr_text"} [B, L] float64: step 0 is the mean row of the prompt's
    queries, step j >= 1 the row of the query at P + j − 1; the image region runs from the first image pad to the
    last (exclusive), the text region from the last image pad to the step's own position."""
    P = prompt_length
    with torch.no_grad():
        att = _eager_last_layer_attention(model, inputs)
    ids, keys = inputs["input_ids"], inputs["attention_mask"] > 0
    B = ids.shape[0]
    out = {k: torch.zeros(B, length, dtype=torch.float64) for k in SIGNALS}
    for b in range(B):
        prompt_rows = [i for i in range(P) if keys[b, i]]
        rows = [att[b, prompt_rows].mean(0)] + [att[b, P + j - 1] for j in range(1, length)]
        image = [i for i in range(ids.shape[1]) if ids[b, i] == image_token_id and keys[b, i]]
        first, last = image[0], image[-1]
        prev_img = prev_txt = None
        for j, row in enumerate(rows):
            r = row.tolist()
            total = sum(r)
            a = [x / total for x in r]
            end = P + j  # the step's keys: [0, P + j)
            img, txt = a[first:last], a[last:end]
            out["image_ratio"][b, j], out["text_ratio"][b, j] = sum(img), sum(txt)
            if j:
                out["fr_image"][b, j] = _fr(prev_img, img)
                n = len(prev_txt)  # the text keys both steps have
                out["fr_text"][b, j] = _fr(prev_txt, txt[:n])
            prev_img, prev_txt = img, txt
    return out


def plain_factors(flat: list[dict], cfg) -> list[torch.Tensor]:
    """The advantage factor [b] of every micro-batch (flat, data order), from its recorded signals ("scores") and
    the step's groups (by prompt number, over the whole step): roles, σ(mean score), group z-score, tanh, the short
    response rule, the clamp."""
    a = cfg.algorithm
    raw, lengths, uids = [], [], []
    for mb in flat:
        s, mask = mb["scores"], mb["mask"]
        for b in range(mask.shape[0]):
            values = []
            for t in range(1, mask.shape[1]):
                if mask[b, t] <= 0:
                    continue
                ir, tr = float(s["dyco_image_ratio"][b, t]), float(s["dyco_text_ratio"][b, t])
                d = float(s["dyco_fr_image"][b, t]) - float(s["dyco_fr_text"][b, t])
                total = max(ir + tr, 1e-8)
                if d > 0:
                    values.append(ir / total)
                elif d < -a.dyco_tau:
                    values.append(tr / total)
            raw.append(1.0 / (1.0 + math.exp(-sum(values) / len(values))) if values else 0.5)
            lengths.append(float(mask[b].sum()))
            uids.append(mb["uids"][b])
    z = []
    for i, u in enumerate(uids):
        members = [raw[j] for j in range(len(raw)) if uids[j] == u]
        n = len(members)
        mean = sum(members) / n
        std = math.sqrt(sum((x - mean) ** 2 for x in members) / (n - 1)) if n > 1 else 0.0
        zi = math.tanh((raw[i] - mean) / std) if std > 1e-8 else 0.0
        z.append(-1.0 if lengths[i] < a.dyco_min_length else zi)
    factors = [min(a.dyco_weight_high, max(a.dyco_weight_low, 1.0 + a.dyco_alpha * x)) for x in z]
    out, start = [], 0
    for mb in flat:
        b = mb["mask"].shape[0]
        out.append(torch.tensor(factors[start : start + b], dtype=torch.float32))
        start += b
    return out


def dyco_factors(model, cfg, minis: list[list[dict]]) -> list[torch.Tensor]:
    """Per global mini-batch, the advantage factors [rows] in row order, after checking the recipe's recorded
    signals against the plain eager-attention ones. The distances are compared as Bhattacharyya coefficients
    cos(FR/2): near identical distributions put the coefficient within float32 rounding of 1, where the arccos
    turns a 1e-7 rounding into ~1e-3 of distance (the official code computes in float32 too)."""
    image_token_id = int(model.config.image_token_id)
    flat = [mb for mini in minis for mb in mini]
    for mb in flat:
        L = mb["responses"].shape[1]
        want = plain_signals(model, mb["inputs"], mb["prompt_length"], L, image_token_id)
        valid = mb["mask"] > 0
        for k in SIGNALS:
            got, plain = mb["scores"][f"dyco_{k}"].double()[valid], want[k][valid]
            if k.startswith("fr_"):
                got, plain = torch.cos(got / 2), torch.cos(plain / 2)
            assert torch.allclose(got, plain, atol=1e-5), f"DyCo {k}: {(got - plain).abs().max():.3g}"
    factors = plain_factors(flat, cfg)
    out, start = [], 0
    for mini in minis:
        out.append(torch.cat(factors[start : start + len(mini)]))
        start += len(mini)
    return out
