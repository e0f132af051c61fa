"""The sampler interface the recipes program against: `SamplingConfig`, `Rollouts`, `GroupSampler`."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    import torch

    from vppo_rollout.prompts import Prompt

FINISH_REASONS = ("stop", "length")

# Added tokens a response keeps in its text even where a tokenizer marks them special: the format reward
# (vppo_eval.reward) reads them. Qwen3's vocabulary (Qwen3-VL's too) holds both as added tokens with special=false;
# a tokenizer that marks them special=true would lose them to `skip_special_tokens=True`, and every response its
# format reward.
KEPT_ADDED_TOKENS = ("<think>", "</think>")


def response_decoder(tokenizer) -> Callable[[Sequence[int]], str]:
    """A function ids -> the response's text, for both engines: the tokens `decode(skip_special_tokens=True)`
    drops (added tokens marked special: `<|im_end|>`, `<|endoftext|>`, ...) are dropped, except
    KEPT_ADDED_TOKENS, which stay whatever their flag.

    tokenizer: a transformers tokenizer (`processor.tokenizer`). The set of dropped ids is computed once here.
    """
    added = tokenizer.added_tokens_decoder  # {id: AddedToken}
    drop = {i for i, t in added.items() if t.special and str(t) not in KEPT_ADDED_TOKENS}
    drop |= {i for i in tokenizer.all_special_ids if added.get(i) is None or str(added[i]) not in KEPT_ADDED_TOKENS}

    def decode(ids: Sequence[int]) -> str:
        return tokenizer.decode([int(i) for i in ids if int(i) not in drop], skip_special_tokens=False)

    return decode


@dataclass(frozen=True)
class SamplingConfig:
    """How to sample. Defaults are ALGORITHMS.md §8 evaluation settings except max_new_tokens.

    temperature: 0.0 means greedy; > 0 samples from softmax(logits / temperature).
    top_p: nucleus mass in (0, 1]; 1.0 disables. top_k: -1 (or 0) disables.
    max_new_tokens: response budget; a response that uses it all has finish reason "length".
    stop_token_ids: ids that end a response (kept as its last token); None -> the checkpoint's EOS ids.
    seed: None -> unseeded; an int makes a call reproducible for the same prompts and engine settings.
    logprobs: also return the sampler's log-prob of each sampled token (raw model distribution, temperature 1,
        before top-k/top-p: the same quantity the trainer recomputes as lp_old, ALGORITHMS.md notation).
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 2048
    stop_token_ids: tuple[int, ...] | list[int] | None = None
    seed: int | None = None
    logprobs: bool = False

    def __post_init__(self) -> None:
        if not (
            isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature) and self.temperature >= 0
        ):
            raise ValueError(f"temperature: expected a finite float >= 0 (0 = greedy), got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise ValueError(f"top_p: expected a float in (0, 1] (1.0 disables), got {self.top_p!r}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise ValueError(f"top_k: expected an int >= 1, or -1 / 0 to disable, got {self.top_k!r}")
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens: expected an int >= 1, got {self.max_new_tokens!r}")
        if self.stop_token_ids is not None:
            ids = list(self.stop_token_ids)
            if not ids or not all(isinstance(i, int) and i >= 0 for i in ids):
                raise ValueError(
                    f"stop_token_ids: expected a non-empty list of token ids or None, got {self.stop_token_ids!r}"
                )
        if self.seed is not None and not isinstance(self.seed, int):
            raise ValueError(f"seed: expected an int or None, got {self.seed!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass
class Rollouts:
    """Sampled responses, ordered group by group: prompt 0's n responses, then prompt 1's n, ...

    group_index[r]: index (in the `prompts` passed to `sample`) of the prompt response r answers.
    token_ids[r]: sampled ids, the stop token included when one ended the response.
    texts[r]: decoded response without special tokens (`response_decoder`: reasoning tags are kept).
    finish_reasons[r]: "stop" (a stop token was sampled) | "length" (max_new_tokens reached).
    logprobs[r][t]: the sampler's log-prob of token_ids[r][t], or None when not requested/available.
    """

    group_index: list[int]
    token_ids: list[list[int]]
    texts: list[str]
    finish_reasons: list[str]
    logprobs: list[list[float]] | None = None

    def __post_init__(self) -> None:
        n = len(self.group_index)
        for name in ("token_ids", "texts", "finish_reasons"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"Rollouts.{name}: {len(getattr(self, name))} entries for {n} responses")
        bad = [f for f in self.finish_reasons if f not in FINISH_REASONS]
        if bad:
            raise ValueError(f"Rollouts.finish_reasons: {bad[0]!r} is not one of {FINISH_REASONS}")
        if any(b < a for a, b in zip(self.group_index, self.group_index[1:])):
            raise ValueError("Rollouts.group_index: responses must be ordered group by group (non-decreasing)")
        if self.logprobs is not None:
            if len(self.logprobs) != n:
                raise ValueError(f"Rollouts.logprobs: {len(self.logprobs)} entries for {n} responses")
            for r, (lp, ids) in enumerate(zip(self.logprobs, self.token_ids)):
                if len(lp) != len(ids):
                    raise ValueError(f"Rollouts.logprobs[{r}]: {len(lp)} values for {len(ids)} tokens")

    def __len__(self) -> int:
        return len(self.group_index)

    @property
    def response_lengths(self) -> list[int]:
        return [len(t) for t in self.token_ids]

    def prompts_for(self, prompts: Sequence[Prompt]) -> list[Prompt]:
        """The prompt of every response (for `collate_rollout(processor, rollouts.prompts_for(prompts), ...)`)."""
        return [prompts[g] for g in self.group_index]


def check_n(n) -> int:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"n: expected the group size as an int >= 1, got {n!r}")
    return n


def check_sample_arguments(
    prompts: Iterable[Prompt], n: int, sampling: SamplingConfig, checkpoint_eos: Sequence[int]
) -> tuple[list[Prompt], int, list[int]]:
    """The arguments of `GroupSampler.sample`, checked alike by every engine -> (prompts as a list, n, stop ids).

    Args:
        prompts: the prompts of the call (any iterable; an empty one is refused).
        n: responses per prompt (`check_n`).
        sampling: a `SamplingConfig` (a dict of its fields is refused: build the dataclass, which checks them).
        checkpoint_eos: the checkpoint's EOS ids, the stop ids when `sampling.stop_token_ids` is None; may be
            empty, which is refused only when the stop ids would come from it.

    Returns:
        (prompts, n, stop token ids): the ids that end a response, kept as its last token.
    """
    n = check_n(n)
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling: expected a SamplingConfig, got {type(sampling).__name__}")
    prompts = list(prompts)
    if not prompts:
        raise ValueError("prompts: empty list")
    stop = list(sampling.stop_token_ids) if sampling.stop_token_ids else list(checkpoint_eos)
    if not stop:
        raise ValueError(
            "stop_token_ids: the checkpoint defines no EOS token; pass SamplingConfig(stop_token_ids=[...])"
        )
    return prompts, n, stop


@runtime_checkable
class GroupSampler(Protocol):
    """What a recipe needs from a rollout engine; `TransformersSampler` and `VLLMSampler` implement it."""

    def sample(self, prompts: Sequence[Prompt], n: int, sampling: SamplingConfig) -> Rollouts:
        """n responses per prompt, ordered group by group."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Load trainer weights (HF parameter names, full tensors) into the engine."""
        ...

    def sleep(self) -> None:
        """Release accelerator memory between rollouts where the engine supports it."""
        ...

    def wake_up(self) -> None:
        """Undo `sleep` before the next `update_weights` / `sample`."""
        ...

    def close(self) -> None:
        """Release the engine (the last call; vLLM with external_launcher also ends torch.distributed)."""
        ...
