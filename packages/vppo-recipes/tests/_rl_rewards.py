"""Rewards that make a random tiny model's RL step do something: shared by the in-process RL tests."""

from __future__ import annotations


def alternate_rewards(monkeypatch) -> None:
    """Replace the RL recipe's rewards by 0, 1, 0, 1, ... over each batch's responses (the grader's other outputs
    kept): the random model earns 0 everywhere, so every advantage, gradient and update would otherwise be 0."""
    import vppo_recipes.rl.rollouts as rl  # where the recipe grades its groups

    graded = rl.compute_rewards

    def alternating_rewards(texts, *args, **kwargs):
        out = graded(texts, *args, **kwargs)
        out["reward"] = [float(i % 2) for i in range(len(texts))]
        return out

    monkeypatch.setattr(rl, "compute_rewards", alternating_rewards)
