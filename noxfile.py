"""Every routine task of the vppo monorepo is a nox session.

    nox -s tests        # the whole test suite (all four packages, CPU)
    nox -s tests_core   # vppo-core alone, in a venv holding only torch + test tools
    nox -s lint         # ruff
    nox -s bench        # benchmarks: ratios against a baseline measured in the same run
    nox -s demo         # the CPU demo: a tiny VLM learns a visual task with VPPO vs DAPO/GRPO
    nox -s plan         # per-rank memory plans of the shipped 7B/32B configs (meta device, fake process group)

Reuse a venv between runs with `nox -R -s tests`.
"""

from __future__ import annotations

import os
from pathlib import Path

import nox

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = False

ROOT = Path(__file__).parent
PACKAGES = ["vppo-core", "vppo-rollout", "vppo-eval", "vppo-recipes"]
# torch 2.13.0 is the CPU wheel this machine ships; any other torch pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"
# Offline by construction: no hub, no wandb server. Tests build tiny models and small data locally.
OFFLINE_ENV = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "WANDB_SILENT": "true",
    "TOKENIZERS_PARALLELISM": "false",
    "PYTHONHASHSEED": "0",
}
# Test sessions also fix hypothesis' examples (see conftest.py) so that a CI failure reproduces exactly.
TEST_ENV = {**OFFLINE_ENV, "HYPOTHESIS_PROFILE": "ci"}


def _pip_extra_args() -> list[str]:
    # This machine keeps its CPU torch wheel in /opt/wheels; pip.conf names it, but say it explicitly so a
    # CI environment without that variable still finds it.
    return ["--find-links", "/opt/wheels"] if Path("/opt/wheels").is_dir() else []


def _install(session: nox.Session, *packages: str, extra: str = "test") -> None:
    session.install(*_pip_extra_args(), TORCH)
    specs = []
    for name in packages:
        specs += ["-e", f"{ROOT / 'packages' / name}[{extra}]" if extra else str(ROOT / "packages" / name)]
    session.install(*_pip_extra_args(), TORCH, *specs)


@nox.session
def tests(session: nox.Session) -> None:
    """All tests of all packages on CPU (GPU-only tests are skipped with their reason)."""
    _install(session, *PACKAGES)
    session.run("pytest", *(session.posargs or []), env=TEST_ENV)


@nox.session
def tests_core(session: nox.Session) -> None:
    """vppo-core alone: proves it needs nothing but torch at run time."""
    _install(session, "vppo-core")
    session.run("python", str(ROOT / "packages/vppo-core/tests/check_runtime_deps.py"), env=OFFLINE_ENV)
    session.run("pytest", "packages/vppo-core/tests", *session.posargs, env=TEST_ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks of every package; each prints ratios against a baseline measured in the same run."""
    _install(session, *PACKAGES)
    scripts = sorted(ROOT.glob("packages/*/benchmarks/bench_*.py"))
    only = set(session.posargs)
    for script in scripts:
        if only and script.stem not in only:
            continue
        session.run("python", str(script), env=OFFLINE_ENV)


@nox.session
def demo(session: nox.Session) -> None:
    """The CPU demo (see README): writes plots, an HTML view and a summary table into out/demo/."""
    _install(session, *PACKAGES, extra="")
    out = os.environ.get("VPPO_DEMO_OUT", str(ROOT / "out" / "demo"))
    session.run("python", "-m", "vppo_recipes.demo", "--out", out, *session.posargs, env=OFFLINE_ENV)


@nox.session
def plan(session: nox.Session) -> None:
    """Per-rank memory plan of every shipped full-size config (meta device, fake process group)."""
    _install(session, *PACKAGES, extra="")
    session.run("vppo-recipes", "plan", "all", *session.posargs, env=OFFLINE_ENV)


@nox.session
def stress(session: nox.Session) -> None:
    """N consecutive 2-process launches of the RL recipe (default 50); fails if any launch exits non-zero."""
    _install(session, *PACKAGES, extra="")
    script = ROOT / "packages/vppo-recipes/benchmarks/launch_stress.py"
    session.run("python", str(script), *(session.posargs or ["--runs", "50"]), env=OFFLINE_ENV)
