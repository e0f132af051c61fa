"""VAPO (ALGORITHMS.md §9.12): its probe, the part of the method the seam can run. Not a built-in method.

VAPO's reward adds a perception score: at k anchors along each response the policy answers whether one of the
example's pre-generated visual claims is correct, and the share it gets right (later anchors weigh more) is added
to the reward of correct responses (`vppo_core.anchor_perception_score`, `vppo_core.vapo_rewards`). The probe below
is a no-grad pass of the rollout policy, as a method's `scores()` hook may make one. What the seam does not pass is
what the probe asks and what the reward needs: the example's claims and labels (dataset columns the recipe does not
read) and each response's accuracy and format (a `MicroBatch` carries only the group advantages). With those, the
method is `scores()` calling `AnchorProbe.verdicts` and `shape()` calling `vapo_rewards` and `group_advantages` per
group; without them there is no `algorithm.name: vapo`. No model outside the policy is needed (the claims are data;
the judge of each claim is the policy itself), so there is no stand-in.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vppo_core.advantages import anchor_decisions, anchor_positions, anchor_query
from vppo_recipes.methods.base import MethodContext
from vppo_recipes.methods.records import MicroBatch
from vppo_recipes.seeding import mix_seed

# Seeds each response's anchor draw: mix_seed(run seed, prompt number, response index, ANCHOR_SEED_SALT).
ANCHOR_SEED_SALT = 0xA9C
# The official `allowed_token_ids` (xytian1008/VAPO@67687cf, fsdp_workers.py:587) are Qwen2.5's ids of these words.
YES_WORDS = ("yes", "Yes", "True", "true", "1")
NO_WORDS = ("0", "no", "No", "False", "false")


def verdict_token_ids(tokenizer) -> tuple[list[int], list[int]]:
    """The token ids of VAPO's yes and no words that are one token in `tokenizer` (all ten are in Qwen2.5's and
    Qwen3's vocabularies); a word that splits is left out. Raises ValueError when a side has none."""

    def single(words):
        ids = [tokenizer.encode(w, add_special_tokens=False) for w in words]
        return sorted({x[0] for x in ids if len(x) == 1})

    yes, no = single(YES_WORDS), single(NO_WORDS)
    if not yes or not no or set(yes) & set(no):
        raise ValueError(f"the tokenizer has no single-token yes / no words to read a verdict from: {yes}, {no}")
    return yes, no


def _verdicts_in_root(model, inputs, last, yes_ids, no_ids, *, temperature, chunk_size):
    """The greedy yes / no verdict at each row's `last` position, from the last hidden state and the allowed rows of
    the LM head (run through `call_in_root_forward`: it reads the LM-head weight)."""
    out = model.model(**inputs, use_cache=False)
    hidden = out.last_hidden_state[torch.arange(len(last), device=last.device), last]
    return anchor_decisions(hidden, model.lm_head.weight, yes_ids, no_ids)


@dataclass(frozen=True)
class AnchorProbe:
    """VAPO's anchors and the policy's verdicts at them (§9.12). k: anchors per response (the 7B script's 20);
    token_limit / tail_buffer / min_sep: the official code's window rules (`vppo_core.anchor_positions`)."""

    k: int = 20
    token_limit: int = 6000
    tail_buffer: int = 128
    min_sep: int = 2

    def positions(self, ctx: MethodContext, mb: MicroBatch) -> list[list[int]]:
        """Each row's k anchors (character positions in `mb.texts[i]`), drawn from a generator seeded by (run seed,
        prompt, response index): the same on any number of ranks and after a resume."""
        tokens = mb.inputs["attention_mask"].reshape(mb.responses.shape[0], -1).sum(1).tolist()
        out = []
        for i, text in enumerate(mb.texts):
            g = torch.Generator().manual_seed(mix_seed(ctx.seed, mb.uids[i], mb.response_index[i], ANCHOR_SEED_SALT))
            rules = {"token_limit": self.token_limit, "tail_buffer": self.tail_buffer, "min_sep": self.min_sep}
            out.append(anchor_positions(text, self.k, generator=g, num_tokens=int(tokens[i]), **rules))
        return out

    @torch.no_grad()
    def verdicts(
        self, ctx: MethodContext, mb: MicroBatch, claims: Sequence[Sequence[str]]
    ) -> tuple[list[list[int]], torch.Tensor]:
        """The policy's yes / no verdict at every anchor of every row of `mb`, without gradient.

        claims: per row, the k claims asked at its anchors, in anchor order (the caller draws them from the example's
        claims and keeps their labels). Anchor j of row i reads `mb.prompts[i]` (with its images), then
        `anchor_query`'s text after the prompt: the response up to the anchor and the claim's question, tokenized
        as the response part (the official code tokenizes prompt and text together). One forward per anchor index
        over the b rows: k forwards on every rank, whatever its data (a collective under FSDP2).
        Returns (positions [b][k], verdicts [b, k] bool, True = yes).
        """
        from vppo_rollout.collate import collate_rollout, model_inputs

        if len(claims) != len(mb.texts) or any(len(c) != self.k for c in claims):
            raise ValueError(f"claims: one list of k={self.k} claims per row ({len(mb.texts)} rows)")
        tok = ctx.processor.tokenizer
        yes, no = verdict_token_ids(tok)
        positions = self.positions(ctx, mb)
        columns = []
        for j in range(self.k):
            ids = [
                tok.encode(anchor_query("", text, pos[j], c[j]), add_special_tokens=False)
                for text, pos, c in zip(mb.texts, positions, claims)
            ]
            batch = collate_rollout(ctx.processor, mb.prompts, ids, config=ctx.model_config)
            inputs = {key: v.to(ctx.device) for key, v in model_inputs(batch).items()}
            last = torch.tensor([batch["prompt_length"] + len(x) - 1 for x in ids], device=ctx.device)
            columns.append(ctx.in_root(_verdicts_in_root, inputs, last, yes, no))
        return positions, torch.stack(columns, dim=1)
