"""One image decoder for training, evaluation and the demo, and one vocabulary of reasons to skip a row.

Every image cell a user can give (a PIL image, a path, raw bytes, or `datasets`' ``{"bytes", "path"}`` dict)
becomes the same RGB picture whichever part of vppo reads it:

- transparency (RGBA, LA, PA, P or L or RGB with a transparent colour) is composited on **white**: geometry
  diagrams are drawn in black on transparent canvases, and PIL's plain ``convert("RGB")`` turns them black on black;
- 16-bit and 32-bit greyscale (``I;16``, ``I``) is scaled to 8 bits (``convert`` would clip every value above 255
  to white); floating-point greyscale (``F``) is read as 0–1 when its maximum is at most 1, else as 0–255;
- palette, CMYK, YCbCr, 1-bit and the other modes go through PIL's conversion to RGB; an animation gives its first
  frame.

A cell that cannot give a picture raises `SkipRow` with one of `SKIP_REASONS`, which training counts per reason in
its metrics and evaluation counts in its reports, under the same names:
``missing_image`` (no image, or a path that does not exist), ``undecodable_image`` (corrupt, truncated or not an
image), ``image_too_large`` (more than ``MAX_IMAGE_PIXELS`` pixels: decompression bombs, checked from the header
before any pixel is decoded).
"""

from __future__ import annotations

import io
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["MAX_IMAGE_PIXELS", "SKIP_REASONS", "SkipRow", "decode_image", "to_rgb"]

# PIL's own threshold for a decompression-bomb warning (it refuses twice this): 89.5 megapixels, far beyond any
# processor's max_pixels (Qwen-VL: 12.8 megapixels), so no real benchmark image comes near it.
MAX_IMAGE_PIXELS = 89_478_485

# Every reason a row is skipped, training and evaluation alike, with what it means.
SKIP_REASONS: dict[str, str] = {
    "missing_image": "the row has no image, or its image path does not exist",
    "undecodable_image": "the image bytes are corrupt, truncated or not an image format PIL reads",
    "image_too_large": f"the image has more than {MAX_IMAGE_PIXELS:,} pixels (e.g. a decompression bomb)",
    "undecodable_text": "a text cell holds bytes that are not UTF-8, or a list / an object instead of text",
    "empty_question": "the question is empty",
    "empty_answer": "the answer is empty",
    "empty_response": "the SFT response column is empty",
    "prompt_too_long": "the prompt with its image tokens is longer than data.max_prompt_length",
    "bad_prompt": "the question and images cannot form a prompt (e.g. more <image> placeholders than images, or an "
    "image whose aspect ratio the processor refuses: more than 200:1)",
    "response_too_long": "the SFT target is longer than data.max_response_length",
    "bad_options": "a multiple-choice benchmark item whose options cannot be read",
    "not_exact_match": "an item the paper's protocol leaves out (answer not checkable by exact match)",
    "not_in_subset": "an item outside the selected subset (e.g. MathVerse's vision-dependent problem versions)",
}


class SkipRow(Exception):
    """A row that cannot be used: `reason` is one of `SKIP_REASONS`, `detail` says which row and why.

    A control-flow signal, caught by the readers that count skips (training's example stream, evaluation's loaders).
    """

    def __init__(self, reason: str, detail: str = "") -> None:
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason {reason!r}; known: {sorted(SKIP_REASONS)}")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def _white_background(image: Image.Image) -> Image.Image:
    rgba = image.convert("RGBA")
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _grey_to_8bit(image: Image.Image) -> Image.Image:
    values = np.asarray(image)
    if image.mode == "F":
        top = float(values.max()) if values.size else 0.0
        scaled = values * 255.0 if top <= 1.0 else values
    elif image.mode.startswith("I;16") or (values.size and int(values.max()) > 255):
        scaled = values.astype(np.float64) / 257.0  # 65535 -> 255
    else:
        scaled = values
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
    """The RGB picture of an opened PIL image, by the rules in the module docstring (a new image unless already RGB
    without transparency)."""
    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        return _white_background(image)
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):
        return _grey_to_8bit(image)
    return image if image.mode == "RGB" else image.convert("RGB")


def _from_bytes(data: bytes, label: str) -> Image.Image:
    """Decode fully once, so a corrupt or truncated file fails here and not later; an RGB image is then returned
    *lazily opened*, so a loaded benchmark holds compressed bytes, not pixels. Other modes are converted now."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        try:
            probe = Image.open(io.BytesIO(data))
        except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
            raise SkipRow("image_too_large", f"{label}: {err}") from None
    with probe:
        width, height = probe.size
        if width * height > MAX_IMAGE_PIXELS:
            raise SkipRow("image_too_large", f"{label}: {width}x{height} pixels > {MAX_IMAGE_PIXELS:,}")
        if width == 0 or height == 0:
            raise SkipRow("undecodable_image", f"{label}: zero-size image {width}x{height}")
        probe.load()
        if probe.mode != "RGB" or "transparency" in probe.info:
            return to_rgb(probe)
    return Image.open(io.BytesIO(data))


def decode_image(value: Any, *, base_dir: str | os.PathLike | None = None, label: str = "image") -> Image.Image:
    """One image cell -> its RGB PIL picture (module docstring), or raise `SkipRow`.

    value: a PIL image, ``{"bytes": ..., "path": ...}`` (``datasets.Image(decode=False)``), raw bytes, or a path;
        a relative path is resolved against ``base_dir`` (the folder of the data file).
    label: names the cell in the skip's detail (e.g. ``"row 12"``).
    """
    if value is None:
        raise SkipRow("missing_image", label)
    try:
        if isinstance(value, Image.Image):
            width, height = value.size
            if width * height > MAX_IMAGE_PIXELS:
                raise SkipRow("image_too_large", f"{label}: {width}x{height} pixels > {MAX_IMAGE_PIXELS:,}")
            if width == 0 or height == 0:
                raise SkipRow("undecodable_image", f"{label}: zero-size image {width}x{height}")
            return to_rgb(value)
        if isinstance(value, Mapping):
            if value.get("bytes"):
                return _from_bytes(value["bytes"], label)
            if value.get("path"):
                return decode_image(value["path"], base_dir=base_dir, label=label)
            raise SkipRow("missing_image", f"{label}: neither bytes nor a path")
        if isinstance(value, (bytes, bytearray)):
            return _from_bytes(bytes(value), label)
        if isinstance(value, (str, os.PathLike)):
            if not str(value).strip():
                raise SkipRow("missing_image", f"{label}: empty path")
            path = Path(value)
            if not path.is_absolute() and base_dir is not None:
                path = Path(base_dir) / path
            if not path.is_file():
                raise SkipRow("missing_image", f"{label}: no file {path}")
            return _from_bytes(path.read_bytes(), f"{label} ({path})")
    except SkipRow:
        raise
    except Exception as err:  # PIL raises many types (UnidentifiedImageError, OSError, SyntaxError, ValueError, ...)
        raise SkipRow("undecodable_image", f"{label}: {type(err).__name__}: {err}") from err
    raise SkipRow("undecodable_image", f"{label}: unsupported image value of type {type(value).__name__}")
