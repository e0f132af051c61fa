"""Checkpoints: HF-format round trip with identical logits, atomic saves, RNG / data / optimizer state round trips,
clear errors for a checkpoint of another model, and the optimizer round trip under 2-process gloo FSDP2.

This file is also the torchrun worker of the distributed test (`python test_checkpointing.py CKPT OUT`).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open

from vppo_recipes.checkpointing import (
    CheckpointWriteError,
    check_checkpoint_matches,
    checkpoint_dir,
    find_latest_checkpoint,
    find_resumable_checkpoint,
    load_training_state,
    save_checkpoint,
    verify_checkpoint,
)
from vppo_rollout.collate import collate_rollout, model_inputs
from vppo_rollout.loading import load_policy, load_processor
from vppo_rollout.prompts import build_prompt
from vppo_rollout.tiny import build_tiny_checkpoint


def _batch(model, processor, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(rng.integers(0, 255, (56, 56, 3), dtype=np.uint8)) for _ in range(2)]
    prompts = [build_prompt(processor, f"How many red circles? {i}", [img]) for i, img in enumerate(images)]
    ids = processor.tokenizer(["<think>two</think> \\boxed{2}", "\\boxed{3}"], add_special_tokens=False)["input_ids"]
    return collate_rollout(processor, prompts, ids, model=model)


def _train_steps(model, optimizer, batch, steps: int) -> None:
    for _ in range(steps):
        out = model(**model_inputs(batch))
        loss = out.logits[:, batch["prompt_length"] - 1 : -1].float().log_softmax(-1).mean().neg()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def tiny_qwen3(tmp_path_factory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny3") / "ckpt", "qwen3_vl", seed=0)


def test_saved_checkpoint_reloads_in_transformers_with_identical_logits(tiny, tmp_path):
    model, processor = load_policy(tiny), load_processor(tiny)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = _batch(model, processor)
    _train_steps(model, optimizer, batch, 2)  # the saved weights differ from the initial ones
    ckpt = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, processor_source=tiny, arch="qwen2_5_vl")
    assert ckpt == checkpoint_dir(tmp_path, 2) == find_latest_checkpoint(tmp_path)

    reloaded, reprocessor = load_policy(ckpt), load_processor(ckpt)
    with torch.no_grad():
        a = model(**model_inputs(batch)).logits
        b = reloaded(**model_inputs(_batch(reloaded, reprocessor))).logits
        c = load_policy(tiny)(**model_inputs(batch)).logits
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    # Same tensor names as a checkpoint written by transformers itself (what vLLM / from_pretrained expect).
    with safe_open(ckpt / "model.safetensors", "pt") as f1, safe_open(tiny / "model.safetensors", "pt") as f2:
        assert sorted(f1.keys()) == sorted(f2.keys())
    for name in ("config.json", "generation_config.json", "tokenizer.json", "chat_template.jinja"):
        assert (ckpt / name).is_file(), name
    meta = json.loads((ckpt / "vppo_checkpoint.json").read_text())
    assert (meta["step"], meta["arch"], meta["model_type"], meta["world_size"]) == (2, "qwen2_5_vl", "qwen2_5_vl", 1)


def test_training_state_rng_and_optimizer_round_trip(tiny, tmp_path):
    model, processor = load_policy(tiny), load_processor(tiny)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    batch = _batch(model, processor)
    _train_steps(model, optimizer, batch, 1)
    torch.manual_seed(11), random.seed(12), np.random.seed(13)
    state = {"data": {"epoch": 1, "index": 5}, "sampler_seed": 7, "counts": [1, 2]}
    ckpt = save_checkpoint(tmp_path, 1, model=model, optimizer=optimizer, training_state=state)
    expected = (torch.rand(3), random.random(), np.random.rand())
    _train_steps(model, optimizer, batch, 1)  # continue the run: the reference for the resumed one
    torch.manual_seed(0), random.seed(0), np.random.seed(0)

    resumed = load_policy(ckpt)
    resumed_opt = torch.optim.AdamW(resumed.parameters(), lr=1e-2)
    out = load_training_state(ckpt, model=resumed, optimizer=resumed_opt)
    assert out == {"step": 1, "state": state}
    got = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(got[0], expected[0]) and got[1:] == expected[1:]
    _train_steps(resumed, resumed_opt, batch, 1)
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
    # Everything was written so that weights_only=True can read it.
    for f in ("training_state.pt", "optimizer.pt", "rng_state_rank0.pt"):
        torch.load(ckpt / f, weights_only=True)


class _CrashWhenSaved:
    """Raises while the training state is being pickled, i.e. in the middle of a save."""

    def __reduce__(self):
        raise RuntimeError("simulated crash")


def test_crash_mid_save_never_leaves_a_half_checkpoint_as_latest(tiny, tmp_path):
    model = load_policy(tiny)
    save_checkpoint(tmp_path, 2, model=model)
    # A write that fails after the weights were written: reported, its temporary folder removed.
    with pytest.raises(CheckpointWriteError, match=r"checkpoint step 4 not written .*simulated crash"):
        save_checkpoint(tmp_path, 4, model=model, training_state={"bad": _CrashWhenSaved()})
    assert not (tmp_path / "checkpoints" / ".tmp_step_000004").exists()
    assert find_latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    # A process killed mid-save leaves its temporary folder: never taken for a checkpoint.
    leftover = tmp_path / "checkpoints" / ".tmp_step_000004"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half")
    assert find_latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    # A step folder without the completion marker (e.g. copied by hand) is not a checkpoint either.
    (tmp_path / "checkpoints" / "step_000009").mkdir()
    assert find_latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    # The next save of that step replaces the leftover and completes.
    save_checkpoint(tmp_path, 4, model=model)
    assert find_latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)
    assert not (tmp_path / "checkpoints" / ".tmp_step_000004").exists()
    save_checkpoint(tmp_path, 4, model=model)  # re-saving an existing step (after a resume) also works
    assert find_latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)


@pytest.mark.parametrize("damage", ["truncate", "flip_a_byte", "delete"])
def test_a_damaged_latest_checkpoint_is_named_loudly_and_resume_falls_back_to_the_previous_one(
    tiny, tmp_path, capsys, damage
):
    """A truncated model.safetensors in the latest checkpoint used to be picked for resume and fail naming no file."""
    model = load_policy(tiny)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, processor_source=tiny)
    save_checkpoint(tmp_path, 4, model=model, optimizer=optimizer, processor_source=tiny)
    assert verify_checkpoint(checkpoint_dir(tmp_path, 4)) == []
    weights = checkpoint_dir(tmp_path, 4) / "model.safetensors"
    data = weights.read_bytes()
    if damage == "truncate":
        weights.write_bytes(data[: len(data) // 2])
    elif damage == "flip_a_byte":
        weights.write_bytes(data[:-10] + bytes([data[-10] ^ 1]) + data[-9:])
    else:
        weights.unlink()
    problems = verify_checkpoint(checkpoint_dir(tmp_path, 4))
    assert len(problems) == 1 and str(weights) in problems[0], problems
    with pytest.warns(UserWarning, match="CHECKPOINT DAMAGED"):
        chosen = find_resumable_checkpoint(tmp_path)
    assert chosen == checkpoint_dir(tmp_path, 2)
    err = capsys.readouterr().err
    assert "CHECKPOINT DAMAGED, NOT RESUMING FROM IT" in err and str(weights) in err
    assert find_latest_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 4)  # the plain search still sees it


def test_a_checkpoint_without_a_manifest_format_1_still_resumes(tiny, tmp_path):
    model = load_policy(tiny)
    ckpt = save_checkpoint(tmp_path, 2, model=model)
    meta = json.loads((ckpt / "vppo_checkpoint.json").read_text())
    del meta["files"]
    meta["format_version"] = 1
    (ckpt / "vppo_checkpoint.json").write_text(json.dumps(meta))
    assert verify_checkpoint(ckpt) == [] and find_resumable_checkpoint(tmp_path) == ckpt


def _damage_meta(meta: dict, damage: str) -> None:
    name, _, arg = damage.partition(":")
    if name == "drop":
        del meta[arg]
    elif name == "unlist":
        del meta["files"][arg]
    elif name == "version":
        meta["format_version"] = json.loads(arg)
    elif name == "no_version":
        del meta["format_version"]
    elif name == "entry":
        meta["files"]["model.safetensors"] = {"bytes": "many"}


@pytest.mark.parametrize(
    "damage",
    [
        "drop:files",  # the case
        "drop:step",
        "drop:world_size",
        "drop:optimizer_format",
        "drop:arch",
        "unlist:model.safetensors",
        "unlist:training_state.pt",
        "unlist:optimizer.pt",
        "unlist:rng_state_rank0.pt",
        "entry:",
        "no_version:",
        'version:"2"',
        "version:3",
    ],
)
def test_a_manifest_is_trusted_by_its_format_version_never_by_a_missing_field(tiny, tmp_path, capsys, damage):
    """Issue 23: a manifest saying format_version 2 that had lost its file list was trusted unverified (as if it
    were format 1), and a safetensors cut in half was loaded for resume. The version decides what must be there: a
    manifest missing a field or a file entry is damaged, and resume falls back loudly past it."""
    model = load_policy(tiny)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer, processor_source=tiny)
    ckpt = save_checkpoint(tmp_path, 4, model=model, optimizer=optimizer, processor_source=tiny)
    # Cut in half the file the damaged manifest no longer covers (the weights when the whole list is gone): only a
    # manifest read by its version notices. Other damage is to the manifest alone, whose files all verify.
    cut = {"drop:files": "model.safetensors"}.get(damage) or (damage[7:] if damage.startswith("unlist:") else None)
    if cut is not None:
        path = ckpt / cut
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    meta_file = ckpt / "vppo_checkpoint.json"
    meta = json.loads(meta_file.read_text())
    _damage_meta(meta, damage)
    meta_file.write_text(json.dumps(meta))
    problems = verify_checkpoint(ckpt)
    assert problems and all(str(meta_file) in p for p in problems), problems
    with pytest.warns(UserWarning, match="CHECKPOINT DAMAGED"):
        assert find_resumable_checkpoint(tmp_path) == checkpoint_dir(tmp_path, 2)
    assert str(meta_file) in capsys.readouterr().err


def test_a_weights_index_naming_a_shard_the_manifest_does_not_list_is_damaged(tiny, tmp_path):
    model = load_policy(tiny)
    ckpt = save_checkpoint(tmp_path, 2, model=model)
    (ckpt / "model.safetensors").rename(ckpt / "model-00001-of-00001.safetensors")
    (ckpt / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"lm_head.weight": "model-00001-of-00001.safetensors"}})
    )
    meta = json.loads((ckpt / "vppo_checkpoint.json").read_text())
    entry = meta["files"].pop("model.safetensors")
    index = ckpt / "model.safetensors.index.json"
    meta["files"]["model.safetensors.index.json"] = {"bytes": index.stat().st_size, "sha256": _sha(index)}
    (ckpt / "vppo_checkpoint.json").write_text(json.dumps(meta))
    problems = verify_checkpoint(ckpt)
    assert len(problems) == 1 and "model-00001-of-00001.safetensors" in problems[0], problems
    meta["files"]["model-00001-of-00001.safetensors"] = entry  # listed: the same index verifies
    (ckpt / "vppo_checkpoint.json").write_text(json.dumps(meta))
    assert verify_checkpoint(ckpt) == []


def _sha(path: Path) -> str:
    import hashlib

    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_a_save_that_runs_out_of_space_says_so_and_keeps_the_previous_checkpoint(tiny, tmp_path, monkeypatch):
    """Simulated: the optimizer file's write fails with ENOSPC part-way (the real-disk version is the next test)."""
    import errno

    import vppo_recipes.checkpointing as checkpointing

    model = load_policy(tiny)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    first = save_checkpoint(tmp_path, 2, model=model, optimizer=optimizer)
    before = {f.name: f.read_bytes() for f in first.iterdir()}
    real_save = torch.save

    def full_disk(obj, path, *args, **kwargs):
        if str(path).endswith("optimizer.pt"):
            Path(path).write_bytes(b"partial")
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *args, **kwargs)

    monkeypatch.setattr(checkpointing.torch, "save", full_disk)
    with pytest.raises(
        CheckpointWriteError, match=r"checkpoint step 4 not written .*no space left on .*\.tmp_step_000004"
    ):
        save_checkpoint(tmp_path, 4, model=model, optimizer=optimizer)
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step_000002"]
    assert {f.name: f.read_bytes() for f in first.iterdir()} == before
    assert verify_checkpoint(first) == []


