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

from vppo_recipes.lifecycle import OutputDirError, check_writable, lock_output_dir
from vppo_recipes.offline import OFFLINE_ENV

__all__ = ["DemoSettings", "main", "run_demo"]

ALGORITHMS = ("vppo", "dapo", "grpo")


@dataclasses.dataclass(frozen=True)
class DemoSettings:
    """Every knob of the demo; `full()` is what `nox -s demo` runs, `quick()` the smoke test.

    tasks / image_size / hint / reasoning / n_train / n_test: the synthetic task
        (vppo_eval.synthetic.build_visual_task; hint=None and reasoning=False give the plain colour question).
    rope_theta: the tiny decoder's M-RoPE base (None: build_tiny_checkpoint's 1e6, the real models' value); see
        `set_rope_theta` for why the demo lowers it.
    sft_steps, sft_lr: SFT warm start (batch 16). rl_steps, eval_every: RL steps per run and validation interval.
    k: samples per held-out item (avg@k). n_eval: held-out items scored (the first n_eval test rows).
    rl_lr: RL learning rate (the tiny model needs far more than the 7B's 1e-6).
    group_size, batch_prompts, update_prompts: rollout G, prompts per RL step, prompts per optimizer step.
    max_new_tokens: response budget (the chain-of-thought targets are 34-60 tokens).
    dependency_prompts: held-out prompts whose responses feed the dependency histograms / HTML page.
    anatomy_prompts: held-out prompts (x 2 samples) of `response_anatomy`, run on the warm start and every final model.
    n_boot: bootstrap replicates of the paired intervals.
    """

    algorithms: tuple[str, ...] = ALGORITHMS
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    tasks: tuple[str, ...] = ("colour",)
    image_size: int = 112
    hint: int | None = 3
    reasoning: bool = True
    n_train: int = 2048
    n_test: int = 256
    model_seed: int = 0
    rope_theta: float | None = 10.0
    sft_steps: int = 400
    sft_lr: float = 3e-3
    rl_steps: int = 20
    eval_every: int = 5
    rl_lr: float = 1e-3
    k: int = 4
    n_eval: int = 256
    group_size: int = 8
    batch_prompts: int = 8
    update_prompts: int = 4
    max_new_tokens: int = 64
    dependency_prompts: int = 16
    anatomy_prompts: int = 64
    n_boot: int = 10_000

    @classmethod
    def full(cls) -> DemoSettings:
        return cls()

    @classmethod
    def quick(cls) -> DemoSettings:
        """Smoke version: every stage runs and every algorithm takes optimizer steps, on small sizes (the accuracy
        numbers are meaningless).

        Why these values: the online filter of VPPO / DAPO keeps only groups whose rewards differ, and a reward needs
        a `\\boxed{}` answer. The chain-of-thought targets (34-60 tokens) neither fit a short response budget nor
        are learnt in a few SFT steps, so the quick warm start learns the SFT config's one-line template
        (`reasoning=False`) for `sft_steps` steps, answers within `max_new_tokens`, and groups of 8 samples at
        temperature 1.0 then differ in accuracy.
        """
        return cls(
            seeds=(0,),
            reasoning=False,
            n_train=64,
            n_test=8,
            sft_steps=30,
            rl_steps=2,
            eval_every=1,
            k=2,
            n_eval=8,
            group_size=8,
            batch_prompts=2,
            update_prompts=2,
            max_new_tokens=24,
            dependency_prompts=2,
            anatomy_prompts=4,
            n_boot=200,
        )

    def check(self) -> None:
        """Raise ValueError naming the command-line flag and its valid range for a setting no stage could run with
        (`main` calls it before any work; a bad setting used to surface after the 20-45 s build, in a log file)."""
        unknown = [a for a in self.algorithms if a not in ("vppo", "dapo", "grpo", "pgpo")]
        if not self.algorithms or unknown:
            raise ValueError(f"--algorithms: expected a non-empty subset of vppo,dapo,grpo,pgpo, got {self.algorithms}")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds) or min(self.seeds) < 0:
            raise ValueError(f"--seeds: give at least one seed >= 0, each once (e.g. --seeds 0,1,2), got {self.seeds}")
        for flag, value in (
            ("--sft-steps", self.sft_steps),
            ("--rl-steps", self.rl_steps),
            ("--eval-every", self.eval_every),
        ):
            if value < 1:
                raise ValueError(f"{flag} must be an integer >= 1, got {value}")
        if self.rl_steps % self.eval_every:
            raise ValueError(
                f"--rl-steps ({self.rl_steps}) must be a multiple of --eval-every ({self.eval_every}), so the last "
                "step is validated"
            )
        if self.n_eval > self.n_test:
            raise ValueError(f"n_eval ({self.n_eval}) must be <= n_test ({self.n_test})")

    def chance(self) -> float | None:
        """Accuracy of a uniform guess among the answers (colour: 4)."""
        return 0.25 if tuple(self.tasks) == ("colour",) else None

    def text_only_ceiling(self) -> float | None:
        """The best accuracy from the question text alone: follow the hint (w / (w + 3)), or chance without one."""
        if tuple(self.tasks) != ("colour",):
            return None
        return self.hint / (self.hint + 3) if self.hint else 0.25


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


