"""vLLM engine: the pure conversion/mapping logic, and `VLLMSampler`'s call protocol against an object with `vllm.LLM`'s
API. The real engine (CPU build) is exercised by test_vllm_real.py under `nox -s tests_vllm`."""

import random
from types import SimpleNamespace

import pytest
import torch

from vppo_rollout.prompts import build_prompt
from vppo_rollout.sampling import GroupSampler, SamplingConfig, response_decoder
from vppo_rollout.vllm_engine import (
    SUPPORTED_VLLM,
    VLLMSampler,
    hf_to_vllm_name,
    rollouts_from_vllm,
    vllm_requests,
    vllm_sampling_params,
)
from vppo_rollout.vllm_worker import decode_weights, encode_weights

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
    assert p.ignore_eos  # the stop ids are the whole stop set, as in TransformersSampler
    q = vllm_sampling_params(
        SamplingConfig(top_k=20), 1, 1, stop_token_ids=[2], factory=lambda **kw: SimpleNamespace(**kw)
    )[0]
    assert q.seed is None and q.logprobs is None and q.top_k == 20


# ---------------------------------------------------------------------------------------------------------------
# VLLMSampler against an object with vllm.LLM's API (generate, sleep, wake_up, reset_prefix_cache, llm_engine ...)


class _FakeLLM:
    """vllm.LLM's surface that VLLMSampler uses; collective_rpc runs the WeightSyncExtension method names."""

    def __init__(self, names, in_process=True):
        self.calls: list = []
        self._names = sorted(names)
        self.loaded: list[list[str]] = []
        core = type("InprocClient" if in_process else "SyncMPClient", (), {})()
        self.llm_engine = SimpleNamespace(engine_core=core, reset_encoder_cache=self._reset_encoder_cache)

    def _reset_encoder_cache(self):
        self.calls.append(("reset_encoder_cache",))

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

    def collective_rpc(self, method, args=(), kwargs=None):
        assert isinstance(method, str), "the multiprocess engine refuses callables without insecure serialization"
        self.calls.append(("collective_rpc", method))
        if method == "vppo_param_names":
            return [self._names]
        if method == "vppo_load_weights":
            weights = decode_weights(kwargs["payload"])
            self.loaded.append([n for n, _ in weights])
            return [len(weights)]
        return [None]

    def sleep(self, level=1):
        self.calls.append(("sleep", level))

    def wake_up(self, tags=None):
        self.calls.append(("wake_up", tags))

    def reset_prefix_cache(self):
        self.calls.append(("reset_prefix_cache",))


@pytest.fixture()
def fake_sampler(tiny_dir, tiny_model, arch):
    names = _vllm_param_names(
        arch, tiny_model.config.text_config.num_hidden_layers, tiny_model.config.vision_config.depth
    )
    return VLLMSampler(tiny_dir, llm=_FakeLLM(names), sampling_params_cls=_params, bucket_bytes=10_000)


def _params(**kw):
    return SimpleNamespace(**kw)


def test_vllm_sampler_sample_builds_requests_and_returns_grouped_rollouts(fake_sampler, tiny_processor):
    assert isinstance(fake_sampler, GroupSampler)
    prompts = [build_prompt(tiny_processor, "q", [make_image(56, 56, 0)]), build_prompt(tiny_processor, "r", [])]
    ro = fake_sampler.sample(prompts, 3, SamplingConfig(max_new_tokens=8, logprobs=True, seed=1))
    assert ro.group_index == [0, 0, 0, 1, 1, 1] and all(ids[-1] == 2 for ids in ro.token_ids)
    assert ro.logprobs[0] == [-1.0] * 4
    # the texts are the ids decoded as TransformersSampler decodes them (response_decoder), not vLLM's `text`
    decode = response_decoder(tiny_processor.tokenizer)
    assert ro.texts == [decode(ids) for ids in ro.token_ids] and not ro.texts[0].startswith("text[")
    assert fake_sampler.stop_token_ids  # read from the checkpoint's generation_config
    with pytest.raises(ValueError, match="n:"):
        fake_sampler.sample(prompts, 0, SamplingConfig())


def test_vllm_sampler_greedy_sends_n_single_requests_and_regroups(fake_sampler, tiny_processor):
    prompts = [build_prompt(tiny_processor, "q", []), build_prompt(tiny_processor, "r", [])]
    ro = fake_sampler.sample(prompts, 3, SamplingConfig(temperature=0.0, max_new_tokens=8))
    assert fake_sampler.llm.calls[-1] == ("generate", 6)  # vLLM refuses n > 1 with greedy decoding
    assert ro.group_index == [0, 0, 0, 1, 1, 1] and len(ro.token_ids) == 6


def test_vllm_sampler_update_weights_protocol_and_cache_resets(fake_sampler, tiny_model):
    named = list(tiny_model.named_parameters())
    assert fake_sampler.update_weights((n, p.detach()) for n, p in named) == len(named)
    loaded = fake_sampler.llm.loaded
    assert len(loaded) > 1  # bucketed
    assert [n for b in loaded for n in b] == [n for n, _ in named]  # HF names: vLLM's load_weights maps them itself
    rpc = [c[1] for c in fake_sampler.llm.calls if c[0] == "collective_rpc"]
    assert (
        rpc[0] == "vppo_param_names" and rpc[1] == "vppo_begin_weight_update" and rpc[-1] == "vppo_finish_weight_update"
    )
    assert set(rpc[2:-1]) == {"vppo_load_weights"}
    # every cache computed with the old weights is dropped: vision-encoder outputs and prefix KV blocks
    assert fake_sampler.llm.calls[-2:] == [("reset_encoder_cache",), ("reset_prefix_cache",)]


