"""vLLM engine: pure conversion/mapping logic on CPU with objects shaped like vLLM's; the real engine on GPU only."""

import importlib.util
import math
import random
from types import SimpleNamespace

import pytest
import torch

from vppo_rollout.loading import load_policy
from vppo_rollout.prompts import build_prompt
from vppo_rollout.sampling import GroupSampler, SamplingConfig
from vppo_rollout.vllm_engine import (
    VLLMSampler,
    hf_to_vllm_name,
    rollouts_from_vllm,
    vllm_requests,
    vllm_sampling_params,
)

from .conftest import make_image

# ---------------------------------------------------------------------------------------------------------------
# objects shaped like vLLM's (vllm/outputs.py: RequestOutput, CompletionOutput; vllm/logprobs.py: Logprob)


def _completion(index, token_ids, finish_reason="stop", logprobs=None, text=None):
    return SimpleNamespace(
        index=index,
        token_ids=token_ids,
        text=text or f"text{token_ids}",
        finish_reason=finish_reason,
        logprobs=logprobs,
        cumulative_logprob=None,
        stop_reason=None,
    )


def _logprob_entries(token_ids, values):
    # {token_id: Logprob(logprob, rank, decoded_token)}, plus a non-sampled alternative to make lookups matter
    return [
        {
            t: SimpleNamespace(logprob=v, rank=1, decoded_token=None),
            t + 1: SimpleNamespace(logprob=-50.0, rank=2, decoded_token=None),
        }
        for t, v in zip(token_ids, values)
    ]


def test_rollouts_from_vllm_orders_by_index_and_groups_by_prompt():
    outs = [
        SimpleNamespace(
            request_id="0",
            outputs=[
                _completion(1, [7, 2], logprobs=_logprob_entries([7, 2], [-1.0, -2.0])),
                _completion(0, [5, 6, 9], "length", _logprob_entries([5, 6, 9], [-0.5, -0.25, -3.0])),
            ],
        ),
        SimpleNamespace(
            request_id="1",
            outputs=[
                _completion(0, [3], logprobs=_logprob_entries([3], [-0.1])),
                _completion(1, [4, 2], logprobs=_logprob_entries([4, 2], [-0.2, -0.3])),
            ],
        ),
    ]
    ro = rollouts_from_vllm(outs, 2, want_logprobs=True)
    assert ro.group_index == [0, 0, 1, 1]
    assert ro.token_ids == [[5, 6, 9], [7, 2], [3], [4, 2]]
    assert ro.finish_reasons == ["length", "stop", "stop", "stop"]
    assert ro.logprobs == [[-0.5, -0.25, -3.0], [-1.0, -2.0], [-0.1], [-0.2, -0.3]]
    assert ro.texts[0] == "text[5, 6, 9]"
    assert rollouts_from_vllm(outs, 2, want_logprobs=False).logprobs is None


def test_rollouts_from_vllm_rejects_aborted_missing_and_short_outputs():
    ok = _completion(0, [1])
    with pytest.raises(ValueError, match=r"outputs\[0\]\.outputs\[1\]: finish_reason='abort'"):
        rollouts_from_vllm([SimpleNamespace(outputs=[ok, _completion(1, [2], "abort")])], 2, want_logprobs=False)
    with pytest.raises(ValueError, match=r"outputs\[1\]: 1 completions, expected n=2"):
        rollouts_from_vllm(
            [SimpleNamespace(outputs=[ok, _completion(1, [2])]), SimpleNamespace(outputs=[ok])], 2, want_logprobs=False
        )
    with pytest.raises(ValueError, match="logprobs=0"):
        rollouts_from_vllm([SimpleNamespace(outputs=[ok])], 1, want_logprobs=True)
    with pytest.raises(ValueError, match="n:"):
        rollouts_from_vllm([], 0, want_logprobs=False)


