"""Qwen3-VL's `<think>` / `</think>` are added tokens: the prompt's tags, the decoded response's tags and the format
reward must behave as with plain text, whether the tokenizer marks the tags special or not (issue 24)."""

from __future__ import annotations

import random

import pytest

from vppo_eval.reward import compute_rewards
from vppo_rollout.sampling import response_decoder
from vppo_rollout.tiny import build_tokenizer

RESPONSE = "<think>I see a red circle in the top-left corner.</think> The answer is \\boxed{red}"


@pytest.fixture(scope="module", params=[False, True], ids=["tags-not-special (Qwen3-VL)", "tags-special"])
def tokenizer(request):
    return build_tokenizer(think_special=request.param)


def test_the_tags_are_one_added_token_each_in_the_prompt(tokenizer):
    tags = tokenizer.convert_tokens_to_ids(["<think>", "</think>"])
    assert all(t in tokenizer.added_tokens_decoder for t in tags)
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Reason inside <think> </think> tags, then answer in \\boxed{}."}],
        tokenize=False,
        add_generation_prompt=True,
    )
    ids = tokenizer(prompt)["input_ids"]
    assert [ids.count(t) for t in tags] == [1, 1]
    assert tokenizer.decode(ids, skip_special_tokens=False) == prompt


def test_a_decoded_response_keeps_its_tags_drops_im_end_and_scores_as_plain_text(tokenizer):
    # the ids an engine samples: the response, then the stop token (kept as the last id)
    ids = tokenizer(RESPONSE + "<|im_end|>")["input_ids"]
    assert ids[-1] == tokenizer.convert_tokens_to_ids("<|im_end|>")
    text = response_decoder(tokenizer)(ids)  # what both engines write (TransformersSampler, VLLMSampler)
    assert text == RESPONSE
    assert compute_rewards([text], ["red"]) == compute_rewards([RESPONSE], ["red"])
    assert compute_rewards([text], ["red"])["format"] == [1.0]


def test_plain_skip_special_tokens_loses_special_tags_which_is_why_the_engines_use_response_decoder(tokenizer):
    ids = tokenizer(RESPONSE + "<|im_end|>")["input_ids"]
    skipped = tokenizer.decode(ids, skip_special_tokens=True)
    special = tokenizer.added_tokens_decoder[tokenizer.convert_tokens_to_ids("<think>")].special
    assert (skipped == RESPONSE) is (not special)
    assert compute_rewards([skipped], ["red"])["format"] == [0.0 if special else 1.0]


def test_response_decoder_is_skip_special_tokens_where_the_tags_are_not_special():
    """On a vocabulary whose tags are not special (Qwen2.5-VL / Qwen3-VL), nothing changes: any ids, special ones
    included, decode to what `decode(skip_special_tokens=True)` gives."""
    tok = build_tokenizer()
    decode = response_decoder(tok)
    rng = random.Random(0)
    n = len(tok)
    for _ in range(200):
        ids = [rng.randrange(n) for _ in range(rng.randrange(1, 24))]
        assert decode(ids) == tok.decode(ids, skip_special_tokens=True), ids
