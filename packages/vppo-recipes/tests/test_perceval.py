"""Perceval's method file (ALGORITHMS.md §9.14), without a model: the stand-in scorer, the PRM-output parser, the
scorer named by import path, and `shape()` on hand-made micro-batches with a character-level tokenizer."""

from __future__ import annotations

import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf

from vppo_recipes.config_schema import ConfigError, validate_config
from vppo_recipes.methods import build_method
from vppo_recipes.methods.perceval import (
    PerceptionCheck,
    Perceval,
    StandInScorer,
    load_scorer,
    parse_prm_answer,
)
from vppo_recipes.methods.records import MicroBatch, MicroStep, NoGradPass

CONFIGS = Path(__file__).resolve().parents[1] / "src" / "vppo_recipes" / "configs"
EOS = 1  # the character tokenizer's one special id


class CharTokenizer:
    """One token per character, id = its code point (never EOS); offsets (i, i + 1)."""

    all_special_ids = (EOS,)

    def __call__(self, text, add_special_tokens=False, return_offsets_mapping=False):
        assert add_special_tokens is False and return_offsets_mapping is True
        return {"input_ids": [ord(c) for c in text], "offset_mapping": [(i, i + 1) for i in range(len(text))]}


class EveryOtherWord:
    """A scorer of the interface: flags the 2nd, 4th, ... words of each response, a string that is not in it, and
    the first word twice."""

    def __call__(self, checks):
        out = []
        for c in checks:
            words = c.response.split()
            out.append([*words[1::2], "NOT THERE", words[0], words[0]] if words else [])
        return out


class WrongCount:
    def __call__(self, checks):
        return [[] for _ in checks[1:]]


def test_the_stand_in_flags_substrings_deterministically_and_about_a_third_of_the_clauses():
    with pytest.warns(UserWarning, match="STAND-IN StandInScorer"):  # loud: its flags carry no perception signal
        scorer = StandInScorer()
    rng = torch.Generator().manual_seed(0)
    words = ["the", "red", "car", "is", "left", "of", "a", "tree", "I", "see", "two", "dogs"]
    texts = []
    for _ in range(200):
        idx = torch.randint(len(words), (30,), generator=rng).tolist()
        texts.append(" ".join(words[i] + ("." if i % 5 == 0 else "") for i in idx))
    checks = [PerceptionCheck(f"q{i % 7}", "prompt", [], t) for i, t in enumerate(texts)]
    flags = scorer(checks)
    assert flags == scorer(list(reversed(checks)))[::-1], "a response's flags depend on other responses"
    with pytest.warns(UserWarning):
        assert flags == StandInScorer()(checks)
    clauses = sum(len(StandInScorer.flags(type("All", (StandInScorer,), {"rate": 1.0})(), "q", t)) for t in texts)
    flagged = sum(len(f) for f in flags)
    assert 0.2 < flagged / clauses < 0.4
    for text, row in zip(texts, flags):
        assert all(f and f in text and len(f.split()) <= StandInScorer.words for f in row)


def test_parse_prm_answer_is_the_official_parser_without_its_none():
    """The official `extract_judgement_from_response` cases (hallu_token_reward_vstar.py @4ef2db6)."""
    assert parse_prm_answer("<answer>['a dog under the table']</answer>") == ["a dog under the table"]
    assert parse_prm_answer("x <answer> ['cat on the mat', \"dog\"] </answer> <answer>['no']</answer>") == [
        "cat on the mat",
        "dog",
    ]
    assert parse_prm_answer("<answer>The response is correct</answer>") == []
    assert parse_prm_answer("<answer>['a', 3, ['b']]</answer>") == ["a"]  # the official finder drops non-strings
    for no_flags in ("no tags", "<answer>['open", "<answer>nonsense</answer>", "<answer>[1 +]</answer>"):
        assert parse_prm_answer(no_flags) == []


