"""`vppo-recipes preflight --config CONFIG`: check a machine, its versions and a config together, before a long run.

    vppo-recipes preflight --config qwen2_5_vl_7b_vppo --out preflight.json        # on the GPU machine
    vppo-recipes preflight --config tiny_vppo.yaml --device cpu                    # the same code at tiny sizes

Five parts, each timed, each "ok", "skipped" (with the reason) or "FAILED" (with the error); one table on stdout and
the same as JSON (`--out`). Any failed part, or the whole run over `--budget-s`, makes the exit status 1. The budget
is checked before each part (and each depth of part 3): a part that would start after it is FAILED, not skipped.

1. environment   torch / CUDA / driver / GPUs, transformers, torchtune, vLLM and flash-attn when importable, vppo.
2. log-prob      the recipe's log-prob kernel (`vppo_core.logprobs_from_hidden`, what `forward.response_logprobs`
                 calls) at the config's LM head ([V, H] of the model's config), in model.dtype, over micro_batch x
                 max_new_tokens positions: forward and forward + backward time and peak memory as ratios to the naive
                 path (full logits, then log_softmax in float32) measured in the same process, and both paths' largest
                 error against float64 on a sample of positions. Fails when the kernel's error exceeds twice the
                 naive path's (+ 1e-6), or is not finite.
3. rl step       one real `RLRecipeDistributed.rl_step` (setup, sampling, grading, the method's no-grad passes,
                 shaping, the update, the weight push: the recipe's own code, in this process, one rank) on a randomly
                 initialised model of the config's architecture at its full width and at two reduced depths (1 and 2
                 decoder layers and vision blocks; built from the config.json values, no download), with the config's
                 micro-batch, group size, dtype, activation checkpointing and lengths; embedded sampler, no online
                 filter (a random model's groups all score 0 and would be filtered out). Peak memory of each (CUDA:
                 torch.cuda.max_memory_allocated; CPU: the process's resident-set high-water mark, coarse) against
                 the planner's peak (`plan.plan_config`) for the same model and the step's own geometry (longest
                 prompt, response and image), and the extrapolation to full depth beside the planner's figure
                 (`compare_to_plan`). On CUDA the part fails when the measured growth per depth step exceeds the
                 planned one by more than 20 %. On CPU the comparison is computed (in the JSON) but marked skipped
                 in the table and not checked: the resident set counts the allocator's caching and first-use
                 allocations, not tensors.
4. fsdp          more than one GPU visible: the same step under torchrun over NCCL on every GPU (FSDP2 at that size)
                 and the time of its weight push to the sampler; skipped otherwise.
5. vllm          vLLM importable: the same step with rollout.engine=vllm twice (engine start, asleep between phases
                 where the platform has sleep mode, a group sampled with an image, the weight update pushed after
                 step 1) and the trainer-sampler agreement of step 2 (after the update) within the recipe's threshold
                 (`rl.step_metrics.AGREEMENT_THRESHOLD` on the mean |lp_sampler - lp_old|); skipped otherwise.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import importlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "DepthComparison",
    "PartResult",
    "compare_to_plan",
    "main",
    "render_table",
    "run_preflight",
    "step_config",
]

MIB = 1024**2
GIB = 1024**3
# The depths of the reduced models (decoder layers = vision blocks): two points give the growth per depth step.
DEPTHS = (1, 2)
# On CUDA, measured growth per depth step above planned x (1 + this) fails part 3: the planner under-estimates.
PLAN_TOLERANCE = 0.20
OK, SKIPPED, FAILED = "ok", "skipped", "FAILED"


@dataclass
class PartResult:
    """One row of the preflight table (and one entry of its JSON)."""

    part: str
    status: str  # ok | skipped | FAILED
    seconds: float
    summary: str  # one line for the table: the figures, the skip reason or the error
    details: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------------------------
# Memory meters: the same interface on CUDA and CPU
# ---------------------------------------------------------------------------------------------------------------


def _rss_kib(name: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(name + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{name} not in /proc/self/status")


@contextlib.contextmanager
def peak_memory(device: str) -> Iterator[dict[str, int]]:
    """Measures the peak extra memory of the `with` body: yields a dict whose "peak_bytes" is set on exit.

    CUDA: torch.cuda.max_memory_allocated (reset on entry) minus memory_allocated on entry. CPU: the resident-set
    high-water mark (VmHWM, reset on entry by writing 5 to /proc/self/clear_refs, as benchmarks/bench_core.py
    does) minus the resident set on entry: coarse, it counts the allocator's caching and non-tensor memory.
    """
    import gc

    import torch

    gc.collect()
    out: dict[str, int] = {}
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        yield out
        torch.cuda.synchronize()
        out["peak_bytes"] = torch.cuda.max_memory_allocated() - before
    else:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        before = _rss_kib("VmRSS")
        yield out
        out["peak_bytes"] = (_rss_kib("VmHWM") - before) * 1024


def _sync(device: str) -> None:
    import torch

    if device == "cuda":
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------------------------
# 1. environment
# ---------------------------------------------------------------------------------------------------------------


def _version(module: str) -> str | None:
    """`module.__version__` when importable, else None (an import error of an installed package is raised)."""
    if importlib.util.find_spec(module) is None:
        return None
    return str(getattr(importlib.import_module(module), "__version__", "unknown"))


def _nvidia_driver() -> str | None:
    if shutil.which("nvidia-smi") is None:
        return None
    proc = subprocess.run(
        ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True
    )
    return proc.stdout.strip().splitlines()[0] if proc.returncode == 0 and proc.stdout.strip() else None


def environment_part(device: str) -> dict[str, Any]:
    """Versions and devices: {"python", "torch", "cuda", "driver", "gpus": [name, GiB]..., "transformers", ...}."""
    from importlib.metadata import PackageNotFoundError, version

    import torch

    env: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "driver": _nvidia_driver(),
        "gpus": [
            [torch.cuda.get_device_name(i), round(torch.cuda.get_device_properties(i).total_memory / GIB, 1)]
            for i in range(torch.cuda.device_count())
        ],
        "device": device,
    }
    for name in ("transformers", "torchtune", "torchao", "vllm", "flash_attn"):
        env[name] = _version(name)
    for dist in ("vppo-core", "vppo-rollout", "vppo-eval", "vppo-recipes"):
        try:
            env[dist] = version(dist)
        except PackageNotFoundError:
            env[dist] = None
    if device == "cuda" and not env["gpus"]:
        raise RuntimeError("--device cuda but torch sees no GPU (torch.cuda.is_available() is False)")
    return env


def _environment_summary(env: Mapping[str, Any]) -> str:
    gpus = ", ".join(f"{n} {g} GiB" for n, g in env["gpus"]) or "no GPU"
    optional = ", ".join(f"{k} {env[k] or 'absent'}" for k in ("vllm", "flash_attn"))
    return (
        f"torch {env['torch']} (CUDA {env['cuda'] or '-'}, driver {env['driver'] or '-'}), {gpus}; "
        f"transformers {env['transformers']}, torchtune {env['torchtune']}; {optional}; vppo-recipes {env['vppo-recipes']}"
    )


# ---------------------------------------------------------------------------------------------------------------
# 2. the log-prob kernel against the naive path
# ---------------------------------------------------------------------------------------------------------------


def naive_logprobs(hidden, weight, labels, temperature: float):
    """The path the kernel replaces: full [N, V] logits in the weight's dtype, float32 log_softmax, gather. [N]."""
    import torch

    logits = torch.nn.functional.linear(hidden, weight)
    return torch.log_softmax(logits.float() / temperature, -1).gather(-1, labels[:, None])[:, 0]


