"""Perceval (ALGORITHMS.md §9.14): a perception process reward model (PRM) reads each response with its image and
returns the sub-sentences that misperceive it; the tokens of those sub-sentences get the token advantage
`Â − α·|Â|` (Eq. 3 of the paper, α = 0.1), every other token keeps the group advantage `Â`.

The PRM is no part of vppo. The method calls a **scorer** (`PerceptionScorer`), named by import path in
`algorithm.perceval_scorer` (a class or a zero-argument factory; called once per process, its result called once
per step and rank with that rank's responses). The published runs serve the Perceval PRM (Qwen2.5-VL based,
`RUC-AIBOX/Perceval-3B-reward`) behind an OpenAI-compatible endpoint; an adapter that sends the prompt, image and
response and returns the parsed `<answer>[…]</answer>` list (`parse_prm_answer`) plugs in here.

**The default scorer, `StandInScorer`, is a stand-in, not a perception model**: a deterministic hash of the
question and each clause of the response flags about 30 % of the clauses. It has the PRM's interface and exercises
every part of the method (tests, `tiny_perceval.yaml`, `algorithm.name=perceval` on a shipped config), but its flags
carry no information about the image: a real run must set `algorithm.perceval_scorer`. Each step logs
`perceval/stand_in_scorer` (1 while the stand-in is used).
"""

from __future__ import annotations

import ast
import functools
import hashlib
import math
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from vppo_core.shaping import flagged_token_spans, perceval_penalty_mask, perceval_token_weights
from vppo_recipes.methods.base import Method, param, weight_stats
from vppo_recipes.methods.records import Shaping

STAND_IN = "vppo_recipes.methods.perceval.StandInScorer"


@dataclass(frozen=True)
class PerceptionCheck:
    """What the PRM reads about one response (the official `process_verify`: question, images, response)."""

    question: str  # the raw question
    prompt: str  # the chat-formatted prompt the policy saw (one <|image_pad|> per image)
    images: list[Any] = field(repr=False)  # the prompt's PIL images, as the policy saw them
    response: str  # the response, decoded without special tokens: the flags must be substrings of it


class PerceptionScorer(Protocol):
    """A perception PRM: for each check, the sub-sentences of its `response` that misperceive the image (the
    official PRM's `<answer>[…]</answer>` list; `[]` when it finds none or does not verify that row). Each must be
    a substring of the response; one that is not is dropped (as the official code does)."""

    def __call__(self, checks: Sequence[PerceptionCheck]) -> Sequence[Sequence[str]]: ...


class StandInScorer:
    """STAND-IN for the Perceval PRM, for tests and the tiny config (not a perception model).

    Splits each response into clauses (at `. ! ? ; ,` and newlines, then at most `words` words each) and flags a
    clause iff the first 8 hex digits of sha256(question, NUL, clause) / 2³² < `rate`: deterministic, the same on
    every rank and for every batch layout, blind to the image.
    """

    rate = 0.3
    words = 6

    def __init__(self) -> None:
        # Loud on purpose: `algorithm.name=perceval` on a full-size config gets this scorer by default (so the one
        # override validates), and its flags carry no perception signal.
        warnings.warn(
            "Perceval's perception scorer is the STAND-IN StandInScorer (a hash of the text, blind to the image): set "
            "algorithm.perceval_scorer to the import path of your PRM client for a real run",
            stacklevel=2,
        )

    def __call__(self, checks: Sequence[PerceptionCheck]) -> list[list[str]]:
        return [self.flags(c.question, c.response) for c in checks]

    def flags(self, question: str, response: str) -> list[str]:
        out = []
        for clause in re.finditer(r"[^.!?;,\n]+", response):
            tokens = list(re.finditer(r"\S+", clause.group()))
            for k in range(0, len(tokens), self.words):
                part = tokens[k : k + self.words]
                text = clause.group()[part[0].start() : part[-1].end()]
                digest = hashlib.sha256(f"{question}\0{text}".encode()).hexdigest()
                if int(digest[:8], 16) / 2**32 < self.rate:
                    out.append(text)
        return out


def parse_prm_answer(output: str) -> list[str]:
    """The flagged sub-sentences of a Perceval PRM output: the Python list between the first `<answer>` and the next
    `</answer>`; `[]` when a tag is missing, the answer says "The response is correct", or it is no list (the
    official `extract_judgement_from_response`). Items that are not strings are dropped (the official position
    finder fails on them and drops them)."""
    start = output.find("<answer>")
    if start < 0:
        return []
    start += len("<answer>")
    end = output.find("</answer>", start)
    if end < 0:
        return []
    content = output[start:end].strip()
    if "The response is correct" in content or not (content.startswith("[") and content.endswith("]")):
        return []
    try:
        value = ast.literal_eval(content)
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return []
    return [x for x in value if isinstance(x, str)] if isinstance(value, list) else []


