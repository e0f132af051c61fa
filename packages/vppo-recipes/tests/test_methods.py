"""The method seam (`vppo_recipes.methods`): methods built from blocks give the built-in methods' numbers, the
`algorithm` section is the chosen method's dataclass, and the recipe tests no method name."""

from __future__ import annotations

import ast
import dataclasses
import sys
from pathlib import Path
from typing import Literal

import pytest
import torch
from omegaconf import OmegaConf

from vppo_recipes.config_schema import ConfigError, validate_config
from vppo_recipes.methods import Method as _Method

sys.path.insert(0, str(Path(__file__).parent))
from test_rl_distributed import _cfg, _one_rl_step_in_process

SRC = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes"
BLOCKS = "vppo_recipes.methods.blocks"
VIEWS = "vppo_recipes.methods.views"
COMPOSED = "vppo_recipes.methods.composed.Composed"

# Built-in methods written again as compositions of blocks, at their tiny configs' settings
AS_COMPOSITIONS = {
    "tiny_vppo": {
        "_component_": COMPOSED,
        "altered_views": [{"_component_": f"{VIEWS}.PerturbedPixels", "mode": "blacken", "prob": 0.5}],
        "token_selection": {"_component_": f"{BLOCKS}.TopDependentTokens", "fraction": 0.4},
        "advantage_scaling": {"_component_": f"{BLOCKS}.TrajectoryScaling", "beta_min": 0.9},
    },
    "tiny_papo": {
        "_component_": COMPOSED,
        "altered_views": [{"_component_": f"{VIEWS}.PerturbedPixels", "prob": 0.6, "per_response": False}],
        "loss_terms": [{"_component_": f"{BLOCKS}.KLToView", "view": 0, "coef": -0.02}],
    },
}


def _state_after_one_step(tmp_path, monkeypatch, config: str, algorithm=None):
    from _rl_rewards import alternate_rewards

    alternate_rewards(monkeypatch)  # the random model earns 0 everywhere: no update otherwise
    seen = {}

    def keep(recipe):
        from torch.distributed.tensor import DTensor

        seen["state"] = {
            k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
            for k, v in recipe.model.state_dict().items()
        }

    metrics = _one_rl_step_in_process(
        tmp_path, config, {"rollout.online_filter": "false"}, inspect=keep, algorithm=algorithm
    )
    return metrics, seen["state"]


@pytest.mark.parametrize("config", sorted(AS_COMPOSITIONS))
def test_a_built_in_method_composed_from_blocks_in_yaml_trains_bit_identically(tmp_path, monkeypatch, config):
    """VPPO (perturbed view, TGF, TAS) and PAPO (masked view per prompt, KL term) written as `Composed` in YAML take
    the same step as the built-in methods: every weight equal bit for bit after one update."""
    m_builtin, builtin = _state_after_one_step(tmp_path / "builtin", monkeypatch, config)
    m_composed, composed = _state_after_one_step(tmp_path / "composed", monkeypatch, config, AS_COMPOSITIONS[config])
    assert m_builtin["optimizer_steps"] == m_composed["optimizer_steps"] >= 1
    assert builtin.keys() == composed.keys()
    assert all(torch.equal(builtin[k], composed[k]) for k in builtin), "the composed method trained differently"
    assert m_builtin["loss"] == m_composed["loss"]


def test_the_shipped_composed_config_validates_and_its_blocks_are_checked():
    cfg, _ = _cfg("tiny_composed")
    assert cfg.algorithm._component_ == COMPOSED
    bad = dict(AS_COMPOSITIONS["tiny_papo"], loss_terms=[{"_component_": f"{BLOCKS}.KLToView", "view": 1}])
    with pytest.raises(ConfigError, match=r"'algorithm\.loss_terms\[0\]' reads view 1, but algorithm\.altered_views"):
        _cfg("tiny_vppo", bad)
    typo = dict(
        AS_COMPOSITIONS["tiny_papo"], token_selection={"_component_": f"{BLOCKS}.TopDependentTokens", "fractio": 1}
    )
    with pytest.raises(ConfigError, match=r"'algorithm\.token_selection' cannot be built: TypeError.*fractio"):
        _cfg("tiny_vppo", typo)


