"""Transcription of the arithmetic of the EasyR1 fork ``zsxm1998/awesome-perception-aware-rlvr``.

For side-by-side tests of vppo's own implementations: what the fork computes, in the fork's operation order, with
its eps values, clamps, dtypes and fp32 upcasts. Our own code, not a copy: config dicts, metrics bookkeeping, the
DataProto plumbing and the distributed parts are left out. Every function names the file, the function, the commit
and the ``read_file`` page (character offset) it was read from. Pages are 16,000 characters, so "page 32000" means
the text between offsets 32,000 and 48,000.

Files read (through the public-code index; the repository could not be fetched, so there are no line numbers):

==========================================  ==========================================  ===========
file                                        commit                                      total chars
==========================================  ==========================================  ===========
verl/trainer/perception_reasoning_loss.py   160666da5d81cbe043d31e63fba6862187df8177    55,806
verl/trainer/visual_sensitivity.py          37e3d36ab9eb85299167fd30e22c3a04bb49e0ae    20,605
verl/trainer/core_algos.py                  eb793a9b32e2aefc77cd077f297a18973737c66b    22,177
verl/utils/torch_functional.py              469d8074eb69b07d3121d6488a34c7696ed8d319    18,739
verl/utils/perturbations/pixel.py           5d666a136cba650c7869eadef519938182da8b2f    6,396
verl/workers/actor/dp_actor.py              07ba9b00424721c51b9639dca717c82baa17cac6    52,416
verl/trainer/ray_trainer.py                 (find_string hit, index id 70232717343)     68,393
==========================================  ==========================================  ===========

Abbreviations used below: ``PRL`` = perception_reasoning_loss.py@160666d, ``VS`` = visual_sensitivity.py@37e3d36,
``CA`` = core_algos.py@eb793a9, ``TF`` = torch_functional.py@469d807, ``PX`` = pixel.py@5d666a1,
``DPA`` = dp_actor.py@07ba9b0.

Dtype rules the fork follows and that a comparison has to respect:

* ``_compute_top_quantile_mask`` computes k = ceil(N * q) **in the dtype of the values** (``new_tensor``) for
  ``batch`` and in float32 for ``response``: with N = 10, q = 0.3 the float64 product 3.0000000000000004 rounds to
  float32 3.0, so k = 3, where ``math.ceil(10 * 0.3)`` would give 4.
* ``minmax_normalize_by_response``, PGPO, PEPO, the schedule, ``top_p_entropy_from_logits``, the full-vocab
  components and the hidden-state scores upcast to float32. ``entropy_from_logits`` (the update-forward entropy
  used by PEPO and by ``entropy_loss_type=full``) does **not** upcast. The sampled k3 does not upcast; the
  abs log ratio does.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "FORK_REPO",
    "fork_advantage_scaling",
    "fork_apply_advantage_scaling_schedule",
    "fork_average_loss",
    "fork_cgpo_response_scaling",
    "fork_cgpo_shaping_context",
    "fork_combine_full_vocab_scores",
    "fork_combine_masks",
    "fork_compute_kl",
    "fork_compute_noise_schedule",
    "fork_compute_policy_loss",
    "fork_dp_actor_micro_batch_loss",
    "fork_entropy_from_logits",
    "fork_entropy_term",
    "fork_full_vocab_components",
    "fork_hidden_similarity_scores",
    "fork_hidden_visual_scores",
    "fork_masked_mean",
    "fork_minmax_normalize_by_response",
    "fork_pepo_token_scaling",
    "fork_perception_loss",
    "fork_pgpo_token_scaling",
    "fork_response_mean_scores",
    "fork_sampled_abs_log_ratio",
    "fork_sampled_boxcox",
    "fork_sampled_low_var_kl",
    "fork_sampled_sensitivity_scores",
    "fork_schedule_progress",
    "fork_top_p_entropy_from_logits",
    "fork_top_quantile_mask",
    "fork_tor_weight",
    "fork_vp_diffusion_alphas_cumprod",
    "fork_vp_diffusion_noise",
    "fork_vp_diffusion_noise_fraction",
    "fork_vppo_response_scaling",
    "fork_vppo_shaping_context",
]

FORK_REPO = "zsxm1998/awesome-perception-aware-rlvr"

# ============================================================================================== averaging, PG loss


def fork_masked_mean(values: torch.Tensor, mask: torch.Tensor, dim: int | None = None, eps: float = 1e-8):
    """``VF.masked_mean`` (TF ``masked_mean``, page 0): Σ(v·m) / (Σm + eps)."""
    return (values * mask).sum(dim=dim) / (mask.sum(dim=dim) + eps)


def fork_average_loss(values: torch.Tensor, mask: torch.Tensor, mode: str, eps: float = 1e-8) -> torch.Tensor:
    """CA ``average_loss`` (page 0, near its end).

    token: Σ(v·m) / (Σm + eps) over the whole tensor. seq: mean over rows of Σ_t(v·m) / (Σ_t m + eps); every row of
    the tensor counts, also rows with no valid token (they contribute 0). none: the tensor.
    """
    if mode == "token":
        return fork_masked_mean(values, mask, eps=eps)
    if mode == "seq":
        return ((values * mask).sum(-1) / (mask.sum(-1) + eps)).mean()
    if mode == "none":
        return values
    raise NotImplementedError(f"Unknown mode: {mode}.")


def fork_compute_policy_loss(
    old_log_probs: torch.Tensor,
    log_probs: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.3,
    clip_ratio_dual: float = 3.0,
    loss_avg_mode: str = "token",
) -> tuple[torch.Tensor, dict[str, float]]:
    """CA ``compute_policy_loss`` with ``loss_type="default"`` (clip + dual clip); read at page 0 (signature) and
    page 16000 (body). Defaults are ActorConfig's (workers/actor/config.py@07ba9b0 per our notes).

    log r = log p − log p_old; ratio = exp(clamp(log r, −20, 20)); clipped = exp(clamp(log r, log(1 − ε_low),
    log(1 + ε_high))) (the clamp happens in log space); l1 = −A·ratio, l2 = −A·clipped, l3 = −A·dual;
    higher = max(l1, l2); lower = min(higher, l3); loss = where(A < 0, lower, higher). Then
    ``average_loss(loss, response_mask, loss_avg_mode)``. The fork uses ``np.log`` for the bounds; ``math.log`` gives
    the same float64 numbers. Metrics are masked means (eps 1e-8) of the token indicators, as in the fork.
    """
    negative_approx_kl = log_probs - old_log_probs
    log_importance_ratio = negative_approx_kl
    ratio = torch.exp(torch.clamp(log_importance_ratio, -20.0, 20.0))
    clipped_ratio = torch.exp(
        torch.clamp(log_importance_ratio, math.log(1.0 - clip_ratio_low), math.log(1.0 + clip_ratio_high))
    )
    metrics = {"ppo_kl": -negative_approx_kl}
    metrics["entropy_loss"] = fork_average_loss(-log_probs, response_mask, mode=loss_avg_mode)
    pg_loss = -advantages * ratio
    pg_loss2 = -advantages * clipped_ratio
    pg_loss3 = -advantages * clip_ratio_dual
    clipped_pg_loss_higher = torch.max(pg_loss, pg_loss2)
    metrics["pg_clipfrac_higher"] = (pg_loss < pg_loss2).float()
    clipped_pg_loss_lower = torch.min(clipped_pg_loss_higher, pg_loss3)
    final_pg_loss = torch.where(advantages < 0, clipped_pg_loss_lower, clipped_pg_loss_higher)
    metrics["pg_clipfrac_lower"] = (clipped_pg_loss_higher > pg_loss3).float() * (advantages < 0).float()
    final_pg_loss = fork_average_loss(final_pg_loss, response_mask, mode=loss_avg_mode)
    metrics = {k: fork_masked_mean(v, response_mask).detach().item() for k, v in metrics.items()}
    return final_pg_loss, metrics


def fork_compute_kl(log_probs: torch.Tensor, ref_log_probs: torch.Tensor, kl_penalty: str = "low_var_kl"):
    """CA ``compute_kl`` (page 16000): the reference-KL loss term of dp_actor. Both inputs upcast to fp32 first.

    low_var_kl: kl = clamp(ref − log p, ±20); kld = exp(kl) − kl − 1; clamp to [−10, 10].
    """
    log_probs, ref_log_probs = log_probs.float(), ref_log_probs.float()
    if kl_penalty == "kl":
        return log_probs - ref_log_probs
    if kl_penalty == "abs":
        return (log_probs - ref_log_probs).abs()
    if kl_penalty == "mse":
        return 0.5 * (log_probs - ref_log_probs).square()
    if kl_penalty == "low_var_kl":
        kl = (ref_log_probs - log_probs).clamp(-20.0, 20.0)
        kld = (kl.exp() - kl - 1).contiguous()
        return torch.clamp(kld, min=-10.0, max=10.0)
    raise NotImplementedError(f"Unknown KL penalty: {kl_penalty}.")


def fork_dp_actor_micro_batch_loss(
    pg_loss: torch.Tensor,
    response_mask: torch.Tensor,
    loss_avg_mode: str,
    mini_batch_response_mask: torch.Tensor,
    *,
    log_probs: torch.Tensor | None = None,
    ref_log_probs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    kl_penalty: str = "low_var_kl",
    world_size: int = 1,
) -> torch.Tensor:
    """DPA ``update_policy`` (pages 32000 and 48000): the loss one micro-batch back-propagates.

    loss = pg_loss (+ kl_coef · average_loss(compute_kl(log p, ref), response_mask, mode) when ``ref_log_probs`` is
    given, i.e. use_kl_loss), then rescaled: seq mode × rows(micro) · world / #responses of the mini-batch with ≥ 1
    token (all ranks); token mode × Σ response_mask(micro) · world / Σ response_mask(mini-batch, all ranks).
    ``mini_batch_response_mask`` stands for the all-reduced mini-batch (single rank: the mini-batch's mask).
    """
    if loss_avg_mode == "seq":
        total_responses = torch.sum(mini_batch_response_mask.sum(-1) > 0)
    else:
        total_response_tokens = torch.sum(mini_batch_response_mask)
    if ref_log_probs is not None:
        kld = fork_compute_kl(log_probs=log_probs, ref_log_probs=ref_log_probs, kl_penalty=kl_penalty)
        kl_loss = fork_average_loss(kld, response_mask, mode=loss_avg_mode)
        loss = pg_loss + kl_loss * kl_coef
    else:
        loss = pg_loss
    if loss_avg_mode == "seq":
        loss = loss * response_mask.size(0) * world_size / total_responses
    else:
        loss = loss * torch.sum(response_mask) * world_size / total_response_tokens
    return loss


# ================================================================================================ sampled metrics


def fork_sampled_low_var_kl(
    corrupted_log_probs: torch.Tensor, reference_log_probs: torch.Tensor, reference_mode: str
) -> torch.Tensor:
    """VS ``compute_sampled_low_var_kl`` (page 0). No dtype upcast.

    d = clamp(q − ref, −20, 20); k3 = exp(d) − d − 1; clamp to [−10, 10] if reference_mode == "current", else
    [0, 10]. Grad flows through whichever input carries it (``log_prob`` in "current" mode).
    """
    log_diff = torch.clamp(corrupted_log_probs - reference_log_probs, min=-20.0, max=20.0)
    kl_prcp = torch.exp(log_diff) - log_diff - 1.0
    kl_prcp_min = -10.0 if reference_mode == "current" else 0.0
    return torch.clamp(kl_prcp, min=kl_prcp_min, max=10.0).contiguous()


def fork_sampled_abs_log_ratio(corrupted_log_probs: torch.Tensor, reference_log_probs: torch.Tensor) -> torch.Tensor:
    """VS ``compute_sampled_abs_log_ratio`` (page 0; ToR): |ref.float() − q.float()|, unclamped."""
    return (reference_log_probs.float() - corrupted_log_probs.float()).abs().contiguous()


def fork_sampled_boxcox(
    corrupted_log_probs: torch.Tensor, reference_log_probs: torch.Tensor, alpha: float
) -> torch.Tensor:
    """VS ``compute_sampled_boxcox`` (page 0): (exp(α·ref) − exp(α·q)) / α; fp16/bf16 inputs upcast to fp32."""
    if alpha <= 0.0:
        raise ValueError(f"sampled_boxcox requires alpha > 0, but got {alpha}.")
    if reference_log_probs.dtype in (torch.float16, torch.bfloat16):
        reference_log_probs = reference_log_probs.float()
    if corrupted_log_probs.dtype in (torch.float16, torch.bfloat16):
        corrupted_log_probs = corrupted_log_probs.float()
    reference_powers = torch.exp(alpha * reference_log_probs)
    corrupted_powers = torch.exp(alpha * corrupted_log_probs)
    return ((reference_powers - corrupted_powers) / alpha).contiguous()


def fork_sampled_sensitivity_scores(
    metric: str,
    corrupted_log_probs: torch.Tensor,
    reference_log_probs: torch.Tensor,
    reference_mode: str = "current",
    boxcox_alpha: float = 1.0,
) -> torch.Tensor:
    """VS ``compute_sampled_sensitivity_scores`` (page 0). ``sampled_positive_log_ratio`` is accepted by PRL@160666d
    but its estimator is in no stored version of visual_sensitivity.py, so it is not transcribed (raises)."""
    if metric == "sampled_low_var_kl":
        return fork_sampled_low_var_kl(corrupted_log_probs, reference_log_probs, reference_mode)
    if metric == "sampled_boxcox":
        return fork_sampled_boxcox(corrupted_log_probs, reference_log_probs, alpha=boxcox_alpha)
    if metric == "sampled_abs_log_ratio":
        return fork_sampled_abs_log_ratio(corrupted_log_probs, reference_log_probs)
    raise ValueError(f"Unsupported (or not transcribed) sampled visual_sensitivity_metric: {metric}")


# ============================================================================================ per-response helpers


def fork_response_mean_scores(
    per_token_scores: torch.Tensor, response_mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """VS ``compute_response_mean_scores`` (page 0): (Σ_t s·m / clamp(Σ_t m, min=1), Σ_t m > 0)."""
    num_valid_tokens = response_mask.sum(dim=1)
    valid_scores_mask = num_valid_tokens > 0
    response_scores = (per_token_scores * response_mask).sum(dim=1) / num_valid_tokens.clamp(min=1.0)
    return response_scores, valid_scores_mask


def fork_minmax_normalize_by_response(
    values: torch.Tensor, valid_mask: torch.Tensor, eps: float = 1e-8
) -> torch.Tensor:
    """VS ``minmax_normalize_by_response`` (page 16000). fp32; ``valid_mask`` must be bool.

    (x − min) / clamp(max − min, min=eps) per row over valid entries, invalid → 0, then clamp to [0, 1]. A row with
    all-equal values gives 0 everywhere; a row with no valid entry gives 0 (NaN from inf − inf is masked).
    """
    values = values.float()
    min_values = values.masked_fill(~valid_mask, float("inf")).min(dim=-1, keepdim=True).values
    max_values = values.masked_fill(~valid_mask, float("-inf")).max(dim=-1, keepdim=True).values
    normalized = (values - min_values) / (max_values - min_values).clamp(min=eps)
    return normalized.masked_fill(~valid_mask, 0.0).clamp(0.0, 1.0)


# ================================================================================================== top-quantile


def fork_top_quantile_mask(
    values: torch.Tensor,
    mask: torch.Tensor,
    quantile: float,
    granularity: str,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PRL ``_compute_top_quantile_mask`` (pages 16000 → 32000). Returns (mask, threshold, fraction).

    ``batch`` (2-D values): k = int(ceil(values.new_tensor(N · q))) over the N valid entries, in the values' dtype.
    Without a generator: ``torch.sort(valid.float(), descending=True)`` (not stable), the first k. With a generator:
    ``perm = torch.randperm(N, generator=generator)`` (on the generator's device, CPU in the fork, then moved),
    ``order = sort(valid[perm].float(), descending=True, stable=True)``, selected = perm[order][:k]; so ties are
    ordered by the random permutation. Valid entries are enumerated in ``mask.nonzero()`` (row-major) order.
    threshold = the k-th sorted value (fp32), NaN if k = 0.

    ``response``: k_i = ceil(float(L_i) · q) (fp32); invalid → −inf in the values' dtype; per-row
    ``torch.sort(descending=True)`` (not stable), keep ranks < k_i, AND valid. threshold = mean over rows with
    k_i > 0 of their k_i-th sorted value (NaN if none).

    fraction = Σmask / clamp(Σvalid, 1). The driver seeds the generator with
    ``torch.Generator().manual_seed(int(tie_break_seed))`` (PRL ``build_batch_token_masks``, page 0), one generator
    for the entropy mask and then the perception mask, in that order.
    """
    valid_mask = mask.to(torch.bool)
    if granularity == "batch":
        valid_values = values[valid_mask]
        topk = int(torch.ceil(valid_values.new_tensor(valid_values.numel() * quantile)).item())
        if topk > 0:
            valid_positions = valid_mask.nonzero(as_tuple=False)
            if generator is None:
                sorted_vals, sorted_order = torch.sort(valid_values.float(), descending=True)
            else:
                permutation = torch.randperm(valid_values.numel(), generator=generator).to(valid_values.device)
                sorted_vals, order = torch.sort(valid_values[permutation].float(), descending=True, stable=True)
                sorted_order = permutation[order]
            selected_positions = valid_positions[sorted_order[:topk]]
            out = torch.zeros_like(valid_mask)
            out[selected_positions[:, 0], selected_positions[:, 1]] = True
            threshold = sorted_vals[topk - 1]
        else:
            threshold = torch.tensor(float("nan"), device=values.device)
            out = torch.zeros_like(valid_mask)
    elif granularity == "response":
        values_for_sort = values.masked_fill(~valid_mask, float("-inf"))
        num_valid_tokens = valid_mask.sum(dim=1)
        topk = torch.ceil(num_valid_tokens.float() * quantile).to(torch.long)
        sorted_vals, sorted_indices = torch.sort(values_for_sort, dim=1, descending=True)
        range_tensor = torch.arange(values_for_sort.size(1), device=values.device).expand_as(values_for_sort)
        rank_mask = range_tensor < topk.unsqueeze(1)
        out = torch.zeros_like(valid_mask)
        out.scatter_(1, sorted_indices, rank_mask)
        out = out & valid_mask
        valid_thresholds = [sorted_vals[r, k - 1] for r, k in enumerate(topk.tolist()) if k > 0]
        threshold = (
            torch.stack(valid_thresholds).mean()
            if valid_thresholds
            else torch.tensor(float("nan"), device=values.device)
        )
    else:
        raise ValueError(f"Unsupported threshold granularity: {granularity}")
    fraction = out.sum().float() / valid_mask.sum().clamp(min=1).float()
    return out, threshold, fraction


# =============================================================================================== entropy, ToR


def fork_entropy_from_logits(logits: torch.Tensor, chunk_size: int = 128) -> torch.Tensor:
    """TF ``entropy_from_logits`` (page 0): chunked −Σ exp(ls)·ls with ls = log_softmax(chunk) in the logits' own
    dtype (no fp32 upcast). This is the update-forward entropy (PEPO gate, ``entropy_loss_type=full``); DPA divides
    the logits by the temperature first."""
    original_shape = logits.shape[:-1]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for chunk in flat_logits.split(chunk_size, dim=0):
        logps = F.log_softmax(chunk, dim=-1)
        entropies.append(-(torch.exp(logps) * logps).sum(dim=-1))
    return torch.cat(entropies, dim=0).reshape(original_shape)


def fork_top_p_entropy_from_logits(logits: torch.Tensor, top_p: float, chunk_size: int = 128) -> torch.Tensor:
    """TF ``top_p_entropy_from_logits`` (page 0). top_p ≥ 1 → ``entropy_from_logits`` (no upcast).

    Otherwise per chunk: p = sort(softmax(chunk.float()), descending); kept = p · ((cumsum(p) − p) < top_p);
    kept /= Σkept; H = −Σ kept · log(clamp(kept, min=finfo(float32).tiny)).
    """
    if top_p >= 1.0:
        return fork_entropy_from_logits(logits, chunk_size=chunk_size)
    original_shape = logits.shape[:-1]
    flat_logits = logits.reshape(-1, logits.shape[-1])
    entropies = []
    for chunk in flat_logits.split(chunk_size, dim=0):
        sorted_probs, _ = torch.sort(F.softmax(chunk.float(), dim=-1), dim=-1, descending=True)
        kept = sorted_probs * ((sorted_probs.cumsum(dim=-1) - sorted_probs) < top_p)
        kept = kept / kept.sum(dim=-1, keepdim=True)
        entropies.append(-(kept * torch.log(kept.clamp(min=torch.finfo(kept.dtype).tiny))).sum(dim=-1))
    return torch.cat(entropies, dim=0).reshape(original_shape)


def fork_tor_weight(
    entropy_mask: torch.Tensor | None,
    perception_mask: torch.Tensor | None,
    rsn_weight: float = 1.0,
    prcp_weight: float = 0.5,
) -> torch.Tensor:
    """PRL ``_compute_tor_weight`` (page 48000): fp32 w = γ_r·1[E] + γ_p·1[P ∧ ¬E]."""
    if entropy_mask is None and perception_mask is None:
        raise ValueError("tor_use_token_weighting requires top_entropy_quantile<1 or top_perception_quantile<1.")
    reference = entropy_mask if entropy_mask is not None else perception_mask
    combined_weight = torch.zeros_like(reference, dtype=torch.float32)
    if entropy_mask is not None:
        combined_weight = combined_weight + entropy_mask.float() * rsn_weight
    if perception_mask is not None:
        if entropy_mask is not None:
            perception_mask = perception_mask & (~entropy_mask)
        combined_weight = combined_weight + perception_mask.float() * prcp_weight
    return combined_weight


def fork_combine_masks(entropy_mask: torch.Tensor | None, perception_mask: torch.Tensor | None) -> torch.Tensor:
    """PRL ``_combine_masks`` (page 48000): E | P, or whichever is given."""
    if entropy_mask is not None and perception_mask is not None:
        return entropy_mask | perception_mask
    if entropy_mask is not None:
        return entropy_mask
    if perception_mask is not None:
        return perception_mask
    raise ValueError("At least one mask must be provided.")


# ======================================================================================================== PGPO


def fork_pgpo_token_scaling(
    per_token_sensitivity: torch.Tensor,
    response_mask: torch.Tensor,
    threshold: float = 0.4,
    boost: float = 2.0,
    threshold_mode: str = "absolute",
    low_weight_floor: float = 0.0,
    mass_normalization: bool = True,
    eps: float = 1e-8,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """PRL ``_compute_pgpo_token_scaling`` (page 32000). Returns (weights in the input dtype, per-row threshold
    tensor in quantile mode, else None). fp32 inside; the input is not detached.

    s = log1p(clamp(S.float(), min=0)); I = minmax_resp(s, eps). quantile: L = valid count (keepdim),
    idx = min(long(float(L)·τ), clamp(L − 1, min=0)), τ_i = sort(I with invalid → +inf)[idx], 0 where L = 0;
    absolute: τ = float32 tensor of ``threshold``. below = I / clamp(τ, eps) (then clamp(min=floor) if floor > 0);
    above = 1 + (β·(I − τ)) / clamp(1 − τ, eps); raw = where(I < τ, below, above), invalid → 0.
    Mass normalization: w = raw·L / clamp(Σraw, eps) where Σraw > eps, else 1 on valid tokens; invalid → 0.
    """
    valid_mask = response_mask.to(torch.bool)
    scores = torch.log1p(torch.clamp(per_token_sensitivity.float(), min=0.0))
    normalized_scores = fork_minmax_normalize_by_response(scores, valid_mask, eps=eps)
    row_threshold = None
    if threshold_mode == "quantile":
        lengths = valid_mask.sum(dim=-1, keepdim=True)
        index = torch.minimum((lengths.float() * threshold).long(), (lengths - 1).clamp(min=0))
        sorted_scores = normalized_scores.masked_fill(~valid_mask, float("inf")).sort(dim=-1).values
        threshold_tensor = torch.where(lengths > 0, sorted_scores.gather(-1, index), 0.0)
        row_threshold = threshold_tensor
    elif threshold_mode == "absolute":
        threshold_tensor = scores.new_tensor(threshold)
    else:
        raise ValueError(f"Unknown pgpo_threshold_mode: {threshold_mode}")
    below = normalized_scores / threshold_tensor.clamp(min=eps)
    if low_weight_floor > 0.0:
        below = below.clamp(min=low_weight_floor)
    above = 1.0 + boost * (normalized_scores - threshold_tensor) / (1.0 - threshold_tensor).clamp(min=eps)
    raw_scaling = torch.where(normalized_scores < threshold_tensor, below, above)
    raw_scaling = raw_scaling.masked_fill(~valid_mask, 0.0)
    if mass_normalization:
        token_counts = valid_mask.sum(dim=-1, keepdim=True).to(raw_scaling.dtype)
        raw_sums = raw_scaling.sum(dim=-1, keepdim=True)
        mass_normalized = raw_scaling * token_counts / raw_sums.clamp(min=eps)
        fallback = valid_mask.to(raw_scaling.dtype)
        scaling = torch.where(raw_sums > eps, mass_normalized, fallback)
        scaling = scaling.masked_fill(~valid_mask, 0.0)
    else:
        scaling = raw_scaling
    return scaling.to(dtype=per_token_sensitivity.dtype), row_threshold


# ======================================================================================================== PEPO


def fork_pepo_token_scaling(
    visual_scores: torch.Tensor,
    entropy: torch.Tensor,
    response_mask: torch.Tensor,
    gate_alpha: float = 0.05,
    gate_temperature: float = 1.8,
    eps: float = 1e-8,
) -> torch.Tensor:
    """PRL ``_compute_pepo_token_scaling`` (page 32000). Detached, fp32; always returns fp32 (the fork casts to
    ``visual_scores.dtype`` after rebinding ``visual_scores`` to its fp32 copy).

    v̂ = minmax(v), Ĥ = minmax(H); m = v̂ + Ĥ; m̄ = Σ(m·valid) / clamp(L, 1); g = 1 + α·tanh(m − m̄);
    w = softmax_t((v·g / T) with invalid → −inf) · L, invalid → 0. Raises if a row has no valid token.
    """
    if visual_scores.shape != response_mask.shape or entropy.shape != response_mask.shape:
        raise ValueError("PEPO token scaling expects visual_scores, entropy, and response_mask to have the same shape.")
    if gate_temperature <= 0.0:
        raise ValueError(f"pepo_gate_temperature must be positive, but got {gate_temperature}.")
    valid_mask = response_mask.to(torch.bool)
    token_counts = valid_mask.sum(dim=-1, keepdim=True).to(dtype=torch.float32)
    if (token_counts == 0).any():
        raise ValueError("PEPO token scaling requires every response to contain at least one valid token.")
    visual_scores = visual_scores.detach().float()
    entropy = entropy.detach().float()
    visual_norm = fork_minmax_normalize_by_response(visual_scores, valid_mask, eps=eps)
    entropy_norm = fork_minmax_normalize_by_response(entropy, valid_mask, eps=eps)
    mixed = visual_norm + entropy_norm
    mixed_mean = (mixed * valid_mask.float()).sum(dim=-1, keepdim=True) / token_counts.clamp(min=1.0)
    gate = 1.0 + float(gate_alpha) * torch.tanh(mixed - mixed_mean)
    logits = visual_scores * gate / float(gate_temperature)
    logits = logits.masked_fill(~valid_mask, float("-inf"))
    scaling = torch.softmax(logits, dim=-1) * token_counts
    scaling = scaling.masked_fill(~valid_mask, 0.0)
    return scaling.to(dtype=visual_scores.dtype)


def fork_hidden_similarity_scores(
    response_hidden: torch.Tensor, visual_hidden: torch.Tensor, metric: str = "cosine"
) -> torch.Tensor:
    """DPA ``_hidden_similarity_scores`` (page 16000), one row: [R, D] × [V, D] → [R], fp32.

    cosine: mean_j ⟨normalize(h_t), normalize(h_j)⟩ (F.normalize, p=2, eps 1e-12); dot: mean_j ⟨h_t, h_j⟩;
    l1: −mean_j ‖h_t − h_j‖₁; l2: −mean_j sqrt(clamp(‖h_t − h_j‖², min=0) + 1e-6).
    """
    response_hidden = response_hidden.float()
    visual_hidden = visual_hidden.float()
    if metric == "cosine":
        response_norm = F.normalize(response_hidden, p=2, dim=-1)
        visual_norm = F.normalize(visual_hidden, p=2, dim=-1)
        return response_norm.matmul(visual_norm.transpose(0, 1)).mean(dim=-1)
    if metric == "dot":
        return response_hidden.matmul(visual_hidden.transpose(0, 1)).mean(dim=-1)
    diff = response_hidden.unsqueeze(1) - visual_hidden.unsqueeze(0)
    if metric == "l1":
        return -diff.abs().sum(dim=-1).mean(dim=-1)
    if metric == "l2":
        dist_sq = diff.pow(2).sum(dim=-1).clamp_min(0.0)
        return -torch.sqrt(dist_sq + 1e-6).mean(dim=-1)
    raise ValueError(f"Unsupported visual_sensitivity_hidden_metric: {metric}")


def fork_hidden_visual_scores(
    hidden_states: Sequence[torch.Tensor],
    input_ids: torch.Tensor,
    response_length: int,
    response_mask: torch.Tensor | None,
    visual_token_ids: Sequence[int],
    metric: str = "cosine",
) -> torch.Tensor:
    """DPA ``_compute_hidden_visual_scores`` + ``_prepare_hidden_visual_masks`` +
    ``_compute_hidden_visual_scores_for_layer`` + ``_finalize_hidden_visual_scores`` (page 16000; padded path —
    the padding-free path of ``_forward_micro_batch``, page 0, pads each layer back and does the same).

    ``hidden_states``: every tensor HF returns (embedding output + each decoder layer), each [B, S', D]; the last S
    positions are used (S = input_ids width). Visual tokens: ``isin(input_ids, visual_token_ids)`` over the whole
    row. Response hidden states: positions ``[-response_length:]`` — the positions whose *input* is the response
    token y_t (the log-probs use the logits at ``[-response_length-1:-1]``, one to the left). Per layer an fp32 score
    per row; sum over layers in order, / number of layers, invalid response positions → 0, detached.
    """
    if not hidden_states:
        raise ValueError("hidden_state_similarity requires model outputs to include hidden_states.")
    if not visual_token_ids:
        raise ValueError("hidden_state_similarity requires non-empty visual_token_ids from the driver.")
    visual_ids = torch.tensor(list(visual_token_ids), dtype=input_ids.dtype, device=input_ids.device)
    visual_mask = torch.isin(input_ids, visual_ids)
    if response_mask is not None:
        response_mask_bool = response_mask.to(torch.bool)
    else:
        response_mask_bool = torch.ones((input_ids.size(0), response_length), dtype=torch.bool, device=input_ids.device)
    scores_accum = None
    num_layers = 0
    for layer_hidden in hidden_states:
        layer_hidden = layer_hidden[:, -input_ids.size(1) :, :]
        response_hidden = layer_hidden[:, -response_length:, :]
        layer_scores = response_hidden.new_zeros((layer_hidden.size(0), response_length), dtype=torch.float32)
        for row_idx in range(layer_hidden.size(0)):
            row_visual_hidden = layer_hidden[row_idx, visual_mask[row_idx]]
            if row_visual_hidden.numel() == 0:
                raise ValueError("hidden_state_similarity could not find visual tokens in a training sample.")
            layer_scores[row_idx] = fork_hidden_similarity_scores(
                response_hidden[row_idx], row_visual_hidden, metric=metric
            )
        scores_accum = layer_scores if scores_accum is None else scores_accum + layer_scores
        num_layers += 1
    scores = scores_accum / num_layers
    scores = scores.masked_fill(~response_mask_bool, 0.0)
    return scores.detach()


# ================================================================================================== VEPO (full vocab)


def fork_full_vocab_components(
    logits: torch.Tensor,
    corrupted_logits: torch.Tensor,
    component_names: set[str] | None = None,
    eps: float = 1e-8,
    chunk_size: int = 32,
) -> dict[str, torch.Tensor]:
    """VS ``compute_full_vocab_visual_sensitivity_components`` (pages 0 → 16000). fp32, chunks of 32 rows.

    For metric "vepo" with gate "normal_entropy" the fork requests {"jsd", "abs_entropy_gap", "entropy"}
    (``_required_full_vocab_component_names``); "abs_entropy_gap" adds "entropy" and "corrupted_entropy".
    lp = log_softmax(z.float()), lq likewise; safe = clamp(·, min=log(eps)); p = exp(lp), q = exp(lq).
    entropy = −Σ p·safe_lp; corrupted_entropy = −Σ q·safe_lq; log m = log(½(p + q) + eps);
    jsd = clamp(½Σ p(safe_lp − log m) + ½Σ q(safe_lq − log m), min=0); kl = clamp(Σ p(safe_lp − safe_lq), min=0);
    hellinger = sqrt(½ Σ (√p − √q)²); abs_entropy_gap = |corrupted_entropy − entropy|.
    """
    if logits.shape != corrupted_logits.shape:
        raise ValueError("normal and corrupted logits must have the same shape")
    if component_names is None:
        component_names = {"jsd", "kl", "hellinger", "entropy", "corrupted_entropy", "abs_entropy_gap"}
    component_names = set(component_names)
    if "abs_entropy_gap" in component_names:
        component_names.update({"entropy", "corrupted_entropy"})
    original_shape = logits.shape[:-1]
    vocab_size = logits.shape[-1]
    flat_logits = logits.reshape(-1, vocab_size)
    flat_corrupted_logits = corrupted_logits.reshape(-1, vocab_size)
    if flat_logits.size(0) == 0:
        empty = logits.new_zeros(original_shape, dtype=torch.float32)
        return dict.fromkeys(component_names, empty)
    chunks: dict[str, list[torch.Tensor]] = {name: [] for name in component_names}
    log_eps = math.log(eps)
    for logits_chunk, corrupted_chunk in zip(
        flat_logits.split(chunk_size, dim=0), flat_corrupted_logits.split(chunk_size, dim=0), strict=True
    ):
        log_probs = F.log_softmax(logits_chunk.float(), dim=-1)
        corrupted_log_probs = F.log_softmax(corrupted_chunk.float(), dim=-1)
        safe_log_probs = torch.clamp(log_probs, min=log_eps)
        safe_corrupted_log_probs = torch.clamp(corrupted_log_probs, min=log_eps)
        probs = torch.exp(log_probs)
        corrupted_probs = torch.exp(corrupted_log_probs)
        if "entropy" in component_names:
            chunks["entropy"].append(-(probs * safe_log_probs).sum(dim=-1))
        if "corrupted_entropy" in component_names:
            chunks["corrupted_entropy"].append(-(corrupted_probs * safe_corrupted_log_probs).sum(dim=-1))
        if "jsd" in component_names:
            mean_log_probs = torch.log(0.5 * (probs + corrupted_probs) + eps)
            jsd_chunk = 0.5 * (probs * (safe_log_probs - mean_log_probs)).sum(dim=-1)
            jsd_chunk = jsd_chunk + 0.5 * (corrupted_probs * (safe_corrupted_log_probs - mean_log_probs)).sum(dim=-1)
            chunks["jsd"].append(torch.clamp(jsd_chunk, min=0.0))
        if "kl" in component_names:
            kl_chunk = (probs * (safe_log_probs - safe_corrupted_log_probs)).sum(dim=-1)
            chunks["kl"].append(torch.clamp(kl_chunk, min=0.0))
        if "hellinger" in component_names:
            hellinger_chunk = torch.sqrt(0.5 * (torch.sqrt(probs) - torch.sqrt(corrupted_probs)).pow(2).sum(dim=-1))
            chunks["hellinger"].append(hellinger_chunk)
    components = {
        name: torch.cat(parts, dim=0).reshape(original_shape)
        for name, parts in chunks.items()
        if name != "abs_entropy_gap"
    }
    if "abs_entropy_gap" in component_names:
        components["abs_entropy_gap"] = torch.abs(components["corrupted_entropy"] - components["entropy"])
    return components


def fork_combine_full_vocab_scores(
    components: dict[str, torch.Tensor],
    response_mask: torch.Tensor,
    metric: str = "vepo",
    jsd_weight: float = 0.5,
    entropy_gate: str = "none",
) -> torch.Tensor:
    """VS ``combine_full_vocab_visual_sensitivity_scores`` (page 16000). fp32.

    vepo: s = 1 − (1 − ĵ)^α · (1 − ĝ)^(1−α) with ĵ, ĝ = minmax_resp(jsd), minmax_resp(abs_entropy_gap) and
    α = ``jsd_weight``; gate "normal_entropy": s ·= minmax_resp(entropy); finally s ·= response_mask (as fp32).
    """
    components = {key: value.float() for key, value in components.items()}
    valid_mask = response_mask.to(torch.bool)
    response_dtype = next(iter(components.values())).dtype
    response_mask = response_mask.to(dtype=response_dtype)
    if metric == "full_vocab_jsd":
        scores = components["jsd"]
    elif metric == "full_vocab_kl":
        scores = components["kl"]
    elif metric == "full_vocab_hellinger":
        scores = components["hellinger"]
    elif metric == "full_vocab_abs_entropy_gap":
        scores = components["abs_entropy_gap"]
    elif metric == "vepo":
        jsd_norm = fork_minmax_normalize_by_response(components["jsd"], valid_mask)
        gap_norm = fork_minmax_normalize_by_response(components["abs_entropy_gap"], valid_mask)
        scores = 1.0 - (1.0 - jsd_norm).pow(jsd_weight) * (1.0 - gap_norm).pow(1.0 - jsd_weight)
    else:
        raise ValueError(f"Unsupported visual_sensitivity_metric: {metric}")
    if entropy_gate == "normal_entropy":
        scores = scores * fork_minmax_normalize_by_response(components["entropy"], valid_mask)
    elif entropy_gate != "none":
        raise ValueError(f"Unsupported visual_sensitivity_entropy_gate: {entropy_gate}")
    return scores * response_mask


# =========================================================================================== VPPO / CGPO response


def fork_vppo_shaping_context(
    sensitivity_scores: torch.Tensor, valid_scores_mask: torch.Tensor
) -> dict[str, float] | None:
    """PRL ``_compute_vppo_advantage_shaping_context_from_scores`` (page 32000): over the valid response means of
    the whole rollout batch, {global_min_score: quantile(·, 0).item(), global_max_score: quantile(·, 1).item()};
    None if ≤ 1 valid response. (The driver gets the means from ``compute_response_mean_scores`` of the token k3
    with reference "old", PRL ``build_sensitivity_advantage_shaping_context``, page 0.)"""
    valid_scores = sensitivity_scores[valid_scores_mask]
    if valid_scores.numel() <= 1:
        return None
    return {
        "global_min_score": torch.quantile(valid_scores, 0.0).item(),
        "global_max_score": torch.quantile(valid_scores, 1.0).item(),
    }


def fork_vppo_response_scaling(
    per_token_sensitivity: torch.Tensor,
    response_mask: torch.Tensor,
    scaling_min: float = 0.9,
    shaping_context: dict[str, float] | None = None,
) -> torch.Tensor:
    """PRL ``_compute_vppo_response_scaling`` (page 32000): one factor per row of *this micro-batch*.

    s_i = response means; min/max from the context as tensors of s's dtype. If max − min > 1e-6:
    n = clamp((s − min)/(max − min), 0, 1) over valid rows, μ = mean(n), β_max = m + (1 − m)/(μ + 1e-8),
    f = m + n·(β_max − m); other rows (and the degenerate case) keep 1.
    """
    if shaping_context is None:
        raise ValueError("VPPO response scaling requires a precomputed advantage_shaping_context.")
    sensitivity_scores, valid_scores_mask = fork_response_mean_scores(per_token_sensitivity, response_mask)
    scaling_factors = torch.ones_like(sensitivity_scores)
    global_min_score = torch.tensor(
        shaping_context["global_min_score"], device=sensitivity_scores.device, dtype=sensitivity_scores.dtype
    )
    global_max_score = torch.tensor(
        shaping_context["global_max_score"], device=sensitivity_scores.device, dtype=sensitivity_scores.dtype
    )
    if valid_scores_mask.any() and not torch.isnan(global_min_score) and not torch.isnan(global_max_score):
        valid_scores = sensitivity_scores[valid_scores_mask]
        if (global_max_score - global_min_score) > 1e-6:
            normalized_scores = (valid_scores - global_min_score) / (global_max_score - global_min_score)
            normalized_scores = torch.clamp(normalized_scores, 0.0, 1.0)
            mu_norm = normalized_scores.mean()
            dynamic_tas_beta_max = scaling_min + (1.0 - scaling_min) / (mu_norm + 1e-8)
            mapped_scores = scaling_min + normalized_scores * (dynamic_tas_beta_max - scaling_min)
            scaling_factors[valid_scores_mask] = mapped_scores
    return scaling_factors


def fork_cgpo_shaping_context(
    sensitivity_scores: torch.Tensor, valid_scores_mask: torch.Tensor
) -> dict[str, float] | None:
    """PRL ``_compute_cgpo_advantage_shaping_context_from_scores`` (page 32000): median = ``valid.median()`` (the
    lower median for an even count), MAD = ``(valid − median).abs().median()``; None if ≤ 1 valid response."""
    valid_scores = sensitivity_scores[valid_scores_mask]
    if valid_scores.numel() <= 1:
        return None
    global_median_score = valid_scores.median()
    global_mad_score = (valid_scores - global_median_score).abs().median()
    return {"global_median_score": global_median_score.item(), "global_mad_score": global_mad_score.item()}


def fork_cgpo_response_scaling(
    per_token_sensitivity: torch.Tensor,
    response_mask: torch.Tensor,
    scaling_coef: float = 0.1,
    shaping_context: dict[str, float] | None = None,
) -> torch.Tensor:
    """PRL ``_compute_cgpo_response_scaling`` (pages 32000 → 48000): α_i = 1 + λ·tanh((s_i − median)/(MAD + 1e-8))
    for rows with a valid token, 1 otherwise; median and MAD as tensors of s's dtype."""
    if shaping_context is None:
        raise ValueError("CGPO response scaling requires a precomputed advantage_shaping_context.")
    sensitivity_scores, valid_scores_mask = fork_response_mean_scores(per_token_sensitivity, response_mask)
    scaling_factors = torch.ones_like(sensitivity_scores)
    global_median_score = torch.tensor(
        shaping_context["global_median_score"], device=sensitivity_scores.device, dtype=sensitivity_scores.dtype
    )
    global_mad_score = torch.tensor(
        shaping_context["global_mad_score"], device=sensitivity_scores.device, dtype=sensitivity_scores.dtype
    )
    if valid_scores_mask.any() and not torch.isnan(global_median_score) and not torch.isnan(global_mad_score):
        valid_scores = sensitivity_scores[valid_scores_mask]
        normalized_scores = (valid_scores - global_median_score) / (global_mad_score + 1e-8)
        mapped_scores = 1.0 + scaling_coef * torch.tanh(normalized_scores)
        scaling_factors[valid_scores_mask] = mapped_scores
    return scaling_factors


def fork_advantage_scaling(
    scaling_method: str,
    per_token_sensitivity: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    shaping_context: dict[str, float] | None = None,
    perception_mask: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    vppo_response_scaling_min: float = 0.9,
    cgpo_response_scaling_coef: float = 0.1,
    pgpo_kwargs: dict | None = None,
    pepo_gate_alpha: float = 0.05,
    pepo_gate_temperature: float = 1.8,
) -> torch.Tensor:
    """PRL ``_compute_advantage_scaling`` (page 32000): the token factor tensor for A' = A · factor.

    vppo: the response factor expanded to every position (padding included; the PG average masks it).
    cgpo: where(perception_mask, α_i, 1); all ones if there is no perception mask. pgpo / pepo: their token weights.
    """
    if scaling_method == "vppo":
        response_scaling = fork_vppo_response_scaling(
            per_token_sensitivity, response_mask, vppo_response_scaling_min, shaping_context
        )
        return response_scaling.unsqueeze(-1).expand_as(per_token_sensitivity)
    if scaling_method == "cgpo":
        response_scaling = fork_cgpo_response_scaling(
            per_token_sensitivity, response_mask, cgpo_response_scaling_coef, shaping_context
        )
        if perception_mask is None:
            return torch.ones_like(per_token_sensitivity)
        return torch.where(
            perception_mask,
            response_scaling.unsqueeze(-1).expand_as(per_token_sensitivity),
            torch.ones_like(per_token_sensitivity),
        )
    if scaling_method == "pgpo":
        return fork_pgpo_token_scaling(per_token_sensitivity, response_mask, **(pgpo_kwargs or {}))[0]
    if scaling_method == "pepo":
        if entropy is None:
            raise ValueError("PEPO advantage scaling requires current-policy entropy.")
        return fork_pepo_token_scaling(
            per_token_sensitivity, entropy, response_mask, pepo_gate_alpha, pepo_gate_temperature
        )
    raise ValueError(f"Unknown advantage_scaling_method: {scaling_method}")


def fork_schedule_progress(global_step: int, training_steps: int) -> float:
    """ray_trainer ``_build_perception_reasoning_loss_config`` (find_string hit at char 14,504 of index id
    70232717343): N = max(int(training_steps), 1); 1.0 if N == 1 else clamp((global_step − 1)/(N − 1), 0, 1)."""
    total_steps = max(int(training_steps), 1)
    if total_steps == 1:
        return 1.0
    return min(max(float(global_step - 1) / (total_steps - 1), 0.0), 1.0)


def fork_apply_advantage_scaling_schedule(
    scaling_factors: torch.Tensor, response_mask: torch.Tensor, schedule: str, progress: float
) -> torch.Tensor:
    """PRL ``_apply_advantage_scaling_schedule`` (page 32000): none → unchanged; linear →
    1 + λ(f.float() − 1) on valid tokens, 0 elsewhere, cast back to f's dtype; λ = clamp(progress, 0, 1)."""
    if schedule == "none":
        return scaling_factors
    if schedule != "linear":
        raise ValueError(f"Unknown advantage_scaling_schedule: {schedule}")
    progress = max(0.0, min(float(progress), 1.0))
    valid_mask = response_mask.to(torch.bool)
    scheduled = 1.0 + progress * (scaling_factors.float() - 1.0)
    scheduled = torch.where(valid_mask, scheduled, torch.zeros_like(scheduled))
    return scheduled.to(dtype=scaling_factors.dtype)


# ================================================================================================== loss assembly


def fork_entropy_term(log_prob: torch.Tensor | None, entropy: torch.Tensor | None, entropy_loss_type: str):
    """PRL ``_compute_entropy_term`` (page 48000): sampled → −log_prob; full → entropy."""
    if entropy_loss_type == "sampled":
        if log_prob is None:
            raise ValueError("Sampled entropy loss requires log_prob to be available.")
        return -log_prob
    if entropy_loss_type == "full":
        if entropy is None:
            raise ValueError("Full entropy loss requires entropy to be available.")
        return entropy
    raise ValueError(f"Unknown entropy_loss_type: {entropy_loss_type}")


def fork_perception_loss(
    log_prob: torch.Tensor,
    old_log_prob: torch.Tensor,
    advantages: torch.Tensor,
    response_mask: torch.Tensor,
    *,
    clip_ratio_low: float = 0.2,
    clip_ratio_high: float = 0.3,
    clip_ratio_dual: float = 3.0,
    loss_avg_mode: str = "token",
    entropy: torch.Tensor | None = None,
    decremental_old_log_probs: torch.Tensor | None = None,
    decremental_entropies: torch.Tensor | None = None,
    incremental_old_log_probs: torch.Tensor | None = None,
    incremental_entropies: torch.Tensor | None = None,
    scaling_factors: torch.Tensor | None = None,
    entropy_mask: torch.Tensor | None = None,
    perception_mask: torch.Tensor | None = None,
    region_token_mask: torch.Tensor | None = None,
    include_region_tokens_in_perception_mask: bool = False,
    tor_use_token_weighting: bool = False,
    tor_rsn_weight: float = 1.0,
    tor_prcp_weight: float = 0.5,
    normalize_pg_loss_by_selected_tokens: bool = False,
    visual_sensitivity_loss_coef: float = 0.0,
    visual_sensitivity_reference: str = "current",
    visual_sensitivity_metric: str = "sampled_low_var_kl",
    boxcox_alpha: float = 1.0,
    invariant_entropy_coef: float = 0.0,
    decremental_entropy_coef: float = 0.0,
    incremental_entropy_coef: float = 0.0,
    visual_robustness_loss_coef: float = 0.0,
    entropy_loss_type: str = "sampled",
    incremental_image_transform: str | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PRL ``compute_perception_reasoning_policy_loss`` (pages 0 → 16000 → 32000), steps 2–5, for given masks.

    Inputs standing in for step 1: ``entropy_mask`` / ``perception_mask`` are the masks the fork builds (batch
    granularity: the driver mask AND response_mask, which this function applies; micro_batch / response
    granularity: ``fork_top_quantile_mask(...)[0]``, already ANDed with the valid mask). ``scaling_factors`` is the
    token factor tensor after the schedule (``fork_advantage_scaling`` + ``fork_apply_advantage_scaling_schedule``),
    None for no advantage modulation.

    Order: A' = A·f; token PG terms (``fork_compute_policy_loss``, mode none); raw pg_loss = average over
    response_mask (the ``actor/pg_loss`` metric, not in the loss); ToR: PG · w, selected = w > 0; else
    PG · float(E | P); pg_loss_mask = selected & valid if ``normalize_pg_loss_by_selected_tokens`` else
    response_mask; pg_loss = average_loss(·, pg_loss_mask). Then, each added in this order, each an
    ``average_loss(·, response_mask, mode)``:

    1. sensitivity (coef ≠ 0): (−coef)·S, S = k3(q_dec ‖ ref) with ref = log_prob ("current") or old_log_prob
       ("old"); abs_log_ratio likewise (not detached); boxcox: S computed against ref.detach(), objective
       S.detach()·log_prob;
    2. invariant entropy: coef·(−log_prob | entropy);
    3. decremental entropy: coef·(−q_dec | decremental_entropies);
    4. DVRP robustness (DVRP mode and q_inc given, coef ≠ 0): coef·k3(q_inc ‖ log_prob, "current");
    5. incremental entropy (DVRP mode): coef·(−q_inc | incremental_entropies).

    DVRP mode = incremental_image_transform set, or either incremental coef ≠ 0, or q_inc / H_inc given.
    Returns (policy_loss, parts) with parts: pg_losses (token-wise, before selection), weighted_pg_losses,
    pg_loss_raw, pg_loss, and each auxiliary loss that was added.
    """
    parts: dict[str, torch.Tensor] = {}
    if entropy_mask is not None:
        entropy_mask = entropy_mask.to(torch.bool) & response_mask.to(torch.bool)
    if perception_mask is not None:
        perception_mask = perception_mask.to(torch.bool) & response_mask.to(torch.bool)
    use_dvrp = (
        incremental_image_transform is not None
        or visual_robustness_loss_coef != 0.0
        or incremental_entropy_coef != 0.0
        or incremental_old_log_probs is not None
        or incremental_entropies is not None
    )

    per_token_sampled_sensitivity = None
    if decremental_old_log_probs is not None and visual_sensitivity_loss_coef != 0.0:
        sensitivity_reference = log_prob if visual_sensitivity_reference == "current" else old_log_prob
        if visual_sensitivity_metric == "sampled_boxcox":
            per_token_sampled_sensitivity = fork_sampled_boxcox(
                decremental_old_log_probs, sensitivity_reference.detach(), alpha=boxcox_alpha
            )
        elif visual_sensitivity_metric == "sampled_abs_log_ratio":
            per_token_sampled_sensitivity = fork_sampled_abs_log_ratio(decremental_old_log_probs, sensitivity_reference)
        else:
            # full-vocab / hidden-state metrics resolve to the sampled k3 here (resolve_sampled_sensitivity_metric)
            per_token_sampled_sensitivity = fork_sampled_low_var_kl(
                decremental_old_log_probs, sensitivity_reference, reference_mode=visual_sensitivity_reference
            )

    if region_token_mask is not None and include_region_tokens_in_perception_mask and perception_mask is not None:
        perception_mask = perception_mask | region_token_mask.to(torch.bool)

    modulated_advantages = advantages if scaling_factors is None else advantages * scaling_factors
    pg_losses, _ = fork_compute_policy_loss(
        old_log_probs=old_log_prob,
        log_probs=log_prob,
        advantages=modulated_advantages,
        response_mask=response_mask,
        clip_ratio_low=clip_ratio_low,
        clip_ratio_high=clip_ratio_high,
        clip_ratio_dual=clip_ratio_dual,
        loss_avg_mode="none",
    )
    parts["pg_losses"] = pg_losses
    parts["pg_loss_raw"] = fork_average_loss(pg_losses, response_mask, mode=loss_avg_mode)

    weighted_pg_losses = pg_losses
    selected_token_mask = None
    if tor_use_token_weighting:
        token_multiplier = fork_tor_weight(entropy_mask, perception_mask, tor_rsn_weight, tor_prcp_weight)
        weighted_pg_losses = weighted_pg_losses * token_multiplier
        selected_token_mask = token_multiplier > 0
    elif entropy_mask is not None or perception_mask is not None:
        selected_token_mask = fork_combine_masks(entropy_mask, perception_mask)
        weighted_pg_losses = weighted_pg_losses * selected_token_mask.float()
    parts["weighted_pg_losses"] = weighted_pg_losses

    pg_loss_mask = response_mask
    if selected_token_mask is not None and normalize_pg_loss_by_selected_tokens:
        pg_loss_mask = selected_token_mask & response_mask.to(torch.bool)
    pg_loss = fork_average_loss(weighted_pg_losses, pg_loss_mask, mode=loss_avg_mode)
    parts["pg_loss"] = pg_loss
    policy_loss = pg_loss

    if visual_sensitivity_loss_coef != 0.0:
        if per_token_sampled_sensitivity is None:
            raise ValueError("visual_sensitivity_loss_coef requires decremental_old_log_probs to be present.")
        if visual_sensitivity_metric == "sampled_boxcox":
            objective = per_token_sampled_sensitivity.detach() * log_prob
        else:
            objective = per_token_sampled_sensitivity
        sensitivity_loss = fork_average_loss(-visual_sensitivity_loss_coef * objective, response_mask, loss_avg_mode)
        parts["sensitivity_loss"] = sensitivity_loss
        policy_loss = policy_loss + sensitivity_loss

    if invariant_entropy_coef != 0.0:
        term = fork_entropy_term(log_prob, entropy, entropy_loss_type)
        invariant_entropy_loss = fork_average_loss(invariant_entropy_coef * term, response_mask, loss_avg_mode)
        parts["invariant_entropy_loss"] = invariant_entropy_loss
        policy_loss = policy_loss + invariant_entropy_loss

    if decremental_entropy_coef != 0.0:
        term = fork_entropy_term(decremental_old_log_probs, decremental_entropies, entropy_loss_type)
        decremental_entropy_loss = fork_average_loss(decremental_entropy_coef * term, response_mask, loss_avg_mode)
        parts["decremental_entropy_loss"] = decremental_entropy_loss
        policy_loss = policy_loss + decremental_entropy_loss

    if use_dvrp and incremental_old_log_probs is not None:
        per_token_robustness_kl = fork_sampled_low_var_kl(incremental_old_log_probs, log_prob, reference_mode="current")
        if visual_robustness_loss_coef != 0.0:
            robustness_loss = fork_average_loss(
                visual_robustness_loss_coef * per_token_robustness_kl, response_mask, loss_avg_mode
            )
            parts["robustness_loss"] = robustness_loss
            policy_loss = policy_loss + robustness_loss

    if use_dvrp and incremental_entropy_coef != 0.0:
        term = fork_entropy_term(incremental_old_log_probs, incremental_entropies, entropy_loss_type)
        incremental_entropy_loss = fork_average_loss(incremental_entropy_coef * term, response_mask, loss_avg_mode)
        parts["incremental_entropy_loss"] = incremental_entropy_loss
        policy_loss = policy_loss + incremental_entropy_loss

    return policy_loss, parts


# ========================================================================================================== DVRP

VP_DIFFUSION_STEPS = 1000


def fork_vp_diffusion_alphas_cumprod() -> tuple[float, ...]:
    """PX ``_vp_diffusion_alphas_cumprod`` (page 0): β = sigmoid(linspace(−6, 6, 1000))·(0.5e-2 − 1e-5) + 1e-5 in
    float32 (torch defaults), ᾱ = cumprod(1 − β) in float32, returned as Python floats."""
    betas = torch.sigmoid(torch.linspace(-6, 6, VP_DIFFUSION_STEPS)) * (0.5e-2 - 1e-5) + 1e-5
    return tuple(torch.cumprod(1 - betas, dim=0).tolist())


def fork_vp_diffusion_noise_fraction(noise_t: float) -> float:
    """PX ``vp_diffusion_noise_fraction`` (page 0): 1 − ᾱ[min(max(int(t), 0), 999)] (0-based index)."""
    step = min(max(int(noise_t), 0), VP_DIFFUSION_STEPS - 1)
    return 1.0 - fork_vp_diffusion_alphas_cumprod()[step]


def fork_compute_noise_schedule(
    global_step: int,
    total_training_steps: int,
    noise_t_init: float = 500.0,
    noise_gamma: float = 10.0,
    noise_t_max: float = 1000.0,
    noise_t_mid: float | None = None,
) -> tuple[float, float]:
    """PX ``compute_noise_schedule`` + ``vp_diffusion_params_from_fixed_t`` (page 0). Returns (noise_t, noise_beta).

    progress = clamp(step, 0, N)/max(N, 1) (0 if N ≤ 0); without ``noise_t_mid``: t = t_init·1/(1 + exp(−γ(0.5 −
    progress))); with it (NoisyRollout Eq. 3): t = t_init·(1 − 1/(1 + exp(−γ(progress − mid)))). t_max must be in
    (0, 1000]; t = clamp(t, 0, t_max) (kept as a float); β = ``fork_vp_diffusion_noise_fraction(t)``.
    """
    if total_training_steps <= 0:
        progress = 0.0
    else:
        progress = min(max(float(global_step), 0.0), float(total_training_steps)) / float(max(total_training_steps, 1))
    if noise_t_mid is None:
        noise_t = noise_t_init * (1.0 / (1.0 + math.exp(-noise_gamma * (0.5 - progress))))
    else:
        noise_t = noise_t_init * (1.0 - 1.0 / (1.0 + math.exp(-noise_gamma * (progress - noise_t_mid))))
    if not 0.0 < float(noise_t_max) <= VP_DIFFUSION_STEPS:
        raise ValueError(f"noise_t_max must be in (0, {VP_DIFFUSION_STEPS}], but got {noise_t_max}.")
    noise_t = min(max(float(noise_t), 0.0), float(noise_t_max))
    return noise_t, fork_vp_diffusion_noise_fraction(noise_t)


def fork_vp_diffusion_noise(
    image: torch.Tensor, beta: float, noise: torch.Tensor, rounding: str = "round"
) -> torch.Tensor:
    """PX ``vp_diffusion_noise`` (page 0) on an [H, W, 3] image; returns uint8.

    x = uint8 / 255 in float32 (a float image is taken as already in [0, 1] and cast to float32);
    y = sqrt(max(1 − β, 0))·x + sqrt(β)·ε; y = clip(y, 0, 1)·255; round half-to-even ("round") or truncate
    ("floor"); uint8. The fork draws ε = ``np.random.default_rng(seed).standard_normal(size=x.shape,
    dtype=np.float32)``; here ε is passed in (float32, same shape).
    """
    if rounding not in ("round", "floor"):
        raise ValueError(f"rounding must be 'round' or 'floor', but got {rounding!r}.")
    arr = image.to(torch.float32) / 255.0 if image.dtype == torch.uint8 else image.to(torch.float32)
    noisy = math.sqrt(max(1.0 - beta, 0.0)) * arr + math.sqrt(beta) * noise.to(torch.float32)
    noisy = torch.clamp(noisy, 0.0, 1.0) * 255.0
    if rounding == "round":
        noisy = torch.round(noisy)
    return noisy.to(torch.uint8)
