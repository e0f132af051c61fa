"""Perception-aware RL methods behind one seam (`base.Method`); one file per method or family.

A method is chosen in the config by the name of a built-in one (`algorithm.name: vppo`) or by the import path of
any method class (`algorithm._component_: my_package.my_method.MyMethod`, torchtune's convention); the other keys
of `algorithm` are that class's fields. See `base.py` for the hooks and `docs/ARCHITECTURE.md` for the data flow.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Mapping
from typing import Any

from vppo_recipes.methods.base import Method, MethodContext, param
from vppo_recipes.methods.baselines import DAPO, GRPO
from vppo_recipes.methods.cfpo import CFPO
from vppo_recipes.methods.cgpo import CGPO
from vppo_recipes.methods.composed import Composed
from vppo_recipes.methods.cppo import CPPO
from vppo_recipes.methods.dvrp import DVRP
from vppo_recipes.methods.dyco import DyCo
from vppo_recipes.methods.noisyrollout import NoisyRollout
from vppo_recipes.methods.papo import PAPO
from vppo_recipes.methods.pepo import PEPO
from vppo_recipes.methods.perceval import Perceval
from vppo_recipes.methods.pgpo import PGPO
from vppo_recipes.methods.tor import ToR
from vppo_recipes.methods.vapo import VAPO
from vppo_recipes.methods.vepo import VEPO
from vppo_recipes.methods.vgpo import VGPO
from vppo_recipes.methods.vppo import VPPO

__all__ = [
    "BUILTIN_METHODS",
    "Composed",
    "Method",
    "MethodContext",
    "build_method",
    "diagnostic_view",
    "method_class",
    "method_settings",
    "param",
]

# `algorithm.name` -> class, in the order the docs list them
BUILTIN_METHODS: dict[str, type[Method]] = {
    cls.name: cls
    for cls in (
        VPPO,
        PGPO,
        DAPO,
        GRPO,
        PAPO,
        CFPO,
        DVRP,
        ToR,
        CGPO,
        PEPO,
        VEPO,
        VGPO,
        NoisyRollout,
        CPPO,
        VAPO,
        DyCo,
        Perceval,
    )
}
# The keys of the `algorithm` section that choose the method rather than set it
CHOOSING_KEYS = ("name", "_component_")


def method_class(section: Mapping[str, Any]) -> type[Method]:
    """The method class an `algorithm` section names: `name` (a built-in) or `_component_` (an import path).

    Raises ValueError naming the key and the fix: neither or both given, an unknown name, a path that does not
    import, or a class that is no frozen-dataclass `Method`.
    """
    name, path = section.get("name"), section.get("_component_")
    if name is not None and path is not None:
        raise ValueError(
            "'algorithm.name' and 'algorithm._component_' both choose the method; keep one (name for a built-in "
            "method, _component_ for any method class by its import path)"
        )
    if path is None:
        if name is None:
            raise ValueError(
                f"missing key 'algorithm.name' (one of {', '.join(BUILTIN_METHODS)}), or 'algorithm._component_' "
                "(the import path of a method class)"
            )
        if not isinstance(name, str) or name not in BUILTIN_METHODS:
            import difflib

            close = difflib.get_close_matches(str(name), list(BUILTIN_METHODS), n=1, cutoff=0.6)
            hint = f"did you mean {close[0]!r}? " if close else ""
            raise ValueError(
                f"'algorithm.name' is {name!r}; {hint}allowed values: {', '.join(map(repr, BUILTIN_METHODS))} "
                "(or name a method class of your own with algorithm._component_)"
            )
        return BUILTIN_METHODS[name]
    from torchtune.config._utils import _get_component_from_path

    try:
        cls = _get_component_from_path(str(path))
    except Exception as e:  # an import error of any kind means the path cannot be used
        raise ValueError(f"'algorithm._component_' = {path!r} cannot be imported: {type(e).__name__}: {e}") from e
    if not (isinstance(cls, type) and issubclass(cls, Method) and dataclasses.is_dataclass(cls)):
        raise ValueError(
            f"'algorithm._component_' = {path!r} is not a method class: it must be a dataclass subclassing "
            "vppo_recipes.methods.Method (see examples/custom_method)"
        )
    if "__dataclass_params__" not in vars(cls) or not cls.__dataclass_params__.frozen:
        # a subclass without its own decorator inherits is_dataclass from Method, but its `param` fields are no
        # settings (their keys would be refused as unknown, and left out they would be dataclasses.Field objects)
        raise ValueError(
            f"'algorithm._component_' = {path!r}: declare the class @dataclass(frozen=True), so that its fields are "
            "its settings"
        )
    return cls


def method_settings(cls: type[Method]) -> list[tuple[str, type, dataclasses.Field]]:
    """The `algorithm.*` settings of a method class: (key, Python type, dataclass field), in declaration order."""
    hints = typing.get_type_hints(cls)
    return [(f.name, hints[f.name], f) for f in dataclasses.fields(cls)]


def build_method(section: Mapping[str, Any]) -> Method:
    """The method a (validated) `algorithm` section names, with its settings."""
    if not isinstance(section, dict):  # a DictConfig: plain values, so blocks get lists and dicts
        from omegaconf import OmegaConf

        section = OmegaConf.to_container(section, resolve=True)
    cls = method_class(section)
    return cls(**{k: v for k, v in section.items() if k not in CHOOSING_KEYS})


def diagnostic_view():
    """The view under which `diagnostics.dependency` measures S for a method without one: VPPO's, at its
    published settings (a fresh blackening mask per response, half the patches)."""
    return VPPO().views()[0]
