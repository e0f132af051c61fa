"""Validate a recipe config (YAML + `key=value` overrides) against the recipe's schema, before any compute.

Every recipe calls `validate_config(cfg, "rl" | "sft")` first thing in `recipe_main`. It checks, for every key:
it exists in the schema (else the error names it and the closest valid key, found with `difflib`), its value has
the right type (`int` where `float` is expected is accepted; `bool` is never an `int`), it is finite (NaN and ±inf
are refused for every number, also inside an optimizer's keyword arguments, unless the key's `Field` says
`finite=False`), it is one of the allowed values where the schema lists them, and it lies within the stated bounds. All problems are reported at once, in
one `ConfigError` (a `ValueError`). Missing optional keys are filled with their defaults in the returned config,
so a recipe can read `cfg.model.trust_remote_code` without `.get`.

Paths are resolved once, here: every key whose `Field` has `path` (`output_dir`, `model.path`, `data.source` and
`validation.source` when local) comes back absolute, against the cwd of the process that loads the config, so no
later use depends on the cwd, a run's record says which folder it used, and a resume compares real locations.

Sections whose `_component_` names a class (`optimizer`, `metric_logger`) may carry that class's keyword
arguments: each extra key is checked against the signature of the named class (`inspect.signature`), so
`optimizer.weight_decy` is caught here rather than as a `TypeError` deep inside setup.

The schema is data (the `COMMON`, `RL_ONLY`, `SFT_ONLY` tables below): one schema per recipe, sharing the common
sections. A key a recipe reads must be listed here, or configs that use it are rejected. The RL recipe's `algorithm`
section is the chosen method's: `algorithm.name` (a built-in method) or `algorithm._component_` (any method class)
chooses it, and the section's other keys are that class's dataclass fields (`vppo_recipes.methods`: defaults,
bounds, allowed values, declared once there); a setting of another built-in method is named as such. This is the
only config layer: the RL recipe's rules that span keys (`_rl_rules`: the method's own `config_errors`, sampling that
cannot work, ...) are checked here too, before any model or data is loaded, and the allowed values of the loss
options are vppo-core's own tuples.
"""

from __future__ import annotations

import dataclasses
import difflib
import inspect
import math
import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from omegaconf import DictConfig, OmegaConf

from vppo_core.losses import AGGREGATIONS, LOSS_TYPES
from vppo_recipes.lora import LM_PROJECTIONS
from vppo_recipes.methods import BUILTIN_METHODS, CHOOSING_KEYS, Method, build_method, method_class, method_settings

__all__ = [
    "ConfigError",
    "Field",
    "algorithm_schema",
    "check_paths",
    "check_world_size",
    "is_local_source",
    "resolve_path",
    "schema_for",
    "validate_config",
]


class ConfigError(ValueError):
    """A recipe config does not match its schema; the message lists every problem found."""


_MISSING = object()


@dataclass(frozen=True)
class Field:
    """One config key: accepted Python types, optional allowed values, bounds and default.

    `types` use the YAML scalar types (str, int, float, bool, list, dict). `float` accepts ints. A field with a
    `default` (anything but `_MISSING`) is optional. `nullable=True` also accepts `null`. `finite=False` lets a
    number be NaN or ±inf (YAML `.nan`, `.inf`, or an overflowing `1e400`); by default every number must be finite,
    because NaN passes both bound comparisons and would only fail mid-step, naming no key.
    """

    types: tuple[type, ...]
    choices: tuple[Any, ...] | None = None
    default: Any = _MISSING
    nullable: bool = False
    low: float | None = None  # lower bound for numbers, inclusive unless low_open
    high: float | None = None  # upper bound for numbers, inclusive unless high_open
    doc: str = ""
    low_open: bool = False  # True: the value must be > low
    high_open: bool = False  # True: the value must be < high
    finite: bool = True  # False: NaN / ±inf accepted (no key needs it today)
    # "local": a file or folder, made absolute by validate_config; "local_or_hub": the same unless it is a hub id
    # (`is_local_source`)
    path: str | None = None

    @property
    def required(self) -> bool:
        return self.default is _MISSING


def _f(*types: type, **kw: Any) -> Field:
    return Field(types=types, **kw)


# A section whose `_component_` names a class; extra keys are that class's keyword arguments.
@dataclass(frozen=True)
class Component:
    fields: Mapping[str, Field]


_POS_INT = {"low": 1}
_BUDGET_DOC = (
    "micro-batches by token budget: at most this many padded positions (rows x (longest prompt + longest "
    "response)) per forward per rank, rows grouped longest first, batch.micro_batch_size rows at most; null: "
    "batch.micro_batch_size rows each, in data order"
)
_NONNEG_INT = {"low": 0}
_ARCHS = ("qwen2_5_vl", "qwen3_vl")