def test_the_algorithm_section_is_the_chosen_methods_dataclass():
    """Defaults come from the method's fields (one place); another method's key is named as such; an unknown key
    names the closest valid one; exclusive bounds are refused at the bound; the record holds only this method's
    keys and validates again as it is."""
    from vppo_recipes.methods import VPPO

    cfg, _ = _cfg("tiny_vppo", {"name": "vppo"})
    assert {k: cfg.algorithm[k] for k in cfg.algorithm if k != "name"} == {
        f.name: getattr(VPPO(), f.name) for f in dataclasses.fields(VPPO)
    }
    validate_config(OmegaConf.create(OmegaConf.to_container(cfg)), "rl")
    for algorithm, message in [
        ({"name": "dapo", "tgf_fraction": 0.4}, r"'algorithm\.tgf_fraction' is a setting of vppo; algorithm\.name=dapo"),
        ({"name": "vppo", "tgf_fractoin": 0.4}, r"unknown key 'algorithm\.tgf_fractoin' \(did you mean 'algorithm\.tgf_fraction'\?\)"),
        ({"name": "pgpo", "pgpo_tau": 1.0}, r"'algorithm\.pgpo_tau' is 1\.0; must be in \(0, 1\)"),
        ({"name": "vpo"}, r"'algorithm\.name' is 'vpo'; did you mean 'vppo'\?"),
        ({"name": "vppo", "_component_": COMPOSED}, r"both choose the method"),
        ({"_component_": "torch.nn.Linear"}, r"is not a method class"),
        ({"_component_": "no_such_package.Method"}, r"cannot be imported"),
    ]:  # fmt: skip
        with pytest.raises(ConfigError, match=message):
            _cfg("tiny_vppo", algorithm)


def test_a_config_without_a_method_is_refused_naming_what_chooses_one():
    raw = OmegaConf.load(SRC / "configs" / "tiny_vppo.yaml")
    del raw["algorithm"]
    with pytest.raises(ConfigError, match=r"missing section 'algorithm' \(needs: name.*or _component_"):
        validate_config(raw, "rl")
    raw.algorithm = 3
    with pytest.raises(ConfigError, match=r"'algorithm' must be a section \(mapping\), got int"):
        validate_config(raw, "rl")


def test_the_recipe_tests_no_method_name():
    """No comparison with a method's name anywhere in the recipe or the schema (`self.algorithm == "vppo"` was in
    23 places): a method is one file."""
    from vppo_recipes.methods import BUILTIN_METHODS

    for path in (SRC / "rl" / "rl_distributed.py", SRC / "rl" / "step_metrics.py", SRC / "config_schema.py"):
        compared = [
            n for node in ast.walk(ast.parse(path.read_text())) if isinstance(node, ast.Compare) for n in ast.walk(node)
        ]
        names = {n.value for n in compared if isinstance(n, ast.Constant) and n.value in BUILTIN_METHODS}
        assert not names, f"{path.name} names methods {names}"


@pytest.mark.parametrize(
    "config", ["tiny_vppo", "tiny_tor", "tiny_cgpo", "tiny_vepo", "tiny_pepo", "tiny_vgpo", "tiny_dyco", "tiny_cppo"]
)
def test_shaping_syncs_with_the_host_a_fixed_number_of_times_whatever_the_micro_batches(tmp_path, monkeypatch, config):
    """The shaping phase and the policy-gradient-share diagnostic move values to the host a fixed number of times
    per step in vppo_recipes code, not once per micro-batch (the batch-level token sets' counts, VEPO's count ratio
    and the diagnostic's sums were one transfer per micro-batch): 4 micro-batches of 1 response and 1 of 4 make the
    same conversions. vppo-core's own input checks (one per call) are not counted."""
    from _rl_rewards import alternate_rewards

    import vppo_recipes.rl.rl_distributed as rl
    import vppo_recipes.rl.step_metrics as step_metrics

    alternate_rewards(monkeypatch)
    shape, share = rl.RLRecipeDistributed.shape, step_metrics.pg_share_on_dependent_tokens
    conversions = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
    counts = {}
    for micro in (1, 4):
        calls: list[str] = []

        def recording(original, calls=calls):
            def method(self, *a, **k):
                frame = sys._getframe(1)
                if "vppo_recipes" in frame.f_code.co_filename:
                    calls.append(f"{frame.f_code.co_filename.rsplit('/', 1)[-1]}:{frame.f_lineno}")
                return original(self, *a, **k)

            return method

        def counted(fn):
            def wrapper(*args, **kwargs):
                with pytest.MonkeyPatch.context() as mp:
                    for name in conversions:
                        mp.setattr(torch.Tensor, name, recording(getattr(torch.Tensor, name)))
                    return fn(*args, **kwargs)

            return wrapper

        monkeypatch.setattr(rl.RLRecipeDistributed, "shape", counted(shape))
        monkeypatch.setattr(step_metrics, "pg_share_on_dependent_tokens", counted(share))
        _one_rl_step_in_process(
            tmp_path / f"micro{micro}",
            config,
            {"rollout.online_filter": "false", "rollout.group_size": 4, "batch.micro_batch_size": micro},
        )
        counts[micro] = calls
    assert len(counts[1]) == len(counts[4]), counts


