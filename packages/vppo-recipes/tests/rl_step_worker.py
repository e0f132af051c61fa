"""One `rl_step` of the RL recipe on every rank, for test_rl_step_independent.py's multi-process check.

    torchrun --nproc_per_node 2 rl_step_worker.py CONFIG.yaml OUT_DIR [BUDGET ...]

Each rank writes OUT_DIR/rank{r}.pt: what `capture_step` saw (its micro-batches, rewards, the weights before and
after, the step's metrics), loadable with `torch.load(..., weights_only=True)`. With BUDGETs: one step per batch.max_tokens_per_micro_batch
value, each from the config's weights on the rollouts the first one sampled, in OUT_DIR/rank{r}_budget{B}.pt.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))


def main(config_path: str, out: str, *budgets: str) -> None:
    import pytest
    import torch
    import torch.distributed as dist
    from omegaconf import OmegaConf
    from test_rl_step_independent import capture_step, step_with_rollouts

    import vppo_recipes.rl.rl_distributed as rl
    from vppo_recipes.config_schema import validate_config

    cfg = validate_config(OmegaConf.load(config_path), "rl")
    if budgets:  # one step per token budget, each from the same weights on the first one's rollouts
        rollouts = None
        for budget in budgets:
            cfg.batch.max_tokens_per_micro_batch = int(budget)
            cfg.metric_logger.log_dir = str(Path(out) / f"logs_budget{budget}")
            captured, rollouts = step_with_rollouts(cfg, rollouts)
            torch.save(captured, Path(out) / f"rank{dist.get_rank()}_budget{budget}.pt")
        dist.barrier()
        dist.destroy_process_group()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    recipe = rl.RLRecipeDistributed(cfg)  # joins the torchrun process group
    recipe.setup(cfg)
    with pytest.MonkeyPatch.context() as mp:
        captured = capture_step(recipe, mp)
    torch.save(captured, Path(out) / f"rank{dist.get_rank()}.pt")
    recipe.cleanup()  # destroys the process group
    # Known gloo exit-time abort (ENVIRONMENT.md): skip C++ static destructors once all work is done.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main(*sys.argv[1:])
