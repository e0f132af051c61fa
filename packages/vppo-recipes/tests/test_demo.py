"""The CPU demo: the summary logic against hand-worked values, and the whole pipeline (`--quick`), twice."""

from __future__ import annotations

import dataclasses
import json
import math
import os
import socket
from pathlib import Path

import pytest

from vppo_eval.records import Record
from vppo_recipes.demo import main
from vppo_recipes.demo_report import RunResult, summarize, verdict
from vppo_recipes.demo_settings import DemoSettings

K = 4


def _settings(**kw) -> DemoSettings:
    return dataclasses.replace(DemoSettings.full(), rl_steps=4, eval_every=2, seeds=(0, 1, 2), n_boot=500, **kw)


def _records() -> list[Record]:
    # items 0, 1: the hint is right (guessable); items 2, 3: the hint is wrong (only the image tells)
    qs = [("red", "red"), ("blue", "blue"), ("red", "green"), ("yellow", "blue")]
    return [
        Record(id=str(i), question=f"What colour is the shape in the top-left corner? Hint: it is often {h}.",
               images=[], answer=a)
        for i, (h, a) in enumerate(qs)
    ]  # fmt: skip


def _run(item_scores: dict[int, list[float]], train_acc: float = 0.5, updates_per_step: int = 2) -> RunResult:
    """item_scores: step -> the 4 items' accuracies; the metrics rows carry their mean as avg@k."""
    rows = []
    for t in range(1, 5):
        row = {"step": t, "reward/accuracy": train_acc, "diag/pg_share_on_dependent_tokens": 0.3 + 0.1 * (t % 2),
               "optimizer_steps": float(t * updates_per_step)}  # fmt: skip
        if not updates_per_step:  # every group filtered out, as the recipe counts it
            row["total/skipped/steps_without_groups"] = float(t)
        if t in item_scores:
            row[f"validation/avg@{K}"] = sum(item_scores[t]) / 4
        rows.append(row)
    return RunResult(rows, {t: {str(i): v for i, v in enumerate(vals)} for t, vals in item_scores.items()})


BEFORE = {"avg_at_k": 0.25, "format_rate": 1.0, "items": {"0": 0.25, "1": 0.25, "2": 0.25, "3": 0.25}}


def test_summary_final_auc_hint_split_and_paired_difference_by_hand():
    vppo = {seed: _run({2: [0.5, 0.5, 0.5, 0.5], 4: [1.0, 1.0, 0.5, 0.5]}) for seed in (0, 1, 2)}
    dapo = {seed: _run({2: [0.25, 0.25, 0.25, 0.25], 4: [0.75, 0.75, 0.25, 0.25]}) for seed in (0, 1, 2)}
    out = summarize({"vppo": vppo, "dapo": dapo}, BEFORE, _records(), _settings())
    v, d = out["algorithms"]["vppo"], out["algorithms"]["dapo"]
    assert v["final_avg_at_k_mean"] == pytest.approx(0.75) and v["final_avg_at_k_std"] == pytest.approx(0.0)
    assert v["gain_over_warm_start"] == pytest.approx(0.5)
    # item 0 of VPPO: steps 0, 2, 4 -> 0.25, 0.5, 1.0: trapezoids (0.375 * 2 + 0.75 * 2) / 4 = 0.5625
    # item 2: 0.25, 0.5, 0.5 -> (0.375 * 2 + 0.5 * 2) / 4 = 0.4375; mean over items = 0.5
    assert v["auc_mean"] == pytest.approx(0.5)
    assert (v["final_accuracy_hint_right"], v["final_accuracy_hint_wrong"]) == (1.0, 0.5)
    assert out["held_out"] == {"items": 4, "hint_right": 2, "hint_wrong": 2}
    assert out["text_only_ceiling"] == 0.5
    # VPPO reaches 0.5 (the ceiling) at step 2, DAPO only at step 4
    assert v["steps_to_text_only_ceiling_per_seed"] == {"0": 2.0, "1": 2.0, "2": 2.0}
    assert d["steps_to_text_only_ceiling_per_seed"] == {"0": 4.0, "1": 4.0, "2": 4.0}
    # +5 points over the warm start (0.30): VPPO at step 2 (0.5), DAPO at step 4 (0.5; 0.25 at step 2)
    assert v["steps_to_gain_level_per_seed"] == {"0": 2.0, "1": 2.0, "2": 2.0}
    assert d["steps_to_gain_level_per_seed"] == {"0": 4.0, "1": 4.0, "2": 4.0}
    # every (seed, item) differs by exactly 0.25 at the end -> a zero-width interval at +0.25
    final = out["paired_differences"]["vppo-dapo"]["final"]
    assert final["mean"] == final["low"] == final["high"] == pytest.approx(0.25)
    auc = out["paired_differences"]["vppo-dapo"]["auc"]
    assert auc["mean"] == pytest.approx(0.5 - d["auc_mean"]) and auc["low"] > 0
    # diagnostics: mean over seeds per step
    assert v["diagnostics"]["diag/pg_share_on_dependent_tokens"] == {
        "1": pytest.approx(0.4), "2": pytest.approx(0.3), "3": pytest.approx(0.4), "4": pytest.approx(0.3)
    }  # fmt: skip
    assert "VPPO ends ahead of DAPO" in verdict(out) and "learns faster" in verdict(out)
    json.dumps(out)  # the summary is written as JSON


