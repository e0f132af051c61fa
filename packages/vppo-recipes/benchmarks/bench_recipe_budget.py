"""Micro-batches by token budget against fixed micro-batches of the same peak memory, measured in the same run.

    python packages/vppo-recipes/benchmarks/bench_recipe_budget.py [--steps 4] [--repeats 2] [--micro 4]
    nox -s bench -- recipe_budget

The real recipe (`RLRecipeDistributed`, VPPO, FSDP2 over a 1-rank gloo group, in this process; 16 prompts x G = 8 per
step in 2 mini-batches of 64 responses, where the 7B config has 128 per rank) on the tiny
Qwen2.5-VL and the synthetic task, with the responses' LENGTHS drawn from a realistic distribution instead of
sampled by the tiny model (which writes a few dozen tokens, all alike): per response, a log-normal length with the
median of RL responses on the paper's data (~400 tokens of a 2,048-token cap, σ = 0.9: a long tail, ~3.5 % at the
cap), SCALED DOWN 8x so that a step runs in seconds on a CPU: median 50, cap `rollout.max_new_tokens` = 256,
beside the task's 79-token prompts (the real prompts hold up to 1,280 image tokens of 2,048; scaled 8x: 80-256).
The token ids are ordinary vocabulary ids drawn from a generator seeded by the prompt's sampling seed, so both
settings train on exactly the same responses. Everything after sampling is the recipe's own: micro-batches, the
clean and perturbed no-grad passes, TAS/TGF, the update (optimizer.lr = 0: the same weights every step).

Two settings, interleaved fixed, budget, budget, fixed (--repeats 2) so a shared machine's load drifts alike:
- fixed:  batch.micro_batch_size = M (--micro), in data order: the largest micro-batch is M x (prompt + cap)
          positions, what the memory plan sizes;
- budget: batch.max_tokens_per_micro_batch = M x (data.max_prompt_length + cap), the SAME peak padded positions
          (so the same activation memory), micro_batch_size raised to 64 (the cap on rows).
The first step of each run is dropped; the table shows medians over the rest: the training passes (old_logprob +
alt_logprob + shaping + update: all that micro-batching changes), the whole step (sampling here is a draw, ~0 s),
`throughput/padding_fraction` and the largest micro-batch's positions, and the ratios fixed / budget.
Targets (issue 28): padding fraction < 10 % and the step >= 1.3x faster at equal peak memory.
"""

from __future__ import annotations

import argparse
import math
import statistics
import tempfile
from pathlib import Path

import torch

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"
SCALE = 8  # lengths of the paper's setting / lengths here
MEDIAN, SIGMA, CAP = 400 // SCALE, 0.9, 2048 // SCALE
PROMPT = 80  # data.max_prompt_length: the task's prompts are 79 tokens
TRAIN = ("old_logprob", "alt_logprob", "shaping", "update")


class DrawnLengths:
    """A `GroupSampler` whose responses are ordinary token ids of log-normal lengths (median MEDIAN, σ SIGMA,
    clipped to max_new_tokens), drawn from a generator seeded by the sampling seed: the same for the same prompt."""

    def __init__(self, processor, vocab_size: int):
        self.processor = processor
        special = {*processor.tokenizer.all_special_ids, processor.image_token_id, processor.video_token_id}
        self.ordinary = torch.tensor([i for i in range(vocab_size) if i not in special])

    def sample(self, prompts, n, sampling):
        from vppo_rollout.sampling import Rollouts

        g = torch.Generator().manual_seed(int(sampling.seed))
        out = Rollouts([], [], [], [], [])
        for p in range(len(prompts)):
            for _ in range(n):
                z = float(torch.randn((), generator=g))
                length = max(1, min(sampling.max_new_tokens, round(MEDIAN * math.exp(SIGMA * z))))
                ids = self.ordinary[torch.randint(len(self.ordinary), (length,), generator=g)].tolist()
                out.group_index.append(p)
                out.token_ids.append(ids)
                out.texts.append(self.processor.tokenizer.decode(ids))
                out.finish_reasons.append("length" if length == sampling.max_new_tokens else "stop")
                out.logprobs.append([-1.0] * length)
        return out

    def update_weights(self, named_tensors):
        return sum(1 for _ in named_tensors)  # gather every tensor, as a push to a real engine does

    def sleep(self):
        pass

    def wake_up(self):
        pass

    def close(self):
        pass