def float64_logprobs(hidden, weight, labels, temperature: float):
    """The reference: the same log-probs computed in float64 from the same (rounded) inputs. [N]."""
    import torch

    logits = hidden.double() @ weight.double().T / temperature
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None])[:, 0]


def _timed(fn: Callable[[], Any], device: str, repeats: int) -> dict[str, float]:
    """Peak extra memory of one call, then the fastest of `repeats` calls."""
    fn()  # warm-up (kernel selection, allocator)
    with peak_memory(device) as mem:
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return {"peak_bytes": mem["peak_bytes"], "time_s": min(times)}


def kernel_part(
    *, hidden_size: int, vocab: int, positions: int, dtype: str, chunk_size: int, temperature: float, device: str,
    sample: int = 256, repeats: int = 3, seed: int = 0,
) -> dict[str, Any]:  # fmt: skip
    """The recipe's kernel against the naive path at [positions, hidden_size] x [vocab, hidden_size] in `dtype`.

    Returns {"forward": {"naive", "kernel", "time_ratio", "memory_ratio"}, "forward_backward": {...},
    "error": {"kernel", "naive", "positions"}} (ratios: kernel / naive, < 1 is better)."""
    import torch

    from vppo_core.logprobs import logprobs_from_hidden

    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]
    g = torch.Generator().manual_seed(seed)
    # Scales of a trained LM head: logits of a few units, so the float32 log-sum-exp is exercised.
    h = (torch.randn(positions, hidden_size, generator=g)).to(device=device, dtype=torch_dtype)
    w = (torch.randn(vocab, hidden_size, generator=g) / hidden_size**0.5).to(device=device, dtype=torch_dtype)
    labels = torch.randint(0, vocab, (positions,), generator=g).to(device)

    def kernel(a, b):
        # [1, N, H]: the kernel takes [B, L, H] and flattens the rows itself, so one row of N positions is the same
        return logprobs_from_hidden(a[None], b, labels[None], temperature=temperature, chunk_size=chunk_size)[0]

    def naive(a, b):
        return naive_logprobs(a, b, labels, temperature)

    out: dict[str, Any] = {}
    with torch.no_grad():
        fwd = {name: _timed(lambda f=f: f(h, w), device, repeats) for name, f in (("naive", naive), ("kernel", kernel))}
    hg, wg = h.detach().requires_grad_(), w.detach().requires_grad_()

    def backward(f):
        def run():
            hg.grad = wg.grad = None
            f(hg, wg).sum().backward()

        return run

    fb = {name: _timed(backward(f), device, repeats) for name, f in (("naive", naive), ("kernel", kernel))}
    for key, res in (("forward", fwd), ("forward_backward", fb)):
        out[key] = {
            **res,
            "time_ratio": res["kernel"]["time_s"] / max(res["naive"]["time_s"], 1e-9),
            "memory_ratio": res["kernel"]["peak_bytes"] / max(res["naive"]["peak_bytes"], 1),
        }
    idx = torch.randperm(positions, generator=g)[: min(sample, positions)].to(device)
    with torch.no_grad():
        ref = float64_logprobs(h[idx], w, labels[idx], temperature)
        errors = {
            "kernel": float((kernel(h, w)[idx].double() - ref).abs().max()),
            "naive": float((naive(h, w)[idx].double() - ref).abs().max()),
        }
    out["error"] = {**errors, "positions": int(idx.numel())}
    return out


