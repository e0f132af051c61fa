"""In-process tests of the RL recipe's pure helpers and of its log-prob path (`rl/rl_distributed.py`).

The multi-process runs (`tune run --nproc_per_node 2`) are in test_rl_runs.py.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from omegaconf import OmegaConf

from vppo_recipes.config_schema import validate_config
from vppo_recipes.forward import response_logprobs
from vppo_recipes.rl.rl_distributed import check_batch_sizes
from vppo_recipes.rl.rollouts import chunk_ranges
from vppo_recipes.rl.step_metrics import accumulate_loss_metrics, finalize_loss_metrics, masked_quantiles
from vppo_recipes.seeding import mix_seed

CONFIGS = __import__("pathlib").Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"


def _cfg(name: str = "tiny_vppo", algorithm: dict | None = None, **overrides):
    """A shipped tiny config with `overrides` (dotted keys), its `algorithm` section replaced when given; returns
    (validated, raw)."""
    raw = OmegaConf.load(CONFIGS / f"{name}.yaml")
    if algorithm is not None:
        raw.algorithm = algorithm
    raw = OmegaConf.merge(raw, OmegaConf.from_dotlist([f"{k}={v}" for k, v in overrides.items()]))
    return validate_config(raw, "rl"), raw


@pytest.mark.parametrize("name", ["tiny_vppo", "tiny_pgpo", "tiny_dapo", "tiny_grpo"])
def test_shipped_tiny_configs_validate_and_pass_the_batch_checks(name):
    cfg, _ = _cfg(name)
    check_batch_sizes(cfg, cfg.world.nproc_per_node)
    assert cfg.algorithm.name == name.split("_")[1]


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIGS.glob("*.yaml") if not p.stem.endswith("_sft")))
def test_every_shipped_rl_config_passes_the_one_config_layer_and_its_record_validates_again(name):
    cfg, _ = _cfg(name)
    again = validate_config(OmegaConf.create(OmegaConf.to_yaml(cfg)), "rl")  # what logs/config.yaml holds
    assert again == cfg
    if cfg.algorithm.get("name") in ("dapo", "grpo"):
        assert set(cfg.algorithm) == {"name"}  # the record shows no setting the algorithm does not read


def test_tiny_configs_carry_each_algorithms_published_settings():
    vppo, dapo, grpo, pgpo = (_cfg(n)[0] for n in ("tiny_vppo", "tiny_dapo", "tiny_grpo", "tiny_pgpo"))
    assert (vppo.algorithm.beta_min, vppo.algorithm.tgf_fraction, vppo.loss.entropy_coef) == (0.9, 0.4, 0.06)
    assert (vppo.loss.clip_low, vppo.loss.clip_high, vppo.loss.dual_clip) == (0.2, 0.28, 3.0)
    assert dapo.loss.entropy_coef == 0.06 and dapo.rollout.online_filter
    assert grpo.loss.aggregation == "seq-mean-token-mean" and not grpo.rollout.online_filter
    assert (pgpo.algorithm.pgpo_tau, pgpo.algorithm.pgpo_beta, pgpo.loss.entropy_coef) == (0.4, 2.0, 0.0)
    assert pgpo.rollout.group_size == 5


@pytest.mark.parametrize(
    ("config", "key", "value", "owner"),
    [
        ("tiny_dapo", "algorithm.tas", "true", "vppo"),
        ("tiny_dapo", "algorithm.tgf_fraction", "0.2", "vppo"),  # used to run, recorded as if used
        ("tiny_grpo", "algorithm.dependency", "exact", "vppo/pgpo"),
        ("tiny_vppo", "algorithm.pgpo_tau", "0.3", "pgpo"),
        ("tiny_pgpo", "algorithm.perturbation", "noise", "vppo"),
        ("tiny_papo", "algorithm.perturb_prob", "0.5", "vppo"),  # PAPO's mask probability is mask_prob
        ("tiny_vppo", "algorithm.visual_kl_coef", "0.1", "papo/cfpo"),
        ("tiny_tor", "algorithm.vepo_fraction", "0.1", "vepo"),
    ],
)
def test_a_setting_the_chosen_algorithm_does_not_use_is_an_error_naming_both(config, key, value, owner):
    with pytest.raises(ValueError, match=rf"'{key}' is a setting of {owner}; algorithm\.name=\w+ does not use it"):
        _cfg(config, **{key: value})


def test_vppo_with_both_tas_and_tgf_off_is_rejected_as_dapo():
    with pytest.raises(ValueError, match=r"algorithm\.name=dapo"):
        _cfg("tiny_vppo", **{"algorithm.tas": "false", "algorithm.tgf": "false"})


def test_vppo_ablations_tas_only_and_tgf_only_are_accepted():
    for key in ("algorithm.tas", "algorithm.tgf"):
        _cfg("tiny_vppo", **{key: "false"})


@pytest.mark.parametrize("key", ["loss.kl_coef", "loss.kl_estimator"])
def test_removed_kl_keys_are_refused_with_the_reason(key):
    with pytest.raises(ValueError, match=rf"unknown key '{key}'.*no .*KL term.*remove it"):
        _cfg("tiny_vppo", **{key: "0.01" if key.endswith("coef") else "k3"})


@pytest.mark.parametrize(
    ("overrides", "match"),
    [
        ({"rollout.temperature": "0"}, r"rollout\.temperature=0.*must be > 0"),
        ({"rollout.group_size": "1"}, r"group_size must be >= 2"),
        ({"algorithm.tgf_fraction": "0"}, r"tgf_fraction' is 0; must be in \(0, 1\]"),
        ({"loss.rollout_is_cap": "2.0", "rollout.temperature": "0.7"}, r"rollout_is_cap .* needs rollout\.temperature"),
    ],
)
def test_settings_that_cannot_work_are_refused_before_anything_loads(overrides, match):
    with pytest.raises(ValueError, match=match):
        _cfg("tiny_vppo", **overrides)


def test_loss_and_perturbation_choices_are_vppo_cores_own():
    from vppo_core.losses import AGGREGATIONS, LOSS_TYPES
    from vppo_core.perturb import IMAGE_PERTURBATIONS, PERTURBATION_MODES
    from vppo_recipes.config_schema import schema_for

    schema = schema_for("rl", {"name": "vppo"})
    assert schema["loss"]["loss_type"].choices == LOSS_TYPES
    assert schema["loss"]["aggregation"].choices == AGGREGATIONS
    assert schema["algorithm"]["perturbation"].choices == IMAGE_PERTURBATIONS
    assert set(IMAGE_PERTURBATIONS) <= set(PERTURBATION_MODES)


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


def test_chunk_ranges_cover_everything_once():
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


@pytest.mark.parametrize("frozen", [False, True], ids=["policy", "frozen-reference"])
@pytest.mark.parametrize("n_responses", [1, 2])
def test_no_grad_passes_run_the_lm_head_as_plain_2d_matmuls_in_bf16(tiny, n_responses, frozen):
    """Issue 15: lp_old, the perturbed pass and the reference pass (no grad, bf16) once ran the LM head as a bmm on
    strided 3-D chunks against an expanded weight (35x slower on CPU). Every product that reads the LM-head weight
    must be a 2-D mm on contiguous (or transposed contiguous) operands, in both recipe functions, for a policy and
    for a frozen reference model (whose weight, needing no grad, sent the old 3-D chunks to bmm)."""
    import copy

    from torch.utils._python_dispatch import TorchDispatchMode

    from vppo_recipes.forward import exact_dependency_in_root
    from vppo_recipes.sharding import call_in_root_forward
    from vppo_rollout.collate import collate_rollout, model_inputs
    from vppo_rollout.prompts import build_prompt

    model, processor, rows = tiny
    model = copy.deepcopy(model).to(torch.bfloat16).requires_grad_(not frozen)
    head = model.lm_head.weight.untyped_storage().data_ptr()

    calls = []

    class HeadProducts(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            tensors = [a for a in args if isinstance(a, torch.Tensor)]
            if any(t.untyped_storage().data_ptr() == head for t in tensors) and func.overloadpacket.__name__ not in (
                "t", "transpose", "slice", "view", "alias", "detach", "_to_copy", "split", "_unsafe_view", "embedding",
            ):  # fmt: skip
                calls.append((func.overloadpacket.__name__, [(tuple(t.shape), t.stride()) for t in tensors]))
            return func(*args, **(kwargs or {}))

    tok = processor.tokenizer
    prompt = build_prompt(processor, rows[0]["problem"], rows[0]["images"])
    responses = [tok("<think>two red</think> \\boxed{2}")["input_ids"], tok("\\boxed{left}")["input_ids"]]
    responses = responses[:n_responses]  # one response: the [1, L, H] slice that became a bmm
    batch = collate_rollout(processor, [prompt] * n_responses, responses, config=model.config)
    inputs = model_inputs(batch)
    inputs["pixel_values"] = inputs["pixel_values"].to(torch.bfloat16)
    with torch.no_grad():
        _, hidden = call_in_root_forward(
            model, response_logprobs, inputs, batch["responses"], batch["prompt_length"], temperature=1.0,
            chunk_size=3, with_hidden=True,
        )  # fmt: skip
        with HeadProducts():
            call_in_root_forward(
                model, response_logprobs, inputs, batch["responses"], batch["prompt_length"], temperature=1.0,
                chunk_size=3,
            )  # fmt: skip
            call_in_root_forward(
                model, exact_dependency_in_root, hidden, hidden * 0.5, batch["response_mask"], temperature=1.0,
                chunk_size=3,
            )  # fmt: skip
    assert hidden.dtype == torch.bfloat16 and calls
    for name, operands in calls:
        assert name in ("mm", "addmm"), (name, operands)
        for shape, stride in operands:
            plain = len(shape) == 2 and stride in ((shape[1], 1), (1, shape[0]))  # contiguous, or its transpose
            assert plain, (name, shape, stride)


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean"])
def test_loss_metrics_over_micro_batches_and_ranks_equal_one_policy_loss_call_on_the_whole_batch(aggregation):
    """4 parts (2 micro-batches x 2 simulated ranks) with the global counts, accumulated, summed (the all-reduce)
    and finalized, equal the metrics of one `policy_loss` call on the concatenated batch. TGF keeps 40 % of the
    tokens, so a clip fraction weighted by valid tokens, or a loss share averaged again, fails this."""
    from vppo_core.losses import policy_loss
    from vppo_core.masking import tgf_mask

    g = torch.Generator().manual_seed(0)
    B, L = 8, 12
    lp_old = -torch.rand(B, L, generator=g, dtype=torch.float64) * 3
    lp_new = lp_old + 0.3 * torch.randn(B, L, generator=g, dtype=torch.float64)
    adv = torch.randn(B, generator=g, dtype=torch.float64)
    mask = (torch.rand(B, L, generator=g) < 0.8).float()
    mask[:, 0] = 1
    weights = tgf_mask(torch.rand(B, L, generator=g, dtype=torch.float64), mask, fraction=0.4).double()
    kw = {"token_weights": weights, "aggregation": aggregation, "entropy_coef": 0.06}
    _, whole = policy_loss(lp_new, lp_old, adv, mask, **kw)
    norm = {"num_tokens": mask.sum()} if aggregation == "token-mean" else {"num_sequences": (mask.sum(1) > 0).sum()}
    sums: dict[str, float] = {}
    for part in range(4):  # rows 2p, 2p+1: one micro-batch of one rank
        sl = slice(2 * part, 2 * part + 2)
        _, m = policy_loss(lp_new[sl], lp_old[sl], adv[sl], mask[sl], **{**kw, "token_weights": weights[sl]}, **norm)
        valid = mask[sl] > 0
        accumulate_loss_metrics(
            sums, m, valid_tokens=float(valid.sum()), active_tokens=float((valid & (weights[sl] != 0)).sum())
        )
    got = finalize_loss_metrics(sums, updates=1)
    for k, v in whole.items():
        if k == "num_tokens":
            continue
        assert got[k] == pytest.approx(float(v), rel=1e-6, abs=1e-9), k  # metrics are float32
    assert whole["clipfrac_high"] + whole["clipfrac_low"] > 0, "no token clipped: the weighting would be untested"


def test_finalize_averages_the_loss_shares_over_the_steps_updates():
    sums: dict[str, float] = {}
    for share in (0.25, 0.5, 0.75, 1.0):  # two updates of two micro-batches each: losses 0.75 and 1.75
        accumulate_loss_metrics(sums, {"loss": share, "entropy": 2.0}, valid_tokens=10.0, active_tokens=4.0)
    got = finalize_loss_metrics(sums, updates=2)
    assert got["loss"] == pytest.approx(1.25) and got["entropy"] == pytest.approx(2.0)


def _one_rl_step_in_process(tmp_path, config: str, overrides: dict, inspect=None, algorithm=None) -> dict:
    """Build the recipe in this process (a 1-rank gloo group) on a random tiny model and run one `rl_step`;
    then `inspect(recipe)`, if given, while the process group is still up. Returns the step's metrics."""
    import torch.distributed as dist

    import vppo_recipes.rl.rl_distributed as rl
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "tiny", "qwen2_5_vl", seed=0)
    build_visual_task(tmp_path / "task", n_train=8, n_test=2, seed=0, tasks=("side",))
    small = {
        "model.path": ckpt,
        "data.source": tmp_path / "task",
        "world.nproc_per_node": 1,
        "validation.every_n_steps": 0,
        "rollout.group_size": 2,
        "rollout.batch_prompts": 2,
        "rollout.max_filter_draws": 0,
        "rollout.max_new_tokens": 6,
        "batch.update_prompts": 2,
        "batch.micro_batch_size": 2,
        "metric_logger.log_dir": tmp_path / "logs",
    }
    cfg, _ = _cfg(config, algorithm, output_dir=tmp_path / "run", **{**small, **overrides})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        recipe = rl.RLRecipeDistributed(cfg)
        recipe.setup(cfg)
        metrics = recipe.rl_step()
        if inspect is not None:
            inspect(recipe)
        recipe.metric_logger.close()
    finally:
        dist.destroy_process_group()
    return metrics