def _mount_tmpfs(where: Path, size_bytes: int) -> bool:
    where.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)], capture_output=True, text=True
    )
    return done.returncode == 0


def test_a_save_onto_a_really_full_disk_says_no_space_and_keeps_the_previous_checkpoint(tiny, tmp_path):
    """On a real tmpfs sized for one and a half checkpoints (needs the right to mount, as root in CI has)."""
    model = load_policy(tiny)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    _train_steps(model, optimizer, _batch(model, load_processor(tiny)), 1)  # an optimizer state to save
    probe = save_checkpoint(tmp_path / "probe", 1, model=model, optimizer=optimizer)
    size = sum(f.stat().st_size for f in probe.iterdir())
    disk = tmp_path / "small_disk"
    if not _mount_tmpfs(disk, int(size * 1.5) // 4096 * 4096):
        pytest.skip("mounting a tmpfs is not permitted here; the simulated ENOSPC test above covers the logic")
    try:
        first = save_checkpoint(disk, 2, model=model, optimizer=optimizer)
        with pytest.raises(CheckpointWriteError, match=r"no space left on .*small_disk"):
            save_checkpoint(disk, 4, model=model, optimizer=optimizer)
        assert sorted(p.name for p in (disk / "checkpoints").iterdir()) == ["step_000002"]
        assert verify_checkpoint(first) == [] and find_resumable_checkpoint(disk) == first
    finally:
        subprocess.run(["umount", str(disk)], check=False)


def test_no_checkpoint_and_incomplete_folder_are_reported(tmp_path):
    assert find_latest_checkpoint(tmp_path) is None
    with pytest.raises(ValueError, match="not a complete vppo checkpoint"):
        load_training_state(tmp_path)


def test_checkpoint_of_another_architecture_is_an_error_before_compute(tiny_qwen3):
    with pytest.raises(ValueError, match=r"holds a 'qwen3_vl' model but model\.arch is 'qwen2_5_vl'"):
        check_checkpoint_matches(tiny_qwen3, arch="qwen2_5_vl")


def test_checkpoint_of_another_size_is_an_error_naming_the_fields(tiny, tmp_path):
    bigger = build_tiny_checkpoint(tmp_path / "big", "qwen2_5_vl", hidden_size=128, num_hidden_layers=3)
    check_checkpoint_matches(tiny, arch="qwen2_5_vl", model_dir=tiny)
    with pytest.raises(ValueError) as info:
        check_checkpoint_matches(bigger, arch="qwen2_5_vl", model_dir=tiny)
    assert "text_config.hidden_size: checkpoint 128 vs model.path 64" in str(info.value)
    assert "text_config.num_hidden_layers: checkpoint 3 vs model.path 2" in str(info.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", ["AdamW8bit", "AdamW4bit", "AdamWFp8"])
def test_quantized_optimizer_state_round_trips_through_weights_only_plain_data(name, tmp_path, monkeypatch):
    import torchao.optim

    from vppo_recipes.checkpoint_optimizer import load_sharded_optimizer_state, sharded_optimizer_state

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))

    def build():
        torch.manual_seed(0)
        # 64 x 128 = 8192 elements: quantized (torchao: >= 4096 and a multiple of the block); the bias is not.
        model = torch.nn.Sequential(torch.nn.Linear(128, 64), torch.nn.Tanh(), torch.nn.Linear(64, 1))
        return model, getattr(torchao.optim, name)(model.parameters(), lr=1e-2, weight_decay=0.01)

    def steps(model, optimizer, n):
        for i in range(n):
            x = torch.randn(8, 128, generator=torch.Generator().manual_seed(i))
            model(x).square().mean().backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    model, optimizer = build()
    steps(model, optimizer, 2)
    torch.save(sharded_optimizer_state(model, optimizer), tmp_path / "opt.pt")
    payload = torch.load(tmp_path / "opt.pt", weights_only=True)
    assert payload["state"]["0.weight"]["exp_avg"]["subclass"].startswith("torchao.optim.subclass_")
    assert "tensor" in payload["state"]["0.bias"]["exp_avg"]
    resumed, resumed_opt = build()
    resumed.load_state_dict(model.state_dict())
    load_sharded_optimizer_state(resumed, resumed_opt, payload)
    assert isinstance(resumed_opt.param_groups[0]["lr"], torch.Tensor)  # torchao requires a tensor lr
    steps(model, optimizer, 1)
    steps(resumed, resumed_opt, 1)
    for (k, a), b in zip(model.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), k
    # A fresh optimizer (no state loaded) takes a different step: the comparison above can fail.
    fresh, fresh_opt = build()
    fresh.load_state_dict(resumed.state_dict())
    steps(fresh, fresh_opt, 1)
    steps(resumed, resumed_opt, 1)
    assert not torch.equal(fresh[0].weight, resumed[0].weight)