def kernel_verdict(error: Mapping[str, float]) -> str | None:
    """None when the kernel's float64 error is finite and at most twice the naive path's + 1e-6, else the problem."""
    if not math.isfinite(error["kernel"]):
        return f"the kernel's log-probs are not finite (max error {error['kernel']})"
    if error["kernel"] > 2 * error["naive"] + 1e-6:
        return f"the kernel's max error vs float64 {error['kernel']:.2e} > 2 x the naive path's {error['naive']:.2e}"
    return None


def _kernel_summary(k: Mapping[str, Any], device: str) -> str:
    """One line; on CPU without the memory ratios (the resident set measures the allocator, not the tensors, at
    these sizes: they stay in the JSON)."""
    f, fb, e = k["forward"], k["forward_backward"], k["error"]
    mem = (lambda r: f" mem x{r['memory_ratio']:.2f}") if device == "cuda" else (lambda r: "")
    cpu = "" if device == "cuda" else "; memory ratios skipped on CPU (resident set, not tensors)"
    return (
        f"fwd time x{f['time_ratio']:.2f}{mem(f)}; fwd+bwd time x{fb['time_ratio']:.2f}{mem(fb)} (kernel/naive); "
        f"max abs error vs fp64 {e['kernel']:.1e} (naive {e['naive']:.1e}){cpu}"
    )


# ---------------------------------------------------------------------------------------------------------------
# 3. one real RL step at reduced depth, against the planner
# ---------------------------------------------------------------------------------------------------------------


def reduced_depth_config(hf_config, depth: int):
    """A copy of a Qwen2.5-VL / Qwen3-VL transformers config with `depth` decoder layers and `depth` vision blocks;
    the per-layer lists follow (layer_types cut, the vision tower's full-attention / deepstack indexes moved into
    range). Every width (hidden, heads, vocabulary, MLP) is kept."""
    cfg = copy.deepcopy(hf_config)
    tc, vc = cfg.text_config, cfg.vision_config
    tc.num_hidden_layers = depth
    if getattr(tc, "layer_types", None) is not None:
        tc.layer_types = list(tc.layer_types)[:depth]
    if getattr(tc, "max_window_layers", None) is not None:
        tc.max_window_layers = min(tc.max_window_layers, depth)
    vc.depth = depth
    for key in ("fullatt_block_indexes", "deepstack_visual_indexes"):
        if getattr(vc, key, None):
            setattr(vc, key, sorted({min(i, depth - 1) for i in getattr(vc, key)}))
    return cfg


def _tokenizer_source(model_path: str, arch: str, work: Path) -> tuple[Path, dict[str, int]]:
    """A folder with tokenizer + processor files for `model_path`, and the token ids the model config must name.

    model.path a local folder: its own files and ids. Otherwise (a full-size config run before the download): the
    offline tiny tokenizer and processor of `vppo_rollout.tiny` (its ids are smaller than the real vocabulary; the
    embedding keeps its full size, as real Qwen embeddings are larger than their tokenizers)."""
    local = Path(model_path).expanduser()
    if (local / "config.json").is_file():
        return local, {}
    from vppo_rollout.tiny import build_tiny_checkpoint

    tiny = build_tiny_checkpoint(work / "tokenizer_source", arch, seed=0)
    tiny_cfg = json.loads((tiny / "config.json").read_text())
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    ids = {k: tiny_cfg[k] for k in keys}
    text = tiny_cfg["text_config"]
    ids.update({f"text.{k}": text[k] for k in ("bos_token_id", "eos_token_id", "pad_token_id")})
    return tiny, ids


MODEL_FILES = ("config.json", "generation_config.json")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


