"""The pure parts of `nox -s wheelhouse` (noxfile.py; nox itself is not installed in the test venv, so the two are
read out of the file): which platform tags a manylinux target accepts, and what stays out of the wheelhouse. The
offline install itself is `nox -s wheelhouse_install` (minutes: a fresh venv)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

NOXFILE = Path(__file__).resolve().parents[3] / "noxfile.py"


def _noxfile_names(*names: str) -> dict:
    """The named top-level functions and assignments of noxfile.py, executed with `re` only."""
    tree = ast.parse(NOXFILE.read_text())
    keep = [
        node
        for node in tree.body
        if (isinstance(node, ast.FunctionDef) and node.name in names)
        or (isinstance(node, ast.Assign) and any(getattr(t, "id", None) in names for t in node.targets))
    ]
    namespace: dict = {"re": re}
    exec(compile(ast.Module(body=keep, type_ignores=[]), str(NOXFILE), "exec"), namespace)
    return namespace


def test_a_manylinux_target_accepts_every_older_glibc_and_the_legacy_aliases():
    compatible = _noxfile_names("compatible_platforms")["compatible_platforms"]
    tags = compatible("manylinux_2_28_x86_64")
    assert tags[0] == "manylinux_2_28_x86_64"  # pip prefers the first
    expected = {f"manylinux_2_{k}_x86_64" for k in range(5, 29)} | {
        "manylinux2014_x86_64",  # = 2_17, what most wheels on PyPI are tagged
        "manylinux2010_x86_64",
        "manylinux1_x86_64",
    }
    assert set(tags) == expected and len(tags) == len(expected)
    assert "manylinux2014_x86_64" not in compatible("manylinux_2_12_x86_64")  # 2_17 needs a newer glibc
    assert compatible("manylinux_2_17_aarch64")[-1] == "manylinux1_aarch64"
    assert compatible("macosx_14_0_arm64") == ["macosx_14_0_arm64"]  # anything else: as given


def test_the_wheelhouse_leaves_out_torch_and_its_cuda_libraries_only():
    pattern = _noxfile_names("NOT_IN_WHEELHOUSE")["NOT_IN_WHEELHOUSE"]
    out = ["torch", "torchvision", "triton", "nvidia-cublas", "nvidia-nccl-cu13", "cuda-bindings", "cuda-toolkit"]
    kept = ["torchao", "torchtune", "transformers", "sympy", "networkx", "torchdata"]
    assert all(pattern.match(n) for n in out)
    assert not any(pattern.match(n) for n in kept)
