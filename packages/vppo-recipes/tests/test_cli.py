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
    """End to end through tune run, from a directory unrelated to the package: the recipe module is found, the
    user's config file is read, and a misspelled key stops it with the closest valid key, before any compute."""
    (tmp_path / "elsewhere").mkdir()
    assert cli.main(["cp", "tiny_sft", str(tmp_path / "elsewhere" / "c.yaml")]) == 0
    cmd = [
        sys.executable,
        "-m",
        "vppo_recipes.cli",
        "run",
        "sft_distributed",
        "--config",
        "c.yaml",
        "training.max_step=3",
    ]
    proc = subprocess.run(cmd, cwd=tmp_path / "elsewhere", capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "unknown key 'training.max_step' (did you mean 'training.max_steps'?)" in proc.stderr
    assert (
        "Running: tune run vppo_recipes/sft/sft_distributed.py --config "
        + str((tmp_path / "elsewhere" / "c.yaml").resolve())
        in proc.stdout
    )
    assert not Path(tmp_path / "elsewhere" / "runs").exists()


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
sys.exit(cli.main(["run", "rl_distributed", "--config", "tiny_vppo"]))
"""


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_run_passes_a_signal_on_to_the_run_and_waits_for_it_to_stop(tmp_path, sig):
    """`kill` (or Ctrl-C) to the launcher alone: the run gets the signal and finishes before the launcher exits with
    128 + the signal number. The launcher used to exit at once, leaving the run training with nobody to stop it."""
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
        assert (tmp_path / "saved").read_text() == str(int(sig))
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
