"""Do two source trees of this repository train the tiny RL recipe to the same metrics?

    git worktree add /tmp/old <commit>
    python packages/vppo-recipes/benchmarks/compare_runs.py /tmp/old [--work /tmp/compare_runs]

For vppo, pgpo, dapo and grpo at 1 and 2 processes: 2 RL steps of each tree's own tiny config (embedded engine, the
same warm-started model and data), then every logged value of the OLD run compared with the NEW one (this checkout):
bit-identical, differing, or in `--corrected` (metrics a change fixed on purpose, printed old -> new). Timing,
memory and keys only one side logs are left out (the new keys are listed).
"""

import argparse
import json
import math
import os
import subprocess
import sys
from pathlib import Path

NEW = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(NEW / "packages/vppo-recipes/tests"))
from _rl_launch import ENV, SMALL_BATCH  # noqa: E402
from _warm_start import warm_assets  # noqa: E402

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("old", type=Path, help="the other source tree (a git worktree of an earlier commit)")
ap.add_argument("--work", type=Path, default=Path("/tmp/compare_runs"))
ap.add_argument(
    "--corrected",
    default="actor/loss,actor/pg_loss,actor/clipfrac_high,actor/clipfrac_low,actor/clipfrac_dual",
    help="comma-separated metrics expected to differ",
)
args = ap.parse_args()
OLD = args.old.resolve()
root = args.work / "assets"
root.mkdir(parents=True, exist_ok=True)
assets = (
    warm_assets(root) if not (root / "warm").exists() else {"root": root, "warm": root / "warm", "task": root / "task"}
)
SMALL = [*SMALL_BATCH, "training.save_every_n_steps=0", "validation.every_n_steps=0"]
env = {**os.environ, **ENV}
tune = str(Path(sys.executable).parent / "tune")


def run(tree: Path, algo: str, nproc: int) -> list[dict]:
    out = args.work / f"{'old' if tree == OLD else 'new'}_{algo}_{nproc}"
    srcs = ":".join(str(tree / f"packages/{p}/src") for p in ("vppo-core", "vppo-rollout", "vppo-eval", "vppo-recipes"))
    cmd = [
        tune,
        "run",
        "--nproc_per_node",
        str(nproc),
        "vppo_recipes/rl/rl_distributed.py",
        "--config",
        str(tree / f"packages/vppo-recipes/src/vppo_recipes/configs/tiny_{algo}.yaml"),
        f"output_dir={out}",
        f"model.path={assets['warm']}",
        f"data.source={assets['task']}",
        f"world.nproc_per_node={nproc}",
        "training.max_steps=2",
        *SMALL,
    ]
    p = subprocess.run(cmd, cwd=root, env={**env, "PYTHONPATH": srcs}, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "logs/metrics.jsonl").read_text().splitlines()]


CORRECTED = tuple(args.corrected.split(","))
SKIP = ("time/", "throughput/", "memory/", "rollout/")
for algo in ("vppo", "pgpo", "dapo", "grpo"):
    for nproc in (1, 2):
        a, b = run(OLD, algo, nproc), run(NEW, algo, nproc)
        same, corrected, differ = 0, {}, {}
        for x, y in zip(a, b):
            for k, v in x.items():
                if k.startswith(SKIP):
                    continue
                w = y.get(k)
                if k in CORRECTED:
                    corrected[k] = (v, w)
                elif w == v or (isinstance(v, float) and isinstance(w, float) and math.isnan(v) and math.isnan(w)):
                    same += 1
                else:
                    differ[f"step{x['step']}:{k}"] = (v, w)
        new_keys = sorted({k for y in b for k in y} - {k for x in a for k in x})
        print(f"{algo} nproc={nproc}: {same} values bit-identical, {len(differ)} differ {differ}, new keys {new_keys}")
        print(
            "   corrected (old -> new, last step): "
            + ", ".join(f"{k} {v[0]:.6g} -> {v[1]:.6g}" for k, v in corrected.items())
        )
