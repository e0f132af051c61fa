"""Every shell command and Python snippet of the READMEs (README.md, packages/*/README.md), as a reader meets them.

Python snippets run, each README's in order in one namespace (a reader pasting them into one session), in a fresh
folder holding what `vppo-recipes init-tiny runs --no-warm-start` writes (built once per session). Shell commands
are taken from the fenced bash / untagged blocks in order and from inline `nox -s ...` and `python -m ... --help`
spans. Cheap ones run in process (`vppo-recipes ls / cp / init-tiny --no-warm-start`, `--help`s); the others are
only checked: their flags exist in the command's own parser (torchrun's for `run`, vppo-eval's, argparse of
`init-tiny`), every nox session is in noxfile.py, every recipe, config name, config key (`validate_config` with the
command's overrides), world size and README-named file exists. Each test prints which commands ran and which were
only checked. Values the reader supplies are not looked up: a `$VAR` (0 for torchrun's parser), vppo-eval's
`--model PATH` / `--data-dir AUTHORS_DATA` / `--out DIR`, the downloaded model of a full-size config.
"""

from __future__ import annotations

import ast
import contextlib
import io
import re
import shlex
import shutil
import sys
from pathlib import Path

import pytest

from vppo_recipes import cli

ROOT = Path(__file__).resolve().parents[3]
# The examples' READMEs too: a reader runs them from the checkout's root, as the others
READMES = [ROOT / "README.md", *sorted(ROOT.glob("packages/*/README.md")), *sorted(ROOT.glob("examples/*/README.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
# The commands the READMEs may name; anything else in a bash block is an error (a command nobody checks).
COMMANDS = ("vppo-recipes", "vppo-eval", "nox", "tune", "python", "python3", "pip", "pytest", "tensorboard")


def _blocks(text: str) -> list[tuple[str, str]]:
    """(language, body) of every fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in FENCE.finditer(text)]


def shell_commands(text: str) -> list[list[str]]:
    """The commands of a README, in order, as argv lists: fenced bash blocks (every line a command; `\\` joins
    lines; comments dropped), untagged blocks (the lines that start with a known command; the rest is output shown)
    and inline `nox -s ...` / `python -m ... --help` spans. Leading `VAR=value` environment settings are dropped."""
    out = []
    for lang, body in _blocks(text):
        if lang not in ("bash", "sh", ""):
            continue
        for line in body.replace("\\\n", " ").splitlines():
            argv = shlex.split(line, comments=True)
            while argv and re.fullmatch(r"[A-Z_]+=\S*", argv[0]):
                argv = argv[1:]
            if not argv:
                continue
            if argv[0] not in COMMANDS:
                assert lang == "", f"a bash block runs {argv[0]!r}, which this test does not know: {line}"
                continue
            out.append(argv)
    prose = FENCE.sub("", text)
    for span in re.findall(r"`([^`\n]+)`", prose):
        if re.match(r"nox -s \w+", span) or re.match(r"python -m [\w.]+ --help$", span):
            out.append(shlex.split(span))
    return out


def pythonpath_entries(text: str) -> list[str]:
    """The folders that the commands of fenced bash blocks put on `PYTHONPATH=...` before them (the examples' own
    modules), in order, as written (relative to the reader's directory)."""
    entries = []
    for lang, body in _blocks(text):
        if lang in ("bash", "sh"):
            for line in body.replace("\\\n", " ").splitlines():
                for setting in re.findall(r"^\s*PYTHONPATH=(\S+)\s", line):
                    entries += setting.split(":")
    return entries


def python_snippets(text: str) -> list[str]:
    return [body for lang, body in _blocks(text) if lang == "python"]


def nox_sessions() -> set[str]:
    """Names of the functions decorated with `@nox.session` in noxfile.py."""
    tree = ast.parse((ROOT / "noxfile.py").read_text())
    return {
        f.name
        for f in tree.body
        if isinstance(f, ast.FunctionDef) and any("session" in ast.unparse(d) for d in f.decorator_list)
    }


def _quiet(fn, *args) -> tuple[int, str]:
    """Run `fn(*args)` with stdout captured -> (exit code, output); argparse's SystemExit counted as its code."""
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        try:
            code = fn(*args)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
    return int(code or 0), buf.getvalue()


def check_recipes_run(argv: list[str], cwd: Path, extras: set[str]) -> None:
    """`vppo-recipes run ...`: torchrun flags (torchrun's parser), the recipe, the config, its keys with the overrides
    (`validate_config`), the world size; the paths too when they are under ./runs (what init-tiny writes for the
    tiny configs), not a model the reader downloads (the full-size configs: "set model.path to the downloaded
    model folder")."""
    from vppo_recipes.config_schema import check_paths, check_world_size, validate_config
    from vppo_recipes.metric_logging import missing_logger_package

    recipe, flags, recipe_args = cli._split_run_args([("0" if "$" in a else a) for a in argv])
    assert recipe in cli.RECIPES, f"unknown recipe {recipe!r}"
    recipe_args = ["--config", str(cli.resolve_config(recipe_args[1], cwd)), *recipe_args[2:]]
    cfg = cli.load_run_config(recipe_args)
    missing = missing_logger_package(cfg.get("metric_logger") or {})
    if missing and any(f"[{extra}]" in missing for extra in extras):
        # the README installs that extra just before (pip is not run here): the rest of the config still counts
        cfg.metric_logger._component_ = "vppo_recipes.metric_logging.JsonlLogger"
    cfg = validate_config(cfg, cli._recipe_kind(recipe, Path(recipe_args[1])))
    world = cli.launched_world_size(flags)
    if world is not None:
        check_world_size(cfg, world)
    if str(cfg.model.path).startswith(str(cwd / "runs")):
        check_paths(cfg)


def check_command(argv: list[str], cwd: Path, sessions: set[str], extras: set[str]) -> str:
    """Check or run one command in `cwd`; returns "ran" or "checked" (or raises AssertionError naming the fault).
    extras: the package extras the README's pip lines so far install (`[tensorboard]`), added to by `pip` lines."""
    head, args = argv[0], argv[1:]
    if head == "vppo-recipes":
        sub = args[0]
        if sub == "run":
            check_recipes_run(args[1:], cwd, extras)
            return "checked"
        if sub == "plan":
            for name in args[1:]:
                assert name == "all" or name in cli.shipped_configs(), f"plan: no shipped config {name!r}"
            return "checked"
        if sub == "export-lora":  # needs a trained LoRA checkpoint: test_rl_runs runs it; here, the arguments
            parsed = cli.build_parser().parse_args(args)
            assert parsed.dtype in ("bfloat16", "float32")
            return "checked"
        if sub == "preflight":
            # minutes on a GPU (test_preflight.py runs the tiny one): here its arguments, config and overrides
            from vppo_recipes.preflight import build_parser

            parsed = build_parser().parse_args(args[1:])
            cli.load_run_config(["--config", str(cli.resolve_config(parsed.config, cwd)), *parsed.overrides])
            return "checked"
        if sub == "init-tiny" and "--no-warm-start" not in args:
            # the warm start is a minute of SFT: test_cli's slow init-tiny test runs it; here, the arguments
            code, _ = _quiet(cli.main, [*argv[1:], "--help"])
            assert code == 0
            return "checked"
        code, out = _quiet(cli.main, args)
        assert code == 0, f"exit code {code}: {out}"
        return "ran"
    if head == "vppo-eval":
        from vppo_eval import BENCHMARKS
        from vppo_eval.cli import build_parser

        parsed = build_parser().parse_args(args)
        if parsed.benchmarks != "all":
            unknown = set(parsed.benchmarks.split(",")) - set(BENCHMARKS)
            assert not unknown, f"unknown benchmark(s) {unknown}"
        return "checked"
    if head == "nox":
        assert args[0] == "-s" and args[1] in sessions, f"no nox session {args[1]!r} in noxfile.py"
        return "checked"
    if head == "tune":
        assert args[0] == "run"
        recipe = next(a for a in args[1:] if a.endswith(".py"))
        assert (ROOT / "packages/vppo-recipes/src" / recipe).is_file(), f"no recipe file {recipe}"
        config = args[args.index("--config") + 1]
        assert (cwd / config).is_file() or config in cli.shipped_configs(), f"no config {config}"
        return "checked"
    if head in ("python", "python3"):
        if args[:1] == ["-m"] and args[1] == "pip":
            return "checked"
        if args[:1] == ["-m"]:
            import importlib

            assert args[2:] == ["--help"], f"only `python -m MODULE --help` is expected: {argv}"
            code, out = _quiet(importlib.import_module(args[1]).main, ["--help"])
            assert code == 0 and "usage:" in out, out
            return "ran"
        assert (ROOT / args[0]).is_file(), f"no file {args[0]}"
        return "checked"
    if head == "pip":
        for arg in args[1:]:
            assert not arg.startswith("vppo"), f"{arg} is not on a package index: install it from the checkout"
            if arg.startswith(("packages/", "'packages/", '"packages/')):
                folder = re.sub(r"\[.*\]$", "", arg.strip("'\""))
                extras.update(re.findall(r"\[(\w+)\]", arg))
                assert (ROOT / folder / "pyproject.toml").is_file(), f"no package at {folder}"
        return "checked"
    if head == "pytest":
        assert (ROOT / args[0]).is_dir(), f"no test folder {args[0]}"
        return "checked"
    return "checked (external tool)"


@pytest.fixture(scope="session")
def tiny_runs(tmp_path_factory) -> Path:
    """`vppo-recipes init-tiny runs --no-warm-start`, once. The warm start's folder holds a copy of the tiny
    checkpoint, so the tiny RL commands' paths can be checked (the real one is 40 SFT steps, a minute:
    test_cli.py::test_init_tiny_writes_the_warm_start_every_tiny_config_reads builds it)."""
    root = tmp_path_factory.mktemp("readme_fixtures")
    code, out = _quiet(cli.main, ["init-tiny", str(root / "runs"), "--no-warm-start"])
    assert code == 0, out
    shutil.copytree(root / "runs" / "tiny_ckpt", root / "runs" / "tiny_sft" / "checkpoints" / "step_000040")
    return root / "runs"


@pytest.fixture
def forget_modules_of(tmp_path):
    """After the test: the modules imported from `tmp_path` (an example's own) leave `sys.modules`."""
    yield
    for name, module in list(sys.modules.items()):
        if str(getattr(module, "__file__", None) or "").startswith(str(tmp_path)):
            del sys.modules[name]


@pytest.mark.parametrize("readme", READMES, ids=[str(p.relative_to(ROOT)) for p in READMES])
def test_every_readme_command_parses_and_names_what_exists_and_every_snippet_runs(
    readme, tiny_runs, tmp_path, monkeypatch, capsys, forget_modules_of
):
    """Before: `pip install vppo-recipes` (not on an index), tiny runs needing folders no command wrote, a vppo-eval
    snippet with an undefined `path`, a vppo-rollout one with an undefined `image`."""
    shutil.copytree(tiny_runs, tmp_path / "runs")
    shutil.copytree(ROOT / "examples", tmp_path / "examples")  # what a checkout's root holds besides the packages
    monkeypatch.chdir(tmp_path)
    text = readme.read_text()
    for entry in pythonpath_entries(text):  # what the commands' `PYTHONPATH=` gives the config check
        monkeypatch.syspath_prepend(str(tmp_path / entry))
    sessions, extras = nox_sessions(), set()
    report = []
    for argv in shell_commands(text):
        shown = " ".join(argv)
        try:
            report.append((check_command(argv, tmp_path, sessions, extras), shown))
        except Exception as e:
            pytest.fail(f"{readme.relative_to(ROOT)}: `{shown}`: {type(e).__name__}: {e}")
    namespace: dict = {"__name__": "__readme__"}
    for i, snippet in enumerate(python_snippets(text)):
        try:
            exec(compile(snippet, f"{readme.name} python snippet {i + 1}", "exec"), namespace)
        except Exception as e:
            pytest.fail(f"{readme.relative_to(ROOT)}: python snippet {i + 1} fails: {type(e).__name__}: {e}")
        report.append(("ran", f"python snippet {i + 1} ({len(snippet.splitlines())} lines)"))
    with capsys.disabled():
        print(f"\n{readme.relative_to(ROOT)}:")
        for status, shown in report:
            print(f"  {status:<24} {shown}")
    assert report, f"{readme} holds no command or snippet"


@pytest.mark.parametrize(
    ("argv", "fault"),
    [
        (["pip", "install", "vppo-recipes"], "not on a package index"),  # the recipes README's line before
        (["vppo-recipes", "run", "sft_distributed", "--config", "tiny_sft", "training.max_step=3"], "max_step"),
        (["vppo-recipes", "run", "sft_distributed", "--nproc_per_node", "4", "--config", "tiny_sft"], "WORLD_SIZE=4"),
        (["vppo-recipes", "plan", "qwen_9b"], "no shipped config"),
        (["nox", "-s", "tests_quick"], "no nox session"),
        (["vppo-eval", "--model", "PATH", "--benchmarks", "geo3k,mathvista", "--out", "DIR"], "mathvista"),
        (["python", "packages/vppo-core/benchmarks/nope.py"], "no file"),
    ],
)
def test_the_checks_refuse_a_command_that_would_not_work(argv, fault, tmp_path, monkeypatch):
    """The checks above can fail: each of these commands is refused, naming what is wrong."""
    monkeypatch.chdir(tmp_path)
    with pytest.raises(Exception, match=fault):
        check_command(argv, tmp_path, nox_sessions(), set())
