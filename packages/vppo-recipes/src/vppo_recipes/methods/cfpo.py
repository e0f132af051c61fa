"""CFPO (ALGORITHMS.md §9.1): PAPO's KL term against a counterfactual view in which the salient image values are
replaced by their mean in every decoder layer (`vppo_recipes.counterfactual`)."""

from __future__ import annotations

from dataclasses import dataclass

from vppo_recipes.methods.base import Method, param
from vppo_recipes.methods.blocks import KLToView, visual_kl_coef_param
from vppo_recipes.methods.views import CounterfactualAttention


@dataclass(frozen=True)
class CFPO(Method):
    name = "cfpo"

    visual_kl_coef: float = visual_kl_coef_param()
    cfpo_std_multiplier: float = param(2.0, low=0.0, doc="λ: salient if P > μ + λσ")

    def views(self):
        return (CounterfactualAttention(self.cfpo_std_multiplier),)

    def aux_terms(self, ctx, step, new):
        return {"visual_kl": KLToView(0, -1.0 * self.visual_kl_coef).term(step, new)}
