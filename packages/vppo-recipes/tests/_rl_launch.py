"""Launching the RL recipe from tests: `tune run` commands on the tiny configs, runs, kills, metrics."""

from __future__ import annotations

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from vppo_recipes.offline import OFFLINE_ENV

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"
RECIPE = "vppo_recipes/rl/rl_distributed.py"  # tune run: relative path -> module vppo_recipes.rl.rl_distributed
# torchrun sets OMP_NUM_THREADS for 2 ranks; set it for 1 rank too so both runs do the same math
ENV = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
# Small enough for seconds per step, large enough to exercise the whole step: 4 prompts x G=4 per RL step, two
# mini-batches (2 optimizer steps), two micro-batches per mini-batch per rank, filter draws to refill.
SMALL_BATCH = [
    "rollout.group_size=4",
    "rollout.batch_prompts=4",
    "rollout.max_filter_draws=6",
    "rollout.max_new_tokens=16",
    "batch.update_prompts=2",
    "batch.micro_batch_size=2",
]
SMALL = [
    *SMALL_BATCH,
    "training.save_every_n_steps=1",
    "validation.every_n_steps=2",  # avg@2 on the 4 held-out rows after step 2
    "validation.k=2",
    "validation.limit=null",
]
# Keys that measure time and memory, not the computation.
TIMING = ("time/", "throughput/", "memory/")


def command(assets, algo: str, out: Path, nproc: int, steps: int, extra=(), config: Path | None = None) -> list[str]:
    """`tune run` of the RL recipe on `config` (default: the shipped `tiny_{algo}.yaml`) with the SMALL sizes."""
    tune = str(Path(sys.executable).parent / "tune")
    config = config or CONFIGS / f"tiny_{algo}.yaml"
    return [
        tune, "run", "--nproc_per_node", str(nproc), RECIPE, "--config", str(config),
        f"output_dir={out}", f"model.path={assets['warm']}", f"data.source={assets['task']}",
        f"world.nproc_per_node={nproc}", f"training.max_steps={steps}", f"validation.source={assets['task']}",
        *SMALL, *extra,
    ]  # fmt: skip


def run(
    assets, algo: str, out: Path, *, nproc: int, steps: int, extra=(), config: Path | None = None
) -> subprocess.CompletedProcess:
    cmd = command(assets, algo, out, nproc, steps, extra, config)
    proc = subprocess.run(
        cmd, cwd=assets["root"], env={**os.environ, **ENV}, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, (
        f"{' '.join(cmd)}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-8000:]}"
    )
    return proc


def metrics(out: Path) -> list[dict]:
    from vppo_recipes.metric_logging import read_jsonl

    return read_jsonl(out / "logs" / "metrics.jsonl")


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or a == b


def kill_after_checkpoint(assets, algo: str, out: Path, *, nproc: int, steps: int, checkpoint: int, extra=()) -> None:
    """Launch a run, SIGKILL the launcher and every rank as soon as checkpoint `checkpoint` exists (mid next step)."""
    proc = subprocess.Popen(
        command(assets, algo, out, nproc, steps, extra), cwd=assets["root"], env={**os.environ, **ENV},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    marker = out / "checkpoints" / f"step_{checkpoint:06d}" / "vppo_checkpoint.json"
    deadline = time.monotonic() + 900
    while not marker.is_file():
        assert proc.poll() is None, f"the run ended before checkpoint {checkpoint} was written"
        assert time.monotonic() < deadline, f"timed out waiting for checkpoint {checkpoint}"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not (out / "checkpoints" / f"step_{checkpoint + 1:06d}").exists(), "killed too late: the next step finished"


def launcher_command(assets, algo: str, out: Path, nproc: int, steps: int, extra=()) -> list[str]:
    """`command`'s run through the `vppo-recipes run` launcher, the recipe given by its shipped name; torchrun waits
    up to 300 s (not its default 30) for the ranks to save after a signal, as a step can take longer on a busy machine.
    """
    args = command(assets, algo, out, nproc, steps, extra)[2:]  # what follows `tune run`
    args[args.index(RECIPE)] = "rl_distributed"
    return [sys.executable, "-m", "vppo_recipes.cli", "run", "--shutdown_timeout", "300", *args]


def processes_mentioning(text: str) -> list[int]:
    """Pids of this host's processes whose command line contains `text` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            except OSError:  # ended meanwhile
                continue
            if text in cmdline:
                found.append(int(entry.name))
    return found


def sigterm_after_step(assets, algo: str, out: Path, *, nproc: int, steps: int, step: int, log: Path, extra=()) -> int:
    """Launch through `vppo-recipes run`, send SIGTERM to the launcher alone (as `kill PID` and `docker stop` do) as
    soon as metrics.jsonl shows `step`, wait for it; its exit code. Every process of the run left alive is killed
    (and the test failed) afterwards."""
    with log.open("w") as fh:
        proc = subprocess.Popen(
            launcher_command(assets, algo, out, nproc, steps, extra), cwd=assets["root"], env={**os.environ, **ENV},
            stdout=fh, stderr=subprocess.STDOUT,
        )  # fmt: skip
    metrics_file = out / "logs" / "metrics.jsonl"
    try:
        deadline = time.monotonic() + 900
        while not (metrics_file.is_file() and f'"step": {step},' in metrics_file.read_text()):
            assert proc.poll() is None, f"the run ended before step {step}:\n{log.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"timed out waiting for step {step}"
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        return proc.wait(timeout=300)
    finally:
        proc.kill()
        proc.wait()
        left = processes_mentioning(str(out))
        for pid in left:
            os.kill(pid, signal.SIGKILL)
        assert not left, f"processes of the run still alive after the launcher exited: {left}"
