"""The CPU demo's results: each RL run's logs (`RunResult`), their aggregation over seeds and items into
`summary.json` (`summarize`, with the paired bootstrap intervals and the verdict), and `summary.md`."""

from __future__ import annotations

import dataclasses
import math
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vppo_recipes.demo_settings import DemoSettings


@dataclasses.dataclass(frozen=True)
class RunResult:
    """One RL run's logs: metrics rows (one per step), step -> item id -> held-out accuracy, and the final model's
    `response_anatomy` (None until measured)."""

    rows: list[dict[str, Any]]
    items: dict[int, dict[str, float]]
    anatomy: dict[str, float] | None = None


def untrained_runs(runs: dict[str, dict[int, RunResult]]) -> list[str]:
    """One warning per run that took no optimizer step (its numbers are its warm start's, not training's), worded
    by the RL recipe's `no_update_warning` from the run's last metrics row; [] when every run trained."""
    from vppo_recipes.rl.rl_distributed import no_update_warning

    warnings = []
    for algo, by_seed in runs.items():
        for seed, run in by_seed.items():
            last = run.rows[-1] if run.rows else {}
            totals = {k.removeprefix("total/"): v for k, v in last.items() if k.startswith("total/")}
            said = no_update_warning(int(last.get("step", 0)), int(last.get("optimizer_steps", 0)), totals)
            if said:
                warnings.append(f"{algo.upper()} seed {seed}: {said}")
    return warnings


# ------------------------------------------------------------------------------------------------ aggregation

# "Steps to reach a level": the first validated step at least this far above the warm start (and, separately, the
# step that beats the text-only ceiling).
GAIN_LEVEL = 0.05

# Per-step diagnostics averaged over seeds into summary.json and diagnostics.png (logged by the RL recipe).
DIAGNOSTICS = {
    "tgf/selected_fraction": "fraction of response tokens TGF keeps (VPPO)",
    "diag/pg_share_on_dependent_tokens": "share of the uniform-credit policy gradient on the 40 % most dependent tokens",
    "tas/alpha_std": "spread (std) of TAS's alpha over responses (VPPO)",
    "actor/entropy": "mean sampled-token NLL of the policy (entropy estimate)",
    "dependency/token_mean": "mean token visual dependency S",
    "reward/accuracy": "train accuracy of the groups trained on",
}


def _mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [x for x in xs if x is not None and not math.isnan(x)]
    if not xs:
        return math.nan, math.nan
    m = sum(xs) / len(xs)
    sd = math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1)) if len(xs) > 1 else 0.0
    return m, sd


def curves(runs: dict[str, dict[int, RunResult]], key: str) -> dict[str, dict[int, list[float]]]:
    """algo -> step -> values over seeds of metric `key` (steps where it was logged)."""
    out: dict[str, dict[int, list[float]]] = {}
    for algo, by_seed in runs.items():
        steps: dict[int, list[float]] = {}
        for run in by_seed.values():
            for r in run.rows:
                v = r.get(key)
                if isinstance(v, (int, float)) and not math.isnan(v):
                    steps.setdefault(int(r["step"]), []).append(float(v))
        out[algo] = dict(sorted(steps.items()))
    return out


def _hint(question: str) -> str | None:
    marker = "Hint: it is often "
    return question.split(marker, 1)[1].rstrip(".").strip() if marker in question else None


def item_grid(runs: dict[int, RunResult], ids: Sequence[str], step: int) -> list[list[float]]:
    """[seeds, items] held-out accuracy of one algorithm's runs at `step` (seeds in the runs' order)."""
    grid = []
    for seed, run in runs.items():
        scores = run.items.get(step)
        if scores is None or any(i not in scores for i in ids):
            raise ValueError(f"seed {seed}: no held-out score of every item at step {step}; was the run cut short?")
        grid.append([scores[i] for i in ids])
    return grid


def auc_grid(runs: dict[int, RunResult], before_items: dict[str, float], ids: Sequence[str], s: DemoSettings):
    """[seeds, items] area under each item's held-out curve (step 0 = the warm start), as a mean level."""
    from vppo_eval.stats import area_under_curve

    steps = [0, *range(s.eval_every, s.rl_steps + 1, s.eval_every)]
    per_step = {t: item_grid(runs, ids, t) for t in steps[1:]}
    grid = []
    for row in range(len(runs)):
        grid.append(
            [
                area_under_curve(steps, [before_items[i]] + [per_step[t][row][col] for t in steps[1:]])
                for col, i in enumerate(ids)
            ]
        )
    return grid


