"""Supervised fine-tuning (cross-entropy on question -> answer text) of Qwen2.5-VL / Qwen3-VL with FSDP2.

The warm start before RL: it teaches a model the answer format the reward checks (`<think> ... </think>` then
`\\boxed{answer}`, ALGORITHMS.md §8), with the same prompt, model loading, sharding and checkpoint format as the
RL recipe, so its output folder is a valid `model.path` for `rl_distributed`.

Launch from any directory (the config's relative paths are relative to where you launch):

    vppo-recipes run sft_distributed --nproc_per_node 2 --config tiny_sft output_dir=./runs/my_sft
    # the same with tune directly (the recipe is a module of the installed package):
    tune run --nproc_per_node 2 vppo_recipes/sft/sft_distributed.py --config ./tiny_sft.yaml

One optimizer step (`train_step`):

    next batch.batch_size examples, the same on every rank (seeded, resumable order; bad rows skipped + counted)
    -> this rank's contiguous share, in micro-batches of batch.micro_batch_size examples, or with
       batch.max_tokens_per_micro_batch of at most that many padded positions (longest first, micro_batch_size
       examples at most, as many micro-batches on every rank: `vppo_recipes.micro_batching`)
    -> prompt = the RL recipe's chat prompt (vppo_rollout.build_prompt: system prompt, question, images,
       the <think>/\\boxed{} instruction); target = data.columns.response, or data.response_template with the
       answer, tokenized, followed by <|im_end|> (the sampler's stop token)
    -> collate_rollout: prompt left-padded, target right-padded, M-RoPE positions computed explicitly
    -> log p(target token | prefix) from the last hidden state in chunks (never [B, T, V] logits)
    -> loss = -Σ log p / (target tokens of the whole GLOBAL batch) × world size, backward per micro-batch
       (FSDP's reduce-scatter averages over ranks, so the gradient is exactly that of the global token-mean NLL,
       independent of the number of ranks and of the micro-batch size)
    -> clip the grad norm (a non-finite norm, before or after clipping, skips the step and is counted), AdamW
       step, constant lr + warmup.

LoRA (`model.lora.rank` > 0, `vppo_recipes.lora`): peft adapters on the decoder layers' projections (dropout
allowed here), the base frozen, only the adapters in the optimizer; checkpoints hold the adapter alone (a peft
adapter folder on model.path; `vppo-recipes export-lora` merges it into a Hugging Face folder).

Logged per step (JSONL / wandb / stdout, see metric_logging.py): loss (global token-mean NLL), grad_norm, lr,
tokens, epoch, time/step_s, throughput/tokens_per_s, throughput/padding_fraction (padding positions / computed
positions of the step's forwards, all ranks), total/skipped_rows/<reason>, total/skipped_steps_nonfinite.
"""

from __future__ import annotations

import os
import sys
import time
from collections import defaultdict
from typing import Any

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torchtune import config
from tqdm import tqdm

from vppo_core.logprobs import logprobs_from_hidden
from vppo_recipes.checkpointing import (
    apply_optimizer_settings,
    check_checkpoint_matches,
    check_resume_config,
    final_checkpoint_line,
    find_resumable_checkpoint,
    load_training_state,
)
from vppo_recipes.config_schema import check_paths, check_world_size, validate_config
from vppo_recipes.data import (
    Example,
    ExampleStream,
    SkipRow,
    VisualQADataset,
    build_response,
    prompt_or_skip,
    rank_slice,
)
from vppo_recipes.distributed import (
    init_distributed,
    load_training_policy,
    save_run_checkpoint,
    shard_and_place,
    training_dtype,
)
from vppo_recipes.lifecycle import StopRequest, claim_output_dir, stopped_message
from vppo_recipes.lora import apply_lora, load_adapter, lora_settings, trainable_parameters
from vppo_recipes.lr_schedule import constant_with_warmup
from vppo_recipes.metric_logging import build_metric_logger
from vppo_recipes.micro_batching import fixed_micro_batches, padding_counts, split_to_count, token_budget_micro_batches
from vppo_recipes.sharding import call_in_root_forward
from vppo_recipes.update_guard import clip_and_check_update
from vppo_rollout.collate import collate_rollout, model_inputs
from vppo_rollout.loading import load_processor
from vppo_rollout.prompts import Prompt

