"""PAPO (ALGORITHMS.md §9.1): the policy loss minus γ·k3(masked image ‖ policy), the masked image one random
patch mask per prompt, scored once before the update."""

from __future__ import annotations

from dataclasses import dataclass

from vppo_recipes.methods.base import Method
from vppo_recipes.methods.blocks import KLToView, mask_prob_param, visual_kl_coef_param
from vppo_recipes.methods.views import PerturbedPixels


@dataclass(frozen=True)
class PAPO(Method):
    name = "papo"

    mask_prob: float = mask_prob_param()
    visual_kl_coef: float = visual_kl_coef_param()

    def views(self):
        return (PerturbedPixels("blacken", self.mask_prob, per_response=False),)

    def aux_terms(self, ctx, step, new):
        return {"visual_kl": KLToView(0, -1.0 * self.visual_kl_coef).term(step, new)}
