"""Tests of vppo_core.perturb against transformers' Qwen2-VL image processor (PIL backend, no torchvision).

Images are built at sizes that are multiples of patch·merge (28 for Qwen2.5-VL, 32 for Qwen3-VL) inside
[min_pixels, max_pixels], so the processor does not resize them and pixel-space edits map onto patches exactly.
`blacken_image_blocks` (the official pre-processor blackening) is checked on hand-worked tiny images with torch
alone; its comparison with the processor on unaligned sizes is in vppo-rollout/tests/test_perturbation.py.
"""

from __future__ import annotations

import importlib.util
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from vppo_core.perturb import blacken_image_blocks, patch_positions, perturb_pixels

# The tests marked `needs_processor` compare with the real image processor; `nox -s tests_core` (torch only)
# skips them and runs the torch-only ones.
_HAVE_PROCESSOR = all(importlib.util.find_spec(m) is not None for m in ("numpy", "transformers", "PIL"))
needs_processor = pytest.mark.skipif(not _HAVE_PROCESSOR, reason="needs numpy, transformers and pillow")
if _HAVE_PROCESSOR:
    import numpy as np
    import transformers
    from PIL import Image

# (patch size, image_mean, image_std): Qwen2.5-VL uses CLIP statistics and 14 px patches, Qwen3-VL 0.5/0.5 and 16.
QWEN25 = (14, None, None)
QWEN3 = (16, [0.5, 0.5, 0.5], [0.5, 0.5, 0.5])


def _processor(patch: int, mean, std):
    factor = 2 * patch
    kwargs = {"patch_size": patch, "min_pixels": factor * factor, "max_pixels": factor * factor * 64}
    if mean is not None:
        kwargs |= {"image_mean": mean, "image_std": std}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "requires torchvision; falling back to the PIL backend"
        return transformers.Qwen2VLImageProcessor(**kwargs)


