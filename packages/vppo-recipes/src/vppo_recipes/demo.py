"""The CPU demo: a tiny Qwen2.5-VL learns a visual task with VPPO, DAPO and GRPO, in minutes, no GPU, no downloads.

    python -m vppo_recipes.demo --out out/demo            # `nox -s demo` runs exactly this
    python -m vppo_recipes.demo --out /tmp/d --quick      # smoke version (1 seed, 2 RL steps; the test uses it)

What it does, in order (every stage is the real library code a user would run):

1. `vppo_eval.build_visual_task`: coloured shapes on a 2 x 2 grid; questions only the image can answer.
2. `vppo_rollout.build_tiny_checkpoint`: a randomly initialised, real Qwen2.5-VL (transformers classes, tiny sizes).
3. SFT warm start with the shipped SFT recipe (`vppo-recipes run sft_distributed --nproc_per_node 2`,
   i.e. `tune run`): teaches the `<think>...</think> \\boxed{answer}` format and part of the task.
4. Held-out avg@k of the warm start (`vppo_eval.evaluate`, temperature 1.0, top-p 1.0).
5. For each algorithm x seed: the shipped RL recipe under `tune run --nproc_per_node 2`, all from the same warm
   start and in the same data order (`data.shuffle=false`: the task is generated in random order already), so the
   seed changes only the sampling and the perturbation masks. The recipe validates held-out avg@k every
   `eval_every` steps on the same held-out rows as stage 4.
6. Outputs in `--out`: learning curves (`curves.png`), the token / trajectory visual dependency histograms and an
   HTML page of responses shaded by dependency (`vppo_eval.report`, on the final VPPO model of the first seed),
   `summary.md` + `summary.json` (before/after held-out accuracy per algorithm, mean ± std over seeds), and
   `work/` with every run's config, metrics.jsonl and log.

Why these settings (probe runs while building the demo; single-process SFT, greedy accuracy on 96 held-out items):
with the default 56 px canvas each grid cell is ONE visual token and the tiny decoder stayed at chance on every
question family within 150-200 SFT steps (also with a 4x larger model, or with lr 1e-2). At 112 px (2 x 2 visual tokens
per cell) the colour-in-a-corner question was learned, and clearly so only after lowering the decoder's rope_theta
to 10 (see `set_rope_theta`): 0.69 after 400 steps, vs 0.41 after 300 steps with theta 1e6. The demo therefore uses the "colour"
family only ("What colour is the shape in the top-left corner?", 4 answers: chance 25 %, text alone cannot beat it).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vppo_recipes.offline import OFFLINE_ENV

__all__ = ["DemoSettings", "main", "run_demo"]

ALGORITHMS = ("vppo", "dapo", "grpo")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo; `full()` is what `nox -s demo` runs, `quick()` the smoke test.

    tasks / image_size / n_train / n_test: the synthetic task (vppo_eval.synthetic.build_visual_task).
    rope_theta: the tiny decoder's M-RoPE base (None: build_tiny_checkpoint's 1e6, the real models' value); see
        `set_rope_theta` for why the demo lowers it.
    sft_steps, sft_lr: SFT warm start (batch 16). rl_steps, eval_every: RL steps per run and validation interval.
    k: samples per held-out item (avg@k). n_eval: held-out items scored (the first n_eval test rows).
    rl_lr: RL learning rate (the tiny model needs far more than the 7B's 1e-6).
    group_size, batch_prompts, update_prompts: rollout G, prompts per RL step, prompts per optimizer step.
    max_new_tokens: response budget (the SFT answer is ~20 tokens).
    dependency_prompts: held-out prompts whose responses feed the dependency histograms / HTML page.
    """

    algorithms: tuple[str, ...] = ALGORITHMS
    seeds: tuple[int, ...] = (0, 1, 2)
    tasks: tuple[str, ...] = ("colour",)
    image_size: int = 112
    n_train: int = 2048
    n_test: int = 64
    model_seed: int = 0
    rope_theta: float | None = 10.0
    sft_steps: int = 400
    sft_lr: float = 3e-3
    rl_steps: int = 15
    eval_every: int = 5
    rl_lr: float = 1e-3
    k: int = 4
    n_eval: int = 64
    group_size: int = 8
    batch_prompts: int = 8
    update_prompts: int = 4
    max_new_tokens: int = 24
    dependency_prompts: int = 16

    @classmethod
    def full(cls) -> DemoSettings:
        return cls()

    @classmethod
    def quick(cls) -> DemoSettings:
        """Smoke version: every stage runs, on the smallest sizes (numbers are meaningless)."""
        return cls(
            seeds=(0,),
            n_train=64,
            n_test=8,
            sft_steps=3,
            rl_steps=2,
            eval_every=2,
            k=2,
            n_eval=8,
            group_size=4,
            batch_prompts=2,
            update_prompts=2,
            max_new_tokens=16,
            dependency_prompts=2,
        )

    def check(self) -> None:
        unknown = [a for a in self.algorithms if a not in ("vppo", "dapo", "grpo", "pgpo")]
        if not self.algorithms or unknown:
            raise ValueError(f"algorithms: expected a non-empty subset of vppo,dapo,grpo,pgpo, got {self.algorithms}")
        if not self.seeds:
            raise ValueError("seeds: give at least one seed (e.g. --seeds 0,1,2)")
        if self.rl_steps < 1 or self.eval_every < 1 or self.rl_steps % self.eval_every:
            raise ValueError(
                f"rl_steps ({self.rl_steps}) must be a positive multiple of eval_every ({self.eval_every}), so the "
                "last step is validated"
            )
        if self.n_eval > self.n_test:
            raise ValueError(f"n_eval ({self.n_eval}) must be <= n_test ({self.n_test})")