def _recording_policy_loss(monkeypatch, seen: list):
    """Make the recipe's `policy_loss` record (lp_new, lp_old, mask) of every call."""
    import vppo_recipes.rl.rl_distributed as rl
    from vppo_core.losses import policy_loss

    def recording(lp_new, lp_old, advantages, mask, **kwargs):
        seen.append((lp_new.detach().clone(), lp_old.clone(), mask.clone()))
        return policy_loss(lp_new, lp_old, advantages, mask, **kwargs)

    monkeypatch.setattr(rl, "policy_loss", recording)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    ("config", "overrides"),
    [
        ("tiny_vppo", {}),
        ("tiny_vppo", {"algorithm.dependency": "exact"}),
        ("tiny_pgpo", {}),
        ("tiny_dapo", {}),
        ("tiny_grpo", {}),
        ("tiny_dapo", {"loss.loss_type": "gspo", "loss.aggregation": "seq-mean-token-mean"}),
    ],
)
def test_old_logprobs_come_from_the_update_batch_shape_so_the_first_ratio_is_exactly_one(
    tmp_path, monkeypatch, config, overrides, dtype
):
    """lp_old and the first mini-batch's lp_new are the same function of the same weights on the same rows: they must
    be bitwise equal (ratio exactly 1, approx-KL exactly 0), for every algorithm and loss, in float32 and in bf16
    (FSDP2 mixed precision). Any difference in what the two passes see (inputs, temperature, positions, weights,
    batch shape) fails this; the next test shows a batch shape that differs does."""
    seen = []
    _recording_policy_loss(monkeypatch, seen)
    # no online filter: the random model's groups (all rewards 0) are kept, with advantage 0, and updated on
    _one_rl_step_in_process(tmp_path, config, {"rollout.online_filter": "false", "model.dtype": dtype, **overrides})
    assert seen, "no update ran"
    for lp_new, lp_old, mask in seen:  # one mini-batch: every call is before the first optimizer step
        assert torch.equal(lp_new * mask, lp_old * mask), float(((lp_new - lp_old) * mask).abs().max())


