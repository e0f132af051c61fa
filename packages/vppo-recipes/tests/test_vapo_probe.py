"""VAPO's probe (ALGORITHMS.md §9.12, `vppo_recipes.methods.vapo.AnchorProbe`) on the tiny Qwen2.5-VL: its batched,
padded verdicts equal a plain one-row-at-a-time computation from the full logits (vLLM's rule: every token but the
allowed ones −inf, then the argmax), one forward per anchor index, anchors drawn from the run seed and the response's
identity only."""

from __future__ import annotations

import pytest
import torch

RESPONSES = [
    "<think>The top-left shape is red. It has, maybe, two sides; no: three!</think> \\boxed{red}",
    "<think>Count: one, two.</think> \\boxed{2}",
    "\\boxed{left}",  # no reasoning span: every anchor at the last character
]


@pytest.fixture(scope="module")
def probe_setup(tmp_path_factory):
    from vppo_eval.synthetic import build_visual_task
    from vppo_recipes.methods.base import MethodContext
    from vppo_recipes.methods.records import MicroBatch
    from vppo_rollout.collate import collate_rollout, model_inputs
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.prompts import build_prompt
    from vppo_rollout.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("vapo")
    ckpt = build_tiny_checkpoint(root / "ckpt", "qwen2_5_vl", seed=0)
    rows = build_visual_task(root / "task", n_train=3, n_test=1, seed=0)["train"]
    model, processor = load_policy(ckpt).eval(), load_processor(ckpt)
    prompts = [build_prompt(processor, rows[i]["problem"], rows[i]["images"]) for i in range(3)]
    ids = [processor.tokenizer.encode(t, add_special_tokens=False) for t in RESPONSES]
    batch = collate_rollout(processor, prompts, ids, config=model.config)
    mb = MicroBatch(
        inputs=model_inputs(batch), responses=batch["responses"], mask=batch["response_mask"],
        prompt_length=int(batch["prompt_length"]), advantages=torch.zeros(3), uids=[4, 4, 9], response_index=[0, 1, 0],
        images_per_row=[len(p.images) for p in prompts], lp_sampler=torch.zeros(batch["responses"].shape),
        prompts=prompts, texts=list(RESPONSES),
    )  # fmt: skip
    ctx = MethodContext(
        model=model, processor=processor, model_config=model.config, image_token_id=int(model.config.image_token_id),
        dtype=torch.float32, device=torch.device("cpu"), seed=7, step=0, max_steps=1, temperature=1.0, chunk_size=64,
        micro_batch_size=3, aggregation="token-mean", world=1, rank=0,
    )  # fmt: skip
    return ctx, mb


def _single(ctx, prompt, text: str) -> dict:
    from vppo_rollout.collate import collate_rollout, model_inputs

    ids = ctx.processor.tokenizer.encode(text, add_special_tokens=False)
    return model_inputs(collate_rollout(ctx.processor, [prompt], [ids], config=ctx.model_config))


def _plain_verdict(ctx, prompt, text: str, yes: list[int], no: list[int]) -> bool:
    logits = ctx.model(**_single(ctx, prompt, text), use_cache=False).logits[0, -1].double()
    masked = torch.full_like(logits, -torch.inf)
    masked[yes + no] = logits[yes + no]
    return int(masked.argmax()) in yes


