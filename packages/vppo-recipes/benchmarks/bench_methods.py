"""What each method costs: extra forward passes, step time and peak memory of every method as ratios to DAPO.

    python packages/vppo-recipes/benchmarks/bench_methods.py [--steps 3] [--nproc 1] [--keep DIR] [--update-readme]
    nox -s bench -- methods

Every entry of `vppo_recipes.methods.BUILTIN_METHODS` (a method added there is measured with no edit here) runs the
real recipe (`tune run vppo_recipes/rl/rl_distributed.py`'s `recipe_main`, FSDP2 on gloo) on the tiny Qwen2.5-VL
and the synthetic task, from its own `tiny_<name>.yaml` (its published `algorithm.*` and `loss.*` settings) or, when
it has none, `tiny_dapo.yaml` with `algorithm.name=<name>`, with the SAME sizes for all (`SIZES`) and
`optimizer.lr=0`: the weights never change, so every method samples exactly the same responses to the same prompts
at every step and the only difference in work is the method's own. DAPO runs first and last (`--repeats` more
pairs): its rows show how far the shared machine drifted over the run; the ratios are to the median over all DAPO
steps. The first step of every run (lazy initialisation) is dropped; times are medians over the other steps of
the phases the recipe logs (the slowest rank's seconds).

Columns (per micro-batch: per forward/backward of the update, `batch.micro_batch_size` responses):
- views: `len(method.views())`, the altered no-grad passes the method declares (the recipe adds VPPO's view for a
  method without one under `diagnostics.dependency: true`, off here);
- extra no-grad fwd / mb: COUNTED while the run trains: every forward of the policy's decoder without gradient (the
  recipe's passes and any a method runs itself, e.g. VAPO's probes), per forward with gradient, minus DAPO's (its
  clean pass for lp_old);
- also returns: what the method asks of the clean no-grad pass (`clean_entropy`: the analytic entropy;
  `clean_prior`: PEPO's prior from every layer's hidden state, reduced layer by layer; `clean_full_hidden`: the
  whole last hidden state) and of the gradient pass (`update_entropy`): no extra forward, more work and memory in
  the same one;
- head / mb: counted `ctx.in_root` calls per micro-batch: full-vocabulary computations on the LM head over saved
  hidden states (the exact dependency, ToR's top-p entropy, VEPO's view divergences), no transformer forward;
- step, no-grad, update: median seconds of the whole step, of the no-grad phases (`time/old_logprob_s` +
  `time/alt_logprob_s`) and of `time/update_s`, each / DAPO's;
- no-grad / own clean pass: the median over steps of the no-grad phases / the clean pass of the same step, in the
  same run (robust to the machine's drift between runs; about 1 + the extra passes when they cost a clean pass);
- peak memory: the largest `memory/peak_gib_rank*` of the run / DAPO's (on CPU the peak RSS of the process, which
  also holds the libraries, the sampler's copy of the model and the rollouts: a tiny model's passes barely move it);
- 7B extra: the memory plan of `qwen2_5_vl_7b_dapo.yaml` with `algorithm.name=<name>` (`vppo_recipes.plan`):
  `Plan.method_passes`, the bytes per rank the method's extra passes hold at peak, in GiB ("n/a" where the plan
  does not count them).

The random tiny model never writes \\boxed{}, so every reward is 0 and the online filter is switched off (it would
drop every group): the step still runs the full pipeline with zero advantages, which costs the same compute.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from vppo_recipes.offline import OFFLINE_ENV

HERE = Path(__file__).resolve()
ROOT = HERE.parents[3]
CONFIGS = HERE.parents[1] / "src" / "vppo_recipes" / "configs"
README = HERE.parents[1] / "README.md"
PLAN_CONFIG = CONFIGS / "qwen2_5_vl_7b_dapo.yaml"
ENV = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
# The parent sets it to a file for the worker (this script run as the recipe) to append each step's counts to.
COUNT_ENV = "VPPO_BENCH_PASS_COUNTS"
BASELINE = "dapo"
# The same sizes for every method: 4 prompts x G=4 per step, 2 mini-batches of 2 prompts (one micro-batch each).
SIZES = (
    "optimizer.lr=0.0", "rollout.online_filter=false", "rollout.group_size=4", "rollout.batch_prompts=4",
    "rollout.max_new_tokens=24", "batch.update_prompts=2", "batch.micro_batch_size=8",
    "training.save_every_n_steps=0", "training.resume=never", "validation.every_n_steps=0",
    "diagnostics.dependency=false",
)  # fmt: skip
README_BEGIN = "<!-- begin: written by benchmarks/bench_methods.py --update-readme -->"
README_END = "<!-- end: written by benchmarks/bench_methods.py -->"
GIB = 2**30


# ------------------------------------------------------------------------------------------- which methods, how


def method_names() -> list[str]:
    """Every built-in method, in `BUILTIN_METHODS` order."""
    from vppo_recipes.methods import BUILTIN_METHODS

    return list(BUILTIN_METHODS)


def run_order(names: list[str], repeats: int = 1) -> list[str]:
    """DAPO first, every other method, DAPO last; `repeats` times over (the method order reversed on odd rounds,
    so that a drift of the machine's load does not always fall on the same methods)."""
    others = [n for n in names if n != BASELINE]
    order: list[str] = []
    for i in range(repeats):
        order += [BASELINE, *(others if i % 2 == 0 else others[::-1]), BASELINE]
    return order


def method_config(name: str) -> tuple[Path, list[str]]:
    """The method's tiny config, or tiny_dapo.yaml with the method switched when it has none."""
    own = CONFIGS / f"tiny_{name}.yaml"
    return (own, []) if own.is_file() else (CONFIGS / f"tiny_{BASELINE}.yaml", [f"algorithm.name={name}"])


def declared(name: str, nproc: int) -> dict:
    """What the method object says it runs, built from the same config as its run."""
    from vppo_recipes.cli import load_run_config
    from vppo_recipes.config_schema import validate_config
    from vppo_recipes.methods import build_method

    path, extra = method_config(name)
    cfg = validate_config(
        load_run_config(["--config", str(path), *extra, *SIZES, f"world.nproc_per_node={nproc}"]), "rl"
    )
    m = build_method(cfg.algorithm)
    return {
        "views": len(m.views()),
        "clean_entropy": bool(m.clean_entropy),
        "clean_prior": bool(m.clean_prior),
        "clean_full_hidden": bool(m.clean_full_hidden),
        "update_entropy": bool(m.update_entropy),
        "exact_dependency": bool(m.exact_dependency),
    }


def planned_extra_gib(name: str) -> float | None:
    """`Plan.method_passes` of the 7B DAPO config with the method switched, in GiB; None where the plan has no such
    count (or cannot size the config)."""
    from omegaconf import OmegaConf

    from vppo_recipes.cli import load_run_config
    from vppo_recipes.config_schema import validate_config
    from vppo_recipes.plan import plan_config

    cfg = validate_config(load_run_config(["--config", str(PLAN_CONFIG), f"algorithm.name={name}"]), "rl")
    plan = plan_config(OmegaConf.to_container(cfg, resolve=True), name=f"{PLAN_CONFIG.stem} {name}")
    passes = getattr(plan, "method_passes", None)
    return None if passes is None else passes / GIB


# ------------------------------------------------------------------------------------------- the runs


def build_assets(root: Path) -> tuple[Path, Path]:
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(root / "tiny", "qwen2_5_vl", seed=0)
    # with VAPO's claim columns (drawn from their own stream: every other column is as without them)
    build_visual_task(root / "task", n_train=64, n_test=4, seed=0, claims=20)
    return ckpt, root / "task"


def run(name: str, root: Path, ckpt: Path, task: Path, *, steps: int, nproc: int, tag: str) -> dict:
    """One run of the recipe for `name`: {"method", "metrics": [per step], "counts": [per step]} (first step
    dropped), or with "error" (the end of its stderr) when it failed."""
    out = root / f"{name}{tag}"
    counts_file = root / f"{name}{tag}.passes.jsonl"
    path, extra = method_config(name)
    tune = str(Path(sys.executable).parent / "tune")
    launch = ["--nproc_per_node", str(nproc)] if nproc > 1 else []  # 1: one process without torchrun
    cmd = [
        tune, "run", *launch, HERE.name, "--config", str(path), *extra, f"output_dir={out}", f"model.path={ckpt}",
        f"data.source={task}", f"validation.source={task}", f"world.nproc_per_node={nproc}",
        f"training.max_steps={steps}", *SIZES,
    ]  # fmt: skip
    # tune runs a relative recipe path as a module (`python -m bench_methods`): this folder goes on PYTHONPATH
    path_env = os.pathsep.join(p for p in (str(HERE.parent), os.environ.get("PYTHONPATH")) if p)
    env = {**os.environ, **ENV, COUNT_ENV: str(counts_file), "PYTHONPATH": path_env}
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        return {
            "method": name,
            "error": f"exit {proc.returncode}: {error_line(proc.stderr)}",
            "stderr": proc.stderr[-6000:],
        }
    metrics = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    counts = [json.loads(line) for line in counts_file.read_text().splitlines()]
    return {"method": name, "metrics": metrics[1:], "counts": counts[1:]}


def error_line(stderr: str) -> str:
    """The line of a failed run's stderr that names the error (the last `...Error: ...` line, else the last line),
    without the `[rank0]: ` prefix of torchrun's workers."""
    lines = [re.sub(r"^\[rank\d+\]:\s*", "", line).strip() for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    named = [line for line in lines if re.match(r"^[\w.]*(Error|Exception)\b.*:", line)]
    return (named or lines or ["(no stderr)"])[-1][:200]


def worker() -> None:
    """This script as the recipe (`tune run` from `run`): `recipe_main` with counters on its forward passes.

    Counts, per RL step, on rank 0: every forward of the policy's decoder with and without gradient (the recipe's
    passes and a method's own), what the `response_pass` calls were asked to return besides the log-probs, and every
    `ctx.in_root` computation of a method; appended as a JSON line to the
    file named by $VPPO_BENCH_PASS_COUNTS."""
    import torch

    import vppo_recipes.methods.base as base
    import vppo_recipes.rl.rl_distributed as recipe

    counts: collections.Counter = collections.Counter()
    response_pass, in_root = recipe.response_pass, base.call_in_root_forward
    rl_step = recipe.RLRecipeDistributed.rl_step

    def counted_pass(*args, **kwargs):
        kind = "grad" if torch.is_grad_enabled() else "no_grad"
        counts[f"{kind}_entropy"] += bool(kwargs.get("entropy"))
        counts[f"{kind}_prior"] += kwargs.get("visual_token_id") is not None
        counts[f"{kind}_full_hidden"] += bool(kwargs.get("full_hidden"))
        return response_pass(*args, **kwargs)

    def counted_in_root(*args, **kwargs):
        counts["head"] += 1
        return in_root(*args, **kwargs)

    def counted_step(self):
        counts.clear()
        metrics = rl_step(self)
        if metrics is not None and self.is_rank_zero:
            with open(os.environ[COUNT_ENV], "a") as f:
                f.write(json.dumps(dict(counts)) + "\n")
        return metrics

    setup = recipe.RLRecipeDistributed.setup

    def counted_setup(self, cfg):
        """Count every transformer forward of the policy (its first decoder layer running), with and without
        gradient: a method's own forwards in a hook (VAPO's probes) count as well as the recipe's passes. The
        sampler's copy of the model is made before this hook, so sampling is not counted."""
        setup(self, cfg)
        from vppo_recipes.sharding import find_blocks

        def count(module, args):
            counts["grad" if torch.is_grad_enabled() else "no_grad"] += 1

        find_blocks(self.model)[1][0].register_forward_pre_hook(count)

    recipe.RLRecipeDistributed.setup = counted_setup
    recipe.response_pass, base.call_in_root_forward = counted_pass, counted_in_root
    recipe.RLRecipeDistributed.rl_step = counted_step
    recipe._HARD_EXIT = True  # as when the recipe runs as a script (it leaves by os._exit after its cleanup)
    sys.exit(recipe.recipe_main())


# ------------------------------------------------------------------------------------------- the table


def median(values) -> float:
    """The median (robust to a neighbour's burst of load on a shared machine)."""
    return statistics.median(list(values))


def _step_values(runs: list[dict], fn) -> list[float]:
    return [fn(m) for r in runs for m in r["metrics"]]


def _no_grad_s(m: dict) -> float:
    return m["time/old_logprob_s"] + m["time/alt_logprob_s"]


def _peak(runs: list[dict]) -> float:
    return max(v for r in runs for m in r["metrics"] for k, v in m.items() if k.startswith("memory/peak_gib_rank"))


def _per_mb(runs: list[dict], key: str) -> float:
    """A count per micro-batch (per gradient pass), summed over the runs' measured steps."""
    grad = sum(c.get("grad", 0) for r in runs for c in r["counts"])
    return sum(c.get(key, 0) for r in runs for c in r["counts"]) / grad if grad else float("nan")


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "n/a" if x is None or x != x else format(x, spec)  # None or NaN: n/a


def _also(d: dict, runs: list[dict]) -> str:
    """What the clean / gradient pass returns besides the log-probs: declared by the method, and seen counted."""
    parts = []
    for flag, key, what in (
        ("clean_entropy", "no_grad_entropy", "clean: entropy"),
        ("clean_prior", "no_grad_prior", "clean: prior over all layers"),
        ("clean_full_hidden", "no_grad_full_hidden", "clean: whole last hidden state"),
        ("update_entropy", "grad_entropy", "grad: entropy"),
    ):
        if d.get(flag) or _per_mb(runs, key) > 0:
            parts.append(what)
    if d.get("exact_dependency"):
        parts.append("exact KL")
    return ", ".join(parts) or "-"


def table_rows(runs: list[dict], declared_by: dict[str, dict], planned: dict[str, float | None]) -> list[dict]:
    """The table's rows: the first DAPO run, every method (its runs pooled), the last DAPO run; ratios to the
    median over all DAPO steps (every DAPO run). `runs`: in run order, as `run` returns them."""
    dapo = [r for r in runs if r["method"] == BASELINE and "error" not in r]
    if not dapo:
        raise SystemExit(f"no {BASELINE} run succeeded: no baseline to divide by")
    base_step = median(_step_values(dapo, lambda m: m["time/step_s"]))
    base_ng = median(_step_values(dapo, _no_grad_s))
    base_upd = median(_step_values(dapo, lambda m: m["time/update_s"]))
    base_fwd = _per_mb(dapo, "no_grad")
    base_peak = _peak(dapo)

    def row(label: str, name: str, group: list[dict]) -> dict:
        ok = [r for r in group if "error" not in r]
        d = declared_by.get(name, {})
        out = {"label": label, "method": name, "views": d.get("views"), "planned_gib": planned.get(name)}
        if not ok:
            return {**out, "error": "; ".join(r["error"] for r in group)}
        return {
            **out,
            "extra_fwd": _per_mb(ok, "no_grad") - base_fwd,
            "head": _per_mb(ok, "head"),
            "also": _also(d, ok),
            "step": median(_step_values(ok, lambda m: m["time/step_s"])) / base_step,
            "no_grad": median(_step_values(ok, _no_grad_s)) / base_ng,
            "no_grad_own": median(_step_values(ok, lambda m: _no_grad_s(m) / m["time/old_logprob_s"])),
            "update": median(_step_values(ok, lambda m: m["time/update_s"])) / base_upd,
            "peak": _peak(ok) / base_peak,
            "step_s": median(_step_values(ok, lambda m: m["time/step_s"])),
            "steps": sum(len(r["metrics"]) for r in ok),
        }

    dapo_runs = [r for r in runs if r["method"] == BASELINE]
    rows = [row(f"{BASELINE} (first run)", BASELINE, dapo_runs[:1])]
    by_method: dict[str, list[dict]] = {}
    for r in runs:
        if r["method"] != BASELINE:
            by_method.setdefault(r["method"], []).append(r)
    rows += [row(name, name, group) for name, group in by_method.items()]
    if len(dapo_runs) > 1:
        rows.append(row(f"{BASELINE} (last run)", BASELINE, dapo_runs[-1:]))
    return rows


HEADER = (
    "| method | views | extra no-grad fwd / mb (counted) | also returns | LM-head passes / mb | step / DAPO "
    "| no-grad passes / DAPO | no-grad / own clean pass | update / DAPO | peak memory / DAPO "
    "| planned extra at 7B (GiB) |"
)


def markdown_table(rows: list[dict]) -> str:
    lines = [HEADER, "|" + "---|" * HEADER.count(" |")]
    for r in rows:
        views = "-" if r["views"] is None else str(r["views"])
        planned = _fmt(r["planned_gib"])
        if "error" in r:
            lines.append(f"| `{r['label']}` | {views} | failed: {r['error']} | | | | | | | | {planned} |")
            continue
        cells = [
            f"`{r['label']}`", views, _fmt(r["extra_fwd"], ".2g"), r["also"], _fmt(r["head"], ".2g"),
            _fmt(r["step"]), _fmt(r["no_grad"]), _fmt(r["no_grad_own"]), _fmt(r["update"]), _fmt(r["peak"]),
            planned,
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def machine() -> str:
    import torch

    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)} GPU"
    return f"{os.cpu_count()}-core CPU ({platform.machine()}), no GPU"


def report(
    rows: list[dict], runs: list[dict], *, steps: int, nproc: int, command: str, load: tuple[float, float]
) -> str:
    """The markdown the README holds: the command, the machine, the date, the table and what it measured."""
    dapo_s = [r["step_s"] for r in rows if r["method"] == BASELINE and "step_s" in r]
    peak = _peak([r for r in runs if r["method"] == BASELINE and "error" not in r])
    when = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        f"`{command}` on a {machine()}, {when}: tiny Qwen2.5-VL, {nproc} process(es), 4 prompts x G=4 per step, "
        f"max 24 new tokens, micro-batch 8, `optimizer.lr=0` (identical rollouts); {len(runs)} runs, steps "
        f"2..{steps} of each (medians). DAPO: median step "
        + ", ".join(f"{s:.2f} s" for s in dapo_s)
        + f" (first and last run: their ratios show the machine's drift over the run), peak memory {peak:.2f} GiB; "
        f"load average {load[0]:.1f} at the start, {load[1]:.1f} at the end.",
        "",
        markdown_table(rows),
    ]
    return "\n".join(lines)


