"""The CPU demo's measurements of a checkpoint's sampled responses: their visual dependency
(`sample_and_measure`, `dependency_report`) and where answers and dependency sit (`response_anatomy`)."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from vppo_recipes.demo_report import _hint
from vppo_recipes.demo_settings import DemoSettings


@dataclasses.dataclass(frozen=True)
class SampledResponses:
    """Responses sampled from a checkpoint and their visual dependency (`sample_and_measure`).

    records: the prompts' records; rollouts: the sampler's output (2 per record); keep: indices of the non-empty
    responses, in rollout order; analysis: their `vppo_eval.report.DependencyAnalysis` (same order as keep).
    """

    records: list
    rollouts: Any
    keep: list[int]
    analysis: Any

    def record_of(self, i: int):
        return self.records[self.rollouts.group_index[i]]


def sample_and_measure(ckpt: Path, records: list, s: DemoSettings, *, samples: int = 2) -> SampledResponses:
    """Sample `samples` responses per record from `ckpt` (temperature 1.0, top-p 1.0, seed 0) and measure the
    visual dependency of each non-empty one (sampled-token estimator, blackened image, seed 0): deterministic."""
    import torch

    from vppo_eval.report import dependency_analysis
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.prompts import build_prompt
    from vppo_rollout.sampling import SamplingConfig
    from vppo_rollout.transformers_engine import TransformersSampler

    torch.set_num_threads(2)
    processor = load_processor(ckpt)
    model = load_policy(ckpt)
    prompts = [build_prompt(processor, r.question, r.images) for r in records]
    rollouts = TransformersSampler(model, processor).sample(
        prompts, samples, SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=s.max_new_tokens, seed=0)
    )
    keep = [i for i, ids in enumerate(rollouts.token_ids) if ids]
    analysis = dependency_analysis(
        model,
        processor,
        [prompts[rollouts.group_index[i]] for i in keep],
        [rollouts.token_ids[i] for i in keep],
        estimator="sampled",
        perturbation="blacken",
        seed=0,
    )
    return SampledResponses(list(records), rollouts, keep, analysis)


def response_anatomy(ckpt: Path, records: list, s: DemoSettings) -> dict[str, float]:
    """Where a model's answers and visual dependency sit, on `anatomy_prompts` held-out prompts x 2 samples.

    - answer_max_share: share of the most frequent boxed colour (0.25 = balanced; the true answers are balanced);
    - boxed_equals_clause: the boxed answer repeats the colour its own chain of thought stated;
    - follows_hint: the boxed answer is the hinted colour (right half of the time);
    - clause_dependency_share: the clause's colour token's share of the response's total dependency S (how much
      the colour stated still comes from the image);
    - clause_in_tgf_top / boxed_in_tgf_top: that token is among the ceil(0.4 n) most dependent (what TGF keeps).
    Responses without the piece a statistic needs are left out of it. Deterministic (seeded sampling and masks).
    """
    import re

    import numpy as np

    sampled = sample_and_measure(ckpt, records[: s.anatomy_prompts], s)
    stats: dict[str, list[float]] = {
        k: []
        for k in (
            "boxed_equals_clause",
            "follows_hint",
            "clause_dependency_share",
            "clause_in_tgf_top",
            "boxed_in_tgf_top",
        )
    }
    answers: list[str] = []
    for i, S, toks in zip(sampled.keep, sampled.analysis.token_dependency, sampled.analysis.tokens):
        rec = sampled.record_of(i)
        text = "".join(toks)
        starts = np.cumsum([0] + [len(t) for t in toks])
        top = set(np.argsort(-S, kind="stable")[: math.ceil(0.4 * len(S) - 1e-9)].tolist())
        clause = re.search(r"shape is (\w+)", text)
        boxed = re.findall(r"\\boxed\{(\w+)", text)
        total = float(S.sum())

        def token_at(pos: int, starts=starts) -> int:
            return int(np.searchsorted(starts, pos, side="right") - 1)

        if clause:
            j = token_at(clause.start(1))
            stats["clause_in_tgf_top"].append(float(j in top))
            if total > 0:
                stats["clause_dependency_share"].append(float(S[j]) / total)
        if boxed:
            answers.append(boxed[-1])
            j = token_at(text.rindex("\\boxed{") + len("\\boxed{"))
            stats["boxed_in_tgf_top"].append(float(j in top))
            stats["follows_hint"].append(float(boxed[-1] == _hint(rec.question)))
            if clause:
                stats["boxed_equals_clause"].append(float(boxed[-1] == clause.group(1)))
    out = {k: (sum(v) / len(v) if v else math.nan) for k, v in stats.items()}
    out["answer_max_share"] = max(answers.count(a) for a in set(answers)) / len(answers) if answers else math.nan
    out["responses"] = len(sampled.keep)
    return out


def dependency_report(ckpt: Path, records: list, s: DemoSettings, out: Path) -> dict[str, Any]:
    """Token / trajectory visual dependency of responses sampled from `ckpt` (the paper's Fig. 1, toy scale)."""
    from vppo_eval.report import write_dependency_report
    from vppo_eval.reward import compute_rewards

    sampled = sample_and_measure(ckpt, records[: s.dependency_prompts], s)
    rollouts, keep, analysis = sampled.rollouts, sampled.keep, sampled.analysis
    answers = [sampled.record_of(i).answer for i in keep]
    rewards = compute_rewards([rollouts.texts[i] for i in keep], answers)["accuracy"]
    headers = [
        f"Q: {sampled.record_of(i).question}   answer: {a}   correct: {bool(r)}"
        for i, a, r in zip(keep, answers, rewards)
    ]
    write_dependency_report(analysis, out, headers=headers)
    return analysis.summary()
