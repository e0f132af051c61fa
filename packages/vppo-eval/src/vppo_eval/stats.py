"""Comparing training runs: paired differences with a bootstrap interval over seeds and items, and learning speed.

Used by the CPU demo (`vppo_recipes.demo`) and usable on any set of runs that were scored on the same held-out items
with the same seeds: e.g. VPPO and DAPO each trained with seeds 0..4, each final model scored item by item.

- `paired_difference(a, b)`: mean of ``a − b`` over a ``[seeds, items]`` grid with a two-way (crossed) bootstrap
  95 % interval: each replicate draws the seeds with replacement and, independently, the items with replacement,
  and takes the mean of the difference over the drawn grid. Both sources of variation count: the seeds (training
  noise) and the items (which held-out questions happened to be drawn).
- `area_under_curve(steps, values)`: the trapezoid area under a held-out curve divided by its step span, i.e. the
  curve's mean level (in the units of ``values``); higher = learned earlier or more.
- `steps_to_reach(steps, values, level)`: the first step at which a curve reaches ``level`` (None if never).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

__all__ = ["PairedDifference", "area_under_curve", "paired_difference", "steps_to_reach"]


@dataclass(frozen=True)
class PairedDifference:
    """mean(a − b) over the [seeds, items] grid, its bootstrap interval and the sizes it came from."""

    mean: float
    low: float
    high: float
    confidence: float
    n_seeds: int
    n_items: int
    n_boot: int

    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0


def _grid(x, name: str) -> np.ndarray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{name} must be a non-empty [seeds, items] grid, got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError(f"{name} has a non-finite value: score every (seed, item) before comparing")
    return arr


def paired_difference(
    a, b, *, n_boot: int = 10_000, confidence: float = 0.95, seed: int = 0, chunk: int = 500
) -> PairedDifference:
    """Paired difference of two algorithms scored on the same seeds (rows) and items (columns).

    Args:
        a, b: ``[S, N]`` per-seed, per-item scores (e.g. each item's accuracy over k samples); row s of ``a`` and of
            ``b`` come from the same seed, column i from the same held-out item.
        n_boot: bootstrap replicates. confidence: the interval's coverage (percentile interval).
        seed: the bootstrap's own RNG seed (numpy's PCG64), so the interval is reproducible bit for bit.
        chunk: replicates computed at once (memory ``chunk × S × N`` floats; the result does not depend on it).

    Replicate r draws seed indices ``s_r = rng.integers(0, S, S)`` then item indices ``i_r = rng.integers(0, N, N)``
    (in that order, replicate after replicate) and takes ``mean(d[s_r][:, i_r])`` with ``d = a − b``.
    """
    a, b = _grid(a, "a"), _grid(b, "b")
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same [seeds, items] shape, got {a.shape} and {b.shape}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1 or chunk < 1:
        raise ValueError(f"n_boot and chunk must be >= 1, got {n_boot}, {chunk}")
    d = a - b
    S, N = d.shape
    rng = np.random.Generator(np.random.PCG64(seed))
    means = np.empty(n_boot)
    for start in range(0, n_boot, chunk):
        stop = min(start + chunk, n_boot)
        draws = [(rng.integers(0, S, S), rng.integers(0, N, N)) for _ in range(stop - start)]
        seeds = np.stack([s for s, _ in draws])  # [r, S]
        items = np.stack([i for _, i in draws])  # [r, N]
        # mean over the drawn grid = mean over drawn seeds of (mean over drawn items of d[seed, item])
        picked = d[seeds[:, :, None], items[:, None, :]]  # [r, S, N]
        means[start:stop] = picked.mean(axis=(1, 2))
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return PairedDifference(float(d.mean()), float(low), float(high), confidence, S, N, n_boot)


def _curve(steps: Sequence[float], values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    x, y = np.asarray(steps, dtype=np.float64), np.asarray(values, dtype=np.float64)
    if x.ndim != 1 or x.shape != y.shape or x.size < 1:
        raise ValueError(f"steps and values must be 1-D of the same non-zero length, got {x.shape} and {y.shape}")
    if np.any(np.diff(x) <= 0):
        raise ValueError(f"steps must be strictly increasing, got {list(steps)}")
    if not np.isfinite(y).all():
        raise ValueError(f"values has a non-finite entry: {list(values)}")
    return x, y


def area_under_curve(steps: Sequence[float], values: Sequence[float]) -> float:
    """Trapezoid area under ``values`` over ``steps`` divided by ``steps[-1] − steps[0]`` (the curve's mean level).

    A single point returns its value.
    """
    x, y = _curve(steps, values)
    if x.size == 1:
        return float(y[0])
    area = float(np.sum((x[1:] - x[:-1]) * (y[1:] + y[:-1]) / 2))
    return area / float(x[-1] - x[0])


def steps_to_reach(steps: Sequence[float], values: Sequence[float], level: float) -> float | None:
    """The first step whose value is >= ``level``, or None if the curve never reaches it."""
    if not math.isfinite(level):
        raise ValueError(f"level must be finite, got {level}")
    x, y = _curve(steps, values)
    hits = np.nonzero(y >= level)[0]
    return float(x[hits[0]]) if hits.size else None
