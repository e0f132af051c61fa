"""Weight sync inside vLLM's workers: the `worker_extension_cls` that `VLLMSampler` gives every engine it builds.

vLLM adds these methods to each worker, and `llm.collective_rpc("<name>", kwargs=...)` calls them by name. Calling by
name is what vLLM's default multiprocess engine accepts without `VLLM_ALLOW_INSECURE_SERIALIZATION=1` (a Python
function passed to `collective_rpc` is refused there); the in-process engines (`VLLM_ENABLE_V1_MULTIPROCESSING=0`,
`distributed_executor_backend="external_launcher"`) run the same methods in the caller's process.

One update is three calls, mirroring what vLLM's own `Worker.reload_weights` does in a single call
(`vllm.model_executor.model_loader.reload`):

- `vppo_begin_weight_update`: `initialize_layerwise_reload` (each layer's kernel-format tensors are set aside and the
  layer's weight loaders wrapped, so a layer is re-processed, e.g. repacked by CPU vLLM, once all its checkpoint
  tensors have arrived);
- `vppo_load_weights(payload)` any number of times: the model's own `load_weights` (HF names; it maps them and fuses
  q/k/v and gate/up itself);
- `vppo_finish_weight_update`: `finalize_layerwise_reload` (layers that got no tensor keep their old kernel tensors).

Streaming in several calls keeps the extra memory to one bucket, where one `reload_weights` call would need the
whole model as one message. A bucket may end anywhere: a layer whose tensors are split over buckets is processed
when its last tensor arrives.

Payload forms (`encode_weights`): the multiprocess engine decodes `collective_rpc` arguments without type
information (a tensor would arrive as a plain list), so tensors travel as (name, dtype, shape, bytes); in process
they are passed as they are (no copy).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch

# dtype names on the wire (str(torch.float32) minus "torch.")
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.bfloat16, torch.float16, torch.float64, torch.int64, torch.int32, torch.uint8)
}


def encode_weights(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> list[tuple[str, str, list[int], bytes]]:
    """(name, tensor) -> (name, dtype name, shape, raw bytes): a form msgpack carries to another process as is."""
    out = []
    for name, t in named_tensors:
        dtype = str(t.dtype).removeprefix("torch.")
        if dtype not in _DTYPES:
            raise ValueError(f"encode_weights: {name!r} has dtype {t.dtype}, not one of {sorted(_DTYPES)}")
        flat = t.detach().to("cpu").contiguous().reshape(-1)
        out.append((name, dtype, list(t.shape), flat.view(torch.uint8).numpy().tobytes()))
    return out


def decode_weights(payload: Sequence[Any]) -> list[tuple[str, torch.Tensor]]:
    """Inverse of `encode_weights`; (name, tensor) pairs pass through unchanged."""
    out = []
    for item in payload:
        if len(item) == 2:
            out.append((item[0], item[1]))
            continue
        name, dtype, shape, data = item
        raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
        out.append((name, raw.view(_DTYPES[dtype]).reshape(shape)))
    return out


class WeightSyncExtension:
    """Mixed into vLLM's worker class (`LLM(worker_extension_cls="vppo_rollout.vllm_worker.WeightSyncExtension")`).

    `self` is the vLLM worker: `self.model_runner.model` is the engine's nn.Module, `self.vllm_config` its config.
    Method names carry a `vppo_` prefix so they cannot collide with the worker's own.
    """

    def vppo_param_names(self) -> list[str]:
        """The engine model's parameter names (vLLM's own naming, fused q/k/v and gate/up)."""
        return sorted(name for name, _ in self.model_runner.model.named_parameters())

    def vppo_begin_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            initialize_layerwise_reload(self.model_runner.model)

    def vppo_load_weights(self, payload: Sequence[Any]) -> int:
        """Load one bucket (HF names); returns how many tensors it held."""
        from vllm.config import set_current_vllm_config

        weights = decode_weights(payload)
        with set_current_vllm_config(self.vllm_config):
            self.model_runner.model.load_weights(weights)
        return len(weights)

    def vppo_finish_weight_update(self) -> None:
        from vllm.config import set_current_vllm_config
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        with set_current_vllm_config(self.vllm_config):
            finalize_layerwise_reload(self.model_runner.model, self.vllm_config.model_config)
