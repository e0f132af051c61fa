"""Tests of vppo_core.perturb against transformers' Qwen2-VL image processor (PIL backend, no torchvision).

Images are built at sizes that are multiples of patch·merge (28 for Qwen2.5-VL, 32 for Qwen3-VL) inside
[min_pixels, max_pixels], so the processor does not resize them and pixel-space edits map onto patches exactly.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from vppo_core.perturb import patch_positions, perturb_pixels

# These tests compare with the real image processor; `nox -s tests_core` (torch only) skips them.
np = pytest.importorskip("numpy")
transformers = pytest.importorskip("transformers")
Image = pytest.importorskip("PIL.Image")

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


def test_blur_of_constant_image_is_unchanged():
    proc = _processor(*QWEN3)
    pv, grid = _process(proc, [Image.new("RGB", (64, 96), (10, 200, 90))])
    torch.testing.assert_close(perturb_pixels(pv, grid, mode="blur", **_kw(proc)), pv, atol=1e-6, rtol=0)


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
