"""PGPO (ALGORITHMS.md §5): S against a text-only pass (no token attends to the image), then threshold-gated,
mass-conserving token weights."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

from vppo_core.shaping import PGPO_THRESHOLD_MODES, pgpo_token_weights
from vppo_recipes.methods.base import Method, MethodContext, param
from vppo_recipes.methods.blocks import dependency_param
from vppo_recipes.methods.records import MicroStep, Shaping
from vppo_recipes.methods.views import TextOnly


@dataclass(frozen=True)
class PGPO(Method):
    name = "pgpo"

    pgpo_tau: float = param(0.4, low=0.0, low_open=True, high=1.0, high_open=True)
    pgpo_beta: float = param(2.0, low=0.0)
    pgpo_threshold_mode: str = param(
        "absolute",
        choices=PGPO_THRESHOLD_MODES,
        doc="absolute: the paper's τ; quantile: each response's own τ-quantile (the authors' development code)",
    )
    pgpo_weight_floor: float = param(0.0, low=0.0, high=1.0, doc="0: the paper; 0.1: development code")
    pgpo_mass_normalization: bool = param(True, doc="true: the paper; false: development code")
    dependency: str = dependency_param()

    def views(self):
        return (TextOnly(),)

    @property
    def exact_dependency(self) -> bool:
        return self.dependency == "exact"

    def shape_micro_batch(self, ctx: MethodContext, step: MicroStep) -> Shaping:
        weights = pgpo_token_weights(
            step.no_grad.S,
            step.batch.mask,
            tau=self.pgpo_tau,
            beta=self.pgpo_beta,
            threshold_mode=self.pgpo_threshold_mode,
            weight_floor=self.pgpo_weight_floor,
            mass_normalization=self.pgpo_mass_normalization,
        )
        return Shaping(step.batch.advantages, weights)

    def metrics(self, ctx: MethodContext, steps: Sequence[MicroStep]) -> dict[str, float]:
        w = ctx.gathered([s.shaped.token_weights[s.batch.mask > 0] for s in steps])
        return {
            "pgpo/weight_mean": float(w.mean()) if w.numel() else math.nan,
            "pgpo/weight_min": float(w.min()) if w.numel() else math.nan,
            "pgpo/weight_max": float(w.max()) if w.numel() else math.nan,
            "pgpo/weight_std": float(w.std()) if w.numel() > 1 else math.nan,
        }
