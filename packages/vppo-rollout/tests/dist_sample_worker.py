"""Worker for test_transformers_engine.py::test_sharded_sampler_ranks_finishing_at_different_steps (torchrun, 2 ranks).

Each rank samples from the same FSDP2-sharded tiny model; rank 0's responses stop after one token, rank 1's run to
max_new_tokens, so rank 0 must keep joining the all-gathers (synced_gpus). Then update_weights copies full tensors
of another checkpoint into the DTensor parameters. Writes rank 1's results to OUT/rank1.json.
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from torch.distributed.fsdp import fully_shard

from vppo_rollout import SamplingConfig, TransformersSampler, build_prompt, load_policy, load_processor


def main(ckpt: str, other_ckpt: str, out: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    torch.set_num_threads(1)
    processor = load_processor(ckpt)
    model = load_policy(ckpt)
    for layer in model.model.language_model.layers:
        fully_shard(layer)
    for block in model.model.visual.blocks:
        fully_shard(block)
    fully_shard(model)
    sampler = TransformersSampler(model, processor)
    assert sampler.synced_gpus, "auto-detection of the sharded model failed"
    vocab = model.config.text_config.vocab_size
    stop = list(range(vocab)) if rank == 0 else [vocab + 1]
    prompt = build_prompt(processor, "How many red circles?", [])
    ro = sampler.sample([prompt], 2, SamplingConfig(temperature=0.0, max_new_tokens=6, stop_token_ids=stop))
    other = load_policy(other_ckpt)
    copied = sampler.update_weights(other.named_parameters())
    after = sampler.sample([prompt], 1, SamplingConfig(temperature=0.0, max_new_tokens=6, stop_token_ids=[vocab + 1]))
    if rank == 1:
        with open(os.path.join(out, "rank1.json"), "w") as f:
            json.dump(
                {"before": ro.token_ids, "reasons": ro.finish_reasons, "after": after.token_ids, "copied": copied}, f
            )
    if rank == 0:
        assert all(len(t) == 1 for t in ro.token_ids) and set(ro.finish_reasons) == {"stop"}
    dist.barrier()
    dist.destroy_process_group()
    sys.stdout.flush()
    os._exit(0)  # see ENVIRONMENT.md: avoids a rare SIGABRT at interpreter exit after gloo runs


if __name__ == "__main__":
    main(*sys.argv[1:4])