def _paired(a, b, s: DemoSettings) -> dict[str, float]:
    from vppo_eval.stats import paired_difference

    d = paired_difference(a, b, n_boot=s.n_boot, seed=0)
    return {"mean": d.mean, "low": d.low, "high": d.high, "confidence": d.confidence, "n_boot": d.n_boot}


def summarize(
    runs: dict[str, dict[int, RunResult]], before: dict[str, Any], records: list, s: DemoSettings
) -> dict[str, Any]:
    """summary.json content (deterministic: no wall times): per-algorithm results over seeds, the paired differences
    with their bootstrap intervals, learning speed, the hint split and the per-step diagnostics."""
    from vppo_eval.stats import steps_to_reach

    ids = [r.id for r in records]
    hinted = {r.id: _hint(r.question) == r.answer for r in records}
    guessable = [i for i in ids if hinted[i]]
    needs_image = [i for i in ids if not hinted[i]]
    key = f"validation/avg@{s.k}"
    ceiling = s.text_only_ceiling()
    steps = [0, *range(s.eval_every, s.rl_steps + 1, s.eval_every)]

    def subset_mean(grid, subset):
        cols = [ids.index(i) for i in subset]
        return sum(row[c] for row in grid for c in cols) / (len(grid) * len(cols)) if cols else math.nan

    table, finals, aucs = {}, {}, {}
    for algo, by_seed in runs.items():
        finals[algo] = item_grid(by_seed, ids, s.rl_steps)
        aucs[algo] = auc_grid(by_seed, before["items"], ids, s)
        per_seed_final = [sum(row) / len(row) for row in finals[algo]]
        per_seed_auc = [sum(row) / len(row) for row in aucs[algo]]
        per_seed_curve = [
            [before["avg_at_k"]] + [float(next(r[key] for r in run.rows if r["step"] == t)) for t in steps[1:]]
            for run in by_seed.values()
        ]
        reach = [steps_to_reach(steps, c, ceiling) for c in per_seed_curve] if ceiling else []
        gain_level = before["avg_at_k"] + GAIN_LEVEL
        reach_gain = [steps_to_reach(steps, c, gain_level) for c in per_seed_curve]
        m, sd = _mean_std(per_seed_final)
        am, asd = _mean_std(per_seed_auc)
        table[algo] = {
            "final_avg_at_k_mean": m,
            "final_avg_at_k_std": sd,
            "final_avg_at_k_per_seed": {str(seed): v for seed, v in zip(by_seed, per_seed_final)},
            "gain_over_warm_start": m - before["avg_at_k"],
            "auc_mean": am,
            "auc_std": asd,
            "curve_mean": {str(t): _mean_std([c[j] for c in per_seed_curve])[0] for j, t in enumerate(steps)},
            "steps_to_text_only_ceiling_per_seed": {str(seed): r for seed, r in zip(by_seed, reach)},
            "steps_to_gain_level_per_seed": {str(seed): r for seed, r in zip(by_seed, reach_gain)},
            "anatomy_per_seed": {str(seed): run.anatomy for seed, run in by_seed.items()},
            "final_accuracy_hint_right": subset_mean(finals[algo], guessable),
            "final_accuracy_hint_wrong": subset_mean(finals[algo], needs_image),
            "diagnostics": {
                k: {str(t): _mean_std(v)[0] for t, v in c.items()}
                for k in DIAGNOSTICS
                if (c := curves({algo: by_seed}, k)[algo])
            },
        }
    before_grid = [[before["items"][i] for i in ids]]
    comparisons = {}
    if "vppo" in runs:
        for other in runs:
            if other == "vppo":
                continue
            comparisons[f"vppo-{other}"] = {
                "final": _paired(finals["vppo"], finals[other], s),
                "auc": _paired(aucs["vppo"], aucs[other], s),
            }
    return {
        "settings": dataclasses.asdict(s),
        "commit": _commit(),
        "metric": f"held-out avg@{s.k} over {len(ids)} items (temperature 1.0, top-p 1.0)",
        "chance": s.chance(),
        "text_only_ceiling": ceiling,
        "held_out": {"items": len(ids), "hint_right": len(guessable), "hint_wrong": len(needs_image)},
        "warm_start": {
            "avg_at_k": before["avg_at_k"],
            "format_rate": before["format_rate"],
            "accuracy_hint_right": subset_mean(before_grid, guessable),
            "accuracy_hint_wrong": subset_mean(before_grid, needs_image),
            "anatomy": before.get("anatomy"),
        },
        "algorithms": table,
        "paired_differences": comparisons,
    }


# What the demo's result depends on: the packages' code and the session that installs them, as git pathspecs (not
# docs/ or any markdown file, so committing the regenerated docs/demo files or editing a README does not change the
# commit a fresh clone records).
CODE_PATHS = ("packages", "noxfile.py", ":(exclude)*.md")


