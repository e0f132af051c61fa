"""Transcription of the arithmetic of CPPO's official code ``vbdi/cppo`` (verl recipe), for side-by-side tests.

What the official code computes, in its operation order, with its eps values and clamps. Our own code, not a copy:
the DataProto plumbing, the forward passes, the metrics and the distributed parts are left out. Read through the
public-code index (the repository could not be fetched, so there are no line numbers); each function names the
file, the function, the commit and the ``read_file`` page (character offset; pages are 16,000 characters).

==========================================  ==========================================  ===========
file                                        commit                                      total chars
==========================================  ==========================================  ===========
verl/recipe/cppo/cppo_dp_actor.py           77f8763ea311b6f171d222f383b505b712fbc7e9    32,055
verl/recipe/cppo/cppo_core_algos.py         cb1da3eb84dba0abb7dcdf127ec9be056cb5b34c    4,519
verl/verl/trainer/ppo/core_algos.py         d702550d215debf2d67212d63582ab5a158d01bc    75,957
==========================================  ==========================================  ===========

Abbreviations: ``DPA`` = cppo_dp_actor.py@77f8763, ``CCA`` = cppo_core_algos.py@cb1da3e, ``CA`` =
core_algos.py@d702550.

In the official update (DPA ``DataParallelPPOActor.update_policy``, page 16000) the two altered views are forwards
of the *current* policy inside the update, with gradient (no ``torch.no_grad``); vppo scores them once before the
update, without gradient (ALGORITHMS.md §9.11). The functions below take their log-probs and entropies as given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def kl_penalty_low_var_kl(logprob: torch.Tensor, ref_logprob: torch.Tensor) -> torch.Tensor:
    """CA ``kl_penalty_forward``, branch ``kl_penalty in ("low_var_kl", "k3")`` (page 62000)."""
    kl = ref_logprob - logprob
    kl = torch.clamp(kl, min=-20, max=20)
    ratio = torch.exp(kl)
    kld = (ratio - kl - 1).contiguous()
    return torch.clamp(kld, min=-10, max=10)


def masked_sum(values: torch.Tensor, mask: torch.Tensor, axis=None) -> torch.Tensor:
    """verl's ``verl_F.masked_sum``: ``(values * mask).sum(axis)`` (the NaN-safe variant multiplies the same way on
    finite values)."""
    return (values * mask).sum() if axis is None else (values * mask).sum(dim=axis)


def agg_loss(loss_mat: torch.Tensor, loss_mask: torch.Tensor, loss_agg_mode: str) -> torch.Tensor:
    """CCA ``agg_loss`` (page 0) as the legacy FSDP actor calls it (``dp_size=1``, ``batch_num_tokens`` and
    ``global_batch_size`` None): per micro-batch."""
    if loss_agg_mode == "token-mean":
        batch_num_tokens = loss_mask.sum()
        return masked_sum(loss_mat, loss_mask) / (batch_num_tokens * 1 + 1e-8)
    seq_denominator = loss_mat.shape[0]
    if loss_agg_mode == "seq-mean-token-sum":
        seq_losses = masked_sum(loss_mat, loss_mask, axis=-1)
    elif loss_agg_mode == "seq-mean-token-mean":
        token_counts = torch.sum(loss_mask, dim=-1)
        seq_losses = masked_sum(loss_mat, loss_mask, axis=-1) / (token_counts + 1e-8)
    else:
        raise ValueError(loss_agg_mode)
    return torch.sum(seq_losses) / seq_denominator


def vision_mask(entropy: torch.Tensor, entropy_semantics_change: torch.Tensor, top_percent: float) -> torch.Tensor:
    """DPA ``update_policy``, the ``cpl_use_vision_mask`` block (page 16000): the top ``top_percent`` of the tokens
    whose entropy rises under the semantics-changing view, by the rise relative to that view's entropy. ``entropy``
    is the update forward's entropy of the clean inputs (with remove-padding, exactly 0 on padding: ``pad_input``),
    ``entropy_semantics_change`` the semantics-changing view's. Returns a float mask."""
    with torch.no_grad():
        H_noimg = entropy_semantics_change.detach()
        H_full = entropy.detach()
        delta_H = H_noimg - H_full
        eps = 1e-6
        norm_delta = torch.relu(delta_H) / (H_noimg + eps)
        masked_vals = norm_delta.masked_fill(delta_H <= 0, float("-inf"))
        bsz, seqlen = masked_vals.shape
        sorted_vals, _ = torch.sort(masked_vals, dim=1, descending=True)
        counts = (delta_H > 0).sum(dim=1)
        ks = (counts.float() * top_percent).clamp(min=1).long()
        arange_idx = torch.arange(bsz)
        kth_idx = (ks - 1).clamp(min=0)
        thresholds = sorted_vals[arange_idx, kth_idx]
        thresholds = thresholds.unsqueeze(1).expand(-1, seqlen)
        return ((norm_delta >= thresholds) & (delta_H > 0)).float()


def advantage_gate(mask: torch.Tensor, advantages: torch.Tensor) -> torch.Tensor:
    """DPA ``update_policy``, ``cpl_use_advantage_gating`` (page 16000); ``advantages`` token-level ``[B, L]`` (GRPO's
    response advantage on every token)."""
    return torch.where(advantages > 0, mask, 0)


def cpl_loss(
    log_prob: torch.Tensor,
    log_prob_cf_semantics_preserve: torch.Tensor,
    log_prob_cf_semantics_change: torch.Tensor,
    mask: torch.Tensor,
    *,
    cpl_tau: float,
    loss_agg_mode: str,
) -> tuple[torch.Tensor, torch.Tensor]:
    """DPA ``update_policy``, the CPL term (page 16000) with ``kl_loss_type=low_var_kl`` (the published scripts):
    ``(cpl_loss, cpl)``, the aggregated scalar and the per-token values. The official loss adds
    ``cpl_loss · cpl_loss_coef``."""
    kl_semantics_preserving = kl_penalty_low_var_kl(log_prob, log_prob_cf_semantics_preserve)
    kl_semantics_changing = kl_penalty_low_var_kl(log_prob, log_prob_cf_semantics_change)
    margin = kl_semantics_preserving - kl_semantics_changing
    cpl = F.softplus(margin / cpl_tau)
    return agg_loss(loss_mat=cpl, loss_mask=mask, loss_agg_mode=loss_agg_mode), cpl
