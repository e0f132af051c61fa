"""RL for Qwen2.5-VL / Qwen3-VL with FSDP2: VPPO, PGPO, DAPO, GRPO and the methods that followed VPPO (PAPO, CFPO,
DVRP, ToR, PEPO, CGPO, VEPO; ALGORITHMS.md §9) in one torchtune-style recipe.

Launch from any directory (tune turns the relative path into the installed module vppo_recipes.rl.rl_distributed;
see ENVIRONMENT.md "tune run"), or through the `vppo-recipes run rl_distributed ...` wrapper:

    tune run --nproc_per_node 2 vppo_recipes/rl/rl_distributed.py --config tiny_vppo.yaml output_dir=/tmp/run
    # multi-node: tune run --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT ...

One step (`rl_step`) is ALGORITHMS.md §7 in data-flow order (ARCHITECTURE.md). Each phase returns frozen values
that the next one reads; none writes into another's:

    generate_rollouts    draw prompts -> sampler.sample(G per prompt) -> compute_rewards -> group_advantages,
                         online filter (draw more prompts until the rollout batch is full, capped)   -> Rollouts
    prepare_minibatches  this rank's groups -> mini-batches of collated micro-batches                 -> MicroBatch
    no_grad_passes       lp_old (clean inputs); with altered views (ALTERED_VIEWS: perturbed pixels, text-only
                         attention, no image, ...): lp_alt, token_dependency S, the §9 scores       -> NoGradPass
    shape                TAS α and TGF mask (VPPO) | PGPO weights | §9 weights (| truncated IS)      -> Shaped
    update               per mini-batch: per micro-batch policy_loss / backward, clip, step          -> UpdateResult
    _sync_sampler        push the full weights to the sampler
    _step_metrics        everything above, reduced over ranks into one flat dict; counters into the run's totals

Design choices a reader coming from verl / EasyR1 / TRL should know:
- The algorithm is configuration (`algorithm.name`): vppo (TAS + TGF, each switchable for ablations), pgpo (token
  weights), dapo and grpo (no dependency pass at all, so DAPO costs exactly one no-grad pass less than VPPO), and
  the §9 methods: token weights (tor, cgpo, vepo, pepo) or extra k3 terms in the loss (papo, cfpo, dvrp), each
  reading its own no-grad views (ALTERED_VIEWS) scored once before the update, never through a gradient.
- Every random choice is a pure function of (seed, the prompt's number among the run's usable examples, response
  index): the sampling seed of each prompt (embedded engine: one `sample` call per prompt) and the perturbation
  mask of each response. With the embedded engine, results therefore depend neither on the number of ranks nor on
  where a run was resumed: the tests compare a 2-process run with a 1-process one, and a killed-and-resumed run with
  an uninterrupted one. The vLLM engine takes one batched call per rank with one seed derived from (seed, the
  rank's first prompt, rank): its samples depend on the number of ranks, not on where a run was resumed.
- Ranks own whole groups. The online filter gathers the graded groups of all ranks (token ids, texts, rewards),
  keeps the first `batch_prompts` in data order (a multiple of the world size) and deals every mini-batch out
  again in equal contiguous shares, so the optimizer sees the same mini-batches on any number of ranks and every
  rank runs the same number of forward/backward passes (FSDP collectives would deadlock otherwise).
- Temperature: the trainer's log-probs (lp_old, lp_alt, lp_new) are of softmax(logits / rollout.temperature), as
  EasyR1 / verl compute them, from the last hidden state in chunks (vppo_core.logprobs_from_hidden); both samplers
  report temperature-1 log-probs of the raw distribution. They are the same quantity at rollout.temperature = 1.0
  (every published run), the only temperature at which the trainer-sampler agreement is logged and
  loss.rollout_is_cap is accepted.
- lp_old is computed per micro-batch, in the shape the update uses (no stacking with the perturbed rows).
- Loss normalisation: each micro-batch loss is divided by the valid-token count of the whole GLOBAL mini-batch
  (`num_tokens`), then multiplied by the data-parallel world size because FSDP's reduce-scatter averages
  gradients over ranks; the accumulated gradient is then exactly that of one token-mean over the global batch.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import resource
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor
from torchtune import config
from tqdm import tqdm

from vppo_core.advantages import group_advantages, keep_groups
from vppo_core.attention import text_only_attention
from vppo_core.dependency import (
    abs_log_ratio,
    exact_token_dependency_from_hidden,
    token_dependency,
    top_p_entropy_from_hidden,
    trajectory_dependency,
    vepo_token_scores,
    view_divergences_from_hidden,
)
from vppo_core.logprobs import logprobs_from_hidden
from vppo_core.losses import kl_penalty, policy_loss, truncated_is_weights
from vppo_core.masking import policy_gradient_share, tgf_mask, top_fraction_mask
from vppo_core.perturb import diffusion_noise_level, perturb_pixels
from vppo_core.shaping import (
    cgpo_response_factors,
    pepo_token_weights,
    pepo_visual_prior,
    pgpo_token_weights,
    tas_scale,
    tas_scale_reference,
    tor_token_weights,
)
from vppo_eval.evaluate import evaluate
from vppo_eval.records import Record
from vppo_eval.reward import compute_rewards
from vppo_recipes.checkpointing import (
    apply_optimizer_settings,
    check_checkpoint_matches,
    check_resume_config,
    final_checkpoint_line,
    find_resumable_checkpoint,
    holds_master_weights,
    load_training_state,
    save_checkpoint,
)
from vppo_recipes.config_schema import RL_ALGORITHMS, check_paths, check_world_size, validate_config
from vppo_recipes.counterfactual import cross_modal_value_mean
from vppo_recipes.data import Example, ExampleStream, SkipRow, VisualQADataset, prompt_or_skip, rank_slice
from vppo_recipes.distributed import checkpoint_dtype, init_distributed, load_training_policy, shard_and_place
from vppo_recipes.lifecycle import StopRequest, claim_output_dir, stopped_message
from vppo_recipes.lr_schedule import constant_with_warmup
from vppo_recipes.metric_logging import build_metric_logger
from vppo_recipes.sharding import call_in_root_forward
from vppo_recipes.update_guard import clip_and_check_update
from vppo_rollout.collate import collate_rollout, model_inputs
from vppo_rollout.loading import load_processor
from vppo_rollout.prompts import Prompt, prompt_without_images
from vppo_rollout.regions import filled_region_images, region_token_mask
from vppo_rollout.sampling import SamplingConfig

ALGORITHMS = RL_ALGORITHMS
# The no-grad views of the prompt each algorithm scores the responses under, besides the clean one (ALGORITHMS.md §1,
# §5, §9). Each is one extra forward of the rollout policy before any update, without gradient.
ALTERED_VIEWS = {
    "vppo": ("perturbed",),  # random ViT patches blackened, a fresh mask per response
    "pgpo": ("text_only",),  # no token attends to a visual token; positions unchanged
    "papo": ("perturbed",),  # random patches blackened, one mask per prompt
    "cfpo": ("counterfactual",),  # salient image values replaced by their mean in every decoder layer
    "dvrp": ("perturbed", "noised"),  # masked view, and a diffusion-noised view annealed over training
    "tor": ("no_image",),  # the prompt without its image(s)
    "cgpo": ("regions_filled",),  # the response's own evidence boxes filled with their mean colour
    "vepo": ("noised",),  # Gaussian noise on the normalised pixel values, one draw per prompt
    "pepo": (),  # no extra pass: the clean pass's hidden states and entropy
    "dapo": (),
    "grpo": (),
}
# The KL terms each algorithm adds to its loss: name -> (coefficient key, sign, view) (ALGORITHMS.md §9.1)
AUX_KL_TERMS = {
    "papo": {"visual_kl": ("visual_kl_coef", -1.0, 0)},
    "cfpo": {"visual_kl": ("visual_kl_coef", -1.0, 0)},
    "dvrp": {"necessity_kl": ("necessity_kl_coef", -1.0, 0), "robustness_kl": ("robustness_kl_coef", 1.0, 1)},
}
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PHASES = ("sample", "reward", "old_logprob", "alt_logprob", "shaping", "update", "weight_sync")
# Seeds the random tie-break of the batch-level token sets (ToR, CGPO): mix_seed(seed, step, TIE_BREAK_SALT, set).
TIE_BREAK_SALT = 0x71E
# |lp_sampler - lp_old| above this counts as a disagreeing token (rollout/logprob_frac_above_1e-3)
AGREEMENT_THRESHOLD = 1e-3


# --------------------------------------------------------------------------------------------------------------------
# Small pure helpers (tested in test_rl_distributed.py)
# --------------------------------------------------------------------------------------------------------------------


def mix_seed(*values: int) -> int:
    """A deterministic 31-bit seed from integers (splitmix64 steps); the same inputs give the same seed on any rank."""
    x = 0x9E3779B97F4A7C15
    for v in values:
        x = (x ^ (int(v) & 0xFFFFFFFFFFFFFFFF)) & 0xFFFFFFFFFFFFFFFF
        x = (x + 0x9E3779B97F4A7C15) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
        x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 31
    return int(x & 0x7FFFFFFF)


def chunk_ranges(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(n) (the last may be shorter)."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


def check_batch_sizes(cfg: DictConfig, world: int) -> None:
    """Rollout batch / update batch / ranks must divide evenly (each rank owns whole groups)."""
    b, u = cfg.rollout.batch_prompts, cfg.batch.update_prompts
    if u % world:
        raise ValueError(
            f"batch.update_prompts={u} must be a multiple of the world size {world} (ranks own whole groups)"
        )
    if b % u:
        raise ValueError(f"rollout.batch_prompts={b} must be a multiple of batch.update_prompts={u}")


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


# --------------------------------------------------------------------------------------------------------------------
# Log-probs under FSDP2
# --------------------------------------------------------------------------------------------------------------------


def response_logprobs(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    responses: torch.Tensor,
    prompt_length: int,
    *,
    temperature: float,
    chunk_size: int,
    with_hidden: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every response token, straight from the last hidden state (never [B, L, V] logits).

    Must run through `sharding.call_in_root_forward(model, response_logprobs, ...)`. Why: under FSDP2 the
    LM-head weight lives in the root unit and is a sharded DTensor outside a root forward. We cannot call
    `model(...)` (it would project every position to the vocabulary), and reading `model.lm_head.weight` after
    `model.model(...)` would see the shard. `call_in_root_forward` registers this function as an FSDP forward
    method of the root, so the root's pre-forward all-gather runs before it (the weight is the full tensor inside)
    and the root's gradient reduce-scatter is scheduled for backward, exactly as for `model.forward`. Without FSDP
    it is a plain call, so the single-process path is the same code.

    inputs: the model's forward tensors from `collate_rollout` (input_ids [B, P+L], attention_mask, position_ids,
        pixel_values, image_grid_thw, mm_token_type_ids); `attention_mask` may be replaced by a 4-D mask (PGPO).
    responses: [B, L] long. prompt_length: P — response token j is predicted at position P-1+j.
    Returns (lp [B, L] float32, hidden [B, L, H] or None).
    """
    result = response_pass(
        model, inputs, responses, prompt_length, temperature=temperature, chunk_size=chunk_size, validate=validate,
        with_hidden=with_hidden,
    )  # fmt: skip
    return result["lp"], result.get("hidden")