def read_run(out: Path) -> RunResult:
    """The metrics.jsonl rows and validation_items.jsonl scores of a finished run folder (last line per step)."""
    from vppo_recipes.metric_logging import read_jsonl

    items = {int(r["step"]): r["items"] for r in read_jsonl(out / "logs" / "validation_items.jsonl")}
    anatomy_file = out / "anatomy.json"
    anatomy = json.loads(anatomy_file.read_text()) if anatomy_file.is_file() else None
    return RunResult(list(read_jsonl(out / "logs" / "metrics.jsonl")), items, anatomy)


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


# ------------------------------------------------------------------------------------------------ plots


_COLOURS = {"vppo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green", "pgpo": "tab:purple"}


def _plot_metric(ax, runs, key: str, start: float | None = None) -> None:
    """Mean over seeds of a logged metric per step, shaded min..max over seeds (step 0 = `start` if given)."""
    for algo, by_step in curves(runs, key).items():
        if not by_step:
            continue
        steps = sorted(by_step)
        if start is not None:
            steps = [0, *steps]
            by_step = {0: [start], **by_step}
        mean = [sum(by_step[t]) / len(by_step[t]) for t in steps]
        lo = [min(by_step[t]) for t in steps]
        hi = [max(by_step[t]) for t in steps]
        c = _COLOURS.get(algo)
        ax.plot(steps, mean, marker="o", ms=3, color=c, label=f"{algo.upper()} (mean of {len(runs[algo])} seeds)")
        ax.fill_between(steps, lo, hi, color=c, alpha=0.15, lw=0)


