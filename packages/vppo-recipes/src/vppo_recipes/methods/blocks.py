"""Building blocks several methods share: settings declared once, and the auxiliary KL term to an altered view.

A setting two methods read (PAPO's and DVRP's `mask_prob`, PAPO's and CFPO's `visual_kl_coef`, VPPO's and PGPO's
`dependency`) is one function here, so its default, bounds and doc are written once.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from vppo_core.losses import kl_penalty
from vppo_recipes.methods.base import param
from vppo_recipes.methods.records import MicroStep


def dependency_param():
    """How S is computed: k3 on the sampled token (the papers' code) or the exact full-vocabulary KL."""
    return param("sampled", choices=("sampled", "exact"), doc="sampled: k3 on the sampled token; exact: full KL")


def mask_prob_param():
    """The share of ViT patches blackened in the masked view (PAPO, DVRP)."""
    return param(0.6, low=0.0, high=1.0, doc="ViT patches blackened in the masked view")


def visual_kl_coef_param():
    """γ of the KL term to the altered view (PAPO, CFPO)."""
    return param(0.02, low=0.0, doc="γ: loss − γ·k3(altered view ‖ policy); PAPO-G / CFPO-G 0.02, -D 0.01")


def kl_to_view(step: MicroStep, new: Mapping[str, torch.Tensor], view: int, coef: float) -> tuple[float, torch.Tensor]:
    """An auxiliary term coef · k3(view ‖ π_θ) per token (ALGORITHMS.md §9.1): the view's log-probs were scored once
    before the update (no gradient through them); π_θ is the gradient pass. coef < 0 rewards the divergence."""
    return coef, kl_penalty(new["lp"], step.no_grad.lp_views[view], "k3")