def _commit() -> str | None:
    """The last git commit that changed CODE_PATHS (with "+dirty" if they have uncommitted changes), or None
    outside a git checkout."""
    here = Path(__file__).resolve().parent

    def git(*args: str) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=here, capture_output=True, text=True, timeout=30)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    top = git("rev-parse", "--show-toplevel")
    if top is None:
        return None
    paths = [p for p in CODE_PATHS if p.startswith(":") or (Path(top) / p).exists()]
    head = git("-C", top, "log", "-1", "--format=%H", "--", *paths)
    if not head:
        return None
    dirty = git("-C", top, "status", "--porcelain", "--untracked-files=no", "--", *paths)
    return head + ("+dirty" if dirty else "")


def _interval(d: dict[str, float]) -> str:
    return f"{100 * d['mean']:+.1f} points [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"


def verdict(summary: dict[str, Any]) -> str:
    """What the paired 95 % intervals support, whichever way it goes (one sentence per baseline)."""
    comps = summary.get("paired_differences") or {}
    if not comps:
        return "Only one algorithm was run; no comparison."
    n = len(next(iter(summary["algorithms"].values()))["final_avg_at_k_per_seed"])
    parts = []
    for name, c in comps.items():
        other = name.split("-", 1)[1].upper()
        f, a = c["final"], c["auc"]
        if f["low"] > 0:
            said = f"VPPO ends ahead of {other}"
        elif f["high"] < 0:
            said = f"VPPO ends behind {other}"
        else:
            said = f"no difference between VPPO and {other} at the last step is shown"
        if a["low"] > 0:
            speed = "and learns faster (area under the curve)"
        elif a["high"] < 0:
            speed = "and learns slower (area under the curve)"
        else:
            speed = "and no difference in learning speed is shown"
        parts.append(f"{said} ({_interval(f)}) {speed} ({_interval(a)})")
    return (
        f"Paired over {n} seed(s) and {summary['held_out']['items']} held-out items, 95 % bootstrap intervals: "
        + "; ".join(parts)
        + "."
    )


def _pct(x: float | None) -> str:
    return "n/a" if x is None or math.isnan(x) else f"{100 * x:.1f}"


def results_tables(summary: dict[str, Any]) -> list[str]:
    """The results table, the paired-difference table and the verdict, as markdown lines (summary.md has them, and
    the README quotes them verbatim; a test checks that it does)."""
    w = summary["warm_start"]
    lines = [
        "| | final avg@k (%), mean ± std over seeds | per seed (%) | gain (points) | area under curve (%) | hint right / wrong (%) | steps to +5 points, per seed | steps to beat the text-only ceiling, per seed |",
        "|---|---|---|---|---|---|---|---|",
        f"| warm start | {_pct(w['avg_at_k'])} | | | | {_pct(w['accuracy_hint_right'])} / "
        f"{_pct(w['accuracy_hint_wrong'])} | | |",
    ]
    for algo, r in summary["algorithms"].items():
        per = ", ".join(_pct(v) for v in r["final_avg_at_k_per_seed"].values())
        reach = ", ".join("–" if v is None else str(int(v)) for v in r["steps_to_text_only_ceiling_per_seed"].values())
        gain = ", ".join("–" if v is None else str(int(v)) for v in r["steps_to_gain_level_per_seed"].values())
        lines.append(
            f"| {algo.upper()} | {_pct(r['final_avg_at_k_mean'])} ± {_pct(r['final_avg_at_k_std'])} | {per} | "
            f"{100 * r['gain_over_warm_start']:+.1f} | {_pct(r['auc_mean'])} ± {_pct(r['auc_std'])} | "
            f"{_pct(r['final_accuracy_hint_right'])} / {_pct(r['final_accuracy_hint_wrong'])} | {gain} | "
            f"{reach or 'n/a'} |"
        )
    comps = summary.get("paired_differences") or {}
    if comps:
        lines += [
            "",
            "Paired differences (points; 95 % bootstrap interval over seeds and items):",
            "",
            "| | final avg@k | area under curve |",
            "|---|---|---|",
        ]
        for name, c in comps.items():
            lines.append(f"| {name.upper()} | {_interval(c['final'])} | {_interval(c['auc'])} |")
    lines += ["", f"**Verdict.** {verdict(summary)}", ""]
    return lines