def test_the_scorer_is_named_by_import_path_and_a_bad_path_is_refused():
    cfg = OmegaConf.load(CONFIGS / "tiny_perceval.yaml")
    assert validate_config(cfg, "rl").algorithm.perceval_scorer.endswith("StandInScorer")
    assert isinstance(load_scorer("vppo_recipes.methods.perceval.StandInScorer"), StandInScorer)
    cfg.algorithm.perceval_scorer = "no_such_module.Scorer"
    with pytest.raises(ConfigError, match=r"perceval_scorer = 'no_such_module\.Scorer' cannot be imported"):
        validate_config(cfg, "rl")
    cfg.algorithm.perceval_scorer = "vppo_recipes.methods.perceval.STAND_IN"  # a str: not callable
    with pytest.raises(ConfigError, match="no class or zero-argument factory"):
        validate_config(cfg, "rl")
    cfg.algorithm.perceval_scorer = "vppo_recipes.methods.perceval.StandInScorer"
    cfg.algorithm.perceval_penalty = 1.5  # α > 1 would flip a flagged token's advantage: no weight expresses it
    with pytest.raises(ConfigError, match="perceval_penalty"):
        validate_config(cfg, "rl")
    assert build_method({"name": "perceval"}) == Perceval()  # the published α = 0.1


def _step(texts: list[str], advantages: list[float], width: int) -> MicroStep:
    ids, mask = torch.zeros(len(texts), width, dtype=torch.long), torch.zeros(len(texts), width)
    for i, t in enumerate(texts):
        row = [ord(c) for c in t] + [EOS]  # the stop token, dropped from the decoded text
        ids[i, : len(row)] = torch.tensor(row[:width])
        mask[i, : len(row)] = 1
    prompts = [SimpleNamespace(question=f"q{i}", text="prompt", images=[]) for i in range(len(texts))]
    mb = MicroBatch(
        inputs={}, responses=ids, mask=mask, prompt_length=1, advantages=torch.tensor(advantages),
        uids=list(range(len(texts))), response_index=[0] * len(texts), images_per_row=[0] * len(texts),
        lp_sampler=torch.zeros(len(texts), width), prompts=prompts, texts=texts,
    )  # fmt: skip
    return MicroStep(mb, NoGradPass(torch.zeros(len(texts), width)))


def test_shape_penalises_exactly_the_flagged_words(monkeypatch):
    monkeypatch.setitem(sys.modules, "perceval_test_scorers", sys.modules[__name__])
    method = Perceval(perceval_penalty=0.25, perceval_scorer="perceval_test_scorers.EveryOtherWord")
    ctx = SimpleNamespace(processor=SimpleNamespace(tokenizer=CharTokenizer()))
    steps = [
        [_step(["aa bb cc", "dd ee"], [1.0, -2.0], 12), _step(["ff gg hh ii"], [0.0], 11)],
        [_step(["jj kk"], [0.5], 5)],  # cut at the length budget: no stop token
    ]
    shaped = method.shape(ctx, steps)
    flagged_words = {0: ["bb", "aa"], 1: ["ee", "dd"], 2: ["gg", "ii", "ff"], 3: ["kk", "jj"]}
    rows = [
        (s, i, sh) for mini, shs in zip(steps, shaped) for s, sh in zip(mini, shs) for i in range(len(s.batch.texts))
    ]
    for k, (s, i, sh) in enumerate(rows):
        text, adv, width = s.batch.texts[i], float(s.batch.advantages[i]), s.batch.mask.shape[1]
        want = torch.zeros(width)
        want[: int(s.batch.mask[i].sum())] = 1.0
        sign = (adv > 0) - (adv < 0)
        for word in flagged_words[k]:
            c0 = text.find(word)
            want[c0 : min(c0 + len(word), width)] = 1.0 - 0.25 * sign
        torch.testing.assert_close(sh.token_weights[i], want, msg=text)
        torch.testing.assert_close(sh.advantages, s.batch.advantages)
        asked = len(text.split()[1::2]) + 3
        assert sh.outputs["asked"][i] == asked and sh.outputs["found"][i] == asked - 1  # "NOT THERE" dropped
        assert sh.outputs["aligned"][i] == 1.0  # the character tokenizer re-tokenises to the generated ids
    method = Perceval(perceval_scorer="perceval_test_scorers.WrongCount")
    with pytest.raises(ValueError, match="returned 3 rows for 4 responses"):
        method.shape(ctx, steps)
