"""The CPU demo: the pure summary logic, and one smoke run of the whole pipeline (`--quick`)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest

from vppo_recipes.demo import DemoSettings, main, summarize, verdict


def _rows(final: float, steps: int = 4, k: int = 4) -> list[dict]:
    return [
        {"step": t, "reward/accuracy": 0.5, **({f"validation/avg@{k}": final} if t == steps else {})}
        for t in range(1, steps + 1)
    ]


def _summary(finals: dict[str, list[float]]) -> dict:
    s = dataclasses.replace(DemoSettings.full(), rl_steps=4, eval_every=2, seeds=(0, 1, 2))
    runs = {a: {seed: _rows(v) for seed, v in enumerate(vals)} for a, vals in finals.items()}
    return summarize(runs, {"avg_at_k": 0.4, "format_rate": 1.0, "items": 64}, s, {})


def test_summary_reports_mean_std_and_gain_over_warm_start_per_algorithm():
    out = _summary({"vppo": [0.5, 0.6, 0.7], "dapo": [0.4, 0.4, 0.4]})
    v = out["algorithms"]["vppo"]
    assert v["final_avg_at_k_mean"] == pytest.approx(0.6)
    assert v["final_avg_at_k_std"] == pytest.approx(0.1)  # sample std (n-1)
    assert v["gain_over_warm_start"] == pytest.approx(0.2)
    assert out["algorithms"]["dapo"]["final_avg_at_k_std"] == pytest.approx(0.0, abs=1e-12)
    json.dumps(out)  # the summary is written as JSON


def test_verdict_says_no_difference_when_gap_is_within_seed_spread():
    text = verdict(_summary({"vppo": [0.5, 0.6, 0.7], "dapo": [0.45, 0.55, 0.6]}))
    assert "no demonstrated difference" in text


def test_verdict_says_vppo_did_not_win_when_a_baseline_is_clearly_better():
    text = verdict(_summary({"vppo": [0.40, 0.41, 0.42], "grpo": [0.60, 0.61, 0.62]}))
    assert "did not beat" in text and "GRPO" in text


def test_verdict_credits_vppo_only_beyond_the_seed_spread():
    text = verdict(_summary({"vppo": [0.60, 0.61, 0.62], "dapo": [0.40, 0.41, 0.42]}))
    assert "VPPO was ahead" in text


def test_settings_reject_a_last_step_that_is_not_validated():
    with pytest.raises(ValueError, match="eval_every"):
        dataclasses.replace(DemoSettings.full(), rl_steps=7, eval_every=5).check()
    with pytest.raises(ValueError, match="algorithms"):
        dataclasses.replace(DemoSettings.full(), algorithms=("ppo",)).check()


@pytest.mark.distributed
@pytest.mark.slow
def test_quick_demo_runs_every_stage_and_writes_plots_and_summary(tmp_path):
    """Task + tiny model -> SFT recipe (tune run, 2 procs) -> avg@k -> RL recipe (VPPO, 2 procs) -> reports."""
    assert main(["--out", str(tmp_path), "--quick", "--algorithms", "vppo"]) == 0
    for name in ("curves.png", "dependency_hist.png", "dependency.html", "summary.md", "summary.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    summary = json.loads((tmp_path / "summary.json").read_text())
    final = summary["algorithms"]["vppo"]["final_avg_at_k_per_seed"]["0"]
    assert 0.0 <= final <= 1.0 and not math.isnan(summary["warm_start"]["avg_at_k"])
    assert summary["dependency"]["n_tokens"] > 0
    assert (tmp_path / "work" / "rl" / "vppo_seed0" / "checkpoints" / "step_000002").is_dir()
