"""The method seam: what a perception-aware RL method declares, and what the recipe hands its hooks.

A method is a frozen dataclass whose fields are its `algorithm.*` settings, each declared once with `param` (its
published default, bounds, allowed values, doc); `validate_config` builds the `algorithm` section's schema from
those fields, so no default or bound is written anywhere else. Its hooks, each with a default that does nothing:

    rollout_images(...)  what each response of a group is SAMPLED on: per response slot, images replacing the
                         prompt's (NoisyRollout's noised copies), or None (the default: every response on the
                         prompt's own); the micro-batches, the no-grad passes and the update always use the clean
                         prompt
    views()              the altered no-grad views it scores the responses under (`views.py`), in order
    clean_entropy/prior/full_hidden  what the clean no-grad pass must also return (ClassVars)
    scores(...)          per-token scores of one micro-batch from its no-grad passes (no gradient)
    shape(...)           the step's shaping: advantages and token weights of every micro-batch; the default calls
                         shape_micro_batch(...) on each; override `shape` for statistics that span the rollout
                         batch (all ranks) or a mini-batch
    update_entropy       whether the gradient pass also returns the analytic entropy (ClassVar)
    aux_terms(...)       extra per-token loss terms {name: (coefficient, value [b, L])}, each added to the policy
                         loss as coefficient · the loss's aggregation of the value (`loss.aggregation`, global
                         counts: `vppo_core.policy_loss(aux_terms=)`), logged as actor/aux/<name>
    metrics(...)         its own metrics, over all ranks (also called with no steps when a step kept no group)
    config_errors(cfg)   rules that span keys, checked with the whole config before anything loads
    data_columns()       further dataset columns the method reads per prompt (its own reward's inputs, e.g. VAPO's
                         claims); the recipe refuses a dataset without them (naming the column), and then hands
                         each micro-batch row its cells (`MicroBatch.extra`) and its grade (`MicroBatch.rewards`:
                         reward, accuracy, format). A method that computes its own reward from them replaces the
                         group advantages in `shape` (`vppo_core.group_advantages` per group, as the recipe does);
                         the online filter has already acted on the recipe's grade

Collectives. `shape`, `metrics` and `scores` run on every rank, the same number of times, in the same order; so must
every collective a hook makes: `ctx.gathered`, `gathered_with_offset`, `batch_top_fraction`, `all_reduce_` and
`ctx.in_root` (an FSDP root forward: an all-gather of the LM head). Never make one conditional on this rank's data
(`if mask.any(): ctx.gathered(...)`, an early return on empty `steps`): the other ranks would wait for ever. The
recipe checks what `shape` and `aux_terms` return (one `Shaping` per micro-batch, shapes `[b]` and `[b, L]`).

The recipe calls them in its phase order (generate_rollouts [rollout_images] -> prepare_minibatches -> no_grad_passes -> shape ->
update) and never tests a method's name. A method of your own is named in YAML by its import path:
`algorithm._component_: my_package.my_method.MyMethod` (torchtune's convention); its fields are validated like
ours.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.distributed as dist

from vppo_core.masking import top_fraction_mask
from vppo_recipes.collectives import all_gather_var, all_gather_var_with_offset
from vppo_recipes.methods.records import MicroBatch, MicroStep, Shaping
from vppo_recipes.seeding import mix_seed
from vppo_recipes.sharding import call_in_root_forward

# VPPO's published ρ: the share of each response's most dependent tokens TGF keeps; the policy-gradient-share
# diagnostic measures every method on the same share unless the method says otherwise (`dependent_fraction`).
DEPENDENT_TOKEN_FRACTION = 0.4
# Seeds the random tie-break of the batch-level token sets (ToR, CGPO): mix_seed(seed, step, TIE_BREAK_SALT, set).
TIE_BREAK_SALT = 0x71E


def param(
    default: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    choices: Sequence[Any] | None = None,
    doc: str = "",
) -> Any:
    """One `algorithm.*` setting of a method: its default and what `validate_config` accepts.

    low / high: bounds, inclusive unless low_open / high_open (then the value must be > low / < high). choices:
    the allowed values. The field's type annotation (float, int, bool, str) is the accepted type (an int is a
    float). Use as `tgf_fraction: float = param(0.4, low=0.0, low_open=True, high=1.0)`.
    """
    meta = {"low": low, "high": high, "low_open": low_open, "high_open": high_open, "doc": doc}
    meta["choices"] = tuple(choices) if choices is not None else None
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class MethodContext:
    """What a method's hooks may read and call during one RL step (built by the recipe each step)."""

    model: torch.nn.Module  # the FSDP2-sharded policy (use `in_root` for anything that reads the LM head)
    processor: Any
    model_config: Any
    image_token_id: int
    dtype: torch.dtype  # the training dtype
    device: torch.device
    seed: int
    step: int  # RL steps done before this one (0 in the first step)
    max_steps: int
    temperature: float  # rollout.temperature: the log-probs are of softmax(logits / T)
    chunk_size: int  # loss.chunk_size: positions per chunk of any full-vocabulary computation
    micro_batch_size: int  # batch.micro_batch_size: the rows of a micro-batch, or their cap with a token budget
    aggregation: str  # loss.aggregation
    world: int
    rank: int
    # batch.max_tokens_per_micro_batch: micro-batches of varying rows, longest rows first (None: micro_batch_size
    # rows each, in data order); a statistic per micro-batch or over rows in order must not assume either
    max_tokens_per_micro_batch: int | None = None

    def in_root(self, fn, *args, **kwargs):
        """`fn(model, *args, **kwargs)` inside the FSDP2 root forward, where the LM-head weight is full
        (`sharding.call_in_root_forward`); `temperature` and `chunk_size` are passed unless given."""
        kwargs.setdefault("temperature", self.temperature)
        kwargs.setdefault("chunk_size", self.chunk_size)
        return call_in_root_forward(self.model, fn, *args, **kwargs)

    def gathered(self, values: Sequence[torch.Tensor]) -> torch.Tensor:
        """1-D float values of this rank (concatenated), gathered from every rank in rank order."""
        local = torch.cat(list(values)).float() if values else torch.zeros(0, device=self.device)
        return all_gather_var(local)

    def gathered_with_offset(self, values: torch.Tensor) -> tuple[torch.Tensor, int]:
        """1-D `values` of every rank in rank order, and where this rank's start."""
        return all_gather_var_with_offset(values)

    def batch_top_fraction(
        self, steps: Sequence[Sequence[MicroStep]], values: Sequence[torch.Tensor], fraction: float, which: int
    ) -> list[torch.Tensor]:
        """`top_fraction_mask(scope="batch")` over every valid response token of the step's rollout batch, all
        ranks, gathered in data order whatever the ranks (global mini-batch j is rank 0's share of it, then rank
        1's, ...). Ties are broken at random, as the public implementation of ToR does, from a generator seeded by
        (seed, step, which): the same draw on every rank and for any number of ranks.

        steps: [mini][micro]; values: one [b, L] per micro-batch, in step order (flattened). Returns one [b, L]
        bool per micro-batch, in the same order.
        """
        flat = [s.batch for mini in steps for s in mini]
        valid = [mb.mask > 0 for mb in flat]
        # per row, its valid tokens (one host transfer); rows are taken in data order (prompt, response index),
        # which micro-batches by token budget do not keep
        lengths = torch.cat([v.sum(1) for v in valid]).tolist() if flat else []
        first_row = [0]
        for mb in flat:
            first_row.append(first_row[-1] + mb.mask.shape[0])
        parts, mine, orders, offset, i = [], [], [], 0, 0  # per mini-batch: gathered values, this rank's start
        for mini in steps:
            order = sorted(
                ((flat[j].uids[r], flat[j].response_index[r]), j, r)
                for j in range(i, i + len(mini))
                for r in range(flat[j].mask.shape[0])
            )
            i += len(mini)
            pieces = [values[j][r][valid[j][r]].float() for _, j, r in order]
            local = torch.cat(pieces) if pieces else torch.zeros(0, device=self.device)
            gathered, start = all_gather_var_with_offset(local)
            parts.append(gathered)
            mine.append((offset + start, local.numel()))
            orders.append(order)
            offset += gathered.numel()
        everything = torch.cat(parts)[None]
        ties = torch.Generator().manual_seed(mix_seed(self.seed, self.step, TIE_BREAK_SALT, which))
        top = top_fraction_mask(
            everything, torch.ones_like(everything), fraction=fraction, scope="batch", generator=ties
        )[0]
        out = [torch.zeros_like(v) for v in valid]
        for order, (start, n) in zip(orders, mine):
            share = top[start : start + n]
            for _, j, r in order:
                k = lengths[first_row[j] + r]
                out[j][r][valid[j][r]] = share[:k]
                share = share[k:]
        return out

    def all_reduce_(self, t: torch.Tensor) -> torch.Tensor:
        """Sum `t` over the ranks in place (and return it)."""
        dist.all_reduce(t)
        return t


