"""Do two source trees of this repository train the tiny RL recipe to the same metrics?

    git worktree add /tmp/old <commit>
    python packages/vppo-recipes/benchmarks/compare_runs.py /tmp/old [--work /tmp/compare_runs]

For every algorithm with a tiny config in both trees (or `--algorithms a,b`), plus the variants in VARIANTS (the
exact dependency, the official TAS statistics, the baselines' dependency diagnostics, truncated IS), at 1 and 2
processes: 2 RL steps of each tree's own tiny config (embedded engine, the same warm-started model and data), then
every logged value of the OLD run compared with the NEW one (this checkout): bit-identical, differing, or in
`--corrected` (metrics a change fixed on purpose, printed old -> new). Timing and memory, and keys only one side
logs, are left out (the new keys are listed). `--keep-old` reuses the OLD runs already in `--work` (the old tree
does not change), so a refactor's baseline is run once. Exits 1 when a value differs.
"""

import argparse
import json
import math
import os
import shutil
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
ap.add_argument("--corrected", default="", help="comma-separated metrics expected to differ")
ap.add_argument("--algorithms", default="all", help="comma-separated names (default: every tiny_<name>.yaml of both)")
ap.add_argument("--nproc", default="1,2", help="comma-separated process counts")
ap.add_argument("--keep-old", action="store_true", help="reuse the OLD runs' metrics already in --work")
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


# name -> (tiny config, extra overrides): settings of the shipped configs that a plain tiny run leaves unexercised
VARIANTS = {
    "vppo_exact": ("vppo", ["algorithm.dependency=exact"]),
    "vppo_reference": ("vppo", ["algorithm.tas_statistics=reference"]),
    "pgpo_exact": ("pgpo", ["algorithm.dependency=exact"]),
    "dapo_diagnostics": ("dapo", ["diagnostics.dependency=true"]),
    "grpo_is_cap": ("grpo", ["loss.rollout_is_cap=2.0"]),
}


def run(tree: Path, name: str, nproc: int) -> list[dict]:
    out = args.work / f"{'old' if tree == OLD else 'new'}_{name}_{nproc}"
    algo, extra = VARIANTS.get(name, (name, []))
    if tree == OLD and args.keep_old and (out / "logs/metrics.jsonl").exists():
        return [json.loads(line) for line in (out / "logs/metrics.jsonl").read_text().splitlines()]
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
        f"validation.source={assets['task']}",
        f"world.nproc_per_node={nproc}",
        "training.max_steps=2",
        *SMALL,
        *extra,
    ]
    if out.exists():  # a fresh run, never a resume of an earlier one
        shutil.rmtree(out)
    p = subprocess.run(cmd, cwd=root, env={**env, "PYTHONPATH": srcs}, capture_output=True, text=True)
    if p.returncode:
        sys.exit(f"{' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    return [json.loads(line) for line in (out / "logs/metrics.jsonl").read_text().splitlines()]


CORRECTED = tuple(args.corrected.split(","))
SKIP = ("time/", "throughput/", "memory/")


def tiny_algorithms(tree: Path) -> set[str]:
    configs = tree / "packages/vppo-recipes/src/vppo_recipes/configs"
    return {p.stem.removeprefix("tiny_") for p in configs.glob("tiny_*.yaml")} - {"sft"}


names = (
    sorted(tiny_algorithms(OLD) & tiny_algorithms(NEW)) + list(VARIANTS)
    if args.algorithms == "all"
    else args.algorithms.split(",")
)
failed = False
for algo in names:
    for nproc in map(int, args.nproc.split(",")):
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
        failed |= bool(differ) or len(a) != len(b)
        new_keys = sorted({k for y in b for k in y} - {k for x in a for k in x})
        print(f"{algo} nproc={nproc}: {same} values bit-identical, {len(differ)} differ {differ}, new keys {new_keys}")
        if corrected:
            print(
                "   corrected (old -> new, last step): "
                + ", ".join(f"{k} {v[0]:.6g} -> {v[1]:.6g}" for k, v in corrected.items())
            )
sys.exit(1 if failed else 0)
