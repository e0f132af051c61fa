"""VAPO (ALGORITHMS.md §9.12): GRPO on a reward with a perception score measured by the policy itself.

At k anchors along each response the policy answers whether one of the example's pre-generated visual claims is
correct (`AnchorProbe`: k no-grad forwards per micro-batch); the agreement with the claims' labels, later anchors
weighing more, is the perception score P (`vppo_core.anchor_perception_score`), and the reward is
`(1 − w_f − w_a)·acc + w_f·format + w_a·1[acc = 1]·P` (`vppo_core.vapo_rewards`), whose group advantages
(`vppo_core.group_advantages`, as the recipe's) replace the recipe's. The claims are dataset columns
(`claim_1..claim_N`, `label_1..label_N` = CORRECT / WRONG: `Method.data_columns`); each response's accuracy and format
come with its micro-batch (`MicroBatch.rewards`). No model outside the policy is needed (the claims are data, the
judge of each claim is the policy), so there is no stand-in.

`vapo_anchor_weight` defaults to the paper's 0.1. The released trainer (xytian1008/VAPO@67687cf) has the anchor step
commented out, so its scripts train with 0.9·acc + 0.1·format: `algorithm.vapo_anchor_weight=0` is that run (no
probe, no claim columns needed).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from vppo_core.advantages import (
    anchor_decisions,
    anchor_perception_score,
    anchor_positions,
    anchor_query,
    group_advantages,
    vapo_rewards,
)
from vppo_recipes.methods.base import Method, MethodContext, param
from vppo_recipes.methods.records import MicroBatch, Shaping
from vppo_recipes.seeding import mix_seed

# Seeds each response's anchor draw: mix_seed(run seed, prompt number, response index, ANCHOR_SEED_SALT).
ANCHOR_SEED_SALT = 0xA9C
# Seeds each response's draw of the claims it asks: mix_seed(run seed, prompt number, response index, CLAIM_SEED_SALT).
CLAIM_SEED_SALT = 0xC1A
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


def _weight(default: float, doc: str):
    return param(default, low=0.0, high=1.0, doc=doc)


@dataclass(frozen=True)
class VAPO(Method):
    """VAPO's reward on DAPO's loss (module docstring); the published 7B settings (ALGORITHMS.md §9.12)."""

    name = "vapo"

    vapo_anchors: int = param(20, low=1, doc="k: anchors (and distinct claims asked) per response")
    vapo_claims: int = param(20, low=1, doc="N: claim_1..claim_N / label_1..label_N columns of each example")
    vapo_beta: float = param(1.5, low=0.0, doc="β of Eq. 4: anchor weight e^{β·position/length}")
    vapo_format_weight: float = _weight(0.1, "w_f; must equal reward.format_weight")
    vapo_anchor_weight: float = _weight(
        0.1, "w_a of the perception bonus (the paper's 0.1); 0: the released scripts' reward, no probe"
    )

    @property
    def probing(self) -> bool:
        """Whether the probe runs (config only, so the same on every rank: it is k collective forwards)."""
        return self.vapo_anchor_weight > 0

    def data_columns(self):
        if not self.probing:
            return ()
        return tuple(f"{kind}_{j}" for j in range(1, self.vapo_claims + 1) for kind in ("claim", "label"))

    def config_errors(self, cfg):
        errors = []
        if self.vapo_anchors > self.vapo_claims:
            errors.append(
                f"algorithm.vapo_anchors={self.vapo_anchors} > algorithm.vapo_claims={self.vapo_claims}: each anchor "
                "asks a different claim; lower vapo_anchors or raise vapo_claims"
            )
        if self.vapo_format_weight + self.vapo_anchor_weight > 1:
            errors.append("algorithm.vapo_format_weight + vapo_anchor_weight must be <= 1 (accuracy keeps the rest)")
        if not math.isclose(self.vapo_format_weight, float(cfg["reward"]["format_weight"])):
            errors.append(
                f"algorithm.vapo_format_weight={self.vapo_format_weight} differs from reward.format_weight="
                f"{cfg['reward']['format_weight']}: the logged reward/* and VAPO's reward would weigh the format "
                "differently; set both to the same value (VAPO's: 0.1)"
            )
        return errors

    def scores(self, ctx, mb, clean, lp_old, altered):
        """Per row (not per token): "perception" P [b] and, per anchor [b, k], "agreement" (verdict = the asked
        claim's label), "verdicts", "positions", "asked"; {} without the probe. Each row asks k distinct claims
        drawn from a generator seeded by (run seed, prompt, response index): the same on any number of ranks."""
        if not self.probing:
            return {}
        claims, labels, asked_all = [], [], []
        for i, cells in enumerate(mb.extra):
            g = torch.Generator().manual_seed(mix_seed(ctx.seed, mb.uids[i], mb.response_index[i], CLAIM_SEED_SALT))
            asked = (torch.randperm(self.vapo_claims, generator=g)[: self.vapo_anchors] + 1).tolist()
            claims.append([str(cells[f"claim_{c}"]) for c in asked])
            labels.append([str(cells[f"label_{c}"]).strip() == "CORRECT" for c in asked])
            asked_all.append(asked)
        positions, verdicts = AnchorProbe(k=self.vapo_anchors).verdicts(ctx, mb, claims)
        agreement = verdicts == torch.tensor(labels, device=verdicts.device)
        lengths = torch.tensor([max(len(t), 1) for t in mb.texts])  # an empty response: acc 0, its P is unused
        perception = anchor_perception_score(agreement.cpu(), torch.tensor(positions), lengths, beta=self.vapo_beta)
        return {
            "perception": perception.to(ctx.device),  # [b] float64
            "agreement": agreement.float(),  # [b, k]
            "verdicts": verdicts,  # [b, k] bool, True = yes
            "positions": torch.tensor(positions, device=ctx.device),  # [b, k] character positions in mb.texts
            "asked": torch.tensor(asked_all, device=ctx.device),  # [b, k] the claims asked, 1-based column numbers
        }

    def shape(self, ctx, steps):
        """Per mini-batch (this rank's whole groups, G consecutive rows each): VAPO's reward and its group
        advantages, split back into the micro-batches."""
        out = []
        for mini in steps:
            batches = [s.batch for s in mini]
            acc = torch.cat([b.rewards["accuracy"] for b in batches])
            fmt = torch.cat([b.rewards["format"] for b in batches])
            if self.probing:
                perception = torch.cat([s.no_grad.scores["perception"] for s in mini]).double()
                agreement = torch.cat([s.no_grad.scores["agreement"].mean(1) for s in mini])
            else:
                perception, agreement = torch.zeros_like(acc, dtype=torch.float64), torch.full_like(acc, math.nan)
            # float32 as the recipe's rewards: with w_a = 0 these are its advantages bit for bit
            reward = vapo_rewards(
                acc, fmt, perception, format_weight=self.vapo_format_weight, anchor_weight=self.vapo_anchor_weight
            ).float()
            # the rows in data order (prompt, response index): micro-batches by token budget sort them by length
            keys = [k for b in batches for k in zip(b.uids, b.response_index)]
            order = sorted(range(len(keys)), key=keys.__getitem__)
            uids = [keys[i][0] for i in order]
            size = uids.count(uids[0]) if uids else 1
            if not uids or any(uids[i : i + size] != [uids[i]] * size for i in range(0, len(uids), size)):
                raise ValueError(f"method vapo: a mini-batch's rows are not whole groups of equal size: {uids}")
            rows = [len(b.uids) for b in batches]
            order_t = torch.tensor(order, device=reward.device)
            advantages = torch.empty_like(reward)
            advantages[order_t] = group_advantages(reward[order_t], size)
            advantages = advantages.to(batches[0].advantages.dtype)
            out.append([
                Shaping(a, None, {"perception": p.float(), "reward": r, "agreement": g})
                for a, p, r, g in zip(*(x.split(rows) for x in (advantages, perception, reward, agreement)))
            ])  # fmt: skip
        return out

    def metrics(self, ctx, steps):
        def mean(key):
            v = ctx.gathered([s.shaped.outputs[key] for s in steps])
            return float(v.mean()) if v.numel() else math.nan

        return {
            "vapo/reward_mean": mean("reward"),
            "vapo/perception_mean": mean("perception"),
            "vapo/anchor_agreement": mean("agreement"),
        }
