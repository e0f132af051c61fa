"""`vppo-recipes`: list, copy and launch the shipped recipes and configs from any directory.

    vppo-recipes ls
    vppo-recipes cp tiny_sft ./my_sft.yaml                 # a shipped config (or recipe) to edit
    vppo-recipes run sft_distributed --nproc_per_node 2 --config ./my_sft.yaml training.max_steps=10
    vppo-recipes plan ...                                  # memory planner (vppo_recipes.plan)
    vppo-recipes init-tiny runs                            # the tiny model, task and warm start the tiny_* configs read
    vppo-recipes preflight --config CONFIG [--device cpu]  # check a (GPU) machine with a config (vppo_recipes.preflight)

`run` hands over to torchtune's `tune run`, which turns a *relative* recipe path into a module name
(`a/b.py` -> `a.b`), runs it with `python -m` (under torchrun when torchrun flags are given) and puts the cwd on
`sys.path`. The shipped recipes are passed as `vppo_recipes/<kind>/<name>.py`, i.e. the module
`vppo_recipes.<kind>.<name>` of the installed package, so no `cd` is needed and the user's relative paths (the
config file, `output_dir`, `model.path`, `data.source`) keep meaning what they mean in the user's directory. A
recipe file of the user's own (`vppo-recipes cp sft_distributed my_sft.py`, then edit) may be given by any path:
its folder goes on PYTHONPATH and tune gets the bare file name. The equivalent direct command for a shipped recipe,
from any directory, is `tune run [--nproc_per_node N] vppo_recipes/sft/sft_distributed.py --config <file>`.

Before it starts anything, `run` checks the config in its own process (`check_run_config`): loaded with the
overrides as the recipe will load it (torchtune's own parser), the recipe's `validate_config`, the paths it will read
(`check_paths`) and the world size torchrun will launch (`check_world_size`). A problem is one message on stderr and
exit code 2 within seconds, instead of a traceback from every rank after torchrun has started them.

SIGTERM or SIGINT (Ctrl-C) to `run` is passed on to `tune run`, which is started in a process group of its own, and
`run` waits for it: torchrun passes the signal on to the ranks, which finish their step, save it and exit (see
`vppo_recipes.lifecycle`); `run` then exits with 128 + the signal number. Exiting at once would leave torchrun and
the ranks training, and writing checkpoints, with nobody to stop them.
"""

from __future__ import annotations

import argparse
import itertools
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

__all__ = ["RECIPES", "check_run_config", "main", "recipe_for_config", "resolve_config", "shipped_configs"]

PACKAGE_DIR = Path(__file__).resolve().parent
CONFIG_DIR = PACKAGE_DIR / "configs"
# Recipe name -> file, relative to the package folder. Folders are not called `recipes/`: torchtune ships a
# top-level `recipes` package that would shadow it.
RECIPES: dict[str, str] = {
    "sft_distributed": "sft/sft_distributed.py",
    "rl_distributed": "rl/rl_distributed.py",
}


def shipped_configs() -> dict[str, Path]:
    """Config name (file stem) -> path, for every YAML in the package's configs folder."""
    return {p.stem: p for p in sorted(CONFIG_DIR.glob("*.yaml"))}


def recipe_for_config(path: Path) -> str:
    """The recipe a config belongs to: RL configs have a `rollout` section, SFT configs do not."""
    from omegaconf import OmegaConf

    return "rl_distributed" if "rollout" in OmegaConf.load(path) else "sft_distributed"


def resolve_config(config: str, cwd: Path | None = None) -> Path:
    """A config argument -> absolute path: an existing file (relative to `cwd`) first, else a shipped name."""
    cwd = cwd or Path.cwd()
    candidate = Path(config).expanduser()
    candidate = candidate if candidate.is_absolute() else cwd / candidate
    if candidate.is_file():
        return candidate.resolve()
    shipped = shipped_configs()
    name = config[:-5] if config.endswith(".yaml") else config
    if name in shipped:
        return shipped[name]
    raise SystemExit(
        f"vppo-recipes: config {config!r} is neither a file (looked at {candidate}) nor a shipped config "
        f"({', '.join(shipped) or 'none'}); see `vppo-recipes ls`"
    )


def _available_recipes() -> dict[str, Path]:
    return {name: PACKAGE_DIR / rel for name, rel in RECIPES.items() if (PACKAGE_DIR / rel).is_file()}