END_OF_TURN = "<|im_end|>"  # Qwen chat format: ends the assistant turn; the RL sampler stops on it


def target_logprobs(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    targets: torch.Tensor,
    prompt_length: int,
    *,
    chunk_size: int,
) -> torch.Tensor:
    """log p(target token j | prompt, targets[:j]) for every target position, from the last hidden state.

    Run it through `sharding.call_in_root_forward(model, target_logprobs, ...)`: under FSDP2 the LM-head weight
    lives in the root unit and is only all-gathered inside a root forward (see sharding.py); without FSDP it is a
    plain call. inputs: `model_inputs(collate_rollout(...))`; targets: [B, L] long; target j is predicted at
    position P-1+j. Returns lp [B, L] float32.
    """
    out = model.model(**inputs, use_cache=False)
    L = targets.shape[1]
    hidden = out.last_hidden_state[:, prompt_length - 1 : prompt_length - 1 + L]
    # a fresh tensor, not a view: FSDP2 hooks the root's output for backward, and would warn for a view
    return logprobs_from_hidden(hidden, model.lm_head.weight, targets, chunk_size=chunk_size)


class SFTRecipeDistributed:
    """Cross-entropy fine-tuning on (question, images) -> target text with FSDP2 (see the module docstring).

    cfg: a config already checked by `validate_config(cfg, "sft")` (recipe_main does it before anything else).
    """

    def __init__(self, cfg: DictConfig) -> None:
        self._cfg = cfg
        self.seed = int(cfg.seed)
        self.output_dir = str(cfg.output_dir)
        self.batch_size = int(cfg.batch.batch_size)
        self.micro_batch_size = int(cfg.batch.micro_batch_size)
        budget = cfg.batch.max_tokens_per_micro_batch  # null: fixed micro_batch_size; else the cap on its rows
        self.max_tokens = None if budget is None else int(budget)
        self.chunk_size = int(cfg.loss.chunk_size)
        self.max_steps = int(cfg.training.max_steps)
        self.epochs = int(cfg.training.epochs)
        self.grad_clip = cfg.training.grad_clip

        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        if self.device.type == "cuda":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
            self.device = torch.device("cuda", torch.cuda.current_device())
        self._rendezvous_file = init_distributed(self.device)
        self.world, self.rank = dist.get_world_size(), dist.get_rank()
        self.is_rank_zero = self.rank == 0
        check_world_size(cfg, self.world)
        if self.batch_size % self.world:
            raise ValueError(
                f"batch.batch_size={self.batch_size} must be a multiple of the world size {self.world} "
                "(every rank trains on an equal share)"
            )
        self.dtype = training_dtype(cfg)
        torch.manual_seed(self.seed)

        self.step = 0  # optimizer steps attempted (skipped non-finite ones included)
        self.totals: dict[str, float] = defaultdict(float)  # run-long counters, checkpointed
        self.stop_request = StopRequest()  # set by SIGTERM / SIGINT under recipe_main: finish the step, save, exit
        self.stopped_by: int | None = None  # the signal that stopped the run early

    # ---------------------------------------------------------------- setup

    def setup(self, cfg: DictConfig) -> None:
        """Logger, processor, data, model, optimizer; then the training state when resuming."""
        self.resume_from = find_resumable_checkpoint(self.output_dir) if cfg.training.resume == "auto" else None
        self.accepted_changes: list[str] = []
        if self.resume_from is not None:  # another model, or a changed config, is an error before any compute
            check_checkpoint_matches(self.resume_from, arch=cfg.model.arch, model_dir=cfg.model.path)
            self.accepted_changes = check_resume_config(self.resume_from, cfg)
            if self.accepted_changes and self.rank == 0:
                changed = "\n  ".join(self.accepted_changes)
                print(f"RESUMING WITH CHANGED CONFIG (training.accept_config_changes=true):\n  {changed}", flush=True)
        self.metric_logger = build_metric_logger(
            cfg.metric_logger, rank=self.rank, log_dir=os.path.join(self.output_dir, "logs")
        )
        self.metric_logger.log_config(cfg)
        self.processor = load_processor(
            cfg.model.path,
            min_pixels=cfg.model.min_pixels,
            max_pixels=cfg.model.max_pixels,
            trust_remote_code=cfg.model.trust_remote_code,
        )
        self.end_of_turn_id = self.processor.tokenizer.convert_tokens_to_ids(END_OF_TURN)
        if self.end_of_turn_id is None or self.end_of_turn_id == self.processor.tokenizer.unk_token_id:
            raise ValueError(f"the tokenizer of model.path={cfg.model.path} has no {END_OF_TURN} token (Qwen chat)")
        self._setup_data(cfg)  # before the model: a missing column fails fast
        lora = lora_settings(cfg) is not None  # a LoRA checkpoint holds the adapter alone: the base is model.path
        self.model = self._setup_model(
            cfg, weights=str(self.resume_from if self.resume_from and not lora else cfg.model.path)
        )
        self.optimizer, self.lr_scheduler = self._setup_optimizer(cfg)
        if self.resume_from is not None:
            self.load_checkpoint(self.resume_from)

    def _setup_model(self, cfg: DictConfig, *, weights: str) -> torch.nn.Module:
        """Load the HF policy on every rank (float32 master weights, CPU), shard it with FSDP2, then move it."""
        model = load_training_policy(cfg, weights)
        lora = lora_settings(cfg)
        if lora is not None:  # adapters on the decoder layers' projections, the base frozen
            model = apply_lora(model, lora, base_dtype=self.dtype)  # frozen base in the compute dtype
            if self.resume_from is not None:
                load_adapter(model, self.resume_from)
        self.model_config = model.config
        return shard_and_place(model, cfg, device=self.device, world=self.world, dtype=self.dtype)

    def _setup_optimizer(self, cfg: DictConfig):
        """Optimizer from the config's `_component_`; constant lr after a linear warmup of `warmup_steps`."""
        self.trained = trainable_parameters(self.model)  # all parameters, or with LoRA the adapters' alone
        optimizer = config.instantiate(cfg.optimizer, self.trained)
        return optimizer, constant_with_warmup(optimizer, int(cfg.lr_scheduler.warmup_steps))

    def _setup_data(self, cfg: DictConfig) -> None:
        """Rows through the column mapping, in a seeded resumable order that every rank shares."""
        self.dataset = VisualQADataset.from_source(cfg.data.source, cfg.data.split, dict(cfg.data.columns))
        self.stream = ExampleStream(
            self.dataset, seed=self.seed, shuffle=cfg.data.shuffle, prepare=self._encode, log=self._log_skip
        )

    def _log_skip(self, line: str) -> None:
        """A skipped training row, named once (rank 0; every rank draws the same rows)."""
        if self.is_rank_zero:
            print(line, file=sys.stderr, flush=True)

    def target_text(self, example: Example) -> str:
        """The text the model learns to answer with: the response column, or the template filled with the answer."""
        if example.response is not None:
            return example.response
        return build_response(example.answer, self._cfg.data.response_template)

    def _encode(self, example: Example) -> tuple[Prompt, list[int]]:
        """ExampleStream's `prepare`: (chat prompt, target token ids); a too-long row, or one whose prompt cannot be
        built (two <image> placeholders for one image, ...), is skipped (and counted)."""
        cfg = self._cfg.data
        prompt = prompt_or_skip(self.processor, example, max_prompt_length=cfg.max_prompt_length)
        ids = self.processor.tokenizer(self.target_text(example), add_special_tokens=False)["input_ids"]
        ids = [*ids, self.end_of_turn_id]
        if len(ids) > cfg.max_response_length:
            raise SkipRow("response_too_long")
        return prompt, ids

    # ---------------------------------------------------------------- one step

    def train_step(self, encoded: list[tuple[Prompt, list[int]]]) -> dict[str, float]:
        """One optimizer step on `encoded` (the global batch of (prompt, target ids), identical on every rank).

        Returns its metrics.
        """
        t0 = time.perf_counter()
        # Normaliser of the global token-mean: every rank sees the whole batch, so no communication is needed.
        num_tokens = sum(len(ids) for _, ids in encoded)
        mine = encoded[rank_slice(len(encoded), self.rank, self.world)]
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)  # on the device: NCCL reduces it
        masks = []
        for micro in self.micro_batches(mine):
            batch = collate_rollout(
                self.processor, [p for p, _ in micro], [ids for _, ids in micro], config=self.model_config
            )
            inputs = {k: v.to(self.device) for k, v in model_inputs(batch).items()}
            masks.append(batch["attention_mask"])
            targets = batch["responses"].to(self.device)
            mask = batch["response_mask"].to(self.device)
            lp = call_in_root_forward(
                self.model, target_logprobs, inputs, targets, batch["prompt_length"], chunk_size=self.chunk_size
            )
            nll = -(lp * mask).sum()
            # × world: FSDP averages gradients over ranks; the sum over ranks of nll / num_tokens is the token-mean.
            (nll * (self.world / num_tokens)).backward()
            loss_sum += nll.detach().double()

        # Checked after clipping: the clipped gradients are what the step applies (global, so alike on every rank).
        (grad_norm, _), finite = clip_and_check_update(self.trained, self.grad_clip)
        skipped = not finite
        if skipped:  # a NaN/inf gradient would poison AdamW's moments: drop this step, count it, go on
            self.totals["skipped_steps_nonfinite"] += 1
        else:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.lr_scheduler.step()

        dist.all_reduce(loss_sum)
        positions = torch.tensor(padding_counts(masks), dtype=torch.float64, device=self.device)
        dist.all_reduce(positions)
        seconds = time.perf_counter() - t0
        metrics = {
            "loss": float(loss_sum) / num_tokens,
            "grad_norm": grad_norm,
            "lr": self.optimizer.param_groups[0]["lr"],
            "tokens": float(num_tokens),
            "epoch": float(self.stream.epoch),
            "time/step_s": seconds,
            "throughput/tokens_per_s": num_tokens / seconds,
            "throughput/padding_fraction": float(positions[1] / positions[0]),
            "skipped_step": float(skipped),
        }
        if self.device.type == "cuda":
            metrics["memory/peak_gib"] = torch.cuda.max_memory_allocated(self.device) / 2**30
        return metrics

    def micro_batches(self, mine: list[tuple[Prompt, list[int]]]) -> list[list[tuple[Prompt, list[int]]]]:
        """This rank's examples in micro-batches: `micro_batch_size` in order, or by token budget with as many
        micro-batches as the busiest rank (collective then: FSDP2 needs the same number of forwards everywhere)."""
        if self.max_tokens is None:
            parts = fixed_micro_batches(len(mine), self.micro_batch_size)
        else:
            parts = token_budget_micro_batches(
                [p.num_tokens for p, _ in mine], [len(ids) for _, ids in mine], max_tokens=self.max_tokens,
                max_rows=self.micro_batch_size,
            )  # fmt: skip
            count = torch.tensor([len(parts)], device=self.device)
            dist.all_reduce(count, op=dist.ReduceOp.MAX)
            parts = split_to_count(parts, int(count))
        return [[mine[i] for i in part] for part in parts]

    # ---------------------------------------------------------------- loop, checkpoints, cleanup

    def train(self) -> None:
        pbar = tqdm(total=self.max_steps, initial=self.step, disable=not self.is_rank_zero, desc="sft")
        every = int(self._cfg.training.save_every_n_steps)
        saved_at = self.step if self.resume_from is not None else -1
        while self.step < self.max_steps and self.stream.epoch < self.epochs:
            self.stopped_by = self.stop_request.agreed()  # collective: every rank stops at the same step
            if self.stopped_by is not None:
                break
            metrics = self.train_step(self.stream.take(self.batch_size))
            self.step += 1
            for reason, count in self.stream.skipped.items():
                metrics[f"total/skipped_rows/{reason}"] = float(count)
            for key, value in self.totals.items():
                metrics[f"total/{key}"] = value
            if self.step % int(self._cfg.log_every_n_steps) == 0:
                self.metric_logger.log_dict(metrics, step=self.step)
            if self.is_rank_zero:
                pbar.set_postfix(loss=f"{metrics['loss']:.4f}", refresh=False)
                pbar.update(1)
            if every and self.step % every == 0:
                self.save_checkpoint()
                saved_at = self.step
        pbar.close()
        if saved_at != self.step and (self.step or self.stopped_by is None):  # step 0 of a stopped run: nothing
            self.save_checkpoint()
        if self.is_rank_zero and self.stopped_by is not None:
            print(stopped_message(self.stopped_by, self.step, self.output_dir), flush=True)
        elif self.is_rank_zero:
            print(final_checkpoint_line("SFT", self.step, self.output_dir), flush=True)

    def _recipe_state(self) -> dict[str, Any]:
        return {
            "data": self.stream.state_dict(),
            "lr_scheduler": self.lr_scheduler.state_dict(),
            "totals": dict(self.totals),
            "seed": self.seed,
        }

    def save_checkpoint(self) -> None:
        """`<output_dir>/checkpoints/step_N`: HF-format model + processor files, optimizer, data position."""
        save_run_checkpoint(
            self._cfg,
            self.output_dir,
            self.step,
            model=self.model,
            optimizer=self.optimizer,
            training_state=self._recipe_state(),
        )

    def load_checkpoint(self, ckpt_dir) -> None:
        """Restore optimizer, RNG, data position and counters (the weights were loaded from `ckpt_dir`)."""
        loaded = load_training_state(ckpt_dir, model=self.model, optimizer=self.optimizer)
        state = loaded["state"]
        if int(state["seed"]) != self.seed:
            raise ValueError(
                f"cannot resume {ckpt_dir}: it was trained with seed={state['seed']}, this run has seed={self.seed}; "
                "use the same seed, or training.resume=never / another output_dir"
            )
        self.step = loaded["step"]
        self.stream.load_state_dict(state["data"])
        self.lr_scheduler.load_state_dict(state["lr_scheduler"])
        if self.accepted_changes:  # the checkpoint's optimizer settings came back with its state: use the config's
            apply_optimizer_settings(self.optimizer, self.lr_scheduler, self._cfg.optimizer)
        self.totals = defaultdict(float, state["totals"])
        if hasattr(self.metric_logger, "rewind"):  # drop lines the interrupted run logged after this checkpoint
            self.metric_logger.rewind(self.step)
        if self.is_rank_zero:
            print(f"resumed from {ckpt_dir} at step {self.step}", flush=True)

    def cleanup(self) -> None:
        self.metric_logger.close()
        dist.barrier()
        dist.destroy_process_group()
        if self._rendezvous_file is not None and os.path.exists(self._rendezvous_file):
            os.remove(self._rendezvous_file)


@config.parse
def recipe_main(cfg: DictConfig) -> None:
    """Entry point: validate the whole config before any compute, then setup / train / cleanup."""
    cfg = validate_config(cfg, "sft")
    check_paths(cfg)  # a wrong model.path / data.source named by its key, before any process group
    recipe = SFTRecipeDistributed(cfg)
    # Before any heavy work: the folder must be writable and this run's alone (vppo_recipes.lifecycle).
    with claim_output_dir(recipe.output_dir), recipe.stop_request.handling_signals():
        recipe.setup(cfg)
        recipe.train()
        recipe.cleanup()
    # A few % of gloo launches abort in C++ static destructors at interpreter exit after all work is done
    # (ENVIRONMENT.md); everything is flushed and the process group destroyed, so leave without them.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(128 + recipe.stopped_by if recipe.stopped_by else 0)  # the shell's convention for "ended by a signal"


if __name__ == "__main__":
    sys.exit(recipe_main())
