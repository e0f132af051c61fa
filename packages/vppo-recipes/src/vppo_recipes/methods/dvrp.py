"""DVRP (ALGORITHMS.md §9.1): a necessity term (− λ_nec·k3(masked ‖ policy)) and a robustness term
(+ λ_rob·k3(noised ‖ policy)), the noised view VP-diffusion noise annealed from strong to weak over the run."""

from __future__ import annotations

from dataclasses import dataclass

from vppo_recipes.methods.base import Method, param
from vppo_recipes.methods.blocks import KLToView, mask_prob_param
from vppo_recipes.methods.views import DiffusionNoise, PerturbedPixels


@dataclass(frozen=True)
class DVRP(Method):
    name = "dvrp"

    mask_prob: float = mask_prob_param()
    necessity_kl_coef: float = param(0.01, low=0.0, doc="λ_nec: − λ_nec·k3(masked ‖ policy)")
    robustness_kl_coef: float = param(0.01, low=0.0, doc="λ_rob: + λ_rob·k3(noised ‖ policy)")
    noise_t_init: float = param(500.0, low=0.0, doc="diffusion step at the start")
    noise_gamma: float = param(10.0, low=0.0, doc="sigmoid annealing sharpness")
    noise_t_max: float = param(1000.0, low=0.0, low_open=True, high=1000.0, doc="the largest diffusion step")

    def views(self):
        return (
            PerturbedPixels("blacken", self.mask_prob, per_response=False),
            DiffusionNoise(self.noise_t_init, self.noise_gamma, self.noise_t_max),
        )

    def aux_terms(self, ctx, step, new):
        return {
            "necessity_kl": KLToView(0, -1.0 * self.necessity_kl_coef).term(step, new),
            "robustness_kl": KLToView(1, 1.0 * self.robustness_kl_coef).term(step, new),
        }

    def metrics(self, ctx, steps):
        return {"dvrp/noise_level": self.views()[1].level(ctx.step, ctx.max_steps)}
