"""The real vLLM engine (CPU build under `nox -s tests_vllm`; the same tests run on a GPU machine with vLLM).

Each defect the real engine exposed has a test here that failed before its fix:
1. tiny folders load through `AutoProcessor` when torchvision is present (vLLM always has it);
2. greedy sampling with n > 1 (vLLM refuses n > 1 when greedy);
3. weight sync through the default multiprocess engine (no Python callables through `collective_rpc`);
4. after `update_weights` an image seen before the update is encoded by the new vision tower;
5. the engine runs on CPU at all (tiny sizes with a head dim vLLM's CPU attention accepts).

The in-process engine (`VLLM_ENABLE_V1_MULTIPROCESSING=0`, set by the nox session) serves most tests; the
multiprocess engine runs in a subprocess (vLLM caches its environment once an engine has started).
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from vppo_rollout.loading import load_policy, load_processor
from vppo_rollout.prompts import build_prompt
from vppo_rollout.sampling import SamplingConfig
from vppo_rollout.tiny import VLLM_CPU_SIZES, build_tiny_checkpoint
from vppo_rollout.transformers_engine import TransformersSampler

from .conftest import ARCHS, make_image
from .vllm_mp_worker import test_prompts as _prompts

pytestmark = pytest.mark.vllm

GREEDY = SamplingConfig(temperature=0.0, max_new_tokens=8, logprobs=True)
LOGPROB_TOL = 1e-5  # float32 on both sides; measured differences are ~5e-7


@pytest.fixture(scope="module")
def vllm_dirs(tmp_path_factory) -> dict:
    """{(arch, seed): folder} of tiny checkpoints vLLM's CPU attention accepts (head dim 32)."""
    root = tmp_path_factory.mktemp("vllm_tiny")
    return {
        (arch, seed): build_tiny_checkpoint(root / f"{arch}_{seed}", arch, seed=seed, **VLLM_CPU_SIZES)
        for arch in ARCHS
        for seed in (0, 1)
    }


@pytest.fixture(scope="module", params=ARCHS)
def engine(request, vllm_dirs):
    """(arch, VLLMSampler) on the in-process engine, shared by the tests of one arch."""
    from vppo_rollout.vllm_engine import VLLMSampler

    arch = request.param
    sampler = VLLMSampler(
        vllm_dirs[arch, 0], dtype="float32", max_model_len=1024, distributed_executor_backend="uni", bucket_bytes=20_000
    )
    yield arch, sampler
    sampler.close()


def _assert_same_greedy(a, b):
    assert a.group_index == b.group_index and a.token_ids == b.token_ids and a.finish_reasons == b.finish_reasons
    assert a.texts == b.texts  # both engines decode with vppo_rollout.sampling.response_decoder
    diff = max(abs(x - y) for u, v in zip(a.logprobs, b.logprobs) for x, y in zip(u, v))
    assert diff <= LOGPROB_TOL, diff


# ---------------------------------------------------------------------------------------------------------- defect 1
@pytest.mark.parametrize("arch", ARCHS)
def test_tiny_folder_loads_with_auto_processor_beside_torchvision(vllm_dirs, arch, tmp_path):
    import shutil

    import transformers

    folder = vllm_dirs[arch, 0]
    assert transformers.utils.is_torchvision_available()
    processor = transformers.AutoProcessor.from_pretrained(folder)
    assert type(processor).__name__ == {"qwen2_5_vl": "Qwen2_5_VLProcessor", "qwen3_vl": "Qwen3VLProcessor"}[arch]
    assert type(load_processor(folder)) is type(processor)  # the upstream class, no image-only fallback
    # a folder written before the video-processor section existed is refused by name, not silently patched over
    old = shutil.copytree(folder, tmp_path / "old")
    cfg = json.loads((old / "processor_config.json").read_text())
    del cfg["video_processor"]
    (old / "processor_config.json").write_text(json.dumps(cfg))
    with pytest.raises(OSError, match=r"AutoProcessor cannot load .*needs rebuilding"):
        load_processor(old)