@dataclasses.dataclass(frozen=True)
class ListSettings(_Method):
    """A user's method with settings of every shape a dataclass allows (for the tests below)."""

    weights: list[float] = dataclasses.field(default_factory=lambda: [1.0, 2.0])
    scales: tuple[float, ...] = (0.5,)
    mode: Literal["a", "b"] = "a"
    limit: float | None = None
    strict: bool = False

    def __post_init__(self):
        if self.strict and self.limit is None:
            raise ValueError("strict needs a limit")


def test_a_user_method_with_list_optional_literal_and_factory_settings_validates_and_refuses_clearly():
    path = f"{__name__}.ListSettings"
    cfg, _ = _cfg("tiny_vppo", {"_component_": path})
    assert (list(cfg.algorithm.weights), list(cfg.algorithm.scales), cfg.algorithm.mode) == ([1.0, 2.0], [0.5], "a")
    validate_config(OmegaConf.create(OmegaConf.to_container(cfg)), "rl")  # the record validates again
    for algorithm, message in [
        ({"_component_": path, "mode": "c"}, r"'algorithm\.mode' is 'c'; allowed values: 'a', 'b'"),
        ({"_component_": path, "weights": [1.0, float("nan")]}, r"'algorithm\.weights\[1\]' is nan"),
        ({"_component_": path, "strict": True}, r"refuses its settings: ValueError: strict needs a limit"),
        ({"name": ["vppo"]}, r"'algorithm\.name' is \['vppo'\]"),
    ]:
        with pytest.raises(ConfigError, match=message):
            _cfg("tiny_vppo", algorithm)


def test_a_composed_method_resumes_its_own_config_and_validates_it_twice():
    """Its list settings default to tuples in the class; the config (and the checkpoint's record) holds lists, so a
    resume compares equal values (it used to refuse every restart: [..] != (..,))."""
    import yaml

    from vppo_recipes.config_schema import config_changes

    cfg, _ = _cfg("tiny_composed")
    again = validate_config(OmegaConf.create(OmegaConf.to_container(cfg)), "rl")
    saved = yaml.safe_load(OmegaConf.to_yaml(cfg))  # what a checkpoint's training_config.yaml holds
    assert config_changes(saved, OmegaConf.to_container(again)) == []


@pytest.mark.parametrize(
    ("block", "message"),
    [
        ({"altered_views": [{"_component_": f"{VIEWS}.PerturbedPixels", "prob": float("nan")}]}, r"is nan"),
        ({"token_selection": {"_component_": f"{BLOCKS}.TopDependentTokens", "fraction": 7.0}}, r"must be in \(0, 1\]"),
        ({"advantage_scaling": {"_component_": f"{BLOCKS}.TrajectoryScaling", "statistics": "globl"}}, r"'global' or"),
        ({"loss_terms": [{"_component_": f"{BLOCKS}.KLToView", "view": -1}]}, r"view=-1: the index \(>= 0\)"),
    ],
)
def test_a_composed_methods_blocks_refuse_bad_arguments_by_name(block, message):
    algorithm = {**AS_COMPOSITIONS["tiny_papo"], **block}
    with pytest.raises(ConfigError, match=message):
        _cfg("tiny_vppo", algorithm)


def test_a_shape_hook_returning_the_wrong_structure_is_refused_naming_the_method():
    from vppo_recipes.methods.records import MicroBatch, MicroStep, Shaping, check_aux_terms, check_shapings

    def step(b: int, L: int) -> MicroStep:
        mb = MicroBatch({}, torch.zeros(b, L, dtype=torch.long), torch.ones(b, L), 3, torch.zeros(b), [0] * b,
                        list(range(b)), [1] * b, torch.zeros(b, L))  # fmt: skip
        return MicroStep(mb)

    steps = [[step(2, 5), step(2, 5)]]
    good = [[Shaping(torch.zeros(2), torch.ones(2, 5)), Shaping(torch.zeros(2))]]
    check_shapings("mine", steps, good)
    with pytest.raises(ValueError, match=r"method mine: shape\(\) must return one Shaping per micro-batch"):
        check_shapings("mine", steps, [good[0][:1]])
    with pytest.raises(ValueError, match=r"method mine: shape\(\) gave advantages \(2,\) and token weights"):
        check_shapings("mine", steps, [[Shaping(torch.zeros(2), torch.ones(2, 1)), good[0][1]]])
    with pytest.raises(ValueError, match=r"aux_terms\(\)\['kl'\] must be \(coefficient, a \[b, L\]"):
        check_aux_terms("mine", {"kl": (0.1, torch.ones(2, 1))}, torch.ones(2, 5))