def build_reduced_model(
    model_path: str, arch: str, depth: int, out: Path, work: Path, dtype: str, seed: int = 0
) -> Path:
    """Save a randomly initialised model of `model_path`'s architecture (local config.json, else the stored one) at
    full width and `depth` layers, with a tokenizer and processor, as an HF folder at `out`; returns `out`."""
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen3VLForConditionalGeneration

    from vppo_recipes.plan import load_arch_config

    hf = reduced_depth_config(load_arch_config(model_path, arch), depth)
    source, ids = _tokenizer_source(model_path, arch, work)
    for key, value in ids.items():
        target, name = (hf.text_config, key[5:]) if key.startswith("text.") else (hf, key)
        setattr(target, name, value)
    out.mkdir(parents=True, exist_ok=True)
    for f in source.iterdir():  # tokenizer, processor, chat template; not the weights or the model config
        if f.is_file() and f.name not in MODEL_FILES and not f.name.endswith((*WEIGHT_SUFFIXES, ".index.json")):
            shutil.copy2(f, out / f.name)
    cls = Qwen2_5_VLForConditionalGeneration if arch == "qwen2_5_vl" else Qwen3VLForConditionalGeneration
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = cls(hf)
    model.to({"bfloat16": torch.bfloat16, "float32": torch.float32}[dtype]).save_pretrained(out)
    del model
    return out


