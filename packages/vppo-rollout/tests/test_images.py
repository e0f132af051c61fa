"""The one image decoder: every PIL mode to the same RGB picture, bombs and junk to counted skip reasons."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from vppo_rollout.images import MAX_IMAGE_PIXELS, SKIP_REASONS, SkipRow, decode_image, to_rgb


def png_bytes(image: Image.Image, **save) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, "PNG", **save)
    return buffer.getvalue()


def bomb_png(width: int = 20_000, height: int = 20_000) -> bytes:
    """A 100-byte PNG whose header claims width x height (its pixel data is a few zero bytes)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)  # 8-bit greyscale
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


def diagram(mode: str) -> Image.Image:
    """A black line on a fully transparent canvas, in `mode`."""
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    for i in range(16):
        rgba.putpixel((i, i), (0, 0, 0, 255))
    if mode == "RGBA":
        return rgba
    if mode == "LA":
        return rgba.convert("LA")
    if mode == "P":  # palette with a transparent index
        p = Image.new("P", (16, 16), 0)
        p.putpalette([255, 0, 0, 0, 0, 0] + [0] * 762)
        for i in range(16):
            p.putpixel((i, i), 1)
        p.info["transparency"] = 0
        return p
    raise ValueError(mode)


@pytest.mark.parametrize("mode", ["RGBA", "LA", "P"])
@pytest.mark.parametrize("source", ["pil", "png_bytes"])
def test_transparency_is_composited_on_white_not_black(mode, source):
    image = diagram(mode)
    value = image if source == "pil" else png_bytes(image, **({"transparency": 0} if mode == "P" else {}))
    out = np.asarray(decode_image(value))
    assert out.shape == (16, 16, 3)
    assert (out[0, 1] == 255).all(), "the transparent background must be white"
    assert (out[3, 3] == 0).all(), "the opaque black stroke must stay black"


def test_rgb_png_with_a_transparent_colour_key_is_white_there():
    image = Image.new("RGB", (4, 4), (10, 20, 30))
    image.putpixel((0, 0), (0, 0, 0))
    out = np.asarray(decode_image(png_bytes(image, transparency=(10, 20, 30))))
    assert (out[1, 1] == 255).all() and (out[0, 0] == 0).all()


@pytest.mark.parametrize("source", ["pil", "png_bytes"])
def test_16_bit_greyscale_is_scaled_to_8_bit_not_clipped_to_white(source):
    values = np.array([[0, 257 * 100, 65535, 257 * 7]], dtype=np.uint16)
    image = Image.fromarray(values)
    assert image.mode == "I;16"
    out = np.asarray(decode_image(image if source == "pil" else png_bytes(image)))
    assert out[0, :, 0].tolist() == [0, 100, 255, 7] and (out[..., 0] == out[..., 2]).all()


def test_32_bit_and_float_greyscale():
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0, 65535]], dtype=np.int32))))[0, :, 0].tolist() == [0, 255]
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0, 200]], dtype=np.int32))))[0, :, 0].tolist() == [0, 200]
    assert np.asarray(to_rgb(Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))))[0, :, 0].tolist() == [
        0, 128, 255,
    ]  # fmt: skip


@pytest.mark.parametrize("mode", ["L", "1", "CMYK", "YCbCr", "RGB"])
def test_other_modes_go_through_pil_conversion(mode):
    image = Image.new("RGB", (8, 8), (200, 100, 50)).convert(mode)
    assert decode_image(image).mode == "RGB"
    assert np.asarray(decode_image(image)).tolist() == np.asarray(image.convert("RGB")).tolist()


def test_a_decompression_bomb_is_skipped_from_its_header_without_decoding():
    data = bomb_png()
    assert len(data) < 200
    with pytest.raises(SkipRow) as info:
        decode_image(data, label="row 3")
    assert info.value.reason == "image_too_large" and "row 3" in str(info.value)
    # just over our limit, under PIL's own refusal (2x): still a skip, not a warning and a 90-megapixel decode
    side = int(MAX_IMAGE_PIXELS**0.5) + 1
    with pytest.raises(SkipRow, match="image_too_large"):
        decode_image(bomb_png(side, side))


def test_missing_undecodable_and_truncated_cells_have_their_reasons(tmp_path):
    good = png_bytes(Image.new("RGB", (8, 8), (1, 2, 3)))
    cases = {
        "missing_image": [None, "", {"bytes": None, "path": None}, str(tmp_path / "absent.png")],
        "undecodable_image": [b"not an image", good[: len(good) // 2], Image.new("RGB", (0, 4)), 3.5],
    }
    for reason, values in cases.items():
        for value in values:
            with pytest.raises(SkipRow) as info:
                decode_image(value)
            assert info.value.reason == reason, value
    (tmp_path / "ok.png").write_bytes(good)
    assert decode_image("ok.png", base_dir=tmp_path).getpixel((0, 0)) == (1, 2, 3)
    assert decode_image({"bytes": None, "path": str(tmp_path / "ok.png")}).size == (8, 8)


def test_skip_reasons_are_one_vocabulary():
    with pytest.raises(ValueError, match="unknown skip reason 'no_image'"):
        SkipRow("no_image")
    assert {"missing_image", "undecodable_image", "image_too_large", "undecodable_text"} <= set(SKIP_REASONS)