@pytest.mark.parametrize(
    ("arch", "hf", "vllm"),
    [
        (
            "qwen2_5_vl",
            "model.language_model.layers.3.self_attn.q_proj.weight",
            ("language_model.model.layers.3.self_attn.qkv_proj.weight", "q"),
        ),
        (
            "qwen2_5_vl",
            "model.language_model.layers.3.self_attn.v_proj.bias",
            ("language_model.model.layers.3.self_attn.qkv_proj.bias", "v"),
        ),
        (
            "qwen2_5_vl",
            "model.language_model.layers.0.mlp.up_proj.weight",
            ("language_model.model.layers.0.mlp.gate_up_proj.weight", 1),
        ),
        ("qwen2_5_vl", "model.visual.blocks.1.mlp.gate_proj.bias", ("visual.blocks.1.mlp.gate_up_proj.bias", 0)),
        ("qwen2_5_vl", "model.visual.blocks.1.attn.qkv.weight", ("visual.blocks.1.attn.qkv.weight", None)),
        ("qwen2_5_vl", "lm_head.weight", ("language_model.lm_head.weight", None)),
        # checkpoints saved before transformers 4.52 (the published Qwen2.5-VL files) use the old layout
        (
            "qwen2_5_vl",
            "model.layers.0.self_attn.k_proj.weight",
            ("language_model.model.layers.0.self_attn.qkv_proj.weight", "k"),
        ),
        (
            "qwen3_vl",
            "model.language_model.layers.0.self_attn.q_norm.weight",
            ("language_model.model.layers.0.self_attn.q_norm.weight", None),
        ),
        ("qwen3_vl", "model.visual.blocks.0.mlp.linear_fc1.weight", ("visual.blocks.0.mlp.linear_fc1.weight", None)),
        (
            "qwen3_vl",
            "model.visual.deepstack_merger_list.0.norm.bias",
            ("visual.deepstack_merger_list.0.norm.bias", None),
        ),
    ],
)
def test_hf_to_vllm_name_examples(arch, hf, vllm):
    assert hf_to_vllm_name(hf, arch) == vllm


def _vllm_param_names(arch, n_layers, n_blocks, n_deepstack=1):
    """vLLM's module tree for these archs, written out from vLLM's model files (not from hf_to_vllm_name)."""
    names = {
        "language_model.model.embed_tokens.weight",
        "language_model.model.norm.weight",
        "language_model.lm_head.weight",
    }
    for i in range(n_layers):
        p = f"language_model.model.layers.{i}."
        names |= {
            p + s
            for s in [
                "input_layernorm.weight",
                "post_attention_layernorm.weight",
                "self_attn.qkv_proj.weight",
                "self_attn.o_proj.weight",
                "mlp.gate_up_proj.weight",
                "mlp.down_proj.weight",
            ]
        }
        names |= (
            {p + "self_attn.qkv_proj.bias"}
            if arch == "qwen2_5_vl"
            else {p + "self_attn.q_norm.weight", p + "self_attn.k_norm.weight"}
        )
    for i in range(n_blocks):
        p = f"visual.blocks.{i}."
        names |= {
            p + s
            for s in [
                "attn.qkv.weight",
                "attn.qkv.bias",
                "attn.proj.weight",
                "attn.proj.bias",
                "norm1.weight",
                "norm2.weight",
            ]
        }
        if arch == "qwen2_5_vl":
            names |= {
                p + s
                for s in [
                    "mlp.gate_up_proj.weight",
                    "mlp.gate_up_proj.bias",
                    "mlp.down_proj.weight",
                    "mlp.down_proj.bias",
                ]
            }
        else:
            names |= {
                p + s
                for s in [
                    "norm1.bias",
                    "norm2.bias",
                    "mlp.linear_fc1.weight",
                    "mlp.linear_fc1.bias",
                    "mlp.linear_fc2.weight",
                    "mlp.linear_fc2.bias",
                ]
            }
    if arch == "qwen2_5_vl":
        names |= {
            "visual.patch_embed.proj.weight",
            "visual.merger.ln_q.weight",
            "visual.merger.mlp.0.weight",
            "visual.merger.mlp.0.bias",
            "visual.merger.mlp.2.weight",
            "visual.merger.mlp.2.bias",
        }
    else:
        names |= {"visual.patch_embed.proj.weight", "visual.patch_embed.proj.bias", "visual.pos_embed.weight"}
        for m in ["visual.merger."] + [f"visual.deepstack_merger_list.{k}." for k in range(n_deepstack)]:
            names |= {
                m + s
                for s in [
                    "norm.weight",
                    "norm.bias",
                    "linear_fc1.weight",
                    "linear_fc1.bias",
                    "linear_fc2.weight",
                    "linear_fc2.bias",
                ]
            }
    return names


def test_every_tiny_model_weight_maps_onto_vllms_module_tree(tiny_model, arch):
    engine = _vllm_param_names(
        arch, tiny_model.config.text_config.num_hidden_layers, tiny_model.config.vision_config.depth
    )
    mapped = {hf_to_vllm_name(n, arch)[0] for n, _ in tiny_model.named_parameters()}
    assert mapped == engine


def test_vllm_requests_carry_unexpanded_ids_and_images(tiny_processor):
    p_img = build_prompt(tiny_processor, "q", [make_image(56, 56, 0), make_image(56, 56, 1)])
    p_txt = build_prompt(tiny_processor, "2+3?", [])
    reqs = vllm_requests([p_img, p_txt])
    assert reqs[0]["prompt_token_ids"].count(tiny_processor.image_token_id) == 2  # one per image: vLLM expands
    assert reqs[0]["multi_modal_data"]["image"] == p_img.images
    assert "multi_modal_data" not in reqs[1]
    with pytest.raises(ValueError, match=r"prompts\[0\]: 2 images exceed .* image=1"):
        vllm_requests([p_img], max_images=1)


