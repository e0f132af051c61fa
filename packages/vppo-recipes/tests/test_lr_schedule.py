import pytest
import torch

from vppo_recipes.lr_schedule import constant_with_warmup


def _lrs(warmup: int, steps: int) -> list[float]:
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    sched = constant_with_warmup(opt, warmup)
    out = []
    for _ in range(steps):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def test_warmup_rises_linearly_from_lr_over_warmup_then_stays_constant():
    assert _lrs(4, 6) == pytest.approx([0.125, 0.25, 0.375, 0.5, 0.5, 0.5])


def test_zero_warmup_is_constant_from_the_first_step():
    assert _lrs(0, 3) == [0.5, 0.5, 0.5]


def test_negative_warmup_is_rejected_naming_the_key():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.5)
    with pytest.raises(ValueError, match="warmup_steps"):
        constant_with_warmup(opt, -1)