def test_verdict_follows_the_interval_whichever_way():
    base = {2: [0.5, 0.5, 0.5, 0.5]}
    noisy_a = {s: _run({**base, 4: x}) for s, x in enumerate([[1, 0, 1, 0], [0, 1, 0, 1], [1, 1, 0, 0]])}
    noisy_b = {s: _run({**base, 4: x}) for s, x in enumerate([[0, 1, 0, 1], [1, 0, 1, 0], [0, 0, 1, 1]])}
    out = summarize({"vppo": noisy_a, "grpo": noisy_b}, BEFORE, _records(), _settings())
    assert "no difference between VPPO and GRPO at the last step is shown" in verdict(out)
    worse = {s: _run({**base, 4: [0.0, 0.0, 0.0, 0.25]}) for s in range(3)}
    better = {s: _run({**base, 4: [1.0, 1.0, 1.0, 0.75]}) for s in range(3)}
    out = summarize({"vppo": worse, "grpo": better}, BEFORE, _records(), _settings())
    assert "VPPO ends behind GRPO" in verdict(out)


def test_a_run_without_every_item_scored_is_refused():
    cut = {0: RunResult([{"step": 2, f"validation/avg@{K}": 0.5}], {2: {"0": 0.5}})}
    with pytest.raises(ValueError, match="seed 0: no held-out score of every item at step 4"):
        summarize({"vppo": cut}, BEFORE, _records(), dataclasses.replace(_settings(), seeds=(0,)))


def test_a_run_without_an_optimizer_step_is_flagged_on_stderr_and_in_the_summary_and_json_is_strict(tmp_path, capsys):
    """A run that never updated is shown as a loud warning (not only as flat numbers), and the written JSON holds
    null, never a bare NaN, for a statistic without data."""
    from vppo_recipes.demo import write_outputs
    from vppo_recipes.demo_report import summary_markdown, untrained_runs

    scores = {2: [0.5, 0.5, 0.5, 0.5], 4: [0.5, 0.5, 0.5, 0.5]}
    runs = {
        "vppo": {seed: _run(scores) for seed in (0, 1, 2)},
        "dapo": {0: _run(scores, updates_per_step=0), 1: _run(scores), 2: _run(scores)},
    }
    [warning] = untrained_runs(runs)
    assert warning.startswith("DAPO seed 0: WARNING: this run took 0 optimizer steps in 4 RL step(s)")
    assert "4 steps whose every group the online filter dropped" in warning
    keys = ("answer_max_share", "boxed_equals_clause", "follows_hint", "clause_dependency_share",
            "clause_in_tgf_top", "boxed_in_tgf_top")  # fmt: skip
    before = {**BEFORE, "anatomy": {**dict.fromkeys(keys, 0.5), "boxed_equals_clause": math.nan, "responses": 8}}
    summary = write_outputs(tmp_path, runs, before, _records(), _settings(), {}, tmp_path / "m", None)
    assert summary["warnings"] == [warning]
    assert warning in capsys.readouterr().err
    assert f"**{warning}**" in summary_markdown(summary)
    written = _strict_json(tmp_path / "summary.json")
    assert written["warm_start"]["anatomy"]["boxed_equals_clause"] is None
    # every run trained: no warnings key, so the full demo's summary.json is what it was
    assert untrained_runs({"vppo": runs["vppo"]}) == []


