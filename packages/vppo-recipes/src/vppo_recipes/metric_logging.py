"""Metric loggers for the recipes: a JSONL logger plus a builder for torchtune's loggers from the config.

`JsonlLogger` implements torchtune's `MetricLoggerInterface` (`log`, `log_dict`, `log_config`, `close`) and writes
one JSON object per `log_dict` call to `<log_dir>/metrics.jsonl`: `{"step": 3, "loss": 0.71, ...}`, flushed at
once so a crashed run keeps every line it logged. Only rank 0 writes. Non-finite numbers are written as Python's
`json` writes them (`NaN`, `Infinity`), which `json.loads` and pandas read back.

`build_metric_logger(cfg.metric_logger, log_dir=...)` gives rank 0 a JsonlLogger always, plus the configured
`_component_` when that is another logger (torchtune's `WandBLogger` / `TensorBoardLogger` / `StdoutLogger` /
`DiskLogger`), composed in a `CompositeLogger` that hands every call to both; every other rank gets a `NullLogger`.
So `logs/metrics.jsonl`, which the tests, the demo and `compare_runs` read and which a resume cuts back, is written
whatever else logs. Secrets never belong in a config: a `metric_logger` key that looks like one (`api_key`, `token`,
...) is an error; wandb reads its key from `WANDB_API_KEY` or `wandb login`, and `mode: offline` (or
`WANDB_MODE=offline`) needs none. `TensorBoardLogger` needs the `tensorboard` package, vppo-recipes' optional extra
`tensorboard`; without it the config check (`missing_logger_package`) names the extra.
"""

from __future__ import annotations

import importlib.util
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchtune.training.metric_logging import MetricLoggerInterface

__all__ = [
    "CompositeLogger",
    "JsonlLogger",
    "NullLogger",
    "build_metric_logger",
    "missing_logger_package",
    "read_jsonl",
]

_SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password")
# Loggers whose package is an optional extra of vppo-recipes: `_component_` -> (module to import, extra's name).
_OPTIONAL_PACKAGES = {"torchtune.training.metric_logging.TensorBoardLogger": ("tensorboard", "tensorboard")}


def _rank() -> int:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def _to_python(value: Any) -> Any:
    """Tensor / numpy scalar -> Python number (multi-element -> list); other values unchanged."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu()
        return value.item() if value.numel() == 1 else value.tolist()
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.item() if value.size == 1 else value.tolist()
    return value


class JsonlLogger(MetricLoggerInterface):
    """Append metrics to `<log_dir>/<filename>` as JSON lines (rank 0 only).

    Args:
        log_dir: folder, created if missing.
        filename: file name inside `log_dir`.
        **kwargs: ignored (accepted so torchtune-style configs can share keys between loggers).
    """

    def __init__(self, log_dir: str | os.PathLike, filename: str = "metrics.jsonl", **kwargs: Any) -> None:
        self.path = Path(log_dir) / filename
        self.rank = _rank()
        self._fh = None
        if self.rank == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fh = open(self.path, "a")

    def log(self, name: str, data: Any, step: int) -> None:
        self.log_dict({name: data}, step)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        if self._fh is None:
            return
        record = {"step": int(step)}
        record.update({str(k): _to_python(v) for k, v in payload.items()})
        self._fh.write(json.dumps(record) + "\n")
        self._fh.flush()

    def log_config(self, config: DictConfig) -> None:
        """Write the resolved config next to the metrics: `config.yaml` for the first launch, `config.2.yaml`,
        `config.3.yaml`, ... for every later one (a resume), so no launch's record is overwritten."""
        if self.rank != 0:
            return
        folder = self.path.parent
        target, launch = folder / "config.yaml", 1
        while target.exists():
            launch += 1
            target = folder / f"config.{launch}.yaml"
        OmegaConf.save(config, target, resolve=True)

    def rewind(self, step: int) -> None:
        """Drop every line with `step` > `step` (call after resuming from checkpoint `step`, so lines logged by
        the interrupted run after its last checkpoint are not duplicated). Rank 0 only; atomic rewrite."""
        if self._fh is None:
            return
        self._fh.close()
        kept = [rec for rec in read_jsonl(self.path) if rec.get("step", -1) <= step]
        tmp = self.path.with_suffix(self.path.suffix + ".tmp")
        with open(tmp, "w") as fh:
            fh.writelines(json.dumps(rec) + "\n" for rec in kept)
        os.replace(tmp, self.path)
        self._fh = open(self.path, "a")

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def __del__(self) -> None:
        self.close()


