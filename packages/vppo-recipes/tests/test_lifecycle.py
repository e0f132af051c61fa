"""An output folder has one owner; a folder nobody can write to is refused before any work; a signal is a request to
stop at a step boundary (vppo_recipes.lifecycle). The end-to-end SIGTERM-then-resume run is in test_rl_runs.py, the
launcher's forwarding in test_cli.py.

vppo_recipes.lifecycle is imported inside the tests that use it, so that the recipe-level tests, which do not, fail
on code before it by what they check rather than all at collection.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"
# Not writable by anyone, root included (sysfs refuses new entries); os.access() calls it writable under root.
UNWRITABLE = Path("/sys")
needs_sysfs = pytest.mark.skipif(not (UNWRITABLE / "kernel").is_dir(), reason="needs Linux's /sys")


@pytest.fixture
def sleeper():
    """A live process of this host that is not this one; killed (and reaped) after the test."""
    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    yield child
    child.kill()
    child.wait()


def _write_lock(folder: Path, **owner) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    owner = {"host": socket.gethostname(), "since": "2026-01-02T03:04:05+00:00", "command": "tune run x", **owner}
    (folder / "vppo.lock").write_text(json.dumps(owner))
    return folder / "vppo.lock"


def test_a_live_owner_is_refused_naming_it_and_a_dead_one_is_taken_over_with_a_warning(tmp_path, sleeper, capsys):
    from vppo_recipes.lifecycle import OutputDirError, lock_output_dir

    lock = _write_lock(tmp_path / "run", pid=sleeper.pid)
    with pytest.raises(OutputDirError) as refused:
        lock_output_dir(tmp_path / "run")
    message = str(refused.value)
    assert f"pid {sleeper.pid} on host {socket.gethostname()} since 2026-01-02T03:04:05+00:00" in message
    assert "command: tune run x" in message and str(lock) in message and "another output_dir=PATH" in message
    assert json.loads(lock.read_text())["pid"] == sleeper.pid  # left as it was

    sleeper.kill()
    sleeper.wait()  # reaped: the pid is gone
    held = lock_output_dir(tmp_path / "run")
    assert f"taking over {lock}: its owner (pid {sleeper.pid}" in capsys.readouterr().err
    assert json.loads(lock.read_text())["pid"] == os.getpid()
    held.release()
    assert not lock.exists()


def test_one_process_cannot_take_a_folder_twice_and_release_frees_only_its_own_lock(tmp_path):
    from vppo_recipes.lifecycle import OutputDirError, lock_output_dir

    with lock_output_dir(tmp_path / "run") as held:
        with pytest.raises(OutputDirError, match=rf"pid {os.getpid()} on host"):
            lock_output_dir(tmp_path / "run")
        assert held.path == tmp_path / "run" / "vppo.lock"
    assert not (tmp_path / "run" / "vppo.lock").exists()
    held = lock_output_dir(tmp_path / "run")  # free again
    other = _write_lock(tmp_path / "run", pid=1)  # someone replaced it (by hand): not ours to delete
    held.release()
    assert other.exists()


@pytest.mark.parametrize(
    ("owner", "expected"),
    [
        ({"host": "another-node", "pid": 1}, "pid 1 on host another-node"),  # its pid cannot be checked from here
        (None, "a lock file that cannot be read"),  # being written, or damaged: never guessed stale
    ],
)
def test_a_lock_whose_owner_cannot_be_checked_is_refused_with_the_file_to_delete(tmp_path, owner, expected):
    from vppo_recipes.lifecycle import OutputDirError, lock_output_dir

    if owner is None:
        (tmp_path / "vppo.lock").write_text('{"host": ')
    else:
        _write_lock(tmp_path, **owner)
    with pytest.raises(OutputDirError, match=expected) as refused:
        lock_output_dir(tmp_path)
    assert f"delete {tmp_path / 'vppo.lock'}" in str(refused.value)


def test_a_reused_pid_is_not_mistaken_for_the_owner(tmp_path):
    """The lock records its process's start time: a live process with the same pid but another start is not it."""
    from vppo_recipes.lifecycle import _process_start, lock_output_dir

    start = _process_start(os.getpid())
    if start is None:
        pytest.skip("no /proc: process start times are unknown here")
    _write_lock(tmp_path, pid=os.getpid(), pid_start=start - 1)
    lock_output_dir(tmp_path).release()


