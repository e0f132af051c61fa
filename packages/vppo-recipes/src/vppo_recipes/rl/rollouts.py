"""The rollout phase of the RL recipe: sampling G responses per prompt, grading them, the online filter, dealing
the kept groups out to the ranks by mini-batch, and collating each rank's share into micro-batches. Plain functions; the recipe's `generate_rollouts` runs
them in its draw loop."""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from omegaconf import DictConfig

from vppo_core.advantages import group_advantages, keep_groups
from vppo_eval.reward import compute_rewards
from vppo_recipes.data import rank_slice
from vppo_recipes.methods.records import REWARD_PARTS, MicroBatch
from vppo_recipes.micro_batching import fixed_micro_batches, split_to_count, token_budget_micro_batches
from vppo_recipes.seeding import mix_seed
from vppo_rollout.collate import collate_rollout, model_inputs
from vppo_rollout.prompts import Prompt
from vppo_rollout.sampling import SamplingConfig


def chunk_ranges(n: int, size: int) -> list[slice]:
    """Consecutive slices of at most `size` covering range(n) (the last may be shorter)."""
    return [slice(s, min(s + size, n)) for s in range(0, n, size)]


@dataclass(frozen=True)
class Draw:
    """One usable example of this step, prepared on every rank (all ranks draw the same examples)."""

    uid: int  # number of the example among the run's usable examples (seeds its sampling and perturbations)
    row: int  # dataset row
    prompt: Prompt
    answer: str
    extra: dict[str, Any] = field(default_factory=dict)  # the method's `data_columns` of this row


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
    extra: dict[str, Any] = field(default_factory=dict)  # the method's `data_columns` of this row (plain data)

    def payload(self) -> dict[str, Any]:
        """Everything but the prompt, as a plain dict: what `all_gather_object` sends (plain data, so the receiving
        side needs no class lookup); without the prompt, because its images are large and every rank has built the
        same prompt from the same draw."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "prompt"}


@dataclass(frozen=True)
class Rollouts:
    """The rollout phase's result: this rank's share of the kept groups, ordered by mini-batch."""

    groups: list[Group]
    counts: dict[str, float]  # filter/*: computed on the gathered groups, so already global
    seconds: dict[str, float]  # "sample", "reward"


def sample_groups(
    sampler, mine: list[Draw], *, cfg: DictConfig, seed: int, rank: int, method=None, ctx=None
) -> tuple[list[Group], float, float]:
    """Sample G responses for each of this rank's draws, grade them, and compute the group advantages.

    cfg: the run's config (rollout.*, reward.*). method, ctx: the method and its `MethodContext`; where its
    `rollout_images` hook returns images for some response slots, those responses are sampled on them
    (`_sample_split`); the groups keep the clean prompts. Returns (groups, sampling seconds, grading seconds).
    """
    reward_cfg, cfg = cfg.reward, cfg.rollout
    group_size = int(cfg.group_size)

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
    slots = [method.rollout_images(ctx, d.uid, d.prompt.images, group_size) for d in mine] if method else []
    if any(s is not None for s in slots):  # some responses are sampled on other images (NoisyRollout)
        results = _sample_split(sampler, mine, slots, group_size, sampling, engine=cfg.engine, seed=seed, rank=rank)
    elif cfg.engine == "transformers":
        # One call per prompt, seeded by the prompt's uid: the responses do not depend on how prompts are
        # spread over ranks or batched, so runs are world-size independent and resume exactly.
        for d in mine:
            r = sampler.sample([d.prompt], group_size, sampling(mix_seed(seed, d.uid)))
            results.append(_group_lists(r, 0, group_size))
    elif mine:
        # vLLM: one batched call per rank (GroupSampler takes one SamplingConfig, so one seed per call).
        r = sampler.sample([d.prompt for d in mine], group_size, sampling(mix_seed(seed, mine[0].uid, rank)))
        results = [_group_lists(r, i, group_size) for i in range(len(mine))]
    sample_s = time.perf_counter() - t

    t = time.perf_counter()
    groups = []
    for d, r in zip(mine, results):
        rw = compute_rewards(
            r["texts"],
            [d.answer] * group_size,
            format_weight=reward_cfg.format_weight,
            multiple_choice=reward_cfg.multiple_choice,
        )
        # per group: ranks own whole groups, so the advantages need nothing from other ranks
        advantages = group_advantages(torch.tensor(rw["reward"], dtype=torch.float32), group_size)
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
            extra=d.extra,
        )
        groups.append(group)
    return groups, sample_s, time.perf_counter() - t


def _sample_split(sampler, mine: list[Draw], slots, group_size: int, sampling, *, engine: str, seed: int, rank: int):
    """Each draw's group sampled in parts: a run of consecutive response slots that `rollout_images` gave the same
    images (the same object, or None: the prompt's own) is one part, sampled on a copy of the prompt holding those
    images. transformers: one call per part, seeded by (seed, uid, part); vLLM: one batched call per part size,
    seeded by (seed, first uid, rank, size). Returns one `_group_lists` dict per draw, responses in slot order."""
    parts = []  # (draw index, part number in its group, prompt to sample, slots)
    for i, (d, chosen) in enumerate(zip(mine, slots)):
        chosen = [None] * group_size if chosen is None else list(chosen)
        if len(chosen) != group_size:
            raise ValueError(f"rollout_images returned {len(chosen)} entries for a group of {group_size}")
        runs: list[tuple[Any, list[int]]] = []
        for j, images in enumerate(chosen):
            if runs and runs[-1][0] is images:
                runs[-1][1].append(j)
            else:
                runs.append((images, [j]))
        for k, (images, js) in enumerate(runs):
            prompt = d.prompt if images is None else dataclasses.replace(d.prompt, images=list(images))
            parts.append((i, k, prompt, js))
    out = [{k: [None] * group_size for k in ("token_ids", "texts", "finish_reasons", "logprobs")} for _ in mine]

    def place(batch, r):
        for b, (i, _, _, js) in enumerate(batch):
            for k, v in _group_lists(r, b, len(js)).items():
                for j, x in zip(js, v):
                    out[i][k][j] = x

    if engine == "transformers":
        for part in parts:
            i, k, prompt, js = part
            place([part], sampler.sample([prompt], len(js), sampling(mix_seed(seed, mine[i].uid, k))))
    else:
        for size in dict.fromkeys(len(p[3]) for p in parts):
            batch = [p for p in parts if len(p[3]) == size]
            place(batch, sampler.sample([p[2] for p in batch], size, sampling(mix_seed(seed, mine[0].uid, rank, size))))
    return out


def _group_lists(r, i: int, n: int) -> dict[str, list]:
    """The i-th group (n responses) of a sampler's result as plain lists (responses are ordered group by group)."""
    sl = slice(i * n, (i + 1) * n)
    return {
        "token_ids": r.token_ids[sl],
        "texts": r.texts[sl],
        "finish_reasons": r.finish_reasons[sl],
        "logprobs": r.logprobs[sl],
    }


def keeps_group(group: Group, *, online_filter: bool, counts: dict[str, float]) -> bool:
    """Whether the online filter (DAPO dynamic sampling: 0.01 < mean accuracy < 0.99) keeps a graded group; counts
    filter/groups_dropped, or without the filter filter/zero_advantage_groups (kept: its advantage is exactly 0)."""
    if online_filter:
        if not bool(keep_groups(torch.tensor(group.accuracy, dtype=torch.float32), len(group.accuracy))[0]):
            counts["filter/groups_dropped"] += 1
            return False
    elif len(set(group.reward)) == 1:
        counts["filter/zero_advantage_groups"] += 1
    return True


def deal_minibatches(
    kept: list[Group], *, batch_prompts: int, update_prompts: int, rank: int, world: int, counts: dict[str, float]
) -> list[Group]:
    """This rank's share of the kept groups (the first `batch_prompts`, a multiple of the world size), ordered by
    mini-batch: global mini-batch j is kept[j*U : (j+1)*U] whatever the world size and each rank takes an equal
    contiguous share of it, so the optimizer sees the same batches as a single-process run. Adds filter/* counts."""
    kept = kept[:batch_prompts]
    usable = len(kept) // world * world
    counts["filter/groups_kept"] += usable
    counts["filter/groups_unused"] += len(kept) - usable
    if usable < batch_prompts:
        counts["filter/underfilled_steps"] += 1
    mine = []
    for mini in chunk_ranges(usable, update_prompts):
        part = kept[mini]
        mine += part[rank_slice(len(part), rank, world)]
    return mine


def collate_minibatches(
    groups: list[Group], processor: Any, model_config: Any, *, per_rank: int, group_size: int, micro_batch_size: int,
    device: torch.device, max_tokens: int | None = None, agree_counts: Callable[[list[int]], list[int]] | None = None,
) -> tuple[list[list[MicroBatch]], dict[str, float]]:  # fmt: skip
    """This rank's groups -> mini-batches (`per_rank` groups each) -> micro-batches of collated tensors on `device`.

    max_tokens: None cuts each mini-batch into `micro_batch_size` rows in data order; else into micro-batches of at
    most max_tokens padded positions (and micro_batch_size rows), longest rows first (`vppo_recipes.micro_batching`).
    agree_counts: [count per mini-batch] of this rank -> the largest of every rank (collective; the recipe's
    all-reduce MAX), used with a budget only; each rank then splits its micro-batches up to that count.
    Returns (minis [mini][micro], counts); counts has this rank's skipped/empty_responses (summed over ranks later).
    """
    empty = 0
    shares = []  # per mini-batch: (rows, micro-batches as lists of row numbers)
    for mini in chunk_ranges(len(groups), per_rank):
        rows = [(g, j) for g in groups[mini] for j in range(group_size)]
        if max_tokens is None:
            parts = fixed_micro_batches(len(rows), micro_batch_size)
        else:
            parts = token_budget_micro_batches(
                [_prompt_tokens(g.prompt) for g, _ in rows], [len(g.token_ids[j]) for g, j in rows],
                max_tokens=max_tokens, max_rows=micro_batch_size,
            )  # fmt: skip
        shares.append((rows, parts))
    if max_tokens is not None and agree_counts is not None:  # every rank runs as many forwards as the busiest one
        counts = agree_counts([len(parts) for _, parts in shares])
        shares = [(rows, split_to_count(parts, n)) for (rows, parts), n in zip(shares, counts)]
    minis = []
    for rows, parts in shares:
        micro = []
        for numbers in parts:
            part = [rows[i] for i in numbers]
            prompts = [g.prompt for g, _ in part]
            ids = [g.token_ids[j] for g, j in part]
            empty += sum(len(x) == 0 for x in ids)  # all-zero mask rows
            batch = collate_rollout(processor, prompts, ids, config=model_config)
            lp_sampler = torch.zeros(batch["responses"].shape, dtype=torch.float32)
            for i, (g, j) in enumerate(part):
                lp_sampler[i, : len(g.sampler_logprobs[j])] = torch.tensor(g.sampler_logprobs[j])
            micro.append(
                MicroBatch(
                    inputs={k: v.to(device) for k, v in model_inputs(batch).items()},
                    responses=batch["responses"].to(device),
                    mask=batch["response_mask"].to(device),
                    prompt_length=int(batch["prompt_length"]),
                    advantages=torch.tensor([g.advantages[j] for g, j in part], dtype=torch.float32).to(device),
                    uids=[g.uid for g, _ in part],
                    response_index=[j for _, j in part],
                    images_per_row=[len(p.images) for p in prompts],
                    lp_sampler=lp_sampler.to(device),
                    prompts=prompts,
                    texts=[g.texts[j] for g, j in part],
                    rewards={k: torch.tensor([getattr(g, k)[j] for g, j in part]).to(device) for k in REWARD_PARTS},
                    extra=[g.extra for g, _ in part],
                )
            )
        minis.append(micro)
    return minis, {"skipped/empty_responses": float(empty)}


def _prompt_tokens(prompt: Prompt) -> int:
    """The prompt's length as the model sees it (text + expanded image tokens: `build_prompt` measured it)."""
    if prompt.num_tokens is None:
        raise ValueError("a prompt without num_tokens (build it with vppo_rollout.build_prompt) cannot be budgeted")
    return int(prompt.num_tokens)
