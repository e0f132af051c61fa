"""The production engine: vLLM's offline `LLM` behind the `GroupSampler` interface (colocated with the trainer).

vLLM APIs used (written against vLLM 0.10.2 - 0.11.x, V1 engine; `vllm` is imported lazily, install it with
`pip install vppo-rollout[vllm]`):

- `LLM(model=path, limit_mm_per_prompt={"image": k, "video": 0}, enable_sleep_mode=True, gpu_memory_utilization,
  dtype, seed, max_model_len, tensor_parallel_size, mm_processor_kwargs={"min_pixels", "max_pixels"})`;
- `SamplingParams(n, temperature, top_p, top_k, max_tokens, stop_token_ids, seed, logprobs=0, logit_bias)`:
  `logprobs=0` returns the sampled token's log-prob; V1's default `logprobs_mode="raw_logprobs"` computes it from
  the raw logits (before temperature / top-k / top-p), the same quantity `TransformersSampler` returns. With a
  seed and n > 1, vLLM gives child i the seed `seed + i`; we give prompt j the base seed `seed + j * n` so no two
  responses in a call share a random stream;
- `llm.generate([{"prompt_token_ids" | "prompt": ..., "multi_modal_data": {"image": [PIL, ...]}}], params)`:
  prompts carry ONE `<|image_pad|>` per image; vLLM expands it (transformers-side inputs carry the expanded
  count, see `collate_rollout`);
- `llm.sleep(level=1)` / `llm.wake_up(tags=["weights"] | ["kv_cache"] | None)` (needs `enable_sleep_mode=True`);
- weight sync: the engine model's own `load_weights(iterable of (HF name, full tensor))` (it applies vLLM's
  `hf_to_vllm_mapper` and fuses q/k/v and gate/up itself, sharding for tensor parallelism), reached in process at
  `llm.llm_engine.model_executor.driver_worker.worker.model_runner.model` (the path verl / TRL colocate use, with
  `distributed_executor_backend="external_launcher"`) or `llm.llm_engine.engine_core.engine_core.model_executor...`
  (V1 with `VLLM_ENABLE_V1_MULTIPROCESSING=0`), otherwise through `llm.collective_rpc(fn)` (tensors are pickled to
  every worker: correct, slower);
  then `llm.reset_prefix_cache()` so no KV block computed with the old weights is reused.

What is tested here without a GPU: the conversion of `RequestOutput`-shaped objects into `Rollouts`, the HF -> vLLM
parameter-name mapping, the request construction and the weight-sync logic against objects shaped like vLLM's.
The real engine is exercised by the GPU test `tests/test_vllm_engine.py::test_real_vllm_engine_end_to_end`.
"""

from __future__ import annotations

import difflib
import os
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from vppo_rollout.prompts import Prompt
from vppo_rollout.sampling import Rollouts, SamplingConfig, check_n
from vppo_rollout.transformers_engine import _strip_wrappers

SUPPORTED_VLLM = ">=0.10.2"
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


def rollouts_from_vllm(outputs: Sequence[Any], n: int, *, want_logprobs: bool) -> Rollouts:
    """Convert `llm.generate` results (one `RequestOutput` per prompt, in prompt order) into `Rollouts`.

    Reads `RequestOutput.outputs[k]` (`CompletionOutput`: index, text, token_ids, finish_reason, logprobs).
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
            ro.texts.append(c.text)
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


def engine_model(llm):
    """The engine's nn.Module when it lives in this process (V0, V1 without multiprocessing, external_launcher)."""
    engine = getattr(llm, "llm_engine", None)
    for path in (
        ("model_executor", "driver_worker", "worker", "model_runner", "model"),  # verl / TRL colocate
        (
            "engine_core",
            "engine_core",
            "model_executor",
            "driver_worker",
            "worker",
            "model_runner",
            "model",
        ),  # V1 in-proc
        ("model_executor", "driver_worker", "model_runner", "model"),  # V0
    ):
        obj = engine
        for attr in path:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        if obj is not None:
            return obj
    return None


def _rpc_load_weights(worker, weights):  # runs inside each vLLM worker (collective_rpc passes the worker first)
    return len(worker.model_runner.model.load_weights(weights=weights))


def _rpc_param_names(worker):
    return sorted(name for name, _ in worker.model_runner.model.named_parameters())