def test_sharded_optimizer_file_naming_an_unknown_type_is_refused():
    from vppo_recipes.checkpoint_optimizer import load_sharded_optimizer_state, sharded_optimizer_state

    model = torch.nn.Linear(3, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 3)).sum().backward()
    optimizer.step()
    payload = sharded_optimizer_state(model, optimizer)
    payload["state"]["weight"]["exp_avg"] = {"subclass": "os.system", "parts": {}, "attributes": [], "dtensor": False}
    with pytest.raises(ValueError, match=r"unknown optimizer-state type 'os\.system'"):
        load_sharded_optimizer_state(model, torch.optim.AdamW(model.parameters()), payload, where="opt.pt")


@pytest.fixture(scope="module")
def inductor_cache(tmp_path_factory) -> Path:
    """One torch.compile cache for this module's torchao runs (their step compiles per parameter shape)."""
    return tmp_path_factory.mktemp("inductor")


def _run_worker(tiny: Path, out: Path, optimizer: str, cache: Path) -> str:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TORCHINDUCTOR_CACHE_DIR": str(cache)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    proc = subprocess.run(
        [*cmd, __file__, str(tiny), str(out), optimizer], env=env, capture_output=True, text=True, timeout=600
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc.stdout


@pytest.mark.distributed
@pytest.mark.slow
def test_optimizer_state_round_trips_through_a_2_process_fsdp2_checkpoint(tiny, tmp_path, inductor_cache):
    stdout = _run_worker(tiny, tmp_path, "adamw", inductor_cache)
    assert "CKPT-FSDP OK" in stdout, stdout[-3000:]
    meta = json.loads((checkpoint_dir(tmp_path, 2) / "vppo_checkpoint.json").read_text())
    assert meta["optimizer_format"] == "full"


