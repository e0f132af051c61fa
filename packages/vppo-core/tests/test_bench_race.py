"""The log-prob race harness (benchmarks/bench_race.py) runs end to end and checks every row against float64.

Tiny sizes, vppo-core's rows only (the peers are installed by `nox -s bench`, not in the test venvs): this keeps the
harness from rotting between benchmark runs; the figures themselves come from `nox -s bench -- bench_race`.
"""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_race.py"


@pytest.mark.slow
def test_race_harness_prints_ratios_errors_and_verdicts_for_vppo_rows():
    cmd = [sys.executable, str(SCRIPT), "--quick", "--sizes", "2x32", "--dtypes", "float32"]
    cmd += ["--impls", "vppo hidden", "vppo keep", "vppo logits", "liger"]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True, timeout=600).stdout
    rows = {m.group(1): m.group(2) for m in re.finditer(r"^ {4}(naive|vppo \w+)\s+(.*)$", out, re.M)}
    assert set(rows) == {"naive", "vppo hidden", "vppo keep", "vppo logits"}, out
    # Every printed error (lp, Σ lp, grad_hidden, grad_W against float64) is small in float32.
    errors = [float(x) for line in rows.values() for x in re.findall(r"\d\.\d+e[-+]\d+", line)]
    assert errors and max(errors) < 1e-4, out
    assert "forward, no grad" in out and "forward + backward of Σ lp" in out, out
    assert re.search(r"^(PASS|MISS)  N=64 float32 forward: vppo hidden peak", out, re.M), out
    if importlib.util.find_spec("liger_kernel") is None:  # a missing peer is named with the reason
        assert "not run: liger: liger_kernel is not installed" in out, out
