"""The baselines: GRPO and DAPO (ALGORITHMS.md §6, §7). Every token of a response gets its group advantage; no
altered view, no score. They differ only in the rest of the config (DAPO's clip-higher, token-mean loss and online
filter are `loss.*` / `rollout.*` keys), so both are the seam's default hooks under their own names."""

from __future__ import annotations

from dataclasses import dataclass

from vppo_recipes.methods.base import Method


@dataclass(frozen=True)
class GRPO(Method):
    name = "grpo"


@dataclass(frozen=True)
class DAPO(Method):
    name = "dapo"