# ------------------------------------------------------------------------------------------------ subprocesses


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update(OFFLINE_ENV)
    return env


def run_recipe(recipe: str, config: str, overrides: Sequence[str], *, cwd: Path, log: Path, nproc: int = 2) -> None:
    """`vppo-recipes run RECIPE --nproc_per_node N --config CONFIG k=v...` (i.e. `tune run`) with this interpreter.

    Output goes to `log`; on failure raises RuntimeError with the log's tail, so the demo never goes on silently.
    """
    cmd = [sys.executable, "-m", "vppo_recipes.cli", "run", recipe, "--nproc_per_node", str(nproc)]
    cmd += ["--config", config, *overrides]
    log.parent.mkdir(parents=True, exist_ok=True)
    with log.open("w") as fh:
        fh.write("$ " + " ".join(cmd) + "\n")
        fh.flush()
        rc = subprocess.call(cmd, cwd=cwd, env=_env(), stdout=fh, stderr=subprocess.STDOUT)
    if rc != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-40:])
        raise RuntimeError(f"{recipe} ({config}) failed with exit code {rc}; log: {log}\n--- last lines ---\n{tail}")


# ------------------------------------------------------------------------------------------------ stages


def build_assets(work: Path, s: DemoSettings) -> tuple[Path, Path]:
    """The synthetic task and the tiny random Qwen2.5-VL -> (task folder, checkpoint folder)."""
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.tiny import build_tiny_checkpoint

    task = work / "visual_task"
    build_visual_task(task, n_train=s.n_train, n_test=s.n_test, seed=0, image_size=s.image_size, tasks=s.tasks)
    ckpt = Path(build_tiny_checkpoint(work / "tiny_ckpt", "qwen2_5_vl", seed=s.model_seed))
    if s.rope_theta is not None:
        set_rope_theta(ckpt, s.rope_theta)
    return task, ckpt