# ---------------------------------------------------------------------------------------------------------- defect 5
def test_cpu_engine_refuses_head_dims_its_attention_cannot_run(tmp_path):
    from vppo_rollout.vllm_engine import VLLMSampler

    small = build_tiny_checkpoint(tmp_path / "small", "qwen2_5_vl")  # default sizes: head dim 16
    with pytest.raises(ValueError, match=r"head dim .* below the 32 .*VLLM_CPU_SIZES"):
        VLLMSampler(small, dtype="float32")


def test_sleep_mode_follows_the_platform(vllm_dirs):
    from vppo_rollout.vllm_engine import VLLMSampler

    with pytest.raises(ValueError, match="no sleep mode"):
        VLLMSampler(vllm_dirs["qwen2_5_vl", 0], dtype="float32", enable_sleep_mode=True)


def test_engine_defaults_follow_the_platform(engine):
    _, sampler = engine
    assert sampler.can_sleep is False  # CPU vLLM has no sleep mode: sleep() and wake_up() are no-ops
    sampler.sleep()
    sampler.wake_up()
    assert sampler.llm.llm_engine.vllm_config.model_config.enforce_eager


# ---------------------------------------------------------------------------------------------------------- defect 2
def test_greedy_responses_and_logprobs_equal_the_transformers_engine(engine, vllm_dirs):
    arch, sampler = engine
    processor = load_processor(vllm_dirs[arch, 0])
    prompts = _prompts(processor)
    reference = TransformersSampler(load_policy(vllm_dirs[arch, 0]), processor)
    # n = 2 greedy: vLLM refuses it as one request, the sampler sends two
    _assert_same_greedy(sampler.sample(prompts, 2, GREEDY), reference.sample(prompts, 2, GREEDY))


def test_seeded_sampling_is_reproducible_and_varied(engine, vllm_dirs):
    arch, sampler = engine
    prompts = _prompts(load_processor(vllm_dirs[arch, 0]))[:1]
    cfg = SamplingConfig(max_new_tokens=8, seed=3, logprobs=True)
    a, b = sampler.sample(prompts, 4, cfg), sampler.sample(prompts, 4, cfg)
    assert a.token_ids == b.token_ids and len(set(map(tuple, a.token_ids))) > 1
    assert all(math.isfinite(x) and x <= 0 for lp in a.logprobs for x in lp)


def test_a_seeded_batch_larger_than_one_prefill_step_samples_whole_groups(engine, vllm_dirs):
    """16 prompts x G=8 with seeds and the same stop semantics as the embedded engine. Before the CPU default of no
    chunked prefill this crashed inside vLLM ("CPU Generator does not use offset"); before `ignore_eos` vLLM also
    stopped at the tokenizer's EOS although the caller's stop set did not include it."""
    arch, sampler = engine
    processor = load_processor(vllm_dirs[arch, 0])
    prompts = [
        build_prompt(processor, f"How many red circles in image {i}?", [make_image(56, 84, i)]) for i in range(16)
    ]
    never = [sampler.config.video_token_id]  # in the vocabulary, never sampled: every response runs to the limit
    ro = sampler.sample(prompts, 8, SamplingConfig(max_new_tokens=16, stop_token_ids=never, seed=0, logprobs=True))
    assert ro.group_index == [g for g in range(16) for _ in range(8)]
    assert ro.response_lengths == [16] * 128 and set(ro.finish_reasons) == {"length"}


# ---------------------------------------------------------------------------------------------------------- defect 4
def test_updated_weights_serve_an_image_seen_before_the_update(engine, vllm_dirs):
    """The same image before and after `update_weights` gives the updated model's output (encoder cache reset).

    bucket_bytes=20_000 splits layers (q/k/v of one attention, gate/up of one MLP) over several buckets.
    """
    arch, sampler = engine
    processor = load_processor(vllm_dirs[arch, 0])
    prompts = _prompts(processor)
    before = sampler.sample(prompts, 1, GREEDY)  # caches the images' encoder outputs and the prompts' KV blocks
    other = load_policy(vllm_dirs[arch, 1])
    assert sampler.update_weights(other.named_parameters()) == len(list(other.named_parameters()))
    after = sampler.sample(prompts, 1, GREEDY)
    _assert_same_greedy(after, TransformersSampler(other, processor).sample(prompts, 1, GREEDY))
    assert after.token_ids != before.token_ids
    # and back: a second update restores the first model exactly
    sampler.update_weights(load_policy(vllm_dirs[arch, 0]).named_parameters())
    _assert_same_greedy(sampler.sample(prompts, 1, GREEDY), before)


