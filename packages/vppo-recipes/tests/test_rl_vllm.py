"""The RL recipe with `rollout.engine: vllm` on the real engine (CPU build, `nox -s tests_vllm`).

Each rank builds its own colocated engine inside its process (vLLM's `external_launcher`, on the trainer's gloo
process group), samples with it, and receives the trainer's weights after every step. The tiny model has the sizes
vLLM's CPU attention accepts (`VLLM_CPU_SIZES`) and is warm-started like the embedded-engine runs.

Trainer-sampler agreement: every step logs |engine log-prob - trainer lp_old| over the first mini-batch's tokens
(the same weights, before any update). In float32 on CPU it stays at float rounding (<= 1e-4); with the weight sync
skipped the engine samples from stale weights and the check fails from step 2 on.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _rl_launch import TIMING, kill_after_checkpoint, metrics, run, same
from _warm_start import warm_assets

pytestmark = [pytest.mark.vllm, pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(1800)]

VLLM = ["rollout.engine=vllm"]
AGREEMENT_MEAN_MAX = 1e-4  # the bound on rollout/logprob_abs_diff_mean for a synced float32 run


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from vppo_rollout.tiny import VLLM_CPU_SIZES

    return warm_assets(tmp_path_factory.mktemp("rl_vllm"), **VLLM_CPU_SIZES)


@pytest.fixture(scope="module")
def two_process_run(assets) -> Path:
    """3 uninterrupted VPPO steps, 2 ranks, one vLLM engine per rank (shared by the checks and the resume test)."""
    out = assets["root"] / "vppo_2proc"
    run(assets, "vppo", out, nproc=2, steps=3, extra=VLLM)
    return out


def _check_trained_in_agreement(out: Path) -> list[dict]:
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2, 3]
    for m in ms:
        assert m["filter/groups_kept"] == 4 and m["optimizer_steps"] > 0, m
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0, m
        assert m["rollout/logprob_abs_diff_mean"] <= AGREEMENT_MEAN_MAX, m
        assert m["rollout/logprob_abs_diff_max"] < 1e-3 and m["rollout/logprob_frac_above_1e-3"] == 0.0, m
        assert "tgf/selected_fraction" in m and "dependency/token_mean" in m
    assert 0.0 <= ms[1]["validation/avg@2"] <= 1.0  # validation sampled by the engine too
    return ms


def test_one_process_trains_three_steps_on_its_colocated_engine(assets):
    out = assets["root"] / "vppo_1proc"
    run(assets, "vppo", out, nproc=1, steps=3, extra=VLLM)
    _check_trained_in_agreement(out)


def test_two_processes_train_three_steps_each_rank_on_its_own_engine(two_process_run):
    ms = _check_trained_in_agreement(two_process_run)
    assert ms[2]["optimizer_steps"] == 6  # 2 mini-batches per RL step


def test_resume_after_a_kill_gives_the_uninterrupted_runs_metrics(assets, two_process_run):
    cut = assets["root"] / "vppo_2proc_cut"
    kill_after_checkpoint(assets, "vppo", cut, nproc=2, steps=3, checkpoint=2, extra=VLLM)
    resumed = run(assets, "vppo", cut, nproc=2, steps=3, extra=VLLM)
    assert "resumed from" in resumed.stdout + resumed.stderr
    full, part = metrics(two_process_run), metrics(cut)
    assert [m["step"] for m in part] == [1, 2, 3]
    for a, b in zip(full, part):
        diff = {k: (a[k], b.get(k)) for k in a if not k.startswith(TIMING) and not same(a[k], b.get(k, math.nan))}
        assert not diff, f"step {a['step']}: {diff}"


def test_skipped_weight_sync_fails_the_agreement_check_and_truncated_is_reweights(assets):
    """The deliberate counterpart: the engine keeps its first weights. Step 1 still agrees (nothing trained yet);
    from step 2 on the engine is one or more updates behind and the check fails. The truncated importance weights
    (loss.rollout_is_cap) then move away from 1.

    Measured: synced, the mean |diff| is 2-3e-7 (max 1e-6); stale, 6.5e-3 at step 2 and 1.3e-2 at step 3."""
    out = assets["root"] / "vppo_nosync"
    run(assets, "vppo", out, nproc=1, steps=3, extra=[*VLLM, "rollout.sync_weights=false", "loss.rollout_is_cap=2.0"])
    ms = metrics(out)
    assert ms[0]["rollout/logprob_abs_diff_mean"] <= AGREEMENT_MEAN_MAX
    assert ms[0]["rollout/is_weight_mean"] == pytest.approx(1.0, abs=1e-3)
    for m in ms[1:]:
        assert m["rollout/logprob_abs_diff_mean"] > AGREEMENT_MEAN_MAX, m
        assert m["rollout/logprob_frac_above_1e-3"] > 0.0
        # synced, the weights are 1 to float rounding (3e-7); stale, they move (measured 1.0004 and 0.9947)
        assert abs(m["rollout/is_weight_mean"] - 1.0) > 1e-5 and 0.0 <= m["rollout/is_capped_fraction"] <= 1.0


def test_noisyrollout_trains_through_its_split_sampling_on_the_engine(assets):
    """NoisyRollout's split sampling through the real engine (`rollouts._sample_split`: one batched call per part
    size, the clean halves and the noised halves of all prompts): vLLM takes the noised copies, answers every slot,
    and the run trains on the clean images. Which images each slot is sampled on is checked against a plain
    computation with a recording sampler (tests/test_noisyrollout.py), and that one vLLM batch answers a prompt and
    its noised copy each on its own image in vppo-rollout's test_vllm_real.py
    (`test_one_batch_with_a_prompt_and_its_noised_copy_answers_each_on_its_own_image`). Not asserted here: in this
    run the engine's log-probs differed from the trainer's (clean image) by only 2.3e-6 on average at step 1 (noise
    std 0.5, measured), so they cannot show the noise; not investigated further (the warm-started tiny model may
    simply be near-certain of its few tokens)."""
    out = assets["root"] / "noisyrollout_1proc"
    run(assets, "noisyrollout", out, nproc=1, steps=2, extra=VLLM)
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2]
    for m in ms:
        assert math.isfinite(m["loss"]) and m["grad_norm"] > 0 and m["optimizer_steps"] > 0, m
        assert m["filter/groups_kept"] == 4, m
    assert ms[0]["noisyrollout/noise_step"] == 496  # step 1 of 2 (ALGORITHMS.md §9.10); step 2 of 2 is t = 0


def test_a_lora_run_pushes_the_merged_weights_and_the_engine_agrees_with_the_trainer(assets):
    """Issue 27, `model.lora.rank=8` on the engine: after each step the engine gets W + (alpha/r)·B·A of every adapted
    layer through the layerwise reload; at step 2 (adapters trained by step 1) its log-probs of the sampled tokens
    agree with the trainer's lp_old (base + adapter, unmerged) to float rounding, which a stale or wrongly merged
    engine does not (see the skipped-sync test above)."""
    out = assets["root"] / "lora_1proc"
    lora = ["model.lora.rank=8", "model.lora.alpha=16", "optimizer.lr=1e-3"]
    run(assets, "vppo", out, nproc=1, steps=2, extra=[*VLLM, *lora, "validation.every_n_steps=0"])
    ms = metrics(out)
    assert [m["step"] for m in ms] == [1, 2] and all(m["optimizer_steps"] > 0 for m in ms)
    for m in ms:
        assert m["rollout/logprob_abs_diff_mean"] <= AGREEMENT_MEAN_MAX, m
        assert m["rollout/logprob_abs_diff_max"] < 1e-3, m
    assert (out / "checkpoints" / "step_000002" / "adapter_model.safetensors").is_file()