class NullLogger(MetricLoggerInterface):
    """Logs nothing: what ranks other than 0 get from `build_metric_logger`."""

    def log(self, name: str, data: Any, step: int) -> None:
        pass

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        pass

    def log_config(self, config: DictConfig) -> None:
        pass

    def close(self) -> None:
        pass


class CompositeLogger(MetricLoggerInterface):
    """Hands every call to each of `loggers`, in order (rank 0's JsonlLogger and the configured logger).

    `rewind` (after a resume) reaches the loggers that have one: the JSONL file is cut back to the checkpoint's
    step. The others keep what they logged; each launch is a run of its own there (a new wandb run, a new
    TensorBoard `run_<rank>_<time>` folder), so the interrupted launch's steps after the checkpoint stay in its run.
    """

    def __init__(self, loggers: list[MetricLoggerInterface]) -> None:
        self.loggers = list(loggers)

    def log(self, name: str, data: Any, step: int) -> None:
        for logger in self.loggers:
            logger.log(name, data, step)

    def log_dict(self, payload: Mapping[str, Any], step: int) -> None:
        for logger in self.loggers:
            logger.log_dict(payload, step)

    def log_config(self, config: DictConfig) -> None:
        for logger in self.loggers:
            logger.log_config(config)

    def rewind(self, step: int) -> None:
        for logger in self.loggers:
            if hasattr(logger, "rewind"):
                logger.rewind(step)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


def read_jsonl(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record of a JSONL metrics file (a partial last line, from a crash mid-write, is ignored)."""
    records = []
    with open(path) as fh:
        for line in fh:
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return records


def missing_logger_package(section: Mapping[str, Any]) -> str | None:
    """What is wrong when the `metric_logger` section's `_component_` needs a package that is not installed (an
    optional extra of vppo-recipes), naming the key and the fix; None when nothing is missing."""
    component = str(section.get("_component_", ""))
    if component not in _OPTIONAL_PACKAGES:
        return None
    module, extra = _OPTIONAL_PACKAGES[component]
    if importlib.util.find_spec(module) is not None:
        return None
    return (
        f"metric_logger._component_ is {component}, which needs the `{module}` package (not installed): install "
        f"vppo-recipes with its `{extra}` extra (`pip install -e 'packages/vppo-recipes[{extra}]'` in a checkout, or "
        f"`pip install {module}`), or choose another metric_logger._component_"
    )


def build_metric_logger(
    cfg: DictConfig | Mapping[str, Any], *, rank: int | None = None, log_dir: str | os.PathLike | None = None
) -> MetricLoggerInterface:
    """The run's metric logger: on rank 0 a JsonlLogger, composed with the configured logger when `_component_` is
    another one; a `NullLogger` on every other rank.

    cfg: the `metric_logger` section itself (`{"_component_": "...WandBLogger", "project": ..., "log_dir": ...}`).
    log_dir: where metrics.jsonl goes when the section has no `log_dir` (the recipes pass `<output_dir>/logs`).
    Raises ValueError if a key looks like a secret (see module docstring), if the component's optional package is
    missing (`missing_logger_package`), or if neither the section nor the caller names a log_dir.
    """
    from torchtune import config as tt_config

    section = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(dict(cfg))
    for key in section:
        if any(word in str(key).lower() for word in _SECRET_WORDS):
            raise ValueError(
                f"metric_logger.{key} looks like a secret; remove it from the config and use the environment "
                "(e.g. WANDB_API_KEY or `wandb login`; or metric_logger.mode=offline)"
            )
    if (_rank() if rank is None else rank) != 0:
        return NullLogger()
    if (missing := missing_logger_package(section)) is not None:
        raise ValueError(missing)
    configured = tt_config.instantiate(section)
    if isinstance(configured, JsonlLogger):
        return configured
    jsonl_dir = section.get("log_dir", None) or log_dir
    if jsonl_dir is None:
        raise ValueError(
            f"metric_logger: {section._component_} has no log_dir for metrics.jsonl, which every run writes; set "
            "metric_logger.log_dir or pass build_metric_logger(..., log_dir=)"
        )
    return CompositeLogger([JsonlLogger(jsonl_dir), configured])
