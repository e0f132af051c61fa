"""vppo-core: token-level perception-aware RL objectives as pure torch functions: VPPO, PGPO, DAPO, GRPO, and
PAPO, CFPO, DVRP, ToR, PEPO, CGPO, VEPO, and VAPO's perception reward (ALGORITHMS.md §9).

Every function takes tensors and returns tensors; each docstring names the section of ALGORITHMS.md whose
formula it implements. Runtime dependency: torch only. See README.md for the API table.
"""

from vppo_core.advantages import (
    ANCHOR_SEPARATORS,
    anchor_cutoffs,
    anchor_decisions,
    anchor_perception_score,
    anchor_positions,
    anchor_query,
    anchor_think_span,
    group_advantages,
    keep_groups,
    vapo_rewards,
)
from vppo_core.attention import text_only_attention
from vppo_core.counterfactual import cross_modal_value_mean_attention, image_spans, value_mean_correction
from vppo_core.dependency import (
    abs_log_ratio,
    exact_token_dependency,
    exact_token_dependency_from_hidden,
    token_dependency,
    top_p_entropy_from_hidden,
    trajectory_dependency,
    vepo_token_scores,
    view_divergences_from_hidden,
)
from vppo_core.logprobs import logprobs_from_hidden, token_logprobs
from vppo_core.losses import AGGREGATIONS, KL_ESTIMATORS, LOSS_TYPES, kl_penalty, policy_loss, truncated_is_weights
from vppo_core.masking import SELECTION_SCOPES, policy_gradient_share, tgf_mask, top_fraction_mask
from vppo_core.perturb import (
    IMAGE_PERTURBATIONS,
    PERTURBATION_MODES,
    blacken_image_blocks,
    diffusion_noise_level,
    patch_positions,
    perturb_pixels,
)
from vppo_core.shaping import (
    cgpo_response_factors,
    minmax_by_response,
    pepo_token_weights,
    pepo_visual_prior,
    pgpo_token_weights,
    tas_bounds,
    tas_scale,
    tas_scale_reference,
    tor_token_weights,
)

__all__ = [
    "AGGREGATIONS",
    "ANCHOR_SEPARATORS",
    "IMAGE_PERTURBATIONS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "PERTURBATION_MODES",
    "SELECTION_SCOPES",
    "abs_log_ratio",
    "anchor_cutoffs",
    "anchor_decisions",
    "anchor_perception_score",
    "anchor_positions",
    "anchor_query",
    "anchor_think_span",
    "blacken_image_blocks",
    "cgpo_response_factors",
    "cross_modal_value_mean_attention",
    "diffusion_noise_level",
    "exact_token_dependency",
    "exact_token_dependency_from_hidden",
    "group_advantages",
    "image_spans",
    "keep_groups",
    "kl_penalty",
    "logprobs_from_hidden",
    "minmax_by_response",
    "patch_positions",
    "pepo_token_weights",
    "pepo_visual_prior",
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
    "top_fraction_mask",
    "top_p_entropy_from_hidden",
    "tor_token_weights",
    "trajectory_dependency",
    "truncated_is_weights",
    "value_mean_correction",
    "vapo_rewards",
    "vepo_token_scores",
    "view_divergences_from_hidden",
]