def plot_curves(runs, summary: dict[str, Any], s: DemoSettings, path: Path) -> Path:
    """Held-out avg@k and train accuracy vs RL step: mean over seeds, shaded min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_val, ax_rew) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_metric(ax_val, runs, f"validation/avg@{s.k}", start=summary["warm_start"]["avg_at_k"])
    _plot_metric(ax_rew, runs, "reward/accuracy")
    ax_val.set_title(f"held-out avg@{s.k} ({summary['held_out']['items']} items)", fontsize=10)
    ax_rew.set_title(
        "train accuracy of the groups trained on\n(online filter drops all-correct / all-wrong)", fontsize=10
    )
    for ax in (ax_val, ax_rew):
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_val.axhline(summary["warm_start"]["avg_at_k"], color="k", ls=":", lw=1, label="SFT warm start")
    if summary.get("text_only_ceiling"):
        ax_val.axhline(summary["text_only_ceiling"], color="grey", ls="--", lw=1, label="text-only ceiling (hint)")
    ax_val.set_ylabel("accuracy")
    ax_val.legend(fontsize=8)
    fig.suptitle("Tiny Qwen2.5-VL on the synthetic visual task (CPU); band = min..max over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path


def diagnostic_panels(runs) -> list[str]:
    """The DIAGNOSTICS keys diagnostics.png draws: every one but train accuracy (curves.png has it) that some run
    logged (a key no run logged, e.g. TGF's without VPPO, would be an empty panel)."""
    return [k for k in DIAGNOSTICS if k != "reward/accuracy" and any(curves(runs, k).values())]


def diagnostics_figure(runs, seeds: dict[str, int], *, band: str = "band = min..max over seeds"):
    """The diagnostics.png figure (None when no run logged any diagnostic): one panel per `diagnostic_panels` key in
    a grid of up to 3 columns, and one legend above them naming every algorithm in `seeds` (algo -> seed count)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    keys = diagnostic_panels(runs)
    if not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows + 0.6), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _plot_metric(ax, runs, key)
        ax.set_title(f"{key}\n{textwrap.fill(DIAGNOSTICS[key], 52)}", fontsize=8)
        ax.set_xlabel("RL step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys) :]:
        ax.remove()
    handles = [
        Line2D([], [], color=_COLOURS.get(a), marker="o", ms=3, label=f"{a.upper()} (mean of {n} seed{'s' * (n != 1)})")
        for a, n in seeds.items()
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False, title=band)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))  # room for the legend above the grid
    return fig


def plot_diagnostics(
    runs, path: Path, *, seeds: dict[str, int] | None = None, band: str = "band = min..max over seeds"
) -> Path | None:
    """diagnostics.png (`diagnostics_figure`; seeds: algo -> seed count, default the runs'); None, and no file (an
    older one at `path` is removed), when no run logged a diagnostic."""
    import matplotlib.pyplot as plt

    seeds = seeds or {a: len(by_seed) for a, by_seed in runs.items()}
    fig = diagnostics_figure(runs, seeds, band=band)
    if fig is None:
        path.unlink(missing_ok=True)
        return None
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path


@dataclasses.dataclass(frozen=True)
class SampledResponses:
    """Responses sampled from a checkpoint and their visual dependency (`sample_and_measure`).

    records: the prompts' records; rollouts: the sampler's output (2 per record); keep: indices of the non-empty
    responses, in rollout order; analysis: their `vppo_eval.report.DependencyAnalysis` (same order as keep).
    """

    records: list
    rollouts: Any
    keep: list[int]
    analysis: Any

    def record_of(self, i: int):
        return self.records[self.rollouts.group_index[i]]


def sample_and_measure(ckpt: Path, records: list, s: DemoSettings, *, samples: int = 2) -> SampledResponses:
    """Sample `samples` responses per record from `ckpt` (temperature 1.0, top-p 1.0, seed 0) and measure the
    visual dependency of each non-empty one (sampled-token estimator, blackened image, seed 0): deterministic."""
    import torch

    from vppo_eval.report import dependency_analysis
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.prompts import build_prompt
    from vppo_rollout.sampling import SamplingConfig
    from vppo_rollout.transformers_engine import TransformersSampler

    torch.set_num_threads(2)
    processor = load_processor(ckpt)
    model = load_policy(ckpt)
    prompts = [build_prompt(processor, r.question, r.images) for r in records]
    rollouts = TransformersSampler(model, processor).sample(
        prompts, samples, SamplingConfig(temperature=1.0, top_p=1.0, max_new_tokens=s.max_new_tokens, seed=0)
    )
    keep = [i for i, ids in enumerate(rollouts.token_ids) if ids]
    analysis = dependency_analysis(
        model,
        processor,
        [prompts[rollouts.group_index[i]] for i in keep],
        [rollouts.token_ids[i] for i in keep],
        estimator="sampled",
        perturbation="blacken",
        seed=0,
    )
    return SampledResponses(list(records), rollouts, keep, analysis)


def response_anatomy(ckpt: Path, records: list, s: DemoSettings) -> dict[str, float]:
    """Where a model's answers and visual dependency sit, on `anatomy_prompts` held-out prompts x 2 samples.

    - answer_max_share: share of the most frequent boxed colour (0.25 = balanced; the true answers are balanced);
    - boxed_equals_clause: the boxed answer repeats the colour its own chain of thought stated;
    - follows_hint: the boxed answer is the hinted colour (right half of the time);
    - clause_dependency_share: the clause's colour token's share of the response's total dependency S (how much
      the colour stated still comes from the image);
    - clause_in_tgf_top / boxed_in_tgf_top: that token is among the ceil(0.4 n) most dependent (what TGF keeps).
    Responses without the piece a statistic needs are left out of it. Deterministic (seeded sampling and masks).
    """
    import re

    import numpy as np

    sampled = sample_and_measure(ckpt, records[: s.anatomy_prompts], s)
    stats: dict[str, list[float]] = {
        k: []
        for k in (
            "boxed_equals_clause",
            "follows_hint",
            "clause_dependency_share",
            "clause_in_tgf_top",
            "boxed_in_tgf_top",
        )
    }
    answers: list[str] = []
    for i, S, toks in zip(sampled.keep, sampled.analysis.token_dependency, sampled.analysis.tokens):
        rec = sampled.record_of(i)
        text = "".join(toks)
        starts = np.cumsum([0] + [len(t) for t in toks])
        top = set(np.argsort(-S, kind="stable")[: math.ceil(0.4 * len(S) - 1e-9)].tolist())
        clause = re.search(r"shape is (\w+)", text)
        boxed = re.findall(r"\\boxed\{(\w+)", text)
        total = float(S.sum())

        def token_at(pos: int, starts=starts) -> int:
            return int(np.searchsorted(starts, pos, side="right") - 1)

        if clause:
            j = token_at(clause.start(1))
            stats["clause_in_tgf_top"].append(float(j in top))
            if total > 0:
                stats["clause_dependency_share"].append(float(S[j]) / total)
        if boxed:
            answers.append(boxed[-1])
            j = token_at(text.rindex("\\boxed{") + len("\\boxed{"))
            stats["boxed_in_tgf_top"].append(float(j in top))
            stats["follows_hint"].append(float(boxed[-1] == _hint(rec.question)))
            if clause:
                stats["boxed_equals_clause"].append(float(boxed[-1] == clause.group(1)))
    out = {k: (sum(v) / len(v) if v else math.nan) for k, v in stats.items()}
    out["answer_max_share"] = max(answers.count(a) for a in set(answers)) / len(answers) if answers else math.nan
    out["responses"] = len(sampled.keep)
    return out


def dependency_report(ckpt: Path, records: list, s: DemoSettings, out: Path) -> dict[str, Any]:
    """Token / trajectory visual dependency of responses sampled from `ckpt` (the paper's Fig. 1, toy scale)."""
    from vppo_eval.report import write_dependency_report
    from vppo_eval.reward import compute_rewards

    sampled = sample_and_measure(ckpt, records[: s.dependency_prompts], s)
    rollouts, keep, analysis = sampled.rollouts, sampled.keep, sampled.analysis
    answers = [sampled.record_of(i).answer for i in keep]
    rewards = compute_rewards([rollouts.texts[i] for i in keep], answers)["accuracy"]
    headers = [
        f"Q: {sampled.record_of(i).question}   answer: {a}   correct: {bool(r)}"
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
