"""Reading a recipe config with its `key=value` overrides, where an override may switch the method.

torchtune's parser (`TuneRecipeArgumentParser`) and merge (`_merge_yaml_and_cli_args`) are used as they are, with
one rule added for the RL recipe's `algorithm` section: an override that chooses ANOTHER method than the file's
(`algorithm.name=pgpo` on `qwen2_5_vl_7b_vppo.yaml`, or `algorithm._component_=my_pkg.MyMethod`, or torchtune's
shorthand `algorithm=my_pkg.MyMethod` on a section that has a `_component_`) replaces the file's `algorithm`
section instead of merging into it. The file's settings belong to the file's method: merged, each would be refused
as a key of another method. The new method starts from its own published settings (the dataclass defaults of
`vppo_recipes.methods`), and `algorithm.*` overrides on the same command line still apply. Overriding with the
file's own method (`algorithm.name=vppo` on a VPPO config) keeps the file's settings.

Every recipe entry point reads its config here (`parse`, used in place of `torchtune.config.parse`), and so does
`vppo-recipes run` before anything is spawned (`vppo_recipes.cli.load_run_config`), so what is checked is
what runs.
"""

from __future__ import annotations

import argparse
import copy
import functools
import os
import sys
from argparse import Namespace
from collections.abc import Callable, Sequence
from typing import Any

from omegaconf import DictConfig

__all__ = ["merge_config_and_overrides", "parse", "switch_method_section"]

# The CLI keys that choose the RL method (torchtune's `algorithm=X` shorthand is `algorithm._component_=X` when the
# file's section has a `_component_`)
_NAME, _COMPONENT = "algorithm.name", "algorithm._component_"


def _chosen_on_command_line(section: Any, cli_args: Sequence[str]) -> dict[str, str]:
    """{"name" | "_component_": value} of the method the overrides choose (the last value of each key wins)."""
    chosen: dict[str, str] = {}
    for arg in cli_args:
        if arg.startswith("~") or "=" not in arg:
            continue  # removals, and malformed overrides (torchtune's merge names those)
        key, value = arg.split("=", 1)
        if key == _NAME:
            chosen["name"] = value
        elif key == _COMPONENT or (key == "algorithm" and isinstance(section, dict) and "_component_" in section):
            chosen["_component_"] = value
    return chosen


def switch_method_section(yaml_kwargs: dict[str, Any], cli_args: Sequence[str]) -> tuple[dict[str, Any], list[str]]:
    """The file's top-level keys with its `algorithm` section removed when the overrides choose another method.

    Args:
        yaml_kwargs: the config file's top-level keys (what torchtune's parser puts in its namespace); not modified.
        cli_args: the `key=value` overrides, as given.

    Returns:
        (the keys to merge the overrides into, the dotted `algorithm.*` keys of the file that were dropped; empty
        when nothing was switched).
    """
    section = yaml_kwargs.get("algorithm")
    chosen = _chosen_on_command_line(section, cli_args)
    if not chosen or not isinstance(section, dict):
        return yaml_kwargs, []
    same = all(section.get(key) == value for key, value in chosen.items()) and not (
        set(section) & {"name", "_component_"}
    ) - set(chosen)
    if same:
        return yaml_kwargs, []
    kept = copy.copy(yaml_kwargs)
    del kept["algorithm"]
    return kept, [f"algorithm.{key}" for key in section]


def merge_config_and_overrides(yaml_args: Namespace, cli_args: Sequence[str]) -> tuple[DictConfig, list[str]]:
    """torchtune's `_merge_yaml_and_cli_args` after `switch_method_section`: (the merged config, the dropped keys).

    Raises ValueError (torchtune's) on a malformed override."""
    from torchtune.config._utils import _merge_yaml_and_cli_args

    kept, dropped = switch_method_section(vars(yaml_args), cli_args)
    if dropped:  # torchtune's `algorithm=X` shorthand needs the file's `_component_`, which is gone now
        cli_args = [_COMPONENT + arg[len("algorithm") :] if arg.startswith("algorithm=") else arg for arg in cli_args]
    return _merge_yaml_and_cli_args(Namespace(**kept), list(cli_args)), dropped


def switched_note(cfg: DictConfig, dropped: Sequence[str]) -> str:
    """The line a run prints when an override replaced the file's method."""
    section = cfg.get("algorithm") or {}
    method = section.get("name") or section.get("_component_")
    return (
        f"algorithm: the command line chose {method!r}, another method than the config file's; the file's "
        f"algorithm section ({', '.join(dropped)}) was replaced by that method's published settings and the "
        "algorithm.* overrides"
    )


def parse(recipe_main: Callable[[DictConfig], Any]) -> Callable[..., Any]:
    """`torchtune.config.parse` with `switch_method_section`: `--config FILE key=value ...` -> recipe_main(cfg)."""
    from torchtune.config._parse import TuneRecipeArgumentParser

    @functools.wraps(recipe_main)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        parser = TuneRecipeArgumentParser(
            description=recipe_main.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
        )
        yaml_args, cli_args = parser.parse_known_args()
        cfg, dropped = merge_config_and_overrides(yaml_args, cli_args)
        if dropped and os.environ.get("RANK", "0") == "0":
            print(switched_note(cfg, dropped), file=sys.stderr, flush=True)
        sys.exit(recipe_main(cfg))

    return wrapper