COMMON: dict[str, Any] = {
    "output_dir": _f(str, path="local", doc="run folder: checkpoints, logs"),
    "seed": _f(int, **_NONNEG_INT),
    "model": {
        "path": _f(str, path="local", doc="local Hugging Face model folder"),
        "arch": _f(str, choices=_ARCHS, doc="checked against the folder's config.json model_type"),
        "dtype": _f(str, choices=("float32", "bfloat16")),
        "trust_remote_code": _f(bool, default=False),
        "min_pixels": _f(int, default=None, nullable=True, **_POS_INT),
        "max_pixels": _f(int, default=None, nullable=True, **_POS_INT),
        "lora": {  # vppo_recipes.lora; absent from a config: off
            "rank": _f(int, default=0, **_NONNEG_INT, doc="LoRA rank r; 0: full fine-tuning (every weight trained)"),
            "alpha": _f(
                float,
                default=None,
                nullable=True,
                low=0.0,
                low_open=True,
                doc="the adapter's output is scaled by alpha / rank; null: alpha = rank (scaling 1)",
            ),
            "dropout": _f(float, default=0.0, low=0.0, high=1.0, high_open=True, doc="dropout on the adapters' input"),
            "target_modules": _f(
                list,
                default=list(LM_PROJECTIONS),
                doc="names of the decoder layers' linear layers that get adapters (the vision tower never, unless "
                "vision: true)",
            ),
            "vision": _f(bool, default=False, doc="also adapt every linear layer of the vision blocks"),
        },
    },
    "world": {
        "nnodes": _f(int, **_POS_INT),
        "nproc_per_node": _f(int, **_POS_INT),
        "hsdp_replicas": _f(int, default=1, **_POS_INT),
    },
    "data": {
        "source": _f(
            str, path="local_or_hub", doc="datasets source: hub id, save_to_disk folder, parquet/jsonl file or folder"
        ),
        "split": _f(str),
        "columns": {
            "question": _f(str, default="problem"),
            "answer": _f(str, default="answer"),
            "images": _f(str, default="images"),
        },
        "max_prompt_length": _f(int, **_POS_INT),
        "shuffle": _f(bool, default=True),
    },
    "optimizer": Component(
        {
            "_component_": _f(str),
            "lr": _f(float, low=0.0),
            "weight_decay": _f(float, default=0.0, low=0.0),
        }
    ),
    "lr_scheduler": {
        "warmup_steps": _f(int, default=0, **_NONNEG_INT),
    },
    "training": {
        "max_steps": _f(int, **_POS_INT),
        "epochs": _f(int, default=1, **_POS_INT),
        "grad_clip": _f(float, default=1.0, nullable=True, low=0.0),
        "activation_checkpointing": _f(bool, default=False),
        "save_every_n_steps": _f(int, default=0, **_NONNEG_INT, doc="0: only at the end"),
        "resume": _f(str, default="auto", choices=("auto", "never")),
        "accept_config_changes": _f(
            bool,
            default=False,
            doc="resume even though keys that change what is trained differ from the checkpoint's config; the new "
            "values take effect (the optimizer's lr and weight decay too)",
        ),
    },
    "checkpoint": {
        "dtype": _f(
            str,
            default=None,
            nullable=True,
            choices=("float32", "bfloat16"),
            doc="dtype of the HF weights in checkpoints (null: model.dtype); resume stays exact either way",
        ),
    },
    "metric_logger": Component({"_component_": _f(str)}),
    "log_every_n_steps": _f(int, default=1, **_POS_INT),
}

RL_ONLY: dict[str, Any] = {
    "diagnostics": {
        "dependency": _f(
            bool,
            default=False,
            doc="true: every algorithm measures visual dependency (DAPO / GRPO with an extra no-grad pass over "
            "blackened images, which leaves their loss unchanged) and logs dependency/* and diag/* metrics",
        ),
    },
    "validation": {
        "source": _f(str, nullable=True, default=None, path="local_or_hub"),
        "split": _f(str, default="test"),
        "every_n_steps": _f(int, default=0, **_NONNEG_INT, doc="0: never"),
        "k": _f(int, default=8, **_POS_INT),
        "limit": _f(int, default=None, nullable=True, **_POS_INT),
    },
    "rollout": {
        "engine": _f(str, choices=("transformers", "vllm")),
        "group_size": _f(int, **_POS_INT),
        "batch_prompts": _f(int, **_POS_INT),
        "temperature": _f(float, default=1.0, low=0.0, doc="> 0: RL samples (1.0 in every published run)"),
        "top_p": _f(float, default=1.0, low=0.0, high=1.0),
        "top_k": _f(int, default=-1, low=-1),
        "max_new_tokens": _f(int, **_POS_INT),
        "online_filter": _f(bool, default=True),
        "max_filter_draws": _f(int, default=4, **_NONNEG_INT),
        "gpu_memory_utilization": _f(float, default=0.35, low=0.0, high=1.0),
        "sync_weights": _f(
            bool,
            default=True,
            doc="false: the sampler keeps its first weights (a diagnostic of the rollout/logprob_* metrics; "
            "never for training)",
        ),
    },
    "reward": {
        "format_weight": _f(float, default=0.1, low=0.0, high=1.0),
        "multiple_choice": _f(
            bool,
            default=False,
            doc="also accept option-letter answers ('C', 'B. 12 cm'); false: the paper's reward, mathruler's "
            "grade_answer on the last \\boxed{}",
        ),
    },
    "batch": {
        "update_prompts": _f(int, **_POS_INT),
        "micro_batch_size": _f(
            int, **_POS_INT, doc="responses per forward/backward per rank (the cap on them with a token budget)"
        ),
        "max_tokens_per_micro_batch": _f(int, default=None, nullable=True, **_POS_INT, doc=_BUDGET_DOC),
    },
    # "algorithm": built from the chosen method's dataclass (`algorithm_schema`, vppo_recipes.methods)
    "loss": {
        "loss_type": _f(str, default="dapo", choices=LOSS_TYPES),
        "aggregation": _f(str, default="token-mean", choices=AGGREGATIONS),
        "clip_low": _f(float, default=0.2, low=0.0, high=1.0),
        "clip_high": _f(float, default=0.28, low=0.0),
        "dual_clip": _f(float, default=3.0, nullable=True, low=1.0),
        "entropy_coef": _f(float, default=0.0, low=0.0),
        "chunk_size": _f(int, default=1024, **_POS_INT),
        "rollout_is_cap": _f(
            float,
            default=None,
            nullable=True,
            low=1.0,
            doc="truncated importance sampling: weight tokens by min(pi_old / pi_rollout, cap); null: off",
        ),
    },
}

