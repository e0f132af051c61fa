import pytest
import torch

from vppo_rollout.collate import collate_rollout, model_inputs, response_logits
from vppo_rollout.loading import load_policy
from vppo_rollout.prompts import build_prompt
from vppo_rollout.sampling import GroupSampler, SamplingConfig
from vppo_rollout.tiny import build_tiny_checkpoint
from vppo_rollout.transformers_engine import TransformersSampler, trim_response

from .conftest import make_image


@pytest.fixture(scope="module")
def prompts(tiny_processor):
    return [
        build_prompt(tiny_processor, "How many red circles?", [make_image(56, 56, 0)]),
        build_prompt(
            tiny_processor,
            "Left <image> right <image> which is bigger?",
            [make_image(90, 60, 1), make_image(40, 120, 2)],
        ),
        build_prompt(tiny_processor, "What is 2 + 3?", []),
    ]


@pytest.fixture()
def sampler(tiny_model, tiny_processor):
    return TransformersSampler(tiny_model, tiny_processor)


def test_is_a_group_sampler(sampler):
    assert isinstance(sampler, GroupSampler)


def test_greedy_batched_groups_equal_one_generate_per_prompt(sampler, tiny_model, tiny_processor, prompts):
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=8)
    batched = sampler.sample(prompts, 3, cfg)
    assert batched.group_index == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    for i, p in enumerate(prompts):
        single = TransformersSampler(tiny_model, tiny_processor, batch_size=1).sample([p], 1, cfg)
        for r in range(3):
            assert batched.token_ids[3 * i + r] == single.token_ids[0]
    chunked = TransformersSampler(tiny_model, tiny_processor, batch_size=2).sample(prompts, 3, cfg)
    assert chunked.token_ids == batched.token_ids and chunked.group_index == batched.group_index


def test_logprobs_equal_teacher_forced_logprobs_of_the_collated_batch(sampler, tiny_model, tiny_processor, prompts):
    # temperature/top-k change sampling, not the returned (raw, temperature-1) log-probs
    ro = sampler.sample(prompts, 2, SamplingConfig(temperature=0.7, top_k=20, max_new_tokens=10, seed=1, logprobs=True))
    batch = collate_rollout(tiny_processor, ro.prompts_for(prompts), ro.token_ids, model=tiny_model)
    with torch.no_grad():
        logits = response_logits(
            tiny_model(**model_inputs(batch)).logits, batch["prompt_length"], batch["responses"].shape[1]
        )
    lp = torch.log_softmax(logits.float(), -1).gather(-1, batch["responses"].unsqueeze(-1)).squeeze(-1)
    for r, ids in enumerate(ro.token_ids):
        torch.testing.assert_close(torch.tensor(ro.logprobs[r]), lp[r, : len(ids)], rtol=1e-4, atol=1e-4)


def test_seed_makes_sampling_reproducible(sampler, prompts):
    cfg = SamplingConfig(max_new_tokens=6, seed=7)
    a, b = sampler.sample(prompts, 4, cfg), sampler.sample(prompts, 4, cfg)
    c = sampler.sample(prompts, 4, SamplingConfig(max_new_tokens=6, seed=8))
    assert a.token_ids == b.token_ids and a.token_ids != c.token_ids
    assert len(set(map(tuple, a.token_ids[:4]))) > 1  # the G responses of one prompt differ


def test_stop_tokens_end_responses_and_length_is_reported(sampler, tiny_model, prompts):
    v = tiny_model.config.text_config.vocab_size
    stopped = sampler.sample(prompts, 2, SamplingConfig(max_new_tokens=5, stop_token_ids=list(range(v)), seed=0))
    assert all(len(t) == 1 for t in stopped.token_ids) and set(stopped.finish_reasons) == {"stop"}
    # a stop set the model cannot produce: every response hits the budget, is kept, and says so
    kept = sampler.sample(prompts, 2, SamplingConfig(max_new_tokens=5, stop_token_ids=[v + 10], seed=0))
    assert all(len(t) == 5 for t in kept.token_ids) and set(kept.finish_reasons) == {"length"}


def test_trim_response_keeps_the_stop_token():
    assert trim_response([5, 6, 2, 0, 0], {2, 0}, 5) == ([5, 6, 2], "stop")
    assert trim_response([5, 6, 7], {2}, 3) == ([5, 6, 7], "length")


def test_top_k_1_and_tiny_top_p_equal_greedy(sampler, prompts):
    greedy = sampler.sample(prompts, 1, SamplingConfig(temperature=0.0, max_new_tokens=6)).token_ids
    assert sampler.sample(prompts, 2, SamplingConfig(top_k=1, max_new_tokens=6, seed=3)).token_ids[::2] == greedy
    assert sampler.sample(prompts, 2, SamplingConfig(top_p=1e-6, max_new_tokens=6, seed=3)).token_ids[::2] == greedy


