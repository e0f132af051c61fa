"""RL for Qwen2.5-VL / Qwen3-VL with FSDP2, for any method behind the seam of `vppo_recipes.methods`: VPPO, PGPO,
DAPO, GRPO, the methods that followed VPPO (PAPO, CFPO, DVRP, ToR, PEPO, CGPO, VEPO; ALGORITHMS.md §9), or your own
(`algorithm._component_`), in one torchtune-style recipe that never tests a method's name.

Launch from any directory (tune turns the relative path into the installed module vppo_recipes.rl.rl_distributed;
see ENVIRONMENT.md "tune run"), or through the `vppo-recipes run rl_distributed ...` wrapper:

    tune run --nproc_per_node 2 vppo_recipes/rl/rl_distributed.py --config tiny_vppo.yaml output_dir=/tmp/run
    # multi-node: tune run --nnodes 4 --nproc_per_node 8 --rdzv_backend c10d --rdzv_endpoint HOST:PORT ...

One step (`rl_step`) is ALGORITHMS.md §7 in data-flow order (ARCHITECTURE.md). Each phase returns frozen values
that the next one reads; none writes into another's:

    generate_rollouts    draw prompts -> sampler.sample(G per prompt) -> compute_rewards -> group_advantages,
                         online filter (draw more prompts until the rollout batch is full, capped)   -> Rollouts
    prepare_minibatches  this rank's groups -> mini-batches of collated micro-batches (batch.micro_batch_size
                         rows each, or by batch.max_tokens_per_micro_batch: `micro_batching.py`) -> MicroBatch
    no_grad_passes       lp_old (clean inputs); with the method's altered views (`Method.views`: perturbed
                         pixels, text-only attention, no image, ...): their log-probs, token dependency S,
                         the method's scores (`Method.scores`)                  -> MicroStep(batch, no_grad)
    shape                the method's advantages and token weights (`Method.shape`), truncated IS
                                                                                -> MicroStep(..., shaped)
    update               per mini-batch: per micro-batch policy_loss (+ `Method.aux_terms`) / backward, clip,
                         step                                                                         -> UpdateResult
    _sync_sampler        push the full weights to the sampler (LoRA: the merged W + scaling·B@A)
    _step_metrics        everything above, reduced over ranks into one flat dict (`rl/step_metrics.py`, with
                         `Method.metrics`); counters into the run's totals

Design choices a reader coming from verl / EasyR1 / TRL should know:
- The method is configuration (`algorithm.name`, or `algorithm._component_` for a method class of your own):
  vppo (TAS + TGF, each switchable for ablations), pgpo (token weights), dapo and grpo (no dependency pass at all,
  so DAPO costs exactly one no-grad pass less than VPPO), and the §9 methods: token weights (tor, cgpo, vepo,
  pepo) or extra k3 terms in the loss (papo, cfpo, dvrp), each reading its own no-grad views scored once before
  the update, never through a gradient. Each is one file of `vppo_recipes/methods/`.
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
- LoRA (`model.lora.rank` > 0, `vppo_recipes.lora`): peft adapters on the decoder layers' projections, the base
  frozen; only the adapters reach the optimizer, FSDP2 shards the adapted model, every pass (no-grad views
  included) runs base + adapter, the sampler gets the merged weights, and checkpoints hold the adapter alone.
  No method reads a frozen reference policy (their KL terms compare the current policy with its own views), so
  there is no second model; `lora.adapters_disabled` gives the base for one that would.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import os
import sys
import time
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch.distributed.tensor import DTensor
from torchtune import config
from tqdm import tqdm

from vppo_core.dependency import token_dependency, trajectory_dependency
from vppo_core.losses import policy_loss, truncated_is_weights
from vppo_recipes.checkpoint_weights import holds_master_weights
from vppo_recipes.checkpointing import (
    apply_optimizer_settings,
    check_checkpoint_matches,
    check_resume_config,
    final_checkpoint_line,
    find_resumable_checkpoint,
    load_training_state,
)
from vppo_recipes.config_overrides import parse
from vppo_recipes.config_schema import check_paths, check_world_size, validate_config
from vppo_recipes.data import Example, ExampleStream, VisualQADataset, prompt_or_skip
from vppo_recipes.distributed import (
    init_distributed,
    load_training_policy,
    save_run_checkpoint,
    shard_and_place,
    training_dtype,
)
from vppo_recipes.forward import exact_dependency_in_root, response_pass
from vppo_recipes.lifecycle import StopRequest, claim_output_dir, stopped_message
from vppo_recipes.lora import apply_lora, load_adapter, lora_settings, merged_full_tensors, trainable_parameters
from vppo_recipes.lr_schedule import constant_with_warmup
from vppo_recipes.methods import MethodContext, build_method, diagnostic_view
from vppo_recipes.methods.records import (
    MicroBatch,
    MicroStep,
    NoGradPass,
    Shaped,
    ViewInputs,
    check_aux_terms,
    check_shapings,
)
from vppo_recipes.metric_logging import build_metric_logger
from vppo_recipes.micro_batching import padding_counts
from vppo_recipes.rl.rollouts import (
    Draw,
    Group,
    Rollouts,
    collate_minibatches,
    deal_minibatches,
    keeps_group,
    sample_groups,
)
from vppo_recipes.rl.step_metrics import accumulate_loss_metrics, sampler_agreement, step_metrics
from vppo_recipes.rl.validation import held_out_records, validate
from vppo_recipes.sharding import call_in_root_forward
from vppo_recipes.update_guard import clip_and_check_update
from vppo_rollout.loading import load_processor
from vppo_rollout.prompts import Prompt

# --------------------------------------------------------------------------------------------------------------------
# Small pure helpers (tested in test_rl_distributed.py)
# --------------------------------------------------------------------------------------------------------------------


def check_batch_sizes(cfg: DictConfig, world: int) -> None:
    """Rollout batch / update batch / ranks must divide evenly (each rank owns whole groups)."""
    b, u = cfg.rollout.batch_prompts, cfg.batch.update_prompts
    if u % world:
        raise ValueError(
            f"batch.update_prompts={u} must be a multiple of the world size {world} (ranks own whole groups)"
        )
    if b % u:
        raise ValueError(f"rollout.batch_prompts={b} must be a multiple of batch.update_prompts={u}")


# --------------------------------------------------------------------------------------------------------------------
# What each phase of a step returns (frozen: a phase reads its inputs and returns new values, never writes into them)
# --------------------------------------------------------------------------------------------------------------------


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
    """Any method of `vppo_recipes.methods` with FSDP2 on a Qwen2.5-VL / Qwen3-VL policy (see the module docstring).

    cfg: a config already checked by `validate_config(cfg, "rl")` (recipe_main does it before anything else).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._cfg = cfg
        self.seed = int(cfg.seed)
        self.method = build_method(cfg.algorithm)  # the method's settings and hooks (vppo_recipes.methods)
        self.method_name = self.method.name or type(self.method).__name__
        self.output_dir = str(cfg.output_dir)
        self.group_size = int(cfg.rollout.group_size)
        self.batch_prompts = int(cfg.rollout.batch_prompts)
        self.update_prompts = int(cfg.batch.update_prompts)
        self.micro_batch_size = int(cfg.batch.micro_batch_size)
        budget = cfg.batch.max_tokens_per_micro_batch  # null: fixed micro_batch_size; else the cap on its rows
        self.max_tokens = None if budget is None else int(budget)
        self.temperature = float(cfg.rollout.temperature)
        self.chunk_size = int(cfg.loss.chunk_size)
        self.max_steps = int(cfg.training.max_steps)
        self.grad_clip = cfg.training.grad_clip
        self.online_filter = bool(cfg.rollout.online_filter)
        self.max_filter_draws = int(cfg.rollout.max_filter_draws)
        self.views = self.method.views()
        # diagnostics.dependency: a method without an altered view (DAPO, GRPO, PEPO) measures S too, under
        # VPPO's perturbation (logged only; its loss never reads it)
        if not self.views and bool(cfg.diagnostics.dependency):
            self.views = (diagnostic_view(),)
        self.measures_dependency = bool(self.views)

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._rendezvous_file = init_distributed(self.device)  # a plain `tune run` gets a 1-rank group
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_rank_zero = self.rank == 0
        check_world_size(cfg, self.world)
        check_batch_sizes(cfg, self.world)
        self.dtype = training_dtype(cfg)
        self.lora = lora_settings(cfg)  # None: full fine-tuning
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
        # a LoRA checkpoint holds the adapter alone: the base always comes from model.path
        self.weights_path = str(self.resume_from if self.resume_from and not self.lora else cfg.model.path)
        self.model = self._setup_model(cfg, weights=self.weights_path)
        self.sampler = self._setup_sampler(cfg)
        if (cfg.rollout.engine == "vllm" and holds_master_weights(self.weights_path)) or (
            self.lora and self.resume_from is not None
        ):
            # vLLM read the bfloat16 export (ties rounded away from zero, or upcast for a float32 engine), not the
            # float32 master weights the trainer restored; a resumed LoRA run's sampler holds the base without its
            # adapter: push the trainer's weights, as after every step
            self._sync_sampler()
        self.optimizer, self.lr_scheduler = self._setup_optimizer(cfg)
        self._setup_data(cfg)
        # held-out rows for avg@k every `validation.every_n_steps` steps; each rank scores its strided share
        self.val_records = held_out_records(cfg, self.rank, self.world)
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)

    def _setup_model(self, cfg: DictConfig, *, weights: str) -> torch.nn.Module:
        """Load the HF policy on every rank (LoRA: adapt it), and shard it (vision blocks, decoder layers, root)
        with FSDP2.

        weights: model.path, or the checkpoint folder being resumed (an HF folder with the same config; with LoRA
        always model.path, the adapter coming from the checkpoint).
        """
        model = load_training_policy(cfg, weights)
        self.model_config = model.config
        self.image_token_id = int(model.config.image_token_id)
        # The embedded sampler is a full unsharded copy on every rank (ENVIRONMENT.md pitfalls: generating with an
        # FSDP model deadlocks when ranks stop at different lengths); copy it before sharding. With LoRA it is the
        # plain model, which `_sync_sampler` loads with the merged weights.
        self._sampler_model = None
        if cfg.rollout.engine == "transformers":
            self._sampler_model = copy.deepcopy(model).to(device=self.device, dtype=self.dtype).eval()
        if self.lora is not None:
            model = apply_lora(model, self.lora, base_dtype=self.dtype)  # frozen base in the compute dtype
            if self.resume_from is not None:
                load_adapter(model, self.resume_from)
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

        Constant lr after a linear warmup of `lr_scheduler.warmup_steps` optimizer steps. It gets the parameters that
        train: all of them, or with LoRA the adapters' alone.
        """
        self.trained = trainable_parameters(self.model)
        optimizer = config.instantiate(cfg.optimizer, self.trained)
        return optimizer, constant_with_warmup(optimizer, int(cfg.lr_scheduler.warmup_steps))

    def _setup_data(self, cfg: DictConfig) -> None:
        """The training rows through the column mapping, drawn in a seeded, resumable order (same on every rank).

        Rows that cannot be used (no image, empty answer, ...) and prompts longer than data.max_prompt_length
        (text + expanded image tokens) are skipped by the stream and counted by reason, each named on stderr.
        """
        self.dataset = VisualQADataset.from_source(
            cfg.data.source, cfg.data.split, dict(cfg.data.columns), extra_columns=self.method.data_columns(),
            needed_by=f"algorithm {self.method_name}",
        )  # fmt: skip
        self.stream = ExampleStream(
            self.dataset, seed=self.seed, shuffle=cfg.data.shuffle, prepare=self._prepare_example, log=self._log_skip
        )
        self.epochs = int(cfg.training.epochs)

    def _log_skip(self, line: str) -> None:
        """A skipped training row, named once (rank 0; every rank draws the same rows)."""
        if self.is_rank_zero:
            print(line, file=sys.stderr, flush=True)

    def validate(self) -> dict[str, float]:
        """avg@k (ALGORITHMS.md §8: temperature 1.0, top-p 1.0) of the current policy on the held-out rows."""
        return validate(
            self.sampler, self.processor, self.val_records, cfg=self._cfg, step=self.step, seed=self.seed,
            rank=self.rank, world=self.world, output_dir=self.output_dir,
        )  # fmt: skip

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
            return self._step_metrics(
                rollouts, [], UpdateResult([], [], {}, {"skipped/steps_without_groups": 1.0}),
                local_counts={}, seconds=rollouts.seconds, agreement=[0.0] * 4, t_step=t_step, positions=(0.0, 0.0, 0.0),
            )  # fmt: skip

        # the mini-batches (update_prompts / world groups of this rank each), in micro-batches of tensors
        minis, local_counts = self.prepare_minibatches(rollouts.groups)
        # every pass over a micro-batch (clean, views, update) computes its padded positions
        masks = [mb.inputs["attention_mask"] for mini in minis for mb in mini]
        positions = (*padding_counts(masks), float(max(m.numel() for m in masks)))

        # 4-5. no-grad passes: lp_old on the clean inputs; with the method's altered views their log-probs, S and
        # the method's own scores
        steps, pass_seconds = self.no_grad_passes(minis)

        # 5b. trainer-sampler agreement on the first mini-batch (the same weights, before any update)
        agreement = sampler_agreement(steps[0], self.temperature)

        # 6. the method's advantages and token weights (| truncated importance weights)
        t = time.perf_counter()
        steps = self.shape(steps)
        shaping_s = time.perf_counter() - t

        # 7. per mini-batch: micro-batch forward/backward with the global token count, clip, step (or skip)
        t = time.perf_counter()
        update = self.update(steps)
        update_s = time.perf_counter() - t

        # 8. push the new full weights into the sampler
        t = time.perf_counter()
        if self._cfg.rollout.sync_weights:
            self._sync_sampler()
        sync_s = time.perf_counter() - t

        seconds = {**rollouts.seconds, **pass_seconds, "shaping": shaping_s, "update": update_s, "weight_sync": sync_s}
        return self._step_metrics(
            rollouts, steps, update, local_counts=local_counts, seconds=seconds, agreement=agreement, t_step=t_step,
            positions=positions,
        )  # fmt: skip

    # ---------------------------------------------------------------- 1-3. rollout

    def _prepare_example(self, example: Example) -> tuple[int, Prompt, str, dict]:
        """ExampleStream's `prepare`: (row, chat prompt, answer, the method's data columns); a row whose prompt cannot
        be built (over data.max_prompt_length, two <image> placeholders for one image, ...) is skipped and counted."""
        prompt = prompt_or_skip(self.processor, example, max_prompt_length=self._cfg.data.max_prompt_length)
        return example.row, prompt, example.answer, example.extra

    def _draw(self, count: int) -> list[Draw]:
        """Next `count` usable examples, the same on every rank; [] once `training.epochs` are done.

        uid numbers the usable examples of the run (0, 1, 2, ...): it seeds that prompt's sampling and its
        responses' perturbations, so randomness follows the data, not the rank or the batching.
        """
        if self.stream.epoch >= self.epochs:
            return []
        prepared = self.stream.take(count)
        draws = [Draw(self.examples_drawn + i, *example) for i, example in enumerate(prepared)]
        self.examples_drawn += len(draws)
        return draws

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
            local, sample_s, reward_s = sample_groups(
                self.sampler, drawn[self.rank :: self.world], cfg=self._cfg, seed=self.seed, rank=self.rank,
                method=self.method, ctx=self.method_context(),
            )  # fmt: skip
            seconds["sample"] += sample_s
            seconds["reward"] += reward_s
            gathered: list[list[dict]] = [None] * self.world  # type: ignore[list-item]
            dist.all_gather_object(gathered, [g.payload() for g in local])
            prompts = {d.uid: d.prompt for d in drawn}
            groups = sorted(
                (Group(**g, prompt=prompts[g["uid"]]) for part in gathered for g in part), key=lambda g: g.uid
            )
            counts["filter/groups_sampled"] += len(groups)
            kept += [g for g in groups if keeps_group(g, online_filter=self.online_filter, counts=counts)]
            if not self.online_filter:
                break
        self.sampler.sleep()
        counts["filter/draws"] += draws
        mine = deal_minibatches(
            kept, batch_prompts=self.batch_prompts, update_prompts=self.update_prompts, rank=self.rank,
            world=self.world, counts=counts,
        )  # fmt: skip
        return Rollouts(mine, dict(counts), seconds)

    # ---------------------------------------------------------------- inputs

    def prepare_minibatches(self, groups: list[Group]) -> tuple[list[list[MicroBatch]], dict[str, float]]:
        """This rank's groups -> mini-batches (update_prompts/world groups each) -> micro-batches of tensors.

        Returns (minis, counts); counts has this rank's skipped/empty_responses (summed over ranks later).
        """
        return collate_minibatches(
            groups, self.processor, self.model_config, per_rank=self.update_prompts // self.world,
            group_size=self.group_size, micro_batch_size=self.micro_batch_size, device=self.device,
            max_tokens=self.max_tokens, agree_counts=self._largest_counts,
        )  # fmt: skip

    def _largest_counts(self, counts: list[int]) -> list[int]:
        """Per mini-batch, the largest micro-batch count of any rank (collective): FSDP2 needs every rank to run
        the same number of forwards."""
        t = torch.tensor(counts, dtype=torch.int64, device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return t.tolist()

    def method_context(self) -> MethodContext:
        """What the method's hooks read during this step (`vppo_recipes.methods.MethodContext`)."""
        return MethodContext(
            model=self.model, processor=self.processor, model_config=self.model_config,
            image_token_id=self.image_token_id, dtype=self.dtype, device=self.device, seed=self.seed, step=self.step,
            max_steps=self.max_steps, temperature=self.temperature, chunk_size=self.chunk_size,
            micro_batch_size=self.micro_batch_size, aggregation=str(self._cfg.loss.aggregation), world=self.world,
            rank=self.rank, max_tokens_per_micro_batch=self.max_tokens,
        )  # fmt: skip

    def view_inputs(self, mb: MicroBatch, index: int) -> ViewInputs:
        """The inputs of altered view `index` (of `self.views`) of micro-batch mb (mb is unchanged)."""
        return self.views[index].inputs(self.method_context(), mb, index)

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

    def no_grad_passes(self, minis: list[list[MicroBatch]]) -> tuple[list[list[MicroStep]], dict[str, float]]:
        """lp_old of every micro-batch and, with altered views (`self.views`), their log-probs, S and S̄, and the
        method's own scores (`Method.scores`); all before any update.

        lp_old comes from the clean rows alone, in the micro-batch shape of the update: a pass over another batch
        shape (e.g. clean and perturbed rows stacked) changes the matmul shapes, and on GPUs in bf16 the result, so
        the first mini-batch's ratios would not be exactly 1 (verl: the log-prob micro-batch must equal the
        update's). Every altered view is its own pass over the same rows. Returns ([mini][micro] MicroStep with
        its `no_grad`, {"old_logprob": s, "alt_logprob": s}).
        """
        method, ctx = self.method, self.method_context()
        seconds = {"old_logprob": 0.0, "alt_logprob": 0.0}
        steps = []
        with torch.no_grad():
            for mini in minis:
                mini_steps = []
                for mb in mini:
                    t = time.perf_counter()
                    with method.clean_pass_context(ctx, mb) as recorded:
                        clean = self._pass(
                            mb, mb.inputs, mb.prompt_length, entropy=method.clean_entropy,
                            visual_token_id=self.image_token_id if method.clean_prior else None,
                            full_hidden=method.clean_full_hidden,
                        )  # fmt: skip
                    clean = {**clean, **recorded}
                    lp_old = clean["lp"]
                    seconds["old_logprob"] += time.perf_counter() - t
                    t = time.perf_counter()
                    altered = []
                    for index in range(len(self.views)):
                        view = self.view_inputs(mb, index)
                        with view.context:
                            altered.append(self._pass(mb, view.inputs, view.prompt_length))
                    no_grad = NoGradPass(lp_old, scores=method.scores(ctx, mb, clean, lp_old, altered))
                    if altered:
                        # 5. token visual dependency (sampled-token k3 estimator, or the exact full-vocabulary KL)
                        if method.exact_dependency:
                            S = ctx.in_root(exact_dependency_in_root, clean["hidden"], altered[0]["hidden"], mb.mask)
                        else:
                            S = token_dependency(lp_old, altered[0]["lp"], mb.mask)
                        no_grad = dataclasses.replace(
                            no_grad, lp_views=tuple(a["lp"] for a in altered), S=S,
                            traj_dep=trajectory_dependency(S, mb.mask),
                        )  # fmt: skip
                    seconds["alt_logprob"] += time.perf_counter() - t
                    mini_steps.append(MicroStep(mb, no_grad))
                steps.append(mini_steps)
        return steps, seconds

    # ---------------------------------------------------------------- 6. shaping

    def shape(self, steps: list[list[MicroStep]]) -> list[list[MicroStep]]:
        """The method's shaping of every micro-batch (`Method.shape`: advantages and token weights), with the
        truncated importance weights (loss.rollout_is_cap) applied on top. Returns the steps with `shaped` set."""
        cap = self._cfg.loss.rollout_is_cap
        shapings = self.method.shape(self.method_context(), steps)
        check_shapings(self.method_name, steps, shapings)
        out = []
        for mini, mini_shapings in zip(steps, shapings):
            shaped = []
            for s, sh in zip(mini, mini_shapings):
                token_weights, is_weights = sh.token_weights, None
                if cap is not None:  # truncated IS: reweight each token's policy term by min(π_old / π_rollout, cap)
                    is_weights = truncated_is_weights(
                        s.no_grad.lp_old, s.batch.lp_sampler, s.batch.mask, cap=float(cap)
                    )
                    w = is_weights.to(s.no_grad.lp_old.dtype)
                    token_weights = w if token_weights is None else token_weights * w
                shaped.append(
                    dataclasses.replace(s, shaped=Shaped(sh.advantages, token_weights, is_weights, sh.outputs))
                )
            out.append(shaped)
        return out

    # ---------------------------------------------------------------- 7. update

    def update(self, steps: list[list[MicroStep]]) -> UpdateResult:
        """One optimizer update per mini-batch (gradient accumulation over its micro-batches, clip, step)."""
        losses, grad_norms = [], []
        metric_sums: dict[str, Any] = {}  # this phase's own accumulator, filled by every mini-batch in turn
        counts: dict[str, float] = defaultdict(float)
        ctx = self.method_context()
        for mini in steps:
            loss, grad_norm, skipped = self._update_mini_batch(ctx, mini, metric_sums)
            losses.append(loss)
            grad_norms.append(grad_norm)
            if skipped is not None:
                counts[f"skipped/{skipped}"] += 1
        return UpdateResult(losses, grad_norms, metric_sums, dict(counts))

    def _update_mini_batch(
        self, ctx: MethodContext, mini: list[MicroStep], metric_sums: dict[str, Any]
    ) -> tuple[float, float, str | None]:
        """Gradient accumulation over the micro-batches of one mini-batch, then clip and step (or skip).

        Every micro-batch loss is divided by the GLOBAL valid-token count of the mini-batch (or the global number
        of non-empty responses for seq-mean-token-mean / GSPO-style aggregations), so the summed losses are one
        token-mean over all ranks. Adds the micro-batches' policy_loss metrics to `metric_sums`. Returns (loss,
        grad norm, None) of the mini-batch, or with the reason it was skipped ("updates_without_tokens",
        "nonfinite_updates"; both decided on global values, so alike on every rank).

        Host syncs: two per mini-batch (the token count, and the loss with the grad norms before and after clipping
        for the skip decision, `clip_and_check_update`), however many micro-batches it has. The micro-batch loop
        runs vppo-core with `validate=False` (its inputs were made by this recipe, the method's token weights and
        terms checked for shape by `check_shapings` / `check_aux_terms`; a non-finite value shows up in the loss and
        skips the step) and keeps its metrics as tensors (`accumulate_loss_metrics`),
        moved to the host once per step in `step_metrics`.
        """
        L = self._cfg.loss
        counts = torch.stack(
            [torch.stack([s.batch.mask.sum(), (s.batch.mask.sum(1) > 0).sum()]).double() for s in mini]
        ).sum(0)
        dist.all_reduce(counts)
        if counts[0].item() == 0:  # only empty responses: nothing to learn from, keep the ranks in step
            return math.nan, math.nan, "updates_without_tokens"
        token_mean = L.aggregation == "token-mean"
        norm = {"num_tokens": counts[0]} if token_mean else {"num_sequences": counts[1]}
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        for s in mini:
            mb, p, sh = s.batch, s.no_grad, s.shaped
            new = self._pass(mb, mb.inputs, mb.prompt_length, validate=False, entropy=self.method.update_entropy)
            aux = self.method.aux_terms(ctx, s, new)  # the method's extra terms (ALGORITHMS.md §9.1)
            check_aux_terms(self.method_name, aux, mb.mask)
            loss, metrics = policy_loss(
                new["lp"],
                p.lp_old,
                sh.advantages,
                mb.mask,
                token_weights=sh.token_weights,
                loss_type=L.loss_type,
                clip_low=L.clip_low,
                clip_high=L.clip_high,
                dual_clip=L.dual_clip,
                entropy_coef=L.entropy_coef,
                aggregation=L.aggregation,
                aux_terms=aux,
                validate=False,
                **norm,
            )
            # FSDP's reduce-scatter AVERAGES gradients over ranks; the loss is already a global mean -> undo it.
            (loss * self.world).backward()
            loss_sum = loss_sum + loss.detach().double()
            valid = mb.mask > 0
            active = valid if sh.token_weights is None else valid & (sh.token_weights != 0)
            accumulate_loss_metrics(metric_sums, metrics, valid_tokens=valid.sum(), active_tokens=active.sum())
        metric_sums["_updates"] = metric_sums.get("_updates", 0.0) + 1
        dist.all_reduce(loss_sum)
        # The loss, the norm before clipping and the norm of the clipped gradients (what the step applies), in one
        # host sync; all global, so every rank decides alike.
        (grad_norm, _, loss_total), finite = clip_and_check_update(self.trained, self.grad_clip, also=(loss_sum,))
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
        With LoRA the sampler is the plain model: it gets W + scaling·B@A of each adapted layer (`_push_merged`).
        """
        if self.lora is not None:
            self._push_merged(merged_full_tensors(self.model))
            return

        def full_tensors():
            for name, t in self.model.state_dict().items():
                yield name, (t.full_tensor() if isinstance(t, DTensor) else t).detach()

        self.sampler.update_weights(full_tensors())  # vLLM wakes only its weights for the copy

    def _push_merged(self, merged) -> None:
        """LoRA: load the merged full tensors (HF names, `lora.merged_full_tensors`) into the sampler, through the
        same layerwise reload as full fine-tuning."""
        self.sampler.update_weights(merged)

    # ---------------------------------------------------------------- metrics

    def _step_metrics(
        self, rollouts: Rollouts, steps: list[list[MicroStep]], update: UpdateResult, *,
        local_counts: dict[str, float], seconds: dict[str, float], agreement: list[float], t_step: float,
        positions: tuple[float, float, float],
    ) -> dict[str, float]:  # fmt: skip
        """The step's metrics over all ranks (`step_metrics`); its counters are added to the run's totals, once."""
        m, counts = step_metrics(
            method=self.method, ctx=self.method_context(), groups=rollouts.groups,
            counts={**rollouts.counts, **update.counts}, local_counts=local_counts,
            steps=[s for mini in steps for s in mini], losses=update.losses, grad_norms=update.grad_norms,
            metric_sums=update.metric_sums, measures_dependency=self.measures_dependency,
            rollout_is_cap=self._cfg.loss.rollout_is_cap, agreement=agreement, seconds=seconds, t_step=t_step,
            lr=float(self.optimizer.param_groups[0]["lr"]), optimizer_steps=self.optimizer_steps, positions=positions,
        )  # fmt: skip
        for k, v in counts.items():
            self.totals[k] += v
        for reason, v in self.stream.skipped.items():
            m[f"total/skipped_rows/{reason}"] = float(v)
        return m

    # ---------------------------------------------------------------- loop, checkpoints, cleanup

    def train(self) -> None:
        pbar = tqdm(
            total=self.max_steps,
            initial=self.step,
            disable=not self.is_rank_zero,
            desc=self.method_name,
        )
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
        save_run_checkpoint(
            self._cfg, self.output_dir, self.step, model=self.model, optimizer=self.optimizer,
            training_state=self._recipe_state(),
        )  # fmt: skip

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


@parse  # torchtune's config.parse, where an override may switch the method (config_overrides)
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
