"""A method defined outside vppo (`examples/custom_method/my_method.py`), named in YAML by its import path
(`algorithm._component_: my_method.MyMethod`): its settings are validated like a built-in method's, a path that is
no method is refused with the reason, its token weights are what its docstring says, and it trains two steps under
`tune run --nproc_per_node 2` with the same first step as one process.

The example is not a package of the repository: it is put on `sys.path` (in process) and on `PYTHONPATH` (for the
`tune run` processes, which inherit the environment) by the `example_on_path` fixture, for that test only.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).parent))
from _rl_launch import TIMING
from _rl_launch import metrics as _metrics
from _rl_launch import run as _run
from _warm_start import warm_assets

from vppo_core.dependency import trajectory_dependency
from vppo_recipes.config_schema import ConfigError, validate_config
from vppo_recipes.methods import build_method
from vppo_recipes.methods.views import PerturbedPixels

EXAMPLE = Path(__file__).resolve().parents[3] / "examples" / "custom_method"
CONFIG = EXAMPLE / "tiny_my_method.yaml"
# As in test_rl_runs.py: step 1 of 2 ranks vs 1 differs only by the order of float32 reductions.
LOSS_RTOL, LOSS_ATOL, GRAD_RTOL = 1e-6, 1e-7, 1e-5


@pytest.fixture
def example_on_path(monkeypatch):
    """The example's folder on sys.path and PYTHONPATH for one test; the modules it imported forgotten afterwards."""
    monkeypatch.syspath_prepend(str(EXAMPLE))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(EXAMPLE), os.environ.get("PYTHONPATH")])))
    yield
    for name in ("my_method", "not_methods", "not_methods_loose"):  # the tests' own modules, of a tmp_path each
        sys.modules.pop(name, None)


def _config(**algorithm) -> dict:
    """The example's tiny config with `algorithm` keys set (a value None removes the key)."""
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIG))
    for key, value in algorithm.items():
        if value is None:
            cfg["algorithm"].pop(key)
        else:
            cfg["algorithm"][key] = value
    return cfg


def test_the_example_config_validates_and_its_omitted_settings_get_their_defaults(example_on_path):
    cfg = validate_config(_config(perturb_prob=None, dependency_mix=None), "rl")
    assert cfg.algorithm.perturb_prob == 0.5 and cfg.algorithm.dependency_mix == 0.5
    method = build_method(cfg.algorithm)
    assert type(method).__name__ == "MyMethod" and method.name == "my_method"
    assert method.views() == (PerturbedPixels("blacken", 0.5, per_response=True),)


@pytest.mark.parametrize(
    ("key", "value", "message"),
    [
        ("dependency_mx", 0.3, "unknown key 'algorithm.dependency_mx' (did you mean 'algorithm.dependency_mix'?)"),
        ("dependency_mix", 1.5, "'algorithm.dependency_mix' is 1.5; must be <= 1.0"),
        ("perturb_prob", 0.0, "'algorithm.perturb_prob' is 0.0; must be in (0, 1]"),  # an exclusive bound
        ("perturbation", "blurr", "'algorithm.perturbation' is 'blurr'; allowed values: 'blacken', 'noise'"),
        ("dependency_mix", "half", "'algorithm.dependency_mix'"),
        ("tgf_fraction", 0.4, "'algorithm.tgf_fraction' is a setting of vppo; algorithm._component_=my_method"),
    ],
)
def test_a_wrong_setting_of_the_example_is_refused_like_a_built_in_one(example_on_path, key, value, message):
    with pytest.raises(ConfigError) as err:
        validate_config(_config(**{key: value}), "rl")
    assert message in str(err.value) and "1 problem(s)" in str(err.value)


# A module of classes that look like methods but are not usable as one.
NOT_METHODS = """
from vppo_recipes.methods import Method, param


class Undecorated(Method):  # no @dataclass: `strength` would be no setting (a dataclass Field as class attribute)
    strength: float = param(0.5, low=0.0)
"""
NOT_FROZEN = """
from dataclasses import dataclass
from vppo_recipes.methods import Method


@dataclass
class Loose(Method):
    pass
"""


def _refusal(component: str) -> str:
    with pytest.raises(ConfigError) as err:
        validate_config(_config(_component_=component), "rl")
    assert f"'algorithm._component_' = {component!r}" in str(err.value), str(err.value)
    return str(err.value)


