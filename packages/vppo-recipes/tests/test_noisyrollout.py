"""NoisyRollout in the recipe (ALGORITHMS.md §9.10): which images each response is sampled on, that every pass after
sampling sees the clean ones, and that the rollout hook changes nothing for a method that does not use it (its
`None` default keeps the one sampler call per prompt / per rank of before)."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

sys.path.insert(0, str(Path(__file__).parent))


def _plain_noise_step(k: int, n: int, a0=500.0, lam=30.0, mid=2 / 3) -> int:
    """The paper's Eq. 3 as the official code evaluates it: int(α₀·(1 − σ(λ·(k/n − γ/n))))."""
    return int(a0 * (1 - 1 / (1 + math.exp(-lam * (k / n - mid)))))


def _plain_noised(image: Image.Image, t: int, eps: torch.Tensor) -> np.ndarray:
    """x' = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε on [0, 1] pixels (float32), clipped, ×255 truncated to uint8."""
    betas = 1 / (1 + torch.exp(-torch.linspace(-6, 6, 1000))) * (0.005 - 0.00001) + 0.00001
    alpha_bar = torch.ones(())
    for b in betas[: t + 1]:  # the running product, step by step
        alpha_bar = alpha_bar * (1 - b)
    x = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0)  # [H, W, C]
    y = alpha_bar.sqrt() * x + (1 - alpha_bar).sqrt() * eps.permute(1, 2, 0)
    return (y.clamp(0, 1) * 255).to(torch.uint8).numpy()


