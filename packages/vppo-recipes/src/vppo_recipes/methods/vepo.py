"""VEPO (ALGORITHMS.md §9.4): per-token scores from the full-vocabulary JSD and entropies of the clean and a
Gaussian-noised view; only each response's top fraction of tokens carries the policy term (a mean over the selected
tokens), plus an entropy bonus with gradient."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vppo_core.dependency import vepo_token_scores
from vppo_core.masking import top_fraction_mask
from vppo_recipes.forward import view_divergences_in_root
from vppo_recipes.methods.base import Method, param, weight_stats, with_own_weights
from vppo_recipes.methods.views import GaussianNoise


@dataclass(frozen=True)
class VEPO(Method):
    name = "vepo"
    update_entropy = True

    vepo_noise_std: float = param(6.928, low=0.0, doc="Gaussian noise on the normalised pixel values")
    vepo_jsd_weight: float = param(0.7, low=0.0, high=1.0)
    vepo_fraction: float = param(0.2, low=0.0, low_open=True, high=1.0)
    vepo_entropy_bonus: float = param(0.001, low=0.0, doc="loss − c·mean analytic entropy (with gradient)")

    def views(self):
        return (GaussianNoise(self.vepo_noise_std),)  # one draw per prompt

    def config_errors(self, cfg):
        if cfg["loss"]["aggregation"] == "seq-mean-token-sum":
            return [
                "algorithm.name=vepo averages the policy term over the selected tokens; loss.aggregation="
                "seq-mean-token-sum has no such mean: use token-mean (the published runs) or seq-mean-token-mean"
            ]
        return []

    def scores(self, ctx, mb, clean, lp_old, altered):
        d = ctx.in_root(view_divergences_in_root, clean["hidden"], altered[0]["hidden"], mb.mask)
        return {
            "vepo_score": vepo_token_scores(
                d["jsd"], d["entropy"], d["entropy_gap"], mb.mask, jsd_weight=self.vepo_jsd_weight
            )
        }

    def shape(self, ctx, steps):
        selected = [
            [top_fraction_mask(s.no_grad.scores["vepo_score"], s.batch.mask, fraction=self.vepo_fraction) for s in mini]
            for mini in steps
        ]
        if ctx.aggregation != "token-mean":  # each response's own mean over its selected tokens
            weights = [
                [c * (s.batch.mask.sum(1) / c.sum(1).clamp(min=1))[:, None] for s, c in zip(mini, chosen)]
                for mini, chosen in zip(steps, selected)
            ]
        else:
            # token-mean: the policy term is a mean over the selected tokens of the (global) mini-batch; every
            # mini-batch's two counts in one all-reduce, the scale kept on the device (no host sync)
            counts = torch.stack(
                [
                    torch.stack([torch.stack([s.batch.mask.sum(), c.sum()]) for s, c in zip(mini, chosen)])
                    .double()
                    .sum(0)
                    for mini, chosen in zip(steps, selected)
                ]
            )
            ctx.all_reduce_(counts)
            scales = torch.where(counts[:, 1] > 0, counts[:, 0] / counts[:, 1], torch.zeros_like(counts[:, 0]))
            weights = [
                [c.to(s.batch.mask.dtype) * scale.float() for s, c in zip(mini, chosen)]
                for mini, chosen, scale in zip(steps, selected, scales)
            ]
        return [
            [with_own_weights(s, w.to(s.no_grad.lp_old.dtype)) for s, w in zip(mini, mini_weights)]
            for mini, mini_weights in zip(steps, weights)
        ]

    def aux_terms(self, ctx, step, new):
        return {"entropy_bonus": (-float(self.vepo_entropy_bonus), new["entropy"])}

    def metrics(self, ctx, steps):
        return weight_stats(ctx, self.name, steps, "weights")