def cmd_ls(_: argparse.Namespace) -> int:
    recipes = _available_recipes()
    by_recipe: dict[str, list[str]] = {name: [] for name in recipes}
    for name, path in shipped_configs().items():
        by_recipe.setdefault(recipe_for_config(path), []).append(name)
    width = max([len("RECIPE"), *map(len, by_recipe)]) + 3
    print(f"{'RECIPE':<{width}}CONFIG")
    for recipe, configs in by_recipe.items():
        label = recipe if recipe in recipes else f"{recipe} (not installed)"
        for i, cfg in enumerate(configs or ["-"]):
            print(f"{label if i == 0 else '':<{width}}{cfg}")
    return 0


def cmd_cp(args: argparse.Namespace) -> int:
    recipes = _available_recipes()
    name = args.file[:-3] if args.file.endswith(".py") else args.file
    if name in recipes:
        src, suffix = recipes[name], ".py"
    else:
        configs = shipped_configs()
        name = name[:-5] if name.endswith(".yaml") else name
        if name not in configs:
            raise SystemExit(
                f"vppo-recipes cp: {args.file!r} is not a shipped recipe ({', '.join(recipes)}) "
                f"or config ({', '.join(configs)})"
            )
        src, suffix = configs[name], ".yaml"
    dest = Path(args.destination).expanduser()
    if dest.is_dir():
        dest = dest / f"{name}{suffix}"
    elif not dest.suffix:
        dest = dest.with_suffix(suffix)
    if dest.exists() and not args.force:
        raise SystemExit(f"vppo-recipes cp: {dest} exists; pass --force to overwrite")
    dest.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, dest)
    print(f"Copied {src.name} to {dest}")
    return 0


def cmd_init_tiny(args: argparse.Namespace) -> int:
    """Write what the shipped tiny_* configs read, under `args.dir`: `tiny_ckpt/` (the tiny random Qwen2.5-VL),
    `visual_task/` (the synthetic task), `visual_task_claims/` (the same rows with VAPO's claim columns, tiny_vapo's)
    and, unless `args.no_warm_start`, the SFT warm start `tiny_sft/checkpoints/step_000040` (the tiny_sft config's
    steps), with the CPU demo's own stages (`vppo_recipes.demo.build_assets`, `sft_warm_start`: the shipped SFT recipe
    on 2 processes). With `runs` as DIR the configs' relative paths (`./runs/...`) find them from DIR's parent."""
    from omegaconf import OmegaConf

    from vppo_eval.synthetic import build_visual_task
    from vppo_recipes.demo import build_assets, sft_warm_start
    from vppo_recipes.demo_settings import DemoSettings
    from vppo_recipes.lifecycle import OutputDirError

    root = Path(args.dir).expanduser().resolve()
    # The tiny_sft config's steps, and its one-line target (no chain-of-thought column): the warm start is then the
    # run `vppo-recipes run sft_distributed --config tiny_sft` makes, with the same config record, so a later tiny_sft
    # launch into ./runs/tiny_sft resumes it instead of being refused as a changed config.
    sft = OmegaConf.load(shipped_configs()["tiny_sft"])
    settings = DemoSettings(sft_steps=int(sft.training.max_steps), sft_lr=float(sft.optimizer.lr), reasoning=False)
    task, ckpt = build_assets(root, settings)
    print(f"tiny checkpoint: {ckpt}\nsynthetic task: {task}  (what tiny_sft reads)", flush=True)
    # tiny_vapo's: the same rows with VAPO's claim_1..20 / label_1..20 columns (their own random stream)
    claims = root / "visual_task_claims"
    build_visual_task(
        claims, n_train=settings.n_train, n_test=settings.n_test, seed=0, image_size=settings.image_size,
        tasks=settings.tasks, hint=settings.hint, reasoning=settings.reasoning, claims=20,
    )  # fmt: skip
    print(f"synthetic task with VAPO's claim columns: {claims}  (what tiny_vapo reads)", flush=True)
    if args.no_warm_start:
        print("no warm start (--no-warm-start): the tiny RL configs (tiny_vppo, tiny_dapo, ...) need it as model.path")
        return 0
    print(
        f"SFT warm start: {settings.sft_steps} steps on 2 processes (log: {root / 'logs' / 'sft.log'}) ...", flush=True
    )
    try:
        warm = sft_warm_start(root, task, ckpt, settings)
    except OutputDirError as err:  # a live run in DIR/tiny_sft: refused, not deleted under it
        print(f"vppo-recipes init-tiny: {err}", file=sys.stderr)
        return 2
    print(f"SFT warm start: {warm}  (the tiny RL configs' model.path)")
    return 0


