"""The RL recipe's metrics: how one step's values are reduced over micro-batches and ranks into one flat dict.

`accumulate_loss_metrics` / `finalize_loss_metrics` combine `vppo_core.policy_loss`'s metrics; `step_metrics`
reduces everything a step's phases returned (collective: every rank calls it and gets the same dict).
"""

from __future__ import annotations

import math
import resource
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.distributed as dist

from vppo_core.masking import policy_gradient_share
from vppo_recipes.collectives import all_gather_var, all_reduce_list
from vppo_recipes.methods import Method, MethodContext
from vppo_recipes.methods.records import MicroStep

# How `vppo_core.policy_loss` metrics combine over micro-batches and ranks into one number per step.
# "loss" / "pg_loss" are already each micro-batch's share of the global mean (num_tokens / num_sequences are the
# global counts): they are summed, then averaged over the step's optimizer updates. Clip fractions are means over
# the tokens with a non-zero token weight (TGF keeps ~40 %), so they are weighted by those tokens; every other mean
# is over valid tokens; "*_max" stays a maximum.
SHARE_METRICS = ("loss", "pg_loss")
ACTIVE_TOKEN_METRICS = ("clipfrac_high", "clipfrac_low", "clipfrac_dual")


def accumulate_loss_metrics(sums: dict[str, Any], metrics: dict[str, Any], *, valid_tokens, active_tokens) -> None:
    """Add one micro-batch's `policy_loss` metrics to the running `sums` (see SHARE_METRICS).

    Values may be 0-dim tensors (then the sums stay tensors on the device: no host sync per micro-batch) or floats.
    """
    for k, v in metrics.items():
        if k == "num_tokens":
            continue
        v = v.double() if isinstance(v, torch.Tensor) else float(v)
        if k.endswith("_max"):
            sums[k] = (
                v if k not in sums else (torch.maximum(sums[k], v) if isinstance(v, torch.Tensor) else max(sums[k], v))
            )
        elif k in SHARE_METRICS:
            sums[k] = sums.get(k, 0.0) + v
        else:
            weight = active_tokens if k in ACTIVE_TOKEN_METRICS else valid_tokens
            sums[k] = sums.get(k, 0.0) + v * weight
    sums["_tokens"] = sums.get("_tokens", 0.0) + valid_tokens
    sums["_active_tokens"] = sums.get("_active_tokens", 0.0) + active_tokens


def finalize_loss_metrics(sums: dict[str, float], updates: int) -> dict[str, float]:
    """The step's `actor/*` values from `sums` added up over micro-batches and ranks (maxima: the max over ranks).

    updates: optimizer updates (mini-batches) the sums span; the share metrics are averaged over them.
    """
    out = {}
    for k, v in sums.items():
        if k.startswith("_"):
            continue
        if k.endswith("_max"):
            out[k] = v
        elif k in SHARE_METRICS:
            out[k] = v / updates if updates else math.nan
        else:
            n = sums["_active_tokens"] if k in ACTIVE_TOKEN_METRICS else sums["_tokens"]
            out[k] = v / n if n else math.nan
    return out


def masked_quantiles(values: torch.Tensor, qs: tuple[float, ...]) -> list[float]:
    """Quantiles of a flat float tensor (nan when empty); sort-based, no 16M-element limit of torch.quantile."""
    if values.numel() == 0:
        return [math.nan for _ in qs]
    s = values.double().sort().values
    out = []
    for q in qs:
        pos = q * (s.numel() - 1)
        lo, hi = math.floor(pos), math.ceil(pos)
        out.append(float(s[lo] + (s[hi] - s[lo]) * (pos - lo)))
    return out


# |lp_sampler - lp_old| above this counts as a disagreeing token (rollout/logprob_frac_above_1e-3)
AGREEMENT_THRESHOLD = 1e-3


