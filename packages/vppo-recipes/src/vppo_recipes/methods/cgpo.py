"""CGPO (ALGORITHMS.md §9.3): the policy-gradient terms of the high-entropy ∪ high-perception tokens only (both
batch-level sets; perception from S under the response's own evidence regions filled), the perception tokens'
advantage scaled by a per-response factor α_i from the rollout batch's median and MAD of S̄."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from vppo_core.shaping import cgpo_response_factors
from vppo_recipes.methods.base import Method, param, weight_stats
from vppo_recipes.methods.records import Shaping
from vppo_recipes.methods.views import RegionsFilled


@dataclass(frozen=True)
class CGPO(Method):
    name = "cgpo"
    clean_entropy = True

    cgpo_coef: float = param(0.1, low=0.0, high=1.0, doc="λ of α = 1 + λ·tanh(...); ≤ 1 keeps α ≥ 0")
    cgpo_entropy_fraction: float = param(0.3, low=0.0, low_open=True, high=1.0)
    cgpo_perception_fraction: float = param(0.3, low=0.0, low_open=True, high=1.0)
    cgpo_region_tokens: bool = param(False, doc="add the <region> spans' tokens to the perception set")

    def views(self):
        return (RegionsFilled(),)

    def scores(self, ctx, mb, clean, lp_old, altered):
        return {"entropy": clean["entropy"]}

    def shape(self, ctx, steps):
        flat = [s for mini in steps for s in mini]
        mbs = [s.batch for s in flat]
        entropic = ctx.batch_top_fraction(
            steps, [s.no_grad.scores["entropy"] for s in flat], self.cgpo_entropy_fraction, 0
        )
        perception = ctx.batch_top_fraction(steps, [s.no_grad.S for s in flat], self.cgpo_perception_fraction, 1)
        if self.cgpo_region_tokens:  # the tokens of the response's <region> spans join the perception set
            from vppo_rollout.regions import region_token_mask  # (imports transformers: not at config check)

            regions = [region_token_mask(mb.responses, mb.mask, ctx.processor.tokenizer) for mb in mbs]
            perception = [q | r for q, r in zip(perception, regions)]
        traj = torch.cat([s.no_grad.traj_dep for s in flat])
        valid = torch.cat([mb.mask.sum(1) > 0 for mb in mbs])
        all_traj, offset = ctx.gathered_with_offset(traj)
        all_valid = ctx.gathered_with_offset(valid.to(traj.dtype))[0].bool()
        alpha = cgpo_response_factors(all_traj, all_valid, coef=self.cgpo_coef)[offset : offset + traj.numel()]
        alphas = alpha.split([s.no_grad.traj_dep.numel() for s in flat])
        # A'_t = A_i·α_i on perception tokens (A_i elsewhere), then the PG terms of entropy ∪ perception tokens
        # only: ℓ is positively homogeneous in A, so both are one token weight; α does not scale A_i itself.
        out = []
        for s, al, e, q in zip(flat, alphas, entropic, perception):
            mask = s.batch.mask
            w = torch.where(q, al[:, None], torch.ones_like(mask)) * (e | q).to(mask.dtype) * mask
            w = w.to(s.no_grad.lp_old.dtype)
            out.append(Shaping(s.batch.advantages, w, {"weights": w, "alpha": al}))
        it = iter(out)
        return [[next(it) for _ in mini] for mini in steps]

    def metrics(self, ctx, steps):
        alpha = ctx.gathered([s.shaped.outputs["alpha"][s.batch.mask.sum(1) > 0] for s in steps])
        return {
            **weight_stats(ctx, self.name, steps, "weights"),
            "cgpo/alpha_min": float(alpha.min()) if alpha.numel() else math.nan,
            "cgpo/alpha_max": float(alpha.max()) if alpha.numel() else math.nan,
        }
