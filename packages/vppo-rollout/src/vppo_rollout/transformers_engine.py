"""The embedded engine: group sampling with transformers' `generate` on any device (CPU tests, the demo, GPUs).

One `generate` call serves a chunk of prompts with `num_return_sequences=n`, so the prompt (and image) is encoded
once per prompt and the G responses decode together as one batch.
"""

from __future__ import annotations

import contextlib
import difflib
from collections.abc import Iterable, Sequence

import torch
from transformers import GenerationConfig, LogitsProcessor, LogitsProcessorList
from transformers.generation.logits_process import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

from vppo_rollout.collate import encode_prompts
from vppo_rollout.prompts import Prompt
from vppo_rollout.sampling import Rollouts, SamplingConfig, check_sample_arguments, response_decoder

# Prefixes that wrappers add to parameter names on the trainer side (activation checkpointing, torch.compile,
# DDP's leading `module.`); FSDP2's fully_shard keeps the names. Stripped before looking a name up.
WRAPPER_PARTS = ("_checkpoint_wrapped_module", "_orig_mod", "_fsdp_wrapped_module")


class _LogprobRecorder(LogitsProcessor):
    """Records log_softmax(raw logits) of each sampled token, keeping only one step's [B, V] distribution.

    transformers calls processors before it samples, so the token drawn at step t is only visible at step t+1
    (as input_ids[:, -1]); `finish(sequences)` gathers the last step. Must run first in the processor list to
    see the raw logits.
    """

    def __init__(self) -> None:
        self.prev: torch.Tensor | None = None
        self.steps: list[torch.Tensor] = []

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, input_ids[:, -1:]).squeeze(1))
        self.prev = torch.log_softmax(scores.float(), dim=-1)
        return scores

    def finish(self, sequences: torch.LongTensor) -> torch.Tensor:
        """-> [B, n_steps] float32 log-probs of the generated tokens (junk after a row has stopped)."""
        if self.prev is not None:
            self.steps.append(self.prev.gather(1, sequences[:, -1:]).squeeze(1))
            self.prev = None
        return torch.stack(self.steps, dim=1) if self.steps else torch.zeros((sequences.shape[0], 0))


class _SuppressTokens(LogitsProcessor):
    """Sets the logits of `token_ids` to -inf (applied after the log-prob recorder, so log-probs stay raw)."""

    def __init__(self, token_ids: list[int]) -> None:
        self.token_ids = torch.tensor(sorted(set(token_ids)), dtype=torch.long)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        scores = scores.clone()
        scores[:, self.token_ids.to(scores.device)] = float("-inf")
        return scores


def placeholder_token_ids(model) -> list[int]:
    """Image/video placeholder ids: a response containing one cannot be re-scored (the model would look for
    image features for it), so samplers never emit them."""
    cfg = model.config
    return [i for i in (getattr(cfg, "image_token_id", None), getattr(cfg, "video_token_id", None)) if i is not None]


def default_stop_token_ids(model, processor) -> list[int]:
    """The checkpoint's EOS ids (generation_config, e.g. [<|im_end|>, <|endoftext|>]) plus the tokenizer's EOS;
    empty when it defines none (`check_sample_arguments` refuses that unless the caller gives stop ids)."""
    ids = model.generation_config.eos_token_id
    ids = [] if ids is None else ([ids] if isinstance(ids, int) else list(ids))
    tok_eos = processor.tokenizer.eos_token_id
    if tok_eos is not None and tok_eos not in ids:
        ids.append(tok_eos)
    return ids


def trim_response(ids: list[int], stop_ids: set[int], max_new_tokens: int) -> tuple[list[int], str]:
    """Cut a generated row after its first stop token -> (token ids incl. the stop token, finish reason)."""
    for i, t in enumerate(ids):
        if t in stop_ids:
            return ids[: i + 1], "stop"
    return ids[:max_new_tokens], "length"


