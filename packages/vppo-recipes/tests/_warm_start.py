"""Shared by the recipe run tests: a tiny policy warm-started on the answer format of the synthetic task.

A random tiny model never writes \\boxed{}, so every sampled group would have identical rewards and the online
filter would drop them all; a few cross-entropy steps on "<think>...</think> \\boxed{answer}" give mixed rewards.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import torch


def warm_start(ckpt: Path, task: Path, out: Path, *, steps: int, thought: str) -> Path:
    """`steps` AdamW (lr 3e-3) steps of token-mean NLL on "<think>{thought}</think> \\boxed{answer}<|im_end|>",
    16 seeded random rows of `task`'s train split each, single process; saved as an HF folder at `out`."""
    import datasets

    from vppo_recipes.forward import response_logprobs
    from vppo_rollout.collate import collate_rollout, model_inputs
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.prompts import build_prompt

    torch.manual_seed(0)
    processor, model = load_processor(ckpt), load_policy(ckpt)
    model.train()
    rows = datasets.load_dataset(str(task))["train"]
    tok = processor.tokenizer
    end = tok.convert_tokens_to_ids("<|im_end|>")
    prompts = [build_prompt(processor, r["problem"], r["images"]) for r in rows]
    targets = [tok(f"<think>{thought}</think> \\boxed{{{r['answer']}}}")["input_ids"] + [end] for r in rows]
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        idx = torch.randperm(len(rows), generator=g)[:16].tolist()
        b = collate_rollout(processor, [prompts[i] for i in idx], [targets[i] for i in idx], config=model.config)
        lp, _ = response_logprobs(
            model, model_inputs(b), b["responses"], b["prompt_length"], temperature=1.0, chunk_size=1024
        )
        loss = -(lp * b["response_mask"]).sum() / b["response_mask"].sum()
        loss.backward()
        opt.step()
        opt.zero_grad()
    shutil.copytree(ckpt, out, dirs_exist_ok=True)  # tokenizer / processor files
    model.save_pretrained(out)
    return out


def warm_assets(root: Path, **size_overrides) -> dict[str, Path]:
    """A tiny Qwen2.5-VL (seed 0, `size_overrides` for vppo_rollout.build_tiny_checkpoint), the synthetic task's
    left/right family (32 train / 4 test rows, with 20 claim columns) and the 60-step warm start: {"root", "warm", "task"}."""
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(root / "tiny", "qwen2_5_vl", seed=0, **size_overrides)
    # with VAPO's claim columns (tiny_vapo reads them; their own random stream: the other columns are unchanged)
    build_visual_task(root / "task", n_train=32, n_test=4, seed=0, tasks=("side",), claims=20)
    warm = warm_start(ckpt, root / "task", root / "warm", steps=60, thought="I see")
    return {"root": root, "warm": warm, "task": root / "task"}