# ---------------------------------------------------------------------------------------------------------- defect 3
def test_weight_sync_through_the_default_multiprocess_engine(vllm_dirs):
    """vLLM's default engine (its own process, msgpack between processes, no insecure serialization)."""
    script = Path(__file__).with_name("vllm_mp_worker.py")
    env = {**os.environ, "VLLM_ENABLE_V1_MULTIPROCESSING": "1"}
    env.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
    for arch in ARCHS:
        folders = [str(vllm_dirs[arch, 0]), str(vllm_dirs[arch, 1])]
        out = subprocess.run(
            [sys.executable, str(script), *folders], env=env, capture_output=True, text=True, timeout=600
        )
        assert out.returncode == 0, out.stderr[-4000:]
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert result["in_process"] is False
        processor = load_processor(folders[0])
        prompts = _prompts(processor)
        for key, folder in (("before", folders[0]), ("after", folders[1])):
            expected = TransformersSampler(load_policy(folder), processor).sample(prompts, 1, GREEDY)
            assert result[key]["token_ids"] == expected.token_ids, (arch, key)
            diff = max(abs(x - y) for u, v in zip(result[key]["logprobs"], expected.logprobs) for x, y in zip(u, v))
            assert diff <= LOGPROB_TOL, (arch, key, diff)


def test_one_batch_with_a_prompt_and_its_noised_copy_answers_each_on_its_own_image(engine, vllm_dirs):
    """What NoisyRollout's split sampling sends (`vppo_recipes.rl.rollouts._sample_split`): one call holding the
    clean prompts and copies whose images are noised. Each copy's greedy log-probs are the transformers engine's on
    the noised image, not the clean prompt's (vLLM's encoder and prefix caches key on the image)."""
    import dataclasses

    import numpy as np
    from PIL import Image

    arch, sampler = engine
    processor = load_processor(vllm_dirs[arch, 0])
    prompts = _prompts(processor)[:1]
    rng = np.random.default_rng(0)
    noised = [
        dataclasses.replace(
            p,
            images=[
                Image.fromarray(
                    np.clip(np.asarray(im) + rng.normal(0, 128, np.asarray(im).shape), 0, 255).astype("uint8")
                )
                for im in p.images
            ],
        )
        for p in prompts
    ]
    both = sampler.sample(prompts + noised, 2, GREEDY)
    reference = TransformersSampler(load_policy(vllm_dirs[arch, 0]), processor)
    clean_alone, noised_alone = reference.sample(prompts, 1, GREEDY), reference.sample(noised, 1, GREEDY)
    assert max(abs(x - y) for x, y in zip(both.logprobs[0], clean_alone.logprobs[0])) <= LOGPROB_TOL
    assert max(abs(x - y) for x, y in zip(both.logprobs[2], noised_alone.logprobs[0])) <= LOGPROB_TOL
    assert max(abs(x - y) for x, y in zip(both.logprobs[0], both.logprobs[2])) > 100 * LOGPROB_TOL


# ---------------------------------------------------------------------------------------------------------- LoRA
# Issue 27: the engine samples from base + adapter, either way: (a) the merged weights W + scaling * B @ A through
# the layerwise reload (`update_weights`), (b) vLLM's own LoRA (`update_adapter`: a peft folder per sync, loaded as
# a LoRARequest). The reference is the transformers engine on peft's own merge of the same adapter.
LORA_TARGETS = (
    r".*language_model\.layers\.\d+\.(self_attn|mlp)\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"
)


def _adapted(folder, seed: int):
    """(policy with peft's LoRA injected, its LoraConfig): rank 8, alpha 16, B random (peft starts B at 0)."""
    import peft
    import torch

    config = peft.LoraConfig(r=8, lora_alpha=16, target_modules=LORA_TARGETS)
    model = peft.inject_adapter_in_model(config, load_policy(folder))
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model, config