def _images(patch: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    f = 2 * patch
    sizes = [(2 * f, 3 * f), (4 * f, 2 * f)]  # (height, width): two images of different grids
    return [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for h, w in sizes]


def _process(proc, images):
    out = proc(images=images, return_tensors="pt")
    return out["pixel_values"], out["image_grid_thw"]


def _kw(proc):
    return {"image_mean": proc.image_mean, "image_std": proc.image_std, "rescale_factor": proc.rescale_factor}


@needs_processor
@pytest.mark.parametrize(("patch", "mean", "std"), [QWEN25, QWEN3], ids=["qwen2.5-vl-14px", "qwen3-vl-16px"])
def test_blacken_equals_processing_the_blackened_pil_image(patch, mean, std):
    proc = _processor(patch, mean, std)
    images = _images(patch)
    pv, grid = _process(proc, images)
    assert pv.shape[1] == 3 * 2 * patch * patch
    out, mask = perturb_pixels(
        pv, grid, prob=0.5, generator=torch.Generator().manual_seed(0), return_mask=True, **_kw(proc)
    )
    assert 0 < int(mask.sum()) < mask.numel()
    arrays = [np.array(im) for im in images]
    for (i, _t, y, x), hit in zip(patch_positions(grid).tolist(), mask.tolist()):
        if hit:
            arrays[i][y * patch : (y + 1) * patch, x * patch : (x + 1) * patch] = 0
    expected, grid2 = _process(proc, [Image.fromarray(a) for a in arrays])
    assert torch.equal(grid, grid2)
    torch.testing.assert_close(out, expected, atol=1e-6, rtol=0)
    # Unmasked rows are untouched, bit for bit.
    assert torch.equal(out[~mask], pv[~mask])


@needs_processor
def test_given_patch_mask_is_applied_exactly_and_input_is_not_modified():
    proc = _processor(*QWEN25)
    pv, grid = _process(proc, _images(14))
    before = pv.clone()
    mask = torch.zeros(pv.shape[0], dtype=torch.bool)
    mask[[0, 5, 17]] = True
    out, returned = perturb_pixels(pv, grid, patch_mask=mask, return_mask=True, **_kw(proc))
    assert torch.equal(returned, mask) and torch.equal(pv, before)
    changed = (out != pv).any(-1)
    assert changed[[0, 5, 17]].all() and int(changed.sum()) == 3


@needs_processor
def test_grey_equals_processing_a_grey_image():
    proc = _processor(*QWEN3)
    images = _images(16)
    pv, grid = _process(proc, images)
    grey, _ = _process(proc, [Image.new("RGB", im.size, (128, 128, 128)) for im in images])
    torch.testing.assert_close(perturb_pixels(pv, grid, mode="grey", **_kw(proc)), grey, atol=1e-6, rtol=0)


def _np_gaussian_blur(img: np.ndarray, sigma: float) -> np.ndarray:
    """Plain numpy reference: sampled Gaussian truncated at 3σ, separable, edges replicated. img: [H, W, C] float."""
    r = max(1, int(np.ceil(3 * sigma)))
    k = np.exp(-0.5 * (np.arange(-r, r + 1) / sigma) ** 2)
    k /= k.sum()
    pad = np.pad(img, ((0, 0), (r, r), (0, 0)), mode="edge")
    img = sum(k[i] * pad[:, i : i + img.shape[1]] for i in range(2 * r + 1))
    pad = np.pad(img, ((r, r), (0, 0), (0, 0)), mode="edge")
    return sum(k[i] * pad[i : i + img.shape[0]] for i in range(2 * r + 1))


@needs_processor
def test_blur_equals_processing_the_reference_blurred_image():
    proc = _processor(*QWEN25)
    images = _images(14, seed=3)
    pv, grid = _process(proc, images)
    out = perturb_pixels(pv, grid, mode="blur", blur_sigma=6.0, **_kw(proc))
    # The processor is affine per channel, so processing a float-valued blurred image must give the same rows.
    mean = np.array(proc.image_mean, dtype=np.float64)
    std = np.array(proc.image_std, dtype=np.float64)
    rows = []
    for im, (_t, h, w) in zip(images, grid.tolist()):
        blurred = _np_gaussian_blur(np.array(im, dtype=np.float64), 6.0) / 255.0
        norm = ((blurred - mean) / std).transpose(2, 0, 1)  # [C, H, W]
        x = norm.reshape(3, h // 2, 2, 14, w // 2, 2, 14).transpose(1, 4, 2, 5, 0, 3, 6)
        x = np.broadcast_to(x[:, :, :, :, :, None], (*x.shape[:5], 2, 14, 14))
        rows.append(torch.from_numpy(x.reshape(h * w, -1).astype(np.float32)))
    torch.testing.assert_close(out, torch.cat(rows), atol=1e-5, rtol=0)
    # And it is close to PIL's own GaussianBlur(radius=6) (a box-filter approximation) on the 0–255 scale.
    pil, _ = _process(proc, [im.filter(__import__("PIL.ImageFilter").ImageFilter.GaussianBlur(6)) for im in images])
    std_t = torch.tensor(proc.image_std).repeat_interleave(2 * 14 * 14)
    diff = ((out - pil) * std_t * 255).abs().mean().item()
    assert diff < 2.0


@needs_processor
def test_blur_of_constant_image_is_unchanged():
    proc = _processor(*QWEN3)
    pv, grid = _process(proc, [Image.new("RGB", (64, 96), (10, 200, 90))])
    torch.testing.assert_close(perturb_pixels(pv, grid, mode="blur", **_kw(proc)), pv, atol=1e-6, rtol=0)


@needs_processor
def test_noise_has_requested_std_is_clipped_and_shared_by_both_temporal_copies():
    proc = _processor(*QWEN25)
    pv, grid = _process(proc, [Image.new("RGB", (28 * 8, 28 * 8), (128, 128, 128))])
    kw = _kw(proc)
    out = perturb_pixels(pv, grid, mode="noise", noise_std=5.0, generator=torch.Generator().manual_seed(1), **kw)
    std_t = torch.tensor(proc.image_std).repeat_interleave(2 * 14 * 14)
    delta = ((out - pv) * std_t * 255).reshape(-1, 3, 2, 14 * 14)  # 0–255 scale
    assert torch.equal(delta[:, :, 0], delta[:, :, 1])
    assert delta.std().item() == pytest.approx(5.0, rel=0.05)
    assert abs(delta.mean().item()) < 0.2
    # std 189 on a mid-grey image: clipped to the valid pixel range [0, 255].
    big = perturb_pixels(pv, grid, mode="noise", generator=torch.Generator().manual_seed(1), **kw)
    level = big * std_t + torch.tensor(proc.image_mean).repeat_interleave(2 * 14 * 14)
    assert level.min().item() >= -1e-6 and level.max().item() <= 1 + 1e-6
    assert (level.abs() < 1e-6).float().mean() > 0.1  # a real share of pixels hit the clip


@needs_processor
def test_same_generator_seed_reproduces_and_different_calls_draw_fresh_masks():
    proc = _processor(*QWEN25)
    pv, grid = _process(proc, _images(14))
    kw = _kw(proc)
    a = perturb_pixels(pv, grid, generator=torch.Generator().manual_seed(7), **kw)
    b = perturb_pixels(pv, grid, generator=torch.Generator().manual_seed(7), **kw)
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    _, m1 = perturb_pixels(pv, grid, generator=g, return_mask=True, **kw)
    _, m2 = perturb_pixels(pv, grid, generator=g, return_mask=True, **kw)
    assert not torch.equal(m1, m2)


def test_blacken_probability_is_respected_per_patch():
    pv = torch.zeros(4000, 1176)
    grid = torch.tensor([[1, 40, 50], [1, 20, 100]])
    g = torch.Generator().manual_seed(0)
    _, mask = perturb_pixels(
        pv, grid, prob=0.3, generator=g, return_mask=True, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    assert mask.float().mean().item() == pytest.approx(0.3, abs=0.03)
    for prob, expected in ((0.0, 0), (1.0, 4000)):
        _, m = perturb_pixels(pv, grid, prob=prob, return_mask=True, image_mean=[0.5] * 3, image_std=[0.5] * 3)
        assert int(m.sum()) == expected


@needs_processor
def test_bf16_pixel_values_keep_dtype():
    proc = _processor(*QWEN25)
    pv, grid = _process(proc, _images(14))
    for mode in ("blacken", "noise", "blur", "grey"):
        out = perturb_pixels(pv.bfloat16(), grid, mode=mode, **_kw(proc))
        assert out.dtype == torch.bfloat16 and out.shape == pv.shape


def test_patch_positions_follow_the_merge_size_row_order():
    pos = patch_positions(torch.tensor([[1, 2, 4]]))
    # rows: (h/2, w/2, 2, 2): the 2×2 block of merged patches is contiguous
    assert pos[:8, 2:].tolist() == [[0, 0], [0, 1], [1, 0], [1, 1], [0, 2], [0, 3], [1, 2], [1, 3]]
    assert pos[:, 0].eq(0).all()


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"mode": "erase"}, "mode must be one of"),
        ({"pixel_values": torch.zeros(10, 1176)}, "rows but image_grid_thw describes"),
        ({"pixel_values": torch.zeros(8, 1000)}, "cannot infer patch_size"),
        ({"patch_size": 16}, "patch_size=16 gives rows"),
        ({"image_grid_thw": torch.tensor([1, 2, 4])}, "image_grid_thw must be"),
        ({"image_grid_thw": torch.tensor([[1, 1, 8]])}, "multiples of merge_size"),
        ({"prob": 1.5}, "prob must be"),
        ({"image_mean": [0.5, 0.5]}, "image_mean must be 3"),
        ({"image_std": [0.5, 0.0, 0.5]}, "image_std must be > 0"),
        ({"patch_mask": torch.ones(8)}, "patch_mask must be a bool"),
        ({"patch_mask": torch.ones(9, dtype=torch.bool)}, "patch_mask has shape"),
        ({"patch_mask": torch.ones(8, dtype=torch.bool), "mode": "grey"}, "patch_mask only applies"),
        ({"pixel_values": torch.zeros(8, 1176, dtype=torch.long)}, "pixel_values must be"),
    ],
)
def test_bad_input_raises_value_error_naming_argument(kwargs, match):
    args = {
        "pixel_values": torch.zeros(8, 1176),
        "image_grid_thw": torch.tensor([[1, 2, 4]]),
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
    } | kwargs
    pv, grid = args.pop("pixel_values"), args.pop("image_grid_thw")
    with pytest.raises(ValueError, match=match):
        perturb_pixels(pv, grid, **args)


