"""`validate=False`: the same results with no tensor-to-Python conversion (a device-to-host sync on a GPU)."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from vppo_core.logprobs import logprobs_from_hidden
from vppo_core.losses import policy_loss

CONVERSIONS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_conversions():
    """Count every tensor -> Python conversion while active (the list's length)."""
    calls: list[str] = []
    originals = {name: getattr(torch.Tensor, name) for name in CONVERSIONS}

    def counting(name):
        def method(self, *args, **kwargs):
            calls.append(name)
            return originals[name](self, *args, **kwargs)

        return method

    for name in CONVERSIONS:
        setattr(torch.Tensor, name, counting(name))
    try:
        yield calls
    finally:
        for name, fn in originals.items():
            setattr(torch.Tensor, name, fn)


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    B, L, H, V = 3, 5, 8, 11
    hidden = torch.randn(B, L, H, generator=g, requires_grad=True)
    weight = torch.randn(V, H, generator=g, requires_grad=True)
    labels = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L)
    mask[1, 3:] = 0
    return hidden, weight, labels, mask, torch.randn(B, generator=g), (torch.rand(B, L, generator=g) > 0.5).float()


def test_the_update_path_without_validation_converts_nothing_and_equals_the_checked_one():
    hidden, weight, labels, mask, adv, weights = _inputs()
    results = {}
    for validate in (True, False):
        with count_conversions() as calls:
            lp = logprobs_from_hidden(hidden, weight, labels, chunk_size=4, validate=validate)
            loss, metrics = policy_loss(
                lp, lp.detach() - 0.1, adv, mask, token_weights=weights, entropy_coef=0.06,
                num_tokens=mask.sum(), validate=validate,
            )  # fmt: skip
            loss.backward()
        results[validate] = (float(loss), hidden.grad.clone(), {k: float(v) for k, v in metrics.items()}, len(calls))
        hidden.grad = weight.grad = None
    assert results[False][3] == 0, "a conversion on the no-validation path"
    assert results[True][3] > 0, "the counter saw nothing: the test could not fail"
    assert results[True][0] == results[False][0] and torch.equal(results[True][1], results[False][1])
    assert results[True][2] == results[False][2]


def test_without_validation_non_finite_values_reach_the_loss_instead_of_raising():
    hidden, weight, labels, mask, adv, _ = _inputs()
    lp = logprobs_from_hidden(hidden, weight, labels)
    bad = lp.detach().clone()
    bad[0, 0] = math.nan
    with pytest.raises(ValueError, match="lp_old contains NaN"):
        policy_loss(lp, bad, adv, mask)
    loss, _ = policy_loss(lp, bad, adv, mask, validate=False)
    assert math.isnan(float(loss))
