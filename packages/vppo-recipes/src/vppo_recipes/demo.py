"""The CPU demo: a tiny Qwen2.5-VL learns a visual task with VPPO, DAPO and GRPO, in minutes, no GPU, no downloads.

    python -m vppo_recipes.demo --out out/demo            # `nox -s demo` runs exactly this
    python -m vppo_recipes.demo --out /tmp/d --quick      # smoke version (1 seed, 2 RL steps; the tests use it)

What it does, in order (every stage is the real library code a user would run):

1. `vppo_eval.build_visual_task(hint=3, reasoning=True)`: "What colour is the shape in the top-left corner? Hint: it
   is often blue." on a 112 px 2 x 2 grid. The hint is right half of the time (the text alone reaches at most 50 %),
   so some correct answers are lucky guesses; the SFT target is a chain of thought in which most tokens are random
   filler that does not depend on the image and one clause states the colour seen (see vppo_eval.synthetic).
2. `vppo_rollout.build_tiny_checkpoint`: a randomly initialised, real Qwen2.5-VL (transformers classes, tiny sizes).
3. SFT warm start with the shipped SFT recipe (`vppo-recipes run sft_distributed --nproc_per_node 2`, i.e.
   `tune run`) on the chain-of-thought targets: it teaches the `<think>...</think> \\boxed{answer}` format.
4. Held-out avg@k of the warm start, item by item (`vppo_eval.evaluate`, temperature 1.0, top-p 1.0).
5. For each seed x algorithm: the shipped RL recipe under `tune run --nproc_per_node 2`, all from the same warm start
   and in the same data order (`data.shuffle=false`), so the seed changes only the sampling and the perturbation
   masks. Every run measures visual dependency (`diagnostics.dependency=true`: DAPO and GRPO get an extra no-grad
   pass that their loss never reads) and validates every `eval_every` steps on the same held-out items, writing
   each item's accuracy (`logs/validation_items.jsonl`).
6. `summary.json` / `summary.md`: final and area-under-curve held-out accuracy per algorithm (mean ± std over
   seeds), the paired differences VPPO − DAPO and VPPO − GRPO with 95 % bootstrap intervals over seeds and items
   (`vppo_eval.stats`), steps to beat the hint-only ceiling, accuracy split by whether the hint was right, the
   per-step diagnostics (TGF's kept fraction, the share of the policy gradient on the most dependent tokens, the
   spread of α, entropy) and a verdict that follows from the intervals. `curves.png`, `diagnostics.png`, the
   dependency histograms and an HTML page of responses shaded by dependency. Same command, same machine kind ->
   the same `summary.json`, bit for bit (wall times go to `timings.json`).

Every setting tried while designing this demo, and what it gave, is in docs/demo/EXPERIMENTS.md.
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

from vppo_recipes.demo_plots import plot_curves, plot_diagnostics
from vppo_recipes.demo_report import RunResult, _pct, summarize, summary_markdown, untrained_runs, verdict
from vppo_recipes.demo_responses import dependency_report, response_anatomy
from vppo_recipes.demo_settings import DemoSettings
from vppo_recipes.lifecycle import OutputDirError, check_writable, lock_output_dir
from vppo_recipes.offline import OFFLINE_ENV

# DemoSettings (vppo_recipes.demo_settings) is named here too: it is this module's public API with main and run_demo.
__all__ = ["DemoSettings", "main", "run_demo"]


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
    build_visual_task(
        task,
        n_train=s.n_train,
        n_test=s.n_test,
        seed=0,
        image_size=s.image_size,
        tasks=s.tasks,
        hint=s.hint,
        reasoning=s.reasoning,
    )
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
    """The shipped SFT recipe (2 processes) from the random checkpoint -> the warm-start checkpoint folder,
    `work/tiny_sft/checkpoints/step_<sft_steps>` (the tiny_sft config's own output folder name, so that with
    `work=./runs` and 40 steps it is the tiny RL configs' model.path: `vppo-recipes init-tiny`)."""
    out = work / "tiny_sft"
    # A live run in that folder (a tiny_sft launch while `init-tiny` runs again) is refused, naming it, never deleted
    # under it: taking and releasing the folder's lock raises OutputDirError while its owner runs.
    lock_output_dir(out).release()
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
            # the chain-of-thought targets of the task (or the config's one-line template without them)
            *(["data.columns.response=response", "data.max_response_length=96"] if s.reasoning else []),
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


def evaluate_checkpoint(ckpt: Path, records: list, s: DemoSettings, *, seed: int = 0) -> dict[str, Any]:
    """Held-out avg@k of a checkpoint (temperature 1.0, top-p 1.0: the recipe's validation settings), with each
    item's accuracy under "items" (id -> mean over the k samples)."""
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
    items = {item_id: float(a) for (_, item_id), a in res.item_accuracy().items()}
    return {
        "avg_at_k": float(b.avg_at_k),
        "format_rate": float(b.format_rate),
        "n_items": int(b.n_items),
        "items": dict(sorted(items.items(), key=lambda kv: int(kv[0]))),
    }


def rl_run(algo: str, seed: int, work: Path, task: Path, warm: Path, s: DemoSettings) -> RunResult:
    """One RL run of the shipped recipe from the warm start -> its metrics rows and per-item validation scores."""

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
        "diagnostics.dependency=true",  # S for every algorithm (logged only; the baselines' loss never reads it)
    ]
    run_recipe("rl_distributed", f"tiny_{algo}", overrides, cwd=work, log=work / "logs" / f"rl_{algo}_seed{seed}.log")
    if s.tasks == ("colour",):
        final = out / "checkpoints" / f"step_{s.rl_steps:06d}"
        anatomy = response_anatomy(final, heldout_records(task, s.n_eval), s)
        (out / "anatomy.json").write_text(_json(anatomy, indent=1))
    return read_run(out)


