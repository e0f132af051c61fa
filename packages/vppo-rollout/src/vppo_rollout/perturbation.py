"""The official VPPO perturbed view: blacken 14-px blocks of the PIL image, *then* run the Qwen image processor.

huaixuheqing/VPPO-RL (commit ``a23c54b83565c48e9e1fb54cc1e18a1c63557c99``) builds the perturbed ``pixel_values`` in
``fsdp_workers._process_aug_multi_modal_inputs`` (``verl/workers/fsdp_workers.py:493-530``): EasyR1's
``process_image`` resize (``verl/utils/dataset.py:53-77``, reproduced by :func:`easyr1_resize`), then
``perc_utils.random_patch_blackening`` on that PIL image (reproduced by ``vppo_core.blacken_image_blocks``), then
``processor.image_processor(images=..., return_tensors="pt")``, which resizes to multiples of ``patch·merge``. The
vppo_core module docstring (``vppo_core.perturb``) describes the order and how it differs from
``vppo_core.perturb_pixels``, which perturbs the processed patches directly.

This project's prompts hold images already resized to the patch grid (``vppo_rollout.prompts.resize_image``), on
which the processor does not resize again; give :func:`official_perturbed_pixel_values` images from
:func:`easyr1_resize` to reproduce the official unaligned case.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from vppo_core import blacken_image_blocks
from vppo_rollout.prompts import pixel_bounds, smart_resize

__all__ = ["easyr1_resize", "official_perturbed_pixel_values"]


def easyr1_resize(image: Image.Image, *, min_pixels: int | None, max_pixels: int | None) -> Image.Image:
    """EasyR1's ``process_image`` resize (the step before the official blackening), on an opened PIL image.

    An image whose area exceeds ``max_pixels`` (or is below ``min_pixels``) is scaled by ``sqrt(bound / area)``,
    both sides truncated with ``int`` (so the area may end just below ``min_pixels``), with PIL's default
    resampling; it is converted to RGB afterwards. Sizes are *not* rounded to the patch grid. The official config
    uses ``min_pixels=200704``, ``max_pixels=1003520``.
    """
    if max_pixels is not None and image.width * image.height > max_pixels:
        factor = math.sqrt(max_pixels / (image.width * image.height))
        image = image.resize((int(image.width * factor), int(image.height * factor)))
    if min_pixels is not None and image.width * image.height < min_pixels:
        factor = math.sqrt(min_pixels / (image.width * image.height))
        image = image.resize((int(image.width * factor), int(image.height * factor)))
    return image if image.mode == "RGB" else image.convert("RGB")


def _expected_grid(processor, image: Image.Image) -> list[int]:
    """(t, h, w) patches the processor gives one still image, from its size (smart_resize of its bounds)."""
    factor, lo, hi = pixel_bounds(processor)
    h, w = smart_resize(image.height, image.width, factor=factor, min_pixels=lo, max_pixels=hi)
    p = processor.image_processor.patch_size
    return [1, h // p, w // p]


def official_perturbed_pixel_values(
    processor,
    images: Sequence[Image.Image],
    *,
    generator: torch.Generator | None,
    block_size: int = 14,
    prob: float = 0.5,
    image_grid_thw: torch.Tensor | None = None,
) -> torch.Tensor:
    """``pixel_values`` of the official VPPO perturbed view of ``images`` (see the module docstring).

    Each image is blackened by ``vppo_core.blacken_image_blocks`` (blocks of ``block_size`` px, partial edge blocks
    included, one draw per block row-major, images in order, all from ``generator``) and the blackened images are
    then run through the processor exactly as ``collate.encode_prompts`` runs the clean ones (the processor's own
    ``__call__`` with ``return_tensors="pt"``, hence the same merged image kwargs), so the processor's resize
    happens *after* the blackening, as in the official code.

    Args:
        processor: the checkpoint's Qwen-VL processor (``load_processor``).
        images: the PIL images of the clean pass, after the resize the pipeline applies before the processor
            (``Prompt.images``, or :func:`easyr1_resize` outputs to reproduce the official sizes).
        generator: torch.Generator of the block draws (None: torch's global RNG).
        block_size: block side in pixels (14 in the official code). prob: blackening probability per block.
        image_grid_thw: [num_images, 3] long, the clean pass's grid; when given it is checked too.

    Returns:
        pixel_values [N_patches, C·temporal_patch_size·p·p] float, the rows the clean ``pixel_values`` have.

    Raises:
        ValueError: no images, a non-PIL item, or a perturbed grid different from the clean one.
    """
    images = list(images)
    if not images:
        raise ValueError("images: empty list; the perturbed view needs the PIL images of the clean pass")
    blackened = []
    for i, image in enumerate(images):
        if not isinstance(image, Image.Image):
            raise ValueError(f"images[{i}]: expected a PIL image, got {type(image).__name__}")
        rgb = image if image.mode == "RGB" else image.convert("RGB")
        array = torch.from_numpy(np.array(rgb))
        out = blacken_image_blocks(array, block_size=block_size, prob=prob, generator=generator)
        blackened.append(Image.fromarray(out.numpy()))
    enc = processor(images=blackened, return_tensors="pt")
    pixel_values, grid = enc["pixel_values"], enc["image_grid_thw"]
    expected = torch.tensor([_expected_grid(processor, im) for im in images], dtype=grid.dtype)
    if not torch.equal(grid, expected):
        raise ValueError(
            f"the perturbed images gave image_grid_thw {grid.tolist()}, but the clean images' sizes give "
            f"{expected.tolist()} under the processor's bounds; the perturbed view must keep the clean patch grid"
        )
    if image_grid_thw is not None and not torch.equal(grid, image_grid_thw.to("cpu", grid.dtype)):
        raise ValueError(
            f"image_grid_thw: the clean pass has {image_grid_thw.tolist()} but these images give {grid.tolist()}; "
            "pass the same images (same order, same resize) as the clean pass"
        )
    return pixel_values