def _split_run_args(argv: list[str]) -> tuple[str, list[str], list[str]]:
    """`RECIPE [torchrun flags] --config C k=v...` (torchrun flags may also precede RECIPE) ->
    (recipe, torchrun flags, recipe args starting at --config)."""
    if "--config" not in argv:
        raise SystemExit("vppo-recipes run: --config CONFIG is required (a file or a shipped config name)")
    at = argv.index("--config")
    before, after = argv[:at], argv[at:]
    if len(after) < 2:
        raise SystemExit("vppo-recipes run: --config needs a value")
    if not before:
        raise SystemExit("vppo-recipes run: name a recipe, e.g. `vppo-recipes run sft_distributed --config ...`")
    if not before[0].startswith("-"):
        return before[0], before[1:], after
    return before[-1], before[:-1], after


def build_run_command(argv: list[str], cwd: Path | None = None) -> tuple[list[str], dict[str, str]]:
    """The `tune run` command line and environment for `vppo-recipes run argv...` (see module docstring)."""
    cwd = cwd or Path.cwd()
    recipe, flags, recipe_args = _split_run_args(argv)
    env = dict(os.environ)
    recipes = _available_recipes()
    name = recipe[:-3] if recipe.endswith(".py") and recipe[:-3] in recipes else recipe
    if name in recipes:
        recipe_arg = f"vppo_recipes/{RECIPES[name]}"
    else:
        path = Path(recipe).expanduser()
        path = path if path.is_absolute() else cwd / path
        if not (path.is_file() and path.suffix == ".py"):
            raise SystemExit(
                f"vppo-recipes run: {recipe!r} is neither a shipped recipe ({', '.join(recipes)}) nor a .py file"
            )
        # tune needs a relative path it can turn into a module name: put the file's folder on the path.
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(path.resolve().parent), env.get("PYTHONPATH")]))
        recipe_arg = path.name
    recipe_args = list(recipe_args)
    recipe_args[1] = str(resolve_config(recipe_args[1], cwd))
    cmd = [sys.executable, "-m", "torchtune._cli.tune", "run", *flags, recipe_arg, *recipe_args]
    return cmd, env


def _recipe_kind(recipe: str, config: Path) -> str:
    """ "rl" | "sft": the schema `recipe`'s `validate_config` uses. A recipe file of the user's own (a copy of a
    shipped one) is taken to be of its config's kind (`recipe_for_config`)."""
    name = recipe[:-3] if recipe.endswith(".py") else recipe
    if name in RECIPES:
        return "rl" if name == "rl_distributed" else "sft"
    return "rl" if recipe_for_config(config) == "rl_distributed" else "sft"


def launched_world_size(flags: list[str]) -> int | None:
    """The WORLD_SIZE torchrun will give the ranks for these `tune run` flags, read by torchrun's own parser; 1 without
    flags (`tune run` then starts one process without torchrun); None when it is decided only at launch (an elastic
    `--nnodes MIN:MAX` with MIN < MAX)."""
    if not flags:
        return 1
    from torch.distributed.run import determine_local_world_size, get_args_parser, parse_min_max_nnodes

    args = get_args_parser().parse_args([*flags, "recipe.py"])
    low, high = parse_min_max_nnodes(args.nnodes)
    return low * determine_local_world_size(args.nproc_per_node) if low == high else None


def load_run_config(recipe_args: list[str]):
    """`["--config", PATH, "key=value", ...]` -> the DictConfig the recipe's `recipe_main` will get: read by
    torchtune's own recipe parser (`TuneRecipeArgumentParser`, what `config.parse` uses) and merged with the
    overrides as the recipe's `vppo_recipes.config_overrides.parse` does (torchtune's `_merge_yaml_and_cli_args`,
    an override choosing another method replacing the file's `algorithm` section). A malformed override or an unknown flag is a `ConfigError`."""
    import yaml
    from omegaconf.errors import OmegaConfBaseException
    from torchtune.config._parse import TuneRecipeArgumentParser

    from vppo_recipes.config_overrides import merge_config_and_overrides
    from vppo_recipes.config_schema import ConfigError

    try:
        yaml_args, cli_args = TuneRecipeArgumentParser().parse_known_args(recipe_args)
        return merge_config_and_overrides(yaml_args, cli_args)[0]
    # a malformed override (`key` without `=`, `k=[1`, `k=${oops`), an unknown flag, a YAML file that does not parse
    except (ValueError, yaml.YAMLError, OmegaConfBaseException) as e:
        raise ConfigError(f"cannot read the config {recipe_args[1]} with its overrides: {e}") from None