SFT_ONLY: dict[str, Any] = {
    "data": {
        "columns": {
            # A column holding the full target text; null -> the target is built from `response_template`.
            "response": _f(str, default=None, nullable=True),
        },
        "response_template": _f(
            str,
            default="<think>The image shows the answer.</think> The answer is \\boxed{{answer}}.",
            doc="target text when columns.response is null; the literal '{answer}' is replaced by the answer",
        ),
        "max_response_length": _f(int, default=256, **_POS_INT),
    },
    "batch": {
        "batch_size": _f(int, **_POS_INT, doc="examples per optimizer step, all ranks together"),
        "micro_batch_size": _f(
            int, **_POS_INT, doc="examples per forward/backward per rank (the cap on them with a token budget)"
        ),
        "max_tokens_per_micro_batch": _f(int, default=None, nullable=True, **_POS_INT, doc=_BUDGET_DOC),
    },
    "loss": {
        "chunk_size": _f(int, default=1024, **_POS_INT),
    },
}

# Keys that existed or that other frameworks have, which the recipes deliberately do not read.
REMOVED_KEYS = {
    "loss.kl_coef": "the RL recipe loads no frozen reference policy, so there is no KL term (the published VPPO, "
    "PGPO and DAPO runs use none); vppo_core.policy_loss has one for your own loops",
    "loss.kl_estimator": "there is no KL term (see loss.kl_coef)",
}

# Keys people write by analogy with other frameworks, with the key this project uses instead.
MOVED_KEYS = {
    "training.dtype": "model.dtype",
    "training.lr": "optimizer.lr",
    "training.seed": "seed",
    "model.name_or_path": "model.path",
    "rollout.n": "rollout.group_size",
    "data.image_key": "data.columns.images",
    "data.prompt_key": "data.columns.question",
    "data.answer_key": "data.columns.answer",
}


