"""Config validation: unknown keys name the closest valid key, wrong types and values are errors, before compute."""

from __future__ import annotations

import copy
import re
from pathlib import Path

import pytest
from omegaconf import OmegaConf

from vppo_recipes.config_schema import ConfigError, check_world_size, schema_for, validate_config

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"

# The contract's draft of the tiny VPPO config: the RL schema must accept it as is.
RL_DRAFT = """
output_dir: ./runs/tiny_vppo
seed: 0
model: {path: ./runs/tiny_ckpt, arch: qwen2_5_vl, dtype: float32, trust_remote_code: false,
        min_pixels: 3136, max_pixels: 12544}
world: {nnodes: 1, nproc_per_node: 2, hsdp_replicas: 1}
data: {source: ./runs/visual_task, split: train, columns: {question: problem, answer: answer, images: images},
       max_prompt_length: 256, shuffle: true}
validation: {source: ./runs/visual_task, split: test, every_n_steps: 5, k: 2, limit: null}
rollout: {engine: transformers, group_size: 8, batch_prompts: 8, temperature: 1.0, top_p: 0.99, top_k: -1,
          max_new_tokens: 64, online_filter: true, max_filter_draws: 4, gpu_memory_utilization: 0.35}
reward: {format_weight: 0.1}
batch: {update_prompts: 4, micro_batch_size: 4}
algorithm: {name: vppo, perturbation: blacken, perturb_prob: 0.5, tas: true, beta_min: 0.9, tas_statistics: global,
            tgf: true, tgf_fraction: 0.4, dependency: sampled}
loss: {loss_type: dapo, aggregation: token-mean, clip_low: 0.2, clip_high: 0.28, dual_clip: 3.0, entropy_coef: 0.06,
       chunk_size: 1024}
optimizer: {_component_: torch.optim.AdamW, lr: 1.0e-6, weight_decay: 0.01}
lr_scheduler: {warmup_steps: 0}
training: {max_steps: 4, epochs: 1, grad_clip: 1.0, activation_checkpointing: false, save_every_n_steps: 2,
           resume: auto}
metric_logger: {_component_: vppo_recipes.metric_logging.JsonlLogger, log_dir: "${output_dir}/logs"}
log_every_n_steps: 1
"""


@pytest.fixture
def rl_cfg():
    return OmegaConf.create(RL_DRAFT)


@pytest.fixture
def sft_cfg():
    return OmegaConf.load(CONFIGS / "tiny_sft.yaml")


def _errors(cfg, recipe):
    with pytest.raises(ConfigError) as info:
        validate_config(cfg, recipe)
    return str(info.value)


def test_contract_rl_draft_and_shipped_sft_config_are_valid(rl_cfg, sft_cfg):
    assert validate_config(rl_cfg, "rl").algorithm.name == "vppo"
    assert validate_config(sft_cfg, "sft").batch.batch_size == 16


def test_every_shipped_config_is_valid_for_its_recipe():
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = OmegaConf.load(path)
        validate_config(cfg, "rl" if "rollout" in cfg else "sft")


def test_misspelled_key_names_the_key_and_closest_valid_key(sft_cfg):
    sft_cfg.training.max_step = sft_cfg.training.pop("max_steps")
    msg = _errors(sft_cfg, "sft")
    assert "unknown key 'training.max_step'" in msg
    assert "did you mean 'training.max_steps'" in msg
    assert "missing key 'training.max_steps'" in msg


def test_key_in_wrong_section_points_to_the_section_that_has_it(rl_cfg):
    rl_cfg.training.weight_decay = 0.1
    assert "did you mean 'optimizer.weight_decay'" in _errors(rl_cfg, "rl")


def test_key_known_under_another_name_gets_this_projects_name(rl_cfg):
    rl_cfg.training.dtype = "bfloat16"
    assert "this project calls it 'model.dtype'" in _errors(rl_cfg, "rl")


def test_rl_only_section_is_unknown_to_sft(sft_cfg):
    sft_cfg.rollout = {"group_size": 8}
    assert "unknown key 'rollout'" in _errors(sft_cfg, "sft")


@pytest.mark.parametrize(
    ("path", "value", "expect"),
    [
        ("training.max_steps", "ten", "'training.max_steps' has type str"),
        ("training.max_steps", True, "'training.max_steps' has type bool"),
        ("optimizer.lr", "fast", "'optimizer.lr' has type str"),
        ("data.shuffle", 1, "'data.shuffle' has type int"),
        ("model.arch", "llava", "'model.arch' is 'llava'; allowed values: 'qwen2_5_vl', 'qwen3_vl'"),
        ("training.max_steps", 0, "'training.max_steps' is 0; must be >= 1"),
        ("model.path", None, "'model.path' is null"),
    ],
)
def test_wrong_type_value_or_range_is_an_error_naming_the_key(sft_cfg, path, value, expect):
    OmegaConf.update(sft_cfg, path, value, force_add=True)
    assert expect in _errors(sft_cfg, "sft")


