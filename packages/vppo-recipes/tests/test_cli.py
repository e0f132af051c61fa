"""`vppo-recipes ls / cp / run / plan` from an arbitrary directory."""

from __future__ import annotations

import os
import subprocess
import sys
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
