"""Issue 26: any method at full size from a shipped config with one override (`algorithm.name=...` or
`algorithm._component_=...`): the override replaces the file's algorithm section, the method gets its published
settings (its dataclass defaults), no key of the file's method is left to refuse, and its memory plan fits."""

from __future__ import annotations

import dataclasses
import sys

import pytest
from omegaconf import OmegaConf

from vppo_recipes import cli
from vppo_recipes.config_overrides import parse, switch_method_section
from vppo_recipes.config_schema import ConfigError, validate_config
from vppo_recipes.methods import BUILTIN_METHODS
from vppo_recipes.plan import CONFIG_DIR, FULL_SIZE_CONFIGS, GIB, load_config, plan_config


def _published(cls) -> dict:
    return {f.name: f.default for f in dataclasses.fields(cls)}


def _load(config: str, *overrides: str):
    return cli.load_run_config(["--config", str(CONFIG_DIR / f"{config}.yaml"), *overrides])


@pytest.mark.parametrize("config", FULL_SIZE_CONFIGS)
@pytest.mark.parametrize("name", list(BUILTIN_METHODS))
def test_every_method_runs_from_every_full_size_config_with_one_override(config, name):
    if name == "noisyrollout" and config == "qwen2_5_vl_7b_pgpo":  # PGPO's published G = 5 cannot be halved
        with pytest.raises(ConfigError, match=r"noisy_fraction=0.5 of rollout.group_size=5 is 2.5 responses"):
            validate_config(_load(config, f"algorithm.name={name}"), "rl")
        cfg = validate_config(_load(config, f"algorithm.name={name}", "rollout.group_size=6"), "rl")
    else:
        cfg = validate_config(_load(config, f"algorithm.name={name}"), "rl")
    assert OmegaConf.to_container(cfg.algorithm) == {"name": name, **_published(BUILTIN_METHODS[name])}


def test_a_method_chosen_by_import_path_replaces_the_section_too():
    cfg = validate_config(_load("qwen2_5_vl_7b_vppo", "algorithm._component_=vppo_recipes.methods.pgpo.PGPO"), "rl")
    section = OmegaConf.to_container(cfg.algorithm)
    assert section.pop("_component_") == "vppo_recipes.methods.pgpo.PGPO" and "name" not in section
    assert section == _published(BUILTIN_METHODS["pgpo"])


def test_the_override_still_sets_the_new_methods_keys_and_the_files_own_method_keeps_its_settings():
    vepo = validate_config(_load("qwen2_5_vl_7b_vppo", "algorithm.vepo_fraction=0.3", "algorithm.name=vepo"), "rl")
    assert vepo.algorithm.vepo_fraction == 0.3 and vepo.algorithm.name == "vepo"
    file_section = load_config(CONFIG_DIR / "qwen2_5_vl_7b_vppo.yaml")["algorithm"]
    same = _load("qwen2_5_vl_7b_vppo", "algorithm.name=vppo")
    assert OmegaConf.to_container(same.algorithm) == file_section  # nothing replaced


def test_a_key_of_the_files_method_given_with_the_switch_is_still_refused():
    with pytest.raises(ConfigError, match=r"algorithm\.tgf_fraction. is a setting of vppo"):
        validate_config(_load("qwen2_5_vl_7b_vppo", "algorithm.name=dapo", "algorithm.tgf_fraction=0.4"), "rl")


