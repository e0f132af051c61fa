"""VPPO (ALGORITHMS.md §1-§4): token visual dependency S under a perturbed image, TAS (each response's advantage
scaled by its mean dependency, §3) and TGF (only each response's top ρ most dependent tokens carry the policy
gradient, §4)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vppo_core.perturb import IMAGE_PERTURBATIONS
from vppo_recipes.methods.base import DEPENDENT_TOKEN_FRACTION, Method, MethodContext, param
from vppo_recipes.methods.blocks import (
    REFERENCE_TAS_WITH_BUDGET,
    TopDependentTokens,
    TrajectoryScaling,
    dependency_param,
    scaled_and_selected,
)
from vppo_recipes.methods.records import MicroStep, Shaping
from vppo_recipes.methods.views import PerturbedPixels


@dataclass(frozen=True)
class VPPO(Method):
    name = "vppo"

    perturbation: str = param("blacken", choices=IMAGE_PERTURBATIONS)
    perturb_prob: float = param(0.5, low=0.0, high=1.0)
    tas: bool = param(True, doc="trajectory-level advantage shaping")
    beta_min: float = param(0.9, low=0.0, high=1.0)
    tas_statistics: str = param(
        "global", choices=("global", "reference"), doc="global: all ranks; reference: the official per-rank code"
    )
    tgf: bool = param(True, doc="token-level gradient filtering")
    tgf_fraction: float = param(DEPENDENT_TOKEN_FRACTION, low=0.0, low_open=True, high=1.0)
    dependency: str = dependency_param()

    def views(self):
        return (PerturbedPixels(self.perturbation, self.perturb_prob, per_response=True),)  # a fresh mask per response

    @property
    def exact_dependency(self) -> bool:
        return self.dependency == "exact"

    @property
    def dependent_fraction(self) -> float:
        return self.tgf_fraction

    def config_errors(self, cfg: Mapping[str, Any]) -> list[str]:
        if not (self.tas or self.tgf):
            return ["algorithm.name=vppo with tas=false and tgf=false is DAPO; set algorithm.name=dapo instead"]
        if self.tas and self.tas_statistics == "reference" and cfg["batch"]["max_tokens_per_micro_batch"] is not None:
            return [REFERENCE_TAS_WITH_BUDGET]
        return []

    def shape(self, ctx: MethodContext, steps: Sequence[Sequence[MicroStep]]) -> list[list[Shaping]]:
        scaling = TrajectoryScaling(self.beta_min, self.tas_statistics) if self.tas else None
        selection = TopDependentTokens(self.tgf_fraction) if self.tgf else None
        return scaled_and_selected(ctx, steps, scaling=scaling, selection=selection)

    def metrics(self, ctx: MethodContext, steps: Sequence[MicroStep]) -> dict[str, float]:
        alpha = ctx.gathered([s.shaped.outputs["alpha"][s.batch.mask.sum(1) > 0] for s in steps])
        m = {
            "tas/alpha_min": float(alpha.min()) if alpha.numel() else math.nan,
            "tas/alpha_max": float(alpha.max()) if alpha.numel() else math.nan,
            "tas/alpha_std": float(alpha.std()) if alpha.numel() > 1 else math.nan,
        }
        if self.tgf:
            w = ctx.gathered([s.shaped.token_weights[s.batch.mask > 0] for s in steps])
            m["tgf/selected_fraction"] = float(w.mean()) if w.numel() else math.nan
        return m