@pytest.mark.distributed
@pytest.mark.slow
def test_torchao_adamw8bit_state_round_trips_per_rank_and_refuses_another_world_size(tiny, tmp_path, inductor_cache):
    stdout = _run_worker(tiny, tmp_path, "adamw8bit", inductor_cache)
    assert "CKPT-FSDP OK" in stdout, stdout[-3000:]
    ckpt = checkpoint_dir(tmp_path, 2)
    meta = json.loads((ckpt / "vppo_checkpoint.json").read_text())
    assert (meta["optimizer_format"], meta["world_size"]) == ("sharded", 2)
    assert sorted(p.name for p in ckpt.glob("optimizer*")) == ["optimizer_rank0.pt", "optimizer_rank1.pt"]
    # Plain data only: readable with weights_only=True without importing torchao's classes.
    shard = torch.load(ckpt / "optimizer_rank0.pt", map_location="cpu", weights_only=True)
    kinds = {e.get("subclass", "tensor") for st in shard["state"].values() for e in st.values()}
    assert "torchao.optim.subclass_8bit.OptimState8bit" in kinds, kinds
    import torchao.optim

    model = load_policy(ckpt)
    with pytest.raises(ValueError, match="sharded over 2 ranks, but this run has 1: resume with the same world size"):
        load_training_state(ckpt, model=model, optimizer=torchao.optim.AdamW8bit(model.parameters(), lr=1e-2))