def test_vllm_sampler_update_weights_errors_name_the_tensor(fake_sampler, tiny_dir, tiny_model, arch):
    name, p = next(iter(tiny_model.named_parameters()))
    with pytest.raises(ValueError, match=r"unknown weight name 'model\.language_model\.nope\.weight'"):
        fake_sampler.update_weights([("model.language_model.nope.weight", p)])
    with pytest.raises(ValueError, match=f"shape mismatch for '{name}'"):
        fake_sampler.update_weights([(name, torch.zeros(2, 2))])
    # the loaders are never left wrapped: finish follows begin even when a tensor is refused
    assert fake_sampler.llm.calls[-1] == ("collective_rpc", "vppo_finish_weight_update")
    # an engine whose parameter naming differs from the mapping (another vLLM version): caught before loading
    names = _vllm_param_names(
        arch, tiny_model.config.text_config.num_hidden_layers, tiny_model.config.vision_config.depth
    )
    names.discard(hf_to_vllm_name(name, arch)[0])
    llm = _FakeLLM(names)
    s = VLLMSampler(tiny_dir, llm=llm, sampling_params_cls=_params)
    with pytest.raises(ValueError, match="the vLLM engine has no parameter"):
        s.update_weights([(name, p)])
    assert llm.loaded == []


def test_vllm_sampler_out_of_process_sends_bytes_and_wakes_weights_first(tiny_dir, tiny_model, arch, tiny_processor):
    names = _vllm_param_names(
        arch, tiny_model.config.text_config.num_hidden_layers, tiny_model.config.vision_config.depth
    )
    llm = _FakeLLM(names, in_process=False)
    sent = []
    rpc = llm.collective_rpc

    def spy(method, args=(), kwargs=None):
        if method == "vppo_load_weights":
            sent.extend(kwargs["payload"])
        return rpc(method, args, kwargs)

    llm.collective_rpc = spy
    s = VLLMSampler(tiny_dir, llm=llm, sampling_params_cls=_params)
    s.sleep()
    s.sleep()  # idempotent
    params = list(tiny_model.named_parameters())[:3]
    s.update_weights(params)
    # msgpack carries (name, dtype, shape, bytes) as is; a tensor would arrive in the worker as a plain list
    assert all(isinstance(item[3], bytes) for item in sent)
    for (name, t), (n2, t2) in zip(params, decode_weights(sent)):
        assert name == n2 and torch.equal(t.detach(), t2)
    assert llm.calls[0] == ("sleep", 1)
    assert (
        llm.calls.index(("wake_up", ["weights"]))
        < llm.calls.index(("collective_rpc", "vppo_load_weights"))
        < llm.calls.index(("wake_up", ["kv_cache"]))
    )
    s.sleep()
    s.sample([build_prompt(tiny_processor, "q", [])], 1, SamplingConfig(max_new_tokens=4))
    assert llm.calls[-2:] == [("wake_up", None), ("generate", 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.int64])
def test_encode_decode_weights_round_trip_bit_exact(dtype):
    t = (torch.randn(3, 5) * 100).to(dtype)
    ((name, back),) = decode_weights(encode_weights([("w", t[:, 1:4])]))  # a non-contiguous view too
    assert name == "w" and back.dtype == dtype and torch.equal(back, t[:, 1:4])


def test_supported_vllm_matches_the_packages_vllm_extra():
    from pathlib import Path

    import tomllib

    meta = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())
    assert meta["project"]["optional-dependencies"]["vllm"] == [f"vllm{SUPPORTED_VLLM}"]


# ---------------------------------------------------------------------------------------------------------- LoRA
def test_peft_adapter_state_names_tensors_as_peft_saves_them():
    import torch

    from vppo_rollout.vllm_engine import peft_adapter_state

    a, b = torch.zeros(2, 4), torch.zeros(3, 2)
    state = peft_adapter_state(
        [
            ("_fsdp_wrapped_module.model.layers.0.self_attn.q_proj.lora_A.default.weight", a),
            ("model.layers.0.self_attn.q_proj.lora_B.weight", b),  # without the adapter name
        ]
    )
    assert list(state) == [
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
    ]
    with pytest.raises(ValueError, match=r"'model\.norm\.weight' is no LoRA weight"):
        peft_adapter_state([("model.norm.weight", a)])
    with pytest.raises(ValueError, match=r"q_proj\.lora_A\.weight' has no lora_B partner"):
        peft_adapter_state([("model.layers.0.self_attn.q_proj.lora_A.default.weight", a)])


def test_update_adapter_needs_an_engine_built_for_lora(fake_sampler):
    with pytest.raises(ValueError, match=r"built without max_lora_rank; pass max_lora_rank=r"):
        fake_sampler.update_adapter([], None)
