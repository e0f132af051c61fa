"""A method composed in YAML from blocks: altered views, a token selection, an advantage scaling, auxiliary terms.

Each block is a component named by its import path, torchtune's way (`_component_` plus its keyword arguments),
so a new combination of existing blocks (or of blocks of your own) is configuration, not code. For example PAPO's
KL term with VPPO's token filter, which no built-in method has:

    algorithm:
      _component_: vppo_recipes.methods.composed.Composed
      altered_views:
        - {_component_: vppo_recipes.methods.views.PerturbedPixels, mode: blacken, prob: 0.6, per_response: false}
      token_selection: {_component_: vppo_recipes.methods.blocks.TopDependentTokens, fraction: 0.4}
      loss_terms:
        - {_component_: vppo_recipes.methods.blocks.KLToView, view: 0, coef: -0.02}

S (the token dependency) is measured under the first view; a selection and a scaling read it, so they need one.
The blocks' interfaces: a view has `inputs(ctx, mb, index) -> ViewInputs`, a selection `weights(step) -> [b, L]`,
a scaling `alphas(ctx, mini) -> [b] per micro-batch`, an auxiliary loss term `term(step, new) -> (coef, [b, L])`.
With altered_views [PerturbedPixels()] (VPPO's), TopDependentTokens() and TrajectoryScaling() it trains as VPPO, bit
for bit (a test checks it); its own metrics are named composed/* (alpha_min, alpha_max, the selected fraction).
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from vppo_recipes.methods.base import DEPENDENT_TOKEN_FRACTION, Method, MethodContext, param
from vppo_recipes.methods.blocks import dependency_param, scaled_and_selected
from vppo_recipes.methods.records import MicroStep, Shaping


def instantiate_block(spec: Mapping[str, Any]) -> Any:
    """The block a `{_component_: import.path, **kwargs}` mapping names, built with its keyword arguments."""
    from torchtune.config._utils import _get_component_from_path

    if not isinstance(spec, Mapping) or "_component_" not in spec:
        raise ValueError(f"a block is a mapping with '_component_' (its import path) and its arguments, got {spec!r}")
    cls = _get_component_from_path(str(spec["_component_"]))
    return cls(**{k: v for k, v in spec.items() if k != "_component_"})


def _term_name(block: Any, index: int) -> str:
    """`KLToView` number 0 -> "kl_to_view_0" (the loss logs it as aux/kl_to_view_0)."""
    return re.sub(r"(?<=[a-z])(?=[A-Z])|(?<=[A-Z])(?=[A-Z][a-z])", "_", type(block).__name__).lower() + f"_{index}"


@dataclass(frozen=True)
class Composed(Method):
    name = "composed"

    altered_views: list = param(
        (), doc="altered views, each {_component_: ..., **arguments} (vppo_recipes.methods.views)"
    )
    dependency: str = dependency_param()
    token_selection: dict | None = param(None, doc="e.g. {_component_: vppo_recipes.methods.blocks.TopDependentTokens}")
    advantage_scaling: dict | None = param(
        None, doc="e.g. {_component_: vppo_recipes.methods.blocks.TrajectoryScaling}"
    )
    loss_terms: list = param((), doc="extra loss terms, e.g. [{_component_: vppo_recipes.methods.blocks.KLToView}]")

    def views(self):
        return tuple(instantiate_block(v) for v in self.altered_views)

    def _blocks(self, key: str) -> Any:
        spec = getattr(self, key)
        return instantiate_block(spec) if spec is not None else None

    @property
    def exact_dependency(self) -> bool:
        return self.dependency == "exact"

    @property
    def dependent_fraction(self) -> float:
        return float(getattr(self._blocks("token_selection"), "fraction", DEPENDENT_TOKEN_FRACTION))

    def config_errors(self, cfg: Mapping[str, Any]) -> list[str]:
        errors = []
        blocks = {
            "altered_views": list(self.altered_views),
            "loss_terms": list(self.loss_terms),
            "token_selection": self.token_selection,
            "advantage_scaling": self.advantage_scaling,
        }
        built: dict[str, Any] = {}
        for key, specs in blocks.items():
            for i, spec in enumerate(specs if isinstance(specs, list) else [specs]):
                if spec is None:
                    continue
                where = f"algorithm.{key}" + (f"[{i}]" if isinstance(specs, list) else "")
                try:
                    built.setdefault(key, []).append(instantiate_block(spec))
                except Exception as e:  # an import error, an unknown argument, ...: named with the block
                    errors.append(f"'{where}' cannot be built: {type(e).__name__}: {e}")
        n_views = len(blocks["altered_views"])
        if n_views == 0 and (blocks["token_selection"] is not None or blocks["advantage_scaling"] is not None):
            errors.append(
                "algorithm.token_selection and advantage_scaling read S, measured under the first view: add one to "
                "algorithm.altered_views"
            )
        for i, term in enumerate(built.get("loss_terms", [])):
            if getattr(term, "view", 0) >= n_views:
                errors.append(
                    f"'algorithm.loss_terms[{i}]' reads view {term.view}, but algorithm.altered_views has {n_views}"
                )
        return errors

    def shape(self, ctx: MethodContext, steps: Sequence[Sequence[MicroStep]]) -> list[list[Shaping]]:
        scaling, selection = self._blocks("advantage_scaling"), self._blocks("token_selection")
        return scaled_and_selected(ctx, steps, scaling=scaling, selection=selection)

    def aux_terms(self, ctx, step, new):
        terms = [instantiate_block(spec) for spec in self.loss_terms]
        return {_term_name(t, i): t.term(step, new) for i, t in enumerate(terms)}

    def metrics(self, ctx: MethodContext, steps: Sequence[MicroStep]) -> dict[str, float]:
        m = {}
        if self.advantage_scaling is not None:
            alpha = ctx.gathered([s.shaped.outputs["alpha"][s.batch.mask.sum(1) > 0] for s in steps])
            m["composed/alpha_min"] = float(alpha.min()) if alpha.numel() else math.nan
            m["composed/alpha_max"] = float(alpha.max()) if alpha.numel() else math.nan
        if self.token_selection is not None:
            w = ctx.gathered([s.shaped.token_weights[s.batch.mask > 0] for s in steps])
            m["composed/selected_fraction"] = float((w != 0).double().mean()) if w.numel() else math.nan
        return m