# ---------------------------------------------------------------- torchrun worker (2 ranks, gloo, FSDP2)


def _full_optim_state(model, optimizer) -> dict:
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    return get_optimizer_state_dict(model, optimizer, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def _comparable_optim_state(model, optimizer, kind: str) -> dict:
    """The state to compare before save / after load: the full one for AdamW; this rank's shard, as plain parts,
    for the quantized torchao states (which cannot be gathered)."""
    from vppo_recipes.checkpoint_optimizer import sharded_optimizer_state

    return _full_optim_state(model, optimizer) if kind == "adamw" else sharded_optimizer_state(model, optimizer)


def _sharded(path: Path, mesh, kind: str):
    from vppo_recipes.sharding import shard_policy

    model = shard_policy(load_policy(path), mesh)
    if kind == "adamw":
        return model, torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.01)
    import torchao.optim

    return model, torchao.optim.AdamW8bit(model.parameters(), lr=1e-2, weight_decay=0.01)


def _assert_same_state(a, b, where=()) -> int:
    """Exact equality of nested optimizer-state data; returns the number of tensors compared."""
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
        return 1
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        return sum(_assert_same_state(a[k], b[k], (*where, k)) for k in a)
    if isinstance(a, (list, tuple)):
        assert len(a) == len(b), where  # set_optimizer_state_dict hands tuples (AdamW's betas) back as lists
        return sum(_assert_same_state(x, y, (*where, i)) for i, (x, y) in enumerate(zip(a, b)))
    assert a == b, (where, a, b)
    return 0