class VLLMSampler:
    """`GroupSampler` on vLLM's offline engine, colocated with the trainer (sleep between rollouts).

    Args:
        model_path: local HF folder of a Qwen2.5-VL / Qwen3-VL checkpoint (what `load_policy` loads).
        max_images: per-prompt image limit (`limit_mm_per_prompt`); prompts with more are rejected by name.
        gpu_memory_utilization, dtype, max_model_len, tensor_parallel_size, seed, enforce_eager: passed to `LLM`.
        enable_sleep_mode: lets `sleep()` free weights + KV cache while the trainer runs.
        min_pixels / max_pixels: vLLM processor resize bounds (keep them equal to `load_processor`'s).
        llm: an already built `vllm.LLM` (or an object with its API) instead of building one.
        sampling_params_cls: what builds the per-request params (default `vllm.SamplingParams`).
        bucket_bytes: tensors per `load_weights` call during `update_weights` (bounds the extra memory).
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
        enforce_eager: bool = False,
        enable_sleep_mode: bool = True,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        llm=None,
        sampling_params_cls=None,
        bucket_bytes: int = 512 * 2**20,
        **llm_kwargs,
    ) -> None:
        from transformers import AutoConfig

        from vppo_rollout.loading import checkpoint_arch

        if not isinstance(max_images, int) or max_images < 0:
            raise ValueError(f"max_images: expected an int >= 0, got {max_images!r}")
        self.model_path = str(model_path)
        self.arch = checkpoint_arch(model_path)
        self.config = AutoConfig.from_pretrained(self.model_path)
        self.max_images = max_images
        self.bucket_bytes = bucket_bytes
        self._hf_shapes: dict[str, tuple[int, ...]] | None = None
        self._engine_names: set[str] | None = None
        self._asleep = False
        if llm is None:
            try:
                from vllm import LLM
            except ImportError as e:
                raise ImportError(
                    f"VLLMSampler needs vLLM {SUPPORTED_VLLM} (CUDA only): pip install 'vppo-rollout[vllm]'; "
                    "without a GPU use TransformersSampler"
                ) from e
            mm_kwargs = {k: v for k, v in (("min_pixels", min_pixels), ("max_pixels", max_pixels)) if v is not None}
            llm = LLM(
                model=self.model_path,
                limit_mm_per_prompt={"image": max_images, "video": 0},
                enable_sleep_mode=enable_sleep_mode,
                gpu_memory_utilization=gpu_memory_utilization,
                dtype=dtype,
                max_model_len=max_model_len,
                tensor_parallel_size=tensor_parallel_size,
                seed=seed,
                enforce_eager=enforce_eager,
                mm_processor_kwargs=mm_kwargs or None,
                **llm_kwargs,
            )
        self.llm = llm
        self.sampling_params_cls = sampling_params_cls
        self.stop_token_ids = self._default_stop_ids()
        self.suppress_ids = [i for i in (self.config.image_token_id, self.config.video_token_id) if i is not None]

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
        n = check_n(n)
        if not isinstance(sampling, SamplingConfig):
            raise ValueError(f"sampling: expected a SamplingConfig, got {type(sampling).__name__}")
        prompts = list(prompts)
        if not prompts:
            raise ValueError("prompts: empty list")
        if self._asleep:
            self.wake_up()
        stop = list(sampling.stop_token_ids) if sampling.stop_token_ids else self.stop_token_ids
        if not stop:
            raise ValueError(
                "stop_token_ids: the checkpoint defines no EOS token; pass SamplingConfig(stop_token_ids=[...])"
            )
        requests = vllm_requests(prompts, max_images=self.max_images)
        params = vllm_sampling_params(
            sampling,
            n,
            len(prompts),
            stop_token_ids=stop,
            suppress_ids=self.suppress_ids,
            factory=self.sampling_params_cls,
        )
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        return rollouts_from_vllm(outputs, n, want_logprobs=sampling.logprobs)

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
            model = engine_model(self.llm)
            if model is not None:
                names = [n for n, _ in model.named_parameters()]
            else:
                names = self.llm.collective_rpc(_rpc_param_names)[0]
            self._engine_names = set(names)
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

    def _load(self, bucket: list[tuple[str, torch.Tensor]]) -> None:
        model = engine_model(self.llm)
        if model is not None:
            model.load_weights(weights=bucket)
        else:
            self.llm.collective_rpc(_rpc_load_weights, args=(bucket,))

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Push full trainer tensors (HF names; DTensors are gathered) into the engine; returns the count.

        Every tensor is validated (name known to the checkpoint and to the engine, shape) before its bucket is
        loaded; a bad tensor raises ValueError naming it, after earlier buckets were loaded. Wakes the weights up
        first when asleep and resets the prefix cache afterwards.
        """
        woke_weights_only = self._asleep
        if woke_weights_only:  # weights first; the KV cache comes back after the copy (less peak memory)
            self.llm.wake_up(tags=["weights"])
        bucket: list[tuple[str, torch.Tensor]] = []
        size = count = 0
        for name, tensor in named_tensors:
            if hasattr(tensor, "full_tensor"):
                tensor = tensor.full_tensor()
            key = self.check_weight(name, tensor)
            bucket.append((key, tensor.detach()))
            size += tensor.numel() * tensor.element_size()
            count += 1
            if size >= self.bucket_bytes:
                self._load(bucket)
                bucket, size = [], 0
        if bucket:
            self._load(bucket)
        if woke_weights_only:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False
        if hasattr(self.llm, "reset_prefix_cache"):
            self.llm.reset_prefix_cache()
        return count

    def sleep(self) -> None:
        """Free the engine's GPU memory (level 1: weights offloaded to CPU, KV cache discarded)."""
        if not self._asleep:
            self.llm.sleep(level=1)
            self._asleep = True

    def wake_up(self) -> None:
        """Restore weights and KV cache (after `sleep`)."""
        if self._asleep:
            self.llm.wake_up()
            self._asleep = False
