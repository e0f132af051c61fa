"""The method-cost benchmark (benchmarks/bench_methods.py): its table from fabricated per-step metrics and pass
counts, its method list (every built-in method, DAPO first and last) and its config for each method.

The figures themselves come from `nox -s bench -- methods` (a minute per few methods on 2 cores); this keeps the
arithmetic of the table and the list of what it runs from rotting between runs.
"""

from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

from vppo_recipes.methods import BUILTIN_METHODS

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_methods.py"
_spec = importlib.util.spec_from_file_location("bench_methods", SCRIPT)
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _run(method: str, steps: list[float], *, no_grad=0.1, alt=0.0, update=1.0, peak=1.0, passes=1, head=0, **extra):
    """A run as `bench.run` returns it: per measured step its metrics and its pass counts (2 micro-batches)."""
    metrics = [
        {
            "time/step_s": s, "time/old_logprob_s": no_grad, "time/alt_logprob_s": alt, "time/update_s": update,
            "memory/peak_gib_rank0": peak, "memory/peak_gib_rank1": peak / 2,
        }
        for s in steps
    ]  # fmt: skip
    counts = [{"no_grad": 2 * passes, "grad": 2, "head": 2 * head, **extra} for _ in steps]
    return {"method": method, "metrics": metrics, "counts": counts}


def test_every_builtin_method_is_run_between_a_first_and_a_last_dapo_run():
    names = bench.method_names()
    assert names == list(BUILTIN_METHODS)
    order = bench.run_order(names)
    assert order[0] == order[-1] == "dapo"
    assert sorted(order[1:-1]) == sorted(n for n in BUILTIN_METHODS if n != "dapo")
    twice = bench.run_order(names, repeats=2)
    assert twice.count("dapo") == 4 and twice[len(order) :][1:-1] == order[1:-1][::-1]


def test_a_method_without_a_tiny_config_runs_tiny_dapo_switched_to_it():
    assert bench.method_config("vppo") == (bench.CONFIGS / "tiny_vppo.yaml", [])
    assert bench.method_config("no_such_method") == (
        bench.CONFIGS / "tiny_dapo.yaml",
        ["algorithm.name=no_such_method"],
    )


@pytest.mark.parametrize("name", list(BUILTIN_METHODS))
def test_every_method_config_takes_the_shared_sizes_and_declares_its_passes(name):
    d = bench.declared(name, nproc=1)
    assert isinstance(d["views"], int) and d["views"] >= 0
    assert set(d) == {
        "views",
        "clean_entropy",
        "clean_prior",
        "clean_full_hidden",
        "update_entropy",
        "exact_dependency",
    }


def test_the_table_divides_medians_by_the_median_over_every_dapo_step():
    runs = [
        _run("dapo", [1.0, 2.0, 9.0], no_grad=0.1, update=1.0, peak=2.0),  # a neighbour's burst in its last step
        _run("vppo", [3.0, 3.0], no_grad=0.1, alt=0.1, update=1.5, peak=2.2, passes=2, head=1),
        _run("pepo", [2.5], no_grad=0.3, peak=3.0, no_grad_entropy=2, no_grad_prior=2),
        {"method": "papo", "error": "exit 1: boom"},
        _run("dapo", [2.0, 4.0, 2.0], no_grad=0.1, update=1.0, peak=2.0),
    ]
    declared = {
        "dapo": {"views": 0},
        "vppo": {"views": 1},
        "pepo": {"views": 0, "clean_entropy": True, "clean_prior": True},
        "papo": {"views": 1},
    }
    rows = bench.table_rows(runs, declared, {"vppo": 0.25, "dapo": None})
    assert [r["label"] for r in rows] == ["dapo (first run)", "vppo", "pepo", "papo", "dapo (last run)"]
    by = {r["label"]: r for r in rows}
    # DAPO's baseline: the median of its six steps (1, 2, 2, 2, 4, 9) = 2
    assert by["dapo (first run)"]["step"] == pytest.approx(1.0)  # median(1, 2, 9) / 2
    assert by["dapo (last run)"]["step"] == pytest.approx(1.0)
    assert by["vppo"]["step"] == pytest.approx(1.5)
    assert by["pepo"]["step"] == pytest.approx(1.25)
    assert by["vppo"]["no_grad"] == pytest.approx(2.0) and by["pepo"]["no_grad"] == pytest.approx(3.0)
    assert by["vppo"]["no_grad_own"] == pytest.approx(2.0) and by["dapo (last run)"]["no_grad_own"] == 1.0
    assert by["vppo"]["update"] == pytest.approx(1.5)
    assert by["vppo"]["peak"] == pytest.approx(1.1) and by["pepo"]["peak"] == pytest.approx(1.5)  # largest rank
    # counted passes per micro-batch (per gradient pass), beyond DAPO's clean one
    assert by["vppo"]["extra_fwd"] == 1 and by["pepo"]["extra_fwd"] == 0 and by["dapo (last run)"]["extra_fwd"] == 0
    assert by["vppo"]["head"] == 1 and by["pepo"]["head"] == 0
    assert by["pepo"]["also"] == "clean: entropy, clean: prior over all layers" and by["vppo"]["also"] == "-"
    assert by["papo"]["error"] == "exit 1: boom"
    assert by["vppo"]["planned_gib"] == 0.25 and by["dapo (first run)"]["planned_gib"] is None

    table = bench.markdown_table(rows).splitlines()
    assert table[0] == bench.HEADER and len(table) == 2 + len(rows)
    assert all(line.count("|") == table[0].count("|") for line in table)
    cells = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:-1]] for line in table[2:]}
    assert cells["`vppo`"] == ["1", "1", "-", "1", "1.50", "2.00", "2.00", "1.50", "1.10", "0.25"]
    assert cells["`pepo`"][6] == "1.00"  # no altered pass: its no-grad phase is its (heavier) clean pass
    assert cells["`dapo (first run)`"][-1] == "n/a" and cells["`dapo (last run)`"][4] == "1.00"
    assert cells["`papo`"][1].startswith("failed: exit 1: boom")


def test_the_table_refuses_to_divide_without_a_dapo_run_and_counts_nothing_as_nan():
    with pytest.raises(SystemExit, match="no dapo run"):
        bench.table_rows([{"method": "dapo", "error": "x"}, _run("vppo", [1.0])], {}, {})
    assert math.isnan(bench._per_mb([{"counts": []}], "no_grad"))
    assert bench._fmt(None) == bench._fmt(math.nan) == "n/a"


def test_the_readme_section_is_replaced_between_its_markers():
    text = f"intro\n{bench.README_BEGIN}\nold table\n{bench.README_END}\nafter\n"
    assert bench.update_readme(text, "new") == f"intro\n{bench.README_BEGIN}\nnew\n{bench.README_END}\nafter\n"
    with pytest.raises(SystemExit, match="markers"):
        bench.update_readme("no markers", "new")
    assert bench.README_BEGIN in bench.README.read_text() and bench.README_END in bench.README.read_text()


def test_a_failed_run_is_named_by_its_error_line():
    stderr = (
        "cfpo:  33%|###  | 1/3 [00:03<00:07]\n[rank0]: Traceback (most recent call last):\n"
        '[rank0]:   File "x.py", line 1\n[rank0]: ValueError: input_ids row 7: 2 vision_start token(s)\n'
        "cfpo:  33%|###  | 1/3 [00:06<00:12]\n"
    )
    assert bench.error_line(stderr) == "ValueError: input_ids row 7: 2 vision_start token(s)"
    assert bench.error_line("only a progress bar\n") == "only a progress bar"
    assert bench.error_line("") == "(no stderr)"