def set_rope_theta(ckpt: Path, theta: float) -> None:
    """Set the text model's rope_theta in a checkpoint's config.json (weights are unaffected: RoPE has none).

    Why: M-RoPE gives the first `mrope_section[0]` frequency pairs (the fastest-rotating) to the temporal axis and
    the slower ones to height and width. With the tiny model's head_dim 16 (sections [2, 3, 3]) and theta 1e6, the
    height/width frequencies are <= 0.03 rad per grid step, so the decoder can hardly tell the four corners apart;
    with theta 10 they are 0.13..0.56 rad. In the probe runs for this demo, the decoder only learned the
    colour-in-a-corner question clearly above chance with the lower theta.
    """
    path = ckpt / "config.json"
    cfg = json.loads(path.read_text())
    text = cfg.get("text_config", cfg)
    params = text.get("rope_parameters") or {}
    params["rope_theta"] = float(theta)
    text["rope_parameters"] = params
    path.write_text(json.dumps(cfg, indent=2) + "\n")


def sft_warm_start(work: Path, task: Path, ckpt: Path, s: DemoSettings) -> Path:
    """The shipped SFT recipe (2 processes) from the random checkpoint -> the warm-start checkpoint folder."""
    out = work / "sft"
    shutil.rmtree(out, ignore_errors=True)  # resume=auto would otherwise continue a previous demo's run
    run_recipe(
        "sft_distributed",
        "tiny_sft",
        [
            f"output_dir={out}",
            f"model.path={ckpt}",
            f"data.source={task}",
            f"training.max_steps={s.sft_steps}",
            f"optimizer.lr={s.sft_lr}",
            "training.save_every_n_steps=0",
        ],
        cwd=work,
        log=work / "logs" / "sft.log",
    )
    final = out / "checkpoints" / f"step_{s.sft_steps:06d}"
    if not final.is_dir():
        raise RuntimeError(f"the SFT recipe finished but wrote no {final}; see {work / 'logs' / 'sft.log'}")
    return final


def heldout_records(task: Path, n: int) -> list:
    """The first `n` test rows as vppo_eval Records, read exactly as the RL recipe's validation reads them."""
    from vppo_eval.records import Record
    from vppo_recipes.data import DEFAULT_COLUMNS, SkipRow, VisualQADataset

    ds = VisualQADataset.from_source(task, "test", dict(DEFAULT_COLUMNS))
    records = []
    for row in range(len(ds)):
        if len(records) >= n:
            break
        try:
            ex = ds.example(row)
        except SkipRow:
            continue
        records.append(Record(id=str(row), question=ex.question, images=ex.images, answer=ex.answer))
    return records


def evaluate_checkpoint(ckpt: Path, records: list, s: DemoSettings, *, seed: int = 0) -> dict[str, float]:
    """Held-out avg@k of a checkpoint (temperature 1.0, top-p 1.0: the recipe's validation settings)."""
    import torch

    from vppo_eval.evaluate import evaluate
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.transformers_engine import TransformersSampler

    torch.set_num_threads(2)
    processor = load_processor(ckpt)
    model = load_policy(ckpt)
    res = evaluate(
        TransformersSampler(model, processor, batch_size=64),
        {"validation": records},
        processor=processor,
        k=s.k,
        temperature=1.0,
        top_p=1.0,
        max_new_tokens=s.max_new_tokens,
        seed=seed,
        progress=False,
    )
    b = res.benchmarks["validation"]
    return {"avg_at_k": float(b.avg_at_k), "format_rate": float(b.format_rate), "items": int(b.n_items)}


def rl_run(algo: str, seed: int, work: Path, task: Path, warm: Path, s: DemoSettings) -> list[dict[str, Any]]:
    """One RL run of the shipped recipe from the warm start -> its metrics.jsonl rows (one per step)."""
    from vppo_recipes.metric_logging import read_jsonl

    out = work / "rl" / f"{algo}_seed{seed}"
    shutil.rmtree(out, ignore_errors=True)
    overrides = [
        f"output_dir={out}",
        f"seed={seed}",
        f"model.path={warm}",
        f"data.source={task}",
        "data.shuffle=false",  # same data order for every run; the seed drives sampling and perturbations only
        f"validation.source={task}",
        f"validation.every_n_steps={s.eval_every}",
        f"validation.k={s.k}",
        f"validation.limit={s.n_eval}",
        f"rollout.group_size={s.group_size}",
        f"rollout.batch_prompts={s.batch_prompts}",
        f"rollout.max_new_tokens={s.max_new_tokens}",
        f"batch.update_prompts={s.update_prompts}",
        f"optimizer.lr={s.rl_lr}",
        f"training.max_steps={s.rl_steps}",
        "training.save_every_n_steps=0",  # the final step is always saved
    ]
    run_recipe("rl_distributed", f"tiny_{algo}", overrides, cwd=work, log=work / "logs" / f"rl_{algo}_seed{seed}.log")
    return list(read_jsonl(out / "logs" / "metrics.jsonl"))


