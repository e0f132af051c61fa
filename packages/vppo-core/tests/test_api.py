"""The public API of vppo_core and the runtime-dependency check script."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import inspect
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import vppo_core

# The names fixed by issue 2 / the build contract.
CONTRACT_NAMES = {
    "token_logprobs",
    "logprobs_from_hidden",
    "token_dependency",
    "exact_token_dependency",
    "exact_token_dependency_from_hidden",
    "trajectory_dependency",
    "perturb_pixels",
    "text_only_attention",
    "group_advantages",
    "keep_groups",
    "tas_scale",
    "tgf_mask",
    "pgpo_token_weights",
    "policy_loss",
    "kl_penalty",
}
# Functions of this half of the package, whose docstrings must name their ALGORITHMS.md section.
SECTIONED = ["group_advantages", "keep_groups", "tas_scale", "tas_scale_reference", "tgf_mask", "pgpo_token_weights"]
SECTIONED += ["policy_loss"]
# The methods that followed VPPO (issue 16): each names its §9 subsection.
SECTIONED += ["top_fraction_mask", "tor_token_weights", "cgpo_response_factors", "pepo_visual_prior"]
SECTIONED += ["pepo_token_weights", "vepo_token_scores", "view_divergences_from_hidden", "top_p_entropy_from_hidden"]
SECTIONED += ["abs_log_ratio", "minmax_by_response"]
SECTIONED += ["fisher_rao_distance", "dyco_attention_signals", "dyco_response_scores", "dyco_advantage_weights"]
# VAPO's tensor functions (issue 26); its text functions (anchor_cutoffs, ...) name §9.12 but take no tensors
SECTIONED += ["anchor_decisions", "anchor_perception_score", "vapo_rewards"]

SCRIPT = Path(__file__).with_name("check_runtime_deps.py")


def _load_script():
    spec = importlib.util.spec_from_file_location("check_runtime_deps", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_public_api_holds_the_contract_names_and_only_functions_or_option_tuples():
    assert CONTRACT_NAMES <= set(vppo_core.__all__), CONTRACT_NAMES - set(vppo_core.__all__)
    assert len(vppo_core.__all__) == len(set(vppo_core.__all__))
    for name in vppo_core.__all__:
        value = getattr(vppo_core, name)
        if name.isupper():  # the accepted values of a string option, for config validation
            assert isinstance(value, tuple) and all(isinstance(v, str) for v in value), name
        else:
            assert inspect.isfunction(value), name


def test_option_tuples_are_exactly_what_policy_loss_accepts():
    lp = torch.zeros(1, 2)
    ok = {"loss_type": vppo_core.LOSS_TYPES, "aggregation": vppo_core.AGGREGATIONS}
    ok["kl_estimator"] = vppo_core.KL_ESTIMATORS
    for option, values in ok.items():
        for value in values:
            vppo_core.policy_loss(lp, lp, torch.ones(1), torch.ones(1, 2), ref_logprobs=lp, **{option: value})
        with pytest.raises(ValueError, match=option):
            vppo_core.policy_loss(lp, lp, torch.ones(1), torch.ones(1, 2), **{option: "unknown"})


def test_star_import_exports_exactly_all():
    namespace: dict = {}
    exec("from vppo_core import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(vppo_core.__all__)


@pytest.mark.parametrize("name", SECTIONED)
def test_docstrings_name_their_formula_section_and_shapes(name):
    doc = inspect.getdoc(getattr(vppo_core, name))
    assert doc and "§" in doc, f"{name}: docstring must name its ALGORITHMS.md section"
    assert "[B" in doc, f"{name}: docstring must give argument shapes"


def test_requirement_parsing_keeps_runtime_and_drops_extras():
    mod = _load_script()
    assert mod.requirement_name("Torch_Foo.bar>=2.6 ; python_version > '3'") == "torch-foo-bar"
    requires = [
        "torch>=2.6",
        "pytest>=8; extra == 'test'",
        "numpy ; python_version >= '3.10'",
        "hypothesis;extra=='test'",
    ]
    assert mod.runtime_requirements(requires) == {"torch", "numpy"}
    assert mod.runtime_requirements(None) == set()


def test_foreign_import_scan_finds_imports_inside_functions(tmp_path):
    mod = _load_script()
    (tmp_path / "ok.py").write_text("import math\nimport torch.nn\nfrom vppo_core.losses import policy_loss\n")
    (tmp_path / "bad.py").write_text(
        "from . import ok\n\ndef f():\n    import numpy as np\n    from transformers import x\n"
    )
    assert mod.foreign_imports(tmp_path) == {"numpy": ["bad.py"], "transformers": ["bad.py"]}


def test_import_check_flags_a_module_no_allowed_distribution_provides(tmp_path, monkeypatch):
    mod = _load_script()
    (tmp_path / "vppo_fake_dep.py").write_text("X = 1\n")
    (tmp_path / "vppo_fake_pkg").mkdir()
    (tmp_path / "vppo_fake_pkg" / "__init__.py").write_text("import json\nimport vppo_fake_dep\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("vppo_fake_pkg", "vppo_fake_dep"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    assert mod.modules_added_by_import("vppo_fake_pkg", {"torch"}) == {"vppo_fake_dep"}


def test_requirement_closure_follows_torch_requirements():
    mod = _load_script()
    closure = mod.requirement_closure({"torch"})
    assert "torch" in closure
    assert mod.runtime_requirements(importlib.metadata.requires("torch")) <= closure


def test_vppo_core_source_imports_only_stdlib_and_torch():
    mod = _load_script()
    assert mod.foreign_imports(Path(vppo_core.__file__).parent) == {}


@pytest.mark.distributed
def test_check_runtime_deps_script_passes_in_a_fresh_interpreter():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "OK: vppo-core needs only torch at run time" in result.stdout


def test_readme_example_runs_and_trains_only_the_selected_tokens():
    readme = (Path(__file__).parents[1] / "README.md").read_text(encoding="utf-8")
    code = readme.split("```python\n", 1)[1].split("```", 1)[0]
    namespace: dict = {}
    exec(compile(code, "README.md", "exec"), namespace)
    lp_new, mask = namespace["lp_new"], namespace["mask"].bool()
    assert torch.isfinite(namespace["loss"]) and lp_new.grad is not None
    # every valid token gets the entropy gradient; the policy gradient only on TGF-selected tokens
    assert bool((lp_new.grad[~mask] == 0).all()) and bool((lp_new.grad[mask] != 0).all())
    assert namespace["metrics"]["token_weight_nonzero_frac"].item() < 0.5
