"""Metric loggers for the recipes: a JSONL logger plus a builder for torchtune's loggers from the config.

`JsonlLogger` implements torchtune's `MetricLoggerInterface` (`log`, `log_dict`, `log_config`, `close`) and writes
one JSON object per `log_dict` call to `<log_dir>/metrics.jsonl`: `{"step": 3, "loss": 0.71, ...}`, flushed at
once so a crashed run keeps every line it logged. Only rank 0 writes. Non-finite numbers are written as Python's
`json` writes them (`NaN`, `Infinity`), which `json.loads` and pandas read back.

`build_metric_logger(cfg.metric_logger)` instantiates the configured `_component_` (this JsonlLogger, or
torchtune's `WandBLogger` / `StdoutLogger` / `DiskLogger`) on rank 0 and a `NullLogger` elsewhere. Secrets never
belong in a config: a `metric_logger` key that looks like one (`api_key`, `token`, ...) is an error; wandb reads
its key from `WANDB_API_KEY` or `wandb login`, and `mode: offline` (or `WANDB_MODE=offline`) needs none.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf
from torchtune.training.metric_logging import MetricLoggerInterface

__all__ = ["JsonlLogger", "NullLogger", "build_metric_logger", "read_jsonl"]

_SECRET_WORDS = ("api_key", "apikey", "token", "secret", "password")


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


def build_metric_logger(cfg: DictConfig | Mapping[str, Any], *, rank: int | None = None) -> MetricLoggerInterface:
    """Instantiate the `metric_logger` config section on rank 0; a `NullLogger` on every other rank.

    `cfg` is the section itself (`{"_component_": "...JsonlLogger", "log_dir": ...}`). Raises ValueError if a
    key looks like a secret (see module docstring).
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
    return tt_config.instantiate(section)