def sampler_agreement(mini: Sequence[MicroStep], temperature: float) -> list[float]:
    """|lp_sampler − lp_old| over one mini-batch's valid tokens: [sum, tokens, tokens above the threshold, max].

    Both are temperature-1 log-probs only when rollout.temperature is 1; otherwise all zeros (not logged).
    """
    agreement = [0.0, 0.0, 0.0, 0.0]
    if temperature != 1.0:
        return agreement
    for s in mini:
        diff = (s.no_grad.lp_old.float() - s.batch.lp_sampler).abs()[s.batch.mask > 0]
        if diff.numel():
            agreement[0] += float(diff.sum())
            agreement[1] += diff.numel()
            agreement[2] += float((diff > AGREEMENT_THRESHOLD).sum())
            agreement[3] = max(agreement[3], float(diff.max()))
    return agreement


# The phases whose seconds are logged as time/<phase>_s (the slowest rank's)
PHASES = ("sample", "reward", "old_logprob", "alt_logprob", "shaping", "update", "weight_sync")


def pg_share_on_dependent_tokens(steps: Sequence[MicroStep], fraction: float) -> float:
    """`policy_gradient_share` over all micro-batches and ranks: the share of the uniform-credit policy gradient
    on each response's ceil(ρ·n) most dependent tokens (ρ = `Method.dependent_fraction`), with the shaped
    advantages. One host transfer for the whole step."""
    sums = torch.zeros(2, dtype=torch.float64)
    for s in steps:  # added one micro-batch after another in float64, on the device
        share = policy_gradient_share(
            s.shaped.advantages, s.no_grad.lp_old, s.no_grad.S, s.batch.mask, fraction=fraction
        )
        sums = sums.to(share.device) + share.double()
    on_top, total = all_reduce_list(list(sums))
    return on_top / total if total > 0 else math.nan