# ------------------------------------------------------------------------------------------------ aggregation


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def curves(runs: dict[str, dict[int, list[dict]]], key: str) -> dict[str, dict[int, list[float]]]:
    """algo -> step -> values over seeds of metric `key` (steps where it was logged)."""
    out: dict[str, dict[int, list[float]]] = {}
    for algo, by_seed in runs.items():
        steps: dict[int, list[float]] = {}
        for rows in by_seed.values():
            for r in rows:
                v = r.get(key)
                if isinstance(v, (int, float)) and not math.isnan(v):
                    steps.setdefault(int(r["step"]), []).append(float(v))
        out[algo] = dict(sorted(steps.items()))
    return out


def summarize(runs, before: dict[str, float], s: DemoSettings, wall: dict[str, float]) -> dict[str, Any]:
    """summary.json content: warm start, per-algorithm final held-out avg@k over seeds, timings."""
    key = f"validation/avg@{s.k}"
    table = {}
    for algo, by_seed in runs.items():
        finals = {}
        for seed, rows in by_seed.items():
            vals = [r[key] for r in rows if key in r and r["step"] == s.rl_steps]
            finals[seed] = float(vals[-1]) if vals else math.nan
        m, sd = _mean_std(list(finals.values()))
        rew = curves({algo: by_seed}, "reward/accuracy")[algo]
        table[algo] = {
            "final_avg_at_k_mean": m,
            "final_avg_at_k_std": sd,
            "final_avg_at_k_per_seed": {str(k): v for k, v in finals.items()},
            "gain_over_warm_start": m - before["avg_at_k"],
            "train_accuracy_first_step_mean": _mean_std(rew.get(min(rew), []))[0] if rew else math.nan,
            "train_accuracy_last_step_mean": _mean_std(rew.get(max(rew), []))[0] if rew else math.nan,
            "wall_s_total": wall.get(algo, math.nan),
        }
    return {
        "settings": dataclasses.asdict(s),
        "metric": f"held-out avg@{s.k} over {s.n_eval} items (temperature 1.0, top-p 1.0)",
        "chance": 0.25 if tuple(s.tasks) in (("colour",), ("count",)) else None,
        "warm_start": before,
        "algorithms": table,
        "wall_s": wall,
    }


def verdict(summary: dict[str, Any]) -> str:
    """One honest sentence: did VPPO beat the baselines beyond the seed spread, at this scale?"""
    t = summary["algorithms"]
    if "vppo" not in t or len(t) < 2:
        return "Only one algorithm was run; no comparison."
    v = t["vppo"]
    others = {a: r for a, r in t.items() if a != "vppo"}
    best_name, best = max(others.items(), key=lambda kv: kv[1]["final_avg_at_k_mean"])
    diff = v["final_avg_at_k_mean"] - best["final_avg_at_k_mean"]
    spread = max(v["final_avg_at_k_std"], best["final_avg_at_k_std"])
    n = len(v["final_avg_at_k_per_seed"])
    head = (
        f"VPPO ends at {100 * v['final_avg_at_k_mean']:.1f} % vs {100 * best['final_avg_at_k_mean']:.1f} % for the best "
        f"baseline ({best_name.upper()}), a difference of {100 * diff:+.1f} points over {n} seed(s) "
    )
    if n < 2:
        return head + "- one seed cannot separate algorithms; run with more seeds."
    if abs(diff) <= spread:
        return (
            head
            + f"- within the seed spread (std up to {100 * spread:.1f} points): no demonstrated difference at this scale."
        )
    if diff > 0:
        return (
            head
            + f"- larger than the seed spread (std up to {100 * spread:.1f} points): VPPO was ahead here (few-seed comparison, not a significance test)."
        )
    return (
        head
        + f"- larger than the seed spread (std up to {100 * spread:.1f} points), in the baselines' favour: VPPO did not beat them here (not a significance test)."
    )


