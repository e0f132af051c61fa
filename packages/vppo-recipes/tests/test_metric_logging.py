"""Metric loggers: the JSONL logger's lines, rank-0 only writing, rewind on resume, and the config-built loggers."""

from __future__ import annotations

import math

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
    assert isinstance(
        build_metric_logger({"_component_": "torchtune.training.metric_logging.StdoutLogger"}, rank=0), StdoutLogger
    )


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
    assert isinstance(logger, WandBLogger)
    logger.log_dict({"loss": 1.0}, step=1)
    logger.close()
    assert list(tmp_path.glob("wandb/offline-run-*"))