def synthetic_image_size(arch: str, max_pixels: int | None) -> int:
    """Side of the square synthetic images: the largest 2x2 grid of whole merged patches within max_pixels (the
    step then carries images as large as the config allows); the synthetic default 56 / 64 px when it is null."""
    merged = 28 if arch == "qwen2_5_vl" else 32  # patch 14 / 16, merge 2
    if not max_pixels:
        return 2 * merged
    return max(1, int(math.isqrt(int(max_pixels)) // (2 * merged))) * 2 * merged


def step_config(raw, *, model_path: Path, task: Path, output_dir: Path, engine: str = "transformers", world: int = 1):
    """The config of the preflight's step: `raw` (the user's config) with the model, data, output and logging
    redirected to the preflight's own folders, one rank per process (`world` ranks in all), one mini-batch of
    ceil(micro_batch / group_size) prompts, no online filter, no validation, no resume; everything else (method,
    micro-batch, group size, lengths, dtype, activation checkpointing, loss, optimizer) as in `raw`. Validated."""
    from omegaconf import OmegaConf

    from vppo_recipes.config_schema import validate_config

    cfg = OmegaConf.create(OmegaConf.to_container(raw, resolve=False))
    prompts = max(1, math.ceil(int(cfg.batch.micro_batch_size) / int(cfg.rollout.group_size))) * world
    for key, value in {
        "output_dir": str(output_dir),
        "model.path": str(model_path),
        "data.source": str(task),
        "data.split": "train",
        "data.columns": {"question": "problem", "answer": "answer", "images": "images"},
        "validation.every_n_steps": 0,
        "validation.source": None,
        "world.nnodes": 1,
        "world.nproc_per_node": world,
        "world.hsdp_replicas": 1,
        "rollout.engine": engine,
        "rollout.online_filter": False,
        "rollout.batch_prompts": prompts,
        "batch.update_prompts": prompts,
        "training.resume": "never",
        "training.max_steps": 2,
        "metric_logger": {
            "_component_": "vppo_recipes.metric_logging.JsonlLogger",
            "log_dir": str(output_dir / "logs"),
        },
    }.items():
        OmegaConf.update(cfg, key, value, merge=False)
    return validate_config(cfg, "rl")


@dataclass(frozen=True)
class StepGeometry:
    """The largest shapes one step's micro-batches had (what the planner is asked about)."""

    prompt: int  # prompt tokens incl. image tokens, padded
    response: int  # response tokens, padded
    image_pixels: int  # pixels of the largest image after the processor (patches x patch^2)
    micro_batch: int


def geometry_of(minis, patch_size: int) -> StepGeometry:
    """StepGeometry of `prepare_minibatches`' micro-batches."""
    mbs = [mb for mini in minis for mb in mini]
    pixels = 0
    for mb in mbs:
        grid = mb.inputs.get("image_grid_thw")
        if grid is not None and grid.numel():
            pixels = max(pixels, int((grid[:, 1] * grid[:, 2]).max()) * patch_size**2)
    return StepGeometry(
        prompt=max(int(mb.prompt_length) for mb in mbs),
        response=max(int(mb.responses.shape[1]) for mb in mbs),
        image_pixels=pixels,
        micro_batch=max(int(mb.responses.shape[0]) for mb in mbs),
    )


@contextlib.contextmanager
def _one_rank_group(device: str) -> Iterator[None]:
    """A 1-rank process group for a recipe run in this process (the recipe's cleanup destroys it); RANK / WORLD_SIZE
    / LOCAL_RANK as the recipe's own 1-rank path sets them, restored after."""
    import torch.distributed as dist

    saved = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE")}
    if dist.is_initialized():
        raise RuntimeError("preflight: a process group already exists in this process; run the preflight alone")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1)
    os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1"})
    try:
        yield
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def run_recipe_steps(cfg, steps: int, device: str, *, in_process: bool = True) -> dict[str, Any]:
    """`steps` real `rl_step`s of the RL recipe on config `cfg` (setup included) in this process; returns
    {"metrics": [per step], "geometry": StepGeometry of the first step, "peak_bytes", "seconds"}."""
    import vppo_recipes.rl.rl_distributed as rl

    seen: list = []
    with contextlib.ExitStack() as stack:
        if in_process:
            stack.enter_context(_one_rank_group(device))
        t = time.perf_counter()
        with peak_memory(device) as mem:
            recipe = rl.RLRecipeDistributed(cfg)
            if recipe.device.type != device:
                raise RuntimeError(
                    f"the recipe chose device {recipe.device.type!r}, the preflight was asked for {device!r}"
                )
            recipe.setup(cfg)
            prepare = recipe.prepare_minibatches

            def recording(groups):  # the instance attribute shadows the method for this recipe only
                minis, counts = prepare(groups)
                seen.append(minis)
                return minis, counts

            recipe.prepare_minibatches = recording
            metrics = []
            try:
                for _ in range(steps):
                    m = recipe.rl_step()
                    if m is None:
                        raise RuntimeError("the recipe ran out of data before the preflight's steps")
                    metrics.append(m)
            finally:
                recipe.cleanup()
        seconds = time.perf_counter() - t
    if not seen:
        raise RuntimeError("the step built no micro-batches")
    patch = int(recipe.model_config.vision_config.patch_size)
    return {
        "metrics": metrics,
        "geometry": geometry_of(seen[0], patch),
        "peak_bytes": mem["peak_bytes"],
        "seconds": seconds,
    }


@dataclass(frozen=True)
class DepthComparison:
    """Measured against planned peak memory at two reduced depths, and the extrapolation to full depth (bytes)."""

    depths: tuple[int, int]
    measured: tuple[int, int]
    planned: tuple[int, int]
    full_depth: int
    planned_full: int
    measured_per_depth: float  # growth of the measured peak per depth step
    planned_per_depth: float
    ratio: float  # measured_per_depth / planned_per_depth
    extrapolated_full: float  # measured peak at the deeper model + the planner's growth to full depth x ratio


def compare_to_plan(
    depths: tuple[int, int], measured: tuple[int, int], planned: tuple[int, int], full_depth: int, planned_full: int
) -> DepthComparison:
    """The planner against the measurement: growth per depth step of each (slope between the two depths), their
    ratio, and the full-depth extrapolation `measured[1] + ratio * (planned_full - planned[1])`: the planner says how
    memory grows from the deeper reduced model to the full one (decoder layers and vision blocks may differ in
    number there), the measurement says by how much the planner's growth is off."""
    (d1, d2), (m1, m2), (p1, p2) = depths, measured, planned
    if d2 <= d1:
        raise ValueError(f"compare_to_plan: depths must increase, got {depths}")
    measured_slope, planned_slope = (m2 - m1) / (d2 - d1), (p2 - p1) / (d2 - d1)
    if planned_slope <= 0:
        raise ValueError(f"compare_to_plan: the planned peak does not grow with depth ({planned})")
    ratio = measured_slope / planned_slope
    return DepthComparison(
        depths=(d1, d2), measured=(m1, m2), planned=(p1, p2), full_depth=full_depth, planned_full=planned_full,
        measured_per_depth=measured_slope, planned_per_depth=planned_slope, ratio=ratio,
        extrapolated_full=m2 + ratio * (planned_full - p2),
    )  # fmt: skip


def plan_for_step(cfg, geometry: StepGeometry, model_path: str, gpu_gib: float) -> int:
    """The planner's peak bytes (one rank) for config `cfg` with `model_path`'s architecture at the step's geometry:
    prompt and response lengths and image pixels as the step had them."""
    from omegaconf import OmegaConf

    from vppo_recipes.plan import plan_config

    plain = OmegaConf.to_container(cfg, resolve=True)
    plain["model"]["path"] = model_path
    plain["data"]["max_prompt_length"] = geometry.prompt
    plain["rollout"]["max_new_tokens"] = geometry.response
    plain["model"]["max_pixels"] = max(geometry.image_pixels, 1)
    return plan_config(plain, name="preflight", gpu_gib=gpu_gib).peak


def synthetic_task(raw, work: Path) -> Path:
    """work/task: 16 synthetic rows (with VAPO's claim columns) at images as large as model.max_pixels allows;
    built once, shared by parts 3-5."""
    task = work / "task"
    if not task.is_dir():
        from vppo_eval.synthetic import build_visual_task

        size = synthetic_image_size(str(raw.model.arch), raw.model.max_pixels)
        build_visual_task(task, n_train=16, n_test=0, seed=0, image_size=size, claims=20)
    return task


def rl_step_part(raw, *, device: str, work: Path, deadline: float) -> tuple[str, str, dict[str, Any]]:
    """Part 3 (module docstring): (status, summary, details)."""
    import torch

    arch, dtype = str(raw.model.arch), str(raw.model.dtype)
    task = synthetic_task(raw, work)
    runs: dict[int, dict[str, Any]] = {}
    for depth in DEPTHS:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the budget ran out before the depth-{depth} step")
        folder = build_reduced_model(str(raw.model.path), arch, depth, work / f"model_d{depth}", work, dtype)
        cfg = step_config(raw, model_path=folder, task=task, output_dir=work / f"run_d{depth}")
        runs[depth] = run_recipe_steps(cfg, 1, device)
        for f in folder.iterdir():  # the weights go; config.json stays for the planner
            if f.name.endswith(WEIGHT_SUFFIXES):
                f.unlink()
    gpu_gib = torch.cuda.get_device_properties(0).total_memory / GIB if device == "cuda" else 80.0
    geometry = runs[DEPTHS[1]]["geometry"]
    plan_cfg = step_config(raw, model_path=work / "model_d1", task=task, output_dir=work / "plan")
    planned = tuple(plan_for_step(plan_cfg, geometry, str(work / f"model_d{d}"), gpu_gib) for d in DEPTHS)
    planned_full = plan_for_step(plan_cfg, geometry, str(raw.model.path), gpu_gib)
    from vppo_recipes.plan import load_arch_config

    full_depth = int(load_arch_config(str(raw.model.path), arch).text_config.num_hidden_layers)
    comparison = compare_to_plan(
        DEPTHS, tuple(runs[d]["peak_bytes"] for d in DEPTHS), planned, full_depth, planned_full
    )
    details = {
        "geometry": dataclasses.asdict(geometry),
        "image_size_px": synthetic_image_size(arch, raw.model.max_pixels),
        "steps": {
            str(d): {
                "seconds": round(runs[d]["seconds"], 2),
                "peak_bytes": runs[d]["peak_bytes"],
                **{
                    k: runs[d]["metrics"][0].get(k)
                    for k in ("loss", "grad_norm", "optimizer_steps", "response/length_mean")
                },
                "phase_seconds": {k: v for k, v in runs[d]["metrics"][0].items() if k.startswith("time/")},
            }
            for d in DEPTHS
        },
        "comparison": dataclasses.asdict(comparison),
        "memory_measure": "torch.cuda.max_memory_allocated" if device == "cuda" else "resident-set high-water mark",
    }
    steps = ", ".join(f"depth {d} {runs[d]['seconds']:.1f} s" for d in DEPTHS)
    planned_text = (
        f"planned per depth step {comparison.planned_per_depth / MIB:.1f} MiB, full depth {full_depth} "
        f"{planned_full / GIB:.2f} GiB (1 rank)"
    )
    summary = f"T={geometry.prompt}+{geometry.response} mb={geometry.micro_batch}; steps: {steps}; "
    if device != "cuda":
        # The same comparison is computed (details["comparison"]) but not checked: the resident set is the only
        # peak counter a CPU has, and it is dominated by first-use allocations and the allocator's caching.
        details["memory_check"] = (
            "skipped on CPU: the resident-set high-water mark counts allocator caching and first-use allocations, "
            f"not tensors (measured {comparison.measured_per_depth / MIB:+.1f} MiB per depth step)"
        )
        return OK, summary + planned_text + "; measured-vs-plan skipped on CPU (resident set, not tensors)", details
    summary += (
        f"per depth step measured {comparison.measured_per_depth / MIB:.1f} MiB vs planned "
        f"{comparison.planned_per_depth / MIB:.1f} MiB (x{comparison.ratio:.2f}); full depth {full_depth}: "
        f"extrapolated {comparison.extrapolated_full / GIB:.2f} GiB vs plan {planned_full / GIB:.2f} GiB (1 rank)"
    )
    details["memory_check"] = f"measured growth per depth step <= planned x {1 + PLAN_TOLERANCE:g}"
    if comparison.ratio > 1 + PLAN_TOLERANCE:
        return FAILED, summary + f" [planner under-estimates by more than {PLAN_TOLERANCE:.0%}]", details
    return OK, summary, details


# ---------------------------------------------------------------------------------------------------------------
# 4. FSDP2 over NCCL on every visible GPU; 5. vLLM
# ---------------------------------------------------------------------------------------------------------------


def fsdp_part(raw, *, device: str, procs: int, work: Path, timeout_s: float) -> tuple[str, str, dict[str, Any]]:
    """Part 4: the depth-2 step under torchrun on `procs` ranks (NCCL on CUDA, gloo on CPU: the same code) through
    `python -m vppo_recipes.preflight --fsdp-worker`; its peak memory and the weight push's seconds (rank 0)."""
    arch, dtype = str(raw.model.arch), str(raw.model.dtype)
    task = synthetic_task(raw, work)
    folder = build_reduced_model(str(raw.model.path), arch, DEPTHS[1], work / "model_fsdp", work, dtype)
    cfg = step_config(raw, model_path=folder, task=task, output_dir=work / "run_fsdp", world=procs)
    from omegaconf import OmegaConf

    cfg_file, out = work / "fsdp.yaml", work / "fsdp_result.json"
    OmegaConf.save(cfg, cfg_file)
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
        "-m", "vppo_recipes.preflight", "--fsdp-worker", str(cfg_file), str(out), "--device", device,
    ]  # fmt: skip
    env = dict(os.environ)
    if device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=max(timeout_s, 1), env=env)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"torchrun exited with {proc.returncode}:\n{proc.stderr[-3000:]}")
    result = json.loads(out.read_text())
    m = result["metrics"][0]
    summary = (
        f"{procs} ranks ({'NCCL' if device == 'cuda' else 'gloo'}), depth {DEPTHS[1]}: step {result['seconds']:.1f} s, "
        f"weight push {m.get('time/weight_sync_s', float('nan')):.2f} s, rank-0 peak {result['peak_bytes'] / GIB:.2f} GiB"
    )
    return OK, summary, result


