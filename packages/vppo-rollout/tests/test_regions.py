"""CGPO's evidence regions (vppo_rollout.regions) and ToR's no-image prompt (prompts.prompt_without_images)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vppo_rollout.collate import collate_rollout
from vppo_rollout.prompts import build_prompt, prompt_without_images
from vppo_rollout.regions import EvidenceRegion, filled_region_images, parse_regions, region_token_mask


def _region(name: str, image_idx, rid, body: str) -> str:
    return f'<region name="{name}" image_idx="{image_idx}" id="{rid}">{body}</region>'


def test_regions_are_parsed_validated_and_merged_by_image_and_name():
    text = (
        "<think>look "
        + _region("Left Bar", 0, 1, "[[0, 0, 500, 1000]]")
        + _region("left  bar", 0, 2, "[[10, 10, 20, 20], [5, 5, 5, 9]]")  # same region; the empty box is dropped
        + _region("dot", 1, 3, "[[100, 100, 200.0, 300]]")  # an integer-valued float is an integer
        + _region("ghost", 2, 4, "[[0, 0, 1, 1]]")  # no third image
        + _region("again", 0, 1, "[[0, 0, 1, 1]]")  # id 1 used twice
        + _region("bad", 0, 5, "[[0, 0, 1, 1], [1, 2]]")  # one malformed box voids the list
        + _region("far", 0, 6, "[[0, 0, 1001, 5]]")  # off the 0-1000 grid
        + _region("text", 0, 7, "[[0, 0, 9, 9]] trailing")  # not exactly a list
        + '<region name="x" id="8">[[0, 0, 9, 9]]</region>'  # no image_idx
        + "</think> \\boxed{2}"
    )
    assert parse_regions(text, num_images=2) == [
        EvidenceRegion("Left Bar", 0, [[0, 0, 500, 1000], [10, 10, 20, 20]]),
        EvidenceRegion("dot", 1, [[100, 100, 200, 300]]),
    ]


def test_json_regions_are_read_inside_think_only_without_any_region_tag():
    js = '{"label": "cat", "bbox_list": [[0, 0, 500, 500], [1, 1, 1, 9], "x"]}'
    assert parse_regions(f"<think>{js} [{js}]</think>", 1) == [EvidenceRegion("cat", 0, [[0, 0, 500, 500]])] * 2
    assert parse_regions(f"{js}", 1) == []  # outside <think>
    assert parse_regions(f"<think>{js}</think><region broken", 1) == []  # a region tag disables the JSON form
    assert parse_regions("<think>no boxes</think>", 1) == []


def test_filled_boxes_take_their_own_rounded_mean_of_the_original_pixels():
    arr = np.zeros((4, 4, 3), dtype=np.uint8)
    arr[:, :, 0] = np.arange(16, dtype=np.uint8).reshape(4, 4) * 10  # red ramp 0..150
    image = Image.fromarray(arr)
    # box 1: the left half (x 0-2, all rows); box 2 overlaps it: columns 1-2 of rows 0-1
    text = _region("a", 0, 0, "[[0, 0, 500, 1000], [250, 0, 750, 500]]")
    (out,) = filled_region_images([image], text)
    got = np.asarray(out)
    left = arr[:, :2, 0].astype(float).mean()  # 0,10,40,50,80,90,120,130 -> 65
    overlap = arr[:2, 1:3, 0].astype(float).mean()  # 10,20,50,60 -> 35
    assert (got[:2, 1:3, 0] == round(overlap)).all()  # the later box, from the original pixels (not from box 1's fill)
    assert got[2, 0, 0] == round(left) and got[0, 0, 0] == round(left)
    assert (got[:, 3] == arr[:, 3]).all() and (got[2:, 2] == arr[2:, 2]).all()  # outside every box: unchanged
    assert out.size == image.size
    # half-to-even rounding of a .5 mean, as numpy's (and the public implementation's) np.round
    two = Image.fromarray(np.array([[[1, 0, 0], [2, 0, 0]]], dtype=np.uint8))
    assert np.asarray(filled_region_images([two], _region("b", 0, 0, "[[0, 0, 1000, 1000]]"))[0])[0, 0, 0] == 2


def test_images_without_boxes_are_returned_unchanged():
    images = [Image.new("RGB", (8, 8), (1, 2, 3)), Image.new("RGB", (8, 8), (4, 5, 6))]
    out = filled_region_images(images, _region("a", 1, 0, "[[0, 0, 500, 500]]"))
    assert out[0] is images[0] and out[1] is not images[1]
    assert filled_region_images(images, "no regions")[1] is images[1]


def test_region_token_mask_marks_the_tokens_of_region_spans(tiny_processor):
    tok = tiny_processor.tokenizer
    text = "see " + _region("a", 0, 0, "[[0, 0, 5, 5]]") + " so \\boxed{1}"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    if tok.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False) != text:
        pytest.skip("the tiny tokenizer does not round-trip this text")
    responses = torch.tensor([[*ids, 0, 0], ids[:3] + [0] * (len(ids) - 1)])
    mask = torch.tensor([[1] * len(ids) + [0, 0], [1, 1, 1] + [0] * (len(ids) - 1)])
    got = region_token_mask(responses, mask, tok)
    offsets = tok(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    start, end = text.index("<region"), text.index("</region>") + len("</region>")
    want = [s < end and e > start and s < e for s, e in offsets]
    assert got[0, : len(ids)].tolist() == want and any(want) and not all(want)
    assert not got[0, len(ids) :].any() and not got[1].any()  # padding; a row without a whole span


def test_prompt_without_images_is_the_chat_template_without_its_image_parts(tiny_processor, tiny_model):
    images = [Image.new("RGB", (56, 56), (200, 10, 10))]
    with_image = build_prompt(tiny_processor, "How many dots?", images)
    without = prompt_without_images(with_image, tiny_processor)
    assert without.text == build_prompt(tiny_processor, "How many dots?", []).text
    assert without.images == [] and without.prompt_token_ids == tiny_processor.tokenizer(without.text)["input_ids"]
    assert tiny_processor.image_token_id not in without.prompt_token_ids
    batch = collate_rollout(
        tiny_processor,
        [without, without],
        [tiny_processor.tokenizer("ab")["input_ids"], tiny_processor.tokenizer("c")["input_ids"]],
        model=tiny_model,
    )
    assert "pixel_values" not in batch or batch["pixel_values"] is None or batch["pixel_values"].numel() == 0
    broken = type(with_image)(text=with_image.text.replace("<|vision_start|>", ""), images=images)
    with pytest.raises(ValueError, match="image parts"):
        prompt_without_images(broken, tiny_processor)
