"""Metric loggers: the JSONL logger's lines, rank-0 only writing, rewind on resume, and the config-built loggers."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from torchtune.training.metric_logging import MetricLoggerInterface, StdoutLogger, WandBLogger

from vppo_recipes.metric_logging import JsonlLogger, NullLogger, build_metric_logger, read_jsonl


def test_jsonl_logger_writes_one_line_per_log_dict_with_python_numbers(tmp_path):
    logger = JsonlLogger(tmp_path / "logs")
    assert MetricLoggerInterface in JsonlLogger.__mro__
    logger.log_dict({"loss": torch.tensor(0.5), "acc": np.float32(0.25), "n": 3}, step=1)
    logger.log("lr", 1e-3, step=2)
    logger.log_dict({"loss": float("nan")}, step=3)
    logger.close()
    records = read_jsonl(tmp_path / "logs" / "metrics.jsonl")
    assert records[:2] == [{"step": 1, "loss": 0.5, "acc": 0.25, "n": 3}, {"step": 2, "lr": 1e-3}]
    assert math.isnan(records[2]["loss"])


def test_jsonl_lines_are_on_disk_before_close(tmp_path):
    logger = JsonlLogger(tmp_path)
    logger.log_dict({"x": 1}, step=0)
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 0, "x": 1}]  # a crash now keeps the line
    logger.close()


def test_jsonl_logger_writes_nothing_on_ranks_other_than_zero(tmp_path, monkeypatch):
    monkeypatch.setenv("RANK", "1")
    logger = JsonlLogger(tmp_path / "logs")
    logger.log_dict({"x": 1}, step=0)
    logger.close()
    assert not (tmp_path / "logs").exists()


def test_rewind_drops_lines_after_the_resumed_step(tmp_path):
    logger = JsonlLogger(tmp_path)
    for step in range(1, 6):
        logger.log_dict({"loss": step}, step=step)
    logger.rewind(3)  # resumed from the checkpoint of step 3: steps 4 and 5 will be logged again
    logger.log_dict({"loss": 40}, step=4)
    logger.close()
    assert [(r["step"], r["loss"]) for r in read_jsonl(tmp_path / "metrics.jsonl")] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_read_jsonl_ignores_a_truncated_last_line(tmp_path):
    (tmp_path / "m.jsonl").write_text('{"step": 1, "x": 2}\n{"step": 2, "x"')
    assert read_jsonl(tmp_path / "m.jsonl") == [{"step": 1, "x": 2}]


def test_log_config_saves_the_resolved_config(tmp_path):
    logger = JsonlLogger(tmp_path)
    logger.log_config(OmegaConf.create({"output_dir": "/r", "log_dir": "${output_dir}/logs"}))
    assert OmegaConf.load(tmp_path / "config.yaml").log_dir == "/r/logs"


def test_build_metric_logger_instantiates_the_component_on_rank_zero_only(tmp_path):
    section = {"_component_": "vppo_recipes.metric_logging.JsonlLogger", "log_dir": str(tmp_path)}
    assert isinstance(build_metric_logger(section, rank=0), JsonlLogger)
    assert isinstance(build_metric_logger(section, rank=1), NullLogger)
    stdout = build_metric_logger(
        {"_component_": "torchtune.training.metric_logging.StdoutLogger"}, rank=0, log_dir=tmp_path
    )
    assert [type(x) for x in stdout.loggers] == [JsonlLogger, StdoutLogger]  # metrics.jsonl always


def test_build_metric_logger_refuses_secrets_in_the_config():
    with pytest.raises(ValueError, match=r"metric_logger\.api_key looks like a secret"):
        build_metric_logger({"_component_": "torchtune.training.metric_logging.WandBLogger", "api_key": "x"}, rank=0)


def test_wandb_logger_runs_offline_without_a_key(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    logger = build_metric_logger(
        {
            "_component_": "torchtune.training.metric_logging.WandBLogger",
            "project": "vppo-test",
            "log_dir": str(tmp_path),
            "mode": "offline",
        },
        rank=0,
    )
    assert isinstance(logger.loggers[1], WandBLogger)
    logger.log_dict({"loss": 1.0}, step=1)
    logger.close()
    assert list(tmp_path.glob("wandb/offline-run-*"))


# --------------------------------------------------------------------------------------------------------------------
# metrics.jsonl always, the configured logger in addition (issue 24)
# --------------------------------------------------------------------------------------------------------------------


def _offline_wandb(monkeypatch, log_dir) -> dict:
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("WANDB_SILENT", "true")
    return {
        "_component_": "torchtune.training.metric_logging.WandBLogger",
        "project": "vppo-test",
        "log_dir": str(log_dir),
        "mode": "offline",
    }


def test_with_wandb_on_metrics_jsonl_is_still_written_and_rewound(tmp_path, monkeypatch):
    from vppo_recipes.metric_logging import CompositeLogger

    logger = build_metric_logger(_offline_wandb(monkeypatch, tmp_path), rank=0)
    assert isinstance(logger, CompositeLogger)
    assert [type(x) for x in logger.loggers] == [JsonlLogger, WandBLogger]
    for step in (1, 2, 3):
        logger.log_dict({"loss": float(step)}, step=step)
    logger.rewind(2)  # a resume from checkpoint 2
    logger.log_config(OmegaConf.create({"output_dir": str(tmp_path)}))
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]
    assert (tmp_path / "config.yaml").is_file()


def test_a_logger_without_log_dir_writes_metrics_jsonl_to_the_default_dir(tmp_path):
    section = {"_component_": "torchtune.training.metric_logging.StdoutLogger"}
    logger = build_metric_logger(section, rank=0, log_dir=tmp_path / "logs")
    logger.log_dict({"x": 1}, step=1)
    logger.close()
    assert read_jsonl(tmp_path / "logs" / "metrics.jsonl") == [{"step": 1, "x": 1}]
    with pytest.raises(ValueError, match=r"no log_dir for metrics\.jsonl.*set metric_logger\.log_dir"):
        build_metric_logger(section, rank=0)
    assert isinstance(build_metric_logger(section, rank=1), NullLogger)  # other ranks still log nothing


def test_tensorboard_without_its_package_is_a_config_error_naming_the_extra(monkeypatch):
    import importlib.util

    from vppo_recipes.config_schema import ConfigError, validate_config

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    section = {"_component_": "torchtune.training.metric_logging.TensorBoardLogger", "log_dir": "/tmp/x"}
    fix = r"needs the `tensorboard` package \(not installed\): install vppo-recipes with its `tensorboard` extra"
    with pytest.raises(ValueError, match=fix):
        build_metric_logger(section, rank=0)
    raw = OmegaConf.load(Path(__file__).parents[1] / "src" / "vppo_recipes" / "configs" / "tiny_sft.yaml")
    raw.metric_logger = section
    with pytest.raises(ConfigError, match=r"metric_logger\._component_ is .*TensorBoardLogger, which " + fix[:20]):
        validate_config(raw, "sft")


def test_tensorboard_is_an_optional_extra_of_vppo_recipes():
    import tomllib

    pyproject = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert any(d.startswith("tensorboard") for d in pyproject["project"]["optional-dependencies"]["tensorboard"])


def test_tensorboard_logs_next_to_metrics_jsonl(tmp_path):
    pytest.importorskip("tensorboard", reason="the `tensorboard` extra is not installed")
    section = {"_component_": "torchtune.training.metric_logging.TensorBoardLogger", "log_dir": str(tmp_path)}
    logger = build_metric_logger(section, rank=0)
    logger.log_dict({"loss": 0.5}, step=1)
    logger.close()
    assert read_jsonl(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 0.5}]
    assert list(tmp_path.glob("run_0_*/events.out.tfevents.*"))


def test_an_rl_run_with_wandb_writes_metrics_jsonl_and_prints_its_final_checkpoint(tmp_path, monkeypatch, capsys):
    """The issue's run: wandb on, and metrics.jsonl written all the same; the run ends with the line naming its
    last checkpoint (absolute), as SFT's does."""
    import re
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from test_rl_distributed import _train_in_process

    wandb = _offline_wandb(monkeypatch, tmp_path / "run" / "logs")
    overrides = {f"metric_logger.{k}": v for k, v in wandb.items() if k != "log_dir"}
    metrics = _train_in_process(tmp_path, "tiny_dapo", {"training.max_steps": 2, **overrides})
    assert [m["step"] for m in metrics] == [1, 2]
    lines = re.findall(r"^RL done at step (\d+); final checkpoint: (.+)$", capsys.readouterr().out, re.M)
    assert lines == [("2", str((tmp_path / "run" / "checkpoints" / "step_000002").resolve()))]