def _pct(x: float) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def _where(machine: dict | None) -> str:
    if not machine:
        return ""
    return f" on {machine['cpu_count']} CPU cores (1-min load average at the end: {machine['load_avg_1m_at_end']})"


def summary_markdown(summary: dict[str, Any]) -> str:
    s = summary["settings"]
    w = summary["warm_start"]
    lines = [
        "# vppo CPU demo: summary",
        "",
        f"Task: synthetic `{'/'.join(s['tasks'])}` questions on a {s['image_size']} px 2 x 2 grid "
        f"(chance {_pct(summary['chance']) if summary['chance'] else '?'} %); tiny random Qwen2.5-VL, SFT warm start "
        f"({s['sft_steps']} steps), then {s['rl_steps']} RL steps per run (G={s['group_size']}, "
        f"{s['batch_prompts']} prompts/step) under `tune run --nproc_per_node 2`, seeds {list(s['seeds'])}.",
        f"Metric: {summary['metric']}.",
        "",
        "| | held-out avg@k before RL (%) | after RL, mean ± std over seeds (%) | per seed (%) | gain (points) |",
        "|---|---|---|---|---|",
    ]
    for algo, r in summary["algorithms"].items():
        per = ", ".join(_pct(v) for v in r["final_avg_at_k_per_seed"].values())
        lines.append(
            f"| {algo.upper()} | {_pct(w['avg_at_k'])} | {_pct(r['final_avg_at_k_mean'])} ± "
            f"{_pct(r['final_avg_at_k_std'])} | {per} | {100 * r['gain_over_warm_start']:+.1f} |"
        )
    lines += [
        "",
        verdict(summary),
        "",
        f"Wall time{_where(summary.get('machine'))}, seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in summary["wall_s"].items()),
    ]
    dep = summary.get("dependency")
    if dep:
        lines += [
            "",
            f"Visual dependency of the final model `{summary.get('dependency_model', '?')}` ({dep['n_responses']} responses, {dep['n_tokens']} tokens): "
            f"the top 10 % of tokens hold {_pct(dep['top10_share'])} % of the total dependency; median token "
            f"S = {dep['median']:.3g}, p90 = {dep['p90']:.3g}, max = {dep['max']:.3g}.",
        ]
    lines += ["", "Plots: `curves.png`, `dependency_hist.png`; responses shaded by dependency: `dependency.html`.", ""]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ plots


