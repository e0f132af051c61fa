import io

import pytest
from PIL import Image

from vppo_rollout.prompts import (
    DEFAULT_INSTRUCTION,
    PromptTooLongError,
    build_prompt,
    image_token_count,
    load_image,
    pixel_bounds,
    smart_resize,
)

from .conftest import make_image


def test_prompt_has_system_instruction_and_one_pad_per_image(tiny_processor):
    p = build_prompt(tiny_processor, "How many red circles?", [make_image(56, 56, 0), make_image(30, 200, 1)])
    assert p.text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n")
    assert p.text.endswith("<|im_start|>assistant\n")
    assert p.text.count("<|image_pad|>") == 2
    assert "How many red circles? " + DEFAULT_INSTRUCTION in p.text
    assert "<think> </think>" in DEFAULT_INSTRUCTION and "\\boxed{}" in DEFAULT_INSTRUCTION
    assert p.prompt_token_ids.count(tiny_processor.image_token_id) == 2
    expanded = tiny_processor(text=[p.text], images=p.images, return_tensors="pt")["input_ids"].shape[1]
    assert p.num_tokens == expanded


def test_images_are_resized_into_pixel_bounds_on_the_patch_grid(tiny_processor):
    factor, lo, hi = pixel_bounds(tiny_processor)
    p = build_prompt(tiny_processor, "q", [make_image(10, 13, 0), make_image(500, 400, 1), make_image(56, 56, 2)])
    for img in p.images:
        assert img.width % factor == 0 and img.height % factor == 0
        assert lo <= img.width * img.height <= hi
    # already-resized images pass through unchanged
    assert build_prompt(tiny_processor, "q", p.images).images[0].size == p.images[0].size


def test_smart_resize_matches_the_processor(tiny_processor):
    for h, w in [(56, 56), (33, 91), (400, 120), (1000, 1000)]:
        img = make_image(h, w, 0)
        grid = tiny_processor.image_processor(images=[img], return_tensors="pt")["image_grid_thw"][0]
        assert image_token_count(tiny_processor, img) == grid.prod().item() // 4
        factor, lo, hi = pixel_bounds(tiny_processor)
        rh, rw = smart_resize(h, w, factor=factor, min_pixels=lo, max_pixels=hi)
        assert (rh // (factor // 2), rw // (factor // 2)) == tuple(grid[1:].tolist())


def test_image_placeholders_set_image_positions(tiny_processor):
    p = build_prompt(tiny_processor, "A <image> then B <image> which?", [make_image(56, 56, 0)] * 2, instruction=None)
    assert (
        "A <|vision_start|><|image_pad|><|vision_end|> then B <|vision_start|><|image_pad|><|vision_end|> which?"
        in p.text
    )
    with pytest.raises(ValueError, match="placeholders"):
        build_prompt(tiny_processor, "A <image> then B <image>", [make_image(56, 56, 0)])


def test_images_from_bytes_path_and_datasets_dict(tiny_processor, tmp_path):
    img = make_image(40, 50, 0)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    img.save(tmp_path / "a.png")
    for src in [buf.getvalue(), tmp_path / "a.png", str(tmp_path / "a.png"), {"bytes": buf.getvalue(), "path": None}]:
        assert load_image(src).tobytes() == img.tobytes()
    assert load_image(Image.new("L", (4, 4))).mode == "RGB"


def test_bad_images_and_limits_name_the_item(tiny_processor):
    with pytest.raises(ValueError, match=r"images\[1\]: UnidentifiedImageError.*\(undecodable_image: "):
        build_prompt(tiny_processor, "q", [make_image(56, 56, 0), b"not an image"])
    with pytest.raises(ValueError, match=r"images\[0\]: zero-size"):
        build_prompt(tiny_processor, "q", [Image.new("RGB", (0, 5))])
    with pytest.raises(ValueError, match="max_images=1"):
        build_prompt(tiny_processor, "q", [make_image(56, 56, 0)] * 2, max_images=1)
    with pytest.raises(PromptTooLongError, match="max_prompt_length=20"):
        build_prompt(tiny_processor, "q", [make_image(56, 56, 0)], max_prompt_length=20)
    assert issubclass(PromptTooLongError, ValueError)