def _fsdp_worker(cfg_file: str, out: str, device: str) -> None:
    """One torchrun rank of part 4: the recipe joins torchrun's group itself; rank 0 writes the result."""
    import torch.distributed as dist
    from omegaconf import OmegaConf

    from vppo_recipes.config_schema import validate_config

    cfg = validate_config(OmegaConf.load(cfg_file), "rl")
    rank = int(os.environ["RANK"])
    result = run_recipe_steps(cfg, 1, device, in_process=False)  # the recipe's cleanup destroys the group
    if rank == 0:
        result["geometry"] = dataclasses.asdict(result["geometry"])
        Path(out).write_text(json.dumps(result, default=float))
    assert not dist.is_initialized()
    # Known gloo exit-time abort (ENVIRONMENT.md): skip C++ static destructors once all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def vllm_part(raw, *, device: str, work: Path) -> tuple[str, str, dict[str, Any]]:
    """Part 5: two steps with rollout.engine=vllm at depth 1 (the engine starts, sleeps where it can, samples the
    groups with their images, takes step 1's weights); step 2's trainer-sampler agreement is of the updated weights."""
    from vppo_recipes.rl.step_metrics import AGREEMENT_THRESHOLD

    arch, dtype = str(raw.model.arch), str(raw.model.dtype)
    task = synthetic_task(raw, work)
    folder = build_reduced_model(str(raw.model.path), arch, DEPTHS[0], work / "model_vllm", work, dtype)
    cfg = step_config(raw, model_path=folder, task=task, output_dir=work / "run_vllm", engine="vllm")
    run = run_recipe_steps(cfg, 2, device)
    m = run["metrics"][1]
    mean, largest = m["rollout/logprob_abs_diff_mean"], m["rollout/logprob_abs_diff_max"]
    above = m["rollout/logprob_frac_above_1e-3"]
    summary = (
        f"2 steps on vLLM: after the weight update mean abs(lp_sampler - lp_trainer) {mean:.1e} (max {largest:.1e}, "
        f"{above:.1%} of tokens above {AGREEMENT_THRESHOLD:g}); weight push {m.get('time/weight_sync_s', float('nan')):.2f} s"
    )
    details = {"metrics": run["metrics"], "seconds": run["seconds"], "threshold": AGREEMENT_THRESHOLD}
    if not (mean <= AGREEMENT_THRESHOLD):
        return FAILED, summary + f" [mean above the recipe's threshold {AGREEMENT_THRESHOLD:g}]", details
    return OK, summary, details