def test_int_is_accepted_where_float_is_expected(sft_cfg):
    sft_cfg.optimizer.lr = 1
    assert validate_config(sft_cfg, "sft").optimizer.lr == 1


def test_all_problems_are_reported_together(rl_cfg):
    rl_cfg.rollout.group_sise = 8
    rl_cfg.loss.clip_low = "x"
    rl_cfg.algorithm.name = "ppo"
    msg = _errors(rl_cfg, "rl")
    assert "3 problem(s)" in msg
    assert "did you mean 'rollout.group_size'" in msg


def test_optimizer_kwargs_are_checked_against_the_components_signature(sft_cfg):
    sft_cfg.optimizer.betas = [0.9, 0.95]  # a real AdamW argument: accepted
    validate_config(sft_cfg, "sft")
    sft_cfg.optimizer.weight_decy = 0.1
    assert "unknown key 'optimizer.weight_decy'" in _errors(sft_cfg, "sft")
    assert "did you mean 'optimizer.weight_decay'" in _errors(sft_cfg, "sft")


def test_component_that_cannot_be_imported_is_an_error(sft_cfg):
    sft_cfg.optimizer._component_ = "torch.optim.AdamWW"
    sft_cfg.optimizer.eps = 1e-8
    assert "'optimizer._component_' = 'torch.optim.AdamWW' cannot be imported" in _errors(sft_cfg, "sft")


def test_missing_optional_keys_are_filled_with_defaults(sft_cfg):
    del sft_cfg.model.trust_remote_code
    del sft_cfg.data.columns
    out = validate_config(sft_cfg, "sft")
    assert out.model.trust_remote_code is False
    assert dict(out.data.columns) == {"question": "problem", "answer": "answer", "images": "images", "response": None}


def test_unresolvable_interpolation_is_reported(sft_cfg):
    sft_cfg.metric_logger.log_dir = "${nowhere}/logs"
    assert "interpolation" in _errors(sft_cfg, "sft")


def test_validation_does_not_mutate_its_input(sft_cfg):
    before = copy.deepcopy(OmegaConf.to_container(sft_cfg))
    validate_config(sft_cfg, "sft")
    assert OmegaConf.to_container(sft_cfg) == before


def test_schema_for_unknown_recipe_is_an_error():
    with pytest.raises(ValueError, match="recipe must be 'rl' or 'sft'"):
        schema_for("dpo")


def test_world_size_mismatch_is_an_error_with_the_fix(sft_cfg):
    check_world_size(sft_cfg, 2)
    with pytest.raises(ConfigError, match=r"set world\.nproc_per_node=4"):
        check_world_size(sft_cfg, 4)


@pytest.mark.parametrize("component", ["torchao.optim.AdamW8bit", "torchao.optim.AdamW4bit", "torchao.optim._AdamW"])
def test_torchao_low_memory_optimizers_are_accepted(component):
    cfg = OmegaConf.load(CONFIGS / "tiny_vppo.yaml")
    cfg.optimizer = {"_component_": component, "lr": 1e-6}
    validate_config(cfg, "rl")


def test_bf16_stochastic_rounding_is_refused_before_compute_with_the_reason():
    cfg = OmegaConf.load(CONFIGS / "tiny_vppo.yaml")
    cfg.optimizer = {"_component_": "torchao.optim._AdamW", "lr": 1e-6, "bf16_stochastic_round": True}
    with pytest.raises(ConfigError, match=r"bf16_stochastic_round=true is not supported.*pytorch/ao#2296"):
        validate_config(cfg, "rl")