def _worker(tiny_dir: str, out_dir: str, kind: str) -> None:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vppo_recipes.checkpoint_weights import gather_full_state_dict

    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    processor = load_processor(tiny_dir)
    model, optimizer = _sharded(Path(tiny_dir), mesh, kind)
    batch = _batch(model, processor)
    _train_steps(model, optimizer, batch, 2)
    torch.manual_seed(100 + rank)  # a different RNG stream per rank
    ckpt = save_checkpoint(out_dir, 2, model=model, optimizer=optimizer, processor_source=tiny_dir, arch="qwen2_5_vl")
    before = _comparable_optim_state(model, optimizer, kind)
    draw = torch.rand(4)

    resumed, resumed_opt = _sharded(ckpt, mesh, kind)
    load_training_state(ckpt, model=resumed, optimizer=resumed_opt)
    after = _comparable_optim_state(resumed, resumed_opt, kind)
    assert torch.equal(torch.rand(4), draw), f"rank {rank}: RNG not restored"
    # Every rank compares its own shard (sharded format) / rank 0 the full state (AdamW).
    n = _assert_same_state(before, after) if (kind != "adamw" or rank == 0) else 0
    _train_steps(model, optimizer, batch, 1)
    _train_steps(resumed, resumed_opt, batch, 1)
    full_a, full_b = gather_full_state_dict(model), gather_full_state_dict(resumed)
    if rank == 0:
        assert len(before["state"]) > 0 and n > 0
        worst = max((full_a[k] - full_b[k]).abs().max().item() for k in full_a)
        assert worst == 0.0, f"parameters differ after one more step: {worst}"
        print(f"CKPT-FSDP OK {kind} optimizer tensors={n}", flush=True)
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # ENVIRONMENT.md: avoids the rare gloo abort at interpreter exit


if __name__ == "__main__":
    _worker(sys.argv[1], sys.argv[2], sys.argv[3])