def plot_curves(runs, before: dict[str, float], s: DemoSettings, path: Path) -> Path:
    """Held-out avg@k and train accuracy vs RL step: mean over seeds, shaded min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    colours = {"vppo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green", "pgpo": "tab:purple"}
    fig, (ax_val, ax_rew) = plt.subplots(1, 2, figsize=(11, 4))
    panels = (
        (ax_val, f"validation/avg@{s.k}", f"held-out avg@{s.k} ({s.n_eval} items)", True),
        (
            ax_rew,
            "reward/accuracy",
            "train accuracy of the groups trained on\n(VPPO/DAPO drop all-correct / all-wrong groups first)",
            False,
        ),
    )
    for ax, key, title, with_start in panels:
        for algo, by_step in curves(runs, key).items():
            steps = sorted(by_step)
            if with_start:
                steps = [0, *steps]
                by_step = {0: [before["avg_at_k"]], **by_step}
            mean = [sum(by_step[t]) / len(by_step[t]) for t in steps]
            lo = [min(by_step[t]) for t in steps]
            hi = [max(by_step[t]) for t in steps]
            c = colours.get(algo)
            ax.plot(steps, mean, marker="o", ms=3, color=c, label=f"{algo.upper()} (mean of {len(runs[algo])} seeds)")
            ax.fill_between(steps, lo, hi, color=c, alpha=0.15, lw=0)
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    ax_val.axhline(before["avg_at_k"], color="k", ls=":", lw=1, label="SFT warm start")
    ax_val.set_ylabel("accuracy")
    ax_val.legend(fontsize=8)
    fig.suptitle("Tiny Qwen2.5-VL on the synthetic visual task (CPU); band = min..max over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def dependency_report(ckpt: Path, records: list, s: DemoSettings, out: Path) -> dict[str, Any]:
    """Token / trajectory visual dependency of responses sampled from `ckpt` (the paper's Fig. 1, toy scale)."""
    import torch

    from vppo_eval.report import dependency_analysis, write_dependency_report
    from vppo_eval.reward import compute_rewards
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.prompts import build_prompt
    from vppo_rollout.sampling import SamplingConfig
    from vppo_rollout.transformers_engine import TransformersSampler

    torch.set_num_threads(2)
    processor = load_processor(ckpt)
    model = load_policy(ckpt)
    recs = records[: s.dependency_prompts]
    prompts = [build_prompt(processor, r.question, r.images) for r in recs]
    n = 2
    rollouts = TransformersSampler(model, processor).sample(
        prompts, n, SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=s.max_new_tokens, seed=0)
    )
    keep = [i for i, ids in enumerate(rollouts.token_ids) if ids]
    answers = [recs[rollouts.group_index[i]].answer for i in keep]
    rewards = compute_rewards([rollouts.texts[i] for i in keep], answers)["accuracy"]
    analysis = dependency_analysis(
        model,
        processor,
        [prompts[rollouts.group_index[i]] for i in keep],
        [rollouts.token_ids[i] for i in keep],
        estimator="sampled",
        perturbation="blacken",
        seed=0,
    )
    headers = [
        f"Q: {recs[rollouts.group_index[i]].question}   answer: {a}   correct: {bool(r)}"
        for i, a, r in zip(keep, answers, rewards)
    ]
    write_dependency_report(analysis, out, headers=headers)
    return analysis.summary()


# ------------------------------------------------------------------------------------------------ main


def run_demo(out: Path, s: DemoSettings) -> dict[str, Any]:
    """All stages; returns the summary dict (also written to `out/summary.json`)."""
    from tqdm import tqdm

    s.check()
    out = out.resolve()
    work = out / "work"
    work.mkdir(parents=True, exist_ok=True)
    wall: dict[str, float] = {}
    t_all = time.perf_counter()

    stages = tqdm(total=3 + len(s.algorithms) * len(s.seeds) + 1, desc="demo", unit="stage")

    def stage(name: str, fn, *args):
        stages.set_postfix_str(name)
        t = time.perf_counter()
        value = fn(*args)
        wall[name] = time.perf_counter() - t
        stages.update(1)
        return value

    task, ckpt = stage("build task + tiny model", build_assets, work, s)
    warm = stage("sft", sft_warm_start, work, task, ckpt, s)
    records = heldout_records(task, s.n_eval)
    before = stage("eval warm start", evaluate_checkpoint, warm, records, s)
    tqdm.write(
        f"warm start: held-out avg@{s.k} = {_pct(before['avg_at_k'])} % (format {_pct(before['format_rate'])} %)"
    )

    runs: dict[str, dict[int, list[dict]]] = {a: {} for a in s.algorithms}
    for seed in s.seeds:  # seed-major: an interrupted demo still has every algorithm at the first seeds
        for algo in s.algorithms:
            rows = stage(f"rl {algo} seed {seed}", rl_run, algo, seed, work, task, warm, s)
            runs[algo][seed] = rows
            final = [r.get(f"validation/avg@{s.k}") for r in rows if r["step"] == s.rl_steps]
            tqdm.write(
                f"{algo} seed {seed}: held-out avg@{s.k} after {s.rl_steps} steps = {_pct(final[-1]) if final else 'n/a'} %"
            )
    for algo in s.algorithms:
        wall[algo] = sum(v for k, v in wall.items() if k.startswith(f"rl {algo} "))

    dep_algo = "vppo" if "vppo" in s.algorithms else s.algorithms[0]
    dep_model = work / "rl" / f"{dep_algo}_seed{s.seeds[0]}" / "checkpoints" / f"step_{s.rl_steps:06d}"
    dep = stage("dependency report", dependency_report, dep_model, records, s, out)
    stages.close()
    wall["total"] = time.perf_counter() - t_all
    machine = {"cpu_count": os.cpu_count(), "load_avg_1m_at_end": round(os.getloadavg()[0], 2)}
    return write_outputs(out, runs, before, s, wall, dep, dep_model.relative_to(out), machine)


