"""VAPO's method hooks without a model (ALGORITHMS.md §9.12): its dataset columns, its reward's group advantages in
`shape` from each row's grade (`MicroBatch.rewards`) and perception score, and the released scripts' setting
(`vapo_anchor_weight=0`), whose advantages are the recipe's bit for bit."""

from __future__ import annotations

import pytest
import torch

from vppo_core.advantages import group_advantages
from vppo_recipes.methods import build_method
from vppo_recipes.methods.records import MicroBatch, MicroStep, NoGradPass


def _step(uids, acc, fmt, perception=None) -> MicroStep:
    b = len(uids)
    reward = [0.9 * a + 0.1 * f for a, f in zip(acc, fmt)]  # the recipe's grade at format_weight 0.1
    mb = MicroBatch(
        {}, torch.zeros(b, 3, dtype=torch.long), torch.ones(b, 3), 5, torch.zeros(b), list(uids), list(range(b)),
        [1] * b, torch.zeros(b, 3),
        rewards={"reward": torch.tensor(reward), "accuracy": torch.tensor(acc), "format": torch.tensor(fmt)},
    )  # fmt: skip
    scores = {} if perception is None else {
        "perception": torch.tensor(perception, dtype=torch.float64), "agreement": torch.ones(b, 2)
    }  # fmt: skip
    return MicroStep(mb, NoGradPass(torch.zeros(b, 3), scores=scores))


def test_the_claim_columns_are_declared_only_when_the_probe_runs():
    assert build_method({"name": "vapo"}).data_columns()[:4] == ("claim_1", "label_1", "claim_2", "label_2")
    assert len(build_method({"name": "vapo"}).data_columns()) == 40
    assert build_method({"name": "vapo", "vapo_anchor_weight": 0.0}).data_columns() == ()
    assert build_method({"name": "dapo"}).data_columns() == ()  # every other method: none


def test_shape_gives_the_group_advantages_of_vapos_reward_across_micro_batches():
    """Two groups of 4 split 3 + 5 over micro-batches; the reward 0.8·acc + 0.1·format + 0.1·[acc = 1]·P by hand."""
    vapo = build_method({"name": "vapo"})
    acc = [1.0, 1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0]
    fmt = [1.0, 1.0, 1.0, 0.0, 0.0, 1.0, 1.0, 1.0]
    P = [1.0, 0.0, 0.5, 0.0, 0.25, 1.0, 0.0, 0.0]  # P of an incorrect response does not count
    uids = [7] * 4 + [9] * 4
    steps = [[_step(uids[:3], acc[:3], fmt[:3], P[:3]), _step(uids[3:], acc[3:], fmt[3:], P[3:])]]
    shaped = vapo.shape(None, steps)[0]
    got = torch.cat([s.advantages for s in shaped])
    R = [1.0, 0.9, 0.1, 0.0, 0.825, 0.1, 0.1, 0.1]
    want = []
    for g in (R[:4], R[4:]):
        mean = sum(g) / 4
        std = (sum((x - mean) ** 2 for x in g) / 3) ** 0.5
        want += [(x - mean) / (std + 1e-6) for x in g]
    assert torch.allclose(got.double(), torch.tensor(want, dtype=torch.float64), atol=1e-6)
    assert torch.allclose(torch.cat([s.outputs["reward"] for s in shaped]).double(), torch.tensor(R).double())
    assert [s.advantages.shape[0] for s in shaped] == [3, 5] and all(s.token_weights is None for s in shaped)


def test_without_the_anchor_weight_the_advantages_are_the_recipes_bit_for_bit():
    """`vapo_anchor_weight=0`, what the released scripts train: no probe, and the recipe's group advantages."""
    vapo = build_method({"name": "vapo", "vapo_anchor_weight": 0.0})
    acc, fmt = [1.0, 0.0, 1.0, 0.0, 0.0, 1.0], [1.0, 1.0, 0.0, 0.0, 1.0, 1.0]
    steps = [[_step([3] * 3 + [4] * 3, acc, fmt)]]
    assert vapo.scores(None, steps[0][0].batch, {}, None, []) == {}
    recipe = group_advantages(torch.tensor([0.9 * a + 0.1 * f for a, f in zip(acc, fmt)], dtype=torch.float32), 3)
    assert torch.equal(vapo.shape(None, steps)[0][0].advantages, recipe)


def test_rows_that_are_not_whole_groups_are_refused():
    vapo = build_method({"name": "vapo"})
    with pytest.raises(ValueError, match="not whole groups"):
        vapo.shape(None, [[_step([1, 1, 2], [1.0] * 3, [1.0] * 3, [0.0] * 3)]])
