"""FSDP2's "returned a view tensor" warning (issue 24): its cause, its removal, and the gradients on both sides.

Cause: the RL update's log-prob pass runs `response_pass` as a forward method of the FSDP2 root
(`call_in_root_forward`), and it returned the last hidden state `out.last_hidden_state[:, span]`, a view, next to
the log-probs. FSDP2 registers a pre-backward hook on every grad-requiring output of a forward and warns for each
view (torch/distributed/fsdp/_fully_shard/_fsdp_state.py, `_register_pre_backward_hook`): an in-place op on the view
would drop its hook. The update never read that hidden state, so no hook was lost and the gradients were right
(the parametrised test below shows it), but every run warned. Now the grad pass does not return it.
"""

from __future__ import annotations

import copy
import os
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

sys.path.insert(0, str(Path(__file__).parent))
from test_rl_distributed import _one_rl_step_in_process

VIEW_WARNING = "returned a view tensor"


def _view_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if VIEW_WARNING in str(w.message)]


@pytest.fixture(scope="module")
def tiny_batch(tmp_path_factory):
    from vppo_eval.synthetic import build_visual_task
    from vppo_rollout.collate import collate_rollout, model_inputs
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.prompts import build_prompt
    from vppo_rollout.tiny import build_tiny_checkpoint

    root = tmp_path_factory.mktemp("views")
    ckpt = build_tiny_checkpoint(root / "ckpt", "qwen2_5_vl", seed=0)
    rows = build_visual_task(root / "task", n_train=2, n_test=1, seed=0)["train"]
    model, processor = load_policy(ckpt), load_processor(ckpt)
    tok = processor.tokenizer
    prompts = [build_prompt(processor, rows[i]["problem"], rows[i]["images"]) for i in range(2)]
    responses = [tok("<think>two red</think> \\boxed{2}")["input_ids"], tok("\\boxed{left}")["input_ids"]]
    batch = collate_rollout(processor, prompts, responses, config=model.config)
    return model, model_inputs(batch), batch["responses"], batch["prompt_length"], batch["response_mask"]


@pytest.mark.parametrize("with_hidden", [False, True], ids=["update-pass", "old-update-pass"])
def test_the_sharded_log_prob_pass_warns_only_when_it_returns_the_hidden_view_and_its_gradients_are_right(
    tiny_batch, with_hidden
):
    """A 1-rank FSDP2 model (the recipe's sharding, its hooks) vs the plain model: the gradient of the summed
    response log-probs is the same whether or not the pass also returns the hidden-state view; the warning comes
    exactly from that view."""
    from vppo_recipes.forward import response_pass
    from vppo_recipes.sharding import call_in_root_forward, shard_policy

    model, inputs, responses, prompt_length, mask = tiny_batch
    plain, sharded = copy.deepcopy(model).train(), copy.deepcopy(model).train()

    def loss(m):
        out = call_in_root_forward(
            m, response_pass, inputs, responses, prompt_length, temperature=1.0, chunk_size=3, with_hidden=with_hidden
        )
        assert ("hidden" in out) == with_hidden
        return (out["lp"] * mask).sum()

    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        shard_policy(sharded, init_device_mesh("cpu", (1,)))
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            loss(sharded).backward()
        grads = {n: p.grad.full_tensor() for n, p in sharded.named_parameters() if p.grad is not None}
    finally:
        dist.destroy_process_group()
    loss(plain).backward()
    want = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    assert grads.keys() == want.keys() and len(want) > 0
    for name, g in want.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-5, atol=1e-7, msg=name)
    assert bool(_view_warnings(caught)) == with_hidden, _view_warnings(caught)


def test_an_rl_step_emits_no_fsdp_view_warning(tmp_path, monkeypatch):
    """The whole step in process (1-rank gloo, FSDP2), with an update that runs: no "returned a view tensor"."""

    from _rl_rewards import alternate_rewards

    alternate_rewards(monkeypatch)  # the random model earns 0 everywhere: no update otherwise
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        metrics = _one_rl_step_in_process(tmp_path, "tiny_vppo", {"rollout.online_filter": "false"})
    assert metrics["optimizer_steps"] > 0 and metrics["grad_norm"] > 0
    assert not _view_warnings(caught), _view_warnings(caught)[0]