def test_recipe_warning_names_the_counted_causes():
    from vppo_recipes.rl.rl_distributed import no_update_warning

    assert no_update_warning(3, 1, {}) is None and no_update_warning(0, 0, {}) is None
    said = no_update_warning(2, 0, {"skipped/steps_without_groups": 1.0, "skipped/nonfinite_updates": 2.0})
    assert "0 optimizer steps in 2 RL step(s)" in said
    assert "1 steps whose every group" in said and "2 updates skipped for a non-finite" in said
    assert "raise rollout.group_size" in said  # the filter's remedy, given only where the filter was the cause
    assert "rollout.group_size" not in no_update_warning(2, 0, {"skipped/nonfinite_updates": 2.0})


def test_help_states_the_defaults_the_demo_runs(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps the help lines
    full, quick = DemoSettings.full(), DemoSettings.quick()
    assert (
        f"RL seeds (default {','.join(map(str, full.seeds))}; with --quick {','.join(map(str, quick.seeds))})" in text
    )
    assert f"(default {','.join(full.algorithms)})" in text


def test_diagnostics_are_a_grid_of_the_logged_metrics_under_one_legend_naming_every_algorithm(
    tmp_path, overlapping_tick_labels
):
    import matplotlib.pyplot as plt

    from vppo_recipes.demo_plots import diagnostics_figure, plot_diagnostics
    from vppo_recipes.demo_report import DIAGNOSTICS

    def logged(run, keys):
        return RunResult([{**r, **{k: 0.1 * r["step"] for k in keys}} for r in run.rows], run.items)

    scores = {2: [0.5] * 4, 4: [0.5] * 4}
    every = [k for k in DIAGNOSTICS if k != "reward/accuracy"]
    vppo_only = ("tgf/selected_fraction", "tas/alpha_std")
    runs = {
        "vppo": {s: logged(_run(scores), every) for s in (0, 1, 2)},
        "dapo": {s: logged(_run(scores), [k for k in every if k not in vppo_only]) for s in (0, 1)},
    }
    fig = diagnostics_figure(runs, {"vppo": 3, "dapo": 2})
    assert len(fig.axes) == 5 and {ax.get_subplotspec().get_geometry()[:2] for ax in fig.axes} == {(2, 3)}
    assert all(ax.lines for ax in fig.axes)  # no empty panel
    [legend] = fig.legends
    assert [t.get_text() for t in legend.get_texts()] == ["VPPO (mean of 3 seeds)", "DAPO (mean of 2 seeds)"]
    assert overlapping_tick_labels(fig) == []
    plt.close(fig)
    # without VPPO the two VPPO-only metrics are not drawn as empty panels
    fig = diagnostics_figure({"dapo": runs["dapo"]}, {"dapo": 2})
    assert len(fig.axes) == 3 and all(ax.lines for ax in fig.axes)
    plt.close(fig)
    # nothing logged: no figure and no file
    bare = RunResult([{"step": t, "reward/accuracy": 0.5} for t in (1, 2)], {})
    (tmp_path / "d.png").write_bytes(b"an older run's plot")
    assert plot_diagnostics({"grpo": {0: bare}}, tmp_path / "d.png") is None
    assert not (tmp_path / "d.png").exists()


def test_replot_of_a_copy_without_work_redraws_diagnostics_from_the_summary_and_leaves_the_rest(tmp_path):
    """docs/demo holds summary.json but not work/: --replot redraws diagnostics.png from the per-step means."""
    from pathlib import Path

    committed = Path(__file__).resolve().parents[3] / "docs" / "demo" / "summary.json"
    (tmp_path / "summary.json").write_bytes(committed.read_bytes())
    assert main(["--replot", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "diagnostics.png").read_bytes().startswith(b"\x89PNG")
    assert (tmp_path / "summary.json").read_bytes() == committed.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["diagnostics.png", "summary.json"]


def test_settings_reject_a_last_step_that_is_not_validated():
    with pytest.raises(ValueError, match="--eval-every"):
        dataclasses.replace(DemoSettings.full(), rl_steps=7, eval_every=5).check()
    with pytest.raises(ValueError, match="algorithms"):
        dataclasses.replace(DemoSettings.full(), algorithms=("ppo",)).check()
    with pytest.raises(ValueError, match="each once"):
        dataclasses.replace(DemoSettings.full(), seeds=(1, 1)).check()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--sft-steps", "0"], "--sft-steps must be an integer >= 1, got 0"),
        (["--rl-steps", "-2"], "--rl-steps must be an integer >= 1, got -2"),
        (["--eval-every", "0"], "--eval-every must be an integer >= 1, got 0"),
        (["--rl-steps", "5", "--eval-every", "2"], "--rl-steps (5) must be a multiple of --eval-every (2)"),
        (["--seeds", "0,0"], "--seeds: give at least one seed >= 0, each once"),
        (["--seeds", "-1"], "--seeds: give at least one seed >= 0, each once"),
        (["--seeds", "zero"], "argument --seeds: expected comma-separated integers (e.g. 0,1,2), got 'zero'"),
        (["--algorithms", "ppo"], "--algorithms: expected a non-empty subset of vppo,dapo,grpo,pgpo"),
        (["--copy-to", "/sys/vppo-demo-copy"], "--copy-to /sys/vppo-demo-copy cannot be written"),
        (["--replot"], "--replot: OUT holds no summary.json of a finished demo"),
    ],
    ids=["sft-steps", "rl-steps", "eval-every", "not-a-multiple", "seeds-twice", "seed-negative", "seeds-text",
         "algorithms", "copy-to", "replot"],
)  # fmt: skip
def test_every_bad_demo_setting_is_refused_before_any_work(tmp_path, monkeypatch, capsys, args, message):
    """Issue 23: `--sft-steps 0` used to build for 20-45 s, then fail with the cause only in a log file."""
    from vppo_recipes import demo

    started = []
    monkeypatch.setattr(demo, "run_demo", lambda out, s: started.append(s))
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--out", str(out), "--quick", *args])
    assert stopped.value.code == 2
    assert message.replace("OUT", str(out)) in capsys.readouterr().err
    assert not started and not out.exists()


