"""`vppo-recipes ls / cp / run / plan` from an arbitrary directory."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest

from vppo_recipes import cli


def test_ls_lists_each_recipe_with_its_shipped_configs(capsys):
    assert cli.main(["ls"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["RECIPE", "CONFIG"]
    rows = [line.split() for line in out[1:]]
    sft = next(i for i, r in enumerate(rows) if r[0] == "sft_distributed")
    assert rows[sft][1] == "tiny_sft"
    assert "tiny_sft" in cli.shipped_configs()


def test_cp_copies_a_shipped_config_and_refuses_to_overwrite(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert cli.main(["cp", "tiny_sft", "my.yaml"]) == 0
    assert (tmp_path / "my.yaml").read_text() == cli.shipped_configs()["tiny_sft"].read_text()
    with pytest.raises(SystemExit, match="exists; pass --force"):
        cli.main(["cp", "tiny_sft", "my.yaml"])
    assert cli.main(["cp", "tiny_sft.yaml", "my.yaml", "--force"]) == 0
    (tmp_path / "sub").mkdir()
    assert cli.main(["cp", "tiny_sft", "sub"]) == 0 and (tmp_path / "sub" / "tiny_sft.yaml").is_file()
    assert cli.main(["cp", "sft_distributed", "mine"]) == 0 and (tmp_path / "mine.py").is_file()
    with pytest.raises(SystemExit, match="not a shipped recipe"):
        cli.main(["cp", "nope", "x.yaml"])


def test_run_command_uses_the_package_module_and_the_users_paths(tmp_path):
    (tmp_path / "cfg.yaml").write_text("seed: 0\n")
    cmd, _ = cli.build_run_command(
        ["sft_distributed", "--nproc_per_node", "2", "--config", "cfg.yaml", "output_dir=./out"], cwd=tmp_path
    )
    assert cmd[1:4] == ["-m", "torchtune._cli.tune", "run"]
    # torchrun flags before the recipe, the recipe as a relative module path of the installed package,
    # the config made absolute against the user's directory, overrides passed through untouched.
    assert cmd[4:] == [
        "--nproc_per_node",
        "2",
        "vppo_recipes/sft/sft_distributed.py",
        "--config",
        str((tmp_path / "cfg.yaml").resolve()),
        "output_dir=./out",
    ]


def test_run_command_accepts_tune_style_flag_order_and_shipped_config_names(tmp_path):
    cmd, _ = cli.build_run_command(["--nproc_per_node", "2", "sft_distributed", "--config", "tiny_sft"], cwd=tmp_path)
    assert cmd[4:7] == ["--nproc_per_node", "2", "vppo_recipes/sft/sft_distributed.py"]
    assert cmd[-1] == str(cli.shipped_configs()["tiny_sft"])


def test_run_command_for_a_users_own_recipe_file_anywhere(tmp_path):
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "my_sft.py").write_text("")
    cmd, env = cli.build_run_command(["./deep/er/my_sft.py", "--config", "tiny_sft"], cwd=tmp_path)
    assert cmd[4] == "my_sft.py"  # tune turns it into the module `my_sft`, found through PYTHONPATH
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str((tmp_path / "deep" / "er").resolve())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["sft_distributed"], "--config CONFIG is required"),
        (["sft_distributed", "--config", "no_such_config"], "neither a file .* nor a shipped config"),
        (["no_such_recipe", "--config", "tiny_sft"], "neither a shipped recipe"),
    ],
)
def test_run_bad_arguments_are_clear_errors(tmp_path, argv, message):
    with pytest.raises(SystemExit, match=message):
        cli.build_run_command(argv, cwd=tmp_path)


def test_plan_is_delegated_to_the_planner_with_its_arguments(monkeypatch):
    seen = {}
    fake = types.ModuleType("vppo_recipes.plan")
    fake.main = lambda argv: seen.setdefault("argv", argv) and 0
    monkeypatch.setitem(sys.modules, "vppo_recipes.plan", fake)
    assert cli.main(["plan", "qwen2_5_vl_7b_vppo", "--gpu-gib", "80"]) == 0
    assert seen["argv"] == ["qwen2_5_vl_7b_vppo", "--gpu-gib", "80"]


def test_run_from_another_directory_reaches_the_recipe_and_its_config_check(tmp_path):
    """From a directory unrelated to the package: `vppo-recipes run` reads the user's config file and refuses a
    misspelled key with the closest valid key, in its own process (exit 2, nothing started); `tune run` with the
    package's recipe path (the README's form) finds the recipe module, whose own check refuses it the same way."""
    (tmp_path / "elsewhere").mkdir()
    assert cli.main(["cp", "tiny_sft", str(tmp_path / "elsewhere" / "c.yaml")]) == 0
    launcher = [sys.executable, "-m", "vppo_recipes.cli", "run", "sft_distributed", "--config", "c.yaml"]
    tune = [sys.executable, "-m", "torchtune._cli.tune", "run", "vppo_recipes/sft/sft_distributed.py"]
    tune += ["--config", "c.yaml"]
    procs = [
        subprocess.run(
            [*cmd, "training.max_step=3"], cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=300
        )
        for cmd in (launcher, tune)
    ]
    for proc in procs:
        assert proc.returncode != 0, proc.stderr[-2000:]
        assert "unknown key 'training.max_step' (did you mean 'training.max_steps'?)" in proc.stderr
    assert procs[0].returncode == 2 and "Running: tune run" not in procs[0].stdout
    assert procs[0].stderr.rstrip().endswith("nothing was started")
    assert not Path(tmp_path / "elsewhere" / "runs").exists()


def _fake_model_and_data(root: Path) -> None:
    """What `check_paths` looks at of the tiny configs' ./runs/tiny_ckpt and ./runs/visual_task: a folder with a
    Qwen2.5-VL config.json, and a data folder."""
    (root / "runs" / "tiny_ckpt").mkdir(parents=True)
    (root / "runs" / "tiny_ckpt" / "config.json").write_text('{"model_type": "qwen2_5_vl"}')
    (root / "runs" / "visual_task").mkdir()


@pytest.fixture
def no_spawn(monkeypatch):
    """`vppo-recipes run` in this process, with anything that would start `tune run` made to fail the test."""

    def spawn(*args, **kwargs):
        raise AssertionError(f"vppo-recipes run started a process: {args}")

    monkeypatch.setattr(cli, "run_forwarding_signals", spawn, raising=False)  # absent before the launcher waited
    monkeypatch.setattr(subprocess, "Popen", spawn)


@pytest.mark.parametrize(
    ("args", "names"),
    [
        (["--config", "tiny_sft", "training.max_step=3"], ["training.max_step", "did you mean 'training.max_steps'"]),
        (["--config", "tiny_sft", "model.path=./no_model"], ["model.path=", "no_model' is not an existing folder"]),
        (["--config", "tiny_sft", "model.path=./runs"], ["model.path=", "has no config.json"]),
        (["--config", "tiny_sft", "data.source=./runs/missing.parquet"], ["data.source=", "missing.parquet' does not"]),
        (["--config", "tiny_sft", "world.nproc_per_node=4"], ["world.nproc_per_node=2", "WORLD_SIZE=2"]),
        (["--config", "tiny_sft", "model.arch=qwen3_vl"], ["model.arch='qwen3_vl'", "set model.arch=qwen2_5_vl"]),
        (["--config", "tiny_sft", "max_steps"], ["must be in the form of key=value, got max_steps"]),
        (["--config", "tiny_sft", "training.max_steps=[1"], ["cannot read the config", "with its overrides"]),
        (["--config", "tiny_sft", "training.max_steps=${oops"], ["cannot read the config", "with its overrides"]),
        (["--config", "./broken.yaml"], ["cannot read the config", "broken.yaml"]),
    ],
    ids=[
        "misspelled-key", "model-path-missing", "model-path-no-config", "data-missing", "world-size", "arch", "form",
        "override-yaml", "override-interpolation", "yaml-file",
    ],
)  # fmt: skip
def test_run_refuses_a_bad_config_in_seconds_with_one_message_and_starts_nothing(
    tmp_path, monkeypatch, capsys, no_spawn, args, names
):
    """Each used to surface only after torchrun had started the ranks (29-57 s), in 60-190 lines ending in
    ChildFailedError; a wrong model.path said `load_processor(path): ... is not an existing folder`."""
    monkeypatch.chdir(tmp_path)
    _fake_model_and_data(tmp_path)
    (tmp_path / "broken.yaml").write_text("output_dir: {unclosed\n")  # a YAML file that does not parse
    start = time.monotonic()
    code = cli.main(["run", "sft_distributed", "--nproc_per_node", "2", *args])
    elapsed = time.monotonic() - start
    out, err = capsys.readouterr()
    assert code == 2, err
    assert elapsed < 10, f"took {elapsed:.1f} s"
    assert err.startswith("vppo-recipes run: ") and err.rstrip().endswith("nothing was started"), err
    assert "Traceback" not in err and "Running:" not in out
    for name in names:
        assert name in err, err
    assert not (tmp_path / "runs" / "tiny_sft").exists()


def test_run_checks_the_world_size_torchrun_will_launch(tmp_path, monkeypatch, capsys, no_spawn):
    """The world size comes from the torchrun flags (torchrun's own parser): none is one process, `--nnodes 2
    --nproc_per_node 1` two; an elastic MIN:MAX range is left to the ranks."""
    monkeypatch.chdir(tmp_path)
    _fake_model_and_data(tmp_path)
    assert cli.launched_world_size([]) == 1
    assert cli.launched_world_size(["--nnodes", "2", "--nproc-per-node=3"]) == 6
    assert cli.launched_world_size(["--nnodes", "1:2", "--nproc_per_node", "2"]) is None
    assert cli.main(["run", "sft_distributed", "--config", "tiny_sft"]) == 2
    assert "WORLD_SIZE=1; set world.nproc_per_node=1" in capsys.readouterr().err
    two_nodes = ["--nnodes", "2", "--nproc_per_node", "1", "--node_rank", "0", "--rdzv_endpoint", "127.0.0.1:29500"]
    with pytest.raises(AssertionError, match="started a process"):  # a valid launch gets as far as starting tune
        cli.main(
            ["run", "sft_distributed", *two_nodes, "--config", "tiny_sft", "world.nnodes=2", "world.nproc_per_node=1"]
        )


# A stand-in for `tune run`: reports its pid, turns SIGTERM / SIGINT into a flag, then "finishes its step" (0.5 s),
# writes which signal it got and exits 1, as tune does after torchrun's ranks stopped.
_FAKE_TUNE = """
import os, signal, sys, time
from pathlib import Path
null = os.open(os.devnull, os.O_WRONLY)
os.dup2(null, 1), os.dup2(null, 2)  # the launcher's output pipe then ends with the launcher, whatever happens to this
got = []
for s in (signal.SIGTERM, signal.SIGINT):
    signal.signal(s, lambda signum, frame: got.append(signum))
Path(sys.argv[1], "ready").write_text(str(os.getpid()))
while not got:
    time.sleep(0.01)
time.sleep(0.5)
Path(sys.argv[1], "saved").write_text(str(got[0]))
sys.exit(1)
"""
_LAUNCHER = """
import os, sys
from vppo_recipes import cli
cli.build_run_command = lambda argv, cwd=None: ([sys.executable, sys.argv[1], sys.argv[2]], dict(os.environ))
cli.check_run_config = lambda *args: None  # no tiny model and data here: only the signal handling is under test
sys.exit(cli.main(["run", "rl_distributed", "--config", "tiny_vppo"]))
"""


@pytest.mark.parametrize(
    ("sig", "passed_on"),
    [(signal.SIGTERM, signal.SIGTERM), (signal.SIGINT, signal.SIGINT), (signal.SIGHUP, signal.SIGTERM)],
    ids=["SIGTERM", "SIGINT", "SIGHUP"],
)
def test_run_passes_a_signal_on_to_the_run_and_waits_for_it_to_stop(tmp_path, sig, passed_on):
    """`kill` (or Ctrl-C, or a closed terminal) to the launcher alone: the run gets the signal (SIGHUP as SIGTERM,
    which the ranks stop and save on) and finishes before the launcher exits with 128 + the signal number. The
    launcher used to exit at once, leaving the run training with nobody to stop it; since the run has a session of
    its own, a hang-up must be passed on too."""
    (tmp_path / "tune.py").write_text(_FAKE_TUNE)
    (tmp_path / "launcher.py").write_text(_LAUNCHER)
    launcher = subprocess.Popen(
        [sys.executable, str(tmp_path / "launcher.py"), str(tmp_path / "tune.py"), str(tmp_path)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    child = None
    try:
        deadline = time.monotonic() + 120
        while not (tmp_path / "ready").is_file() or not (tmp_path / "ready").read_text():
            assert launcher.poll() is None and time.monotonic() < deadline, launcher.stdout.read()
            time.sleep(0.02)
        child = int((tmp_path / "ready").read_text())
        launcher.send_signal(sig)  # to the launcher's pid only, as `kill PID` or `docker stop` do
        out, _ = launcher.communicate(timeout=60)
        assert (tmp_path / "saved").is_file(), f"the run never got {sig.name}, or the launcher did not wait:\n{out}"
        assert (tmp_path / "saved").read_text() == str(int(passed_on))
        assert launcher.returncode == 128 + sig, out
        assert f"vppo-recipes: stopped by {sig.name} (the run exited with 1); resume with the same command" in out
        with pytest.raises(ProcessLookupError):
            os.kill(child, 0)  # ended and reaped by the launcher
        child = None
    finally:
        launcher.kill()
        launcher.wait()
        if child is not None:
            os.kill(child, signal.SIGKILL)


def test_init_tiny_without_warm_start_writes_what_tiny_sft_reads(tmp_path, monkeypatch, capsys):
    """`vppo-recipes init-tiny runs --no-warm-start` from a fresh directory: tiny_sft's ./runs/tiny_ckpt and
    ./runs/visual_task exist and its launch passes the launcher's checks. No documented command wrote them before."""
    from vppo_recipes.data import load_source

    monkeypatch.chdir(tmp_path)
    assert cli.main(["init-tiny", "runs", "--no-warm-start"]) == 0
    assert (tmp_path / "runs" / "tiny_ckpt" / "config.json").is_file()
    assert (tmp_path / "runs" / "visual_task").is_dir() and not (tmp_path / "runs" / "tiny_sft").exists()
    claims = tmp_path / "runs" / "visual_task_claims"  # tiny_vapo's: the same rows with VAPO's claim columns
    assert {"claim_20", "label_20"} <= set(load_source(claims, "train").column_names)
    assert "the tiny RL configs (tiny_vppo, tiny_dapo, ...) need it" in capsys.readouterr().out
    cli.check_run_config(
        "sft_distributed", ["--nproc_per_node", "2"], ["--config", str(cli.resolve_config("tiny_sft"))]
    )


@pytest.mark.slow
def test_init_tiny_writes_the_warm_start_every_tiny_config_reads(tmp_path, monkeypatch):
    """With the warm start (the demo's SFT stage, 40 steps as tiny_sft): every shipped tiny_* config's paths exist."""
    monkeypatch.chdir(tmp_path)
    assert cli.main(["init-tiny", "runs"]) == 0
    assert (tmp_path / "runs" / "tiny_sft" / "checkpoints" / "step_000040" / "config.json").is_file()
    for name, path in cli.shipped_configs().items():
        if name.startswith("tiny_"):
            recipe = cli.recipe_for_config(path)
            cli.check_run_config(recipe, ["--nproc_per_node", "2"], ["--config", str(path)])
    # the warm start is what `vppo-recipes run sft_distributed --config tiny_sft` makes: a later tiny_sft launch
    # (the README's `training.max_steps=60`) resumes it instead of being refused as a changed config
    from vppo_recipes.checkpointing import check_resume_config
    from vppo_recipes.config_schema import validate_config

    args = ["--config", str(cli.shipped_configs()["tiny_sft"]), "training.max_steps=60"]
    cfg = validate_config(cli.load_run_config(args), "sft")
    assert check_resume_config(tmp_path / "runs" / "tiny_sft" / "checkpoints" / "step_000040", cfg) == []


def test_init_tiny_refuses_a_live_run_in_its_warm_start_folder_and_deletes_nothing(tmp_path, monkeypatch, capsys):
    """`init-tiny runs` again while a tiny_sft run trains in runs/tiny_sft: refused naming that run, exit 2, its
    checkpoints kept. The warm start used to delete the folder (lock, checkpoints, metrics) under the live run."""
    from vppo_recipes.lifecycle import lock_output_dir

    monkeypatch.chdir(tmp_path)
    live = tmp_path / "runs" / "tiny_sft"
    (live / "checkpoints" / "step_000100").mkdir(parents=True)
    lock = lock_output_dir(live)  # held by this (live) process, as a running tiny_sft launch holds it
    try:
        assert cli.main(["init-tiny", "runs"]) == 2
    finally:
        lock.release()
    assert (live / "checkpoints" / "step_000100").is_dir()
    err = capsys.readouterr().err
    assert "is in use by another run" in err and str(live) in err, err


def test_the_final_and_stop_lines_name_the_step_this_run_saved_not_a_later_one_left_in_the_folder(tmp_path):
    """A folder holding step 100 of an earlier run (`training.resume=never`): a run that ends, or is stopped, at step
    40 names its own step_000040, not the folder's latest."""
    import signal as signals

    from vppo_recipes.checkpointing import final_checkpoint_line
    from vppo_recipes.lifecycle import stopped_message

    for step in (40, 100):
        (tmp_path / "checkpoints" / f"step_{step:06d}").mkdir(parents=True)
    own = (tmp_path / "checkpoints" / "step_000040").resolve()
    assert final_checkpoint_line("RL", 40, tmp_path) == f"RL done at step 40; final checkpoint: {own}"
    assert f"latest checkpoint {own};" in stopped_message(signals.SIGTERM, 40, tmp_path)
