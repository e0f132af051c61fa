"""The CPU demo's plots: `curves.png` (held-out and train accuracy per step) and `diagnostics.png`."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from vppo_recipes.demo_report import DIAGNOSTICS, curves
from vppo_recipes.demo_settings import DemoSettings

_COLOURS = {"vppo": "tab:red", "dapo": "tab:blue", "grpo": "tab:green", "pgpo": "tab:purple"}


def _plot_metric(ax, runs, key: str, start: float | None = None) -> None:
    """Mean over seeds of a logged metric per step, shaded min..max over seeds (step 0 = `start` if given)."""
    for algo, by_step in curves(runs, key).items():
        if not by_step:
            continue
        steps = sorted(by_step)
        if start is not None:
            steps = [0, *steps]
            by_step = {0: [start], **by_step}
        mean = [sum(by_step[t]) / len(by_step[t]) for t in steps]
        lo = [min(by_step[t]) for t in steps]
        hi = [max(by_step[t]) for t in steps]
        c = _COLOURS.get(algo)
        ax.plot(steps, mean, marker="o", ms=3, color=c, label=f"{algo.upper()} (mean of {len(runs[algo])} seeds)")
        ax.fill_between(steps, lo, hi, color=c, alpha=0.15, lw=0)


def plot_curves(runs, summary: dict[str, Any], s: DemoSettings, path: Path) -> Path:
    """Held-out avg@k and train accuracy vs RL step: mean over seeds, shaded min..max over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (ax_val, ax_rew) = plt.subplots(1, 2, figsize=(11, 4))
    _plot_metric(ax_val, runs, f"validation/avg@{s.k}", start=summary["warm_start"]["avg_at_k"])
    _plot_metric(ax_rew, runs, "reward/accuracy")
    ax_val.set_title(f"held-out avg@{s.k} ({summary['held_out']['items']} items)", fontsize=10)
    ax_rew.set_title(
        "train accuracy of the groups trained on\n(online filter drops all-correct / all-wrong)", fontsize=10
    )
    for ax in (ax_val, ax_rew):
        ax.set_xlabel("RL step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    ax_val.axhline(summary["warm_start"]["avg_at_k"], color="k", ls=":", lw=1, label="SFT warm start")
    if summary.get("text_only_ceiling"):
        ax_val.axhline(summary["text_only_ceiling"], color="grey", ls="--", lw=1, label="text-only ceiling (hint)")
    ax_val.set_ylabel("accuracy")
    ax_val.legend(fontsize=8)
    fig.suptitle("Tiny Qwen2.5-VL on the synthetic visual task (CPU); band = min..max over seeds", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, metadata={"Software": None})
    plt.close(fig)
    return path


def diagnostic_panels(runs) -> list[str]:
    """The DIAGNOSTICS keys diagnostics.png draws: every one but train accuracy (curves.png has it) that some run
    logged (a key no run logged, e.g. TGF's without VPPO, would be an empty panel)."""
    return [k for k in DIAGNOSTICS if k != "reward/accuracy" and any(curves(runs, k).values())]


def diagnostics_figure(runs, seeds: dict[str, int], *, band: str = "band = min..max over seeds"):
    """The diagnostics.png figure (None when no run logged any diagnostic): one panel per `diagnostic_panels` key in
    a grid of up to 3 columns, and one legend above them naming every algorithm in `seeds` (algo -> seed count)."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    keys = diagnostic_panels(runs)
    if not keys:
        return None
    ncols = min(3, len(keys))
    nrows = math.ceil(len(keys) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.4 * nrows + 0.6), squeeze=False)
    for ax, key in zip(axes.flat, keys):
        _plot_metric(ax, runs, key)
        ax.set_title(f"{key}\n{textwrap.fill(DIAGNOSTICS[key], 52)}", fontsize=8)
        ax.set_xlabel("RL step", fontsize=8)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=6))
        ax.yaxis.set_major_locator(MaxNLocator(nbins=5))
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    for ax in axes.flat[len(keys) :]:
        ax.remove()
    handles = [
        Line2D([], [], color=_COLOURS.get(a), marker="o", ms=3, label=f"{a.upper()} (mean of {n} seed{'s' * (n != 1)})")
        for a, n in seeds.items()
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=9, frameon=False, title=band)
    fig.tight_layout(rect=(0, 0, 1, 1 - 0.6 / fig.get_figheight()))  # room for the legend above the grid
    return fig


def plot_diagnostics(
    runs, path: Path, *, seeds: dict[str, int] | None = None, band: str = "band = min..max over seeds"
) -> Path | None:
    """diagnostics.png (`diagnostics_figure`; seeds: algo -> seed count, default the runs'); None, and no file (an
    older one at `path` is removed), when no run logged a diagnostic."""
    import matplotlib.pyplot as plt

    seeds = seeds or {a: len(by_seed) for a, by_seed in runs.items()}
    fig = diagnostics_figure(runs, seeds, band=band)
    if fig is None:
        path.unlink(missing_ok=True)
        return None
    fig.savefig(path, dpi=110, metadata={"Software": None})
    plt.close(fig)
    return path
