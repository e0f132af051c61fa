"""MyMethod: a perception-aware RL method defined outside vppo, named in YAML as `my_method.MyMethod`.

Each response keeps its group advantage, and its tokens share it by visual dependency: a token's weight is its
dependency S under a perturbed image relative to the response's mean S̄, mixed with uniform credit,
`w_t = (1 − λ) + λ · S_t / S̄`. Each response's weights average 1 over its valid tokens (its advantage mass is
unchanged, as with PGPO's weights), so λ = 0 is DAPO and λ = 1 pure dependency credit. README.md walks through it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vppo_core.perturb import IMAGE_PERTURBATIONS
from vppo_recipes.methods import Method, param
from vppo_recipes.methods.records import Shaping
from vppo_recipes.methods.views import PerturbedPixels


def dependency_weights(S: torch.Tensor, traj_dep: torch.Tensor, mask: torch.Tensor, *, mix: float) -> torch.Tensor:
    """Token weights `(1 − mix) + mix · S / S̄` on valid tokens, 0 on padding.

    S: [B, L] token dependency (≥ 0); traj_dep: [B] S̄, the mean of S over each response's valid tokens
    (`vppo_core.trajectory_dependency`); mask: [B, L] bool or 0/1. Returns [B, L] in S's dtype, mean 1 over each
    response's valid tokens. A response with S̄ = 0 (no token depends on the image) gets weight 1 everywhere:
    there is no dependency to share its advantage by.
    """
    mean = traj_dep[:, None]
    share = torch.where(mean > 0, S / torch.where(mean > 0, mean, torch.ones_like(mean)), torch.ones_like(S))
    return torch.where(mask > 0, (1.0 - mix) + mix * share, torch.zeros_like(S))


@dataclass(frozen=True)
class MyMethod(Method):
    name = "my_method"  # the prefix of its metrics (a class attribute, not a setting)

    perturbation: str = param("blacken", choices=IMAGE_PERTURBATIONS, doc="how the view alters the ViT patches")
    perturb_prob: float = param(0.5, low=0.0, low_open=True, high=1.0, doc="share of patches altered, in (0, 1]")
    dependency_mix: float = param(0.5, low=0.0, high=1.0, doc="λ: 0 is uniform credit (DAPO), 1 pure S / S̄")

    def views(self):
        # One altered no-grad pass; the recipe computes S (k3 against lp_old) and S̄ from the first view.
        return (PerturbedPixels(self.perturbation, self.perturb_prob, per_response=True),)

    def shape_micro_batch(self, ctx, step):
        p = step.no_grad
        w = dependency_weights(p.S, p.traj_dep, step.batch.mask, mix=self.dependency_mix).to(p.lp_old.dtype)
        # outputs: what `metrics` reads back (token_weights may have the importance weights multiplied in)
        return Shaping(step.batch.advantages, w, {"weights": w})

    def metrics(self, ctx, steps):
        # every rank calls this: gather the weights of all ranks' valid tokens so the numbers ignore the sharding
        w = ctx.gathered([s.shaped.outputs["weights"][s.batch.mask > 0] for s in steps]).double()
        if not w.numel():  # no valid token this step (every response empty)
            return {f"{self.name}/{k}": math.nan for k in ("weight_mean", "weight_max", "upweighted_fraction")}
        return {
            f"{self.name}/weight_mean": float(w.mean()),  # 1 up to rounding: each response's mass is conserved
            f"{self.name}/weight_max": float(w.max()),
            f"{self.name}/upweighted_fraction": float((w > 1.0).double().mean()),  # tokens credited above uniform
        }
