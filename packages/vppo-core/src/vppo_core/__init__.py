"""vppo-core: token-level perception-aware RL objectives as pure torch functions: VPPO, PGPO, DAPO, GRPO, and
PAPO, CFPO, DVRP, ToR, PEPO, CGPO, VEPO, VGPO, NoisyRollout, Perceval, DyCo-RL (ALGORITHMS.md §9).

Every function takes tensors and returns tensors; each docstring names the section of ALGORITHMS.md whose
formula it implements. Runtime dependency: torch only. See README.md for the API table.
"""

from vppo_core.advantages import group_advantages, keep_groups
from vppo_core.attention import dyco_attention_signals, fisher_rao_distance, text_only_attention
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
    noisyrollout_noise_step,
    patch_positions,
    perturb_pixels,
    vp_diffusion_image,
)
from vppo_core.shaping import (
    cgpo_response_factors,
    dyco_advantage_weights,
    dyco_response_scores,
    flagged_token_spans,
    minmax_by_response,
    pepo_token_weights,
    pepo_visual_prior,
    perceval_penalty_mask,
    perceval_token_advantages,
    perceval_token_weights,
    pgpo_token_weights,
    tas_bounds,
    tas_scale,
    tas_scale_reference,
    tor_token_weights,
    vgpo_compensated_scores,
    vgpo_response_factors,
    vgpo_token_factors,
    vgpo_visual_focus,
)

__all__ = [
    "AGGREGATIONS",
    "IMAGE_PERTURBATIONS",
    "KL_ESTIMATORS",
    "LOSS_TYPES",
    "PERTURBATION_MODES",
    "SELECTION_SCOPES",
    "abs_log_ratio",
    "blacken_image_blocks",
    "cgpo_response_factors",
    "cross_modal_value_mean_attention",
    "diffusion_noise_level",
    "dyco_advantage_weights",
    "dyco_attention_signals",
    "dyco_response_scores",
    "exact_token_dependency",
    "exact_token_dependency_from_hidden",
    "fisher_rao_distance",
    "flagged_token_spans",
    "group_advantages",
    "image_spans",
    "keep_groups",
    "kl_penalty",
    "logprobs_from_hidden",
    "minmax_by_response",
    "noisyrollout_noise_step",
    "patch_positions",
    "pepo_token_weights",
    "pepo_visual_prior",
    "perceval_penalty_mask",
    "perceval_token_advantages",
    "perceval_token_weights",
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
    "vepo_token_scores",
    "vgpo_compensated_scores",
    "vgpo_response_factors",
    "vgpo_token_factors",
    "vgpo_visual_focus",
    "view_divergences_from_hidden",
    "vp_diffusion_image",
]