# ---------------------------------------------------------------------------------------------------------------
# The run: parts in order, a table, JSON
# ---------------------------------------------------------------------------------------------------------------


def _run_part(name: str, fn: Callable[[], tuple[str, str, dict[str, Any]]]) -> PartResult:
    """Run one part; an exception is that part's FAILED row (the error's type and message), never lost."""
    t = time.perf_counter()
    try:
        status, summary, details = fn()
    except Exception as e:  # every failure becomes the part's row; the exit status says it
        status, summary, details = FAILED, f"{type(e).__name__}: {e}".splitlines()[0][:300], {"error": repr(e)[-3000:]}
    return PartResult(name, status, round(time.perf_counter() - t, 2), summary, details)


def _skip(reason: str) -> Callable[[], tuple[str, str, dict[str, Any]]]:
    return lambda: (SKIPPED, reason, {"reason": reason})


def run_preflight(
    config: Path,
    overrides: Sequence[str] = (),
    *,
    device: str,
    budget_s: float,
    work: Path,
    fsdp_procs: int | None = None,
) -> list[PartResult]:
    """The five parts (module docstring) for the RL config at `config` with its `key=value` overrides (read as
    `vppo-recipes run` reads them), in order, within `budget_s` seconds: a part that would start after the budget is
    spent is FAILED (budget), not skipped."""
    import torch

    from vppo_recipes.plan import load_arch_config

    deadline = time.monotonic() + budget_s
    from vppo_recipes.cli import load_run_config

    raw = load_run_config(["--config", str(config), *overrides])
    if "rollout" not in raw:
        raise SystemExit(f"vppo-recipes preflight: {config} is not an RL config (no `rollout` section)")
    results = [_run_part("1 environment", lambda: (OK, _environment_summary(env := environment_part(device)), env))]

    def kernel():
        hf = load_arch_config(str(raw.model.path), str(raw.model.arch)).text_config
        positions = int(raw.batch.micro_batch_size) * int(raw.rollout.max_new_tokens)
        k = kernel_part(
            hidden_size=hf.hidden_size, vocab=hf.vocab_size, positions=positions, dtype=str(raw.model.dtype),
            chunk_size=int(raw.loss.chunk_size), temperature=float(raw.rollout.temperature), device=device,
        )  # fmt: skip
        k["shape"] = {
            "positions": positions,
            "hidden": hf.hidden_size,
            "vocab": hf.vocab_size,
            "dtype": str(raw.model.dtype),
        }
        problem = kernel_verdict(k["error"])
        summary = f"[{positions}, {hf.hidden_size}] x V={hf.vocab_size} {raw.model.dtype}: " + _kernel_summary(
            k, device
        )
        return (FAILED, summary + f" [{problem}]", k) if problem else (OK, summary, k)

    gpus = torch.cuda.device_count() if device == "cuda" else 0
    procs = fsdp_procs if fsdp_procs is not None else (gpus if gpus > 1 else None)
    vllm_found = importlib.util.find_spec("vllm") is not None
    parts: list[tuple[str, Callable[[], tuple[str, str, dict[str, Any]]]]] = [
        ("2 log-prob kernel", kernel),
        ("3 RL step vs plan", lambda: rl_step_part(raw, device=device, work=work, deadline=deadline)),
        (
            "4 FSDP2 + weight sync",
            (lambda: fsdp_part(raw, device=device, procs=procs, work=work, timeout_s=deadline - time.monotonic()))
            if procs
            else _skip(f"{gpus} GPU(s) visible: FSDP2 over NCCL needs more than one"),
        ),
        (
            "5 vLLM engine",
            (lambda: vllm_part(raw, device=device, work=work))
            if vllm_found
            else _skip("vLLM is not importable here (install it to check the engine)"),
        ),
    ]
    for name, fn in parts:
        if time.monotonic() > deadline:
            results.append(PartResult(name, FAILED, 0.0, f"not started: the budget of {budget_s:g} s was spent"))
            continue
        results.append(_run_part(name, fn))
    return results