@pytest.mark.slow
def test_half_of_each_group_is_sampled_on_the_noised_image_and_every_pass_sees_the_clean_one(tmp_path, monkeypatch):
    from test_rl_distributed import _one_rl_step_in_process

    import vppo_recipes.rl.rl_distributed as rl
    from vppo_recipes.methods.noisyrollout import NOISE_SALT
    from vppo_recipes.seeding import mix_seed
    from vppo_rollout.collate import collate_rollout, model_inputs
    from vppo_rollout.transformers_engine import TransformersSampler

    calls, seen = [], {}
    sample = TransformersSampler.sample

    def recording(self, prompts, n, sampling):
        out = sample(self, prompts, n, sampling)
        calls.append((list(prompts), n, out.token_ids))
        return out

    prepare = rl.RLRecipeDistributed.prepare_minibatches

    def keep(self, groups):
        seen["groups"], seen["minis"] = groups, prepare(self, groups)
        return seen["minis"]

    monkeypatch.setattr(TransformersSampler, "sample", recording)
    monkeypatch.setattr(rl.RLRecipeDistributed, "prepare_minibatches", keep)

    def inspect(recipe):
        seen.update(processor=recipe.processor, model_config=recipe.model_config, seed=recipe.seed)

    overrides = {"rollout.group_size": 4, "rollout.online_filter": "false", "training.max_steps": 60,
                 "batch.micro_batch_size": 4}  # fmt: skip
    metrics = _one_rl_step_in_process(tmp_path, "tiny_noisyrollout", overrides, inspect=inspect)
    t = _plain_noise_step(1, 60)
    assert t == 499 and metrics["noisyrollout/noise_step"] == t
    betas = torch.sigmoid(torch.linspace(-6, 6, 1000)) * (0.005 - 0.00001) + 0.00001
    want_std = math.sqrt(1 - float(torch.prod(1 - betas[: t + 1].double())))
    assert metrics["noisyrollout/noise_std"] == pytest.approx(want_std, rel=1e-5)  # ᾱ in float32 there

    groups = seen["groups"]
    assert len(calls) == 2 * len(groups), "one call on the clean image and one on the noised copy per prompt"
    for g, (clean, noised) in zip(groups, zip(calls[0::2], calls[1::2])):
        (p_clean,), n_clean, ids_clean = clean
        (p_noised,), n_noised, ids_noised = noised
        assert n_clean == n_noised == 2 and p_clean is g.prompt, "the first half on the prompt itself"
        assert p_noised.text == g.prompt.text and len(p_noised.images) == len(g.prompt.images) == 1
        assert g.token_ids == ids_clean + ids_noised, "slots 0-1 clean, 2-3 noised, one group"
        for k, (image, noisy) in enumerate(zip(g.prompt.images, p_noised.images)):
            gen = torch.Generator().manual_seed(mix_seed(seen["seed"], g.uid, NOISE_SALT, k))
            eps = torch.randn((3, image.height, image.width), generator=gen)
            want, got = _plain_noised(image, t, eps), np.asarray(noisy)
            assert got.shape == want.shape and noisy.size == image.size
            # the running product above and cumprod may differ in the last float32 bit: a pixel at a truncation
            # boundary then lands one level off
            diff = np.abs(got.astype(int) - want.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
            assert np.abs(got.astype(int) - np.asarray(image, dtype=int)).mean() > 50, "t = 499 is strong noise"
    # every micro-batch holds the clean prompts: the no-grad passes and the update see the clean images
    for mini in seen["minis"][0]:
        for mb in mini:
            assert all(any(p is g.prompt for g in groups) for p in mb.prompts)
            want = model_inputs(
                collate_rollout(seen["processor"], mb.prompts, mb.responses.tolist(), config=seen["model_config"])
            )
            assert torch.equal(mb.inputs["pixel_values"], want["pixel_values"].to(mb.inputs["pixel_values"].dtype))


class _FakeSampler:
    """Records every call; response j of prompt i of call c is the ids [c, i, j]."""

    def __init__(self):
        self.calls = []

    def sample(self, prompts, n, sampling):
        from vppo_rollout.sampling import Rollouts

        c = len(self.calls)
        self.calls.append(([p.images[0] if p.images else None for p in prompts], n, sampling.seed))
        ids = [[c, i, j] for i in range(len(prompts)) for j in range(n)]
        return Rollouts([i for i in range(len(prompts)) for _ in range(n)], ids, ["x"] * len(ids), ["stop"] * len(ids),
                        [[0.0] * 3 for _ in ids])  # fmt: skip


def _draws(k: int):
    from vppo_recipes.rl.rollouts import Draw
    from vppo_rollout.prompts import Prompt

    return [Draw(uid=10 + i, row=i, prompt=Prompt("q", [Image.new("RGB", (28, 28), (i, 0, 0))]), answer="1")
            for i in range(k)]  # fmt: skip


def _cfg(engine: str):
    return OmegaConf.create({
        "rollout": {"group_size": 4, "temperature": 1.0, "top_p": 1.0, "top_k": -1, "max_new_tokens": 4,
                    "engine": engine},
        "reward": {"format_weight": 0.1, "multiple_choice": False},
    })  # fmt: skip


@pytest.mark.parametrize("engine", ["transformers", "vllm"], ids=["embedded", "batched_engine"])
def test_a_method_without_the_hook_samples_exactly_as_before(engine):
    """DAPO (the hook's default None) makes the very calls of a run without a method: one per prompt seeded by
    (seed, uid) with the embedded engine, one per rank seeded by (seed, first uid, rank) with vLLM."""
    from vppo_recipes.methods import DAPO
    from vppo_recipes.rl.rollouts import sample_groups
    from vppo_recipes.seeding import mix_seed

    draws = _draws(3)
    a, b = _FakeSampler(), _FakeSampler()
    ga, _, _ = sample_groups(a, draws, cfg=_cfg(engine), seed=7, rank=1)
    gb, _, _ = sample_groups(b, draws, cfg=_cfg(engine), seed=7, rank=1, method=DAPO(), ctx=None)
    assert a.calls == b.calls and [g.token_ids for g in ga] == [g.token_ids for g in gb]
    seeds = [mix_seed(7, d.uid) for d in draws] if engine == "transformers" else [mix_seed(7, 10, 1)]
    assert [c[2] for c in b.calls] == seeds


@pytest.mark.parametrize("engine", ["transformers", "vllm"], ids=["embedded", "batched_engine"])
def test_noised_slots_are_sampled_in_parts_and_put_back_in_slot_order(engine):
    """vLLM: all parts of one size in one batched call (clean 0, noised 0, clean 1, ...); transformers: one call per
    part. Either way response j of the group is the j-th slot's."""
    from vppo_recipes.methods.base import MethodContext
    from vppo_recipes.methods.noisyrollout import NoisyRollout
    from vppo_recipes.rl.rollouts import sample_groups

    draws = _draws(2)
    ctx = MethodContext(None, None, None, 0, torch.float32, torch.device("cpu"), seed=3, step=0, max_steps=60,
                        temperature=1.0, chunk_size=1, micro_batch_size=1, aggregation="token-mean", world=1, rank=0)  # fmt: skip
    s = _FakeSampler()
    groups, _, _ = sample_groups(s, draws, cfg=_cfg(engine), seed=7, rank=0, method=NoisyRollout(), ctx=ctx)
    if engine == "vllm":
        assert len(s.calls) == 1 and s.calls[0][1] == 2
        images = s.calls[0][0]
        assert images[0] is draws[0].prompt.images[0] and images[2] is draws[1].prompt.images[0]
        assert images[1] is not images[0] and images[1].size == images[0].size
        assert [g.token_ids for g in groups] == [[[0, 2 * i + h, j] for h in (0, 1) for j in (0, 1)] for i in (0, 1)]
    else:
        assert [c[1] for c in s.calls] == [2, 2, 2, 2]
        assert s.calls[0][0][0] is draws[0].prompt.images[0] and s.calls[1][0][0] is not draws[0].prompt.images[0]
        assert [g.token_ids for g in groups] == [[[2 * i + h, 0, j] for h in (0, 1) for j in (0, 1)] for i in (0, 1)]
    assert all(g.prompt is d.prompt for g, d in zip(groups, draws)), "the groups keep the clean prompt"