def write_outputs(out: Path, runs, before, s: DemoSettings, wall, dep, dep_model: Path, machine=None) -> dict[str, Any]:
    """curves.png, summary.json, summary.md from the collected results (the dependency files are already written)."""
    plot_curves(runs, before, s, out / "curves.png")
    summary = summarize(runs, before, s, wall)
    summary["dependency"] = dep
    summary["dependency_model"] = str(dep_model)
    summary["machine"] = machine
    summary["verdict"] = verdict(summary)
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(summary_markdown(summary))
    print(summary_markdown(summary))
    print(f"Demo outputs in {out}: summary.md, summary.json, curves.png, dependency_hist.png, dependency.html")
    return summary


def replot(out: Path) -> dict[str, Any]:
    """Rebuild curves.png and summary.{md,json} of a finished demo from its files (no training, no evaluation)."""
    from vppo_recipes.metric_logging import read_jsonl

    out = out.resolve()
    old = json.loads((out / "summary.json").read_text())
    fields = {f.name for f in dataclasses.fields(DemoSettings)}
    s = DemoSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in old["settings"].items() if k in fields})
    runs = {
        a: {
            seed: list(read_jsonl(out / "work" / "rl" / f"{a}_seed{seed}" / "logs" / "metrics.jsonl"))
            for seed in s.seeds
        }
        for a in s.algorithms
    }
    return write_outputs(
        out,
        runs,
        old["warm_start"],
        s,
        old["wall_s"],
        old["dependency"],
        Path(old["dependency_model"]),
        old.get("machine"),
    )


def copy_outputs(out: Path, dest: Path) -> None:
    """Copy the shareable outputs (plots, HTML, summaries; not work/) to `dest`, e.g. docs/demo/."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (
        "curves.png",
        "dependency_hist.png",
        "dependency.html",
        "dependency.json",
        "summary.md",
        "summary.json",
    ):
        if (out / name).is_file():
            shutil.copyfile(out / name, dest / name)
    print(f"Copied the demo outputs to {dest}")


def _ints(text: str) -> tuple[int, ...]:
    return tuple(int(x) for x in text.split(",") if x.strip())


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vppo_recipes.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (plots, summary, work/ with every run)")
    p.add_argument("--quick", action="store_true", help="smoke version: 1 seed, 2 RL steps, tiny sizes")
    p.add_argument("--algorithms", help="comma list of vppo,dapo,grpo,pgpo (default vppo,dapo,grpo)")
    p.add_argument("--seeds", help="comma list of RL seeds (default 0,1,2)")
    p.add_argument("--rl-steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--sft-steps", type=int)
    p.add_argument("--replot", action="store_true", help="only rebuild plots + summary of a finished --out folder")
    p.add_argument("--copy-to", type=Path, help="also copy plots, HTML and summaries here (e.g. docs/demo)")
    args = p.parse_args(argv)
    if args.replot:
        replot(args.out)
        if args.copy_to:
            copy_outputs(args.out.resolve(), args.copy_to)
        return 0
    s = DemoSettings.quick() if args.quick else DemoSettings.full()
    changes: dict[str, Any] = {}
    if args.algorithms:
        changes["algorithms"] = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
    if args.seeds:
        changes["seeds"] = _ints(args.seeds)
    for name in ("rl_steps", "eval_every", "sft_steps"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    s = dataclasses.replace(s, **changes)
    run_demo(args.out, s)
    if args.copy_to:
        copy_outputs(args.out.resolve(), args.copy_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