def test_official_mode_is_refused_and_names_the_functions_that_serve_it():
    with pytest.raises(ValueError, match=r"official_perturbed_pixel_values.*blacken_image_blocks"):
        perturb_pixels(
            torch.zeros(8, 1176),
            torch.tensor([[1, 2, 4]]),
            mode="official",
            image_mean=[0.5] * 3,
            image_std=[0.5] * 3,
        )


# --- blacken_image_blocks: the official order's blackening of the PIL image (torch only) ---------------------------


def _image(h: int, w: int, c: int | None = 3, seed: int = 0) -> torch.Tensor:
    """A uint8 image with no zero pixel, so every 0 in an output was written by the blackening."""
    shape = (h, w) if c is None else (h, w, c)
    return torch.randint(1, 256, shape, generator=torch.Generator().manual_seed(seed), dtype=torch.uint8)


def _loop_reference(image: torch.Tensor, block: int, draws: list[float], prob: float) -> torch.Tensor:
    """The official double loop, written out: rows of blocks top to bottom, blocks left to right, one draw each,
    the last row/column of blocks clipped at the image edge."""
    out = image.clone()
    h, w = image.shape[:2]
    k = 0
    for y in range(0, h, block):
        for x in range(0, w, block):
            if draws[k] < prob:
                out[y : min(y + block, h), x : min(x + block, w)] = 0
            k += 1
    assert k == len(draws)
    return out