def _merged(model):
    """A copy with every adapter merged into its base weight by peft (`LoraLayer.merge`)."""
    import copy

    from peft.tuners.lora import LoraLayer

    merged = copy.deepcopy(model)
    for module in merged.modules():
        if isinstance(module, LoraLayer):
            module.merge()
    return merged


def _merged_hf_weights(merged) -> list:
    """The merged model's weights under the checkpoint's names (peft's `.base_layer` dropped, adapters left out)."""
    return [(n.replace(".base_layer.", "."), p) for n, p in merged.named_parameters() if ".lora_" not in n]


@pytest.fixture(scope="module", params=ARCHS)
def lora_engine(request, vllm_dirs):
    """(arch, VLLMSampler built with max_lora_rank=8) on the in-process engine."""
    from vppo_rollout.vllm_engine import VLLMSampler

    arch = request.param
    sampler = VLLMSampler(
        vllm_dirs[arch, 0], dtype="float32", max_model_len=1024, distributed_executor_backend="uni", max_lora_rank=8
    )
    yield arch, sampler
    sampler.close()


def test_merged_lora_weights_through_the_layerwise_reload_equal_the_transformers_engine(engine, vllm_dirs):
    arch, sampler = engine
    processor = load_processor(vllm_dirs[arch, 0])
    prompts = _prompts(processor)
    model, _ = _adapted(vllm_dirs[arch, 0], seed=0)
    merged = _merged(model)
    reference = TransformersSampler(merged, processor).sample(prompts, 1, GREEDY)
    assert reference.token_ids != sampler.sample(prompts, 1, GREEDY).token_ids  # the adapter changes the answers
    sampler.update_weights(_merged_hf_weights(merged))
    _assert_same_greedy(sampler.sample(prompts, 1, GREEDY), reference)
    sampler.update_weights(load_policy(vllm_dirs[arch, 0]).named_parameters())  # the shared engine's base back


def test_lora_adapter_requests_equal_the_transformers_engine_on_the_merged_model(lora_engine, vllm_dirs):
    """Two syncs: the second adapter (new id and name) replaces the first; no KV block of the first is reused."""
    arch, sampler = lora_engine
    processor = load_processor(vllm_dirs[arch, 0])
    prompts = _prompts(processor)
    base = sampler.sample(prompts, 1, GREEDY)  # no adapter yet: the base model
    _assert_same_greedy(
        base, TransformersSampler(load_policy(vllm_dirs[arch, 0]), processor).sample(prompts, 1, GREEDY)
    )
    answers = []
    for seed in (0, 1):
        model, config = _adapted(vllm_dirs[arch, 0], seed)
        reference = TransformersSampler(_merged(model), processor).sample(prompts, 1, GREEDY)
        adapter = [(n, p) for n, p in model.named_parameters() if ".lora_" in n]
        assert sampler.update_adapter(adapter, config) == len(adapter)
        got = sampler.sample(prompts, 1, GREEDY)
        _assert_same_greedy(got, reference)
        answers.append(got.token_ids)
    assert base.token_ids != answers[0] != answers[1]
    assert sampler.llm.llm_engine.list_loras() == {2}  # the first version was removed


def test_update_adapter_refuses_a_rank_above_the_engines_and_a_wrong_shape(lora_engine, vllm_dirs):
    import peft

    arch, sampler = lora_engine
    model, config = _adapted(vllm_dirs[arch, 0], seed=0)
    adapter = [(n, p) for n, p in model.named_parameters() if ".lora_" in n]
    with pytest.raises(ValueError, match=r"LoRA rank 16 exceeds the engine's max_lora_rank=8"):
        sampler.update_adapter(adapter, peft.LoraConfig(r=16, lora_alpha=16))
    name, a = adapter[0]
    with pytest.raises(ValueError, match=r"lora_A\.weight' has shape \(8, 3\), expected \(8, 128\)"):
        sampler.update_adapter([(name, a[:, :3]), *adapter[1:]], config)