def _merge(a: Mapping[str, Any], b: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(a)
    for key, value in b.items():
        if key in out and isinstance(out[key], dict) and isinstance(value, dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _setting_field(typ: Any, f: dataclasses.Field) -> Field:
    """The schema `Field` of one method setting (a dataclass field declared with `methods.param`)."""
    nullable = False
    if typing.get_origin(typ) in (typing.Union, types.UnionType):
        args = [t for t in typing.get_args(typ) if t is not type(None)]
        nullable, typ = len(args) < len(typing.get_args(typ)), args[0]
    meta, choices = f.metadata, f.metadata.get("choices")
    if typing.get_origin(typ) is typing.Literal:  # Literal["a", "b"]: a str setting with those choices
        choices, typ = choices or typing.get_args(typ), type(typing.get_args(typ)[0])
    typ = typing.get_origin(typ) or typ  # list[float] -> list
    typ = list if typ is tuple else typ  # YAML has lists
    if f.default is not dataclasses.MISSING:
        default = f.default
    elif f.default_factory is not dataclasses.MISSING:
        default = f.default_factory()
    else:
        default = _MISSING
    if isinstance(default, tuple):  # an immutable default of a list setting: the config holds (and saves) a list
        default = list(default)
    return Field(
        types=(typ,), choices=choices, default=default, nullable=nullable, low=meta.get("low"),
        high=meta.get("high"), low_open=bool(meta.get("low_open")), high_open=bool(meta.get("high_open")),
        doc=meta.get("doc", ""),
    )  # fmt: skip


def algorithm_schema(cls: type[Method] | None, *, by_component: bool = False) -> dict[str, Field]:
    """The `algorithm` section's schema: the key that chooses the method (`name`, or `_component_` when
    by_component), then the method class's settings (`methods.method_settings`); only the choosing keys when cls is
    None (the method could not be chosen)."""
    if cls is None:  # the error that the method cannot be chosen is `_choose_method`'s; accept the keys as given
        return {key: _f(str, default=None, nullable=True) for key in CHOOSING_KEYS}
    schema = {"_component_": _f(str)} if by_component else {"name": _f(str, choices=tuple(BUILTIN_METHODS))}
    for key, typ, f in method_settings(cls):
        schema[key] = _setting_field(typ, f)
    return schema


def schema_for(recipe: str, algorithm: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The schema of recipe `recipe` ("rl" or "sft"): the common sections merged with the recipe's own; for "rl" the
    `algorithm` section is that of the method `algorithm` (an algorithm section) names, or only its choosing keys."""
    if recipe == "rl":
        try:
            cls = method_class(algorithm) if algorithm is not None else None
        except ValueError:
            cls = None
        by_component = algorithm is not None and "_component_" in algorithm
        return _merge(COMMON, {**RL_ONLY, "algorithm": algorithm_schema(cls, by_component=by_component)})
    if recipe == "sft":
        return _merge(COMMON, SFT_ONLY)
    raise ValueError(f"recipe must be 'rl' or 'sft', got {recipe!r}")


def _all_paths(schema: Mapping[str, Any], prefix: str = "") -> list[str]:
    paths = []
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        paths.append(path)
        sub = spec.fields if isinstance(spec, Component) else spec
        if isinstance(sub, Mapping):
            paths += _all_paths(sub, path + ".")
    return paths


def _suggest(path: str, section_keys: list[str], all_paths: list[str]) -> str:
    if path in REMOVED_KEYS:
        return f": {REMOVED_KEYS[path]}; remove it"
    if path in MOVED_KEYS:
        return f" (this project calls it '{MOVED_KEYS[path]}')"
    name = path.rsplit(".", 1)[-1]
    prefix = path[: -len(name)]
    close = difflib.get_close_matches(name, section_keys, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{prefix}{close[0]}'?)"
    # Same key name in another section, or a close dotted path anywhere.
    same_name = [p for p in all_paths if p.rsplit(".", 1)[-1] == name]
    if same_name:
        return f" (did you mean '{same_name[0]}'?)"
    close = difflib.get_close_matches(path, all_paths, n=1, cutoff=0.6)
    if close:
        return f" (did you mean '{close[0]}'?)"
    return f" (valid keys here: {', '.join(sorted(section_keys))})"


def _type_name(types: tuple[type, ...], nullable: bool) -> str:
    names = [t.__name__ for t in types]
    return " or ".join(names + (["null"] if nullable else []))


def _nonfinite(path: str, value: Any) -> str | None:
    """The first NaN / ±inf number in `value` (a scalar, or lists / mappings of them), as an error naming its key
    (`optimizer.betas[1]`); None when every number in it is finite."""
    if isinstance(value, float) and not math.isfinite(value):
        return (
            f"'{path}' is {value!r}; every numeric setting must be a finite number (NaN passes every bound check "
            "and would only fail mid-run)"
        )
    items = value.items() if isinstance(value, Mapping) else enumerate(value) if isinstance(value, list) else ()
    for key, item in items:
        msg = _nonfinite(f"{path}.{key}" if isinstance(value, Mapping) else f"{path}[{key}]", item)
        if msg:
            return msg
    return None


def _check_value(path: str, value: Any, field: Field) -> str | None:
    if value is None:
        return None if field.nullable else f"'{path}' is null; expected {_type_name(field.types, False)}"
    numeric = float in field.types or int in field.types
    nested = list in field.types or dict in field.types  # e.g. a Composed method's blocks and their arguments
    if (numeric or nested) and field.finite and (msg := _nonfinite(path, value)):  # before the type check
        return msg
    ok = False
    for t in field.types:
        if t is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        elif t is int:
            ok = isinstance(value, int) and not isinstance(value, bool)
        else:
            ok = isinstance(value, t)
        if ok:
            break
    if not ok:
        return (
            f"'{path}' has type {type(value).__name__} (value {value!r}); "
            f"expected {_type_name(field.types, field.nullable)}"
        )
    if field.choices is not None and value not in field.choices:
        return f"'{path}' is {value!r}; allowed values: {', '.join(map(repr, field.choices))}"
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        below = field.low is not None and (value <= field.low if field.low_open else value < field.low)
        above = field.high is not None and (value >= field.high if field.high_open else value > field.high)
        if (below or above) and (field.low_open or field.high_open):
            return f"'{path}' is {value!r}; must be {_interval(field)}"
        if below:
            return f"'{path}' is {value!r}; must be >= {field.low}"
        if above:
            return f"'{path}' is {value!r}; must be <= {field.high}"
    return None


def _interval(field: Field) -> str:
    """The accepted range of a field with an open bound, as `(0, 1]` or `> 0`."""
    if field.high is None:
        return f"{'>' if field.low_open else '>='} {field.low:g}"
    if field.low is None:
        return f"{'<' if field.high_open else '<='} {field.high:g}"
    return f"in {'(' if field.low_open else '['}{field.low:g}, {field.high:g}{')' if field.high_open else ']'}"


def _component_kwargs(path: str, target: str, extra: Mapping[str, Any]) -> list[str]:
    """Check `extra` keys against the keyword arguments of the class named by `target`, and their numbers are finite
    (a component's own keyword arguments have no `Field`, so the default rule applies: no NaN / ±inf)."""
    nonfinite = [msg for key, value in extra.items() if (msg := _nonfinite(f"{path}.{key}", value))]
    from torchtune.config._utils import _get_component_from_path

    try:
        obj = _get_component_from_path(target)
    except Exception as e:  # an import error of any kind means the path cannot be used
        return [f"'{path}._component_' = {target!r} cannot be imported: {type(e).__name__}: {e}", *nonfinite]
    try:
        params = inspect.signature(obj).parameters
    except (TypeError, ValueError):
        return nonfinite  # a builtin without a signature: nothing to check the names against
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return nonfinite
    accepted = [n for n, p in params.items() if p.kind is not inspect.Parameter.VAR_POSITIONAL and n != "params"]
    errors = nonfinite
    for key in extra:
        if key not in accepted:
            close = difflib.get_close_matches(key, accepted, n=1, cutoff=0.6)
            hint = f" (did you mean '{path}.{close[0]}'?)" if close else f" (accepted: {', '.join(accepted)})"
            errors.append(f"unknown key '{path}.{key}': {target} takes no argument '{key}'{hint}")
    return errors


def _validate(node: Mapping[str, Any], schema: Mapping[str, Any], prefix: str, errors: list[str], all_paths) -> None:
    keys = list(schema)
    for key in node:
        path = f"{prefix}{key}"
        if key not in schema:
            errors.append(f"unknown key '{path}'{_suggest(path, keys, all_paths)}")
    for key, spec in schema.items():
        path = f"{prefix}{key}"
        if isinstance(spec, Field):
            if key in node:
                msg = _check_value(path, node[key], spec)
                if msg:
                    errors.append(msg)
            elif spec.required:
                errors.append(f"missing key '{path}' ({_type_name(spec.types, spec.nullable)}){_doc(spec)}")
            continue
        sub = node.get(key, _MISSING)
        fields = spec.fields if isinstance(spec, Component) else spec
        if sub is _MISSING:
            required = [k for k, f in fields.items() if isinstance(f, Field) and f.required]
            if required:
                errors.append(f"missing section '{path}' (needs: {', '.join(required)})")
            continue
        if not isinstance(sub, Mapping):
            errors.append(f"'{path}' must be a section (mapping), got {type(sub).__name__} {sub!r}")
            continue
        if isinstance(spec, Component):
            extra = {k: v for k, v in sub.items() if k not in fields}
            known = {k: v for k, v in sub.items() if k in fields}
            _validate(known, fields, path + ".", errors, all_paths)
            target = sub.get("_component_")
            if isinstance(target, str) and extra:
                errors += _component_kwargs(path, target, extra)
        else:
            _validate(sub, spec, path + ".", errors, all_paths)


def _doc(field: Field) -> str:
    return f": {field.doc}" if field.doc else ""


def _defaults(schema: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, spec in schema.items():
        if isinstance(spec, Field):
            if not spec.required:
                out[key] = spec.default
        else:
            fields = spec.fields if isinstance(spec, Component) else spec
            sub = _defaults(fields)
            if sub or not any(isinstance(f, Field) and f.required for f in fields.values()):
                out[key] = sub
    return out


def _missing_logger_package(cfg: Mapping[str, Any]) -> list[str]:
    """The `metric_logger` component's optional package when it is not installed (TensorBoard), as an error."""
    from vppo_recipes.metric_logging import missing_logger_package

    section = cfg.get("metric_logger")
    problem = missing_logger_package(section) if isinstance(section, Mapping) else None
    return [problem] if problem else []


def is_local_source(source: str) -> bool:
    """Whether a data source names a local file or folder rather than a hub dataset: it exists on disk, or it is
    spelled like a path (starts with '.', '/' or '~', or is not of the hub's "owner/name" form). `load_source`
    reads a source by the same rule."""
    text = str(source)
    return os.path.exists(os.path.expanduser(text)) or text.startswith((".", "/", "~")) or text.count("/") != 1


def resolve_path(value: Any, kind: str | None) -> Any:
    """`value` of a key whose `Field.path` is `kind`, absolute: '~' expanded, joined to the cwd, '.' and '..'
    folded (symlinks kept). Values that are not paths come back unchanged: None, a hub id ("local_or_hub"), or any
    value of a key that is no path (kind None). Idempotent."""
    if kind is None or not isinstance(value, str) or (kind == "local_or_hub" and not is_local_source(value)):
        return value
    return os.path.abspath(os.path.expanduser(value))


def _path_keys(schema: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Dotted key -> `Field.path` of every path key of `schema`."""
    out: dict[str, str] = {}
    for key, spec in schema.items():
        if isinstance(spec, Field):
            if spec.path is not None:
                out[f"{prefix}{key}"] = spec.path
        else:
            out.update(_path_keys(spec.fields if isinstance(spec, Component) else spec, f"{prefix}{key}."))
    return out


def validate_config(cfg: DictConfig | Mapping[str, Any], recipe: str) -> DictConfig:
    """Check `cfg` against the schema of `recipe` ("rl" | "sft") and return it with defaults filled in.

    Interpolations (`${output_dir}/logs`) are resolved first, so an unresolvable one is reported here too.
    Raises `ConfigError` (a ValueError) listing every unknown key (with the closest valid key), missing required
    key, wrong type, NaN / ±inf number, disallowed value and out-of-bounds number, and for "rl" every broken rule of `_rl_rules`.
    Never touches a model or a dataset. For "rl" the `algorithm` section of the result holds only the settings
    `algorithm.name` reads.
    """
    if not isinstance(cfg, DictConfig):
        if not isinstance(cfg, Mapping):
            raise ConfigError(f"config must be a mapping, got {type(cfg).__name__}")
        cfg = OmegaConf.create(dict(cfg))
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # omegaconf raises several interpolation error types
        raise ConfigError(f"config cannot be resolved (an interpolation or a ??? value): {e}") from e
    errors: list[str] = []
    if recipe == "rl":
        plain, errors = _choose_method(plain)
    schema = schema_for(recipe, plain.get("algorithm") if recipe == "rl" else None)
    _validate(plain, schema, "", errors, _all_paths(schema))
    errors += _unsupported_optimizer_options(plain)
    errors += _missing_logger_package(plain)
    if not errors:
        errors += _common_rules(OmegaConf.to_container(OmegaConf.merge(_defaults(schema), plain)))
    if recipe == "rl" and not errors:
        errors += _rl_rules(OmegaConf.to_container(OmegaConf.merge(_defaults(schema), plain)))
    if not errors:
        errors += _budget_rules(OmegaConf.to_container(OmegaConf.merge(_defaults(schema), plain)), recipe)
    if errors:
        lines = "\n".join(f"  - {e}" for e in errors)
        raise ConfigError(f"invalid config for the {recipe} recipe ({len(errors)} problem(s)):\n{lines}")
    merged = OmegaConf.merge(OmegaConf.create(_defaults(schema)), cfg)
    for key, kind in _path_keys(schema).items():  # resolved once, here (module docstring)
        value = OmegaConf.select(merged, key)
        if isinstance(value, str):
            OmegaConf.update(merged, key, resolve_path(value, kind))
    return merged


def _choose_method(plain: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The method an RL config's `algorithm` section chooses, checked before its settings: returns (the config with
    what cannot be validated against the method left out, errors). A setting of another built-in method is named
    as such (the fix is to remove it, or to choose that method); an unknown or missing method is one error, and its
    settings are then not checked."""
    section = plain.get("algorithm")
    if section is None:
        return {**plain, "algorithm": {}}, [
            "missing section 'algorithm' (needs: name, one of the built-in methods, or _component_, the import path "
            "of a method class)"
        ]
    if not isinstance(section, Mapping):
        return {**plain, "algorithm": {}}, [f"'algorithm' must be a section (mapping), got {type(section).__name__}"]
    try:
        cls = method_class(section)
    except ValueError as e:
        return {**plain, "algorithm": {}}, [str(e)]
    own = {key for key, _, _ in method_settings(cls)}
    chosen = (
        f"algorithm.name={section['name']}" if "name" in section else f"algorithm._component_={section['_component_']}"
    )
    errors, kept = [], {}
    for key, value in section.items():
        owners = [name for name, other in BUILTIN_METHODS.items() if key in {k for k, _, _ in method_settings(other)}]
        if key in CHOOSING_KEYS or key in own or not owners:
            kept[key] = value  # an unknown key is named (with the closest valid one) by the generic check
            continue
        errors.append(
            f"'algorithm.{key}' is a setting of {'/'.join(owners)}; {chosen} does not use it: remove it "
            f"(or set algorithm.name={owners[0]})"
        )
    return {**plain, "algorithm": kept}, errors


def _common_rules(cfg: Mapping[str, Any]) -> list[str]:
    """Rules of both recipes that one key's inclusive bounds cannot state. `cfg`: with defaults filled in."""
    errors = []
    clip = cfg["training"]["grad_clip"]
    if clip is not None and clip <= 0:
        # The RL recipe once read 0 as "no clipping" and the SFT recipe as "clip to 0": one meaning, stated.
        errors.append(
            f"training.grad_clip={clip} would scale every update to zero; it must be > 0 (or null: no clipping)"
        )
    targets = cfg["model"]["lora"]["target_modules"]
    if (
        not targets
        or not all(isinstance(t, str) and t and "." not in t for t in targets)
        or len(set(targets)) < len(targets)
    ):
        errors.append(
            f"model.lora.target_modules={targets!r} must be a non-empty list of distinct linear-layer names of a "
            f"decoder layer (no dots), e.g. {list(LM_PROJECTIONS)}"
        )
    return errors


def _budget_rules(cfg: Mapping[str, Any], recipe: str) -> list[str]:
    """batch.max_tokens_per_micro_batch must hold the longest sequence the recipe can meet (one row alone: its
    prompt, at most data.max_prompt_length, and its response, at most rollout.max_new_tokens / data.max_response_length),
    else some row fits no micro-batch. `cfg`: with defaults filled in."""
    budget = cfg["batch"]["max_tokens_per_micro_batch"]
    if budget is None:
        return []
    response_key = "rollout.max_new_tokens" if recipe == "rl" else "data.max_response_length"
    section, name = response_key.split(".")
    longest = cfg["data"]["max_prompt_length"] + cfg[section][name]
    if budget < longest:
        return [
            f"batch.max_tokens_per_micro_batch={budget} is smaller than one sequence: data.max_prompt_length "
            f"({cfg['data']['max_prompt_length']}) + {response_key} ({cfg[section][name]}) = {longest}; raise it to "
            f"at least {longest} (or lower those), or set it to null for fixed batch.micro_batch_size micro-batches"
        ]
    return []


def _rl_rules(cfg: Mapping[str, Any]) -> list[str]:
    """The RL recipe's rules that span keys, the chosen method's own (`Method.config_errors`) first. `cfg`: with
    defaults filled in."""
    try:
        errors = build_method(cfg["algorithm"]).config_errors(cfg)
    except Exception as e:  # a method's own __post_init__ / config_errors refusing its settings
        chosen = cfg["algorithm"].get("name") or cfg["algorithm"].get("_component_")
        errors = [f"the method {chosen} refuses its settings: {type(e).__name__}: {e}"]
    rollout, loss = cfg["rollout"], cfg["loss"]
    lora = cfg["model"]["lora"]
    if lora["rank"] and lora["dropout"]:
        errors.append(
            f"model.lora.dropout={lora['dropout']}: the RL recipe's no-grad passes (lp_old, the methods' views) and "
            "its update must compute one policy; dropout would make the first ratios differ from 1 and depend on the "
            "ranks' random streams. Set model.lora.dropout=0.0 (the SFT recipe accepts dropout)"
        )
    if rollout["temperature"] <= 0:
        errors.append(
            f"rollout.temperature={rollout['temperature']}: RL samples its groups, so it must be > 0 (1.0 in every "
            "published run); temperature 0 is greedy and would give G identical responses"
        )
    if rollout["group_size"] < 2:
        errors.append("rollout.group_size must be >= 2 (GRPO's group std needs two responses)")
    if loss["rollout_is_cap"] is not None and rollout["temperature"] != 1.0:
        errors.append(
            "loss.rollout_is_cap compares the trainer's log-probs at rollout.temperature with the sampler's raw "
            f"(temperature 1) log-probs; it needs rollout.temperature=1.0, got {rollout['temperature']}"
        )
    validation = cfg["validation"]
    if validation["every_n_steps"] and validation["source"] is None:
        errors.append("validation.every_n_steps > 0 needs validation.source (a held-out split); or set it to 0")
    return errors


def _unsupported_optimizer_options(plain: Mapping[str, Any]) -> list[str]:
    """Optimizer options that cannot work with the recipes' FSDP2 float32 master weights; fail before compute."""
    optimizer = plain.get("optimizer") or {}
    if optimizer.get("bf16_stochastic_round"):
        # torchao <= 0.15 (the versions torchtune 0.6.1 imports) draws its rounding noise at the parameter's global
        # shape and compares it with the FSDP2 DTensor shard: "got mixed torch.Tensor and DTensor"
        # (pytorch/ao#2296). It would also only apply to bfloat16 parameters, and the recipes keep float32 masters.
        return [
            f"optimizer.bf16_stochastic_round=true is not supported: {optimizer.get('_component_')} cannot round "
            "FSDP2-sharded parameters stochastically with torchao <= 0.15 (pytorch/ao#2296), and the recipes train "
            "float32 master weights, where it would do nothing; drop the key (torchao.optim.AdamW8bit is the "
            "supported low-memory optimizer)"
        ]
    return []


def check_world_size(cfg: DictConfig | Mapping[str, Any], world_size: int) -> None:
    """Check that `world.nnodes * world.nproc_per_node` equals the launched WORLD_SIZE, and HSDP divides it.

    Called by the recipes after `init_process_group`, before building the model.
    """
    world = cfg["world"]
    expected = int(world["nnodes"]) * int(world["nproc_per_node"])
    if expected != world_size:
        raise ConfigError(
            f"world.nnodes * world.nproc_per_node = {world['nnodes']} * {world['nproc_per_node']} = {expected}, "
            f"but the launch has WORLD_SIZE={world_size}; set world.nproc_per_node={world_size} "
            f"(and world.nnodes=1) or launch with --nproc_per_node {expected}"
        )
    replicas = int(world.get("hsdp_replicas", 1))
    if world_size % replicas != 0:
        raise ConfigError(f"world.hsdp_replicas={replicas} must divide the world size {world_size}")


def check_paths(cfg: DictConfig | Mapping[str, Any]) -> None:
    """Check, on disk, the paths a run reads before anything loads them; raise `ConfigError` listing every problem.

    `cfg`: a config returned by `validate_config` (paths absolute). `model.path` must be a Hugging Face model folder
    (a `config.json` whose `model_type` is `model.arch`); `data.source` and `validation.source`, when local
    (`is_local_source`), must exist. A hub id is not checked here: whether it is cached is the loader's question.
    Without this, a wrong path surfaced after torchrun had started every rank, naming no key.
    """
    errors = []
    model = str(cfg["model"]["path"])
    config_json = os.path.join(model, "config.json")
    if not os.path.isdir(model):
        errors.append(
            f"model.path={model!r} is not an existing folder; set model.path to a Hugging Face model folder (the one "
            "holding config.json and the weights; `vppo-recipes init-tiny runs` writes the tiny configs' runs/tiny_ckpt)"
        )
    elif not os.path.isfile(config_json):
        errors.append(
            f"model.path={model!r} has no config.json, so it is no Hugging Face model folder; set model.path to the "
            "folder that holds config.json and the weights"
        )
    else:
        import json

        try:
            model_type = json.loads(open(config_json).read()).get("model_type")
        except (OSError, ValueError, AttributeError) as e:
            errors.append(f"model.path={model!r}: {config_json} cannot be read as JSON ({e}); repair or re-download it")
        else:
            if model_type != cfg["model"]["arch"]:
                errors.append(
                    f"model.arch={cfg['model']['arch']!r} but model.path={model!r} holds a {model_type!r} model "
                    f"(config.json model_type); set model.arch={model_type}"
                    if model_type in _ARCHS
                    else f"model.path={model!r} holds a {model_type!r} model; supported: {', '.join(_ARCHS)}"
                )
    for key in ("data.source", "validation.source"):
        section, name = key.split(".")
        value = (cfg.get(section) or {}).get(name)
        if isinstance(value, str) and is_local_source(value) and not os.path.exists(value):
            errors.append(
                f"{key}={value!r} does not exist; set {key} to a data file or folder (parquet / jsonl / json / csv, "
                "or a save_to_disk folder) or a hub id 'owner/name' (`vppo-recipes init-tiny runs` writes the tiny "
                "configs' runs/visual_task)"
            )
    if errors:
        raise ConfigError("\n".join(errors))


# Keys a resumed run may change freely: how long and how often, where to log, how many ranks, memory knobs. Any
# other difference from the checkpoint's config changes what is trained and needs training.accept_config_changes.
RESUME_FREE_KEYS = (
    "output_dir",
    "training.max_steps",
    "training.epochs",
    "training.save_every_n_steps",
    "training.resume",
    "training.accept_config_changes",
    "training.activation_checkpointing",
    "checkpoint",  # how checkpoints are written; a bfloat16 export restores the float32 master weights exactly
    "log_every_n_steps",
    "metric_logger",
    "validation",
    "world",
    "model.path",  # the weights come from the checkpoint; model.path is checked for the same architecture
    "rollout.gpu_memory_utilization",
    "batch.micro_batch_size",
    "batch.max_tokens_per_micro_batch",  # the split changes no loss (test_rl_step_independent.py)
    "loss.chunk_size",
)


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, Mapping):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]) -> list[str]:
    """The keys that differ between a checkpoint's config and this launch's, outside `RESUME_FREE_KEYS`, as
    "key: checkpoint X, now Y" (a key only one side has shows as <absent>)."""
    # A record written before paths were resolved holds them as given: read them as that run did, from the cwd.
    paths = {**_path_keys(schema_for("sft")), **_path_keys(schema_for("rl"))}
    a = {k: resolve_path(v, paths.get(k)) for k, v in _flatten(saved).items()}
    b = _flatten(current)

    lora = bool(b.get("model.lora.rank"))

    def free(key: str) -> bool:
        if key == "model.path" and lora:  # a LoRA checkpoint holds the adapter alone: model.path is its base
            return False
        return any(key == f or key.startswith(f + ".") for f in RESUME_FREE_KEYS)

    absent = "<absent>"
    # A key added to the schema after the checkpoint was written, at its default, changes nothing (model.lora.*)
    defaults = {**_flatten(_defaults(schema_for("sft"))), **_flatten(_defaults(schema_for("rl")))}
    a.update({k: defaults[k] for k in b if k not in a and k in defaults and b[k] == defaults[k]})
    return [
        f"{key}: checkpoint {a.get(key, absent)!r}, now {b.get(key, absent)!r}"
        for key in sorted(set(a) | set(b))
        if not free(key) and a.get(key, absent) != b.get(key, absent)
    ]
