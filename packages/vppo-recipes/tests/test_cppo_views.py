"""CPPO's two views (ALGORITHMS.md §9.11, `methods/cppo.py`): the official augmentations on PIL images, drawn from a
seeded generator. The recipe's use of them (re-collation, log-probs, entropies) is checked by the whole-step test."""

from __future__ import annotations

import random

import numpy as np
import pytest
from PIL import Image

from vppo_recipes.methods.cppo import (
    AugmentedImages,
    _perspective_coefficients,
    preserving_augmentation,
    removing_augmentation,
)


def _image(w=84, h=56, seed=0):
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8))


@pytest.mark.parametrize("kind", ["preserving", "removing"])
def test_a_view_keeps_the_size_and_is_the_same_for_the_same_seed(kind):
    images = [_image(), _image(28, 28, 1)]
    for seed in range(20):
        out = AugmentedImages(kind).images(images, seed)
        again = AugmentedImages(kind).images(images, seed)
        assert [o.size for o in out] == [i.size for i in images] and all(o.mode == "RGB" for o in out)
        assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(out, again))
    draws = {np.asarray(AugmentedImages(kind).images(images, s)[0]).tobytes() for s in range(20)}
    assert len(draws) > 10  # the seed changes the draw


def test_the_removing_view_draws_both_official_transforms():
    """Occlusion (50 noise patches, most pixels kept) and zoom crop (nearly every pixel moved) both occur."""
    image = _image()
    kept = []
    for seed in range(40):
        out = np.asarray(removing_augmentation(image, random.Random(seed)))
        kept.append(float((out == np.asarray(image)).all(-1).mean()))
    assert any(k > 0.05 for k in kept) and any(k < 0.02 for k in kept)


def test_the_preserving_view_is_sometimes_the_image_itself():
    """RandomPerspective has p = 0.5: one draw in six (1/3 · 1/2) returns the image unchanged."""
    image = _image()
    same = sum(
        np.array_equal(np.asarray(preserving_augmentation(image, random.Random(s))), np.asarray(image))
        for s in range(300)
    )
    assert 25 <= same <= 75


def test_the_perspective_coefficients_map_the_new_corners_back_to_the_old():
    start = [[0, 0], [83, 0], [83, 55], [0, 55]]
    end = [[3, 2], [80, 5], [82, 53], [1, 50]]
    a, b, c, d, e, f, g, h = _perspective_coefficients(start, end)
    for (x, y), (u, v) in zip(end, start):
        den = g * x + h * y + 1
        assert (a * x + b * y + c) / den == pytest.approx(u, abs=1e-9)
        assert (d * x + e * y + f) / den == pytest.approx(v, abs=1e-9)


def test_a_tiny_image_survives_the_occlusion():
    """Under 20 px a side a patch side can round to 0 px; it is skipped."""
    for seed in range(20):
        assert removing_augmentation(_image(8, 8), random.Random(seed)).size == (8, 8)


def test_an_unknown_kind_is_refused():
    with pytest.raises(ValueError, match="kind"):
        AugmentedImages("other")