class TransformersSampler:
    """`GroupSampler` on a transformers Qwen-VL model (`load_policy`), CPU or GPU.

    Args:
        model: a `Qwen2_5_VLForConditionalGeneration` / `Qwen3VLForConditionalGeneration`. It may be the very
            object the trainer optimises (then `update_weights` is a no-op per tensor), or a separate copy.
        processor: its processor (`load_processor`).
        batch_size: responses per `generate` call; prompts are chunked as max(1, batch_size // n) per call.
        synced_gpus: keep every rank stepping until all ranks' responses have finished (transformers'
            `generate(synced_gpus=True)`), required when the model is FSDP-sharded: a rank whose responses stop
            early must keep joining the parameter all-gathers. None: on when torch.distributed is initialised with
            world size > 1 and the model has DTensor (sharded) parameters. Every rank must then call `sample` with
            the same number of prompts and the same n (same number of `generate` calls).

    Sampling uses only `SamplingConfig` fields: the checkpoint's generation_config (e.g. Qwen2.5-VL-Instruct's
    repetition_penalty 1.05, top_k 1) is *not* applied, so the sampling distribution is the one RL assumes.
    The image/video placeholder tokens are never sampled (see `placeholder_token_ids`); returned log-probs are
    of the raw distribution, before that suppression and before temperature/top-k/top-p.
    Reproducibility: the same seed, prompts and batch_size give the same responses on the same device.
    """

    def __init__(self, model, processor, *, batch_size: int = 64, synced_gpus: bool | None = None) -> None:
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected an int >= 1 (responses per generate call), got {batch_size!r}")
        self.model = model
        self.processor = processor
        self._decode = response_decoder(processor.tokenizer)
        self.batch_size = batch_size
        self.synced_gpus = _is_sharded(model) if synced_gpus is None else bool(synced_gpus)

    # -- sampling -------------------------------------------------------------------------------------------
    def _generation_config(self, sampling: SamplingConfig, n: int, stop_ids: list[int]) -> GenerationConfig:
        pad = self.processor.tokenizer.pad_token_id
        return GenerationConfig(
            # greedy runs as sampling from top-1 (see _warpers): generate refuses num_return_sequences > 1 when
            # do_sample=False, while vLLM returns n identical greedy responses.
            do_sample=True,
            num_return_sequences=n,
            max_new_tokens=sampling.max_new_tokens,
            eos_token_id=stop_ids,
            pad_token_id=pad if pad is not None else stop_ids[0],
            # explicit neutral values: anything left None would be filled from the checkpoint's generation_config
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,
            num_beams=1,
            use_cache=True,
        )

    def _warpers(self, sampling: SamplingConfig, recorder: _LogprobRecorder | None) -> LogitsProcessorList:
        procs: list[LogitsProcessor] = [recorder] if recorder is not None else []
        procs.append(_SuppressTokens(placeholder_token_ids(self.model)))
        if sampling.greedy:
            procs.append(TopKLogitsWarper(1))
        else:
            if sampling.temperature != 1.0:
                procs.append(TemperatureLogitsWarper(sampling.temperature))
            if sampling.top_k > 0:
                procs.append(TopKLogitsWarper(sampling.top_k))
            if sampling.top_p < 1.0:
                procs.append(TopPLogitsWarper(sampling.top_p))
        return LogitsProcessorList(procs)

    @contextlib.contextmanager
    def _clean_generation_defaults(self):
        """Swap in a bare generation_config so no checkpoint sampling default leaks into `generate`."""
        saved = self.model.generation_config
        self.model.generation_config = GenerationConfig(
            bos_token_id=saved.bos_token_id, eos_token_id=saved.eos_token_id, pad_token_id=saved.pad_token_id
        )
        try:
            yield
        finally:
            self.model.generation_config = saved

    def sample(self, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig) -> Rollouts:
        """n responses per prompt with one batched `generate` per chunk of prompts; see `GroupSampler`."""
        prompts, n, stop_ids = check_sample_arguments(
            prompts, n, sampling, default_stop_token_ids(self.model, self.processor)
        )
        gen_config = self._generation_config(sampling, n, stop_ids)
        chunk = max(1, self.batch_size // n)
        device = next(self.model.parameters()).device

        out = Rollouts([], [], [], [], [] if sampling.logprobs else None)
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        with rng, self._clean_generation_defaults(), torch.no_grad():
            if sampling.seed is not None:
                torch.manual_seed(sampling.seed)
            was_training = self.model.training
            self.model.eval()
            try:
                for start in range(0, len(prompts), chunk):
                    self._sample_chunk(
                        prompts[start : start + chunk], start, n, sampling, gen_config, stop_ids, device, out
                    )
            finally:
                self.model.train(was_training)
        out.__post_init__()
        return out

    def _sample_chunk(self, prompts, offset, n, sampling, gen_config, stop_ids, device, out: Rollouts) -> None:
        enc = encode_prompts(self.processor, prompts)
        inputs = {k: v.to(device) for k, v in enc.items() if v is not None}
        recorder = _LogprobRecorder() if sampling.logprobs else None
        seqs = self.model.generate(
            **inputs,
            generation_config=gen_config,
            logits_processor=self._warpers(sampling, recorder),
            synced_gpus=self.synced_gpus,
        )
        new = seqs[:, enc["input_ids"].shape[1] :]
        lps = recorder.finish(seqs).cpu() if recorder is not None else None
        stop_set = set(stop_ids)
        for row, ids in enumerate(new.cpu().tolist()):
            ids, reason = trim_response(ids, stop_set, sampling.max_new_tokens)
            out.group_index.append(offset + row // n)  # generate repeats each prompt n times, consecutively
            out.token_ids.append(ids)
            out.texts.append(self._decode(ids))
            out.finish_reasons.append(reason)
            if lps is not None:
                out.logprobs.append(lps[row, : len(ids)].tolist())

    # -- weights --------------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> int:
        """Copy trainer tensors into the model in place; returns how many tensors were copied.

        Names are the HF parameter/buffer names (wrapper prefixes such as `_checkpoint_wrapped_module.` are
        stripped). Sources and targets may be plain tensors or DTensors (FSDP2 shards): a full source is sliced
        into a sharded target locally, a sharded source is gathered for a full target. A tensor that *is* the sampler's own
        parameter (trainer and sampler share the model) is skipped. Raises ValueError naming the tensor for an
        unknown name or a shape mismatch; tensors before the bad one have already been copied.
        """
        targets = dict(self.model.named_parameters(remove_duplicate=False))
        targets.update(dict(self.model.named_buffers(remove_duplicate=False)))
        copied = 0
        with torch.no_grad():
            for name, tensor in named_tensors:
                key = _strip_wrappers(name)
                target = targets.get(key)
                if target is None:
                    close = difflib.get_close_matches(key, list(targets), n=1)
                    hint = f" Closest known name: {close[0]!r}." if close else ""
                    raise ValueError(
                        f"update_weights: unknown weight name {name!r} for {type(self.model).__name__}.{hint}"
                    )
                if tuple(tensor.shape) != tuple(target.shape):  # DTensor.shape is the global shape
                    raise ValueError(
                        f"update_weights: shape mismatch for {name!r}: got {tuple(tensor.shape)}, "
                        f"the model has {tuple(target.shape)}"
                    )
                if tensor is target or _same_storage(tensor, target):
                    continue  # the trainer's model is this model
                _copy_into(target, tensor.detach())
                copied += 1
        return copied

    def sleep(self) -> None:
        """No-op: the embedded engine holds no KV cache between calls, and its weights may be the trainer's."""

    def wake_up(self) -> None:
        """No-op (see `sleep`)."""

    def close(self) -> None:
        """No-op: the model belongs to the caller."""


def _same_storage(a: torch.Tensor, b: torch.Tensor) -> bool:
    if hasattr(a, "to_local") and hasattr(b, "to_local"):
        a, b = a.to_local(), b.to_local()
    if hasattr(a, "to_local") or hasattr(b, "to_local"):
        return False
    return a.device == b.device and a.dtype == b.dtype and a.data_ptr() == b.data_ptr() and a.shape == b.shape


def _copy_into(target: torch.Tensor, source: torch.Tensor) -> None:
    """target.copy_(source) for plain tensors and for DTensor targets (FSDP2-sharded sampler model)."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(target, DTensor):
        if isinstance(source, DTensor):
            source = source.redistribute(target.device_mesh, target.placements)
        else:
            # every rank holds the full tensor: take the local shard without communication
            source = distribute_tensor(
                source.to(device=target.device, dtype=target.dtype),
                target.device_mesh,
                target.placements,
                src_data_rank=None,
            )
        target.copy_(source)
        return
    if isinstance(source, DTensor):
        source = source.full_tensor()
    target.copy_(source)


def _is_sharded(model) -> bool:
    """True when running distributed with DTensor (FSDP2 / TP) parameters."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return False
    if torch.distributed.get_world_size() < 2:
        return False
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def _strip_wrappers(name: str) -> str:
    parts = [p for p in name.split(".") if p not in WRAPPER_PARTS]
    if parts and parts[0] == "module":  # DDP's leading prefix only
        parts = parts[1:]
    return ".".join(parts)