def check_run_config(recipe: str, flags: list[str], recipe_args: list[str]) -> None:
    """Check the config of `vppo-recipes run` in this process, before anything is spawned; raise `ConfigError`.

    recipe: the recipe name or file; flags: the torchrun flags; recipe_args: `["--config", PATH, "key=value", ...]`
    with PATH resolved. The config is the one the ranks will get (`load_run_config`); then the recipe's
    `validate_config`, `check_paths`, and `check_world_size` against the flags' world size. Relative paths resolve
    against the cwd, as in the ranks.
    """
    from vppo_recipes.config_schema import ConfigError, check_paths, check_world_size, validate_config

    kind = _recipe_kind(recipe, Path(recipe_args[1]))
    cfg = load_run_config(recipe_args)
    # What the ranks can import, this check can import too (an `algorithm._component_` method next to the launch
    # or to a recipe file of your own): the ranks run `python -m` from the cwd, with a recipe file's folder on
    # PYTHONPATH (`build_run_command`).
    folders = [os.getcwd()] + ([str(Path(recipe).resolve().parent)] if recipe.endswith(".py") else [])
    added = [f for f in folders if f not in sys.path]
    sys.path[:0] = added
    try:
        cfg = validate_config(cfg, kind)
    finally:
        for f in added:
            sys.path.remove(f)
    problems = []
    try:
        check_paths(cfg)
    except ConfigError as e:
        problems.append(str(e))
    try:
        world = launched_world_size(flags)
    except (ValueError, RuntimeError) as e:  # torchrun's own parse errors of --nnodes / --nproc_per_node
        problems.append(f"the torchrun flags {' '.join(flags)} give no world size: {e}")
    else:
        try:
            if world is not None:
                check_world_size(cfg, world)
        except ConfigError as e:
            problems.append(str(e))
    if problems:
        raise ConfigError("\n".join(problems))


def run_forwarding_signals(cmd: list[str], env: dict[str, str]) -> int:
    """Run `cmd` in a new process group; pass the first SIGTERM / SIGINT / SIGHUP on to that group and wait for it to
    end.

    Returns the child's exit code, or 128 + the signal number when a signal stopped the run before it finished.
    Only the first signal is passed on: torchrun's agent, interrupted again while it waits for the ranks to save,
    would stop waiting; it kills them itself after its `--shutdown_timeout`. SIGHUP (the terminal or the ssh session
    closed) is passed on as SIGTERM: the child's own session no longer gets the terminal's hang-up, and the ranks
    stop and save on SIGTERM / SIGINT only.
    """
    child = subprocess.Popen(cmd, env=env, start_new_session=True)  # its own group: one signal per Ctrl-C, not two
    received: list[int] = []

    def forward(signum: int, frame: object) -> None:
        name = signal.Signals(signum).name
        if received:
            print(f"vppo-recipes: {name} again; still waiting for the ranks to save (SIGKILL aborts)", flush=True)
            return
        received.append(signum)
        print(f"vppo-recipes: {name}: asking the run to stop after its current step and save it", flush=True)
        try:
            os.killpg(child.pid, signal.SIGTERM if signum == signal.SIGHUP else signum)
        except ProcessLookupError:  # it has just ended
            pass

    previous = {s: signal.signal(s, forward) for s in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)}
    try:
        rc = child.wait()  # retried after each handler (PEP 475)
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    if received and rc != 0:
        print(
            f"vppo-recipes: stopped by {signal.Signals(received[0]).name} (the run exited with {rc}); "
            "resume with the same command",
            flush=True,
        )
        return 128 + received[0]
    return rc


def cmd_run(argv: list[str]) -> int:
    cmd, env = build_run_command(argv)
    recipe, flags, recipe_args = _split_run_args(argv)
    from vppo_recipes.config_schema import ConfigError

    try:
        check_run_config(recipe, flags, ["--config", str(resolve_config(recipe_args[1])), *recipe_args[2:]])
    except ConfigError as e:
        print(f"vppo-recipes run: {e}\nnothing was started", file=sys.stderr, flush=True)
        return 2
    print("Running: tune run " + " ".join(cmd[4:]), flush=True)
    return run_forwarding_signals(cmd, env)