def test_blacken_blocks_hand_worked_3x5_with_partial_edge_blocks():
    img = _image(3, 5)
    # b = 2: blocks are rows {0,1} | {2} (partial) and columns {0,1} | {2,3} | {4} (partial) -> a 2×3 block grid.
    mask = torch.tensor([[True, False, False], [False, False, True]])
    out, returned = blacken_image_blocks(img, block_size=2, block_mask=mask, return_mask=True)
    expected = img.clone()
    expected[0:2, 0:2] = 0  # block (0, 0): full 2×2
    expected[2:3, 4:5] = 0  # block (1, 2): the 1×1 bottom-right corner
    assert torch.equal(out, expected) and torch.equal(returned, mask)
    assert int((out == 0).all(-1).sum()) == 4 + 1
    # Partial blocks: the bottom row of blocks is 1 px high, the right column 1 px wide.
    bottom = blacken_image_blocks(img, block_size=2, block_mask=torch.tensor([[False] * 3, [True] * 3]))
    assert bottom[2].eq(0).all() and torch.equal(bottom[:2], img[:2])
    right = blacken_image_blocks(img, block_size=2, block_mask=torch.tensor([[False, False, True]] * 2))
    assert right[:, 4].eq(0).all() and torch.equal(right[:, :4], img[:, :4])


def test_blacken_blocks_single_block_larger_than_the_image():
    img = _image(5, 3)
    out, mask = blacken_image_blocks(img, block_size=14, prob=1.0, return_mask=True)
    assert mask.shape == (1, 1) and out.eq(0).all()


def test_blacken_blocks_draws_one_uniform_per_block_read_row_major():
    img = _image(29, 30)  # 14-px blocks: ceil(29/14) = 3 rows (the last 1 px high), ceil(30/14) = 3 columns (2 px)
    g = torch.Generator().manual_seed(123)
    out, mask = blacken_image_blocks(img, prob=0.5, generator=g, return_mask=True)
    draws = torch.rand(9, generator=torch.Generator().manual_seed(123))
    assert torch.equal(mask, (draws < 0.5).view(3, 3))
    assert torch.equal(out, _loop_reference(img, 14, draws.tolist(), 0.5))
    # The generator advanced by exactly the 9 draws.
    ref = torch.Generator().manual_seed(123)
    torch.rand(9, generator=ref)
    assert torch.equal(g.get_state(), ref.get_state())


