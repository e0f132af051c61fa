"""Repository-wide pytest setup.

Tests marked ``vllm`` need the real vLLM engine, which lives in a venv of its own (``nox -s tests_vllm``); where
vLLM is not importable they are skipped with that reason.

Hypothesis draws fresh examples on every run by default, which makes a red CI run unreproducible. Under nox (which
sets ``HYPOTHESIS_PROFILE=ci``) the examples are derived from each test's name instead, so CI sees the same cases
every time; a plain ``pytest`` run keeps exploring new ones.
"""

import importlib.util
import os

import pytest
from hypothesis import settings

settings.register_profile("ci", derandomize=True, print_blob=True)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("vllm") is not None:
        return
    skip = pytest.mark.skip(reason="needs the real vLLM engine: run `nox -s tests_vllm` (its CPU build, own venv)")
    for item in items:
        if "vllm" in item.keywords:
            item.add_marker(skip)