@dataclass(frozen=True)
class Method:
    """Base of every method: the hooks' defaults (GRPO's: no view, no score, the group advantage on every token).

    Subclasses are frozen dataclasses; their fields are the method's `algorithm.*` settings (`param`).
    """

    name: ClassVar[str] = ""  # the `algorithm.name` of a built-in method (and the progress bar's label; the class
    # name when empty); by convention the prefix of the method's own metrics
    clean_entropy: ClassVar[bool] = False  # the clean no-grad pass also returns the analytic entropy [b, L]
    clean_prior: ClassVar[bool] = False  # ... and PEPO's visual prior [b, L] (every layer's hidden state)
    clean_full_hidden: ClassVar[bool] = False  # ... and the whole last hidden state [b, P + L, H] (after the final
    # norm: image tokens and the tokens' own positions too), kept until the method has scored the micro-batch
    update_entropy: ClassVar[bool] = False  # the gradient pass also returns the entropy (with gradient)

    def rollout_images(
        self, ctx: MethodContext, uid: int, images: Sequence[Any], group_size: int
    ) -> Sequence[Sequence[Any] | None] | None:
        """The images each of the group's `group_size` responses is sampled on (the rollout phase, every engine).

        uid: the prompt's number among the run's usable examples (seed from it and ctx.seed, ctx.step, never from
        the rank or the batching); images: the prompt's own (RGB PIL, already on the processor's patch grid).
        Returns None (the default) to sample every response on the prompt's own images, or one entry per response
        slot: a list of images replacing the prompt's (same count and sizes), or None for the prompt's own. Slots
        that return the same list object are sampled together; the recipe samples each run of equal consecutive
        slots as one call. Only what is sampled changes: the group, its micro-batches, every no-grad pass and the
        update keep the clean prompt. Called on the rank that samples the prompt, without collectives.
        """
        return None

    def data_columns(self) -> tuple[str, ...]:
        """Dataset columns this method reads per prompt besides question / answer / images (none by default).
        Each row's cells reach the hooks as `MicroBatch.extra[i][column]`, as the dataset holds them."""
        return ()

    def views(self) -> tuple[Any, ...]:
        """The altered no-grad views (`vppo_recipes.methods.views`), each one extra forward without gradient."""
        return ()

    @property
    def exact_dependency(self) -> bool:
        """S as the exact full-vocabulary KL from the hidden states, instead of k3 on the sampled token."""
        return False

    @property
    def dependent_fraction(self) -> float:
        """ρ of the policy-gradient-share diagnostic (`diag/pg_share_on_dependent_tokens`)."""
        return DEPENDENT_TOKEN_FRACTION

    def config_errors(self, cfg: Mapping[str, Any]) -> list[str]:
        """Problems of this method's settings with the rest of the config (`cfg`: the whole config, defaults
        filled in); each a message naming the keys and the fix."""
        return []

    def clean_pass_context(
        self, ctx: MethodContext, mb: MicroBatch
    ) -> contextlib.AbstractContextManager[Mapping[str, torch.Tensor]]:
        """A context the clean no-grad pass of `mb` runs in, for what a method records DURING that forward (DyCo-RL:
        the last layer's attention rows) instead of running a forward of its own. It yields a dict that is filled
        by the time the context exits; its entries join the clean pass's results that `scores` receives. Default:
        nothing recorded."""
        return contextlib.nullcontext({})

    def scoring_bytes(self, *, micro: int, seq: int, response: int, hidden: int, act_bytes: int) -> int:
        """Bytes per rank the method's own scoring work holds at its peak beyond its views and the clean pass's
        declared outputs (its recordings, its temporaries), for `vppo-recipes plan` (the "scoring" phase); an
        estimate at micro-batch `micro`, `seq` = prompt + response positions, `response` positions, `hidden` size,
        `act_bytes` per model-dtype element. Default 0."""
        return 0

    def scores(
        self, ctx: MethodContext, mb: MicroBatch, clean: Mapping[str, torch.Tensor], lp_old: torch.Tensor,
        altered: Sequence[Mapping[str, torch.Tensor]],
    ) -> dict[str, torch.Tensor]:  # fmt: skip
        """Per-token scores of one micro-batch, without gradient. clean: the clean pass ({"lp", "hidden" [b, L, H],
        "entropy" / "prior" / "full_hidden" when declared, and what `clean_pass_context` recorded}); altered: the
        same ({"lp", "hidden"}) per view. Returns {name: [b, L]}."""
        return {}

    def shape(self, ctx: MethodContext, steps: Sequence[Sequence[MicroStep]]) -> list[list[Shaping]]:
        """The shaping of every micro-batch of the step, [mini][micro] (steps carry their no-grad passes)."""
        return [[self.shape_micro_batch(ctx, s) for s in mini] for mini in steps]

    def shape_micro_batch(self, ctx: MethodContext, step: MicroStep) -> Shaping:
        """One micro-batch's shaping; the default: the group advantages, every token weighted 1."""
        return Shaping(step.batch.advantages)

    def aux_terms(
        self, ctx: MethodContext, step: MicroStep, new: Mapping[str, torch.Tensor]
    ) -> dict[str, tuple[float, torch.Tensor]]:
        """Extra loss terms of one micro-batch: {name: (coefficient, per-token value [b, L])}, added to the policy
        loss as coefficient · its aggregation over the tokens (`loss.aggregation`, with the same global counts as the
        policy term: `vppo_core.policy_loss(aux_terms=)`). new: the gradient pass ({"lp", "entropy" when
        `update_entropy`})."""
        return {}

    def metrics(self, ctx: MethodContext, steps: Sequence[MicroStep]) -> dict[str, float]:
        """The method's own metrics over all ranks (collective: every rank calls it). steps: flat, shaped."""
        return {}


def with_own_weights(step: MicroStep, weights: torch.Tensor) -> Shaping:
    """The group advantages with the method's own token weights [b, L], also logged as output "weights"."""
    return Shaping(step.batch.advantages, weights, {"weights": weights})


def weight_stats(ctx: MethodContext, prefix: str, steps: Sequence[MicroStep], key: str) -> dict[str, float]:
    """mean / min / max / nonzero fraction of a token-weight output over every valid token of all ranks."""

    w = ctx.gathered([s.shaped.outputs[key][s.batch.mask > 0] for s in steps])
    return {
        f"{prefix}/weight_mean": float(w.mean()) if w.numel() else math.nan,
        f"{prefix}/weight_min": float(w.min()) if w.numel() else math.nan,
        f"{prefix}/weight_max": float(w.max()) if w.numel() else math.nan,
        f"{prefix}/nonzero_fraction": float((w != 0).double().mean()) if w.numel() else math.nan,
    }