def read_run(out: Path) -> RunResult:
    """The metrics.jsonl rows and validation_items.jsonl scores of a finished run folder (last line per step)."""
    from vppo_recipes.metric_logging import read_jsonl

    items = {int(r["step"]): r["items"] for r in read_jsonl(out / "logs" / "validation_items.jsonl")}
    anatomy_file = out / "anatomy.json"
    anatomy = json.loads(anatomy_file.read_text()) if anatomy_file.is_file() else None
    return RunResult(list(read_jsonl(out / "logs" / "metrics.jsonl")), items, anatomy)


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
    if s.tasks == ("colour",):
        before["anatomy"] = response_anatomy(warm, records, s)
    (work / "warm_start_eval.json").write_text(_json(before, indent=1))
    tqdm.write(
        f"warm start: held-out avg@{s.k} = {_pct(before['avg_at_k'])} % (format {_pct(before['format_rate'])} %)"
    )

    runs: dict[str, dict[int, RunResult]] = {a: {} for a in s.algorithms}
    for seed in s.seeds:  # seed-major: an interrupted demo still has every algorithm at the first seeds
        for algo in s.algorithms:
            run = stage(f"rl {algo} seed {seed}", rl_run, algo, seed, work, task, warm, s)
            runs[algo][seed] = run
            final = [r.get(f"validation/avg@{s.k}") for r in run.rows if r["step"] == s.rl_steps]
            tqdm.write(
                f"{algo} seed {seed}: held-out avg@{s.k} after {s.rl_steps} steps = {_pct(final[-1]) if final else 'n/a'} %"
            )
    for algo in s.algorithms:
        wall[algo] = sum(v for k, v in wall.items() if k.startswith(f"rl {algo} "))

    dep_algo = "vppo" if "vppo" in s.algorithms else s.algorithms[0]
    dep_model = work / "rl" / f"{dep_algo}_seed{s.seeds[0]}" / "checkpoints" / f"step_{s.rl_steps:06d}"
    dep = stage("dependency report", dependency_report, dep_model, records, s, out)
    (work / "dependency_summary.json").write_text(_json(dep, indent=1))
    stages.close()
    wall["total"] = time.perf_counter() - t_all
    timings = {
        "wall_s": wall,
        "cpu_count": os.cpu_count(),
        "load_avg_1m_at_end": round(os.getloadavg()[0], 2),
    }
    return write_outputs(out, runs, before, records, s, dep, dep_model.relative_to(out), timings)