@needs_sysfs
@pytest.mark.parametrize("folder", [UNWRITABLE, UNWRITABLE / "vppo-unwritable" / "run"], ids=["exists", "new"])
def test_an_unwritable_output_dir_is_refused_naming_the_folder_and_the_fix(folder):
    """Probed by creating the lock file (not os.access, which says yes to root), so it holds under root too."""
    from vppo_recipes.lifecycle import OutputDirError, lock_output_dir

    with pytest.raises(OutputDirError) as refused:
        lock_output_dir(folder)
    message = str(refused.value)
    assert message.startswith(f"output_dir {folder} cannot be written: creating ")
    assert "output_dir=PATH" in message and "make this one writable" in message


def test_a_stop_request_is_a_flag_set_by_sigterm_and_sigint_and_agreed_by_all_reduce(monkeypatch):
    import torch.distributed as dist

    from vppo_recipes.lifecycle import StopRequest

    before = signal.getsignal(signal.SIGINT)
    stop = StopRequest()
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        assert stop.agreed() is None
        with stop.handling_signals():
            os.kill(os.getpid(), signal.SIGTERM)  # would end the test process without the handler
            os.kill(os.getpid(), signal.SIGINT)  # the first signal is the one reported
            assert stop.agreed() == signal.SIGTERM
    finally:
        dist.destroy_process_group()
    assert signal.getsignal(signal.SIGINT) is before


@pytest.fixture
def in_process_rank(monkeypatch):
    """The recipes' entry points in this process: a 1-rank group they make themselves (init_distributed sets RANK,
    LOCAL_RANK and WORLD_SIZE, restored here), destroyed after the test."""
    import torch.distributed as dist

    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE"):
        monkeypatch.setenv(key, "0")
        monkeypatch.delenv(key)
    yield
    if dist.is_initialized():
        dist.destroy_process_group()


