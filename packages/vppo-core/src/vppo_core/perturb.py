"""VPPO's image perturbations (ALGORITHMS.md §1, "What image' is"): on Qwen-processed ``pixel_values``, and the
official block blackening of the image before the processor.

Qwen2.5-VL / Qwen3-VL image processors emit, per image of ``grid_thw = (t, h, w)`` ViT patches, ``t·h·w`` rows
ordered ``(t, h/m, w/m, m, m)`` (``m = merge_size = 2``: the 2×2 patches merged into one LLM token are adjacent
rows), each row holding ``C × temporal_patch_size × p × p`` values ordered ``(channel, frame, y, x)``, already
rescaled (``× 1/255``) and normalised (``(x − mean_c) / std_c``). ``p`` is 14 for Qwen2.5-VL, 16 for Qwen3-VL;
an image is stored as ``temporal_patch_size = 2`` identical frames.

So every mode of :func:`perturb_pixels` is a tensor operation on those rows, with no re-processing of the
image:

- ``blacken`` (VPPO default): each ViT patch independently, with probability ``prob``, becomes exactly the row the
  processor produces for a black patch, ``(0 − mean_c) / std_c``; one independent draw per patch of every image
  (so a fresh mask per image and per call).
- ``noise``: additive Gaussian noise of std ``noise_std`` (189) on the 0–255 scale, then clipped to [0, 255] as
  the reference code does (its final uint8 truncation is not reproduced); the same noise on both frames.
- ``blur``: Gaussian blur with standard deviation ``blur_sigma`` (6) pixels (PIL's ``GaussianBlur(radius=6)``
  means σ = 6; PIL approximates it with box filters, this is the sampled Gaussian truncated at 3σ, edges
  replicated). Blur commutes with the per-channel affine normalisation, so it runs on normalised values.
- ``grey``: the whole image becomes grey ``grey_value`` (128) on every channel.

``perturb_pixels`` acts on the *processed* image, on the ViT patch grid (as the paper states). The official code
does not: it perturbs the PIL image *before* the Qwen processor (huaixuheqing/VPPO-RL at commit
``a23c54b83565c48e9e1fb54cc1e18a1c63557c99``):

1. EasyR1's ``process_image`` (``verl/utils/dataset.py:53-77``) scales the original only when its area is outside
   ``[min_pixels, max_pixels]`` (data config, ``[200704, 1003520]`` in ``examples/configs/config.yaml``), by
   ``sqrt(bound / area)`` with both sides truncated by ``int`` (so the area can end just *below* min_pixels), PIL's
   default resampling (bicubic; nearest for "P"/"1" images, which are converted to RGB only afterwards). The
   result is in general *not* a multiple of 28 (or 32).
2. ``fsdp_workers._process_aug_multi_modal_inputs`` (``verl/workers/fsdp_workers.py:493-530``, line 511) applies
   ``perc_utils.augment_image = random_patch_blackening`` (``verl/workers/perc_utils.py:5-18,107``; the noise,
   grey and blur helpers of that file are not wired in) to *that* image: blocks of 14 px, row-major (``y`` outer,
   ``x`` inner, from the top-left corner), one ``np.random.rand()`` draw per block from numpy's *global* RNG, the
   block set to 0 when the draw is ``< 0.5``; the partial blocks at the right and bottom edges (``W mod 14``,
   ``H mod 14`` px) are blocks like the others, with their own draw.
3. Only then does the Qwen image processor (``processor.image_processor(images=...)``, model defaults, loaded with
   ``use_fast=True``) ``smart_resize`` the blackened image to multiples of ``patch·merge`` (28 for Qwen2.5-VL; 32
   for Qwen3-VL, whose 16-px patches the 14-px blocks never match), bicubic, then rescale and normalise.

So on an intermediate size that is not a multiple of 28 the blackened blocks straddle ViT patches and most patches
end up partly black (the test ``vppo-rollout/tests/test_perturbation.py`` counts them on a 300×199 image). On a
28-aligned size inside the processor's bounds the processor does not resize, every 14-px block *is* a ViT patch of
Qwen2.5-VL, and ``blacken`` with the corresponding ``patch_mask`` gives the same ``pixel_values`` (only the order
and source of the random draws differ). ``vppo_rollout.prompts.resize_image`` already resizes prompt images to
multiples of 28/32, so with this project's prompts the intermediate image is always aligned.

:func:`blacken_image_blocks` reproduces step 2 on the ``[H, W, C]`` uint8 array of a PIL image (torch RNG instead
of numpy's global one); ``vppo_rollout.perturbation.official_perturbed_pixel_values`` runs steps 2 and 3.
``perturb_pixels(mode="official")`` cannot serve that order (it only sees processed ``pixel_values``, and an
unaligned image cannot be recovered from them) and raises a ValueError naming those two functions.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "DIFFUSION_STEPS",
    "IMAGE_PERTURBATIONS",
    "PERTURBATION_MODES",
    "blacken_image_blocks",
    "diffusion_noise_level",
    "noisyrollout_noise_step",
    "patch_positions",
    "perturb_pixels",
    "vp_diffusion_image",
]

PERTURBATION_MODES = ("blacken", "noise", "blur", "grey", "gaussian", "vp_diffusion")
# The modes a config picks for a perturbed view (VPPO, PAPO, DVRP's masked view); "gaussian" and "vp_diffusion" are
# VEPO's and DVRP's noised views, set by their own keys.
IMAGE_PERTURBATIONS = ("blacken", "noise", "blur", "grey")
# DVRP's variance-preserving diffusion schedule (NoisyRollout's): 1,000 steps, β_i from a sigmoid ramp.
DIFFUSION_STEPS = 1000


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


def blacken_image_blocks(
    image: torch.Tensor,
    *,
    block_size: int = 14,
    prob: float = 0.5,
    generator: torch.Generator | None = None,
    block_mask: torch.Tensor | None = None,
    return_mask: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The official VPPO blackening of one image before the Qwen processor (ALGORITHMS.md §1; step 2 of the
    module docstring).

    Reproduces ``random_patch_blackening`` of huaixuheqing/VPPO-RL (``verl/workers/perc_utils.py:5-18`` at commit
    ``a23c54b83565c48e9e1fb54cc1e18a1c63557c99``, used via ``augment_image``, line 107): the image is cut into
    ``ceil(H/b) × ceil(W/b)`` blocks of ``b × b`` pixels from the top-left corner, the last block row / column
    being only ``H mod b`` / ``W mod b`` pixels high / wide when ``b`` does not divide the size; each block,
    partial ones included, is set to 0 on every channel when its uniform draw is ``< prob``. The draws are one
    ``torch.rand(ceil(H/b)·ceil(W/b), generator=generator)`` call read row-major (block ``(by, bx)`` takes draw
    ``by·ceil(W/b) + bx``), the order of the official double loop; the official code draws from numpy's global RNG
    instead, so the masks are equal in law, not bit for bit.

    Args:
        image: uint8 ``[H, W, C]`` (or ``[H, W]``) tensor, e.g. ``torch.from_numpy(np.array(pil_image))`` of the
            image *after* EasyR1's resize and *before* the processor. Not modified.
        block_size: side ``b`` of the blocks in pixels (14 in the official code, for Qwen2.5-VL and Qwen3-VL alike).
        prob: probability that a block is blackened, in [0, 1].
        generator: torch.Generator of the draws (reproducible runs); its device is used for the draw.
        block_mask: bool ``[ceil(H/b), ceil(W/b)]``, blocks to blacken; given, it replaces the random draw (and
            ``generator`` / ``prob`` are not used).
        return_mask: also return the bool ``[ceil(H/b), ceil(W/b)]`` block mask.

    Returns:
        The blackened image, same shape, dtype and device; with ``return_mask`` a tuple ``(image, block_mask)``.
    """
    if not isinstance(image, torch.Tensor) or image.ndim not in (2, 3):
        raise ValueError(
            "image must be a uint8 tensor [H, W, C] or [H, W] (the array of a PIL image), got "
            f"{getattr(image, 'shape', type(image))}"
        )
    if image.dtype != torch.uint8:
        raise ValueError(
            f"image must be uint8 (0–255 pixel values of a PIL image, as the official code blackens), got {image.dtype}"
        )
    h, w = image.shape[0], image.shape[1]
    if h == 0 or w == 0:
        raise ValueError(f"image must have at least one pixel, got shape {tuple(image.shape)}")
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise ValueError(f"block_size must be a positive int (pixels), got {block_size!r}")
    if not (isinstance(prob, (int, float)) and not isinstance(prob, bool) and 0.0 <= prob <= 1.0):
        raise ValueError(f"prob must be a probability in [0, 1], got {prob!r}")
    nby, nbx = -(-h // block_size), -(-w // block_size)
    device = image.device
    if block_mask is None:
        gen_device = generator.device if generator is not None else device
        draws = torch.rand(nby * nbx, generator=generator, device=gen_device).to(device)
        mask = (draws < prob).view(nby, nbx)
    else:
        if not isinstance(block_mask, torch.Tensor) or block_mask.dtype != torch.bool:
            raise ValueError(f"block_mask must be a bool tensor [{nby}, {nbx}] (True = blacken that block)")
        if tuple(block_mask.shape) != (nby, nbx):
            raise ValueError(
                f"block_mask has shape {tuple(block_mask.shape)}, expected ({nby}, {nbx}) = "
                f"(ceil({h}/{block_size}), ceil({w}/{block_size}))"
            )
        mask = block_mask.to(device)
    pixels = mask.repeat_interleave(block_size, 0)[:h].repeat_interleave(block_size, 1)[:, :w]
    out = image.masked_fill(pixels.unsqueeze(-1) if image.ndim == 3 else pixels, 0)
    return (out, mask) if return_mask else out


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
    noise_level: float = 0.0,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """The altered image ``image'`` of VPPO, computed on the processed pixel tensor (ALGORITHMS.md §1).

    Args:
        pixel_values: [N, C·temporal_patch_size·p·p] float, the processor's output for one or more images
            (N = Σ t·h·w over images). Not modified.
        image_grid_thw: [num_images, 3] long, the processor's ``image_grid_thw``.
        mode: "blacken" | "noise" | "blur" | "grey" (see the module docstring). These act on the ViT patch grid of
            the processed image; the official order (blacken 14-px blocks of the PIL image, then process it) is
            :func:`blacken_image_blocks` + ``vppo_rollout.perturbation.official_perturbed_pixel_values``, and
            ``mode="official"`` raises a ValueError saying so.
        prob: probability that a patch is blackened (``blacken`` only), in [0, 1].
        image_mean, image_std: the processor's per-channel ``image_mean`` / ``image_std`` (on the 0–1 scale).
        rescale_factor: the processor's ``rescale_factor`` (1/255).
        generator: torch.Generator for the patch draws and the noise (reproducible runs); on pixel_values' device.
        patch_mask: bool [N], rows to blacken (``blacken`` only); given, it replaces the random draw.
        return_mask: also return the bool [N] mask of rows that were changed (all True for noise/blur/grey).
        patch_size: ViT patch size p; None infers it from the row width (14 → Qwen2.5-VL, 16 → Qwen3-VL).
        temporal_patch_size, merge_size, channels: the processor's layout (2, 2, 3 for both Qwen families).
        noise_std: std of the Gaussian noise: on the 0–255 scale for ``"noise"``; on the normalised values for
            ``"gaussian"`` (VEPO: ``pixel_values + noise_std·ε``, one independent draw per value, no clipping;
            the VEPO script's effective std is 6.928). blur_sigma: blur σ in pixels.
        noise_level: β in [0, 1] of ``"vp_diffusion"`` (DVRP's noised view, `diffusion_noise_level`): on the
            [0, 1] pixel scale ``x' = sqrt(1 − β)·x + sqrt(β)·ε``, one draw per pixel shared by its temporal
            copies, clipped to [0, 1] and rounded to the 0–255 grid (half to even), as the public DVRP
            implementation does on the image before the processor.
        grey_value: the grey level on the 0–255 scale.

    Returns:
        The perturbed pixel_values, same shape/dtype/device; with ``return_mask`` a tuple ``(pixel_values, mask)``.
    """
    if mode == "official":
        raise ValueError(
            "mode='official' cannot be served on processed pixel_values: the official code blackens 14-px blocks of "
            "the PIL image before the processor resizes it (module docstring). Use "
            "vppo_rollout.perturbation.official_perturbed_pixel_values(processor, images, generator=...) (built on "
            "vppo_core.blacken_image_blocks) on the same PIL images instead"
        )
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
    elif mode in ("gaussian", "vp_diffusion"):
        gen_device = generator.device if generator is not None else device
        if mode == "gaussian":
            if not noise_std >= 0:
                raise ValueError(f"noise_std must be >= 0, got {noise_std!r}")
            noise = torch.randn(n_rows, width, generator=generator, device=gen_device, dtype=wdt).to(device)
            out = (pixel_values.to(wdt) + noise_std * noise).to(dtype)
        else:
            if not 0.0 <= noise_level <= 1.0:
                raise ValueError(f"noise_level must be a β in [0, 1], got {noise_level!r}")
            x = pixel_values.to(wdt).reshape(n_rows, c, tp, p * p)
            m_, s_ = mean.to(device, wdt).view(1, c, 1, 1), std.to(device, wdt).view(1, c, 1, 1)
            unit = (x * s_ + m_) / rescale_factor / 255.0  # [0, 1] pixel scale
            noise = torch.randn(n_rows, c, 1, p * p, generator=generator, device=gen_device, dtype=wdt).to(device)
            noised = math.sqrt(1.0 - noise_level) * unit + math.sqrt(noise_level) * noise
            level = torch.round(noised.clamp_(0.0, 1.0) * 255.0)
            out = ((level * rescale_factor - m_) / s_).reshape(n_rows, width).to(dtype)
    else:  # blur
        if not blur_sigma > 0:
            raise ValueError(f"blur_sigma must be > 0 (pixels), got {blur_sigma!r}")
        out = _blur_rows(pixel_values.to(wdt), grid, c, tp, p, merge_size, float(blur_sigma)).to(dtype)
    return (out, mask) if return_mask else out


def diffusion_noise_level(
    step: int, total_steps: int, *, t_init: float = 500.0, gamma: float = 10.0, t_max: float = 1000.0
) -> float:
    """DVRP's annealed noise level β for step ``step`` of ``total_steps`` (ALGORITHMS.md §9.2).

    ``progress = clamp(step, 0, N) / N``; ``t = clamp(t_init · sigmoid(γ (0.5 − progress)), 0, t_max)``; β is the
    variance-preserving diffusion's ``1 − ᾱ_i`` at ``i = min(int(t), 999)`` on NoisyRollout's schedule
    (``β_j = sigmoid(linspace(−6, 6, 1000))_j · (5e-3 − 1e-5) + 1e-5``, ``ᾱ = cumprod(1 − β)``, float32), as the
    public DVRP implementation computes it (``verl/utils/perturbations/pixel.py``). Strong noise early, weak late.

    Returns:
        β in [0, 1): the share of variance that is noise in `perturb_pixels(mode="vp_diffusion", noise_level=β)`.
    """
    for name, value in (("t_init", t_init), ("gamma", gamma)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if isinstance(t_max, bool) or not isinstance(t_max, (int, float)) or not 0 < t_max <= DIFFUSION_STEPS:
        raise ValueError(f"t_max must be in (0, {DIFFUSION_STEPS}], got {t_max!r}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or isinstance(step, bool):
        raise ValueError(f"step and total_steps must be ints, got {step!r}, {total_steps!r}")
    progress = min(max(float(step), 0.0), float(total_steps)) / max(total_steps, 1) if total_steps > 0 else 0.0
    x = gamma * (0.5 - progress)
    sigmoid = 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))  # no overflow for any γ
    t = min(max(t_init * sigmoid, 0.0), float(t_max))
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS)) * (5e-3 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    return 1.0 - float(alpha_bar[min(int(t), DIFFUSION_STEPS - 1)])


def noisyrollout_noise_step(
    step: int, total_steps: int, *, t_init: float = 500.0, gamma: float = 30.0, mid_fraction: float = 2.0 / 3.0
) -> int:
    """NoisyRollout's annealed diffusion step for training step ``step`` (1-based) of ``total_steps``
    (ALGORITHMS.md §9.10, the paper's Eq. 3).

    ``x = γ·(step/N − mid_fraction)``, ``decay = 1 − 1/(1 + exp(−x))`` (that is, ``sigmoid(−x)``), and the step is
    ``int(t_init·decay)``: about ``t_init`` early, 0 late, half way at ``step = mid_fraction·N``. The arithmetic is
    the official code's (``ImageAugmenter.augment`` with ``decay_mode="sigmoid"``, ``mid = decay_sig_mid_step``
    steps, so ``mid_fraction = decay_sig_mid_step / N``), in float64, truncated toward zero; where ``exp(−x)``
    would overflow (``x < −700``) the decay is 1 (the official code raises there). Not clamped to the step range,
    as the official code: ``step > N`` keeps annealing.

    Returns:
        t, an int in [0, t_init]: the index into the 1,000-step schedule of :func:`vp_diffusion_image`.
    """
    for name, value in (("t_init", t_init), ("gamma", gamma), ("mid_fraction", mid_fraction)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    if t_init > DIFFUSION_STEPS - 1:
        raise ValueError(f"t_init must be <= {DIFFUSION_STEPS - 1} (an index into the schedule), got {t_init!r}")
    if isinstance(step, bool) or not isinstance(step, int) or isinstance(total_steps, bool):
        raise ValueError(f"step and total_steps must be ints, got {step!r}, {total_steps!r}")
    if not isinstance(total_steps, int) or total_steps <= 0:
        raise ValueError(f"total_steps must be an int > 0, got {total_steps!r}")
    x = gamma * (step / total_steps - mid_fraction)
    decay = 1.0 if x < -700.0 else 1.0 - (1 / (1 + math.exp(-x)))
    return int(t_init * decay)


def vp_diffusion_image(image: torch.Tensor, t: int, *, generator: torch.Generator | None = None) -> torch.Tensor:
    """NoisyRollout's noised copy of one image (ALGORITHMS.md §9.10): step ``t`` of the variance-preserving forward
    diffusion on the [0, 1] pixels, clipped, back to 8 bits by truncation.

    ``x = image/255``; ``x' = sqrt(ᾱ_t)·x + sqrt(1 − ᾱ_t)·ε`` with ε ~ N(0, 1) drawn as a ``[C, H, W]`` float32
    tensor (one draw per pixel and channel, the layout and order of the official ``torch.randn_like`` on
    ``ToTensor(image)``), ``ᾱ = cumprod(1 − β)`` float32 on ``β_j = sigmoid(linspace(−6, 6, 1000))_j·(5e-3 −
    1e-5) + 1e-5`` (the schedule of :func:`diffusion_noise_level`); ``out = uint8(clamp(x', 0, 1)·255)``, the
    truncation of ``ToPILImage``. ``t = 0`` still adds the first step's noise (std ≈ 0.0047), as the official code.

    Args:
        image: [H, W, C] uint8 (a PIL image as an array, the layout of :func:`blacken_image_blocks`).
        t: the diffusion step, an int in [0, 999] (:func:`noisyrollout_noise_step`).
        generator: torch.Generator for ε (CPU), for reproducible runs.

    Returns:
        [H, W, C] uint8, the noised image.
    """
    if not isinstance(image, torch.Tensor) or image.dtype != torch.uint8 or image.ndim != 3:
        raise ValueError(f"image must be an [H, W, C] uint8 tensor, got {getattr(image, 'shape', type(image))}")
    if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < DIFFUSION_STEPS:
        raise ValueError(f"t must be an int in [0, {DIFFUSION_STEPS - 1}], got {t!r}")
    betas = torch.sigmoid(torch.linspace(-6, 6, DIFFUSION_STEPS)) * (0.5e-2 - 1e-5) + 1e-5
    alpha_bar = torch.cumprod(1 - betas, dim=0)
    x = image.permute(2, 0, 1).float().div(255)  # [C, H, W] on [0, 1]
    gen_device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape, generator=generator, device=gen_device, dtype=x.dtype).to(x.device)
    noised = torch.sqrt(alpha_bar)[t] * x + torch.sqrt(1 - alpha_bar)[t] * noise
    return noised.clamp(0.0, 1.0).mul(255).to(torch.uint8).permute(1, 2, 0).contiguous()