@pytest.mark.parametrize("busy", [False, True], ids=["unwritable", "in-use"])
def test_a_demo_out_folder_that_is_unwritable_or_in_use_is_refused_before_any_work(tmp_path, monkeypatch, capsys, busy):
    from vppo_recipes import demo

    started = []
    monkeypatch.setattr(demo, "run_demo", lambda out, s: started.append(s))
    out = tmp_path / "out" if busy else Path("/sys/vppo-demo-out")  # sysfs: not writable, even by root
    if busy:  # another demo, alive (this process), holds it
        out.mkdir(parents=True)
        owner = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2026-01-02T03:04:05+00:00"}
        (out / "vppo.lock").write_text(json.dumps(owner))
    with pytest.raises(SystemExit) as stopped:
        demo.main(["--out", str(out), "--quick"])
    err = capsys.readouterr().err
    assert stopped.value.code == 2 and not started
    assert f"--out {out} is in use by another run: pid {os.getpid()}" in err if busy else "cannot be written" in err
    assert "--out PATH" in err


def test_the_full_demo_has_the_statistical_power_the_issue_asks_for():
    s = DemoSettings.full()
    assert len(s.seeds) >= 5 and s.n_eval >= 256 and set(s.algorithms) >= {"vppo", "dapo", "grpo"}
    assert s.text_only_ceiling() == 0.5 and s.reasoning


