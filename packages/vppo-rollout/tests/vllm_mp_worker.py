"""Run by test_vllm_real.py in a subprocess: vLLM's default multiprocess engine, greedy before and after a weight update.

    python vllm_mp_worker.py FOLDER_BEFORE FOLDER_AFTER   (with VLLM_ENABLE_V1_MULTIPROCESSING=1)

Prints one JSON line: {"in_process": bool, "before": {"token_ids", "logprobs"}, "after": {...}}.
"""

from __future__ import annotations

import json
import sys

try:
    from .conftest import make_image
except ImportError:  # run as a script: this folder is sys.path[0]
    from conftest import make_image


def test_prompts(processor):
    from vppo_rollout.prompts import build_prompt

    return [
        build_prompt(processor, "How many red circles?", [make_image(56, 56, 0)]),
        build_prompt(processor, "Left <image> right <image>?", [make_image(90, 60, 1), make_image(40, 120, 2)]),
        build_prompt(processor, "2+3?", []),
    ]


test_prompts.__test__ = False  # a helper, not a pytest test


def main(before: str, after: str) -> None:
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.sampling import SamplingConfig
    from vppo_rollout.vllm_engine import VLLMSampler, _in_process

    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8, logprobs=True)
    prompts = test_prompts(load_processor(before))
    sampler = VLLMSampler(before, dtype="float32", max_model_len=1024, bucket_bytes=20_000)
    result = {"in_process": _in_process(sampler.llm)}
    ro = sampler.sample(prompts, 1, greedy)
    result["before"] = {"token_ids": ro.token_ids, "logprobs": ro.logprobs}
    sampler.update_weights(load_policy(after).named_parameters())
    ro = sampler.sample(prompts, 1, greedy)
    result["after"] = {"token_ids": ro.token_ids, "logprobs": ro.logprobs}
    sampler.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main(*sys.argv[1:3])
