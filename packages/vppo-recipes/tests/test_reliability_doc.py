"""docs/RELIABILITY.md names a test for every bad input and fault it lists: each named test must exist."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
DOC = ROOT / "docs" / "RELIABILITY.md"
TEST_ID = re.compile(r"`(packages/[\w\-/]+\.py::\w+(?:\[[^`]*\])?)`")


def _rows() -> list[str]:
    return [line for line in DOC.read_text().splitlines() if re.match(r"^\| \d+ \|", line)]


def test_the_table_lists_at_least_40_cases_each_with_an_outcome_and_a_test():
    rows = _rows()
    assert len(rows) >= 40
    for row in rows:
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", row.strip().strip("|"))]  # "\|" is a pipe in a cell
        assert len(cells) == 6 and all(cells), row
        assert TEST_ID.search(cells[5]), f"no test id in: {row}"
    numbers = [int(r.split("|")[1]) for r in rows]
    assert numbers == list(range(1, len(rows) + 1)), "rows are numbered 1..n"


@pytest.mark.slow
def test_every_test_the_table_names_is_collected_by_pytest():
    """Collect the named files and compare node ids (a case id `[...]` must be one of the test's cases)."""
    named = sorted({m for row in _rows() for m in TEST_ID.findall(row)})
    files = sorted({n.split("::")[0] for n in named})
    missing_files = [f for f in files if not (ROOT / f).is_file()]
    assert not missing_files, missing_files
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
        cwd=ROOT, capture_output=True, text=True,
    )  # fmt: skip
    collected = {line.strip() for line in done.stdout.splitlines() if "::" in line}
    assert collected, done.stdout[-2000:] + done.stderr[-2000:]
    functions = {n.split("[")[0] for n in collected}
    unknown = [n for n in named if (n not in collected if "[" in n else n not in functions)]
    assert not unknown, f"named in {DOC.name} but not collected: {unknown}"