def cmd_export_lora(args: argparse.Namespace) -> int:
    from vppo_recipes.lora import export_lora_checkpoint

    try:
        adapter, merged = export_lora_checkpoint(args.checkpoint, args.out, base_model=args.base, dtype=args.dtype)
    except ValueError as e:
        print(f"vppo-recipes export-lora: {e}", file=sys.stderr, flush=True)
        return 2
    print(f"peft adapter: {adapter}\nmerged Hugging Face folder: {merged}", flush=True)
    return 0


def _asks_for_cpu(argv: list[str]) -> bool:
    """`--device cpu` or `--device=cpu` among preflight's arguments."""
    return "--device=cpu" in argv or any(a == "--device" and b == "cpu" for a, b in itertools.pairwise(argv))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # `run`, `plan` and `preflight` pass their arguments through untouched (torchrun flags, key=value overrides).
    if argv and argv[0] == "run":
        return cmd_run(argv[1:])
    if argv and argv[0] == "plan":
        from vppo_recipes.plan import main as plan_main  # planner imports are heavy: only when asked

        return int(plan_main(argv[1:]) or 0)
    if argv and argv[0] == "preflight":
        if _asks_for_cpu(argv[1:]):  # before torch initialises CUDA: the recipe takes a GPU whenever it sees one
            os.environ["CUDA_VISIBLE_DEVICES"] = ""
        from vppo_recipes.preflight import main as preflight_main

        return int(preflight_main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    return args.func(args)


def build_parser() -> argparse.ArgumentParser:
    """The parser of the subcommands other than `run` and `plan` (those pass their arguments through)."""
    parser = argparse.ArgumentParser(prog="vppo-recipes", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("ls", help="list the recipes and their shipped configs").set_defaults(func=cmd_ls)
    cp = sub.add_parser("cp", help="copy a shipped config (or recipe) to edit it")
    cp.add_argument("file", help="shipped config name (tiny_sft) or recipe name (sft_distributed)")
    cp.add_argument("destination", help="file or folder")
    cp.add_argument("--force", action="store_true", help="overwrite an existing destination")
    cp.set_defaults(func=cmd_cp)
    init = sub.add_parser(
        "init-tiny",
        help="write the tiny model, synthetic task and SFT warm start that the tiny_* configs read",
        description="Write DIR/tiny_ckpt, DIR/visual_task and DIR/tiny_sft/checkpoints/step_000040 (the SFT warm "
        "start, about a minute on 2 CPU cores) -- the ./runs/... folders of the shipped tiny_* configs when DIR is "
        "runs and you launch from its parent.",
    )
    init.add_argument("dir", help="output folder (runs, for the tiny configs' ./runs/... paths)")
    init.add_argument(
        "--no-warm-start",
        action="store_true",
        help="only the tiny checkpoint and the task (seconds): enough for tiny_sft; the tiny RL configs need the "
        "warm start",
    )
    init.set_defaults(func=cmd_init_tiny)
    export = sub.add_parser(
        "export-lora",
        help="write a LoRA checkpoint as a peft adapter folder (OUT/adapter) and a merged Hugging Face folder "
        "(OUT/merged)",
        description="CKPT: a LoRA run's checkpoint (checkpoints/step_N). OUT/adapter loads with "
        "peft.PeftModel.from_pretrained(base, OUT/adapter); OUT/merged is the base with W + alpha/r * B @ A in every "
        "adapted layer, which transformers and vLLM load like any model folder.",
    )
    export.add_argument("checkpoint", help="a LoRA checkpoint folder (its vppo_checkpoint.json says lora_adapter)")
    export.add_argument("out", help="output folder (adapter/ and merged/ are written into it)")
    export.add_argument(
        "--base", default=None, help="the base model folder (default: the adapter's base_model_name_or_path)"
    )
    export.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"), help="merged weights' dtype")
    export.set_defaults(func=cmd_export_lora)
    sub.add_parser("run", help="RECIPE [torchrun flags] --config CONFIG [key=value ...]")
    sub.add_parser("plan", help="per-rank memory plan of a config (see `vppo-recipes plan --help`)")
    sub.add_parser("preflight", help="check a machine with a config in minutes (see `vppo-recipes preflight --help`)")
    return parser


if __name__ == "__main__":
    sys.exit(main())
