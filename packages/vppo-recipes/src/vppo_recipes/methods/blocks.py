"""Building blocks several methods share: settings declared once, and the blocks a method is composed of (the
altered views are in `views.py`): a token selection (`TopDependentTokens`), an advantage scaling
(`TrajectoryScaling`), an auxiliary loss term (`KLToView`). The built-in methods are written with them, and
`composed.Composed` combines them from YAML.

A setting two methods read (PAPO's and DVRP's `mask_prob`, PAPO's and CFPO's `visual_kl_coef`, VPPO's and PGPO's
`dependency`) is one function here, so its default, bounds and doc are written once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from vppo_core.losses import kl_penalty
from vppo_core.masking import tgf_mask
from vppo_core.shaping import tas_scale, tas_scale_reference
from vppo_recipes.collectives import all_gather_cat
from vppo_recipes.methods.base import DEPENDENT_TOKEN_FRACTION, MethodContext, param
from vppo_recipes.methods.records import MicroStep, Shaping

# TAS "reference" statistics are the official code's per-micro-batch mean(n) over fixed-size micro-batches in data order
REFERENCE_TAS_WITH_BUDGET = (
    "algorithm.tas_statistics=reference computes mean(n) per micro-batch of batch.micro_batch_size rows in data "
    "order, as the official code does; batch.max_tokens_per_micro_batch groups rows by length instead, which would "
    "change alpha. Use tas_statistics=global (the same for any split) or set batch.max_tokens_per_micro_batch=null"
)


def dependency_param():
    """How S is computed: k3 on the sampled token (the papers' code) or the exact full-vocabulary KL."""
    return param("sampled", choices=("sampled", "exact"), doc="sampled: k3 on the sampled token; exact: full KL")


def mask_prob_param():
    """The share of ViT patches blackened in the masked view (PAPO, DVRP)."""
    return param(0.6, low=0.0, high=1.0, doc="ViT patches blackened in the masked view")


def visual_kl_coef_param():
    """γ of the KL term to the altered view (PAPO, CFPO)."""
    return param(0.02, low=0.0, doc="γ: loss − γ·k3(altered view ‖ policy); PAPO-G / CFPO-G 0.02, -D 0.01")


# --------------------------------------------------------------------------------------------------------------------
# Blocks as components: a selection, a scaling, an auxiliary term (views are in views.py). The built-in methods are
# written with them, and `composed.Composed` combines them from YAML.
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TopDependentTokens:
    """Token selection: only each response's ceil(ρ·n) most dependent tokens carry the policy gradient (VPPO's TGF,
    ALGORITHMS.md §4): weights 1 on them, 0 elsewhere."""

    fraction: float = DEPENDENT_TOKEN_FRACTION

    def __post_init__(self):
        if not 0.0 < self.fraction <= 1.0:  # NaN fails too
            raise ValueError(f"TopDependentTokens fraction={self.fraction!r}: must be in (0, 1]")

    def weights(self, step: MicroStep) -> torch.Tensor:
        """[b, L] in lp_old's dtype."""
        return tgf_mask(step.no_grad.S, step.batch.mask, fraction=self.fraction).to(step.no_grad.lp_old.dtype)


@dataclass(frozen=True)
class TrajectoryScaling:
    """Advantage scaling: each response's advantage times α_i from its mean dependency S̄_i (VPPO's TAS,
    ALGORITHMS.md §3), with m, M and mean(n) over the global mini-batch ("global") or per rank and micro-batch as the
    official code ("reference")."""

    beta_min: float = 0.9
    statistics: str = "global"

    def __post_init__(self):
        if not 0.0 <= self.beta_min <= 1.0:  # NaN fails too
            raise ValueError(f"TrajectoryScaling beta_min={self.beta_min!r}: must be in [0, 1]")
        if self.statistics not in ("global", "reference"):
            raise ValueError(f"TrajectoryScaling statistics={self.statistics!r}: 'global' or 'reference'")

    def alphas(self, ctx: MethodContext, mini: Sequence[MicroStep]) -> list[torch.Tensor]:
        """One [b] α per micro-batch of one mini-batch (collective under "global": every rank calls it)."""
        traj = torch.cat([s.no_grad.traj_dep for s in mini])
        valid = torch.cat([s.batch.mask.sum(1) > 0 for s in mini])
        if self.statistics == "global":
            # m, M and mean(n) over the GLOBAL mini-batch: gather S̄ of every rank (same length on each).
            all_traj, all_valid = all_gather_cat(traj), all_gather_cat(valid.to(traj.dtype)).bool()
            alpha = tas_scale(all_traj, beta_min=self.beta_min, valid=all_valid)
            alpha = alpha[ctx.rank * traj.numel() : (ctx.rank + 1) * traj.numel()]
        else:  # the official code: per-rank mini-batch min/max, per-micro-batch mean(n)
            if ctx.max_tokens_per_micro_batch is not None:
                raise ValueError(REFERENCE_TAS_WITH_BUDGET)
            alpha = tas_scale_reference(traj, ctx.micro_batch_size, beta_min=self.beta_min, valid=valid)
        return list(alpha.split([s.no_grad.traj_dep.numel() for s in mini]))


@dataclass(frozen=True)
class KLToView:
    """Auxiliary term coef · k3(view ‖ π_θ) per token (ALGORITHMS.md §9.1): the view's log-probs were scored once
    before the update (no gradient through them); π_θ is the gradient pass. coef < 0 rewards the divergence
    (PAPO's, CFPO's and DVRP's necessity term), coef > 0 penalises it (DVRP's robustness term)."""

    view: int = 0
    coef: float = -0.02

    def __post_init__(self):
        if not (isinstance(self.view, int) and self.view >= 0):
            raise ValueError(f"KLToView view={self.view!r}: the index (>= 0) of one of the method's views")
        if not math.isfinite(self.coef):
            raise ValueError(f"KLToView coef={self.coef!r}: must be a finite number")

    def term(self, step: MicroStep, new: Mapping[str, torch.Tensor]) -> tuple[float, torch.Tensor]:
        return self.coef, kl_penalty(new["lp"], step.no_grad.lp_views[self.view], "k3")


def scaled_and_selected(
    ctx: MethodContext, steps: Sequence[Sequence[MicroStep]], *, scaling: Any | None, selection: Any | None
) -> list[list[Shaping]]:
    """The shaping of a step from an advantage scaling and a token selection (either may be None: α = 1, every
    token weighted 1): per micro-batch, A·α with α logged as output "alpha", and the selection's weights. [mini][micro].
    """
    out = []
    for mini in steps:
        alphas = scaling.alphas(ctx, mini) if scaling else [torch.ones_like(s.batch.advantages) for s in mini]
        out.append(
            [
                Shaping(s.batch.advantages * alpha, selection.weights(s) if selection else None, {"alpha": alpha})
                for s, alpha in zip(mini, alphas)
            ]
        )
    return out
