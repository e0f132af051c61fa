"""Multi-node for real on one machine: two torchrun "nodes" on 127.0.0.1 (`--nnodes 2`, c10d rendezvous), one
process each, run the tiny RL recipe for two steps with gloo — the launch line a cluster user types, with the
node address replaced by 127.0.0.1. The two-node run must produce the same metrics as a one-node, two-process run
of the same config (same global batch; only the rendezvous differs).
"""

from __future__ import annotations

import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _rl_launch import CONFIGS, ENV, RECIPE, SMALL_BATCH
from _warm_start import warm_start

pytestmark = [pytest.mark.distributed, pytest.mark.slow, pytest.mark.timeout(1800)]

SMALL = [
    *SMALL_BATCH,
    "training.max_steps=2",
    "training.save_every_n_steps=0",
]
# Same math, same data, same reduction order (one rank per node instead of two ranks on one node): metrics agree to
# float32 rounding of the gloo collectives.
RTOL, ATOL = 1e-5, 1e-7


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("multinode")
    ckpt = build_tiny_checkpoint(root / "tiny", "qwen2_5_vl", seed=0)
    build_visual_task(root / "task", n_train=32, n_test=4, seed=0)
    return {
        "root": root,
        "warm": warm_start(ckpt, root / "task", root / "warm", steps=40, thought="I look at the image."),
        "task": root / "task",
    }


def _recipe_args(assets, out: Path, nnodes: int, nproc: int) -> list[str]:
    return [
        "--config", str(CONFIGS / "tiny_vppo.yaml"), f"output_dir={out}", f"model.path={assets['warm']}",
        f"data.source={assets['task']}", f"validation.source={assets['task']}", "validation.every_n_steps=0",
        f"world.nnodes={nnodes}", f"world.nproc_per_node={nproc}", *SMALL,
    ]  # fmt: skip


def _metrics(out: Path) -> list[dict]:
    from vppo_recipes.metric_logging import read_jsonl

    return read_jsonl(out / "logs" / "metrics.jsonl")


def test_two_torchrun_nodes_on_localhost_match_one_node_with_two_processes(assets):
    tune = str(Path(sys.executable).parent / "tune")
    vppo_recipes = [sys.executable, "-m", "vppo_recipes.cli"]  # the `vppo-recipes` console script's entry point
    env = {**os.environ, **ENV}
    port, two_nodes, one_node = _free_port(), assets["root"] / "two_nodes", assets["root"] / "one_node"
    # What a cluster user types on each node (README, multi-node), with the master address 127.0.0.1.
    nodes = [
        subprocess.Popen(
            [
                *vppo_recipes,
                "run",
                "rl_distributed",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "vppo_multinode_test",
                *_recipe_args(assets, two_nodes, nnodes=2, nproc=1),
            ],
            cwd=assets["root"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    outputs = []
    try:
        for p in nodes:
            outputs.append(p.communicate(timeout=900)[0])
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {rank} exited {p.returncode}\n{out[-6000:]}"

    single = subprocess.run(
        [tune, "run", "--nproc_per_node", "2", RECIPE, *_recipe_args(assets, one_node, nnodes=1, nproc=2)],
        cwd=assets["root"], env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert single.returncode == 0, single.stdout[-3000:] + single.stderr[-6000:]

    m2, m1 = _metrics(two_nodes), _metrics(one_node)
    assert [m["step"] for m in m2] == [1, 2] == [m["step"] for m in m1]
    assert m2[0]["filter/groups_kept"] == 4, "first rollout batch not full: the comparison would be weaker"
    for a, b in zip(m2, m1):
        assert a["filter/groups_kept"] == b["filter/groups_kept"], (a, b)
        assert math.isfinite(a["loss"]) and a["grad_norm"] > 0, "zero gradient: the comparison would test nothing"
        for key in ("loss", "grad_norm", "reward/mean", "dependency/token_mean", "tas/alpha_max"):
            assert a[key] == pytest.approx(b[key], rel=RTOL, abs=ATOL), (a["step"], key, a[key], b[key])


def test_two_torchrun_nodes_on_localhost_shard_like_a_single_process():
    """The sharding alone over two "nodes" (FSDP across nodes, and HSDP with one replica per node): losses and
    gathered fp32 parameters equal a single-process run after three AdamW steps (tolerances in shard_worker.py)."""
    port = _free_port()
    env = {**os.environ, **ENV}
    worker = str(Path(__file__).parent / "shard_worker.py")
    nodes = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "torch.distributed.run",
                "--nnodes",
                "2",
                "--nproc_per_node",
                "1",
                "--node_rank",
                str(rank),
                "--rdzv_backend",
                "c10d",
                "--rdzv_endpoint",
                f"127.0.0.1:{port}",
                "--rdzv_id",
                "vppo_shard_multinode_test",
                worker,
            ],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for rank in (0, 1)
    ]
    try:
        outputs = [p.communicate(timeout=600)[0] for p in nodes]
    finally:
        for p in nodes:
            if p.poll() is None:
                p.kill()
    for rank, (p, out) in enumerate(zip(nodes, outputs)):
        assert p.returncode == 0, f"node {rank} exited {p.returncode}\n{out[-6000:]}"
    joined = "".join(outputs)
    assert joined.count("SCENARIO") == 4 and " FAIL " not in joined and "ALL OK" in joined, joined[-4000:]