def summary_markdown(summary: dict[str, Any], timings: dict[str, Any] | None = None) -> str:
    s = summary["settings"]
    w = summary["warm_start"]
    ho = summary["held_out"]
    task = f"`{'/'.join(s['tasks'])}` questions on a {s['image_size']} px 2 x 2 grid"
    if s.get("hint"):
        task += (
            f", with a hint that is right {s['hint']} times in {s['hint'] + 3} (text-only ceiling "
            f"{_pct(summary['text_only_ceiling'])} %)"
        )
    if s.get("reasoning"):
        task += ", chain-of-thought SFT targets with random filler"
    lines = [
        "# vppo CPU demo: summary",
        "",
        f"Task: synthetic {task} (chance {_pct(summary['chance'])} %). Tiny random Qwen2.5-VL, SFT warm start "
        f"({s['sft_steps']} steps), then {s['rl_steps']} RL steps per run (G={s['group_size']}, "
        f"{s['batch_prompts']} prompts/step, lr {s['rl_lr']:g}) under `tune run --nproc_per_node 2`, seeds "
        f"{list(s['seeds'])}, same warm start and data order for every algorithm.",
        f"Metric: {summary['metric']}; {ho['hint_right']} items where the hint is right, {ho['hint_wrong']} where it "
        "is wrong.",
        f"Code: commit `{summary.get('commit')}` (the last commit that changed code in `packages/` or `noxfile.py`).",
        "",
        *(f"**{w}**\n" for w in summary.get("warnings", [])),
        *results_tables(summary),
    ]

    diag_rows = []
    for algo, r in summary["algorithms"].items():
        d = r["diagnostics"]

        def mean_over_steps(key, d=d):
            vals = [v for v in d.get(key, {}).values() if v is not None and not math.isnan(v)]
            return sum(vals) / len(vals) if vals else math.nan

        diag_rows.append(
            f"| {algo.upper()} | {_pct(mean_over_steps('tgf/selected_fraction'))} | "
            f"{_pct(mean_over_steps('diag/pg_share_on_dependent_tokens'))} | "
            f"{mean_over_steps('tas/alpha_std'):.3g} | {mean_over_steps('actor/entropy'):.3g} |"
        )
    lines += [
        "Diagnostics, mean over steps and seeds (per step: `summary.json`, `diagnostics.png`):",
        "",
        "| | TGF keeps (% of tokens) | policy gradient on the 40 % most dependent tokens (%) | std of α | entropy (mean NLL) |",
        "|---|---|---|---|---|",
        *diag_rows,
    ]
    anatomy_rows = []
    w_anat = w.get("anatomy")
    if w_anat:
        anatomy_rows.append(("warm start", "", w["avg_at_k"], w_anat))
    for algo, r in summary["algorithms"].items():
        for seed, anat in r.get("anatomy_per_seed", {}).items():
            if anat:
                anatomy_rows.append((algo.upper(), seed, r["final_avg_at_k_per_seed"][seed], anat))
    if anatomy_rows:
        lines += [
            "",
            "Anatomy of each final model's responses (`response_anatomy`: 64 held-out prompts x 2 samples): the share "
            "of the most frequent answer colour (25 % = balanced, like the true answers), how often the boxed answer "
            "repeats the colour the chain of thought stated, how often it is the hinted colour, the clause colour "
            "token's share of the response's visual dependency, and how often TGF's top 40 % holds that token and "
            "the boxed one:",
            "",
            "| run | seed | final avg@k (%) | top answer share (%) | boxed = clause (%) | follows hint (%) | clause token's share of S (%) | clause / boxed in TGF top 40 % (%) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for name, seed, acc, a in anatomy_rows:
            lines.append(
                f"| {name} | {seed} | {_pct(acc)} | {_pct(a['answer_max_share'])} | {_pct(a['boxed_equals_clause'])} | "
                f"{_pct(a['follows_hint'])} | {_pct(a['clause_dependency_share'])} | "
                f"{_pct(a['clause_in_tgf_top'])} / {_pct(a['boxed_in_tgf_top'])} |"
            )
    dep = summary.get("dependency")
    if dep:
        lines += [
            "",
            f"Visual dependency of the final model `{summary.get('dependency_model', '?')}` ({dep['n_responses']} "
            f"responses, {dep['n_tokens']} tokens): the top 10 % of tokens hold {_pct(dep['top10_share'])} % of the "
            f"total dependency; median token S = {dep['median']:.3g}, p90 = {dep['p90']:.3g}, max = {dep['max']:.3g}.",
        ]
    if timings:
        lines += [
            "",
            f"Wall time on {timings.get('cpu_count')} CPU cores, seconds (from `timings.json`, not part of the "
            "reproducible summary): " + ", ".join(f"{k} {v:.0f}" for k, v in timings["wall_s"].items()),
        ]
    lines += [
        "",
        "Plots: `curves.png`, `diagnostics.png`, `dependency_hist.png`; responses shaded by dependency: "
        "`dependency.html`.",
        "",
    ]
    return "\n".join(lines)
