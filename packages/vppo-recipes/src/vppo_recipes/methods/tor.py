"""ToR (ALGORITHMS.md §9.2): token weights from two batch-level sets, the high-entropy tokens (entropy of the
top-p renormalised distribution) and the high-perception tokens (|log π(image) − log π(no image)|), each the top
fraction of every response token of the rollout batch."""

from __future__ import annotations

from dataclasses import dataclass

from vppo_core.dependency import abs_log_ratio
from vppo_core.shaping import tor_token_weights
from vppo_recipes.forward import top_p_entropy_in_root
from vppo_recipes.methods.base import Method, param, weight_stats, with_own_weights
from vppo_recipes.methods.views import NoImage


def _fraction(default: float):
    return param(default, low=0.0, low_open=True, high=1.0)


@dataclass(frozen=True)
class ToR(Method):
    name = "tor"

    tor_entropy_fraction: float = _fraction(0.3)
    tor_perception_fraction: float = _fraction(0.3)
    tor_reasoning_weight: float = param(1.0, low=0.0)
    tor_perception_weight: float = param(0.5, low=0.0)
    tor_entropy_top_p: float = _fraction(0.95)

    def views(self):
        return (NoImage(),)

    def scores(self, ctx, mb, clean, lp_old, altered):
        return {
            "top_p_entropy": ctx.in_root(top_p_entropy_in_root, clean["hidden"], mb.mask, top_p=self.tor_entropy_top_p),
            "abs_log_ratio": abs_log_ratio(lp_old, altered[0]["lp"], mb.mask),
        }

    def shape(self, ctx, steps):
        flat = [s for mini in steps for s in mini]
        reasoning = ctx.batch_top_fraction(
            steps, [s.no_grad.scores["top_p_entropy"] for s in flat], self.tor_entropy_fraction, 0
        )
        perception = ctx.batch_top_fraction(
            steps, [s.no_grad.scores["abs_log_ratio"] for s in flat], self.tor_perception_fraction, 1
        )
        weights = iter(
            tor_token_weights(
                r, q, s.batch.mask, reasoning_weight=self.tor_reasoning_weight,
                perception_weight=self.tor_perception_weight,
            ).to(s.no_grad.lp_old.dtype)
            for s, r, q in zip(flat, reasoning, perception)
        )  # fmt: skip
        return [[with_own_weights(s, next(weights)) for s in mini] for mini in steps]

    def metrics(self, ctx, steps):
        return weight_stats(ctx, self.name, steps, "weights")
