"""The one record type every benchmark is normalised into."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from PIL import Image

__all__ = ["Record"]


@dataclass(frozen=True)
class Record:
    """One evaluation item, independent of the benchmark it came from.

    id: unique within its benchmark (the raw id column where the benchmark has one), used to resume evaluations.
    question: the full text to show the model — options already appended where the raw question lacks them, and
        bare ``<image>`` placeholders removed (the prompt builder places one image token per image).
    images: RGB PIL images in the order the question refers to them (at least one); each was fully decoded once at
        load time, and RGB files are then kept compressed, decoded again on first use.
    answer: the ground truth, graded with ``vppo_eval.reward.grade`` (``"B"``, ``"A, C"``, ``"\\frac{1}{2}"``, ...).
    choices: the option texts of a multiple-choice item in letter order (A, B, ...), ``None`` for free-form items.
    meta: the raw row's remaining scalar fields (subject, problem_version, ...) for per-category reports.
    """

    id: str
    question: str
    images: list[Image.Image]
    answer: str
    choices: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)
