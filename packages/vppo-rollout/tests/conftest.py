"""Shared fixtures: the tiny checkpoints are built once per test session (about 0.1 s each)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vppo_rollout.tiny import build_tiny_checkpoint

ARCHS = ["qwen2_5_vl", "qwen3_vl"]


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory) -> dict:
    """{arch: folder} of tiny checkpoints, seed 0."""
    root = tmp_path_factory.mktemp("tiny_ckpts")
    return {arch: build_tiny_checkpoint(root / arch, arch, seed=0) for arch in ARCHS}


@pytest.fixture(scope="session", params=ARCHS)
def arch(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_dir(tiny_dirs, arch):
    return tiny_dirs[arch]


@pytest.fixture(scope="session")
def tiny_model(tiny_dir):
    from vppo_rollout.loading import load_policy

    return load_policy(tiny_dir)


@pytest.fixture(scope="session")
def tiny_processor(tiny_dir):
    from vppo_rollout.loading import load_processor

    return load_processor(tiny_dir)


def make_image(h: int, w: int, seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.fixture(autouse=True)
def _one_thread():
    # The machine's 2 cores are shared; tiny models do not gain from threads anyway.
    prev = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(prev)
