"""The forwards of the RL recipe under FSDP2: response log-probs (and what the methods also read from the same
forward) straight from the last hidden state, and the full-vocabulary quantities that read the LM-head weight.

Each function that reads `model.lm_head.weight` must run through `sharding.call_in_root_forward(model, fn, ...)`
(see `response_logprobs`), so that under FSDP2 it sees the full weight; without FSDP it is a plain call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from vppo_core.dependency import (
    exact_token_dependency_from_hidden,
    top_p_entropy_from_hidden,
    view_divergences_from_hidden,
)
from vppo_core.logprobs import logprobs_from_hidden
from vppo_core.shaping import pepo_layer_cosines, pepo_prior_mean, pepo_visual_weights


def response_logprobs(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    responses: torch.Tensor,
    prompt_length: int,
    *,
    temperature: float,
    chunk_size: int,
    with_hidden: bool = False,
    validate: bool = True,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Log-prob of every response token, straight from the last hidden state (never [B, L, V] logits).

    Must run through `sharding.call_in_root_forward(model, response_logprobs, ...)`. Why: under FSDP2 the
    LM-head weight lives in the root unit and is a sharded DTensor outside a root forward. We cannot call
    `model(...)` (it would project every position to the vocabulary), and reading `model.lm_head.weight` after
    `model.model(...)` would see the shard. `call_in_root_forward` registers this function as an FSDP forward
    method of the root, so the root's pre-forward all-gather runs before it (the weight is the full tensor inside)
    and the root's gradient reduce-scatter is scheduled for backward, exactly as for `model.forward`. Without FSDP
    it is a plain call, so the single-process path is the same code.

    inputs: the model's forward tensors from `collate_rollout` (input_ids [B, P+L], attention_mask, position_ids,
        pixel_values, image_grid_thw, mm_token_type_ids); `attention_mask` may be replaced by a 4-D mask (PGPO).
    responses: [B, L] long. prompt_length: P — response token j is predicted at position P-1+j.
    Returns (lp [B, L] float32, hidden [B, L, H] or None).
    """
    result = response_pass(
        model, inputs, responses, prompt_length, temperature=temperature, chunk_size=chunk_size, validate=validate,
        with_hidden=with_hidden,
    )  # fmt: skip
    return result["lp"], result.get("hidden")


def response_pass(
    model: torch.nn.Module,
    inputs: dict[str, torch.Tensor],
    responses: torch.Tensor,
    prompt_length: int,
    *,
    temperature: float,
    chunk_size: int,
    entropy: bool = False,
    visual_token_id: int | None = None,
    validate: bool = True,
    with_hidden: bool = True,
    full_hidden: bool = False,
) -> dict[str, torch.Tensor]:
    """`response_logprobs` with what the methods of ALGORITHMS.md §9 also read from the same forward.

    Also run through `call_in_root_forward`. Returns {"lp" [B, L]}, plus "hidden" [B, L, H] (the last hidden state
    at the positions that predict the response tokens) when `with_hidden`, "entropy" [B, L] (the analytic entropy of
    softmax(logits / T), differentiable when the forward is) when `entropy`, and "prior" [B, L] (PEPO's perception
    prior over every layer's hidden state, `vppo_core.pepo_visual_prior`) when `visual_token_id` is given. The prior
    is read at the response tokens' own positions P+j (the fork's `hidden_states[:, -response_length:]`), one to the
    right of the positions that predict them.

    "hidden" and "prior" are views of the forward's activations. Under FSDP2, whatever this root forward returns
    with grad enabled gets a pre-backward hook, and a view's hook is lost to any later in-place op on it (FSDP2
    warns "returned a view tensor" for each): ask for them in no-grad passes only, where no hook is registered.
    """
    with contextlib.ExitStack() as stack:
        if visual_token_id is not None:
            layer_sums = stack.enter_context(_pepo_layer_sums(model, inputs["input_ids"] == visual_token_id))
        out = model.model(**inputs, use_cache=False)
    L = responses.shape[1]
    span = slice(prompt_length - 1, prompt_length - 1 + L)
    hidden = out.last_hidden_state[:, span]
    lp = logprobs_from_hidden(
        hidden, model.lm_head.weight, responses, temperature=temperature, chunk_size=chunk_size, validate=validate,
        return_entropy=entropy,
    )  # fmt: skip
    result = {"hidden": hidden} if with_hidden else {}
    if full_hidden:  # [B, P + L, H] after the final norm (Method.clean_full_hidden)
        result["full_hidden"] = out.last_hidden_state
    if entropy:
        result["lp"], result["entropy"] = lp
    else:
        result["lp"] = lp
    if visual_token_id is not None:
        total, n_terms = layer_sums.finish(out.last_hidden_state)
        result["prior"] = pepo_prior_mean(total, n_terms)[:, prompt_length : prompt_length + L]
    return result