def step_metrics(
    *,
    method: Method,
    ctx: MethodContext,
    groups: Sequence[Any],
    counts: Mapping[str, float],
    local_counts: Mapping[str, float],
    steps: Sequence[MicroStep],
    losses: Sequence[float],
    grad_norms: Sequence[float],
    metric_sums: Mapping[str, Any],
    measures_dependency: bool,
    rollout_is_cap: float | None,
    agreement: Sequence[float],
    seconds: Mapping[str, float],
    t_step: float,
    lr: float,
    optimizer_steps: int,
    positions: tuple[float, float, float] = (0.0, 0.0, 0.0),
) -> tuple[dict[str, float], dict[str, float]]:
    """One step's metrics, reduced over all ranks (the same dict on every rank; collective).

    groups: this rank's kept groups; counts: filter/* and the update's skipped/* (global already); local_counts:
    this rank's own counters (summed here); steps: this rank's micro-batches, flat, with their passes and shaping;
    positions: (computed, padding) positions of one forward over each of this rank's micro-batches
    (`micro_batching.padding_counts`), and the positions of its largest micro-batch.
    Returns (metrics, the step's counters for the run's totals).
    """
    m: dict[str, float] = {}
    local = sorted(local_counts)
    step_counts = dict(counts)
    step_counts.update(zip(local, all_reduce_list([local_counts[k] for k in local])))
    m.update(step_counts)
    sampled = step_counts.get("filter/groups_sampled", 0.0)
    m["filter/keep_rate"] = step_counts.get("filter/groups_kept", 0.0) / sampled if sampled else math.nan

    m["loss"] = sum(losses) / len(losses) if losses else math.nan
    m["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
    m["lr"] = lr
    m["optimizer_steps"] = float(optimizer_steps)
    if metric_sums:  # policy_loss metrics over all micro-batches and ranks (see SHARE_METRICS)
        updates = int(metric_sums.get("_updates", 0))  # the same on every rank
        keys = sorted(k for k in metric_sums if not k.endswith("_max") and k != "_updates")
        sums = dict(zip(keys, all_reduce_list([metric_sums[k] for k in keys])))
        maxima = sorted(k for k in metric_sums if k.endswith("_max"))
        sums.update(zip(maxima, all_reduce_list([metric_sums[k] for k in maxima], op=dist.ReduceOp.MAX)))
        for k, v in finalize_loss_metrics(sums, updates).items():
            m[f"actor/{k}"] = v

    # token dependency, exact over all ranks (gathered values), then the method's own statistics
    if measures_dependency:
        S = ctx.gathered([s.no_grad.S[s.batch.mask > 0] for s in steps])
        traj = ctx.gathered([s.no_grad.traj_dep[s.batch.mask.sum(1) > 0] for s in steps])
        m["dependency/token_mean"] = float(S.mean()) if S.numel() else math.nan
        m["dependency/token_p50"], m["dependency/token_p90"] = masked_quantiles(S, (0.5, 0.9))
        m["dependency/traj_mean"] = float(traj.mean()) if traj.numel() else math.nan
        m["diag/pg_share_on_dependent_tokens"] = pg_share_on_dependent_tokens(steps, method.dependent_fraction)
    m.update(method.metrics(ctx, steps))

    # trainer-sampler agreement (first mini-batch, all ranks) and the truncated importance weights
    total, tokens, above = all_reduce_list(list(agreement[:3]))
    (largest,) = all_reduce_list(list(agreement[3:]), op=dist.ReduceOp.MAX)
    m["rollout/logprob_abs_diff_mean"] = total / tokens if tokens else math.nan
    m["rollout/logprob_abs_diff_max"] = largest if tokens else math.nan
    m["rollout/logprob_frac_above_1e-3"] = above / tokens if tokens else math.nan
    if rollout_is_cap is not None:
        w = ctx.gathered([s.shaped.is_weights[s.batch.mask > 0] for s in steps])
        cap = float(rollout_is_cap)
        m["rollout/is_weight_mean"] = float(w.mean()) if w.numel() else math.nan
        m["rollout/is_capped_fraction"] = float((w >= cap).double().mean()) if w.numel() else math.nan

    # rewards of the responses trained on (kept groups of all ranks)
    r = all_reduce_list(
        [
            sum(sum(g.reward) for g in groups),
            sum(sum(g.accuracy) for g in groups),
            sum(sum(g.format) for g in groups),
            sum(len(g.reward) for g in groups),
            sum(len(x) for g in groups for x in g.token_ids),
            sum(f == "length" for g in groups for f in g.finish_reasons),
        ]
    )
    n = r[3]
    for i, k in enumerate(("reward/mean", "reward/accuracy", "reward/format")):
        m[k] = r[i] / n if n else math.nan
    m["response/length_mean"] = r[4] / n if n else math.nan
    m["response/truncated_fraction"] = r[5] / n if n else math.nan

    slowest = all_reduce_list([seconds.get(phase, 0.0) for phase in PHASES], op=dist.ReduceOp.MAX)
    for phase, v in zip(PHASES, slowest):
        m[f"time/{phase}_s"] = v  # the slowest rank sets the pace
    m["time/step_s"] = time.perf_counter() - t_step
    m["throughput/tokens_per_s"] = r[4] / m["time/step_s"]
    # Every pass over a micro-batch (clean, the views, the update) computes its padded positions; the update's
    # tokens per second count the real (prompt + response) ones of all ranks.
    computed, padding = all_reduce_list(list(positions[:2]))
    (m["throughput/largest_micro_batch_positions"],) = all_reduce_list([positions[2]], op=dist.ReduceOp.MAX)
    m["throughput/padding_fraction"] = padding / computed if computed else math.nan
    m["throughput/update_tokens_per_s"] = (computed - padding) / m["time/update_s"] if m["time/update_s"] else math.nan
    # Peak memory of every rank: allocated GPU memory on CUDA, the process's peak RSS on CPU.
    if ctx.device.type == "cuda":
        peak = torch.cuda.max_memory_allocated(ctx.device) / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    peaks = all_gather_var(torch.tensor([peak], dtype=torch.float64, device=ctx.device)).tolist()
    for rank, v in enumerate(peaks):
        m[f"memory/peak_gib_rank{rank}"] = v
    return m, step_counts
