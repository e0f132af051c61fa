"""VAPO's part of the whole-step test (test_rl_step_independent.py), written plainly from ALGORITHMS.md §9.12 without
vppo-core's VAPO functions: the anchored query of each (row, anchor) built as a string, one unpadded row per forward,
the verdict as the argmax of the full logits over the allowed yes / no tokens, Eq. 4 as a loop, then the reward."""

from __future__ import annotations

import math

import torch

QUESTION = "\n<anchor>{} Is this claim correct? Answer (Yes/No): "
YES, NO = ("yes", "Yes", "True", "true", "1"), ("0", "no", "No", "False", "false")


def capture(recipe, mb, scores) -> dict | None:
    """What the plain computation needs of one VAPO micro-batch, as plain data (tensors, lists): per (row, anchor)
    the single-row inputs of its query; the recipe's verdicts, positions and perception; the asked claims' labels."""
    from vppo_rollout.collate import collate_rollout, model_inputs

    if "verdicts" not in scores:
        return None
    tok = recipe.processor.tokenizer
    rows = []
    for i, text in enumerate(mb.texts):
        queries = []
        for pos, c in zip(scores["positions"][i].tolist(), scores["asked"][i].tolist()):
            ids = tok.encode(text[: pos + 1] + QUESTION.format(mb.extra[i][f"claim_{c}"]), add_special_tokens=False)
            batch = collate_rollout(recipe.processor, [mb.prompts[i]], [ids], config=recipe.model_config)
            queries.append({k: v.cpu() for k, v in model_inputs(batch).items()})
        rows.append(queries)
    return {
        "queries": rows,
        "labels": [
            [mb.extra[i][f"label_{c}"] == "CORRECT" for c in row] for i, row in enumerate(scores["asked"].tolist())
        ],
        "lengths": [len(t) for t in mb.texts],
        "positions": scores["positions"].cpu(),
        "verdicts": scores["verdicts"].cpu(),
        "perception": scores["perception"].cpu(),
        "asked": scores["asked"].cpu(),
        "vocab": [tok.encode(w, add_special_tokens=False) for w in YES + NO],
    }


def perception(model, a, vapo: dict) -> list[float]:
    """P of every row of one micro-batch, plainly; checks the recipe's verdicts and P on the way."""
    k, claims = int(a.vapo_anchors), int(a.vapo_claims)
    single = [ids[0] if len(ids) == 1 else None for ids in vapo["vocab"]]
    yes = sorted({t for t in single[: len(YES)] if t is not None})
    allowed = sorted({t for t in single if t is not None})
    out = []
    for i, queries in enumerate(vapo["queries"]):
        asked = vapo["asked"][i].tolist()
        assert len(set(asked)) == k and all(1 <= c <= claims for c in asked), f"row {i} asks {asked}"
        numerator = denominator = 0.0
        for j, inputs in enumerate(queries):
            with torch.no_grad():
                logits = model(**inputs, use_cache=False).logits[0, -1].double()
            best = allowed[int(torch.stack([logits[t] for t in allowed]).argmax())]  # the first max: smallest id
            verdict = best in yes
            assert verdict == bool(vapo["verdicts"][i, j]), f"verdict of row {i} anchor {j}"
            w = math.exp(float(a.vapo_beta) * int(vapo["positions"][i, j]) / max(vapo["lengths"][i], 1))
            numerator += w * (verdict == vapo["labels"][i][j])
            denominator += w
        out.append(max((numerator / denominator - 0.5) / 0.5, 0.0))
    assert torch.allclose(torch.tensor(out, dtype=torch.float64), vapo["perception"].double(), atol=1e-12)
    return out


def rewards(a, accuracy: list[float], fmt: list[float], p: list[float]) -> list[float]:
    """(1 − w_f − w_a)·acc + w_f·format + w_a·[acc = 1]·P per response."""
    wf, wa = float(a.vapo_format_weight), float(a.vapo_anchor_weight)
    return [(1 - wf - wa) * x + wf * f + wa * (q if x == 1.0 else 0.0) for x, f, q in zip(accuracy, fmt, p)]