def response_pass(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    responses: torch.Tensor,
    prompt_length: int,
    *,
    temperature: float,
    chunk_size: int,
    entropy: bool = False,
    visual_token_id: int | None = None,
    validate: bool = True,
    with_hidden: bool = True,
) -> dict[str, torch.Tensor]:
    """`response_logprobs` with what the methods of ALGORITHMS.md §9 also read from the same forward.

    Also run through `call_in_root_forward`. Returns {"lp" [B, L]}, plus "hidden" [B, L, H] (the last hidden state
    at the positions that predict the response tokens) when `with_hidden`, "entropy" [B, L] (the analytic entropy of
    softmax(logits / T), differentiable when the forward is) when `entropy`, and "prior" [B, L] (PEPO's perception
    prior over every layer's hidden state, `vppo_core.pepo_visual_prior`) when `visual_token_id` is given. The prior
    is read at the response tokens' own positions P+j (the fork's `hidden_states[:, -response_length:]`), one to the
    right of the positions that predict them.

    "hidden" and "prior" are views of the forward's activations. Under FSDP2, whatever this root forward returns
    with grad enabled gets a pre-backward hook, and a view's hook is lost to any later in-place op on it (FSDP2
    warns "returned a view tensor" for each): ask for them in no-grad passes only, where no hook is registered.
    """
    out = model.model(**inputs, use_cache=False, output_hidden_states=visual_token_id is not None)
    L = responses.shape[1]
    span = slice(prompt_length - 1, prompt_length - 1 + L)
    hidden = out.last_hidden_state[:, span]
    lp = logprobs_from_hidden(
        hidden, model.lm_head.weight, responses, temperature=temperature, chunk_size=chunk_size, validate=validate,
        return_entropy=entropy,
    )  # fmt: skip
    result = {"hidden": hidden} if with_hidden else {}
    if entropy:
        result["lp"], result["entropy"] = lp
    else:
        result["lp"] = lp
    if visual_token_id is not None:
        prior = pepo_visual_prior(list(out.hidden_states), inputs["input_ids"] == visual_token_id)
        result["prior"] = prior[:, prompt_length : prompt_length + L]
    return result


def exact_dependency_in_root(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    hidden_alt: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int,
) -> torch.Tensor:
    """Full-vocabulary KL(π(·|image) ‖ π(·|image')) per response token from two hidden states (ALGORITHMS §1).

    Also run through `call_in_root_forward` (it reads the LM-head weight, see `response_logprobs`). Returns S [B, L].
    """
    return exact_token_dependency_from_hidden(
        hidden, hidden_alt, model.lm_head.weight, mask, temperature=temperature, chunk_size=chunk_size
    )


