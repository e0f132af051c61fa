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


@pytest.fixture
def overlapping_tick_labels():
    """fig -> [(axes index, "x" | "y", label, next label)] for neighbouring tick labels whose drawn boxes overlap
    (what makes a plot's axis unreadable); [] when none do."""

    def find(fig) -> list[tuple[int, str, str, str]]:
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        found = []
        for i, ax in enumerate(fig.axes):
            for name, axis in (("x", ax.xaxis), ("y", ax.yaxis)):
                labels = [t for t in axis.get_ticklabels() if t.get_visible() and t.get_text()]
                boxes = [t.get_window_extent(renderer) for t in labels]
                found += [
                    (i, name, labels[j].get_text(), labels[j + 1].get_text())
                    for j in range(len(boxes) - 1)
                    if boxes[j].overlaps(boxes[j + 1])
                ]
        return found

    return find