def _batch_shape_dependent_linear(self, x):
    """nn.Linear whose rounding depends on how many rows share the call, as GPU GEMMs' does (cuBLAS picks its
    split-K reduction by shape, and bf16 makes the difference visible): the inner dimension is summed in one piece
    when the row count has an even bit length, in two otherwise, so doubling the rows always changes the order."""
    rows = x.numel() // x.shape[-1]
    if rows.bit_length() % 2 == 0:
        return torch.nn.functional.linear(x, self.weight, self.bias)
    k = x.shape[-1] // 2
    out = torch.nn.functional.linear(x[..., k:], self.weight[:, k:], self.bias)
    return torch.nn.functional.linear(x[..., :k], self.weight[:, :k]) + out


# micro-batches by token budget: the task's prompts are 79 tokens and responses at most 6 (rows of 80-85 positions),
# so 255 positions hold 3 rows: the 4 rows of the mini-batch go as 3 + 1, longest first (not 2 + 2 in data order)
TOKEN_BUDGET = {"data.max_prompt_length": 80, "batch.max_tokens_per_micro_batch": 255, "batch.micro_batch_size": 4}


@pytest.mark.parametrize("split", [{}, TOKEN_BUDGET], ids=["fixed", "token_budget"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_with_batch_shape_dependent_kernels_a_stacked_old_pass_fails_and_the_recipes_does_not(
    tmp_path, monkeypatch, dtype, split
):
    """This CPU's kernels give a row the same bits whatever the batch (measured: the stacked 2b-row pass VPPO's
    lp_old used to come from matched the b-row pass bitwise in float32 and bf16), so the previous test alone could
    not tell the two designs apart. Here every nn.Linear rounds by batch shape, as on a GPU. Then:
    - the recipe's lp_old still equals the first update's lp_new bitwise (ratio exactly 1), with fixed micro-batches
      and with micro-batches by token budget (the no-grad passes use the update's grouping);
    - the clean half of a stacked [clean; perturbed] pass, the old lp_old, does not."""
    import vppo_recipes.rl.rl_distributed as rl
    from vppo_recipes.sharding import call_in_root_forward

    monkeypatch.setattr(torch.nn.Linear, "forward", _batch_shape_dependent_linear)
    seen, captured = [], {}
    _recording_policy_loss(monkeypatch, seen)
    no_grad_passes = rl.RLRecipeDistributed.no_grad_passes

    def recording_passes(self, minis):
        captured["minis"] = minis
        return no_grad_passes(self, minis)

    monkeypatch.setattr(rl.RLRecipeDistributed, "no_grad_passes", recording_passes)

    def stacked_clean_half(recipe):  # optimizer.lr=0: the weights are still those of the no-grad passes
        mb = captured["minis"][0][0]
        both = {
            k: torch.cat([v, recipe.view_inputs(mb, 0).inputs[k]], dim=1 if k == "position_ids" else 0)
            for k, v in mb.inputs.items()
        }
        with torch.no_grad():
            lp, _ = call_in_root_forward(
                recipe.model, response_logprobs, both, torch.cat([mb.responses, mb.responses]), mb.prompt_length,
                temperature=recipe.temperature, chunk_size=recipe.chunk_size,
            )  # fmt: skip
        captured["stacked"] = lp[: mb.responses.shape[0]]

    _one_rl_step_in_process(
        tmp_path,
        "tiny_vppo",
        {"rollout.online_filter": "false", "model.dtype": dtype, "optimizer.lr": 0.0, **split},
        inspect=stacked_clean_half,
    )
    assert seen, "no update ran"
    for lp_new, lp_old, mask in seen:
        assert torch.equal(lp_new * mask, lp_old * mask), float(((lp_new - lp_old) * mask).abs().max())
    lp_new, _, mask = seen[0]  # the first micro-batch's update pass
    assert not torch.equal(captured["stacked"] * mask, lp_new * mask), "a stacked pass would have passed too"


def _tensors(value) -> list[torch.Tensor]:
    """Every tensor inside a phase's result (dataclasses, lists, tuples, dicts), in a fixed order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if dataclasses.is_dataclass(value):
        return [t for f in dataclasses.fields(value) for t in _tensors(getattr(value, f.name))]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _tensors(value[k])]
    return []


@pytest.mark.parametrize(
    ("config", "overrides"),
    [("tiny_vppo", {}), ("tiny_pgpo", {}), ("tiny_dapo", {"loss.rollout_is_cap": 2.0})],
)
def test_each_phase_returns_frozen_values_that_no_later_phase_changes(tmp_path, monkeypatch, config, overrides):
    """rl_step's phases hand frozen dataclasses to each other, and no phase writes into an earlier one's tensors
    in place: every tensor a phase returned is bitwise what it was when returned, after the whole step."""
    import vppo_recipes.rl.rl_distributed as rl
    from vppo_recipes.methods import records

    for cls in (rl.Draw, rl.Group, rl.Rollouts, rl.UpdateResult, records.MicroBatch, records.NoGradPass,
                records.Shaping, records.Shaped, records.MicroStep):  # fmt: skip
        assert cls.__dataclass_params__.frozen, cls
    returned = []
    for name in ("generate_rollouts", "prepare_minibatches", "no_grad_passes", "shape"):
        phase = getattr(rl.RLRecipeDistributed, name)

        def recording(self, *args, phase=phase, name=name):
            out = phase(self, *args)
            returned.append((name, out, [t.detach().clone() for t in _tensors(out)]))
            return out

        monkeypatch.setattr(rl.RLRecipeDistributed, name, recording)
    from _rl_rewards import alternate_rewards

    alternate_rewards(monkeypatch)  # the random model earns 0 everywhere: no update otherwise
    _one_rl_step_in_process(tmp_path, config, {"rollout.online_filter": "false", **overrides})
    assert {name for name, _, _ in returned} == {"generate_rollouts", "prepare_minibatches", "no_grad_passes", "shape"}
    for name, out, snapshot in returned:
        now = _tensors(out)
        assert len(now) == len(snapshot) and all(torch.equal(a, b) for a, b in zip(now, snapshot)), name


@pytest.mark.parametrize("multiple_choice", [False, True])
def test_the_recipe_grades_with_the_configured_reward(tmp_path, monkeypatch, multiple_choice):
    """`reward.multiple_choice` reaches the reward of every rollout (the paper's reward is false, the default)."""
    import vppo_recipes.rl.rollouts as rollouts
    from vppo_eval.reward import compute_rewards

    assert _cfg("tiny_vppo")[0].reward.multiple_choice is False
    seen = []

    def recording(*args, **kwargs):
        seen.append(kwargs["multiple_choice"])
        return compute_rewards(*args, **kwargs)

    monkeypatch.setattr(rollouts, "compute_rewards", recording)
    _one_rl_step_in_process(tmp_path, "tiny_vppo", {"reward.multiple_choice": str(multiple_choice).lower()})
    assert seen and set(seen) == {multiple_choice}


def _count_vppo_conversions(calls: list[str]):
    """Patch torch.Tensor's conversions to Python values to record the ones made by vppo code (not by transformers'
    model internals), as "file:line"; returns a function that restores the originals."""
    import sys as _sys

    names = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    originals = {name: getattr(torch.Tensor, name) for name in names}

    def counting(name):
        def method(self, *args, **kwargs):
            caller = _sys._getframe(1)
            if "vppo_" in caller.f_code.co_filename:
                calls.append(f"{caller.f_code.co_filename.rsplit('/', 1)[-1]}:{caller.f_lineno}")
            return originals[name](self, *args, **kwargs)

        return method

    for name in names:
        setattr(torch.Tensor, name, counting(name))

    def restore():
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)

    return restore


@pytest.mark.parametrize("config", ["tiny_vppo", "tiny_pgpo", "tiny_grpo"])
def test_one_update_syncs_with_the_host_a_fixed_number_of_times_whatever_the_micro_batches(
    tmp_path, monkeypatch, config
):
    """The update of one mini-batch (4 responses) with 4 micro-batches of 1 and with 1 micro-batch of 4: the same
    small number of tensor-to-Python conversions by vppo code (transformers' own inside the forward not counted)."""
    import vppo_recipes.rl.rl_distributed as rl

    update = rl.RLRecipeDistributed._update_mini_batch
    counts = {}
    for micro in (1, 4):
        calls: list[str] = []

        def counted(self, *args, calls=calls):
            restore = _count_vppo_conversions(calls)
            try:
                return update(self, *args)
            finally:
                restore()

        monkeypatch.setattr(rl.RLRecipeDistributed, "_update_mini_batch", counted)
        _one_rl_step_in_process(
            tmp_path / f"micro{micro}",
            config,
            {"rollout.online_filter": "false", "rollout.group_size": 4, "batch.micro_batch_size": micro},
        )
        counts[micro] = calls
    assert counts[1], "no update ran"
    assert len(counts[1]) == len(counts[4]) <= 2, counts  # the token count; the loss with the grad norm


# --------------------------------------------------------------------------------------------------------------------
# Resuming with a changed config
# --------------------------------------------------------------------------------------------------------------------


def _train_in_process(root, config: str, overrides: dict) -> list[dict]:
    """setup + train of the recipe in this process (a 1-rank gloo group) on a random tiny model; its logged metrics.

    root holds the model and the data (built once) and the run's output_dir, so calls with the same root resume."""
    import torch.distributed as dist

    import vppo_recipes.rl.rl_distributed as rl
    from vppo_eval.synthetic import build_visual_task
    from vppo_recipes.metric_logging import read_jsonl
    from vppo_rollout.tiny import build_tiny_checkpoint

    if not (root / "tiny").exists():
        build_tiny_checkpoint(root / "tiny", "qwen2_5_vl", seed=0)
        build_visual_task(root / "task", n_train=8, n_test=2, seed=0, tasks=("side",))
    small = {
        "model.path": root / "tiny",
        "data.source": root / "task",
        "world.nproc_per_node": 1,
        "validation.every_n_steps": 0,
        "rollout.group_size": 2,
        "rollout.batch_prompts": 2,
        "rollout.max_new_tokens": 4,
        "rollout.online_filter": "false",
        "batch.update_prompts": 2,
        "batch.micro_batch_size": 2,
        "training.save_every_n_steps": 1,
        "metric_logger.log_dir": root / "run" / "logs",
    }
    cfg, _ = _cfg(config, output_dir=root / "run", **{**small, **overrides})
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        recipe = rl.RLRecipeDistributed(cfg)
        recipe.setup(cfg)
        recipe.train()
        recipe.metric_logger.close()
    finally:
        dist.destroy_process_group()
    return read_jsonl(root / "run" / "logs" / "metrics.jsonl")


def test_resume_with_a_changed_lr_or_algorithm_is_refused_naming_the_keys_and_the_flag(tmp_path):
    """A changed optimizer.lr used to be ignored on resume while logs/config.yaml claimed it; a changed algorithm
    was accepted without a word."""
    _train_in_process(tmp_path, "tiny_dapo", {"training.max_steps": 1, "optimizer.lr": 1e-4})
    with pytest.raises(ValueError, match=r"(?s)optimizer.lr: checkpoint 0.0001, now 0.001.*accept_config_changes=true"):
        _train_in_process(tmp_path, "tiny_dapo", {"training.max_steps": 2, "optimizer.lr": 1e-3})
    with pytest.raises(ValueError, match=r"algorithm.name: checkpoint 'dapo', now 'grpo'"):
        _train_in_process(tmp_path, "tiny_grpo", {"training.max_steps": 2, "optimizer.lr": 1e-4})


def test_an_accepted_lr_change_takes_effect_and_every_launch_keeps_its_config_record(tmp_path):
    first = _train_in_process(tmp_path, "tiny_dapo", {"training.max_steps": 1, "optimizer.lr": 1e-4})
    assert [m["lr"] for m in first] == [1e-4]
    # extending the run (max_steps) is not a change of what is trained: no flag needed
    second = _train_in_process(tmp_path, "tiny_dapo", {"training.max_steps": 2, "optimizer.lr": 1e-4})
    assert [m["lr"] for m in second] == [1e-4, 1e-4]
    third = _train_in_process(
        tmp_path, "tiny_dapo", {"training.max_steps": 3, "optimizer.lr": 1e-3, "training.accept_config_changes": "true"}
    )
    assert [m["lr"] for m in third] == [1e-4, 1e-4, 1e-3]
    logs = tmp_path / "run" / "logs"
    records = [OmegaConf.load(logs / name) for name in ("config.yaml", "config.2.yaml", "config.3.yaml")]
    assert [r.optimizer.lr for r in records] == [1e-4, 1e-4, 1e-3]
    assert [r.training.max_steps for r in records] == [1, 2, 3]


# --------------------------------------------------------------------------------------------------------------------
# Steps that cannot learn: counted, never applied, never a crash
# --------------------------------------------------------------------------------------------------------------------


def test_a_step_whose_groups_are_all_filtered_out_is_counted_and_updates_nothing(tmp_path):
    """The random model earns reward 0 everywhere, so the online filter drops every group (and the capped extra
    draws): no update, `skipped/steps_without_groups` = 1 (once, not once per rank), the run goes on."""
    weights = {}

    def snapshot(recipe):
        weights["after"] = [p.detach().clone() for p in recipe.model.parameters()]

    metrics = _one_rl_step_in_process(
        tmp_path, "tiny_dapo", {"rollout.online_filter": "true", "rollout.max_filter_draws": 1}, inspect=snapshot
    )
    assert metrics["skipped/steps_without_groups"] == 1.0
    assert metrics["filter/groups_dropped"] == metrics["filter/groups_sampled"] == 4  # 2 draws of 2 prompts
    assert metrics["filter/groups_kept"] == 0 and metrics["optimizer_steps"] == 0.0
    assert math.isnan(metrics["loss"])


def test_a_non_finite_update_is_skipped_counted_and_never_applied(tmp_path, monkeypatch):
    import vppo_recipes.rl.rl_distributed as rl
    from vppo_core.losses import policy_loss

    def poisoned(*args, **kwargs):
        loss, metrics = policy_loss(*args, **kwargs)
        return loss * float("nan"), metrics

    monkeypatch.setattr(rl, "policy_loss", poisoned)
    state = {}

    def weights(recipe):
        state["path"] = recipe._cfg.model.path
        state["after"] = {
            k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in recipe.model.state_dict().items()
        }

    metrics = _one_rl_step_in_process(tmp_path, "tiny_dapo", {"rollout.online_filter": "false"}, inspect=weights)
    assert metrics["skipped/nonfinite_updates"] == 1.0 and metrics["optimizer_steps"] == 0.0
    from vppo_rollout.loading import load_policy

    before = load_policy(state["path"]).state_dict()
    assert before.keys() == state["after"].keys()
    assert all(torch.equal(before[k], v) for k, v in state["after"].items())


def test_no_token_or_key_from_the_environment_is_written_into_a_run(tmp_path, monkeypatch):
    """HF_TOKEN / WANDB_API_KEY in the environment must not reach the config record, metrics or checkpoints."""
    secrets = {
        "HF_TOKEN": "hf_SECRETabc123",
        "WANDB_API_KEY": "0123456789abcdefSECRET",
        "HUGGING_FACE_HUB_TOKEN": "hf_OTHERsecret",
    }
    for key, value in secrets.items():
        monkeypatch.setenv(key, value)
    _train_in_process(tmp_path, "tiny_dapo", {"training.max_steps": 1})
    written = [f for f in (tmp_path / "run").rglob("*") if f.is_file()]
    assert any(f.name == "config.yaml" for f in written) and any(f.name == "model.safetensors" for f in written)
    for f in written:
        data = f.read_bytes()
        for value in secrets.values():
            assert value.encode() not in data, f"{value} written into {f}"


def test_pgpo_switches_reach_the_token_weights(tmp_path, monkeypatch):
    """algorithm.pgpo_threshold_mode / pgpo_weight_floor / pgpo_mass_normalization reach pgpo_token_weights."""
    import vppo_recipes.methods.pgpo as pgpo

    seen = []
    weights = pgpo.pgpo_token_weights

    def recording(S, mask, **kwargs):
        seen.append(kwargs)
        return weights(S, mask, **kwargs)

    monkeypatch.setattr(pgpo, "pgpo_token_weights", recording)
    switches = {
        "algorithm.pgpo_threshold_mode": "quantile",
        "algorithm.pgpo_weight_floor": 0.1,
        "algorithm.pgpo_mass_normalization": "false",
    }
    _one_rl_step_in_process(tmp_path, "tiny_pgpo", {"rollout.online_filter": "false", **switches})
    assert seen and all(
        (k["threshold_mode"], k["weight_floor"], k["mass_normalization"]) == ("quantile", 0.1, False) for k in seen
    )
    with pytest.raises(ValueError, match=r"algorithm\.pgpo_weight_floor.*algorithm\.name=dapo does not use it"):
        _cfg("tiny_dapo", **{"algorithm.pgpo_weight_floor": 0.1})


def test_an_update_made_non_finite_by_clipping_is_skipped_counted_and_never_applied(tmp_path, monkeypatch):
    """Issue 23: `training.grad_clip=.nan` trained to the end and saved all-NaN weights: the guard read the norm
    clip_grad_norm_ returns (before clipping, finite) while the clip had scaled the gradients by NaN. The config now
    refuses a NaN grad_clip; here the clip itself is given NaN, so the guard must catch it from the clipped grads."""
    real_clip = torch.nn.utils.clip_grad_norm_
    monkeypatch.setattr(torch.nn.utils, "clip_grad_norm_", lambda params, max_norm, **kw: real_clip(params, math.nan))
    state = {}

    def weights(recipe):
        state["path"] = recipe._cfg.model.path
        state["after"] = {k: v.full_tensor().detach().clone() for k, v in recipe.model.state_dict().items()}

    metrics = _one_rl_step_in_process(tmp_path, "tiny_dapo", {"rollout.online_filter": "false"}, inspect=weights)
    assert metrics["skipped/nonfinite_updates"] == 1.0 and metrics["optimizer_steps"] == 0.0
    from vppo_rollout.loading import load_policy

    before = load_policy(state["path"]).state_dict()
    assert all(torch.equal(before[k], v) for k, v in state["after"].items())


def test_rows_whose_prompt_cannot_be_built_are_counted_skips_and_the_rl_step_trains_on_the_rest(tmp_path, capsys):
    """Issue 23: one training row with two <image> placeholders for one image, or one 10000x10 image, ended the run
    with an error naming neither the row nor the file; now each is skipped as bad_prompt, named on stderr with its
    row and file, counted in total/skipped_rows/bad_prompt, and the step runs on the good rows."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from _bad_rows import write_rows

    source = write_rows(tmp_path / "bad", ["two_placeholders", "wide", "good", "good"])
    metrics = _one_rl_step_in_process(
        tmp_path, "tiny_dapo", {"rollout.online_filter": "false", "data.source": source, "data.shuffle": "false"}
    )
    assert metrics["total/skipped_rows/bad_prompt"] == 2.0
    err = capsys.readouterr().err
    assert f"skipped row 0 of {source} (split train): bad_prompt: row 0: question: has 2 '<image>' placeholders" in err
    assert f"skipped row 1 of {source} (split train): bad_prompt: row 1: image aspect ratio must be < 200" in err
