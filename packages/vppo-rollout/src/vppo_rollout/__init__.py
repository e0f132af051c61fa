"""vppo-rollout: Qwen2.5-VL / Qwen3-VL prompts, collation and group sampling (transformers and vLLM engines)."""

from vppo_rollout.collate import collate_rollout, encode_prompts, model_inputs, response_logits, rope_index_fn
from vppo_rollout.loading import checkpoint_arch, load_policy, load_processor
from vppo_rollout.prompts import DEFAULT_INSTRUCTION, Prompt, PromptTooLongError, build_prompt
from vppo_rollout.sampling import GroupSampler, Rollouts, SamplingConfig, response_decoder
from vppo_rollout.tiny import build_tiny_checkpoint
from vppo_rollout.transformers_engine import TransformersSampler
from vppo_rollout.vllm_engine import VLLMSampler

__all__ = [
    "DEFAULT_INSTRUCTION",
    "GroupSampler",
    "Prompt",
    "PromptTooLongError",
    "Rollouts",
    "SamplingConfig",
    "TransformersSampler",
    "VLLMSampler",
    "build_prompt",
    "build_tiny_checkpoint",
    "checkpoint_arch",
    "collate_rollout",
    "encode_prompts",
    "load_policy",
    "load_processor",
    "model_inputs",
    "response_decoder",
    "response_logits",
    "rope_index_fn",
]
