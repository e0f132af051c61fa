"""VPPO's image perturbations applied to Qwen-processed ``pixel_values`` (ALGORITHMS.md §1, "What image' is").

Qwen2.5-VL / Qwen3-VL image processors emit, per image of ``grid_thw = (t, h, w)`` ViT patches, ``t·h·w`` rows
ordered ``(t, h/m, w/m, m, m)`` (``m = merge_size = 2``: the 2×2 patches merged into one LLM token are adjacent
rows), each row holding ``C × temporal_patch_size × p × p`` values ordered ``(channel, frame, y, x)``, already
rescaled (``× 1/255``) and normalised (``(x − mean_c) / std_c``). ``p`` is 14 for Qwen2.5-VL, 16 for Qwen3-VL;
an image is stored as ``temporal_patch_size = 2`` identical frames.

So every perturbation is a tensor operation on those rows, with no re-processing of the image:

- ``blacken`` (VPPO default): each ViT patch independently, with probability ``prob``, becomes exactly the row the
  processor produces for a black patch, ``(0 − mean_c) / std_c``; one independent draw per patch of every image
  (so a fresh mask per image and per call).
- ``noise``: additive Gaussian noise of std ``noise_std`` (189) on the 0–255 scale, then clipped to [0, 255] as
  the reference code does (its final uint8 truncation is not reproduced); the same noise on both frames.
- ``blur``: Gaussian blur with standard deviation ``blur_sigma`` (6) pixels (PIL's ``GaussianBlur(radius=6)``
  means σ = 6; PIL approximates it with box filters, this is the sampled Gaussian truncated at 3σ, edges
  replicated). Blur commutes with the per-channel affine normalisation, so it runs on normalised values.
- ``grey``: the whole image becomes grey ``grey_value`` (128) on every channel.

Perturbations act on the *processed* image, on the ViT patch grid (as the paper states). The official code
(huaixuheqing/VPPO-RL, ``fsdp_workers._process_aug_multi_modal_inputs``) perturbs a PIL image in between two resizes:
EasyR1's ``process_image`` first scales the original into [min_pixels, max_pixels] (sizes truncated with ``int``),
``perc_utils.random_patch_blackening`` then blackens 14-px blocks of *that* image (numpy's global RNG), and only
then does the Qwen processor resize it to multiples of 28. On an image whose intermediate size is not a multiple of
28 the blackened blocks therefore straddle ViT patches (most patches end up partly black); on 28-aligned sizes the
two coincide up to the resampling of black edges. This module does not reproduce that order.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = ["PERTURBATION_MODES", "patch_positions", "perturb_pixels"]

PERTURBATION_MODES = ("blacken", "noise", "blur", "grey")


def _check_grid(image_grid_thw: torch.Tensor, merge_size: int) -> torch.Tensor:
    if not isinstance(image_grid_thw, torch.Tensor) or image_grid_thw.ndim != 2 or image_grid_thw.shape[1] != 3:
        raise ValueError(
            "image_grid_thw must be a [num_images, 3] integer tensor of (t, h, w) patch counts, as returned by the "
            f"Qwen image processor; got {getattr(image_grid_thw, 'shape', type(image_grid_thw))}"
        )
    if image_grid_thw.is_floating_point() or image_grid_thw.dtype == torch.bool:
        raise ValueError(f"image_grid_thw must be an integer tensor, got {image_grid_thw.dtype}")
    grid = image_grid_thw.to("cpu", torch.long)
    if bool((grid <= 0).any()):
        raise ValueError(f"image_grid_thw entries must be positive, got {grid.tolist()}")
    if bool((grid[:, 1:] % merge_size != 0).any()):
        raise ValueError(f"image_grid_thw h and w must be multiples of merge_size={merge_size}, got {grid.tolist()}")
    return grid


def patch_positions(image_grid_thw: torch.Tensor, *, merge_size: int = 2) -> torch.Tensor:
    """Where each ``pixel_values`` row sits: ``[N, 4]`` long ``(image, t, y, x)``, in processor row order.

    ``y, x`` index the ViT patch grid, so row ``r`` covers pixels ``[y·p, (y+1)·p) × [x·p, (x+1)·p)`` of frame
    ``t`` of image ``image`` (p = patch size). Use it to turn a per-image ``[t, h, w]`` patch grid into the
    row-order ``patch_mask`` of :func:`perturb_pixels`, or back.

    Args:
        image_grid_thw: [num_images, 3] (t, h, w) patch counts.
        merge_size: the spatial merge of the vision tower (2 for Qwen2.5-VL and Qwen3-VL).
    """
    grid = _check_grid(image_grid_thw, merge_size)
    m = merge_size
    out = []
    for i, (t, h, w) in enumerate(grid.tolist()):
        tt, hb, wb, mh, mw = torch.meshgrid(
            torch.arange(t), torch.arange(h // m), torch.arange(w // m), torch.arange(m), torch.arange(m), indexing="ij"
        )
        y, x = hb * m + mh, wb * m + mw
        out.append(torch.stack([torch.full_like(tt, i), tt, y, x], dim=-1).reshape(-1, 4))
    return torch.cat(out) if out else torch.zeros(0, 4, dtype=torch.long)


def _channel_vector(values, channels: int, name: str) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64).flatten()
    if t.numel() == 1:
        t = t.expand(channels)
    if t.numel() != channels or not bool(torch.isfinite(t).all()):
        raise ValueError(
            f"{name} must be {channels} finite numbers (one per channel, from the processor), got {values}"
        )
    return t


def _gaussian_kernel(sigma: float) -> torch.Tensor:
    radius = max(1, math.ceil(3.0 * sigma))
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    k = torch.exp(-0.5 * (x / sigma) ** 2)
    return k / k.sum()


def _blur_rows(rows: torch.Tensor, grid: torch.Tensor, c: int, tp: int, p: int, m: int, sigma: float) -> torch.Tensor:
    """Un-patchify each image, blur every frame and channel (separable, replicate edges), re-patchify."""
    kernel = _gaussian_kernel(sigma).to(rows.dtype)
    r = kernel.numel() // 2
    kx = kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1)
    ky = kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1)
    out, start = [], 0
    for t, h, w in grid.tolist():
        n = t * h * w
        x = rows[start : start + n].reshape(t, h // m, w // m, m, m, c, tp, p, p)
        # -> [t, tp, c, h/m, m, p, w/m, m, p] -> images [t·tp, c, H, W]
        img = x.permute(0, 6, 5, 1, 3, 7, 2, 4, 8).reshape(t * tp, c, h * p, w * p)
        img = F.conv2d(F.pad(img, (r, r, 0, 0), mode="replicate"), kx, groups=c)
        img = F.conv2d(F.pad(img, (0, 0, r, r), mode="replicate"), ky, groups=c)
        x = img.reshape(t, tp, c, h // m, m, p, w // m, m, p).permute(0, 3, 6, 4, 7, 2, 1, 5, 8)
        out.append(x.reshape(n, -1))
        start += n
    return torch.cat(out)


def perturb_pixels(
    pixel_values: torch.Tensor,
    image_grid_thw: torch.Tensor,
    *,
    mode: str = "blacken",
    prob: float = 0.5,
    image_mean: Sequence[float] | torch.Tensor,
    image_std: Sequence[float] | torch.Tensor,
    rescale_factor: float = 1.0 / 255.0,
    generator: torch.Generator | None = None,
    patch_mask: torch.Tensor | None = None,
    return_mask: bool = False,
    patch_size: int | None = None,
    temporal_patch_size: int = 2,
    merge_size: int = 2,
    channels: int = 3,
    noise_std: float = 189.0,
    blur_sigma: float = 6.0,
    grey_value: float = 128.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The altered image ``image'`` of VPPO, computed on the processed pixel tensor (ALGORITHMS.md §1).

    Args:
        pixel_values: [N, C·temporal_patch_size·p·p] float, the processor's output for one or more images
            (N = Σ t·h·w over images). Not modified.
        image_grid_thw: [num_images, 3] long, the processor's ``image_grid_thw``.
        mode: "blacken" | "noise" | "blur" | "grey" (see the module docstring).
        prob: probability that a patch is blackened (``blacken`` only), in [0, 1].
        image_mean, image_std: the processor's per-channel ``image_mean`` / ``image_std`` (on the 0–1 scale).
        rescale_factor: the processor's ``rescale_factor`` (1/255).
        generator: torch.Generator for the patch draws and the noise (reproducible runs); on pixel_values' device.
        patch_mask: bool [N], rows to blacken (``blacken`` only); given, it replaces the random draw.
        return_mask: also return the bool [N] mask of rows that were changed (all True for noise/blur/grey).
        patch_size: ViT patch size p; None infers it from the row width (14 → Qwen2.5-VL, 16 → Qwen3-VL).
        temporal_patch_size, merge_size, channels: the processor's layout (2, 2, 3 for both Qwen families).
        noise_std: std of the Gaussian noise on the 0–255 scale. blur_sigma: blur σ in pixels.
        grey_value: the grey level on the 0–255 scale.

    Returns:
        The perturbed pixel_values, same shape/dtype/device; with ``return_mask`` a tuple ``(pixel_values, mask)``.
    """
    if mode not in PERTURBATION_MODES:
        raise ValueError(f"mode must be one of {PERTURBATION_MODES}, got {mode!r}")
    if not isinstance(pixel_values, torch.Tensor) or pixel_values.ndim != 2 or not pixel_values.is_floating_point():
        raise ValueError(
            "pixel_values must be the processor's floating [N, C·temporal·p·p] tensor (one row per ViT patch), "
            f"got {getattr(pixel_values, 'shape', type(pixel_values))}"
        )
    grid = _check_grid(image_grid_thw, merge_size)
    n_rows, width = pixel_values.shape
    expected_rows = int((grid[:, 0] * grid[:, 1] * grid[:, 2]).sum())
    if expected_rows != n_rows:
        raise ValueError(
            f"pixel_values has {n_rows} rows but image_grid_thw describes {expected_rows} patches; pass the "
            "pixel_values and image_grid_thw of the same processor call"
        )
    c, tp = channels, temporal_patch_size
    if patch_size is None:
        p = math.isqrt(width // (c * tp)) if width % (c * tp) == 0 else 0
        if p == 0 or c * tp * p * p != width:
            raise ValueError(
                f"cannot infer patch_size from the row width {width} (expected channels·temporal_patch_size·p² = "
                f"{c}·{tp}·p²); pass patch_size, channels and temporal_patch_size"
            )
    else:
        p = patch_size
        if c * tp * p * p != width:
            raise ValueError(f"patch_size={p} gives rows of {c * tp * p * p} values, pixel_values rows have {width}")
    if not (isinstance(prob, (int, float)) and 0.0 <= prob <= 1.0):
        raise ValueError(f"prob must be a probability in [0, 1], got {prob!r}")
    if not (rescale_factor > 0):
        raise ValueError(f"rescale_factor must be > 0 (the processor's, 1/255), got {rescale_factor!r}")
    mean = _channel_vector(image_mean, c, "image_mean")
    std = _channel_vector(image_std, c, "image_std")
    if bool((std <= 0).any()):
        raise ValueError(f"image_std must be > 0, got {std.tolist()}")
    if patch_mask is not None and mode != "blacken":
        raise ValueError(f"patch_mask only applies to mode='blacken', not {mode!r}")

    device, dtype = pixel_values.device, pixel_values.dtype
    # Work in float32 (float64 for float64 input): pixel_values may be bf16 in training.
    wdt = torch.float64 if dtype == torch.float64 else torch.float32

    def fill_row(level: float) -> torch.Tensor:
        """The processor's normalised value of a uniform pixel ``level`` (0–255), as a [width] row."""
        per_channel = ((level * rescale_factor - mean) / std).to(wdt)
        return per_channel.repeat_interleave(tp * p * p).to(device)

    if mode == "blacken":
        if patch_mask is None:
            gen_device = generator.device if generator is not None else device
            mask = torch.rand(n_rows, generator=generator, device=gen_device).to(device) < prob
        else:
            if not isinstance(patch_mask, torch.Tensor) or patch_mask.dtype != torch.bool:
                raise ValueError("patch_mask must be a bool tensor [N] (True = blacken that pixel_values row)")
            if tuple(patch_mask.shape) != (n_rows,):
                raise ValueError(f"patch_mask has shape {tuple(patch_mask.shape)}, expected ({n_rows},)")
            mask = patch_mask.to(device)
        # One read-and-write pass over the rows (a clone followed by a boolean index_put touches the chosen rows
        # twice). The fill is computed in float and cast once, exactly as a float processor output cast to
        # ``dtype`` would be.
        out = torch.where(mask.unsqueeze(-1), fill_row(0.0).to(dtype), pixel_values)
        return (out, mask) if return_mask else out

    mask = torch.ones(n_rows, dtype=torch.bool, device=device)
    if mode == "grey":
        out = fill_row(float(grey_value)).expand(n_rows, width).to(dtype).clone()
    elif mode == "noise":
        if not noise_std >= 0:
            raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
        x = pixel_values.to(wdt).reshape(n_rows, c, tp, p * p)
        m_, s_ = mean.to(device, wdt).view(1, c, 1, 1), std.to(device, wdt).view(1, c, 1, 1)
        level = (x * s_ + m_) / rescale_factor  # back to the 0–255 scale
        gen_device = generator.device if generator is not None else device
        # One noise draw per pixel of the image, shared by its temporal copies (they are the same frame).
        noise = torch.randn(n_rows, c, 1, p * p, generator=generator, device=gen_device, dtype=wdt).to(device)
        level = (level + noise_std * noise).clamp_(0.0, 255.0)
        out = ((level * rescale_factor - m_) / s_).reshape(n_rows, width).to(dtype)
    else:  # blur
        if not blur_sigma > 0:
            raise ValueError(f"blur_sigma must be > 0 (pixels), got {blur_sigma!r}")
        out = _blur_rows(pixel_values.to(wdt), grid, c, tp, p, merge_size, float(blur_sigma)).to(dtype)
    return (out, mask) if return_mask else out