def write_outputs(
    out: Path, runs, before, records, s: DemoSettings, dep, dep_model: Path, timings: dict[str, Any] | None
) -> dict[str, Any]:
    """curves.png, diagnostics.png, summary.json, summary.md and timings.json from the collected results (the
    dependency files are already written)."""
    summary = summarize(runs, before, records, s)
    summary["dependency"] = dep
    summary["dependency_model"] = str(dep_model)
    summary["verdict"] = verdict(summary)
    warnings = untrained_runs(runs)
    if warnings:  # only then: a demo whose every run trained writes the same summary.json as before this key
        summary["warnings"] = warnings
        print("\n".join(["", *warnings, ""]), file=sys.stderr, flush=True)
    plot_curves(runs, summary, s, out / "curves.png")
    plot_diagnostics(runs, out / "diagnostics.png")
    (out / "summary.json").write_text(_json(summary, indent=2))
    if timings is not None:
        (out / "timings.json").write_text(_json(timings, indent=2))
    (out / "summary.md").write_text(summary_markdown(summary, timings))
    print(summary_markdown(summary, timings))
    print(f"Demo outputs in {out}: summary.md, summary.json, curves.png, diagnostics.png, dependency_hist.png, ...")
    return summary


def mean_runs_from_summary(summary: dict[str, Any]) -> dict[str, dict[int, RunResult]]:
    """algo -> {0: a RunResult whose rows are summary.json's per-step diagnostics, means over seeds}: what
    diagnostics.png can be drawn from when only the summary is left (e.g. docs/demo, whose work/ is not committed)."""
    runs = {}
    for algo, r in summary["algorithms"].items():
        rows: dict[int, dict[str, Any]] = {}
        for key, by_step in r["diagnostics"].items():
            for step, value in by_step.items():
                rows.setdefault(int(step), {"step": int(step)})[key] = math.nan if value is None else value
        runs[algo] = {0: RunResult([rows[t] for t in sorted(rows)], {})}
    return runs


def replot(out: Path) -> dict[str, Any]:
    """Rebuild the plots and summaries of a finished demo from its files (no training, no evaluation).

    A folder without work/ (a copy such as docs/demo) keeps its summaries and curves.png; diagnostics.png is
    redrawn from summary.json's per-step means over seeds (`mean_runs_from_summary`: no min..max band).
    """
    out = out.resolve()
    old = json.loads((out / "summary.json").read_text())
    if not (out / "work").is_dir():
        seeds = {a: len(r["final_avg_at_k_per_seed"]) for a, r in old["algorithms"].items()}
        band = "mean over seeds (replotted from summary.json: no per-seed band)"
        plot_diagnostics(mean_runs_from_summary(old), out / "diagnostics.png", seeds=seeds, band=band)
        print(f"{out} has no work/ folder: redrew diagnostics.png from summary.json; other files unchanged")
        return old
    fields = {f.name for f in dataclasses.fields(DemoSettings)}
    s = DemoSettings(**{k: tuple(v) if isinstance(v, list) else v for k, v in old["settings"].items() if k in fields})
    runs = {a: {seed: read_run(out / "work" / "rl" / f"{a}_seed{seed}") for seed in s.seeds} for a in s.algorithms}
    before = json.loads((out / "work" / "warm_start_eval.json").read_text())
    records = heldout_records(out / "work" / "visual_task", s.n_eval)
    timings_path = out / "timings.json"
    timings = json.loads(timings_path.read_text()) if timings_path.is_file() else None
    return write_outputs(out, runs, before, records, s, old["dependency"], Path(old["dependency_model"]), timings)