def test_blacken_blocks_prob_0_and_1_and_input_untouched():
    img = _image(20, 31)
    before = img.clone()
    none = blacken_image_blocks(img, prob=0.0, generator=torch.Generator().manual_seed(0))
    assert torch.equal(none, img) and none.data_ptr() != img.data_ptr()
    every = blacken_image_blocks(img, prob=1.0, generator=torch.Generator().manual_seed(0))
    assert every.eq(0).all() and every.dtype == torch.uint8 and every.shape == img.shape
    assert torch.equal(img, before)


def test_blacken_blocks_seeded_generator_is_deterministic_and_fresh_per_call():
    img = _image(60, 90)
    a = blacken_image_blocks(img, generator=torch.Generator().manual_seed(7))
    b = blacken_image_blocks(img, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)
    g = torch.Generator().manual_seed(7)
    _, m1 = blacken_image_blocks(img, generator=g, return_mask=True)
    _, m2 = blacken_image_blocks(img, generator=g, return_mask=True)
    assert not torch.equal(m1, m2)


def test_blacken_blocks_given_mask_does_not_consume_the_generator_and_greyscale_works():
    g = torch.Generator().manual_seed(1)
    state = g.get_state()
    grey = _image(4, 4, c=None)
    out = blacken_image_blocks(
        grey, block_size=3, generator=g, block_mask=torch.tensor([[False, True], [False, False]])
    )
    assert torch.equal(g.get_state(), state)
    expected = grey.clone()
    expected[0:3, 3:4] = 0
    assert torch.equal(out, expected)


def test_blacken_blocks_probability_is_respected_per_block():
    _, mask = blacken_image_blocks(
        _image(700, 700), prob=0.3, generator=torch.Generator().manual_seed(0), return_mask=True
    )
    assert mask.shape == (50, 50)
    assert mask.float().mean().item() == pytest.approx(0.3, abs=0.03)


@settings(max_examples=60, deadline=None)
@given(
    h=st.integers(1, 40),
    w=st.integers(1, 40),
    c=st.sampled_from([None, 1, 3, 4]),
    block=st.integers(1, 16),
    prob=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_blacken_blocks_property_equals_the_loop_with_the_same_draws(h, w, c, block, prob, seed):
    img = _image(h, w, c, seed=seed % 1000)
    out, mask = blacken_image_blocks(
        img, block_size=block, prob=prob, generator=torch.Generator().manual_seed(seed), return_mask=True
    )
    nby, nbx = -(-h // block), -(-w // block)
    draws = torch.rand(nby * nbx, generator=torch.Generator().manual_seed(seed))
    assert mask.shape == (nby, nbx) and torch.equal(mask.flatten(), draws < prob)
    assert torch.equal(out, _loop_reference(img, block, draws.tolist(), prob))


@pytest.mark.parametrize(
    ("image", "kwargs", "match"),
    [
        (torch.zeros(4, 4, 3), {}, "image must be uint8"),
        (torch.zeros(4, 4, 3, dtype=torch.int64), {}, "image must be uint8"),
        (torch.zeros(1, 4, 4, 3, dtype=torch.uint8), {}, r"image must be a uint8 tensor \[H, W, C\]"),
        (torch.zeros(4, dtype=torch.uint8), {}, r"image must be a uint8 tensor \[H, W, C\]"),
        ([[0, 0], [0, 0]], {}, r"image must be a uint8 tensor \[H, W, C\]"),
        (torch.zeros(0, 4, 3, dtype=torch.uint8), {}, "at least one pixel"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), {"block_size": 0}, "block_size must be a positive int"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), {"block_size": 14.0}, "block_size must be a positive int"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), {"block_size": True}, "block_size must be a positive int"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), {"prob": 1.5}, "prob must be"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), {"prob": -0.1}, "prob must be"),
        (torch.zeros(4, 4, 3, dtype=torch.uint8), {"block_mask": torch.ones(1, 1)}, "block_mask must be a bool"),
        (
            torch.zeros(15, 4, 3, dtype=torch.uint8),
            {"block_mask": torch.ones(1, 1, dtype=torch.bool)},
            r"block_mask has shape \(1, 1\), expected \(2, 1\)",
        ),
    ],
)
def test_blacken_blocks_bad_input_raises_value_error_naming_argument(image, kwargs, match):
    with pytest.raises(ValueError, match=match):
        blacken_image_blocks(image, **kwargs)
