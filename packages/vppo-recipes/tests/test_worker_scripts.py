"""Every torchrun worker script in the tests ends its process with `os._exit`, not a normal interpreter exit.

Why: gloo on CPU aborts at interpreter exit in ~1-2 % of 2-rank launches ("terminate called without an active
exception", SIGABRT) after all work is done (ENVIRONMENT.md). CI failed once on a worker that forgot it
(test_update_guard.py, after all its checks had printed), so the rule is checked here rather than remembered.
"""

from __future__ import annotations

import re
from pathlib import Path

PACKAGES = Path(__file__).resolve().parents[2]
# A worker: a script with a __main__ entry point that joins a process group (directly or through the RL recipe).
JOINS_A_GROUP = re.compile(r"init_process_group|RLRecipeDistributed|torch\.distributed\.run")
MAIN = 'if __name__ == "__main__":'


def _worker_scripts() -> list[Path]:
    return sorted(
        path
        for path in PACKAGES.glob("*/tests/*.py")
        if path != Path(__file__).resolve() and MAIN in (text := path.read_text()) and JOINS_A_GROUP.search(text)
    )


def test_the_worker_scripts_are_found():
    names = {p.name for p in _worker_scripts()}
    assert {"rl_step_worker.py", "shard_worker.py", "test_update_guard.py", "dist_sample_worker.py"} <= names, names


def test_every_worker_script_ends_with_os_exit_after_destroying_its_group():
    missing = []
    for path in _worker_scripts():
        text = path.read_text()
        ends = [m.start() for m in re.finditer(r"destroy_process_group\(\)|recipe\.cleanup\(\)", text)]
        exits = [m.start() for m in re.finditer(r"os\._exit\(", text)]
        if not ends or not any(e > ends[-1] for e in exits):
            missing.append(path.relative_to(PACKAGES).as_posix())
    assert not missing, f"add `sys.stdout.flush(); os._exit(0)` after destroy_process_group() in: {missing}"
