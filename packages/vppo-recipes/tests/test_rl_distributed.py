"""In-process tests of the RL recipe's pure helpers and of its log-prob path (`rl/rl_distributed.py`).

The multi-process runs (`tune run --nproc_per_node 2`) are in test_rl_runs.py.
"""

from __future__ import annotations

import math

import pytest
import torch
from omegaconf import OmegaConf

from vppo_recipes.config_schema import validate_config
from vppo_recipes.rl.rl_distributed import (
    check_algorithm,
    check_batch_sizes,
    chunk_ranges,
    masked_quantiles,
    mix_seed,
    response_logprobs,
    split_evenly,
)

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"


def _cfg(name: str = "tiny_vppo", **overrides):
    raw = OmegaConf.load(CONFIGS / f"{name}.yaml")
    raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    return validate_config(raw, "rl"), raw


@pytest.mark.parametrize("name", ["tiny_vppo", "tiny_pgpo", "tiny_dapo", "tiny_grpo"])
def test_shipped_tiny_configs_validate_and_pass_the_algorithm_checks(name):
    cfg, raw = _cfg(name)
    check_algorithm(cfg, raw)
    check_batch_sizes(cfg, cfg.world.nproc_per_node)
    assert cfg.algorithm.name == name.split("_")[1]


def test_tiny_configs_carry_each_algorithms_published_settings():
    vppo, dapo, grpo, pgpo = (_cfg(n)[0] for n in ("tiny_vppo", "tiny_dapo", "tiny_grpo", "tiny_pgpo"))
    assert (vppo.algorithm.beta_min, vppo.algorithm.tgf_fraction, vppo.loss.entropy_coef) == (0.9, 0.4, 0.06)
    assert (vppo.loss.clip_low, vppo.loss.clip_high, vppo.loss.dual_clip) == (0.2, 0.28, 3.0)
    assert dapo.loss.entropy_coef == 0.06 and dapo.rollout.online_filter
    assert grpo.loss.aggregation == "seq-mean-token-mean" and not grpo.rollout.online_filter
    assert (pgpo.algorithm.pgpo_tau, pgpo.algorithm.pgpo_beta, pgpo.loss.entropy_coef) == (0.4, 2.0, 0.0)
    assert pgpo.rollout.group_size == 5


def test_tas_or_tgf_set_explicitly_for_a_baseline_is_an_error_naming_the_key():
    cfg, raw = _cfg("tiny_dapo", **{"algorithm.tas": "true"})
    with pytest.raises(ValueError, match=r"algorithm\.tas=true"):
        check_algorithm(cfg, raw)


def test_vppo_with_both_tas_and_tgf_off_is_rejected_as_dapo():
    cfg, raw = _cfg("tiny_vppo", **{"algorithm.tas": "false", "algorithm.tgf": "false"})
    with pytest.raises(ValueError, match=r"algorithm\.name=dapo"):
        check_algorithm(cfg, raw)


def test_vppo_ablations_tas_only_and_tgf_only_are_accepted():
    for key in ("algorithm.tas", "algorithm.tgf"):
        cfg, raw = _cfg("tiny_vppo", **{key: "false"})
        check_algorithm(cfg, raw)


def test_kl_term_without_reference_policy_is_an_error():
    cfg, raw = _cfg("tiny_vppo", **{"loss.kl_coef": "0.01"})
    with pytest.raises(ValueError, match=r"loss\.kl_coef"):
        check_algorithm(cfg, raw)


def test_update_batch_must_split_over_ranks_and_divide_the_rollout_batch():
    cfg, _ = _cfg("tiny_vppo", **{"batch.update_prompts": "3", "rollout.batch_prompts": "6"})
    with pytest.raises(ValueError, match=r"batch\.update_prompts=3"):
        check_batch_sizes(cfg, 2)
    cfg, _ = _cfg("tiny_vppo", **{"batch.update_prompts": "4", "rollout.batch_prompts": "6"})
    with pytest.raises(ValueError, match=r"rollout\.batch_prompts=6"):
        check_batch_sizes(cfg, 2)


def test_mix_seed_is_deterministic_31_bit_and_separates_nearby_inputs():
    assert mix_seed(0, 1) == mix_seed(0, 1)
    seeds = {mix_seed(0, uid, j) for uid in range(50) for j in range(8)}
    assert len(seeds) == 400
    assert all(0 <= s < 2**31 for s in seeds)
    assert mix_seed(0, 1, 2) != mix_seed(0, 2, 1)


def test_split_evenly_and_chunk_ranges_cover_everything_once():
    assert [split_evenly(8, 2, r) for r in (0, 1)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ValueError):
        split_evenly(5, 2, 0)
    assert chunk_ranges(5, 2) == [slice(0, 2), slice(2, 4), slice(4, 5)]
    assert chunk_ranges(0, 2) == []


def test_masked_quantiles_match_torch_quantile():
    x = torch.rand(1001, generator=torch.Generator().manual_seed(0))
    got = masked_quantiles(x, (0.5, 0.9))
    want = torch.quantile(x.double(), torch.tensor([0.5, 0.9], dtype=torch.float64)).tolist()
    assert got == pytest.approx(want, abs=1e-12)
    assert all(math.isnan(v) for v in masked_quantiles(torch.zeros(0), (0.5,)))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("rl_unit")
    ckpt = build_tiny_checkpoint(root / "ckpt", "qwen2_5_vl", seed=0)
    task = build_visual_task(root / "task", n_train=4, n_test=1, seed=0)
    return load_policy(ckpt), load_processor(ckpt), task["train"]


def test_response_logprobs_equal_log_softmax_of_the_full_logits_at_positions_p_minus_1(tiny):
    """The chunked hidden-state path reads the logit of response token j at position P-1+j, like HF's logits."""
    from vppo_recipes.sharding import call_in_root_forward
    from vppo_rollout.collate import collate_rollout, model_inputs
    from vppo_rollout.prompts import build_prompt

    model, processor, rows = tiny
    tok = processor.tokenizer
    prompts = [build_prompt(processor, rows[i]["problem"], rows[i]["images"]) for i in range(2)]
    responses = [tok("<think>two red</think> \\boxed{2}")["input_ids"], tok("\\boxed{left}")["input_ids"], []]
    batch = collate_rollout(processor, [prompts[0], prompts[1], prompts[1]], responses, config=model.config)
    inputs = model_inputs(batch)
    with torch.no_grad():
        lp, hidden = call_in_root_forward(
            model, response_logprobs, inputs, batch["responses"], batch["prompt_length"], temperature=1.0,
            chunk_size=3, with_hidden=True,
        )  # fmt: skip
        logits = model(**inputs).logits
    P, L = batch["prompt_length"], batch["responses"].shape[1]
    want = torch.log_softmax(logits[:, P - 1 : P - 1 + L].float(), -1).gather(-1, batch["responses"][..., None])[..., 0]
    valid = batch["response_mask"].bool()
    assert valid.sum(1).tolist() == [len(r) for r in responses]
    torch.testing.assert_close(lp[valid], want[valid], atol=2e-6, rtol=0)
    assert hidden.shape == (3, L, model.config.text_config.hidden_size)
