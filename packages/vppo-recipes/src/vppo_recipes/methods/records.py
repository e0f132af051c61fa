"""What the RL recipe's phases hand each other per micro-batch, and what a method's hooks read and return.

Frozen: a phase reads its inputs and returns new values, never writes into them. One `MicroStep` per micro-batch
carries everything a later phase needs about it (its tensors, its no-grad pass, its shaping), instead of parallel
lists zipped together.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # vppo_rollout imports transformers: kept out of the config check's imports
    from vppo_rollout.prompts import Prompt


# What each response's grade holds (`vppo_eval.reward.compute_rewards`), per row of `MicroBatch.rewards`.
REWARD_PARTS = ("reward", "accuracy", "format")


@dataclass(frozen=True)
class MicroBatch:
    """One forward's worth of this rank's responses: the tensors every pass over them needs."""

    inputs: dict[str, torch.Tensor]  # the model's forward tensors (collate_rollout -> model_inputs)
    responses: torch.Tensor  # [b, L] long
    mask: torch.Tensor  # [b, L] float
    prompt_length: int
    advantages: torch.Tensor  # [b] float32, the groups' advantages (before any shaping)
    uids: list[int]  # per row: the prompt's number among the run's usable examples (seeds its views)
    response_index: list[int]  # per row: the response's index in its group
    images_per_row: list[int]
    lp_sampler: torch.Tensor  # [b, L] the rollout engine's log-probs of the responses (0 on padding)
    prompts: list[Prompt] = field(default_factory=list, compare=False, repr=False)  # per row
    texts: list[str] = field(default_factory=list, compare=False, repr=False)  # per row: the decoded response
    # per row, for a method whose reward is its own (`Method.data_columns`, base.py): the recipe's grade,
    # {"reward", "accuracy", "format"} each [b] float32 (the advantages are of "reward"), and the row's
    # `data_columns` cells by column name ({} when the method declares none)
    rewards: Mapping[str, torch.Tensor] = field(default_factory=dict, compare=False, repr=False)
    extra: list[Mapping[str, Any]] = field(default_factory=list, compare=False, repr=False)


@dataclass(frozen=True)
class ViewInputs:
    """The inputs of one altered no-grad pass: the forward tensors, their prompt length (only a view that removes
    the image changes it) and the context the forward runs in (an attention intervention; a null context else)."""

    inputs: dict[str, torch.Tensor]
    prompt_length: int
    context: Any


@dataclass(frozen=True)
class NoGradPass:
    """The no-grad passes over one micro-batch before any update: lp_old on the clean inputs; with altered views,
    each view's log-probs, the token visual dependency S and its per-response mean; and the per-token scores the
    method declares (`Method.scores`), by name."""

    lp_old: torch.Tensor  # [b, L]
    lp_views: tuple[torch.Tensor, ...] = ()  # [b, L] per altered view, in `views` order
    S: torch.Tensor | None = None  # [b, L] k3(lp_views[0] ‖ lp_old), or the exact full-vocabulary KL
    traj_dep: torch.Tensor | None = None  # [b] mean S over each response's tokens
    scores: Mapping[str, torch.Tensor] = field(default_factory=dict)  # the method's own, e.g. "entropy" [b, L]


@dataclass(frozen=True)
class Shaping:
    """A method's shaping of one micro-batch: what the loss reads besides lp_old, and what the method logs."""

    advantages: torch.Tensor  # [b] the advantage each response's policy term uses
    token_weights: torch.Tensor | None = None  # [b, L] per-token weights of the policy term; None = all ones
    outputs: Mapping[str, torch.Tensor] = field(default_factory=dict)  # for the method's metrics, e.g. "alpha" [b]


@dataclass(frozen=True)
class Shaped:
    """The loss inputs of one micro-batch: the method's shaping with the truncated importance weights applied."""

    advantages: torch.Tensor  # [b]
    token_weights: torch.Tensor | None  # [b, L] the method's token weights times is_weights; None = all ones
    is_weights: torch.Tensor | None  # [b, L] truncated importance weights (loss.rollout_is_cap), or None
    outputs: Mapping[str, torch.Tensor] = field(default_factory=dict)  # the method's Shaping.outputs


@dataclass(frozen=True)
class MicroStep:
    """One micro-batch through the step: its tensors, then its no-grad pass, then its shaping (each phase returns
    a new MicroStep with its own field set)."""

    batch: MicroBatch
    no_grad: NoGradPass | None = None
    shaped: Shaped | None = None


def check_shapings(method_name: str, steps: Sequence[Sequence[MicroStep]], shapings: Sequence[Sequence[Shaping]]):
    """A method's `shape` result: one `Shaping` per micro-batch ([mini][micro], as `steps`), advantages [b] and token
    weights [b, L] floating or None. Shapes only (no host sync); raises ValueError naming the method. A missing
    micro-batch would have this rank run fewer forwards than the others (FSDP hangs) or lose its data."""
    if len(shapings) != len(steps) or any(len(a) != len(b) for a, b in zip(steps, shapings)):
        raise ValueError(
            f"method {method_name}: shape() must return one Shaping per micro-batch, [mini][micro] = "
            f"{[len(m) for m in steps]}; got {[len(m) for m in shapings]}"
        )
    for mini, mini_shapings in zip(steps, shapings):
        for s, sh in zip(mini, mini_shapings):
            b, L = s.batch.responses.shape
            weights = sh.token_weights
            if tuple(sh.advantages.shape) != (b,) or (
                weights is not None and (tuple(weights.shape) != (b, L) or not weights.is_floating_point())
            ):
                raise ValueError(
                    f"method {method_name}: shape() gave advantages {tuple(sh.advantages.shape)} and token weights "
                    f"{None if weights is None else (tuple(weights.shape), weights.dtype)}; expected [b]=({b},) and "
                    f"[b, L]=({b}, {L}) floating or None"
                )


def check_aux_terms(method_name: str, terms: Mapping[str, Any], mask: torch.Tensor) -> None:
    """A method's `aux_terms` result: {name: (coefficient, per-token value [b, L] floating)}; shapes only."""
    for name, item in terms.items():
        ok = isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], (int, float))
        if not ok or not isinstance(item[1], torch.Tensor) or item[1].shape != mask.shape:
            got = [getattr(x, "shape", type(x).__name__) for x in item] if isinstance(item, tuple) else type(item)
            raise ValueError(
                f"method {method_name}: aux_terms()[{name!r}] must be (coefficient, a [b, L]={tuple(mask.shape)} "
                f"tensor); got {got}"
            )