@pytest.mark.parametrize(
    ("config", "overrides", "message"),
    [
        ("tiny_cgpo", {"algorithm.cgpo_coef": 1.5}, r"algorithm\.cgpo_coef"),  # α = 1 − λ would be negative
        ("tiny_dvrp", {"algorithm.noise_t_max": 0.0}, r"'algorithm\.noise_t_max' is 0\.0; must be in \(0, 1000\]"),
        ("tiny_vepo", {"loss.aggregation": "seq-mean-token-sum"}, r"vepo averages the policy term"),
        ("tiny_tor", {"algorithm.tor_entropy_fraction": 0.0}, r"tor_entropy_fraction' is 0\.0; must be in \(0, 1\]"),
        ("tiny_pepo", {"algorithm.pepo_temperature": 0.0}, r"pepo_temperature' is 0\.0; must be > 0"),
        ("tiny_vgpo", {"algorithm.vgpo_gate_start": 1.0}, r"vgpo_gate_start' is 1\.0; must be in \[0, 1\)"),
        ("tiny_vgpo", {"algorithm.vgpo_gate_top": 0.0}, r"vgpo_gate_top' is 0\.0; must be in \(0, 1\]"),
        ("tiny_dyco", {"algorithm.dyco_weight_low": 1.3}, r"dyco_weight_low must be <= algorithm\.dyco_weight_high"),
        # each anchor asks another claim; VAPO's reward replaces the recipe's, whose format weight it must share
        ("tiny_vapo", {"algorithm.vapo_anchors": 21}, r"vapo_anchors=21 > algorithm\.vapo_claims=20"),
        ("tiny_vapo", {"reward.format_weight": 0.2}, r"vapo_format_weight=0\.1 differs from reward\.format_weight"),
        ("tiny_vapo", {"algorithm.vapo_anchor_weight": 0.95}, r"vapo_format_weight \+ vapo_anchor_weight must be"),
    ],
)
def test_the_methods_after_vppo_refuse_settings_that_cannot_run(config, overrides, message):
    """Each is caught by the config check, before any compute (the run would otherwise fail mid-step, or train with
    negative token weights)."""
    cfg = OmegaConf.load(CONFIGS / f"{config}.yaml")
    for key, value in overrides.items():
        OmegaConf.update(cfg, key, value)
    assert re.search(message, _errors(cfg, "rl"))


def test_every_shipped_tiny_config_of_the_methods_after_vppo_is_valid():
    names = ("papo", "cfpo", "dvrp", "tor", "cgpo", "pepo", "vepo", "vgpo", "noisyrollout", "cppo", "vapo", "dyco")
    names += ("perceval",)
    for name in names:
        assert validate_config(OmegaConf.load(CONFIGS / f"tiny_{name}.yaml"), "rl").algorithm.name == name


def _numeric_fields(schema, prefix=""):
    """(dotted key, Field) of every number the schema knows (float or int), Component sections included."""
    from vppo_recipes.config_schema import Component, Field

    for key, spec in schema.items():
        if isinstance(spec, Field):
            if float in spec.types or int in spec.types:
                yield f"{prefix}{key}", spec
        else:
            yield from _numeric_fields(spec.fields if isinstance(spec, Component) else spec, f"{prefix}{key}.")


def _base_config(recipe: str, algorithm: str | None):
    if recipe == "sft":
        return OmegaConf.load(CONFIGS / "tiny_sft.yaml")
    cfg = OmegaConf.load(CONFIGS / "tiny_vppo.yaml")
    cfg.algorithm = {"name": algorithm}  # every other algorithm setting at its default
    return cfg


@pytest.mark.parametrize(
    ("recipe", "algorithm"),
    [("sft", None)] + [("rl", name) for name in __import__("vppo_recipes.methods").methods.BUILTIN_METHODS],
)
def test_every_numeric_setting_of_every_method_refuses_nan_and_inf_naming_the_key(recipe, algorithm):
    """Issue 23: NaN passes both bound comparisons, so `algorithm.mask_prob=.nan` (and 9 more) passed validation and
    the run died mid-step naming no key; `training.grad_clip=.nan` trained to the end with NaN weights. Every number
    the schema knows, for every method (a future method's keys are covered by iterating the schema), read from the
    command line as torchtune does (`OmegaConf.from_dotlist`: `.nan`, `.inf`, `-.inf` and an overflowing `1e400` are
    floats), is refused with its key named."""
    base = _base_config(recipe, algorithm)
    validate_config(base, recipe)  # the base itself is valid
    schema = schema_for(recipe, {"name": algorithm} if algorithm else None)  # the method's own settings
    checked, wrong = 0, []
    for path, field in _numeric_fields(schema):
        for text, shown in ((".nan", "nan"), (".inf", "inf"), ("-.inf", "-inf"), ("1e400", "inf")):
            cfg = OmegaConf.merge(base, OmegaConf.from_dotlist([f"{path}={text}"]))
            expected_ok = not getattr(field, "finite", True)  # (getattr: the schema before issue 23 had no such flag)
            try:
                validate_config(cfg, recipe)
                got_ok, msg = True, ""
            except ConfigError as e:
                got_ok, msg = False, str(e)
            if got_ok != expected_ok or (not got_ok and f"'{path}' is {shown}; every numeric setting must be a "
                                         "finite number" not in msg):  # fmt: skip
                wrong.append(f"{path}={text}: {msg or 'accepted'}")
            checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 4 * 8  # lr, weight_decay, grad_clip, ... at least