def _recipe_main(monkeypatch, recipe: str, output_dir: Path):
    """Run `recipe`'s recipe_main on its tiny config into `output_dir`, with a model folder holding only a config.json
    and an empty data folder: they pass the config's path checks (`check_paths`, before the folder is claimed), and a
    recipe that went past its start would fail loading them."""
    from vppo_recipes.rl import rl_distributed
    from vppo_recipes.sft import sft_distributed

    module, config = {"rl": (rl_distributed, "tiny_vppo"), "sft": (sft_distributed, "tiny_sft")}[recipe]
    stand_ins = Path(tempfile.mkdtemp(prefix="vppo-stand-ins-"))
    (stand_ins / "model").mkdir()
    (stand_ins / "model" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (stand_ins / "data").mkdir()
    args = [f"output_dir={output_dir}", f"model.path={stand_ins / 'model'}", f"data.source={stand_ins / 'data'}"]
    args += ["world.nproc_per_node=1"]
    args += [f"validation.source={stand_ins / 'data'}", "validation.every_n_steps=0"] if recipe == "rl" else []
    monkeypatch.setattr(sys, "argv", [recipe, "--config", str(CONFIGS / f"{config}.yaml"), *args])
    module.recipe_main()


@pytest.mark.parametrize("recipe", ["rl", "sft"])
def test_both_recipes_refuse_a_folder_in_use_before_any_work(monkeypatch, in_process_rank, tmp_path, sleeper, recipe):
    _write_lock(tmp_path / "run", pid=sleeper.pid)
    with pytest.raises(
        Exception, match=re.escape(f"output_dir {tmp_path / 'run'} is in use by another run: pid {sleeper.pid} ")
    ):
        _recipe_main(monkeypatch, recipe, tmp_path / "run")
    assert sorted(os.listdir(tmp_path / "run")) == ["vppo.lock"]  # no logs, no checkpoints: nothing was started


@needs_sysfs
@pytest.mark.parametrize("recipe", ["rl", "sft"])
def test_both_recipes_refuse_an_unwritable_output_dir_before_any_work(monkeypatch, in_process_rank, recipe):
    folder = UNWRITABLE / "vppo-unwritable"
    with pytest.raises(Exception, match=rf"output_dir {re.escape(str(folder))} cannot be written: .*output_dir=PATH"):
        _recipe_main(monkeypatch, recipe, folder)


@pytest.mark.parametrize("recipe", ["rl", "sft"])
def test_both_recipes_hold_the_folder_while_they_run_and_free_it_when_they_fail(
    monkeypatch, in_process_rank, tmp_path, recipe
):
    from vppo_recipes.rl.rl_distributed import RLRecipeDistributed
    from vppo_recipes.sft.sft_distributed import SFTRecipeDistributed

    seen = {}

    def setup(self, cfg):
        seen["owner"] = json.loads((tmp_path / "run" / "vppo.lock").read_text())
        raise RuntimeError("setup failed")

    monkeypatch.setattr({"rl": RLRecipeDistributed, "sft": SFTRecipeDistributed}[recipe], "setup", setup)
    with pytest.raises(RuntimeError, match="setup failed"):
        _recipe_main(monkeypatch, recipe, tmp_path / "run")
    assert seen["owner"]["pid"] == os.getpid() and seen["owner"]["host"] == socket.gethostname()
    assert not (tmp_path / "run" / "vppo.lock").exists()  # the next launch finds the folder free


@pytest.mark.slow
def test_sft_stops_after_the_step_sigterm_arrived_in_saves_it_and_frees_the_folder(
    monkeypatch, in_process_rank, tmp_path, capsys
):
    """The SFT recipe in this process, SIGTERM to it during step 2 of 4 (no periodic checkpoints): step 2 is
    finished and saved, the run ends with 143 and the stop line. (The RL recipe's stop is the launch test of
    test_rl_runs.py.)"""
    from vppo_eval.synthetic import build_visual_task
    from vppo_recipes.metric_logging import read_jsonl
    from vppo_recipes.sft import sft_distributed
    from vppo_rollout.tiny import build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "tiny", "qwen2_5_vl", seed=0)
    build_visual_task(tmp_path / "task", n_train=8, n_test=2, seed=0)
    step = sft_distributed.SFTRecipeDistributed.train_step

    def train_step(self, encoded):
        if self.step == 1:
            os.kill(os.getpid(), signal.SIGTERM)
        return step(self, encoded)

    got = []  # without the recipe's handler (code before it), the signal lands here instead of ending pytest
    monkeypatch.setattr(sft_distributed.SFTRecipeDistributed, "train_step", train_step)
    previous = signal.signal(signal.SIGTERM, lambda signum, frame: got.append(signum))
    monkeypatch.setattr(os, "_exit", lambda code: sys.exit(code))  # recipe_main ends the process that way
    run = tmp_path / "run"
    args = [f"output_dir={run}", f"model.path={ckpt}", f"data.source={tmp_path / 'task'}", "world.nproc_per_node=1"]
    args += ["training.max_steps=4", "batch.batch_size=2", "batch.micro_batch_size=2"]
    monkeypatch.setattr(sys, "argv", ["sft", "--config", str(CONFIGS / "tiny_sft.yaml"), *args])
    try:
        with pytest.raises(SystemExit) as ended:
            sft_distributed.recipe_main()
    finally:
        signal.signal(signal.SIGTERM, previous)
    out = capsys.readouterr().out
    assert ended.value.code == 128 + signal.SIGTERM, out[-3000:]
    assert f"stopped by SIGTERM at step 2; latest checkpoint {run / 'checkpoints' / 'step_000002'}; resume" in out
    assert [m["step"] for m in read_jsonl(run / "logs" / "metrics.jsonl")] == [1, 2]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_000002"]
    assert not (run / "vppo.lock").exists() and not got
