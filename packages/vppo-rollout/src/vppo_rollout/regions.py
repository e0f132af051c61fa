"""CGPO's evidence regions: the boxes a response names, its counterfactual images, and its region tokens.

CGPO (ALGORITHMS.md §9.5) scores every response under its own counterfactual image: each box the response gives
as evidence is filled with the box's own mean colour, so the policy can no longer read what it claimed to have
looked at. A response names its evidence as

    <region name="left bar" image_idx="0" id="1">[[x1, y1, x2, y2], ...]</region>

with 0-1000 coordinates (Qwen's relative grid), or, without any ``<region`` tag, as GRIT-style JSON inside
``<think>``: ``{"label": ..., "image_idx": 0, "bbox_list": [[x1, y1, x2, y2]]}`` (one object or a list).

The rules follow the public implementation CGPO's authors released in the EasyR1 fork
zsxm1998/awesome-perception-aware-rlvr (``verl/trainer/perception_reasoning_data.py``: ``parse_response_regions``,
``cgpo_flat`` with ``fill_type="local_mean"``, ``build_region_token_mask``); the code here is our own.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

__all__ = ["EvidenceRegion", "filled_region_images", "parse_regions", "region_token_mask"]

_REGION = re.compile(r"<region\b(?P<attrs>[^>]*)>(?P<body>.*?)</region>", re.DOTALL)
_REGION_MARKER = re.compile(r"<region\b", re.IGNORECASE)
_THINK = re.compile(r"<think>(?P<think>.*?)</think>", re.DOTALL)
_ATTR = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="([^"]*)"')
GRID = 1000  # box coordinates are on a 0..1000 grid of the image


@dataclass
class EvidenceRegion:
    """One named region of one image: its boxes, ``[x1, y1, x2, y2]`` on the 0-1000 grid."""

    name: str
    image_idx: int
    boxes: list[list[int]]


def _integer(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return None


def _valid_box(box: list[int]) -> bool:
    x1, y1, x2, y2 = box
    return all(0 <= c <= GRID for c in box) and x1 < x2 and y1 < y2


def _boxes(value: Any, *, strict: bool) -> list[list[int]]:
    """Boxes of a decoded JSON list. strict (the XML form): any malformed entry voids the whole list; otherwise
    (the JSON form) malformed entries are dropped. Invalid boxes (outside the grid, empty) are dropped in both."""
    if not isinstance(value, list):
        return []
    out = []
    for item in value:
        coords = [_integer(c) for c in item] if isinstance(item, list) and len(item) == 4 else None
        if coords is None or None in coords:
            if strict:
                return []
            continue
        out.append(coords)
    return [b for b in out if _valid_box(b)]


def _xml_regions(response: str, num_images: int) -> list[EvidenceRegion]:
    by_key: dict[tuple[int, str], EvidenceRegion] = {}
    seen_ids: set[int] = set()
    for match in _REGION.finditer(response):
        attrs = dict(_ATTR.findall(match.group("attrs")))
        if not {"name", "image_idx", "id"} <= attrs.keys():
            continue
        try:
            region_id, image_idx = int(attrs["id"]), int(attrs["image_idx"])
        except ValueError:
            continue
        if region_id in seen_ids or region_id < 0 or not 0 <= image_idx < num_images:
            continue
        body = match.group("body").strip()
        try:
            decoded, end = json.JSONDecoder().raw_decode(body)
        except json.JSONDecodeError:
            continue
        boxes = _boxes(decoded, strict=True) if not body[end:].strip() else []
        name = attrs["name"].strip()
        if not boxes or not name:
            continue
        seen_ids.add(region_id)
        key = (image_idx, re.sub(r"\s+", " ", name).lower())
        if key in by_key:  # the same region named twice: its boxes add up
            by_key[key].boxes.extend(boxes)
        else:
            by_key[key] = EvidenceRegion(name, image_idx, boxes)
    return list(by_key.values())


def _json_regions(text: str, num_images: int) -> list[EvidenceRegion]:
    decoder, regions, start = json.JSONDecoder(), [], 0
    while True:
        starts = [i for i in (text.find("{", start), text.find("[", start)) if i != -1]
        if not starts:
            return regions
        start = min(starts)
        try:
            decoded, end = decoder.raw_decode(text[start:])
        except json.JSONDecodeError:
            start += 1
            continue
        start += max(end, 1)
        for item in [decoded] if isinstance(decoded, dict) else decoded if isinstance(decoded, list) else []:
            if not isinstance(item, dict):
                continue
            label, image_idx = item.get("label"), _integer(item.get("image_idx", 0))
            if not isinstance(label, str) or not label.strip() or image_idx is None or not 0 <= image_idx < num_images:
                continue
            boxes = _boxes(item.get("bbox_list"), strict=False)
            if boxes:
                regions.append(EvidenceRegion(label.strip(), image_idx, boxes))


def parse_regions(response: str, num_images: int) -> list[EvidenceRegion]:
    """The evidence regions a response names (module docstring); [] when it names none.

    The ``<region>`` form wins; the JSON form inside ``<think>`` is read only when the response has no ``<region``
    tag at all. Regions of an image the prompt does not have, ids used twice and invalid boxes are ignored.
    """
    regions = _xml_regions(response, num_images)
    if regions or _REGION_MARKER.search(response):
        return regions
    think = _THINK.search(response)
    return _json_regions(think.group("think"), num_images) if think else []


def _pixel_box(box: list[int], width: int, height: int) -> tuple[int, int, int, int]:
    """0-1000 grid -> pixel box ``(x1, y1, x2, y2)``, rounded, clamped to the image."""
    x1, y1, x2, y2 = box
    xs = [min(width, max(0, round(c / GRID * width))) for c in (x1, x2)]
    ys = [min(height, max(0, round(c / GRID * height))) for c in (y1, y2)]
    return xs[0], ys[0], xs[1], ys[1]


def filled_region_images(images: list[Image.Image], response: str) -> list[Image.Image]:
    """CGPO's counterfactual images for one response: every box it names filled with that box's mean colour.

    Each box's fill is the rounded (half to even) per-channel mean of the *original* pixels under it, so boxes that
    overlap do not leak into one another's fill. Images the response names no box of are returned unchanged (the
    same objects); the sizes never change, so the processor gives the same patch grid.
    """
    regions = parse_regions(response, len(images))
    out = list(images)
    for idx, image in enumerate(images):
        boxes = [b for r in regions if r.image_idx == idx for b in r.boxes]
        if not boxes:
            continue
        original = np.asarray(image.convert("RGB"))
        filled = original.copy()
        height, width = original.shape[:2]
        for box in boxes:
            x1, y1, x2, y2 = _pixel_box(box, width, height)
            if x2 > x1 and y2 > y1:
                filled[y1:y2, x1:x2] = np.round(original[y1:y2, x1:x2].mean(axis=(0, 1))).astype(original.dtype)
        out[idx] = Image.fromarray(filled)
    return out


def region_token_mask(responses: torch.Tensor, mask: torch.Tensor, tokenizer) -> torch.Tensor:
    """``[B, L]`` bool: the response tokens whose text overlaps a ``<region …>…</region>`` span (CGPO adds them to
    its perception set).

    Rows whose decoded text does not tokenize back to the same ids are left all False (the character offsets would
    not line up), as in the public implementation. Needs a fast tokenizer (offset mapping).
    """
    out = torch.zeros(mask.shape, dtype=torch.bool)
    pattern = re.compile(r"<region\b[^>]*?>.*?</region>", re.DOTALL)
    for row in range(responses.shape[0]):
        n = int(mask[row].sum())
        ids = responses[row, :n].tolist()
        text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
        spans = [m.span() for m in pattern.finditer(text)]
        if not spans:
            continue
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        if enc["input_ids"] != ids:
            continue
        for j, (start, end) in enumerate(enc["offset_mapping"]):
            if start < end and any(start < s_end and end > s_start for s_start, s_end in spans):
                out[row, j] = True
    return out.to(mask.device) & (mask > 0)