def test_switch_method_section_on_plain_dicts():
    file_keys = {"seed": 0, "algorithm": {"name": "vppo", "tgf_fraction": 0.4}}
    kept, dropped = switch_method_section(file_keys, ["algorithm.name=pgpo", "seed=1"])
    assert kept == {"seed": 0} and dropped == ["algorithm.name", "algorithm.tgf_fraction"]
    assert file_keys["algorithm"]["name"] == "vppo"  # the caller's dict is untouched
    assert switch_method_section(file_keys, ["algorithm.name=vppo"]) == (file_keys, [])
    assert switch_method_section(file_keys, ["seed=1", "~algorithm.tgf_fraction"]) == (file_keys, [])
    by_path = {"algorithm": {"_component_": "my.Method", "alpha": 1}}
    assert switch_method_section(by_path, ["algorithm=other.Method"])[1] == ["algorithm._component_", "algorithm.alpha"]
    assert switch_method_section(by_path, ["algorithm=my.Method"])[1] == []
    assert switch_method_section(by_path, ["algorithm.name=vppo"])[1] == ["algorithm._component_", "algorithm.alpha"]


def test_the_recipe_entry_point_says_what_the_switch_replaced(monkeypatch, capsys):
    seen = []
    main = parse(lambda cfg: seen.append(cfg) or 0)
    path = str(CONFIG_DIR / "qwen2_5_vl_7b_vppo.yaml")
    monkeypatch.setattr(sys, "argv", ["recipe", "--config", path, "algorithm.name=papo"])
    with pytest.raises(SystemExit) as stop:
        main()
    assert stop.value.code == 0 and seen[0].algorithm == {"name": "papo"}  # the published settings come from the schema
    err = capsys.readouterr().err
    assert "chose 'papo'" in err and "algorithm.tgf_fraction" in err


@pytest.mark.slow
@pytest.mark.parametrize("config", FULL_SIZE_CONFIGS)
def test_every_methods_plan_at_full_size_fits_76_gib(config):
    """The scoring phase counts each method's no-grad passes (plan.py, "scoring"); every built-in method, with and
    without the dependency diagnostics, stays within 76 GiB per GPU at the shipped sizes."""
    plan = plan_config(load_config(CONFIG_DIR / f"{config}.yaml"), name=config)
    for name in BUILTIN_METHODS:
        even = ["rollout.group_size=6"] if name == "noisyrollout" and config == "qwen2_5_vl_7b_pgpo" else []
        algorithm = OmegaConf.to_container(
            validate_config(_load(config, f"algorithm.name={name}", *even), "rl").algorithm
        )
        for diagnostics in (False, True):
            planned = plan.with_method(algorithm, diagnostics)
            assert planned.method == name
            assert planned.peak <= 76 * GIB, (name, diagnostics, planned.peak / GIB)
    dapo = plan.with_method({"name": "dapo"})
    assert dapo.method_passes == 0
    g = plan.pass_geometry
    # one view's last hidden state at the response positions: micro x response without a token budget; with one, at
    # most the positions the budget allows (`plan.micro_batch_geometry`, checked by brute force in test_plan.py)
    budget = load_config(CONFIG_DIR / f"{config}.yaml")["batch"].get("max_tokens_per_micro_batch")
    if budget is None:
        assert g["response_positions"] == g["micro"] * g["response"]
    else:
        assert g["response_positions"] <= budget
    kept = g["response_positions"] * g["hidden"] * g["act_bytes"]
    for name, cls in BUILTIN_METHODS.items():
        method = cls()
        want = len(method.views()) * kept
        if method.clean_prior:  # PEPO: one float32 layer at a time, not (layers + 1) x [mb, T, H]
            want += g["micro"] * g["seq"] * (g["hidden"] * 4 + 4)
        if method.clean_full_hidden:  # VGPO: the whole last hidden state and a float32 copy of the response part
            want += g["micro"] * g["seq"] * g["hidden"] * g["act_bytes"] + g["response_positions"] * g["hidden"] * 4
        want += method.scoring_bytes(**{k: g[k] for k in ("micro", "seq", "response", "hidden", "act_bytes")})
        assert plan.with_method({"name": name}).method_passes == want, name
    # PEPO holds about two layers' worth of [mb, T, H] in model.dtype, not the 29-37 layers it held before issue 26
    assert plan.with_method({"name": "pepo"}).method_passes < 3 * g["micro"] * g["seq"] * g["hidden"] * g["act_bytes"]