def render_table(results: Sequence[PartResult]) -> str:
    """The table: part | status | seconds | what it found (markdown)."""
    lines = ["| part | status | s | result |", "|---|---|---:|---|"]
    lines += [f"| {r.part} | {r.status} | {r.seconds:.1f} | {r.summary.replace('|', '/')} |" for r in results]
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    """The arguments of `vppo-recipes preflight` (see `main`)."""
    ap = argparse.ArgumentParser(prog="vppo-recipes preflight", description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", help="an RL config: a YAML file or a shipped name (tiny_vppo, qwen2_5_vl_7b_vppo)")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the config, as `vppo-recipes run` takes them")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda when torch sees a GPU")
    ap.add_argument("--out", default="preflight.json", help="the table as JSON (default preflight.json)")
    ap.add_argument("--budget-s", type=float, default=600.0, help="time budget in seconds for all parts (default 600)")
    ap.add_argument("--work-dir", default=None, help="scratch folder (default: a temporary one, deleted after)")
    ap.add_argument(
        "--fsdp-procs", type=int, default=None,
        help="run part 4 on this many ranks even on CPU (gloo; default: every GPU when more than one is visible)",
    )  # fmt: skip
    ap.add_argument("--fsdp-worker", nargs=2, help=argparse.SUPPRESS)
    return ap


def main(argv: Sequence[str] | None = None) -> int:
    """`vppo-recipes preflight --config CONFIG [key=value ...] [--device cpu|cuda] [--out preflight.json]
    [--budget-s 600]`.

    Exit status 0: every part ok or skipped within the budget; 1: a part FAILED or the budget was exceeded; 2: the
    config or an override cannot be read."""
    ap = build_parser()
    args = ap.parse_intermixed_args(argv)  # overrides before or after the flags
    if args.fsdp_worker:
        _fsdp_worker(*args.fsdp_worker, args.device or "cuda")
        return 0
    if not args.config:
        ap.error("--config is required")
    import torch

    from vppo_recipes.cli import load_run_config, resolve_config

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu" and torch.cuda.is_available():
        raise SystemExit(
            "vppo-recipes preflight --device cpu: torch sees a GPU and the recipe would use it; "
            "run with CUDA_VISIBLE_DEVICES= (`vppo-recipes preflight` sets it for you)"
        )
    from vppo_recipes.config_schema import ConfigError

    config = resolve_config(args.config)
    try:
        load_run_config(["--config", str(config), *args.overrides])  # a bad override: one message, before any part
    except ConfigError as e:
        print(f"vppo-recipes preflight: {e}", file=sys.stderr)
        return 2
    t = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = (
            Path(args.work_dir)
            if args.work_dir
            else Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="vppo_preflight_")))
        )
        work.mkdir(parents=True, exist_ok=True)
        results = run_preflight(
            config, args.overrides, device=device, budget_s=args.budget_s, work=work, fsdp_procs=args.fsdp_procs
        )
    elapsed = time.perf_counter() - t
    over = elapsed > args.budget_s
    print(render_table(results))
    verdict = "FAILED" if over or any(r.status == FAILED for r in results) else "passed"
    print(f"\npreflight {verdict}: {config.name} on {device}, {elapsed:.0f} s of a {args.budget_s:g} s budget")
    report = {
        "config": str(config), "device": device, "seconds": round(elapsed, 1), "budget_s": args.budget_s,
        "passed": verdict == "passed", "parts": [dataclasses.asdict(r) for r in results],
    }  # fmt: skip
    Path(args.out).write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(f"written: {args.out}")
    return 0 if verdict == "passed" else 1


if __name__ == "__main__":
    sys.exit(main())