def _strict_json(path):
    """json.loads that refuses NaN / Infinity (as JavaScript, jq and Go do); AssertionError naming the file."""

    def refuse(constant):
        raise AssertionError(f"{path}: {constant} is not JSON")

    return json.loads(path.read_text(), parse_constant=refuse)


@pytest.mark.distributed
@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_reproduces_its_summary_bit_for_bit(tmp_path):
    """Task + tiny model -> SFT recipe (tune run, 2 procs) -> avg@k -> RL recipe (2 procs each) -> reports; twice,
    in two folders: summary.json must be the same bytes. Every algorithm trains (takes optimizer steps), and every
    JSON file written is strict JSON."""
    args = ["--quick"]
    assert main(["--out", str(tmp_path / "a"), *args]) == 0
    for algo in DemoSettings.quick().algorithms:  # the quick settings train every algorithm, not a NaN loss
        rows = [json.loads(line) for line in (tmp_path / "a" / "work" / "rl" / f"{algo}_seed0" / "logs" /
                                              "metrics.jsonl").read_text().splitlines()]  # fmt: skip
        assert rows[-1]["optimizer_steps"] >= 1 and all(math.isfinite(r["loss"]) for r in rows), (algo, rows[-1])
    written = sorted((tmp_path / "a").rglob("*.json"))
    assert {"summary.json", "warm_start_eval.json", "anatomy.json", "dependency.json"} <= {p.name for p in written}
    for path in written:
        _strict_json(path)
    for name in ("curves.png", "diagnostics.png", "dependency_hist.png", "dependency.html", "summary.md",
                 "summary.json", "timings.json"):  # fmt: skip
        assert (tmp_path / "a" / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert "warnings" not in summary, summary["warnings"]
    final = summary["algorithms"]["vppo"]["final_avg_at_k_per_seed"]["0"]
    assert 0.0 <= final <= 1.0 and not math.isnan(summary["warm_start"]["avg_at_k"])
    assert summary["dependency"]["n_tokens"] > 0
    assert "vppo-dapo" in summary["paired_differences"]
    # every final model and the warm start get a response anatomy (the quick warm start rarely writes a clause, so
    # only the counts are checked here; test_rl_runs checks the baselines' dependency diagnostics)
    for anatomy in (summary["warm_start"]["anatomy"], summary["algorithms"]["dapo"]["anatomy_per_seed"]["0"]):
        assert anatomy["responses"] > 0 and set(anatomy) >= {"answer_max_share", "boxed_equals_clause"}
    assert (tmp_path / "a" / "work" / "rl" / "vppo_seed0" / "checkpoints" / "step_000002").is_dir()
    assert main(["--out", str(tmp_path / "b"), *args]) == 0
    assert (tmp_path / "a" / "summary.json").read_bytes() == (tmp_path / "b" / "summary.json").read_bytes()


def test_committed_demo_summary_and_readme_table_are_what_the_code_writes():
    """docs/demo/summary.md is summary_markdown(summary.json); the README quotes its tables verbatim; the run used
    the shipped full settings and recorded a commit of this repository."""
    import subprocess
    from pathlib import Path

    from vppo_recipes.demo_report import results_tables, summary_markdown

    root = Path(__file__).resolve().parents[3]
    docs = root / "docs" / "demo"
    summary = json.loads((docs / "summary.json").read_text())
    timings = json.loads((docs / "timings.json").read_text())
    assert (docs / "summary.md").read_text() == summary_markdown(summary, timings)
    assert "\n".join(results_tables(summary)) in (root / "README.md").read_text()
    assert summary["settings"] == json.loads(json.dumps(dataclasses.asdict(DemoSettings.full())))
    commit = summary["commit"]
    assert commit and not commit.endswith("+dirty"), commit
    if (root / ".git").exists():
        subprocess.run(["git", "-C", str(root), "cat-file", "-e", f"{commit}^{{commit}}"], check=True)