def test_checkpoint_generation_defaults_do_not_leak_into_sampling(tiny_dir, tiny_processor, prompts):
    model = load_policy(tiny_dir)
    model.generation_config.top_k = 1  # what Qwen2.5-VL-Instruct's generation_config.json ships
    model.generation_config.repetition_penalty = 1.05
    ro = TransformersSampler(model, tiny_processor).sample(prompts[:1], 6, SamplingConfig(max_new_tokens=6, seed=0))
    assert len(set(map(tuple, ro.token_ids))) > 1
    assert model.generation_config.top_k == 1  # restored


def test_update_weights_copies_another_checkpoint(tmp_path, arch, tiny_dir, tiny_processor, prompts):
    other = load_policy(build_tiny_checkpoint(tmp_path / "other", arch, seed=1))
    model = load_policy(tiny_dir)
    sampler = TransformersSampler(model, tiny_processor)
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6)
    before = sampler.sample(prompts, 1, cfg).token_ids
    # the trainer may hold bf16 params and activation-checkpoint-wrapped names
    named = [
        (n.replace("layers.0.", "layers.0._checkpoint_wrapped_module."), p.detach())
        for n, p in other.named_parameters()
    ]
    assert sampler.update_weights(named) == len(named)
    for (n, p), q in zip(other.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
    after = sampler.sample(prompts, 1, cfg).token_ids
    assert after == TransformersSampler(other, tiny_processor).sample(prompts, 1, cfg).token_ids
    assert after != before


def test_update_weights_with_the_samplers_own_model_is_a_noop(sampler, tiny_model):
    before = {n: p.clone() for n, p in tiny_model.named_parameters()}
    assert sampler.update_weights(tiny_model.named_parameters()) == 0
    assert all(torch.equal(before[n], p) for n, p in tiny_model.named_parameters())


def test_update_weights_errors_name_the_tensor(sampler, tiny_model):
    name, p = next(iter(tiny_model.named_parameters()))
    with pytest.raises(ValueError, match=r"unknown weight name 'model\.nonexistent\.weight'"):
        sampler.update_weights([("model.nonexistent.weight", p)])
    with pytest.raises(ValueError, match=f"shape mismatch for '{name}'"):
        sampler.update_weights([(name, torch.zeros(3, 3))])


def test_bad_sampling_arguments(sampler, prompts):
    for n in (0, -1, 1.5, True):
        with pytest.raises(ValueError, match="n:"):
            sampler.sample(prompts, n, SamplingConfig())
    with pytest.raises(ValueError, match="sampling"):
        sampler.sample(prompts, 2, {"temperature": 1.0})
    with pytest.raises(ValueError, match="prompts"):
        sampler.sample([], 2, SamplingConfig())
    for kw, arg in [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"top_k": -2}, "top_k"),
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"stop_token_ids": []}, "stop_token_ids"),
    ]:
        with pytest.raises(ValueError, match=arg):
            SamplingConfig(**kw)
    with pytest.raises(ValueError, match="batch_size"):
        TransformersSampler(sampler.model, sampler.processor, batch_size=0)


def test_image_placeholder_tokens_are_never_sampled(sampler, tiny_model, prompts):
    # a random tiny model samples <|image_pad|> often when allowed (that is how this was found)
    ro = sampler.sample(
        prompts,
        8,
        SamplingConfig(max_new_tokens=24, seed=0, stop_token_ids=[tiny_model.config.text_config.vocab_size + 1]),
    )
    banned = {tiny_model.config.image_token_id, tiny_model.config.video_token_id}
    assert not any(banned.intersection(ids) for ids in ro.token_ids)


@pytest.mark.distributed
@pytest.mark.slow
def test_sharded_sampler_ranks_finishing_at_different_steps(tiny_dir, tiny_processor, arch, tmp_path):
    """FSDP2-sharded sampler on 2 gloo ranks: no deadlock when one rank stops early (synced_gpus), greedy output
    equals the unsharded model's, and update_weights slices full tensors into the DTensor parameters."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    other_dir = build_tiny_checkpoint(tmp_path / "other", arch, seed=1)
    worker = Path(__file__).with_name("dist_sample_worker.py")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(worker),
        str(tiny_dir),
        str(other_dir),
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads((tmp_path / "rank1.json").read_text())
    prompt = build_prompt(tiny_processor, "How many red circles?", [])
    never = [load_policy(tiny_dir).config.text_config.vocab_size + 1]
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=6, stop_token_ids=never)
    want = TransformersSampler(load_policy(tiny_dir), tiny_processor).sample([prompt], 2, cfg)
    assert got["before"] == want.token_ids and got["reasons"] == ["length", "length"]
    want_after = TransformersSampler(load_policy(other_dir), tiny_processor).sample([prompt], 1, cfg)
    assert got["after"] == want_after.token_ids and got["copied"] > 0
