"""PEPO (ALGORITHMS.md §9.5): token weights from a perception prior (every layer's hidden state of a response
token against the visual tokens) gated by the entropy, from the clean pass alone (no altered view), brought in
linearly over the run."""

from __future__ import annotations

from dataclasses import dataclass

from vppo_core.shaping import pepo_token_weights
from vppo_recipes.methods.base import Method, param, weight_stats, with_own_weights


@dataclass(frozen=True)
class PEPO(Method):
    name = "pepo"
    clean_entropy = True
    clean_prior = True

    pepo_gate_alpha: float = param(0.05, low=0.0)
    pepo_temperature: float = param(1.8, low=0.0, low_open=True)
    pepo_schedule: str = param("linear", choices=("linear", "none"), doc="linear: w' = 1 + λ(w − 1)")

    def scores(self, ctx, mb, clean, lp_old, altered):
        return {"prior": clean["prior"], "entropy": clean["entropy"]}

    def progress(self, step: int, max_steps: int) -> float:
        """λ of the linear schedule at RL step `step` (0-based) of `max_steps`: 0 at the first step, 1 at the last."""
        if self.pepo_schedule == "none" or max_steps <= 1:
            return 1.0
        return min(1.0, step / (max_steps - 1))

    def shape_micro_batch(self, ctx, step):
        p = step.no_grad
        w = pepo_token_weights(
            p.scores["prior"], p.scores["entropy"], step.batch.mask, gate_alpha=self.pepo_gate_alpha,
            temperature=self.pepo_temperature, progress=self.progress(ctx.step, ctx.max_steps),
        ).to(p.lp_old.dtype)  # fmt: skip
        return with_own_weights(step, w)

    def metrics(self, ctx, steps):
        return weight_stats(ctx, self.name, steps, "weights")