def update_readme(text: str, section: str) -> str:
    """README text with the generated part between the markers replaced by `section`."""
    head, found, rest = text.partition(README_BEGIN)
    _, found_end, tail = rest.partition(README_END)
    if not (found and found_end):
        raise SystemExit(f"{README}: markers {README_BEGIN!r} ... {README_END!r} not found")
    return f"{head}{README_BEGIN}\n{section}\n{README_END}{tail}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--steps", type=int, default=3, help="RL steps per run (the first is dropped)")
    ap.add_argument("--nproc", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=1, help="rounds of DAPO, every method, DAPO")
    ap.add_argument("--methods", nargs="*", default=None, help="only these (default: every built-in method)")
    ap.add_argument("--keep", type=Path, default=None, help="folder to keep the runs in (default: a temp dir)")
    ap.add_argument("--update-readme", action="store_true", help=f"write the table into {README.relative_to(ROOT)}")
    args = ap.parse_args()
    if args.steps < 2:
        raise SystemExit("--steps must be >= 2 (the first step is dropped as warm-up)")
    names = method_names()
    if args.methods:
        unknown = set(args.methods) - set(names)
        if unknown:
            raise SystemExit(f"unknown method(s) {sorted(unknown)}; built-in: {', '.join(names)}")
        names = [n for n in names if n in args.methods or n == BASELINE]
    declared_by: dict[str, dict] = {}
    planned: dict[str, float | None] = {}
    for n in names:
        try:
            declared_by[n] = declared(n, args.nproc)
        except Exception as e:  # a config the recipe refuses: its run fails with the reason, in the table
            print(f"config of {n}: {type(e).__name__}: {e}", file=sys.stderr)
        try:
            planned[n] = planned_extra_gib(n)
        except Exception as e:  # a config the planner cannot size: the column says n/a, the reason goes to stderr
            print(f"plan of {n} at 7B: {type(e).__name__}: {e}", file=sys.stderr)
            planned[n] = None
    runs = []
    load_start = os.getloadavg()[0]  # the 1-minute load average: how busy the machine was around the runs
    with tempfile.TemporaryDirectory() as tmp:
        root = args.keep or Path(tmp)
        root.mkdir(parents=True, exist_ok=True)
        ckpt, task = build_assets(root)
        for i, name in enumerate(run_order(names, args.repeats)):
            r = run(name, root, ckpt, task, steps=args.steps, nproc=args.nproc, tag=f"_{i}")
            status = r["error"] if "error" in r else f"{median(m['time/step_s'] for m in r['metrics']):.2f} s/step"
            print(f"[{i + 1}] {name}: {status}", file=sys.stderr, flush=True)
            if "error" in r:
                print(r["stderr"], file=sys.stderr)
            runs.append(r)
    rows = table_rows(runs, declared_by, planned)
    flags = [f"--{k} {v}" for k, v in (("steps", args.steps), ("nproc", args.nproc), ("repeats", args.repeats))]
    defaults = ap.parse_args([])
    flags = [f for f, k in zip(flags, ("steps", "nproc", "repeats")) if getattr(args, k) != getattr(defaults, k)]
    flags += ["--methods " + " ".join(args.methods)] if args.methods else []
    command = " ".join([f"python {HERE.relative_to(ROOT)}", *flags])
    load = (load_start, os.getloadavg()[0])
    section = report(rows, runs, steps=args.steps, nproc=args.nproc, command=command, load=load)
    print("\n" + section)
    if args.update_readme:
        README.write_text(update_readme(README.read_text(), section))
        print(f"\nwritten into {README.relative_to(ROOT)}")


if __name__ == "__main__":
    worker() if os.environ.get(COUNT_ENV) else main()