def copy_outputs(out: Path, dest: Path) -> None:
    """Copy the shareable outputs (plots, HTML, summaries; not work/) to `dest`, e.g. docs/demo/."""
    dest.mkdir(parents=True, exist_ok=True)
    for name in (
        "curves.png",
        "diagnostics.png",
        "timings.json",
        "dependency_hist.png",
        "dependency.html",
        "dependency.json",
        "summary.md",
        "summary.json",
    ):
        if (out / name).is_file():
            shutil.copyfile(out / name, dest / name)
    print(f"Copied the demo outputs to {dest}")


def _json(value: Any, *, indent: int) -> str:
    """A JSON file's text: strict JSON (NaN -> null, `vppo_eval.report.json_text`) and a final newline."""
    from vppo_eval.report import json_text

    return json_text(value, indent=indent) + "\n"


def _comma_list(values: Sequence[Any]) -> str:
    """`(0, 1, 2)` -> "0,1,2": the form --seeds / --algorithms take."""
    return ",".join(str(v) for v in values)


def _ints(text: str) -> tuple[int, ...]:
    """`"0,1,2"` -> (0, 1, 2); argparse reports the error with the flag's name."""
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers (e.g. 0,1,2), got {text!r}") from None


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m vppo_recipes.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, type=Path, help="output folder (plots, summary, work/ with every run)")
    p.add_argument("--quick", action="store_true", help="smoke version: 1 seed, 2 RL steps, tiny sizes")
    full, quick = DemoSettings.full(), DemoSettings.quick()  # the help states the defaults the code runs
    p.add_argument("--algorithms", help=f"comma list of vppo,dapo,grpo,pgpo (default {_comma_list(full.algorithms)})")
    p.add_argument(
        "--seeds",
        type=_ints,
        help=f"comma list of RL seeds (default {_comma_list(full.seeds)}; with --quick {_comma_list(quick.seeds)})",
    )
    p.add_argument("--rl-steps", type=int)
    p.add_argument("--eval-every", type=int)
    p.add_argument("--sft-steps", type=int)
    p.add_argument(
        "--replot",
        action="store_true",
        help="only rebuild plots + summary of a finished --out folder (without its work/: diagnostics.png only)",
    )
    p.add_argument("--copy-to", type=Path, help="also copy plots, HTML and summaries here (e.g. docs/demo)")
    args = p.parse_args(argv)
    if args.replot and not (args.out / "summary.json").is_file():
        p.error(f"--replot: {args.out} holds no summary.json of a finished demo")
    try:  # every output folder, before any work
        if args.copy_to:
            check_writable(args.copy_to, setting="--copy-to")
        if args.replot:
            check_writable(args.out, setting="--out")
    except OutputDirError as err:
        p.error(str(err))
    if args.replot:
        replot(args.out)
        if args.copy_to:
            copy_outputs(args.out.resolve(), args.copy_to)
        return 0
    s = DemoSettings.quick() if args.quick else DemoSettings.full()
    changes: dict[str, Any] = {}
    if args.algorithms:
        changes["algorithms"] = tuple(a.strip() for a in args.algorithms.split(",") if a.strip())
    for name in ("seeds", "rl_steps", "eval_every", "sft_steps"):
        if getattr(args, name) is not None:
            changes[name] = getattr(args, name)
    s = dataclasses.replace(s, **changes)
    try:
        s.check()
        lock = lock_output_dir(args.out, setting="--out")  # two demos in one folder would delete each other's runs
    except (ValueError, OutputDirError) as err:
        p.error(str(err))
    with lock:
        run_demo(args.out, s)
    if args.copy_to:
        copy_outputs(args.out.resolve(), args.copy_to)
    return 0


if __name__ == "__main__":
    sys.exit(main())