@pytest.mark.parametrize(("override", "key"), [("optimizer.eps=.nan", "optimizer.eps"),
                                                ("optimizer.betas=[0.9,.inf]", "optimizer.betas[1]")])  # fmt: skip
def test_nan_or_inf_in_an_optimizer_keyword_argument_is_refused_naming_it(sft_cfg, override, key):
    """A component's own keyword arguments have no schema entry, so the default rule holds for them too."""
    cfg = OmegaConf.merge(sft_cfg, OmegaConf.from_dotlist([override]))
    assert f"'{key}' is " in _errors(cfg, "sft") and "finite number" in _errors(cfg, "sft")


def test_a_field_may_opt_out_of_the_finite_rule():
    from vppo_recipes.config_schema import Field, _check_value

    assert "finite" in _check_value("x.y", float("nan"), Field(types=(float,)))
    assert _check_value("x.y", float("inf"), Field(types=(float,), finite=False)) is None


@pytest.mark.parametrize("recipe", ["rl", "sft"])
def test_grad_clip_zero_is_refused_with_null_named_as_the_way_to_turn_clipping_off(recipe):
    """The RL recipe read grad_clip=0 as "no clipping", the SFT recipe as "clip every update to zero"; both now use
    one update guard, and 0 is refused with the fix."""
    cfg = _base_config(recipe, "dapo")
    cfg.training.grad_clip = 0.0
    assert "training.grad_clip=0.0 would scale every update to zero" in _errors(cfg, recipe)
    cfg.training.grad_clip = None
    assert validate_config(cfg, recipe).training.grad_clip is None


def test_paths_are_resolved_once_at_config_load_hub_ids_are_kept(tmp_path, monkeypatch):
    """Issue 23 (paths resolved once): output_dir, model.path, data.source and validation.source come back absolute
    (against the cwd of the process that loads the config), so the run's record names the real folders and nothing
    later depends on the cwd; a hub id stays a hub id; validating the result again changes nothing."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "task").mkdir(parents=True)
    cfg = OmegaConf.create(RL_DRAFT)
    cfg.validation.source = "chamber111/some_benchmark"  # not on disk, of the hub's owner/name form
    out = validate_config(cfg, "rl")
    assert out.output_dir == str(tmp_path / "runs" / "tiny_vppo")
    assert out.model.path == str(tmp_path / "runs" / "tiny_ckpt")
    assert out.data.source == str(tmp_path / "runs" / "visual_task")
    assert out.metric_logger.log_dir == str(tmp_path / "runs" / "tiny_vppo" / "logs")  # ${output_dir}/logs
    assert out.validation.source == "chamber111/some_benchmark"
    assert validate_config(out, "rl") == out
    cfg.validation.source = "runs/task"  # owner/name form, but a folder here: local (load_source's rule)
    assert validate_config(cfg, "rl").validation.source == str(tmp_path / "runs" / "task")


def test_a_resume_from_another_cwd_compares_real_locations_not_the_strings_given(tmp_path, monkeypatch):
    """Relative paths were kept as given, so a run resumed from another directory with the same `data.source=
    ./runs/task` passed the resume check while reading another dataset. Resolved paths differ, and the change is
    named; a record written before paths were resolved (relative) still matches the same launch from its cwd."""
    from vppo_recipes.config_schema import config_changes

    for d in ("a", "b"):
        (tmp_path / d).mkdir()
    raw = OmegaConf.create(RL_DRAFT)
    monkeypatch.chdir(tmp_path / "a")
    saved = OmegaConf.to_container(validate_config(raw, "rl"), resolve=True)
    # A record written before paths were resolved: the same, with the paths as given.
    old_record = OmegaConf.create(copy.deepcopy(saved))
    for key in ("output_dir", "data.source", "model.path", "validation.source"):
        OmegaConf.update(old_record, key, OmegaConf.select(raw, key))
    assert old_record.data.source == "./runs/visual_task"
    assert config_changes(OmegaConf.to_container(old_record), saved) == []
    monkeypatch.chdir(tmp_path / "b")
    changes = config_changes(saved, OmegaConf.to_container(validate_config(raw, "rl"), resolve=True))
    assert changes == [
        f"data.source: checkpoint '{tmp_path / 'a' / 'runs' / 'visual_task'}', "
        f"now '{tmp_path / 'b' / 'runs' / 'visual_task'}'"
    ], changes