@functools.cache
def load_scorer(path: str) -> PerceptionScorer:
    """The scorer `path` names: a class or zero-argument factory, called once per process."""
    from torchtune.config._utils import _get_component_from_path

    return _get_component_from_path(path)()


@dataclass(frozen=True)
class Perceval(Method):
    """Perceval's token penalties (§9.14). The default scorer is the STAND-IN `StandInScorer` (see the module)."""

    name = "perceval"

    perceval_penalty: float = param(
        0.1, low=0.0, high=1.0, doc="α of Â' = Â − α·m·|Â| on the flagged tokens; ≤ 1 keeps the token weights ≥ 0"
    )
    perceval_scorer: str = param(
        STAND_IN,
        doc="import path of the perception PRM's scorer (a class or zero-argument factory; PerceptionScorer); the "
        "default is a deterministic stand-in, not a perception model",
    )

    def config_errors(self, cfg):
        from torchtune.config._utils import _get_component_from_path

        try:
            target = _get_component_from_path(self.perceval_scorer)
        except Exception as e:  # any import error means the path cannot be used
            return [f"algorithm.perceval_scorer = {self.perceval_scorer!r} cannot be imported: {type(e).__name__}: {e}"]
        if not callable(target):
            return [f"algorithm.perceval_scorer = {self.perceval_scorer!r} is no class or zero-argument factory"]
        return []

    def shape(self, ctx, steps):
        flat = [s for mini in steps for s in mini]
        checks = [
            PerceptionCheck(p.question, p.text, p.images, t)
            for s in flat
            for p, t in zip(s.batch.prompts, s.batch.texts)
        ]
        flags = [list(x) for x in load_scorer(self.perceval_scorer)(checks)]  # one call per step and rank
        if len(flags) != len(checks) or any(not isinstance(x, str) for row in flags for x in row):
            raise ValueError(
                f"algorithm.perceval_scorer = {self.perceval_scorer!r} returned {len(flags)} rows for {len(checks)} "
                "responses, or a flag that is no str; it must return one list of flagged substrings per response"
            )
        tokenizer = ctx.processor.tokenizer
        special = set(tokenizer.all_special_ids)
        rows = iter(flags)
        out = []
        for s in flat:
            mb = s.batch
            ids, lengths = mb.responses.tolist(), mb.mask.sum(1).long().tolist()  # one host transfer each
            spans, asked, found, aligned = [], [], [], []
            for text, row_ids, n in zip(mb.texts, ids, lengths):
                row = next(rows)
                enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
                row_spans = flagged_token_spans(text, row, enc["offset_mapping"])
                spans.append(row_spans)
                asked.append(len(row))
                found.append(len(row_spans))
                # the official code applies the re-tokenised positions to the generated tokens as they are; they
                # line up when the text re-tokenises to the generated ids (the special tokens dropped at the end)
                k = len(enc["input_ids"])
                aligned.append(float(enc["input_ids"] == row_ids[:k] and all(i in special for i in row_ids[k:n])))
            flagged = perceval_penalty_mask(spans, mb.mask.shape[1], device=mb.mask.device)
            w = perceval_token_weights(mb.advantages, flagged, mb.mask, penalty=self.perceval_penalty)
            flagged_valid = (flagged & (mb.mask > 0)).float()
            out.append(
                Shaping(
                    mb.advantages,
                    w.to(s.no_grad.lp_old.dtype),
                    {
                        "weights": w,
                        "flagged": flagged_valid,
                        "asked": torch.tensor(asked, dtype=torch.float32, device=mb.mask.device),
                        "found": torch.tensor(found, dtype=torch.float32, device=mb.mask.device),
                        "aligned": torch.tensor(aligned, dtype=torch.float32, device=mb.mask.device),
                    },
                )
            )
        it = iter(out)
        return [[next(it) for _ in mini] for mini in steps]

    def metrics(self, ctx, steps):
        flagged = ctx.gathered([s.shaped.outputs["flagged"][s.batch.mask > 0] for s in steps])
        per_row = ctx.gathered([s.shaped.outputs["flagged"].sum(1) > 0 for s in steps])
        asked = ctx.gathered([s.shaped.outputs["asked"] for s in steps])
        found = ctx.gathered([s.shaped.outputs["found"] for s in steps])
        aligned = ctx.gathered([s.shaped.outputs["aligned"] for s in steps])

        def mean(x):
            return float(x.mean()) if x.numel() else math.nan

        return {
            **weight_stats(ctx, self.name, steps, "weights"),
            "perceval/flagged_token_fraction": mean(flagged),
            "perceval/flagged_response_fraction": mean(per_row),
            "perceval/flags_per_response": mean(asked),
            "perceval/flags_found_fraction": float(found.sum() / asked.sum()) if float(asked.sum()) else math.nan,
            "perceval/retokenized_aligned_fraction": mean(aligned),
            "perceval/stand_in_scorer": float(self.perceval_scorer == STAND_IN),
        }