class _LayerSums:
    """The running sum of `pepo_layer_cosines` over the hidden states a forward produces (`_pepo_layer_sums`)."""

    def __init__(self, weights: torch.Tensor, n_layers: int) -> None:
        self.weights, self.n_layers = weights, n_layers
        self.total = torch.zeros(weights.shape, dtype=torch.float32, device=weights.device)
        self.terms = 0

    def add(self, hidden: torch.Tensor) -> None:
        self.total += pepo_layer_cosines(hidden, self.weights)
        self.terms += 1

    def finish(self, last_hidden_state: torch.Tensor) -> tuple[torch.Tensor, int]:
        """Add the final (normed) hidden state; returns (sum, number of terms) after checking every layer ran."""
        if self.terms != self.n_layers:
            raise RuntimeError(
                f"PEPO's prior saw {self.terms} of {self.n_layers} layer inputs: a layer hook did not run"
            )
        self.add(last_hidden_state)
        return self.total, self.terms


@contextlib.contextmanager
def _pepo_layer_sums(model: torch.nn.Module, visual_mask: torch.Tensor) -> Iterator[_LayerSums]:
    """PEPO's prior reduced layer by layer while the forward runs, instead of `output_hidden_states=True`.

    `pepo_visual_prior` averages over what `output_hidden_states=True` returns: the input of the first decoder layer
    (the embeddings), each decoder layer's output but the last, and the final normed hidden state (transformers
    records each layer's output with a forward hook and replaces the last by `last_hidden_state`). Holding all of
    them costs (layers + 1) x [B, T, H] (28 + 1 layers x 25,000 positions x 3,584 x 2 B ≈ 5 GB at 7B); here each is
    reduced to its [B, T] float32 term by hooks on the same layers, in the same order, so the prior is bit-identical
    (tests/test_forward_pepo.py) and the pass holds one float32 [B, T, H] at a time.
    """
    from vppo_recipes.sharding import find_blocks

    layers = find_blocks(model)[1]
    sums = _LayerSums(pepo_visual_weights(visual_mask), len(layers))

    def first_input(module, args, kwargs):
        sums.add(args[0] if args else kwargs["hidden_states"])

    def output(module, args, kwargs, out):
        sums.add(out[0] if isinstance(out, tuple) else out)

    handles = [layers[0].register_forward_pre_hook(first_input, with_kwargs=True)]
    handles += [layer.register_forward_hook(output, with_kwargs=True) for layer in layers[:-1]]
    try:
        yield sums
    finally:
        for handle in handles:
            handle.remove()


def exact_dependency_in_root(
    model: torch.nn.Module,
    hidden: torch.Tensor,
    hidden_alt: torch.Tensor,
    mask: torch.Tensor,
    *,
    temperature: float,
    chunk_size: int,
) -> torch.Tensor:
    """Full-vocabulary KL(π(·|image) ‖ π(·|image')) per response token from two hidden states (ALGORITHMS §1).

    Also run through `call_in_root_forward` (it reads the LM-head weight, see `response_logprobs`). Returns S [B, L].
    """
    return exact_token_dependency_from_hidden(
        hidden, hidden_alt, model.lm_head.weight, mask, temperature=temperature, chunk_size=chunk_size
    )


def view_divergences_in_root(
    model: torch.nn.Module, hidden: torch.Tensor, hidden_alt: torch.Tensor, mask: torch.Tensor, *, temperature: float,
    chunk_size: int,
) -> dict[str, torch.Tensor]:  # fmt: skip
    """VEPO's full-vocabulary JSD and both views' entropies (`vppo_core.view_divergences_from_hidden`), in the root
    forward (it reads the LM-head weight)."""
    return view_divergences_from_hidden(
        hidden, hidden_alt, model.lm_head.weight, mask, temperature=temperature, chunk_size=chunk_size
    )


def top_p_entropy_in_root(
    model: torch.nn.Module, hidden: torch.Tensor, mask: torch.Tensor, *, top_p: float, temperature: float,
    chunk_size: int,
) -> torch.Tensor:  # fmt: skip
    """ToR's entropy of the top-p renormalised distribution (`vppo_core.top_p_entropy_from_hidden`), in the root
    forward."""
    return top_p_entropy_from_hidden(
        hidden, model.lm_head.weight, mask, top_p=top_p, temperature=temperature, chunk_size=chunk_size
    )
