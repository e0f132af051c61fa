"""Cost of one RL step of the recipe, VPPO against its DAPO baseline, measured in the same run.

    python packages/vppo-recipes/benchmarks/bench_recipe.py [--steps 4] [--nproc 2] [--keep DIR]

Builds the tiny Qwen2.5-VL and the synthetic task, then runs the real recipe (`tune run --nproc_per_node 2`,
FSDP2 on gloo) for DAPO and for VPPO with identical settings and `optimizer.lr=0`: the weights never change, so
both algorithms sample exactly the same responses for exactly the same prompts at every step, and the only
difference in work is VPPO's perturbed rows in the no-grad pass plus TAS/TGF. The runs are interleaved
DAPO, VPPO, VPPO, DAPO (--repeats 2) so that a shared machine's load drifts alike over both; the first step of
every run (lazy initialisation) is dropped, and the table shows the MEDIAN over the remaining steps of each phase
(the slowest rank's seconds, as logged by the recipe), the VPPO / DAPO ratio per phase, each phase's share of its
algorithm's step (the "step" row is the wall time of the whole step, 100 %), and the peak memory of each
rank (peak RSS on CPU, peak allocated memory on GPU). Target (issue 5): step-time ratio <= 1.10 (official code
+9.7 %).

The random tiny model never writes \\boxed{}, so every reward is 0 and the online filter is switched off here
(it would drop every group): the step still runs the full pipeline with zero advantages, which costs the same
compute as real advantages.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from vppo_recipes.offline import OFFLINE_ENV

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"
PHASES = ("sample", "reward", "old_logprob", "alt_logprob", "shaping", "update", "weight_sync", "step")
ENV = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}


def build_assets(root: Path) -> tuple[Path, Path]:
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(root / "tiny", "qwen2_5_vl", seed=0)
    build_visual_task(root / "task", n_train=64, n_test=4, seed=0)
    return ckpt, root / "task"


def run(algo: str, root: Path, ckpt: Path, task: Path, *, steps: int, nproc: int, tag: str = "") -> list[dict]:
    out = root / f"{algo}{tag}"
    tune = str(Path(sys.executable).parent / "tune")
    cmd = [
        tune, "run", "--nproc_per_node", str(nproc), "vppo_recipes/rl/rl_distributed.py",
        "--config", str(CONFIGS / f"tiny_{algo}.yaml"), f"output_dir={out}", f"model.path={ckpt}",
        f"data.source={task}", f"world.nproc_per_node={nproc}", f"training.max_steps={steps}",
        "optimizer.lr=0.0", "rollout.online_filter=false", "rollout.group_size=8", "rollout.batch_prompts=8",
        "rollout.max_new_tokens=32", "batch.update_prompts=4", "batch.micro_batch_size=16",
        "training.save_every_n_steps=0", "training.resume=never", "validation.every_n_steps=0",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=root, env={**os.environ, **ENV}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{algo} run failed:\n{proc.stderr[-6000:]}")
    lines = (out / "logs" / "metrics.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def median(rows: list[dict], key: str) -> float:
    """The median over steps (robust to a neighbour's burst of load on a shared machine)."""
    return statistics.median(r[key] for r in rows)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=4, help="RL steps per algorithm (the first is dropped)")
    ap.add_argument("--nproc", type=int, default=2)
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep the runs in (default: a temp dir)")
    ap.add_argument("--repeats", type=int, default=2, help="runs per algorithm, interleaved ABBA")
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is dropped as warm-up)")
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ckpt, task = build_assets(root)
        res: dict[str, list[dict]] = {"dapo": [], "vppo": []}
        order = [("dapo", "vppo") if i % 2 == 0 else ("vppo", "dapo") for i in range(args.repeats)]
        for i, pair in enumerate(order):
            for a in pair:
                res[a] += run(a, root, ckpt, task, steps=args.steps, nproc=args.nproc, tag=f"_{i}")[1:]
    d, v = res["dapo"], res["vppo"]
    tokens = median(d, "response/length_mean") * 8 * 8
    print(f"\nRL step of the recipe, tiny Qwen2.5-VL, {args.nproc} processes (gloo, CPU), 8 prompts x G=8, "
          f"~{tokens:.0f} response tokens per step; median of steps 2..{args.steps} of {args.repeats} runs each")  # fmt: skip
    step_d, step_v = median(d, "time/step_s"), median(v, "time/step_s")
    print(f"{'phase':<14}{'DAPO s':>10}{'VPPO s':>10}{'VPPO/DAPO':>11}{'DAPO share':>12}{'VPPO share':>12}")
    for p in PHASES:
        a, b = median(d, f"time/{p}_s"), median(v, f"time/{p}_s")
        ratio = f"{b / a:.3f}" if a > 1e-4 else "-"
        print(f"{p:<14}{a:>10.3f}{b:>10.3f}{ratio:>11}{a / step_d:>12.1%}{b / step_v:>12.1%}")
    train = ("old_logprob", "alt_logprob", "shaping", "update")
    a = sum(median(d, f"time/{p}_s") for p in train)
    b = sum(median(v, f"time/{p}_s") for p in train)
    print(f"{'train passes':<14}{a:>10.3f}{b:>10.3f}{b / a:>11.3f}   (all but sampling, reward, weight sync)")
    step_ratio = median(v, "time/step_s") / median(d, "time/step_s")
    extra = (median(v, "time/alt_logprob_s") + median(v, "time/shaping_s")) / median(d, "time/step_s")
    print(f"\nstep-time ratio VPPO / DAPO (wall) = {step_ratio:.3f}  (target <= 1.10, aim <= 1.05; official 1.097)")
    print(f"VPPO-only phases (perturbed rows + shaping) / DAPO step = {extra:.3f}  (the overhead the phases attribute)")
    print("peak memory per rank (GiB; CPU: peak RSS of the process):")
    for key in sorted(k for k in d[0] if k.startswith("memory/peak_gib_rank")):
        print(f"  {key.rsplit('_', 1)[-1]:<7} DAPO {max(r[key] for r in d):.2f}   VPPO {max(r[key] for r in v):.2f}")
    same = all(x["response/length_mean"] == y["response/length_mean"] for x, y in zip(d, v))
    print(f"identical rollouts in both runs (same response lengths every step): {same}")


if __name__ == "__main__":
    main()