def test_vllm_sampling_params_are_explicit_with_distinct_seeds_per_prompt():
    cfg = SamplingConfig(temperature=0.7, top_p=0.99, max_new_tokens=16, seed=5, logprobs=True)
    params = vllm_sampling_params(
        cfg, 4, 3, stop_token_ids=[2, 0], suppress_ids=[5, 6], factory=lambda **kw: SimpleNamespace(**kw)
    )
    assert [p.seed for p in params] == [5, 9, 13]  # vLLM uses seed+i for child i: no overlap between prompts
    p = params[0]
    assert (p.n, p.temperature, p.top_p, p.top_k, p.max_tokens, p.logprobs) == (4, 0.7, 0.99, -1, 16, 0)
    assert p.stop_token_ids == [2, 0] and p.logit_bias == {5: -100.0, 6: -100.0} and p.repetition_penalty == 1.0
    q = vllm_sampling_params(
        SamplingConfig(top_k=20), 1, 1, stop_token_ids=[2], factory=lambda **kw: SimpleNamespace(**kw)
    )[0]
    assert q.seed is None and q.logprobs is None and q.top_k == 20


# ---------------------------------------------------------------------------------------------------------------
# VLLMSampler against an object with vllm.LLM's API (generate, sleep, wake_up, reset_prefix_cache, llm_engine ...)


class _FakeEngineModel:
    def __init__(self, names):
        self._names = sorted(names)
        self.loaded: list[list[str]] = []

    def named_parameters(self):
        return [(n, None) for n in self._names]

    def load_weights(self, weights):
        self.loaded.append([n for n, _ in weights])
        return {n for n, _ in weights}


class _FakeLLM:
    def __init__(self, model, in_process=True):
        self.calls: list = []
        self.model = model
        worker = SimpleNamespace(model_runner=SimpleNamespace(model=model))
        if in_process:
            self.llm_engine = SimpleNamespace(
                model_executor=SimpleNamespace(driver_worker=SimpleNamespace(worker=worker))
            )
        self._worker = worker

    def generate(self, requests, params, use_tqdm=True):
        self.calls.append(("generate", len(requests)))
        rng = random.Random(0)
        outs = []
        for req, p in zip(requests, params):
            comps = []
            for k in reversed(range(p.n)):  # vLLM does not promise index order; the converter sorts
                ids = [rng.randrange(10, 20) for _ in range(3)] + [2]
                lps = _logprob_entries(ids, [-1.0] * 4) if p.logprobs is not None else None
                comps.append(_completion(k, ids, "stop", lps))
            outs.append(SimpleNamespace(prompt_token_ids=req.get("prompt_token_ids"), outputs=comps))
        return outs

    def collective_rpc(self, fn, args=()):
        self.calls.append(("collective_rpc", fn.__name__))
        return [fn(self._worker, *args)]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.fixture()
def fake_sampler(tiny_dir, tiny_model, arch):
    engine = _FakeEngineModel(
        _vllm_param_names(arch, tiny_model.config.text_config.num_hidden_layers, tiny_model.config.vision_config.depth)
    )
    return VLLMSampler(tiny_dir, llm=_FakeLLM(engine), sampling_params_cls=_params, bucket_bytes=10_000)


def _params(**kw):
    return SimpleNamespace(**kw)


def test_vllm_sampler_sample_builds_requests_and_returns_grouped_rollouts(fake_sampler, tiny_processor):
    assert isinstance(fake_sampler, GroupSampler)
    prompts = [build_prompt(tiny_processor, "q", [make_image(56, 56, 0)]), build_prompt(tiny_processor, "r", [])]
    ro = fake_sampler.sample(prompts, 3, SamplingConfig(max_new_tokens=8, logprobs=True, seed=1))
    assert ro.group_index == [0, 0, 0, 1, 1, 1] and all(ids[-1] == 2 for ids in ro.token_ids)
    assert ro.logprobs[0] == [-1.0] * 4
    assert fake_sampler.stop_token_ids  # read from the checkpoint's generation_config
    with pytest.raises(ValueError, match="n:"):
        fake_sampler.sample(prompts, 0, SamplingConfig())


def test_vllm_sampler_update_weights_validates_buckets_and_resets_cache(fake_sampler, tiny_model):
    named = list(tiny_model.named_parameters())
    assert fake_sampler.update_weights((n, p.detach()) for n, p in named) == len(named)
    loaded = fake_sampler.llm.model.loaded
    assert len(loaded) > 1  # bucketed
    assert [n for b in loaded for n in b] == [n for n, _ in named]  # HF names: vLLM's load_weights maps them itself
    assert fake_sampler.llm.calls[-1] == ("reset_prefix_cache",)


