"""Held-out avg@k during RL training (ALGORITHMS.md §8: temperature 1.0, top-p 1.0), each rank scoring its strided
share of the rows, with the item-level accuracies written for paired comparisons between runs."""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from typing import Any

import torch.distributed as dist
from omegaconf import DictConfig

from vppo_eval.evaluate import evaluate
from vppo_eval.records import Record
from vppo_recipes.collectives import all_reduce_list
from vppo_recipes.data import SkipRow, VisualQADataset
from vppo_recipes.seeding import mix_seed


def held_out_records(cfg: DictConfig, rank: int, world: int) -> list[Record]:
    """This rank's strided share of the `validation` rows (none when validation.every_n_steps is 0).

    Rows the loader cannot use are skipped and counted, never scored as 0; no usable row at all is an error.
    """
    v = cfg.validation
    if not v.every_n_steps:
        return []
    try:
        ds = VisualQADataset.from_source(v.source, v.split, dict(cfg.data.columns))
    except ValueError as e:  # the loader names data.*; say which section it was
        raise ValueError(f"validation (source={v.source!r}, split={v.split!r}): {e}") from e
    records, skipped = [], defaultdict(int)
    for row in range(len(ds)):
        if v.limit is not None and len(records) >= v.limit:
            break
        try:
            ex = ds.example(row)
        except SkipRow as skip:  # counted, never scored as 0
            skipped[skip.reason] += 1
            continue
        records.append(Record(id=str(row), question=ex.question, images=ex.images, answer=ex.answer))
    if not records:
        raise ValueError(f"validation.source={v.source!r} split {v.split!r} has no usable row: {dict(skipped)}")
    return records[rank::world]


def validate(
    sampler: Any, processor: Any, records: list[Record], *, cfg: DictConfig, step: int, seed: int, rank: int,
    world: int, output_dir: str,
) -> dict[str, float]:  # fmt: skip
    """avg@k of the sampler's current policy on this rank's `records`, over all ranks (collective); also appends the
    items' accuracies to `output_dir/logs/validation_items.jsonl` (`write_validation_items`)."""
    v = cfg.validation
    total, n, fmt = 0.0, 0, 0.0
    acc: dict[tuple[str, str], float] = {}
    if records:
        sampler.wake_up()
        res = evaluate(
            sampler,
            {"validation": records},
            processor=processor,
            k=int(v.k),
            temperature=1.0,
            top_p=1.0,
            max_new_tokens=int(cfg.rollout.max_new_tokens),
            seed=mix_seed(seed, step, 0x7A1),
            format_weight=float(cfg.reward.format_weight),
            multiple_choice=bool(cfg.reward.multiple_choice),
            progress=False,
            allow_empty=True,  # one rank's share may be all skipped: the counts are all-reduced below
        )
        sampler.sleep()
        acc = res.item_accuracy()
        total, n = sum(acc.values()), len(acc)
        b = res.benchmarks["validation"]
        fmt = 0.0 if math.isnan(b.format_rate) else b.format_rate * n
    total, n, fmt = all_reduce_list([total, n, fmt])
    items = {item_id: a for (_, item_id), a in acc.items()}
    write_validation_items(items, step=step, k=int(v.k), rank=rank, world=world, output_dir=output_dir)
    return {
        f"validation/avg@{int(v.k)}": total / n if n else math.nan,
        "validation/format_rate": fmt / n if n else math.nan,
        "validation/items": n,
    }


def write_validation_items(acc: dict[str, float], *, step: int, k: int, rank: int, world: int, output_dir: str) -> None:
    """Append {"step", "k", "items": {row id: accuracy over the k samples}} of all ranks to
    `output_dir/logs/validation_items.jsonl` (rank 0 writes; collective), for paired item-level comparisons between
    runs. A resumed run may append a step again; readers keep the last line of each step."""
    gathered: list[dict[str, float] | None] = [None] * world
    dist.all_gather_object(gathered, acc)
    if rank != 0:
        return
    items = {key: value for part in gathered for key, value in (part or {}).items()}
    items = dict(sorted(items.items(), key=lambda kv: int(kv[0])))
    path = os.path.join(output_dir, "logs", "validation_items.jsonl")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps({"step": step, "k": k, "items": items}) + "\n")
