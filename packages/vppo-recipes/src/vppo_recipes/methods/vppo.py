"""VPPO (ALGORITHMS.md §1-§4): token visual dependency S under a perturbed image, TAS (each response's advantage
scaled by its mean dependency, §3) and TGF (only each response's top ρ most dependent tokens carry the policy
gradient, §4)."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vppo_core.masking import tgf_mask
from vppo_core.perturb import IMAGE_PERTURBATIONS
from vppo_core.shaping import tas_scale, tas_scale_reference
from vppo_recipes.collectives import all_gather_cat
from vppo_recipes.methods.base import DEPENDENT_TOKEN_FRACTION, Method, MethodContext, param
from vppo_recipes.methods.blocks import dependency_param
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
        return []

    def shape(self, ctx: MethodContext, steps: Sequence[Sequence[MicroStep]]) -> list[list[Shaping]]:
        return [self._shape_mini_batch(ctx, mini) for mini in steps]

    def _shape_mini_batch(self, ctx: MethodContext, mini: Sequence[MicroStep]) -> list[Shaping]:
        passes = [s.no_grad for s in mini]
        alphas = [torch.ones_like(s.batch.advantages) for s in mini]
        if self.tas:
            traj = torch.cat([p.traj_dep for p in passes])
            valid = torch.cat([s.batch.mask.sum(1) > 0 for s in mini])
            if self.tas_statistics == "global":
                # m, M and mean(n) over the GLOBAL mini-batch: gather S̄ of every rank (same length on each).
                all_traj, all_valid = all_gather_cat(traj), all_gather_cat(valid.to(traj.dtype)).bool()
                alpha = tas_scale(all_traj, beta_min=self.beta_min, valid=all_valid)
                alpha = alpha[ctx.rank * traj.numel() : (ctx.rank + 1) * traj.numel()]
            else:  # the official code: per-rank mini-batch min/max, per-micro-batch mean(n)
                alpha = tas_scale_reference(traj, ctx.micro_batch_size, beta_min=self.beta_min, valid=valid)
            alphas = list(alpha.split([p.traj_dep.numel() for p in passes]))
        out = []
        for s, alpha in zip(mini, alphas):
            weights = None
            if self.tgf:
                weights = tgf_mask(s.no_grad.S, s.batch.mask, fraction=self.tgf_fraction).to(s.no_grad.lp_old.dtype)
            out.append(Shaping(s.batch.advantages * alpha, weights, {"alpha": alpha}))
        return out

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