def run(root: Path, ckpt: Path, task: Path, *, steps: int, micro: int, budget: bool, tag: str) -> list[dict]:
    """`steps` RL steps of tiny VPPO in this process (a 1-rank gloo group); their metrics."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    import vppo_recipes.rl.rl_distributed as rl
    from vppo_recipes.config_schema import validate_config

    settings = {
        "output_dir": root / tag, "model.path": ckpt, "data.source": task, "data.max_prompt_length": PROMPT,
        "world.nproc_per_node": 1, "training.max_steps": steps, "optimizer.lr": 0.0, "rollout.online_filter": False,
        "rollout.group_size": 8, "rollout.batch_prompts": 16, "rollout.max_new_tokens": CAP,
        "batch.update_prompts": 8, "batch.micro_batch_size": micro, "training.save_every_n_steps": 0,
        "training.resume": "never", "validation.every_n_steps": 0, "metric_logger.log_dir": root / tag / "logs",
    }  # fmt: skip
    if budget:
        settings.update({"batch.micro_batch_size": 64, "batch.max_tokens_per_micro_batch": micro * (PROMPT + CAP)})
    cfg = validate_config(
        OmegaConf.merge(
            OmegaConf.load(CONFIGS / "tiny_vppo.yaml"),
            OmegaConf.from_dotlist([f"{k}={v}" for k, v in settings.items()]),
        ),
        "rl",
    )
    rows = []
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        recipe = rl.RLRecipeDistributed(cfg)
        recipe.setup(cfg)
        recipe.sampler = DrawnLengths(recipe.processor, recipe.model_config.text_config.vocab_size)
        for _ in range(steps):
            rows.append(recipe.rl_step())
            recipe.step += 1
        recipe.metric_logger.close()
    finally:
        dist.destroy_process_group()
    return rows


def median(rows: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="RL steps per run (the first is dropped)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per setting, interleaved ABBA")
    ap.add_argument("--micro", type=int, default=4, help="fixed batch.micro_batch_size (sets the budget)")
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is dropped as warm-up)")
    torch.set_num_threads(1)
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.tiny import build_tiny_checkpoint

    res: dict[str, list[dict]] = {"fixed": [], "budget": []}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        ckpt = build_tiny_checkpoint(root / "tiny", "qwen2_5_vl", seed=0)
        task = build_visual_task(root / "task", n_train=64, n_test=4, seed=0, tasks=("side",)) and root / "task"
        order = [("fixed", "budget") if i % 2 == 0 else ("budget", "fixed") for i in range(args.repeats)]
        for i, pair in enumerate(order):
            for name in pair:
                rows = run(
                    root, ckpt, task, steps=args.steps, micro=args.micro, budget=name == "budget", tag=f"{name}{i}"
                )
                res[name] += rows[1:]
    f, b = res["fixed"], res["budget"]
    same = all(x["response/length_mean"] == y["response/length_mean"] for x, y in zip(f, b))
    lengths = median(f, "response/length_mean")
    print(
        f"\nRL step of the recipe (VPPO), tiny Qwen2.5-VL, 1 process (gloo, CPU), 16 prompts x G=8 per step in 2 "
        "mini-batches of 64 responses (the 7B config: 128 per rank), "
        f"response lengths log-normal (median {MEDIAN}, sigma {SIGMA}, cap {CAP}: the paper's 400 / 2048 scaled "
        f"1/{SCALE}; mean {lengths:.0f} here), {PROMPT - 1}-token prompts; median of steps 2..{args.steps} of "
        f"{args.repeats} runs each. fixed: micro_batch_size={args.micro}; budget: max_tokens_per_micro_batch="
        f"{args.micro * (PROMPT + CAP)} (= {args.micro} x ({PROMPT} + {CAP}), the same peak), micro_batch_size=64"
    )
    print(f"{'':<26}{'fixed':>10}{'budget':>10}{'fixed/budget':>14}")
    for label, key in [
        ("train passes s", None),
        ("step s", "time/step_s"),
        ("update s", "time/update_s"),
        ("no-grad passes s", None),
    ]:
        if key is None and label.startswith("train"):
            a, c = (sum(median(r, f"time/{p}_s") for p in TRAIN) for r in (f, b))
        elif key is None:
            a, c = (median(r, "time/old_logprob_s") + median(r, "time/alt_logprob_s") for r in (f, b))
        else:
            a, c = median(f, key), median(b, key)
        print(f"{label:<26}{a:>10.3f}{c:>10.3f}{a / c:>14.2f}x")
    for label, key in [
        ("padding fraction", "throughput/padding_fraction"),
        ("largest micro-batch pos.", "throughput/largest_micro_batch_positions"),
        ("update tokens / s", "throughput/update_tokens_per_s"),
    ]:
        a, c = median(f, key), median(b, key)
        print(f"{label:<26}{a:>10.3f}{c:>10.3f}{a / c:>14.2f}")
    print(f"identical responses in both settings (same mean length every step): {same}")


if __name__ == "__main__":
    main()