def test_vllm_sampler_update_weights_errors_name_the_tensor(fake_sampler, tiny_dir, tiny_model, arch):
    name, p = next(iter(tiny_model.named_parameters()))
    with pytest.raises(ValueError, match=r"unknown weight name 'model\.language_model\.nope\.weight'"):
        fake_sampler.update_weights([("model.language_model.nope.weight", p)])
    with pytest.raises(ValueError, match=f"shape mismatch for '{name}'"):
        fake_sampler.update_weights([(name, torch.zeros(2, 2))])
    # an engine whose parameter naming differs from the mapping (another vLLM version): caught before loading
    names = _vllm_param_names(
        arch, tiny_model.config.text_config.num_hidden_layers, tiny_model.config.vision_config.depth
    )
    names.discard(hf_to_vllm_name(name, arch)[0])
    engine = _FakeEngineModel(names)
    s = VLLMSampler(tiny_dir, llm=_FakeLLM(engine), sampling_params_cls=_params)
    with pytest.raises(ValueError, match="the vLLM engine has no parameter"):
        s.update_weights([(name, p)])
    assert engine.loaded == []


def test_vllm_sampler_sleep_wake_and_rpc_fallback(tiny_dir, tiny_model, arch, tiny_processor):
    engine = _FakeEngineModel(
        _vllm_param_names(arch, tiny_model.config.text_config.num_hidden_layers, tiny_model.config.vision_config.depth)
    )
    llm = _FakeLLM(engine, in_process=False)  # engine in worker processes: collective_rpc path
    s = VLLMSampler(tiny_dir, llm=llm, sampling_params_cls=_params)
    s.sleep()
    s.sleep()  # idempotent
    s.update_weights(list(tiny_model.named_parameters())[:3])
    assert llm.calls[0] == ("sleep", 1) and ("collective_rpc", "_rpc_param_names") in llm.calls
    assert ("wake_up", ["weights"]) in llm.calls and ("wake_up", ["kv_cache"]) in llm.calls
    assert (
        llm.calls.index(("wake_up", ["weights"]))
        < llm.calls.index(("collective_rpc", "_rpc_load_weights"))
        < llm.calls.index(("wake_up", ["kv_cache"]))
    )
    assert engine.loaded and len(engine.loaded[0]) == 3
    s.sleep()
    s.sample([build_prompt(tiny_processor, "q", [])], 1, SamplingConfig(max_new_tokens=4))
    assert llm.calls[-2:] == [("wake_up", None), ("generate", 1)]


# ---------------------------------------------------------------------------------------------------------------
_HAS_VLLM = importlib.util.find_spec("vllm") is not None
_HAS_CUDA = torch.cuda.is_available()


@pytest.mark.gpu
@pytest.mark.skipif(
    not (_HAS_VLLM and _HAS_CUDA),
    reason="needs vLLM (CUDA-only wheel) and a CUDA GPU; this machine has "
    + ("no vLLM" if not _HAS_VLLM else "no GPU"),
)
def test_real_vllm_engine_end_to_end(tiny_dir, tiny_processor, tmp_path, arch):  # pragma: no cover - GPU only
    """Greedy responses and raw log-probs agree with the transformers engine; update_weights changes the policy."""
    from vppo_rollout.tiny import build_tiny_checkpoint
    from vppo_rollout.transformers_engine import TransformersSampler

    prompts = [
        build_prompt(tiny_processor, "How many red circles?", [make_image(56, 56, 0)]),
        build_prompt(tiny_processor, "Left <image> right <image>?", [make_image(90, 60, 1), make_image(40, 120, 2)]),
    ]
    greedy = SamplingConfig(temperature=0.0, max_new_tokens=8, logprobs=True)
    hf = TransformersSampler(load_policy(tiny_dir, device="cuda"), tiny_processor)
    vs = VLLMSampler(tiny_dir, dtype="float32", gpu_memory_utilization=0.2, enforce_eager=True, max_model_len=1024)
    a, b = vs.sample(prompts, 2, greedy), hf.sample(prompts, 2, greedy)
    assert a.group_index == b.group_index and a.token_ids == b.token_ids
    for x, y in zip(a.logprobs, b.logprobs):
        assert all(math.isclose(u, v, abs_tol=1e-3) for u, v in zip(x, y))
    sampled = vs.sample(prompts, 4, SamplingConfig(max_new_tokens=8, seed=0))
    assert len(set(map(tuple, sampled.token_ids[:4]))) > 1
    other = load_policy(build_tiny_checkpoint(tmp_path / "other", arch, seed=1))
    vs.sleep()
    vs.update_weights(other.named_parameters())
    c = vs.sample(prompts, 1, greedy)
    d = TransformersSampler(other.cuda(), tiny_processor).sample(prompts, 1, greedy)
    assert c.token_ids == d.token_ids