@pytest.mark.parametrize(
    ("component", "reason"),
    [
        ("my_method.dependency_weights", "is not a method class: it must be a dataclass subclassing"),  # a function
        ("collections.OrderedDict", "is not a method class"),
        # Python itself refuses a non-frozen dataclass under the frozen Method, when the module is imported
        ("not_methods_loose.Loose", "cannot be imported: TypeError: cannot inherit non-frozen dataclass"),
        ("my_method.MyMethd", "cannot be imported"),
        ("no_such_package.MyMethod", "cannot be imported"),
    ],
)
def test_a_component_that_is_no_method_class_is_refused_with_the_reason(
    example_on_path, tmp_path, monkeypatch, component, reason
):
    (tmp_path / "not_methods_loose.py").write_text(NOT_FROZEN)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert reason in _refusal(component)


def test_a_method_subclass_without_its_dataclass_decorator_is_refused(example_on_path, tmp_path, monkeypatch):
    (tmp_path / "not_methods.py").write_text(NOT_METHODS)
    monkeypatch.syspath_prepend(str(tmp_path))
    assert "@dataclass(frozen=True)" in _refusal("not_methods.Undecorated")


def test_the_example_weights_share_each_response_advantage_by_its_dependency(example_on_path):
    from my_method import dependency_weights

    S = torch.tensor([[1.0, 3.0, 9.0], [0.0, 0.0, 5.0], [0.2, 0.2, 0.2]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 0], [0, 0, 0]])  # padding may hold anything; an empty third response
    w = dependency_weights(S, trajectory_dependency(S, mask), mask, mix=0.5)
    # S̄ = 2: 0.5 + 0.5 · (1/2, 3/2); S̄ = 0 (no token depends on the image): uniform credit; empty: all zeros
    assert torch.equal(w, torch.tensor([[0.75, 1.25, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]]))
    g = torch.Generator().manual_seed(0)
    S, mask = torch.rand(6, 9, generator=g) ** 3, torch.rand(6, 9, generator=g) > 0.3
    for mix in (0.0, 0.3, 1.0):
        w = dependency_weights(S, trajectory_dependency(S, mask), mask, mix=mix)
        mean = (w * mask).sum(1) / mask.sum(1)
        torch.testing.assert_close(mean, torch.ones(6))  # the advantage mass of every response is kept
        assert bool((w[~mask] == 0).all()) and bool((w[mask] >= 1.0 - mix - 1e-6).all())
    assert torch.equal(dependency_weights(S, trajectory_dependency(S, mask), mask, mix=0.0), mask.float())


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return warm_assets(tmp_path_factory.mktemp("custom_method"))


@pytest.mark.distributed
@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_the_example_trains_two_steps_on_two_ranks_like_one(assets, example_on_path):
    """Issue 25's "done when": a method defined outside the repository trains under `tune run` from its YAML name,
    and its first step (every logged metric but time and memory) equals a 1-process run's."""
    two, one = assets["root"] / "my_method_2proc", assets["root"] / "my_method_1proc"
    _run(assets, "my_method", two, nproc=2, steps=2, config=CONFIG)
    _run(assets, "my_method", one, nproc=1, steps=1, config=CONFIG)
    m2, m1 = _metrics(two), _metrics(one)
    assert [m["step"] for m in m2] == [1, 2] and [m["step"] for m in m1] == [1]
    a, b = m2[0], m1[0]
    assert a["filter/groups_kept"] == b["filter/groups_kept"] == 4, "rollout batch not full: compare would be moot"
    assert math.isfinite(a["loss"]) and a["grad_norm"] > 0, "zero gradient: the comparison would test nothing"
    assert a["my_method/weight_mean"] == pytest.approx(1.0, abs=1e-6)  # mass kept, over all ranks' tokens
    assert a["my_method/weight_max"] > 1.0 and 0.0 < a["my_method/upweighted_fraction"] < 1.0
    assert a["dependency/token_mean"] > 0.0
    keys = {k for k in a if not k.startswith(TIMING)}
    assert keys == {k for k in b if not k.startswith(TIMING)}
    for key in sorted(keys):
        rel, abs_ = {"loss": (LOSS_RTOL, LOSS_ATOL), "grad_norm": (GRAD_RTOL, 0.0)}.get(key, (1e-4, 1e-6))
        if isinstance(a[key], float) and math.isnan(a[key]):
            assert math.isnan(b[key]), key
        else:
            assert a[key] == pytest.approx(b[key], rel=rel, abs=abs_), key
    assert (two / "checkpoints" / "step_000002" / "model.safetensors").is_file()