def view_divergences_in_root(
    model: torch.nn.Module, hidden: torch.Tensor, hidden_alt: torch.Tensor, mask: torch.Tensor, *, temperature: float,
    chunk_size: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """VEPO's full-vocabulary JSD and both views' entropies (`vppo_core.view_divergences_from_hidden`), in the root
    forward (it reads the LM-head weight)."""
    return view_divergences_from_hidden(
        hidden, hidden_alt, model.lm_head.weight, mask, temperature=temperature, chunk_size=chunk_size
    )


def top_p_entropy_in_root(
    model: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, *, top_p: float, temperature: float,
    chunk_size: int,
) -> torch.Tensor:  # fmt: skip
    """ToR's entropy of the top-p renormalised distribution (`vppo_core.top_p_entropy_from_hidden`), in the root
    forward."""
    return top_p_entropy_from_hidden(
        hidden, model.lm_head.weight, mask, top_p=top_p, temperature=temperature, chunk_size=chunk_size
    )


# --------------------------------------------------------------------------------------------------------------------
# What each phase of a step returns (frozen: a phase reads its inputs and returns new values, never writes into them)
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Draw:
    """One usable example of this step, prepared on every rank (all ranks draw the same examples)."""

    uid: int  # number of the example among the run's usable examples (seeds its sampling and perturbations)
    row: int  # dataset row
    prompt: Prompt
    answer: str


@dataclass(frozen=True)
class Group:
    """The G graded responses of one prompt, with their group advantages and the prompt to rebuild the inputs."""

    uid: int
    row: int
    answer: str
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    sampler_logprobs: list[list[float]]  # the engine's raw log-prob of every sampled token
    reward: list[float]
    accuracy: list[float]
    format: list[float]
    advantages: list[float]  # GRPO advantage of each response: group_advantages(reward) (before TAS)
    prompt: Prompt = field(compare=False, repr=False)  # this rank's own copy: never sent to other ranks

    def payload(self) -> dict[str, Any]:
        """Everything but the prompt, as a plain dict: what `all_gather_object` sends. Plain dicts, because a plain
        `tune run` executes this file as `__main__` without registering it, so a pickled Group could not be looked
        up by class ("attribute lookup Group on __main__ failed"); without the prompt, because its images are large
        and every rank has built the same prompt from the same draw."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prompt"}


@dataclass(frozen=True)
class Rollouts:
    """The rollout phase's result: this rank's share of the kept groups, ordered by mini-batch."""

    groups: list[Group]
    counts: dict[str, float]  # filter/*: computed on the gathered groups, so already global
    seconds: dict[str, float]  # "sample", "reward"


@dataclass(frozen=True)
class MicroBatch:
    """One forward's worth of this rank's responses: the tensors every pass over them needs."""

    inputs: dict[str, torch.Tensor]  # the model's forward tensors (collate_rollout -> model_inputs)
    responses: torch.Tensor  # [b, L] long
    mask: torch.Tensor  # [b, L] float
    prompt_length: int
    advantages: torch.Tensor  # [b] float32, the groups' advantages (before TAS)
    perturb_seeds: list[int]  # one per response: seeds its perturbation (per response for VPPO, per prompt else)
    images_per_row: list[int]
    lp_sampler: torch.Tensor  # [b, L] the rollout engine's log-probs of the responses (0 on padding)
    prompts: list[Prompt] = field(default_factory=list, compare=False, repr=False)  # per row (ToR, CGPO views)
    texts: list[str] = field(default_factory=list, compare=False, repr=False)  # per row: the decoded response


@dataclass(frozen=True)
class NoGradPass:
    """The no-grad passes over one micro-batch before any update: lp_old; with an altered view (ALTERED_VIEWS) also
    its log-probs and S; and the scores each method of ALGORITHMS.md §9 reads."""

    lp_old: torch.Tensor  # [b, L]
    lp_alt: torch.Tensor | None = None  # [b, L] under the algorithm's first altered view (ALTERED_VIEWS)
    S: torch.Tensor | None = None  # [b, L] token visual dependency: k3(lp_alt ‖ lp_old) (or the exact KL)
    traj_dep: torch.Tensor | None = None  # [b] mean S over each response's tokens
    lp_alt2: torch.Tensor | None = None  # [b, L] under the second altered view (DVRP: the noised image)
    score: torch.Tensor | None = None  # [b, L] ToR |lp_old − lp_alt|, VEPO s_t, PEPO prior v_t
    entropy: torch.Tensor | None = None  # [b, L] ToR top-p entropy, PEPO / CGPO entropy of the clean pass


@dataclass(frozen=True)
class Shaped:
    """What the loss of one micro-batch uses beyond lp_old: the shaped advantages and the token weights."""

    advantages: torch.Tensor  # [b] group advantage × TAS α
    alpha: torch.Tensor  # [b] TAS α (ones without TAS); CGPO's response factor α_i
    token_weights: torch.Tensor | None  # [b, L] TGF mask / PGPO ω̃ / §9 weights, times is_weights; None = all ones
    is_weights: torch.Tensor | None  # [b, L] truncated importance weights (loss.rollout_is_cap), or None
    method_weights: torch.Tensor | None = None  # [b, L] the §9 method's own token weights (logged), or None


@dataclass(frozen=True)
class UpdateResult:
    """The update phase's result over all mini-batches of the step."""

    losses: list[float]  # per mini-batch (global), nan when skipped
    grad_norms: list[float]
    metric_sums: dict[str, Any]  # policy_loss metrics summed on this rank (accumulate_loss_metrics), tensors
    counts: dict[str, float]  # skipped/* updates: decided on global values, so already global


# --------------------------------------------------------------------------------------------------------------------
# The recipe
# --------------------------------------------------------------------------------------------------------------------


class RLRecipeDistributed:
    """The RL algorithms of `ALGORITHMS` with FSDP2 on a Qwen2.5-VL / Qwen3-VL policy (see the module docstring).

    cfg: a config already checked by `validate_config(cfg, "rl")` (recipe_main does it before anything else).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._cfg = cfg
        self.seed = int(cfg.seed)
        self.algorithm = cfg.algorithm.name
        self.output_dir = str(cfg.output_dir)
        self.group_size = int(cfg.rollout.group_size)
        self.batch_prompts = int(cfg.rollout.batch_prompts)
        self.update_prompts = int(cfg.batch.update_prompts)
        self.micro_batch_size = int(cfg.batch.micro_batch_size)
        self.temperature = float(cfg.rollout.temperature)
        self.chunk_size = int(cfg.loss.chunk_size)
        self.max_steps = int(cfg.training.max_steps)
        self.grad_clip = cfg.training.grad_clip
        self.online_filter = bool(cfg.rollout.online_filter)
        self.max_filter_draws = int(cfg.rollout.max_filter_draws)
        self.views = ALTERED_VIEWS[self.algorithm]
        self.uses_dependency = bool(self.views)  # the loss reads the altered view(s)
        # diagnostics.dependency: an algorithm without an altered view (DAPO, GRPO, PEPO) measures S too, under
        # VPPO's perturbation (logged only; its loss never reads it)
        if not self.views and bool(cfg.get("diagnostics", {}).get("dependency", False)):
            self.views = ("perturbed",)
        self.measures_dependency = bool(self.views)
        # VPPO draws a fresh perturbation per response; PAPO, DVRP and VEPO one per prompt (the fork's seeding)
        self.perturb_per_response = self.algorithm in ("vppo", "dapo", "grpo", "pepo")
        self.tas = self.algorithm == "vppo" and bool(cfg.algorithm.tas)
        self.tgf = self.algorithm == "vppo" and bool(cfg.algorithm.tgf)

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._rendezvous_file = init_distributed(self.device)  # a plain `tune run` gets a 1-rank group
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_rank_zero = self.rank == 0
        check_world_size(cfg, self.world)
        check_batch_sizes(cfg, self.world)
        self.dtype = _DTYPES[cfg.model.dtype]
        torch.manual_seed(self.seed)

        # Progress (restored by load_checkpoint): RL steps done, optimizer steps done, usable examples drawn.
        self.step = 0
        self.optimizer_steps = 0
        self.examples_drawn = 0
        self.totals: dict[str, float] = defaultdict(float)  # run-long skip/filter counters
        self.stop_request = StopRequest()  # set by SIGTERM / SIGINT under recipe_main: finish the step, save, exit
        self.stopped_by: int | None = None  # the signal that stopped the run early

    # ---------------------------------------------------------------- setup

    def setup(self, cfg: DictConfig) -> None:
        """Logger, processor, model (+ sampler copy), optimizer, data; then the training state when resuming."""
        self.resume_from = find_resumable_checkpoint(self.output_dir) if cfg.training.resume == "auto" else None
        self.accepted_changes: list[str] = []
        if self.resume_from is not None:  # another model, or a changed config, is an error before any compute
            check_checkpoint_matches(self.resume_from, arch=cfg.model.arch, model_dir=cfg.model.path)
            self.accepted_changes = check_resume_config(self.resume_from, cfg)
            if self.accepted_changes and self.rank == 0:
                changed = "\n  ".join(self.accepted_changes)
                print(f"RESUMING WITH CHANGED CONFIG (training.accept_config_changes=true):\n  {changed}", flush=True)
        self.metric_logger = build_metric_logger(  # NullLogger off rank 0; metrics.jsonl always on rank 0
            cfg.metric_logger, rank=self.rank, log_dir=os.path.join(self.output_dir, "logs")
        )
        self.metric_logger.log_config(cfg)
        self.processor = load_processor(
            cfg.model.path,
            min_pixels=cfg.model.min_pixels,
            max_pixels=cfg.model.max_pixels,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        self.weights_path = str(self.resume_from or cfg.model.path)
        self.model = self._setup_model(cfg, weights=self.weights_path)
        self.sampler = self._setup_sampler(cfg)
        if cfg.rollout.engine == "vllm" and holds_master_weights(self.weights_path):
            # vLLM read the bfloat16 export (ties rounded away from zero, or upcast for a float32 engine), not the
            # float32 master weights the trainer restored: push those, as after every step
            self._sync_sampler()
        self.optimizer, self.lr_scheduler = self._setup_optimizer(cfg)
        self._setup_data(cfg)
        self._setup_validation(cfg)
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)

    def _setup_model(self, cfg: DictConfig, *, weights: str) -> torch.nn.Module:
        """Load the HF policy on every rank and shard it (vision blocks, decoder layers, root) with FSDP2.

        weights: model.path, or the checkpoint folder being resumed (an HF folder with the same config).
        """
        model = load_training_policy(cfg, weights)
        self.model_config = model.config
        self.image_token_id = int(model.config.image_token_id)
        # The embedded sampler is a full unsharded copy on every rank (ENVIRONMENT.md pitfalls: generating with an
        # FSDP model deadlocks when ranks stop at different lengths); copy it before sharding.
        self._sampler_model = None
        if cfg.rollout.engine == "transformers":
            self._sampler_model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype).eval()
        return shard_and_place(model, cfg, device=self.device, world=self.world, dtype=self.dtype)

    def _setup_sampler(self, cfg: DictConfig):
        """The group sampler: the embedded transformers engine (full copy per rank) or colocated vLLM."""
        if cfg.rollout.engine == "transformers":
            from vppo_rollout.transformers_engine import TransformersSampler

            return TransformersSampler(self._sampler_model, self.processor)
        from vppo_rollout.vllm_engine import VLLMSampler

        # Colocated: one engine per rank, inside the rank's process on its device and process group (vLLM's
        # external_launcher, as TRL and verl colocate), asleep (weights offloaded, KV cache freed) while the trainer
        # runs where the platform has sleep mode (CUDA; CPU vLLM has none). It starts from the same weights as the
        # trainer (model.path, or the resumed checkpoint).
        sampler = VLLMSampler(
            self.weights_path,
            gpu_memory_utilization=cfg.rollout.gpu_memory_utilization,
            dtype=cfg.model.dtype,
            max_model_len=int(cfg.data.max_prompt_length) + int(cfg.rollout.max_new_tokens),
            seed=self.seed,
            min_pixels=cfg.model.min_pixels,
            max_pixels=cfg.model.max_pixels,
            distributed_executor_backend="external_launcher",
        )
        sampler.sleep()
        return sampler

    def _setup_optimizer(self, cfg: DictConfig):
        """Optimizer from the config's `_component_`: torch AdamW, or torchao's AdamW8bit / AdamW4bit / _AdamW.

        Constant lr after a linear warmup of `lr_scheduler.warmup_steps` optimizer steps.
        """
        optimizer = config.instantiate(cfg.optimizer, self.model.parameters())
        return optimizer, constant_with_warmup(optimizer, int(cfg.lr_scheduler.warmup_steps))

    def _setup_data(self, cfg: DictConfig) -> None:
        """The training rows through the column mapping, drawn in a seeded, resumable order (same on every rank).

        Rows that cannot be used (no image, empty answer, ...) and prompts longer than data.max_prompt_length
        (text + expanded image tokens) are skipped by the stream and counted by reason, each named on stderr.
        """
        self.dataset = VisualQADataset.from_source(cfg.data.source, cfg.data.split, dict(cfg.data.columns))
        self.stream = ExampleStream(
            self.dataset, seed=self.seed, shuffle=cfg.data.shuffle, prepare=self._prepare_example, log=self._log_skip
        )
        self.epochs = int(cfg.training.epochs)

    def _log_skip(self, line: str) -> None:
        """A skipped training row, named once (rank 0; every rank draws the same rows)."""
        if self.is_rank_zero:
            print(line, file=sys.stderr, flush=True)

    def _setup_validation(self, cfg: DictConfig) -> None:
        """Held-out rows for avg@k every `validation.every_n_steps` steps; each rank scores its strided share."""
        v = cfg.validation
        self.val_records: list[Record] = []
        self.val_skipped: dict[str, int] = defaultdict(int)
        if not v.every_n_steps:
            return
        try:
            ds = VisualQADataset.from_source(v.source, v.split, dict(cfg.data.columns))
        except ValueError as e:  # the loader names data.*; say which section it was
            raise ValueError(f"validation (source={v.source!r}, split={v.split!r}): {e}") from e
        records = []
        for row in range(len(ds)):
            if v.limit is not None and len(records) >= v.limit:
                break
            try:
                ex = ds.example(row)
            except SkipRow as skip:  # counted, never scored as 0
                self.val_skipped[skip.reason] += 1
                continue
            records.append(Record(id=str(row), question=ex.question, images=ex.images, answer=ex.answer))
        if not records:
            raise ValueError(
                f"validation.source={v.source!r} split {v.split!r} has no usable row: {dict(self.val_skipped)}"
            )
        self.val_records = records[self.rank :: self.world]

    def validate(self) -> dict[str, float]:
        """avg@k (ALGORITHMS.md §8: temperature 1.0, top-p 1.0) of the current policy on the held-out rows."""
        v = self._cfg.validation
        total, n, fmt = 0.0, 0, 0.0
        acc: dict[tuple[str, str], float] = {}
        if self.val_records:
            self.sampler.wake_up()
            res = evaluate(
                self.sampler,
                {"validation": self.val_records},
                processor=self.processor,
                k=int(v.k),
                temperature=1.0,
                top_p=1.0,
                max_new_tokens=int(self._cfg.rollout.max_new_tokens),
                seed=mix_seed(self.seed, self.step, 0x7A1),
                format_weight=float(self._cfg.reward.format_weight),
                multiple_choice=bool(self._cfg.reward.multiple_choice),
                progress=False,
                allow_empty=True,  # one rank's share may be all skipped: the counts are all-reduced below
            )
            self.sampler.sleep()
            acc = res.item_accuracy()
            total, n = sum(acc.values()), len(acc)
            b = res.benchmarks["validation"]
            fmt = 0.0 if math.isnan(b.format_rate) else b.format_rate * n
        total, n, fmt = _all_reduce_list([total, n, fmt])
        self._write_validation_items({item_id: a for (_, item_id), a in acc.items()})
        return {
            f"validation/avg@{int(v.k)}": total / n if n else math.nan,
            "validation/format_rate": fmt / n if n else math.nan,
            "validation/items": n,
        }

    def _write_validation_items(self, acc: dict[str, float]) -> None:
        """Append {"step", "k", "items": {row id: accuracy over the k samples}} of all ranks to
        `output_dir/logs/validation_items.jsonl` (rank 0 writes), for paired item-level comparisons between runs.
        A resumed run may append a step again; readers keep the last line of each step."""
        gathered: list[dict[str, float] | None] = [None] * self.world
        dist.all_gather_object(gathered, acc)
        if not self.is_rank_zero:
            return
        items = {key: value for part in gathered for key, value in (part or {}).items()}
        items = dict(sorted(items.items(), key=lambda kv: int(kv[0])))
        path = os.path.join(self.output_dir, "logs", "validation_items.jsonl")
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "a") as fh:
            fh.write(json.dumps({"step": self.step, "k": int(self._cfg.validation.k), "items": items}) + "\n")

    # ---------------------------------------------------------------- the RL step, in data-flow order

    def rl_step(self) -> dict[str, float] | None:
        """One RL step (module docstring); returns its metrics, or None once `training.epochs` of data are done.

        Each phase returns new values and no phase writes into another's: rollouts (groups with rewards and
        advantages) -> mini-batches of micro-batches -> no-grad passes (lp_old, S) -> shaped advantages and token
        weights -> the update -> the weight push. Counters come back from the phases; `_step_metrics` reduces
        them over ranks and adds them to the run's totals, once.
        """
        if self.stream.epoch >= self.epochs:
            return None
        t_step = time.perf_counter()

        # 1-3. sample G per prompt, grade, group advantages + online filter (drawing more prompts as needed)
        rollouts = self.generate_rollouts()
        if not rollouts.groups:  # every group filtered out even after max_filter_draws extra draws: no update
            metrics = self._step_metrics(
                rollouts, [], [], [], UpdateResult([], [], {}, {"skipped/steps_without_groups": 1.0}),
                local_counts={}, seconds=rollouts.seconds, agreement=[0.0] * 4, t_step=t_step,
            )  # fmt: skip
            return metrics

        # the mini-batches (update_prompts / world groups of this rank each), in micro-batches of tensors
        minis, local_counts = self.prepare_minibatches(rollouts.groups)

        # 4-5. no-grad passes: lp_old on the clean inputs; with altered views (ALTERED_VIEWS) lp_alt on them, S and
        # the §9 scores
        passes, pass_seconds = self.no_grad_passes(minis)

        # 5b. trainer-sampler agreement on the first mini-batch (the same weights, before any update)
        agreement = self.sampler_agreement(minis[0], passes[0])

        # 6. TAS α and TGF mask (VPPO) | PGPO token weights | the §9 token weights (| truncated importance weights)
        t = time.perf_counter()
        shaped = self.shape(minis, passes)
        shaping_s = time.perf_counter() - t

        # 7. per mini-batch: micro-batch forward/backward with the global token count, clip, step (or skip)
        t = time.perf_counter()
        update = self.update(minis, passes, shaped)
        update_s = time.perf_counter() - t

        # 8. push the new full weights into the sampler
        t = time.perf_counter()
        if self._cfg.rollout.sync_weights:
            self._sync_sampler()
        sync_s = time.perf_counter() - t

        seconds = {**rollouts.seconds, **pass_seconds, "shaping": shaping_s, "update": update_s, "weight_sync": sync_s}
        return self._step_metrics(
            rollouts, minis, passes, shaped, update,
            local_counts=local_counts, seconds=seconds, agreement=agreement, t_step=t_step,
        )  # fmt: skip

    # ---------------------------------------------------------------- 1-3. rollout

    def _prepare_example(self, example: Example) -> tuple[int, Prompt, str]:
        """ExampleStream's `prepare`: (row, chat prompt, answer); a row whose prompt cannot be built (over
        data.max_prompt_length, two <image> placeholders for one image, ...) is skipped and counted."""
        prompt = prompt_or_skip(self.processor, example, max_prompt_length=self._cfg.data.max_prompt_length)
        return example.row, prompt, example.answer

    def _draw(self, count: int) -> list[Draw]:
        """Next `count` usable examples, the same on every rank; [] once `training.epochs` are done.

        uid numbers the usable examples of the run (0, 1, 2, ...): it seeds that prompt's sampling and its
        responses' perturbations, so randomness follows the data, not the rank or the batching.
        """
        if self.stream.epoch >= self.epochs:
            return []
        prepared = self.stream.take(count)
        draws = [Draw(self.examples_drawn + i, row, prompt, answer) for i, (row, prompt, answer) in enumerate(prepared)]
        self.examples_drawn += len(draws)
        return draws

    def _sample_groups(self, mine: list[Draw]) -> tuple[list[Group], float, float]:
        """Sample G responses for each of this rank's draws, grade them, and compute the group advantages.

        Returns (groups, sampling seconds, grading seconds).
        """
        cfg = self._cfg.rollout

        def sampling(seed: int) -> SamplingConfig:
            return SamplingConfig(
                temperature=cfg.temperature,
                top_p=cfg.top_p,
                top_k=cfg.top_k,
                max_new_tokens=cfg.max_new_tokens,
                seed=seed,
                logprobs=True,  # raw (temperature 1) log-probs: the trainer-sampler agreement and rollout_is_cap
            )

        t = time.perf_counter()
        results = []
        if cfg.engine == "transformers":
            # One call per prompt, seeded by the prompt's uid: the responses do not depend on how prompts are
            # spread over ranks or batched, so runs are world-size independent and resume exactly.
            for d in mine:
                r = self.sampler.sample([d.prompt], self.group_size, sampling(mix_seed(self.seed, d.uid)))
                results.append(_group_lists(r, 0, self.group_size))
        elif mine:
            # vLLM: one batched call per rank (GroupSampler takes one SamplingConfig, so one seed per call).
            r = self.sampler.sample(
                [d.prompt for d in mine], self.group_size, sampling(mix_seed(self.seed, mine[0].uid, self.rank))
            )
            results = [_group_lists(r, i, self.group_size) for i in range(len(mine))]
        sample_s = time.perf_counter() - t

        t = time.perf_counter()
        groups = []
        for d, r in zip(mine, results):
            rw = compute_rewards(
                r["texts"],
                [d.answer] * self.group_size,
                format_weight=self._cfg.reward.format_weight,
                multiple_choice=self._cfg.reward.multiple_choice,
            )
            # per group: ranks own whole groups, so the advantages need nothing from other ranks
            advantages = group_advantages(torch.tensor(rw["reward"], dtype=torch.float32), self.group_size)
            group = Group(
                uid=d.uid,
                row=d.row,
                answer=d.answer,
                token_ids=r["token_ids"],
                texts=r["texts"],
                finish_reasons=r["finish_reasons"],
                sampler_logprobs=r["logprobs"],
                **rw,
                advantages=advantages.tolist(),
                prompt=d.prompt,
            )
            groups.append(group)
        return groups, sample_s, time.perf_counter() - t

    def generate_rollouts(self) -> Rollouts:
        """Fill the rollout batch: draw `batch_prompts` prompts at a time, sample, grade, filter (DAPO dynamic
        sampling), until `batch_prompts` groups are kept globally or `max_filter_draws` extra draws are spent.

        Returns this rank's share of the kept groups (whole groups; every rank gets the same number), ordered by
        mini-batch, with the filter counts and the phase's seconds.
        """
        counts: dict[str, float] = defaultdict(float)
        seconds = {"sample": 0.0, "reward": 0.0}
        kept: list[Group] = []
        draws = 0
        self.sampler.wake_up()  # vLLM: weights and KV cache back on the GPU (no-op for the embedded engine)
        while len(kept) < self.batch_prompts and draws <= self.max_filter_draws:
            drawn = self._draw(self.batch_prompts)
            if not drawn:
                break
            draws += 1
            local, sample_s, reward_s = self._sample_groups(drawn[self.rank :: self.world])
            seconds["sample"] += sample_s
            seconds["reward"] += reward_s
            gathered: list[list[dict]] = [None] * self.world  # type: ignore[list-item]
            dist.all_gather_object(gathered, [g.payload() for g in local])
            prompts = {d.uid: d.prompt for d in drawn}
            groups = sorted(
                (Group(**g, prompt=prompts[g["uid"]]) for part in gathered for g in part), key=lambda g: g.uid
            )
            counts["filter/groups_sampled"] += len(groups)
            for g in groups:
                if self.online_filter:
                    if not bool(keep_groups(torch.tensor(g.accuracy, dtype=torch.float32), self.group_size)[0]):
                        counts["filter/groups_dropped"] += 1
                        continue
                elif len(set(g.reward)) == 1:
                    counts["filter/zero_advantage_groups"] += 1  # kept; its advantage is exactly 0
                kept.append(g)
            if not self.online_filter:
                break
        self.sampler.sleep()
        counts["filter/draws"] += draws
        kept = kept[: self.batch_prompts]
        usable = len(kept) // self.world * self.world
        counts["filter/groups_kept"] += usable
        counts["filter/groups_unused"] += len(kept) - usable
        if usable < self.batch_prompts:
            counts["filter/underfilled_steps"] += 1
        # Global mini-batch j is kept[j*U : (j+1)*U] whatever the world size; each rank takes an equal contiguous
        # share of every mini-batch, so the optimizer sees the same batches as a single-process run.
        mine = []
        for mini in chunk_ranges(usable, self.update_prompts):
            part = kept[mini]
            mine += part[rank_slice(len(part), self.rank, self.world)]
        return Rollouts(mine, dict(counts), seconds)

    # ---------------------------------------------------------------- inputs

    def prepare_minibatches(self, groups: list[Group]) -> tuple[list[list[MicroBatch]], dict[str, float]]:
        """This rank's groups -> mini-batches (update_prompts/world groups each) -> micro-batches of tensors.

        Returns (minis, counts); counts has this rank's skipped/empty_responses (summed over ranks later).
        """
        per_rank = self.update_prompts // self.world
        empty = 0
        minis = []
        for mini in chunk_ranges(len(groups), per_rank):
            rows = [(g, j) for g in groups[mini] for j in range(self.group_size)]
            micro = []
            for sl in chunk_ranges(len(rows), self.micro_batch_size):
                part = rows[sl]
                prompts = [g.prompt for g, _ in part]
                ids = [g.token_ids[j] for g, j in part]
                empty += sum(len(x) == 0 for x in ids)  # all-zero mask rows
                batch = collate_rollout(self.processor, prompts, ids, config=self.model_config)
                lp_sampler = torch.zeros(batch["responses"].shape, dtype=torch.float32)
                for i, (g, j) in enumerate(part):
                    lp_sampler[i, : len(g.sampler_logprobs[j])] = torch.tensor(g.sampler_logprobs[j])
                micro.append(
                    MicroBatch(
                        inputs={k: v.to(self.device) for k, v in model_inputs(batch).items()},
                        responses=batch["responses"].to(self.device),
                        mask=batch["response_mask"].to(self.device),
                        prompt_length=int(batch["prompt_length"]),
                        advantages=torch.tensor([g.advantages[j] for g, j in part], dtype=torch.float32).to(
                            self.device
                        ),
                        perturb_seeds=[
                            mix_seed(self.seed, g.uid, j if self.perturb_per_response else 0, 0x9E7) for g, j in part
                        ],
                        images_per_row=[len(p.images) for p in prompts],
                        lp_sampler=lp_sampler.to(self.device),
                        prompts=prompts,
                        texts=[g.texts[j] for g, j in part],
                    )
                )
            minis.append(micro)
        return minis, {"skipped/empty_responses": float(empty)}

    def _altered_view(self, mb: MicroBatch, view: str) -> tuple[dict[str, torch.Tensor], int, Any]:
        """The inputs of one altered no-grad pass (ALGORITHMS.md §1 "what image' is", §5, §9; ALTERED_VIEWS).

        Returns (inputs, prompt length, context): a new inputs dict (mb is unchanged), the prompt length of those
        inputs (only the no-image view changes it) and the context the forward runs in (CFPO's attention
        intervention; a null context otherwise). Every random draw is seeded by the response's (VPPO) or prompt's
        identity alone, so a view does not depend on the batching.
        """
        inputs = dict(mb.inputs)
        a = self._cfg.algorithm
        if view == "text_only":  # PGPO: no token attends to a visual token; tokens and M-RoPE positions unchanged
            eager = getattr(self.model.config, "_attn_implementation", "sdpa") == "eager"
            inputs["attention_mask"] = text_only_attention(
                inputs["input_ids"],
                self.image_token_id,
                inputs["attention_mask"],
                dtype=self.dtype if eager else torch.bool,  # additive mask for eager, boolean for SDPA
            )
            return inputs, mb.prompt_length, contextlib.nullcontext()
        if view == "counterfactual":  # CFPO: salient image values replaced by their mean, in every decoder layer
            context = cross_modal_value_mean(
                self.model, inputs["input_ids"], attention_mask=inputs["attention_mask"],
                std_multiplier=a.cfpo_std_multiplier,
            )  # fmt: skip
            return inputs, mb.prompt_length, context
        if view in ("no_image", "regions_filled"):
            if view == "no_image":  # ToR: the chat without its image parts
                prompts = [prompt_without_images(p, self.processor) for p in mb.prompts]
            else:  # CGPO: each response's own evidence boxes filled with their mean colour (none: the original)
                prompts = [
                    dataclasses.replace(p, images=filled_region_images(p.images, text))
                    for p, text in zip(mb.prompts, mb.texts)
                ]
            ids = [row[: int(n)].tolist() for row, n in zip(mb.responses, mb.mask.sum(1))]
            batch = collate_rollout(self.processor, prompts, ids, config=self.model_config)
            return (
                {k: v.to(self.device) for k, v in model_inputs(batch).items()},
                int(batch["prompt_length"]),
                contextlib.nullcontext(),
            )
        # pixel views: "perturbed" (algorithm.perturbation, VPPO's defaults for the diagnostics; PAPO and DVRP
        # blacken with their own mask_prob) or "noised"
        if view == "perturbed" and "mask_prob" in a:
            options = {"mode": "blacken", "prob": a.mask_prob}
        elif view == "perturbed":
            options = {"mode": a.get("perturbation", "blacken"), "prob": a.get("perturb_prob", 0.5)}
        elif self.algorithm == "dvrp":  # VP-diffusion noise, annealed from strong to weak over the run
            level = diffusion_noise_level(
                self.step + 1, self.max_steps, t_init=a.noise_t_init, gamma=a.noise_gamma, t_max=a.noise_t_max
            )
            options = {"mode": "vp_diffusion", "noise_level": level}
        else:  # VEPO: Gaussian noise on the normalised values
            options = {"mode": "gaussian", "noise_std": a.vepo_noise_std}
        view_seed = 0 if view == self.views[0] else 1  # DVRP's second view draws apart from its first
        ip = self.processor.image_processor
        thw = inputs["image_grid_thw"]
        patches = thw.prod(-1).tolist()  # pixel_values rows per image, images in row order
        pieces, img, start = [], 0, 0
        for b, n_images in enumerate(mb.images_per_row):
            n_rows = sum(patches[img : img + n_images])
            seed = mb.perturb_seeds[b] if view_seed == 0 else mix_seed(mb.perturb_seeds[b], view_seed)
            g = torch.Generator(device=inputs["pixel_values"].device).manual_seed(seed)
            pieces.append(
                perturb_pixels(
                    inputs["pixel_values"][start : start + n_rows],
                    thw[img : img + n_images],
                    **options,
                    image_mean=ip.image_mean,
                    image_std=ip.image_std,
                    rescale_factor=ip.rescale_factor,
                    generator=g,
                    patch_size=ip.patch_size,
                    temporal_patch_size=ip.temporal_patch_size,
                    merge_size=ip.merge_size,
                )
            )
            img, start = img + n_images, start + n_rows
        inputs["pixel_values"] = torch.cat(pieces)
        return inputs, mb.prompt_length, contextlib.nullcontext()

    def _pass(self, mb: MicroBatch, inputs, prompt_length: int, *, validate=True, **wanted) -> dict[str, torch.Tensor]:
        """`response_pass` over mb's responses under `inputs` (lp, and what `wanted` asks for; the last hidden state
        in no-grad passes, the only ones that read it: see `response_pass` on views under FSDP2)."""
        wanted.setdefault("with_hidden", not torch.is_grad_enabled())
        return call_in_root_forward(
            self.model,
            response_pass,
            inputs,
            mb.responses,
            prompt_length,
            temperature=self.temperature,
            chunk_size=self.chunk_size,
            validate=validate,
            **wanted,
        )

    # ---------------------------------------------------------------- 4-5. no-grad passes

    def no_grad_passes(self, minis: list[list[MicroBatch]]) -> tuple[list[list[NoGradPass]], dict[str, float]]:
        """lp_old of every micro-batch and, with altered views (ALTERED_VIEWS), their log-probs, S and S̄, and the
        scores of the §9 methods; all before any update.

        lp_old comes from the clean rows alone, in the micro-batch shape of the update: a pass over another batch
        shape (e.g. clean and perturbed rows stacked) changes the matmul shapes, and on GPUs in bf16 the result, so
        the first mini-batch's ratios would not be exactly 1 (verl: the log-prob micro-batch must equal the
        update's). Every altered view is its own pass over the same rows. Returns (passes [mini][micro],
        {"old_logprob": s, "alt_logprob": s}).
        """
        a = self._cfg.algorithm
        exact = a.get("dependency") == "exact"  # vppo / pgpo only
        seconds = {"old_logprob": 0.0, "alt_logprob": 0.0}
        T, chunk = self.temperature, self.chunk_size
        passes = []
        with torch.no_grad():
            for mini in minis:
                mini_passes = []
                for mb in mini:
                    t = time.perf_counter()
                    clean = self._pass(
                        mb, mb.inputs, mb.prompt_length, entropy=self.algorithm in ("pepo", "cgpo"),
                        visual_token_id=self.image_token_id if self.algorithm == "pepo" else None,
                    )  # fmt: skip
                    lp_old, extra = clean["lp"], {}
                    if self.algorithm == "pepo":
                        extra = {"score": clean["prior"], "entropy": clean["entropy"]}
                    elif self.algorithm == "cgpo":
                        extra = {"entropy": clean["entropy"]}
                    elif self.algorithm == "tor":  # the entropy of the top-p renormalised distribution
                        extra = {"entropy": call_in_root_forward(
                            self.model, top_p_entropy_in_root, clean["hidden"], mb.mask, top_p=a.tor_entropy_top_p,
                            temperature=T, chunk_size=chunk,
                        )}  # fmt: skip
                    seconds["old_logprob"] += time.perf_counter() - t
                    if not self.measures_dependency:
                        mini_passes.append(NoGradPass(lp_old, **extra))
                        continue
                    t = time.perf_counter()
                    altered = []
                    for view in self.views:
                        inputs, prompt_length, context = self._altered_view(mb, view)
                        with context:
                            altered.append(self._pass(mb, inputs, prompt_length))
                    lp_alt = altered[0]["lp"]
                    # 5. token visual dependency (sampled-token k3 estimator, or the exact full-vocabulary KL)
                    if exact:
                        S = call_in_root_forward(
                            self.model, exact_dependency_in_root, clean["hidden"], altered[0]["hidden"], mb.mask,
                            temperature=T, chunk_size=chunk,
                        )  # fmt: skip
                    else:
                        S = token_dependency(lp_old, lp_alt, mb.mask)
                    if self.algorithm == "tor":
                        extra["score"] = abs_log_ratio(lp_old, lp_alt, mb.mask)
                    elif self.algorithm == "vepo":
                        d = call_in_root_forward(
                            self.model, view_divergences_in_root, clean["hidden"], altered[0]["hidden"], mb.mask,
                            temperature=T, chunk_size=chunk,
                        )  # fmt: skip
                        extra["score"] = vepo_token_scores(
                            d["jsd"], d["entropy"], d["entropy_gap"], mb.mask, jsd_weight=a.vepo_jsd_weight
                        )
                    if len(altered) > 1:
                        extra["lp_alt2"] = altered[1]["lp"]
                    mini_passes.append(NoGradPass(lp_old, lp_alt, S, trajectory_dependency(S, mb.mask), **extra))
                    seconds["alt_logprob"] += time.perf_counter() - t
                passes.append(mini_passes)
        return passes, seconds

    def _pg_share_on_dependent_tokens(
        self, mbs: list[MicroBatch], passes: list[NoGradPass], shaped: list[Shaped]
    ) -> float:
        """`policy_gradient_share` over all micro-batches and ranks: the share of the uniform-credit policy gradient
        on each response's ceil(ρ·n) most dependent tokens (ρ = algorithm.tgf_fraction; 0.4 for the baselines),
        with the shaped advantages (α · A for VPPO)."""
        fraction = float(self._cfg.algorithm.get("tgf_fraction", 0.4))
        sums = [0.0, 0.0]
        for mb, p, sh in zip(mbs, passes, shaped):
            on_top, total = policy_gradient_share(sh.advantages, p.lp_old, p.S, mb.mask, fraction=fraction).tolist()
            sums = [sums[0] + on_top, sums[1] + total]
        on_top, total = _all_reduce_list(sums)
        return on_top / total if total > 0 else math.nan

    def sampler_agreement(self, mini: list[MicroBatch], passes: list[NoGradPass]) -> list[float]:
        """|lp_sampler − lp_old| over one mini-batch's valid tokens: [sum, tokens, tokens above the threshold, max].

        Both are temperature-1 log-probs only when rollout.temperature is 1; otherwise all zeros (not logged).
        """
        agreement = [0.0, 0.0, 0.0, 0.0]
        if self.temperature != 1.0:
            return agreement
        for mb, p in zip(mini, passes):
            diff = (p.lp_old.float() - mb.lp_sampler).abs()[mb.mask > 0]
            if diff.numel():
                agreement[0] += float(diff.sum())
                agreement[1] += diff.numel()
                agreement[2] += float((diff > AGREEMENT_THRESHOLD).sum())
                agreement[3] = max(agreement[3], float(diff.max()))
        return agreement

    # ---------------------------------------------------------------- 6. shaping

    def _batch_top_fraction(
        self, minis: list[list[MicroBatch]], values: list[list[torch.Tensor]], fraction: float, which: int
    ) -> list[torch.Tensor]:
        """`top_fraction_mask(scope="batch")` over every response token of the step's rollout batch, all ranks
        (ToR's and CGPO's sets), gathered in data order whatever the ranks (global mini-batch j is rank 0's share
        of it, then rank 1's, ...). Ties are broken at random, as the public implementation does, from a generator
        seeded by (seed, step, which set): the same draw on every rank and for any number of ranks. Returns one
        [b, L] bool per micro-batch of this rank, in order."""
        parts, mine = [], []  # per mini-batch: the gathered values, and where this rank's share starts in them
        offset = 0
        for mini, mini_values in zip(minis, values):
            local = torch.cat([v[mb.mask > 0].float() for mb, v in zip(mini, mini_values)])
            counts = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world)]
            dist.all_gather(counts, torch.tensor([local.numel()], device=self.device))
            parts.append(_all_gather_var(local))
            mine.append((offset + sum(int(c) for c in counts[: self.rank]), local.numel()))
            offset += parts[-1].numel()
        everything = torch.cat(parts)[None]
        ties = torch.Generator().manual_seed(mix_seed(self.seed, self.step, TIE_BREAK_SALT, which))
        top = top_fraction_mask(
            everything, torch.ones_like(everything), fraction=fraction, scope="batch", generator=ties
        )[0]
        out = []
        for mini, (start, n) in zip(minis, mine):
            share = top[start : start + n]
            for mb in mini:
                valid = mb.mask > 0
                mask = torch.zeros_like(valid)
                mask[valid] = share[: int(valid.sum())]
                share = share[int(valid.sum()) :]
                out.append(mask)
        return out

    def _step_token_weights(self, minis: list[list[MicroBatch]], passes: list[list[NoGradPass]]):
        """The token weights and response factors of the §9 methods whose statistics span the whole rollout batch
        or need global counts (ToR, CGPO, VEPO), and PEPO's; per micro-batch, [mini][micro]. None for the others.

        Returns (weights [mini][micro] of [b, L] float or None, alphas [mini][micro] of [b] or None).
        """
        a = self._cfg.algorithm
        mbs = [mb for mini in minis for mb in mini]
        ps = [p for mini in passes for p in mini]
        weights: list[torch.Tensor] | None = None
        alphas: list[torch.Tensor] | None = None
        if self.algorithm == "tor":
            entropy = [[p.entropy for p in mini] for mini in passes]
            reasoning = self._batch_top_fraction(minis, entropy, a.tor_entropy_fraction, 0)
            perception = self._batch_top_fraction(
                minis, [[p.score for p in mini] for mini in passes], a.tor_perception_fraction, 1
            )
            weights = [
                tor_token_weights(
                    r, q, mb.mask, reasoning_weight=a.tor_reasoning_weight, perception_weight=a.tor_perception_weight
                )
                for mb, r, q in zip(mbs, reasoning, perception)
            ]
        elif self.algorithm == "cgpo":
            entropic = self._batch_top_fraction(
                minis, [[p.entropy for p in mini] for mini in passes], a.cgpo_entropy_fraction, 0
            )
            perception = self._batch_top_fraction(
                minis, [[p.S for p in mini] for mini in passes], a.cgpo_perception_fraction, 1
            )
            if a.cgpo_region_tokens:  # the tokens of the response's <region> spans join the perception set
                regions = [region_token_mask(mb.responses, mb.mask, self.processor.tokenizer) for mb in mbs]
                perception = [q | r for q, r in zip(perception, regions)]
            traj = torch.cat([p.traj_dep for p in ps])
            valid = torch.cat([mb.mask.sum(1) > 0 for mb in mbs])
            all_traj, all_valid = _all_gather_var(traj), _all_gather_var(valid.to(traj.dtype)).bool()
            counts = [torch.zeros(1, dtype=torch.long, device=self.device) for _ in range(self.world)]
            dist.all_gather(counts, torch.tensor([traj.numel()], device=self.device))
            offset = sum(int(c) for c in counts[: self.rank])
            alpha = cgpo_response_factors(all_traj, all_valid, coef=a.cgpo_coef)[offset : offset + traj.numel()]
            alphas = list(alpha.split([p.traj_dep.numel() for p in ps]))
            # A'_t = A_i·α_i on perception tokens (A_i elsewhere), then the PG terms of entropy ∪ perception tokens
            # only: ℓ is positively homogeneous in A, so both are one token weight.
            weights = [
                torch.where(q, al[:, None], torch.ones_like(mb.mask)) * (e | q).to(mb.mask.dtype) * mb.mask
                for mb, al, e, q in zip(mbs, alphas, entropic, perception)
            ]
        elif self.algorithm == "vepo":
            selected = [top_fraction_mask(p.score, mb.mask, fraction=a.vepo_fraction) for mb, p in zip(mbs, ps)]
            weights, i = [], 0
            for mini in minis:
                part = selected[i : i + len(mini)]
                i += len(mini)
                if self._cfg.loss.aggregation != "token-mean":  # each response's own mean over its selected tokens
                    weights += [s * (mb.mask.sum(1) / s.sum(1).clamp(min=1))[:, None] for mb, s in zip(mini, part)]
                    continue
                # token-mean: the policy term is a mean over the selected tokens of the (global) mini-batch
                n = torch.stack([torch.stack([mb.mask.sum(), s.sum()]) for mb, s in zip(mini, part)]).double().sum(0)
                dist.all_reduce(n)
                scale = float(n[0] / n[1]) if n[1] > 0 else 0.0
                weights += [s.to(mb.mask.dtype) * scale for mb, s in zip(mini, part)]
        elif self.algorithm == "pepo":
            total = self.max_steps
            progress = 1.0 if a.pepo_schedule == "none" else (1.0 if total <= 1 else min(1.0, self.step / (total - 1)))
            weights = [
                pepo_token_weights(
                    p.score, p.entropy, mb.mask, gate_alpha=a.pepo_gate_alpha, temperature=a.pepo_temperature,
                    progress=progress,
                )
                for mb, p in zip(mbs, ps)
            ]  # fmt: skip
        if weights is None:
            return None, None
        split_w, split_a, i = [], [], 0
        for mini in minis:
            split_w.append(weights[i : i + len(mini)])
            split_a.append(alphas[i : i + len(mini)] if alphas is not None else None)
            i += len(mini)
        return split_w, split_a

    def shape(self, minis: list[list[MicroBatch]], passes: list[list[NoGradPass]]) -> list[list[Shaped]]:
        """Per mini-batch: VPPO's α (TAS, §3) and TGF mask (§4), PGPO's ω̃ (§5), or the token weights of the §9
        methods (`_step_token_weights`), and the truncated importance weights (loss.rollout_is_cap). Returns one
        Shaped per micro-batch, [mini][micro]."""
        method_weights, method_alphas = self._step_token_weights(minis, passes)
        return [
            self._shape_mini_batch(
                mini,
                mini_passes,
                method_weights[i] if method_weights is not None else None,
                method_alphas[i] if method_alphas is not None and method_alphas[i] is not None else None,
            )
            for i, (mini, mini_passes) in enumerate(zip(minis, passes))
        ]

    def _shape_mini_batch(
        self,
        mini: list[MicroBatch],
        passes: list[NoGradPass],
        method_weights: list[torch.Tensor] | None,
        method_alphas: list[torch.Tensor] | None,
    ) -> list[Shaped]:
        a = self._cfg.algorithm
        alphas = method_alphas or [torch.ones_like(mb.advantages) for mb in mini]
        if self.tas:
            traj = torch.cat([p.traj_dep for p in passes])
            valid = torch.cat([mb.mask.sum(1) > 0 for mb in mini])
            if a.tas_statistics == "global":
                # m, M and mean(n) over the GLOBAL mini-batch: gather S̄ of every rank (same length on each).
                all_traj, all_valid = _all_gather_cat(traj), _all_gather_cat(valid.to(traj.dtype)).bool()
                alpha = tas_scale(all_traj, beta_min=a.beta_min, valid=all_valid)
                alpha = alpha[self.rank * traj.numel() : (self.rank + 1) * traj.numel()]
            else:  # the official code: per-rank mini-batch min/max, per-micro-batch mean(n)
                alpha = tas_scale_reference(traj, self.micro_batch_size, beta_min=a.beta_min, valid=valid)
            alphas = list(alpha.split([p.traj_dep.numel() for p in passes]))
        cap = self._cfg.loss.rollout_is_cap
        shaped = []
        for i, (mb, p, alpha) in enumerate(zip(mini, passes, alphas)):
            token_weights = None
            own = method_weights[i].to(p.lp_old.dtype) if method_weights is not None else None
            if self.tgf:
                token_weights = tgf_mask(p.S, mb.mask, fraction=a.tgf_fraction).to(p.lp_old.dtype)
            elif self.algorithm == "pgpo":
                token_weights = pgpo_token_weights(
                    p.S,
                    mb.mask,
                    tau=a.pgpo_tau,
                    beta=a.pgpo_beta,
                    threshold_mode=a.pgpo_threshold_mode,
                    weight_floor=a.pgpo_weight_floor,
                    mass_normalization=a.pgpo_mass_normalization,
                )
            elif own is not None:
                token_weights = own
            is_weights = None
            if cap is not None:  # truncated IS: reweight each token's policy term by min(π_old / π_rollout, cap)
                is_weights = truncated_is_weights(p.lp_old, mb.lp_sampler, mb.mask, cap=float(cap))
                w = is_weights.to(p.lp_old.dtype)
                token_weights = w if token_weights is None else token_weights * w
            # CGPO's α multiplies the advantage of perception tokens only (inside its token weights), not A_i
            advantages = mb.advantages if self.algorithm == "cgpo" else mb.advantages * alpha
            shaped.append(Shaped(advantages, alpha, token_weights, is_weights, own))
        return shaped

    # ---------------------------------------------------------------- 7. update

    def update(
        self, minis: list[list[MicroBatch]], passes: list[list[NoGradPass]], shaped: list[list[Shaped]]
    ) -> UpdateResult:
        """One optimizer update per mini-batch (gradient accumulation over its micro-batches, clip, step)."""
        losses, grad_norms = [], []
        metric_sums: dict[str, Any] = {}  # this phase's own accumulator, filled by every mini-batch in turn
        counts: dict[str, float] = defaultdict(float)
        for mini, mini_passes, mini_shaped in zip(minis, passes, shaped):
            loss, grad_norm, skipped = self._update_mini_batch(mini, mini_passes, mini_shaped, metric_sums)
            losses.append(loss)
            grad_norms.append(grad_norm)
            if skipped is not None:
                counts[f"skipped/{skipped}"] += 1
        return UpdateResult(losses, grad_norms, metric_sums, dict(counts))

    def _update_mini_batch(
        self, mini: list[MicroBatch], passes: list[NoGradPass], shaped: list[Shaped], metric_sums: dict[str, Any]
    ) -> tuple[float, float, str | None]:
        """Gradient accumulation over the micro-batches of one mini-batch, then clip and step (or skip).

        Every micro-batch loss is divided by the GLOBAL valid-token count of the mini-batch (or the global number
        of non-empty responses for seq-mean-token-mean / GSPO-style aggregations), so the summed losses are one
        token-mean over all ranks. Adds the micro-batches' policy_loss metrics to `metric_sums`. Returns (loss,
        grad norm, None) of the mini-batch, or with the reason it was skipped ("updates_without_tokens",
        "nonfinite_updates"; both decided on global values, so alike on every rank).

        Host syncs: two per mini-batch (the token count, and the loss with the grad norms before and after clipping
        for the skip decision, `clip_and_check_update`),
        however many micro-batches it has. The micro-batch loop runs vppo-core with `validate=False` (its inputs
        were made and checked by this recipe; a non-finite value shows up in the loss and skips the step) and keeps
        its metrics as tensors (`accumulate_loss_metrics`), moved to the host once per step in `_step_metrics`.
        """
        L = self._cfg.loss
        counts = torch.stack([torch.stack([mb.mask.sum(), (mb.mask.sum(1) > 0).sum()]).double() for mb in mini])
        counts = counts.sum(0)
        dist.all_reduce(counts)
        if counts[0].item() == 0:  # only empty responses: nothing to learn from, keep the ranks in step
            return math.nan, math.nan, "updates_without_tokens"
        token_mean = L.aggregation == "token-mean"
        norm = {"num_tokens": counts[0]} if token_mean else {"num_sequences": counts[1]}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        a = self._cfg.algorithm
        vepo = self.algorithm == "vepo"
        for mb, p, s in zip(mini, passes, shaped):
            new = self._pass(mb, mb.inputs, mb.prompt_length, validate=False, entropy=vepo)
            lp_new = new["lp"]
            # ALGORITHMS.md §9.1: PAPO / CFPO / DVRP add k3(altered view ‖ π_θ) terms, the altered views scored
            # once before the update (no gradient through them); VEPO an entropy bonus with gradient.
            aux_terms = {
                name: (sign * float(a[key]), kl_penalty(lp_new, (p.lp_alt, p.lp_alt2)[view], "k3"))
                for name, (key, sign, view) in AUX_KL_TERMS.get(self.algorithm, {}).items()
            }
            if vepo:
                aux_terms["entropy_bonus"] = (-float(a.vepo_entropy_bonus), new["entropy"])
            loss, metrics = policy_loss(
                lp_new,
                p.lp_old,
                s.advantages,
                mb.mask,
                token_weights=s.token_weights,
                loss_type=L.loss_type,
                clip_low=L.clip_low,
                clip_high=L.clip_high,
                dual_clip=L.dual_clip,
                entropy_coef=L.entropy_coef,
                aggregation=L.aggregation,
                aux_terms=aux_terms,
                validate=False,
                **norm,
            )
            # FSDP's reduce-scatter AVERAGES gradients over ranks; the loss is already a global mean -> undo it.
            (loss * self.world).backward()
            loss_sum = loss_sum + loss.detach().double()
            valid = mb.mask > 0
            active = valid if s.token_weights is None else valid & (s.token_weights != 0)
            accumulate_loss_metrics(metric_sums, metrics, valid_tokens=valid.sum(), active_tokens=active.sum())
        metric_sums["_updates"] = metric_sums.get("_updates", 0.0) + 1
        dist.all_reduce(loss_sum)
        # The loss, the norm before clipping and the norm of the clipped gradients (what the step applies), in one
        # host sync; all global, so every rank decides alike.
        (grad_norm, _, loss_total), finite = clip_and_check_update(
            self.model.parameters(), self.grad_clip, also=(loss_sum,)
        )
        if not finite:
            # The step is skipped, never applied: a NaN/inf gradient would poison AdamW's moments.
            self.optimizer.zero_grad(set_to_none=True)
            return loss_total, grad_norm, "nonfinite_updates"
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()
        self.optimizer_steps += 1
        return loss_total, grad_norm, None

    # ---------------------------------------------------------------- 8. weight push

    def _sync_sampler(self) -> None:
        """Gather every parameter to full on every rank (one tensor at a time) and copy it into the sampler.

        `state_dict()` names are the HF names (activation-checkpoint wrappers stripped), which both engines use.
        """

        def full_tensors():
            for name, t in self.model.state_dict().items():
                yield name, (t.full_tensor() if isinstance(t, DTensor) else t).detach()

        self.sampler.update_weights(full_tensors())  # vLLM wakes only its weights for the copy

    # ---------------------------------------------------------------- metrics

    def _step_metrics(
        self,
        rollouts: Rollouts,
        minis: list[list[MicroBatch]],
        passes: list[list[NoGradPass]],
        shaped: list[list[Shaped]],
        update: UpdateResult,
        *,
        local_counts: dict[str, float],
        seconds: dict[str, float],
        agreement: list[float],
        t_step: float,
    ) -> dict[str, float]:
        """Reduce the phases' results over all ranks into one flat dict (the same on every rank), and add the step's
        counts to the run's totals."""
        mbs = [mb for mini in minis for mb in mini]
        mb_passes = [p for mini in passes for p in mini]
        mb_shaped = [s for mini in shaped for s in mini]
        groups = rollouts.groups
        m: dict[str, float] = {}
        # filter/* and the update's skipped/* are global already (decided on gathered or all-reduced values);
        # local_counts (skipped/empty_responses) are this rank's and are summed.
        local = sorted(local_counts)
        counts = {**rollouts.counts, **update.counts}
        counts.update(zip(local, _all_reduce_list([local_counts[k] for k in local])))
        for k, v in counts.items():
            self.totals[k] += v
            m[k] = v
        sampled = counts.get("filter/groups_sampled", 0.0)
        m["filter/keep_rate"] = counts.get("filter/groups_kept", 0.0) / sampled if sampled else math.nan

        losses, grad_norms, loss_metrics = update.losses, update.grad_norms, update.metric_sums
        m["loss"] = sum(losses) / len(losses) if losses else math.nan
        m["grad_norm"] = sum(grad_norms) / len(grad_norms) if grad_norms else math.nan
        m["lr"] = float(self.optimizer.param_groups[0]["lr"])
        m["optimizer_steps"] = float(self.optimizer_steps)
        if loss_metrics:  # policy_loss metrics over all micro-batches and ranks (see SHARE_METRICS)
            updates = int(loss_metrics.get("_updates", 0))  # the same on every rank
            keys = sorted(k for k in loss_metrics if not k.endswith("_max") and k != "_updates")
            sums = dict(zip(keys, _all_reduce_list([loss_metrics[k] for k in keys])))
            maxima = sorted(k for k in loss_metrics if k.endswith("_max"))
            sums.update(zip(maxima, _all_reduce_list([loss_metrics[k] for k in maxima], op=dist.ReduceOp.MAX)))
            for k, v in finalize_loss_metrics(sums, updates).items():
                m[f"actor/{k}"] = v

        # token dependency and shaping statistics, exact over all ranks (gathered values)
        def gathered(xs: list[torch.Tensor]) -> torch.Tensor:
            local_values = torch.cat(xs).float() if xs else torch.zeros(0, device=self.device)
            return _all_gather_var(local_values)

        if self.measures_dependency:
            S = gathered([p.S[mb.mask > 0] for mb, p in zip(mbs, mb_passes)])
            traj = gathered([p.traj_dep[mb.mask.sum(1) > 0] for mb, p in zip(mbs, mb_passes)])
            m["dependency/token_mean"] = float(S.mean()) if S.numel() else math.nan
            m["dependency/token_p50"], m["dependency/token_p90"] = masked_quantiles(S, (0.5, 0.9))
            m["dependency/traj_mean"] = float(traj.mean()) if traj.numel() else math.nan
            m["diag/pg_share_on_dependent_tokens"] = self._pg_share_on_dependent_tokens(mbs, mb_passes, mb_shaped)
        if self.algorithm == "vppo":
            alpha = gathered([s.alpha[mb.mask.sum(1) > 0] for mb, s in zip(mbs, mb_shaped)])
            m["tas/alpha_min"] = float(alpha.min()) if alpha.numel() else math.nan
            m["tas/alpha_max"] = float(alpha.max()) if alpha.numel() else math.nan
            m["tas/alpha_std"] = float(alpha.std()) if alpha.numel() > 1 else math.nan
            if self.tgf:
                w = gathered([s.token_weights[mb.mask > 0] for mb, s in zip(mbs, mb_shaped)])
                m["tgf/selected_fraction"] = float(w.mean()) if w.numel() else math.nan
        if self.algorithm == "pgpo":
            w = gathered([s.token_weights[mb.mask > 0] for mb, s in zip(mbs, mb_shaped)])
            m["pgpo/weight_mean"] = float(w.mean()) if w.numel() else math.nan
            m["pgpo/weight_min"] = float(w.min()) if w.numel() else math.nan
            m["pgpo/weight_max"] = float(w.max()) if w.numel() else math.nan
            m["pgpo/weight_std"] = float(w.std()) if w.numel() > 1 else math.nan
        if self.algorithm in ("tor", "cgpo", "vepo", "pepo"):  # the §9 method's own token weights
            w = gathered([s.method_weights[mb.mask > 0] for mb, s in zip(mbs, mb_shaped)])
            name = self.algorithm
            m[f"{name}/weight_mean"] = float(w.mean()) if w.numel() else math.nan
            m[f"{name}/weight_min"] = float(w.min()) if w.numel() else math.nan
            m[f"{name}/weight_max"] = float(w.max()) if w.numel() else math.nan
            m[f"{name}/nonzero_fraction"] = float((w != 0).double().mean()) if w.numel() else math.nan
        if self.algorithm == "cgpo":
            alpha = gathered([s.alpha[mb.mask.sum(1) > 0] for mb, s in zip(mbs, mb_shaped)])
            m["cgpo/alpha_min"] = float(alpha.min()) if alpha.numel() else math.nan
            m["cgpo/alpha_max"] = float(alpha.max()) if alpha.numel() else math.nan
        if self.algorithm == "dvrp":
            a = self._cfg.algorithm
            m["dvrp/noise_level"] = diffusion_noise_level(
                self.step + 1, self.max_steps, t_init=a.noise_t_init, gamma=a.noise_gamma, t_max=a.noise_t_max
            )

        # trainer-sampler agreement (first mini-batch, all ranks) and the truncated importance weights
        total, tokens, above = _all_reduce_list(agreement[:3])
        (largest,) = _all_reduce_list(agreement[3:], op=dist.ReduceOp.MAX)
        m["rollout/logprob_abs_diff_mean"] = total / tokens if tokens else math.nan
        m["rollout/logprob_abs_diff_max"] = largest if tokens else math.nan
        m["rollout/logprob_frac_above_1e-3"] = above / tokens if tokens else math.nan
        if self._cfg.loss.rollout_is_cap is not None:
            w = gathered([s.is_weights[mb.mask > 0] for mb, s in zip(mbs, mb_shaped)])
            cap = float(self._cfg.loss.rollout_is_cap)
            m["rollout/is_weight_mean"] = float(w.mean()) if w.numel() else math.nan
            m["rollout/is_capped_fraction"] = float((w >= cap).double().mean()) if w.numel() else math.nan

        # rewards of the responses trained on (kept groups of all ranks)
        r = _all_reduce_list(
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

        slowest = _all_reduce_list([seconds.get(phase, 0.0) for phase in PHASES], op=dist.ReduceOp.MAX)
        for phase, v in zip(PHASES, slowest):
            m[f"time/{phase}_s"] = v  # the slowest rank sets the pace
        m["time/step_s"] = time.perf_counter() - t_step
        m["throughput/tokens_per_s"] = r[4] / m["time/step_s"]
        # Peak memory of every rank: allocated GPU memory on CUDA, the process's peak RSS on CPU.
        if self.device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(self.device) / 2**30
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
        peaks = _all_gather_var(torch.tensor([peak], dtype=torch.float64, device=self.device)).tolist()
        for rank, v in enumerate(peaks):
            m[f"memory/peak_gib_rank{rank}"] = v
        for reason, v in self.stream.skipped.items():
            m[f"total/skipped_rows/{reason}"] = float(v)
        return m

    # ---------------------------------------------------------------- loop, checkpoints, cleanup

    def train(self) -> None:
        pbar = tqdm(total=self.max_steps, initial=self.step, disable=not self.is_rank_zero, desc=f"{self.algorithm}")
        saved_at = self.step  # a resumed step is saved; step 0 (nothing trained) needs no checkpoint
        while self.step < self.max_steps:
            self.stopped_by = self.stop_request.agreed()  # collective: every rank stops at the same step
            if self.stopped_by is not None:
                if self.step != saved_at:
                    self.save_checkpoint()
                    saved_at = self.step
                if self.is_rank_zero:
                    print(stopped_message(self.stopped_by, self.step, self.output_dir), flush=True)
                break
            metrics = self.rl_step()
            if metrics is None:
                break
            self.step += 1
            for k, v in self.totals.items():
                metrics[f"total/{k}"] = v
            every = int(self._cfg.validation.every_n_steps)
            if every and self.step % every == 0:
                t = time.perf_counter()
                metrics.update(self.validate())
                metrics["time/validation_s"] = time.perf_counter() - t
            if self.step % int(self._cfg.log_every_n_steps) == 0:
                self.metric_logger.log_dict(metrics, step=self.step)
            if self.is_rank_zero:
                pbar.set_postfix(
                    reward=f"{metrics.get('reward/mean', math.nan):.3f}", loss=f"{metrics['loss']:.4f}", refresh=False
                )
                pbar.update(1)
            every = int(self._cfg.training.save_every_n_steps)
            if (every and self.step % every == 0) or self.step == self.max_steps:
                self.save_checkpoint()
                saved_at = self.step
        pbar.close()
        if saved_at != self.step:  # the data ran out (training.epochs) between two saves: keep the final state
            self.save_checkpoint()
        if self.is_rank_zero and self.stopped_by is None:  # a stopped run printed its stop line instead
            print(final_checkpoint_line("RL", self.step, self.output_dir), flush=True)
        # A run stopped by a signal is resumed, not judged: the warning is for a run that ended untrained.
        warning = None if self.stopped_by else no_update_warning(self.step, self.optimizer_steps, self.totals)
        if warning and self.is_rank_zero:
            print(warning, file=sys.stderr, flush=True)

    def _recipe_state(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "optimizer_steps": self.optimizer_steps,
            "examples_drawn": self.examples_drawn,
            "data": self.stream.state_dict(),
            "totals": dict(self.totals),
            "lr_scheduler": self.lr_scheduler.state_dict(),
        }

    def save_checkpoint(self) -> None:
        """`<output_dir>/checkpoints/step_N`: HF-format model + processor, optimizer, data position, counters.

        Written atomically by `vppo_recipes.checkpointing` (collective: every rank calls it).
        """
        save_checkpoint(
            self.output_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            processor_source=self._cfg.model.path,
            training_state=self._recipe_state(),
            arch=self._cfg.model.arch,
            config=self._cfg,
            dtype=checkpoint_dtype(self._cfg),
        )

    def load_checkpoint(self, ckpt_dir) -> None:
        """Restore optimizer, data position and counters (the weights were loaded from `ckpt_dir` in setup)."""
        state = load_training_state(ckpt_dir, model=self.model, optimizer=self.optimizer)["state"]
        self.step = int(state["step"])
        self.optimizer_steps = int(state["optimizer_steps"])
        self.examples_drawn = int(state["examples_drawn"])
        self.stream.load_state_dict(state["data"])
        self.totals = defaultdict(float, state["totals"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.accepted_changes:  # the checkpoint's optimizer settings came back with its state: use the config's
            apply_optimizer_settings(self.optimizer, self.lr_scheduler, self._cfg.optimizer)
        if hasattr(self.metric_logger, "rewind"):  # drop lines the interrupted run logged after this checkpoint
            self.metric_logger.rewind(self.step)
        if self.is_rank_zero:
            print(f"resumed from {ckpt_dir} at step {self.step}", flush=True)

    def cleanup(self) -> None:
        self.metric_logger.close()
        dist.barrier()
        self.sampler.close()  # vLLM's shutdown (external_launcher) also destroys the default process group
        if dist.is_initialized():
            dist.destroy_process_group()
        if self._rendezvous_file is not None and os.path.exists(self._rendezvous_file):
            os.remove(self._rendezvous_file)


# Counters (`total/<name>` in metrics.jsonl) that say why a step took no optimizer step, with what they mean.
NO_UPDATE_CAUSES = {
    "skipped/steps_without_groups": "steps whose every group the online filter dropped (all-equal rewards)",
    "skipped/nonfinite_updates": "updates skipped for a non-finite loss or gradient",
    "skipped/updates_without_tokens": "updates whose responses were all empty",
}


def no_update_warning(steps: int, optimizer_steps: int, totals: Mapping[str, float]) -> str | None:
    """A loud message when a run of `steps` RL steps took no optimizer step (None when it took one, or ran none).

    totals: the run's counters (`self.totals`, or a metrics row's `total/*` values without the prefix); the ones in
    NO_UPDATE_CAUSES that are non-zero are named. Such a run's model is its starting checkpoint, and its loss is NaN.
    """
    if steps < 1 or optimizer_steps > 0:
        return None
    causes = [f"{int(totals[k])} {what}" for k, what in NO_UPDATE_CAUSES.items() if totals.get(k)]
    said = (
        f"WARNING: this run took 0 optimizer steps in {steps} RL step(s): the model was not trained ("
        + ("; ".join(causes) or "no cause counted")
        + ")."
    )
    if totals.get("skipped/steps_without_groups"):
        said += (
            " The online filter keeps groups whose responses differ in reward: raise rollout.group_size or "
            "rollout.max_filter_draws, or start from a checkpoint whose answers are sometimes right."
        )
    return said


def _group_lists(r, i: int, n: int) -> dict[str, list]:
    """The i-th group (n responses) of a `Rollouts` as plain lists (responses are ordered group by group)."""
    sl = slice(i * n, (i + 1) * n)
    return {
        "token_ids": r.token_ids[sl],
        "texts": r.texts[sl],
        "finish_reasons": r.finish_reasons[sl],
        "logprobs": r.logprobs[sl],
    }


def _all_reduce_list(values: list, op=dist.ReduceOp.SUM) -> list[float]:
    """All-reduce a list of Python numbers and/or 0-dim tensors (float64, on CPU with gloo / on the GPU with NCCL);
    one host transfer for the whole list."""
    if not values:
        return []
    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    t = torch.stack(
        [
            v.detach().to(device=device, dtype=torch.float64).reshape(())
            if isinstance(v, torch.Tensor)
            else torch.tensor(float(v), dtype=torch.float64, device=device)
            for v in values
        ]
    )
    dist.all_reduce(t, op=op)
    return t.tolist()


def _all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate an equal-length 1-D tensor from every rank, in rank order."""
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def _all_gather_var(t: torch.Tensor) -> torch.Tensor:
    """Concatenate 1-D tensors of different lengths from every rank (for exact global quantiles)."""
    n = torch.tensor([t.numel()], dtype=torch.long, device=t.device)
    sizes = [torch.zeros_like(n) for _ in range(dist.get_world_size())]
    dist.all_gather(sizes, n)
    top = int(max(s.item() for s in sizes))
    buf = torch.zeros(top, dtype=t.dtype, device=t.device)
    buf[: t.numel()] = t
    parts = [torch.empty_like(buf) for _ in sizes]
    dist.all_gather(parts, buf)
    return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes)])


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: validate the whole config before any compute, then setup / train / cleanup."""
    cfg = validate_config(cfg, "rl")
    check_paths(cfg)  # a wrong model.path / data.source named by its key, before any process group
    recipe = RLRecipeDistributed(cfg)
    # Before any heavy work: the folder must be writable and this run's alone (vppo_recipes.lifecycle).
    with claim_output_dir(recipe.output_dir), recipe.stop_request.handling_signals():
        config.log_config(recipe_name="RLRecipeDistributed", cfg=cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()
    code = 128 + recipe.stopped_by if recipe.stopped_by else 0  # the shell's convention for "ended by a signal"
    if _HARD_EXIT:
        # 1-2 % of gloo launches abort in C++ static destructors at interpreter exit after all work is done
        # (ENVIRONMENT.md, "terminate called without an active exception"); the logs are closed and the process
        # group destroyed, so leave without running them. Only when launched as a script: an in-process caller
        # of recipe_main keeps its interpreter.
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    if code:
        raise SystemExit(code)


_HARD_EXIT = False

if __name__ == "__main__":
    _HARD_EXIT = True
    sys.exit(recipe_main())
