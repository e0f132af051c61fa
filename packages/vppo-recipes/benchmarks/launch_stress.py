"""N consecutive 2-process launches of the RL recipe, counting every non-zero exit.

Why: gloo on CPU aborts at interpreter exit in ~1-2 % of plain 2-rank launches ("terminate called without an active
exception", SIGABRT) after all work is done (ENVIRONMENT.md). The recipe ends with `os._exit(0)` after
`destroy_process_group()`; this script is the evidence that the 2-process test is deterministic:

    python packages/vppo-recipes/benchmarks/launch_stress.py --runs 50      # or: nox -s stress -- --runs 50

Each launch is `tune run --nproc_per_node 2` of the shipped tiny GRPO config for one optimizer step on a tiny
random Qwen2.5-VL and the synthetic task (built once, offline). It prints one line per run and a closing
'N passed, N failed' line; the exit code is 1 if any launch failed, and the logs of failed launches are kept.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import vppo_recipes
from vppo_eval.synthetic import build_visual_task
from vppo_rollout.tiny import build_tiny_checkpoint

RECIPE = "vppo_recipes/rl/rl_distributed.py"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--workdir", type=Path, default=None, help="default: a fresh temporary folder")
    args = parser.parse_args(argv)

    work = args.workdir or Path(tempfile.mkdtemp(prefix="vppo_stress_"))
    work.mkdir(parents=True, exist_ok=True)
    ckpt = build_tiny_checkpoint(work / "ckpt", "qwen2_5_vl", seed=0)
    build_visual_task(work / "task", n_train=16, n_test=0, seed=0)
    config = Path(vppo_recipes.__file__).parent / "configs" / "tiny_grpo.yaml"
    tune = Path(sys.executable).with_name("tune")
    from vppo_recipes.offline import OFFLINE_ENV

    env = {**os.environ, **OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    # `tune run` imports the recipe as a module relative to the cwd: run from the folder above the package.
    cwd = Path(vppo_recipes.__file__).parent.parent
    failed = 0
    for i in range(1, args.runs + 1):
        out = work / "out"
        shutil.rmtree(out, ignore_errors=True)
        cmd = [
            str(tune),
            "run",
            "--nproc_per_node",
            "2",
            RECIPE,
            "--config",
            str(config),
            f"output_dir={out}",
            f"model.path={ckpt}",
            f"data.source={work / 'task'}",
            "validation.every_n_steps=0",
            "rollout.group_size=2",
            "rollout.batch_prompts=2",
            "batch.update_prompts=2",
            "batch.micro_batch_size=4",
            "rollout.max_new_tokens=4",
            "training.max_steps=1",
            "training.save_every_n_steps=0",
        ]
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
        if proc.returncode != 0:
            failed += 1
            (work / f"failed_run_{i}.log").write_text(proc.stdout + proc.stderr)
        print(
            f"run {i:3d}: exit {proc.returncode} in {time.perf_counter() - t0:5.1f} s (failures so far: {failed})",
            flush=True,
        )
    print(f"launch stress: {args.runs - failed} passed, {failed} failed  (work folder {work})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
