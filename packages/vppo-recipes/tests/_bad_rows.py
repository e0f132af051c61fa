"""A jsonl training file with rows whose prompt cannot be built, for the tests of counted skips (issue 23)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

# kind -> what makes the row unusable
BAD_KINDS = {
    "two_placeholders": "two <image> placeholders for one image",
    "wide": "one 10000x10 image: an aspect ratio the Qwen processor refuses (> 200:1)",
}


def write_rows(folder: Path, kinds: Sequence[str]) -> Path:
    """`folder/train.jsonl` with one row per entry of `kinds` ("good" or a key of `BAD_KINDS`), columns problem /
    answer / images (the recipes' defaults), answer = the row index; images beside the file. Returns the path."""
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((28, 28, 3), 128, dtype=np.uint8)).save(folder / "ok.png")
    Image.fromarray(np.zeros((10, 10000, 3), dtype=np.uint8)).save(folder / "wide.png")
    rows = []
    for i, kind in enumerate(kinds):
        if kind not in ("good", *BAD_KINDS):
            raise ValueError(f"unknown row kind {kind!r}")
        question = "Compare <image> with <image>." if kind == "two_placeholders" else f"How many? {i}"
        rows.append({"problem": question, "answer": str(i), "images": ["wide.png" if kind == "wide" else "ok.png"]})
    path = folder / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path
