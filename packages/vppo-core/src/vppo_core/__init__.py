"""vppo-core: token-level perception-aware RL objectives (VPPO, PGPO, DAPO, GRPO) as pure torch functions.

Every function takes tensors and returns tensors; each docstring names the section of ALGORITHMS.md whose
formula it implements. Runtime dependency: torch only. See README.md for the API table.
"""

from vppo_core.advantages import group_advantages, keep_groups
from vppo_core.attention import text_only_attention
from vppo_core.dependency import (
    exact_token_dependency,
    exact_token_dependency_from_hidden,
    token_dependency,
    trajectory_dependency,
)
from vppo_core.logprobs import logprobs_from_hidden, token_logprobs
from vppo_core.losses import AGGREGATIONS, KL_ESTIMATORS, LOSS_TYPES, kl_penalty, policy_loss, truncated_is_weights
from vppo_core.masking import policy_gradient_share, tgf_mask
from vppo_core.perturb import PERTURBATION_MODES, patch_positions, perturb_pixels
from vppo_core.shaping import pgpo_token_weights, tas_bounds, tas_scale, tas_scale_reference

__all__ = [
    "AGGREGATIONS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "PERTURBATION_MODES",
    "exact_token_dependency",
    "exact_token_dependency_from_hidden",
    "group_advantages",
    "keep_groups",
    "kl_penalty",
    "logprobs_from_hidden",
    "patch_positions",
    "perturb_pixels",
    "pgpo_token_weights",
    "policy_gradient_share",
    "policy_loss",
    "tas_bounds",
    "tas_scale",
    "tas_scale_reference",
    "text_only_attention",
    "tgf_mask",
    "token_dependency",
    "token_logprobs",
    "trajectory_dependency",
    "truncated_is_weights",
]