def test_verdicts_equal_a_plain_row_by_row_computation(probe_setup):
    from vppo_core import anchor_positions
    from vppo_recipes.methods.vapo import ANCHOR_SEED_SALT, AnchorProbe, verdict_token_ids
    from vppo_recipes.seeding import mix_seed

    ctx, mb = probe_setup
    k = 3
    probe = AnchorProbe(k=k)
    claims = [[f"The image shows {w} shapes." for w in ("two", "red", "no")] for _ in mb.texts]
    question = "\n<anchor>{} Is this claim correct? Answer (Yes/No): "
    queries = [
        [text[: p + 1] + question.format(c) for p, c in zip(pos, row)]
        for text, pos, row in zip(mb.texts, probe.positions(ctx, mb), claims)
    ]
    # The tiny vocabulary has one yes word ("1") and one no word ("0"), and every query ends with the same tokens,
    # so the random policy gives one verdict everywhere. Make the yes row the no row plus u, u the first query's
    # last hidden state minus the mean, orthogonal to the mean: yes - no = u·h then takes both signs.
    yes, no = verdict_token_ids(ctx.processor.tokenizer)
    with torch.no_grad():
        h = torch.stack(
            [
                ctx.model.model(**_single(ctx, mb.prompts[i], q), use_cache=False).last_hidden_state[0, -1]
                for i, row in enumerate(queries)
                for q in row
            ]
        )
        m = h.mean(0)
        d = h[0] - m
        ctx.model.lm_head.weight[yes[0]] = ctx.model.lm_head.weight[no[0]] + (d - (d @ m) / (m @ m) * m)
    calls = []
    hook = ctx.model.model.register_forward_hook(lambda *_: calls.append(1))
    try:
        positions, verdicts = probe.verdicts(ctx, mb, claims)
    finally:
        hook.remove()
    assert len(calls) == k and verdicts.shape == (3, k) and verdicts.dtype == torch.bool
    assert verdicts.any() and not verdicts.all(), verdicts  # both verdicts occur: the comparison can fail
    for i, text in enumerate(mb.texts):
        g = torch.Generator().manual_seed(mix_seed(ctx.seed, mb.uids[i], mb.response_index[i], ANCHOR_SEED_SALT))
        tokens = int(mb.inputs["attention_mask"][i].sum())
        assert positions[i] == anchor_positions(text, k, generator=g, num_tokens=tokens)
        for j in range(k):
            assert text[: positions[i][j] + 1] + question.format(claims[i][j]) == queries[i][j]
            assert bool(verdicts[i, j]) == _plain_verdict(ctx, mb.prompts[i], queries[i][j], yes, no), (i, j)
    assert positions[2] == [len(RESPONSES[2]) - 1] * k  # no reasoning span, no candidate
    assert positions[1] == [12, 17, 22]  # k = 3 of the three candidates of "<think>Count: one, two.": all


def test_anchors_depend_on_the_response_not_the_batch(probe_setup):
    import dataclasses

    from vppo_recipes.methods.vapo import AnchorProbe

    ctx, mb = probe_setup
    probe = AnchorProbe(k=2)
    first = probe.positions(ctx, mb)
    assert probe.positions(ctx, mb) == first
    swapped = dataclasses.replace(mb, texts=[mb.texts[0]] * 3, uids=[4, 4, 4], response_index=[0, 0, 0])
    assert probe.positions(ctx, swapped)[1] == first[0]  # the same response identity, the same draw
    with pytest.raises(ValueError, match="claims"):
        probe.verdicts(ctx, mb, [["a", "b"]])


def test_verdict_token_ids_need_a_single_token_yes_and_no():
    from vppo_recipes.methods.vapo import verdict_token_ids

    class Tok:
        def __init__(self, vocab):
            self.vocab = vocab

        def encode(self, word, add_special_tokens=False):
            return [self.vocab[word]] if word in self.vocab else [1, 2]

    assert verdict_token_ids(Tok({"Yes": 5, "1": 3, "No": 9})) == ([3, 5], [9])
    with pytest.raises(ValueError):
        verdict_token_ids(Tok({"Yes": 5}))


def test_verdicts_under_fsdp2_equal_the_plain_model(probe_setup):
    """The probe reads the LM head inside the root forward (`ctx.in_root`): on a 1-rank FSDP2-sharded copy its
    verdicts equal the unsharded model's."""
    import copy
    import dataclasses
    import os

    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from vppo_recipes.methods.vapo import AnchorProbe
    from vppo_recipes.sharding import shard_policy

    ctx, mb = probe_setup
    probe = AnchorProbe(k=2)
    claims = [["A red shape.", "Two shapes."] for _ in mb.texts]
    want = probe.verdicts(ctx, mb, claims)
    sharded = copy.deepcopy(ctx.model)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_policy(sharded, init_device_mesh("cpu", (1,)))
        got = probe.verdicts(dataclasses.replace(ctx, model=sharded), mb, claims)
    finally:
        dist.destroy_process_group()
    assert got[0] == want[0] and torch.equal(got[1], want[1])
