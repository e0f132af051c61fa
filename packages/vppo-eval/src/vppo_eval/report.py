"""Reports: the paper's Table 1 beside a run, per-benchmark bars, and the token visual dependency analysis.

- `comparison_table` / `write_report`: markdown + JSON with the published avg@8 rows (ALGORITHMS.md §8) and the
  user's run, and a bar plot per benchmark.
- `dependency_analysis`: per-token visual dependency S (ALGORITHMS.md §1) of given responses under a model,
  computed exactly as training does (clean pass vs. a perturbed-image pass); `plot_dependency_histograms` draws the
  paper's Fig. 1 (token- and trajectory-level distributions) and `dependency_html` shades each token by its S.
"""

from __future__ import annotations

import dataclasses
import html
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from vppo_eval.evaluate import EvalResults

# Table 1 of the VPPO paper (avg@8, %, temperature 1.0), copied from ALGORITHMS.md §8. Column order as printed there.
PAPER_BENCHMARKS: tuple[str, ...] = (
    "MathVerse",
    "DynaMath",
    "MMK12",
    "Geo3k",
    "MathVision",
    "We-Math",
    "LogicVista",
    "MMMU-Pro",
)
# model -> (the 8 benchmark scores in PAPER_BENCHMARKS order, the published Avg)
PAPER_TABLE1: dict[str, tuple[tuple[float, ...], float]] = {
    "Qwen2.5-VL-7B": ((39.0, 55.7, 42.5, 37.1, 18.4, 46.4, 42.4, 25.1), 38.3),
    "Qwen2.5-VL-7B + GRPO": ((66.5, 65.8, 72.3, 40.2, 30.7, 68.1, 45.6, 35.2), 53.1),
    "Qwen2.5-VL-7B + DAPO": ((68.3, 66.6, 82.1, 41.5, 30.5, 68.0, 46.8, 35.9), 55.0),
    "Qwen2.5-VL-7B + VPPO": ((71.6, 68.1, 82.8, 46.5, 33.3, 71.5, 47.9, 37.9), 57.5),
    "Qwen2.5-VL-32B": ((68.5, 68.7, 68.8, 47.0, 39.3, 71.0, 52.8, 39.6), 57.0),
    "Qwen2.5-VL-32B + VPPO": ((75.1, 73.1, 86.3, 53.4, 44.6, 77.7, 59.2, 47.1), 64.6),
}
# The protocol the paper's rows follow (vppo_eval.benchmarks.PROTOCOLS): its authors' item sets and decoding.
PAPER_PROTOCOL = "vppo"

# Independent re-runs of the paper's VPPO model, each with the protocol and source it states. Only the numbers a
# source gives are copied (None: not given); "avg" is the source's own average over the eight benchmarks.
REPRODUCTIONS: tuple[dict[str, Any], ...] = (
    {
        "model": "Qwen2.5-VL-7B + VPPO, official script re-run",
        "protocol": "vppo (PAPO-Eval on the authors' released evaluation data)",
        "source": "https://github.com/huaixuheqing/VPPO-RL/issues/13 (2026-08-11; also below the paper on Geo3k and "
        "MathVision, numbers not given)",
        "scores": {"MMK12": 80.57},
        "avg": None,
    },
    {
        "model": "Qwen2.5-VL-7B + VPPO, re-run in the PGPO paper",
        "protocol": "the PGPO paper's own evaluation",
        "source": "PGPO paper (2026), its VPPO baseline row (average only copied here)",
        "scores": {},
        "avg": 54.08,
    },
)

# Names that do not reduce to the paper's column name by dropping case and punctuation.
_ALIASES = {"geometry3k": "geo3k", "mathv": "mathvision"}


def _canon(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def paper_column(benchmark: str) -> str | None:
    """The Table 1 column of a benchmark name ("we_math", "We-Math", "wemath" -> "We-Math"); None if not in it."""
    key = _canon(benchmark)
    key = _ALIASES.get(key, key)
    for col in PAPER_BENCHMARKS:
        if _canon(col) == key:
            return col
    return None


def display_name(benchmark: str) -> str:
    """The paper's column title of a benchmark when it has one ("we_math" -> "We-Math"), else the name itself."""
    return paper_column(benchmark) or benchmark


def json_safe(value: Any) -> Any:
    """`value` with every NaN / ±inf float replaced by None, through nested dicts, lists and tuples (tuples become
    lists, as JSON writes them); everything else unchanged.

    Why: JSON has no NaN. `json.dumps` writes a bare `NaN` that strict parsers (JavaScript, jq, Go) refuse; a
    missing value (a statistic with no data) is `null` instead.
    """
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def json_text(value: Any, *, indent: int | None = 2) -> str:
    """Strict JSON of `value` (`json_safe`: NaN / inf -> null; other objects, e.g. paths, as their `str`)."""
    return json.dumps(json_safe(value), indent=indent, allow_nan=False, default=str)


def _pct(x: float) -> float | None:
    return None if x is None or not math.isfinite(x) else 100.0 * x


def comparison_table(results: EvalResults, *, run_name: str = "this run") -> dict[str, Any]:
    """The run's avg@k beside the paper's Table 1 rows, all in percent.

    Returns {"columns": [benchmark names of the run], "rows": [...], "k": k, "note": str}; each row is
    {"model", "source": "paper" | "run", "scores": {column: % | None}, "avg_these": % | None, "avg_published": % | None}
    where avg_these is the mean over the run's benchmarks that have a score (paper rows: over the same ones) and
    avg_published the paper's own 8-benchmark Avg. Benchmarks outside Table 1 have None in the paper rows.
    """
    names = list(results.benchmarks)
    columns = {name: paper_column(name) for name in names}
    run_scores = {name: _pct(b.avg_at_k) for name, b in results.benchmarks.items()}
    # The run's average skips benchmarks with no scored item; the paper rows are averaged over the same set.
    scored = [name for name in names if run_scores[name] is not None]

    def subset_mean(row_scores: Mapping[str, float | None]) -> float | None:
        vals = [row_scores[name] for name in scored]
        return sum(vals) / len(vals) if vals and None not in vals else None

    rows = []
    for model, (scores, avg) in PAPER_TABLE1.items():
        by_col = dict(zip(PAPER_BENCHMARKS, scores))
        row_scores = {name: (by_col[col] if col else None) for name, col in columns.items()}
        rows.append(
            {
                "model": model,
                "source": "paper",
                "protocol": PAPER_PROTOCOL,
                "scores": row_scores,
                "avg_these": subset_mean(row_scores),
                "avg_published": avg,
            }
        )
    for repro in REPRODUCTIONS:
        row_scores = {name: (repro["scores"].get(col) if col else None) for name, col in columns.items()}
        rows.append(
            {
                "model": repro["model"],
                "source": "reproduction",
                "protocol": repro["protocol"],
                "reference": repro["source"],
                "scores": row_scores,
                "avg_these": subset_mean(row_scores),
                "avg_published": repro["avg"],
            }
        )
    rows.append(
        {
            "model": run_name,
            "source": "run",
            "protocol": results.config.get("protocol"),
            "scores": run_scores,
            "avg_these": _pct(results.average),
            "avg_published": None,
            "n_items": {name: b.n_items for name, b in results.benchmarks.items()},
            "n_skipped": {name: b.n_skipped for name, b in results.benchmarks.items()},
            "n_load_skipped": {name: sum(b.load_skipped.values()) for name, b in results.benchmarks.items()},
        }
    )
    limit = results.config.get("limit")
    note = (
        f"avg@{results.k} in %, temperature {results.config.get('temperature')}, top-p {results.config.get('top_p')}, "
        f"max {results.config.get('max_new_tokens')} new tokens. Paper rows: VPPO paper Table 1 as copied in "
        "ALGORITHMS.md §8 (avg@8, temperature 1.0, top-p 1.0, 2048 tokens; that copy has no 32B GRPO/DAPO rows). "
        "'Avg (these)' averages the columns shown, so paper rows and the run are compared on the same benchmarks."
    )
    if limit is not None:
        note += f" This run used only the first {limit} items of each benchmark: not comparable to the paper."
    deviations = (results.config.get("meta") or {}).get("protocol_deviations") or {}
    if deviations:
        changed = ", ".join(f"{k} {v['used']} (protocol: {v['protocol']})" for k, v in deviations.items())
        note += f" This run deviates from its protocol's decoding: {changed}."
    data = results.config.get("data") or {}
    return {
        "k": results.k,
        "columns": names,
        "rows": rows,
        "note": note,
        "protocol": results.config.get("protocol"),
        "data": data,
        "count_warnings": count_mismatches(data, limit),
    }


def count_mismatches(data: Mapping[str, Mapping[str, Any]], limit: int | None = None) -> list[str]:
    """One warning per benchmark whose kept items differ from its release's row count.

    data: benchmark -> what the result records of its data (`LoadReport.summary()` plus the scored ``items``), with
        ``expected_items`` the release's rows (None: no expectation, e.g. the raw form or records passed in).
    limit: the run's ``--limit``: then the expectation is min(limit, rows), so a partial run warns only when it kept
        fewer than its limit explains.
    """
    lines = []
    for name, d in data.items():
        expected, kept = d.get("expected_items"), d.get("items")
        if expected is None or kept is None:
            continue
        wanted = expected if limit is None else min(limit, expected)
        if kept == wanted:
            continue
        release = _release_of(name)
        lines.append(
            f"{display_name(name)}: {kept} item(s) kept, the authors' release{f' ({release})' if release else ''} has "
            f"{expected:,}{f' (the first {limit}: {wanted})' if limit is not None else ''}; the paper's numbers are "
            "only comparable on the same items (an incomplete or other copy of the file, or rows skipped at load: "
            "see the skip counts)"
        )
    return lines


def _release_of(name: str) -> str | None:
    """The hub dataset of registry benchmark ``name``'s authors' release, or None (not a registry name)."""
    from vppo_eval.benchmarks import get_benchmark

    try:
        return get_benchmark(name).release
    except ValueError:
        return None


def _fmt(x: float | None) -> str:
    return "–" if x is None else f"{x:.1f}"


def format_markdown(table: Mapping[str, Any]) -> str:
    """A markdown table of `comparison_table`'s output (one row per model, benchmarks as columns)."""
    names = table["columns"]
    header = ["Model", "Protocol", *(display_name(n) for n in names), "Avg (these)", "Avg (published, 8)"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in table["rows"]:
        model = f"**{row['model']}**" if row["source"] == "run" else row["model"]
        protocol = row.get("protocol") or "unnamed"
        cells = [model, protocol, *(_fmt(row["scores"][n]) for n in names), _fmt(row["avg_these"]),
                 _fmt(row["avg_published"])]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    run = next(r for r in table["rows"] if r["source"] == "run")
    counts = ", ".join(
        f"{n}: {run['n_items'][n]} scored, {run['n_skipped'][n]} skipped, {run['n_load_skipped'][n]} dropped at load"
        for n in names
    )
    data = table.get("data") or {}
    data_lines = []
    if data:
        data_lines = [
            f"Protocol of this run: **{table.get('protocol') or 'unnamed'}**. Two numbers are comparable only when "
            "their protocol, and for the same benchmark their item hash, agree.",
            "",
            "| Benchmark | Source | Form | Items kept / expected | Items' sha256 (id, question, answer; first 16) |",
            "|---|---|---|---|---|",
        ]
        for n in names:
            d = data.get(n, {})
            expected = d.get("expected_items")
            kept = f"{d.get('items', '?')} / {'–' if expected is None else f'{expected:,}'}"
            data_lines.append(
                f"| {display_name(n)} | {d.get('source', '?')} | {d.get('data_form') or '?'} | {kept} | "
                f"`{str(d.get('items_sha256', '?'))[:16]}` |"
            )
        data_lines.append("")
        data_lines.append(
            "Expected: the rows of the authors' release (protocol vppo: PAPO-Galaxy/PAPO_eval, chamber111/VPPO-Eval); "
            "– where there is none (the raw form)."
        )
        data_lines.append("")
        warnings = table.get("count_warnings") or []
        if warnings:
            data_lines += [*(f"**Warning:** {w}." for w in warnings), ""]
    repro = [r for r in table["rows"] if r["source"] == "reproduction"]
    repro_lines = [f"- {r['model']}: {r['reference']}." for r in repro]
    return "\n".join(
        [*lines, "", table["note"], "", f"Items: {counts}.", "", *data_lines,
         *(["Reproductions:", *repro_lines, ""] if repro_lines else [])]
    )  # fmt: skip


def plot_benchmark_bars(
    results: EvalResults,
    path: str | os.PathLike,
    *,
    run_name: str = "this run",
    reference_rows: Sequence[str] = ("Qwen2.5-VL-7B", "Qwen2.5-VL-7B + VPPO"),
) -> Path:
    """Grouped bars: the run's avg@k per benchmark (and the average) beside the named paper rows. Writes a PNG."""
    import matplotlib

    matplotlib.use("Agg")  # headless: never needs a display
    import matplotlib.pyplot as plt

    unknown = [r for r in reference_rows if r not in PAPER_TABLE1]
    if unknown:
        raise ValueError(f"reference_rows: {unknown} not in the paper table; choose from {list(PAPER_TABLE1)}")
    table = comparison_table(results, run_name=run_name)
    names = table["columns"]
    labels = [*(display_name(n) for n in names), "Avg"]
    rows = [r for r in table["rows"] if r["source"] == "run" or r["model"] in reference_rows]
    rows.sort(key=lambda r: r["source"] == "run")  # the run last, i.e. rightmost in each group
    x = np.arange(len(labels))
    width = 0.8 / len(rows)
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(labels) + 2), 4.2))
    for i, row in enumerate(rows):
        vals = [row["scores"][n] for n in names] + [row["avg_these"]]
        heights = [np.nan if v is None else v for v in vals]
        label = f"{row['model']} (avg@{results.k})" if row["source"] == "run" else f"{row['model']} (paper, avg@8)"
        bars = ax.bar(x + (i - (len(rows) - 1) / 2) * width, heights, width, label=label)
        if row["source"] == "run":
            for rect, v in zip(bars, vals):
                if v is not None:
                    ax.annotate(
                        f"{v:.1f}", (rect.get_x() + rect.get_width() / 2, v), ha="center", va="bottom", fontsize=7
                    )
    ax.set_xticks(x, labels, rotation=30, ha="right")
    ax.set_ylabel(f"avg@{results.k} (%)")
    ax.set_ylim(0, 100)
    limit = results.config.get("limit")
    ax.set_title("Accuracy per benchmark" + (f" (run: first {limit} items each)" if limit is not None else ""))
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def write_report(results: EvalResults, out_dir: str | os.PathLike, *, run_name: str = "this run") -> dict[str, Path]:
    """Write report.md, report.json (the table, in %) and benchmarks.png into out_dir; return their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    table = comparison_table(results, run_name=run_name)
    paths = {"markdown": out / "report.md", "json": out / "report.json", "bars": out / "benchmarks.png"}
    paths["markdown"].write_text(f"# Evaluation: {run_name}\n\n" + format_markdown(table))
    payload = {**table, "results": results.to_dict()}
    paths["json"].write_text(json.dumps(payload, indent=2))
    plot_benchmark_bars(results, paths["bars"], run_name=run_name)
    return paths


# ---------------------------------------------------------------------------------------------------------------
# Token visual dependency analysis (ALGORITHMS.md §1; the paper's Fig. 1)


@dataclasses.dataclass(frozen=True)
class DependencyAnalysis:
    """Visual dependency of N responses.

    token_dependency: N arrays, array i is S over response i's tokens, [n_i] float32 (ALGORITHMS.md §1).
    trajectory_dependency: [N] float32, S̄_i = mean of S over response i's tokens (0 for an empty response).
    tokens: N lists of the text of each token (same length as token_dependency[i]), for display.
    estimator: "sampled" (k3 on the sampled token, what training uses) or "exact" (full-vocabulary KL).
    perturbation: how the altered image was made (perturb_pixels mode).
    """

    token_dependency: list[np.ndarray]
    trajectory_dependency: np.ndarray
    tokens: list[list[str]]
    estimator: str
    perturbation: str

    def all_tokens(self) -> np.ndarray:
        """[sum n_i] float32: S of every token of every response."""
        if not self.token_dependency:
            return np.zeros(0, dtype=np.float32)
        return np.concatenate(self.token_dependency).astype(np.float32)

    def summary(self) -> dict[str, float]:
        """Distribution facts behind Fig. 1: quantiles, and the share of total S held by the top 10 %/20 % of tokens."""
        s = self.all_tokens()
        if s.size == 0:
            return {"n_tokens": 0, "n_responses": len(self.token_dependency)}
        desc = np.sort(s)[::-1]
        total = float(desc.sum())

        def top_share(frac: float) -> float:
            n = max(1, math.ceil(frac * desc.size))
            return float(desc[:n].sum() / total) if total > 0 else math.nan

        return {
            "n_tokens": int(s.size),
            "n_responses": len(self.token_dependency),
            "mean": float(s.mean()),
            "median": float(np.median(s)),
            "p90": float(np.quantile(s, 0.9)),
            "p99": float(np.quantile(s, 0.99)),
            "max": float(desc[0]),
            "top10_share": top_share(0.10),
            "top20_share": top_share(0.20),
            "trajectory_mean": float(self.trajectory_dependency.mean()),
            "trajectory_std": float(self.trajectory_dependency.std()),
        }


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """The text each token adds, one string per id (len(ids) strings).

    Decoding ids one at a time breaks characters split across byte-level tokens (they decode to U+FFFD); such a
    run of tokens is decoded together and its text given to its last token (the earlier ones get "").
    """
    out: list[str] = []
    pending: list[int] = []
    for i, tid in enumerate(ids):
        pending.append(int(tid))
        text = tokenizer.decode(pending, skip_special_tokens=False)
        if text.endswith("\ufffd") and i + 1 < len(ids) and len(pending) < 8:
            continue  # an incomplete UTF-8 sequence: wait for the next byte-level token (at most 4 bytes + slack)
        out.extend([""] * (len(pending) - 1) + [text])
        pending = []
    return out


def plot_dependency_histograms(analysis: DependencyAnalysis, path: str | os.PathLike, *, bins: int = 50) -> Path:
    """The paper's Fig. 1 (`dependency_histograms_figure`), written as a PNG."""
    import matplotlib.pyplot as plt

    fig = dependency_histograms_figure(analysis, bins=bins)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def dependency_histograms_figure(analysis: DependencyAnalysis, *, bins: int = 50):
    """The paper's Fig. 1 as a matplotlib figure: histograms of token-level S and trajectory-level S̄.

    The token histogram uses a log count axis: most tokens sit near 0 and a few carry most of the dependency.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    s = analysis.all_tokens()
    if s.size == 0:
        raise ValueError("analysis has no tokens: pass at least one non-empty response to dependency_analysis")
    info = analysis.summary()
    fig, (ax_tok, ax_traj) = plt.subplots(1, 2, figsize=(10, 3.8))
    ax_tok.hist(s, bins=bins, color="tab:red", alpha=0.85)
    ax_tok.set_yscale("log")
    ax_tok.set_xlabel("token visual dependency S")
    ax_tok.set_ylabel("tokens (log scale)")
    ax_tok.set_title(f"Token level ({info['n_tokens']} tokens)")
    ax_tok.axvline(info["median"], color="k", ls="--", lw=1, label=f"median {info['median']:.3g}")
    ax_tok.axvline(info["p90"], color="k", ls=":", lw=1, label=f"p90 {info['p90']:.3g}")
    ax_tok.legend(fontsize=8, title=f"top 10 % of tokens: {100 * info['top10_share']:.0f} % of ΣS", title_fontsize=8)
    traj = analysis.trajectory_dependency
    ax_traj.hist(traj, bins=min(bins, max(5, traj.size // 2)), color="tab:blue", alpha=0.85)
    ax_traj.set_xlabel("trajectory dependency S̄ (mean S over a response)")
    ax_traj.set_ylabel("responses")
    ax_traj.set_title(f"Trajectory level ({traj.size} responses)")
    # at most 5-6 labels per axis, so long ones (e.g. 0.0025 steps of a narrow S̄ range) do not run into each
    # other; response counts are whole numbers
    ax_tok.xaxis.set_major_locator(MaxNLocator(nbins=6))
    ax_traj.xaxis.set_major_locator(MaxNLocator(nbins=5))
    ax_traj.yaxis.set_major_locator(MaxNLocator(integer=True))
    fig.suptitle(f"Visual dependency ({analysis.estimator} estimator, {analysis.perturbation} image)", fontsize=10)
    fig.tight_layout()
    return fig


def dependency_html(
    analysis: DependencyAnalysis,
    path: str | os.PathLike,
    *,
    headers: Sequence[str] | None = None,
    vmax: float | None = None,
    title: str = "Token visual dependency",
) -> Path:
    """An HTML page: each response with every token shaded by its S (darker = more dependent on the image).

    headers: one plain-text line per response shown above it (e.g. question / answer / reward); escaped.
    vmax: the S that gets full colour; default the 99th percentile of all tokens (so one outlier does not wash
    out the rest). Hovering a token shows its S. All model and dataset text is HTML-escaped.
    """
    n = len(analysis.tokens)
    if headers is not None and len(headers) != n:
        raise ValueError(f"headers has {len(headers)} entries for {n} responses; pass one per response or None")
    s_all = analysis.all_tokens()
    if vmax is None:
        vmax = float(np.quantile(s_all, 0.99)) if s_all.size else 1.0
    vmax = vmax if vmax > 0 else 1.0
    parts = [
        "<!DOCTYPE html>",
        '<html><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>",
        "<style>body{font-family:sans-serif;max-width:60em;margin:2em auto}"
        ".resp{white-space:pre-wrap;font-family:monospace;border:1px solid #ccc;padding:.6em;margin:.4em 0 1.6em}"
        ".hdr{font-size:.9em;color:#333;white-space:pre-wrap}span.t{border-radius:2px}</style></head><body>",
        f"<h1>{html.escape(title)}</h1>",
        f"<p>{html.escape(analysis.estimator)} estimator, {html.escape(analysis.perturbation)} image; full colour at "
        f"S ≥ {vmax:.4g}. Hover a token to see its S.</p>",
    ]
    for i, (toks, s) in enumerate(zip(analysis.tokens, analysis.token_dependency)):
        head = f"#{i}  S̄ = {analysis.trajectory_dependency[i]:.4g}"
        if headers is not None:
            head += "\n" + headers[i]
        parts.append(f'<div class="hdr">{html.escape(head)}</div><div class="resp">')
        for tok, v in zip(toks, s):
            alpha = min(1.0, max(0.0, float(v) / vmax))
            parts.append(
                f'<span class="t" style="background:rgba(220,40,30,{alpha:.3f})" title="S={float(v):.4g}">'
                f"{html.escape(tok)}</span>"
            )
        parts.append("</div>")
    parts.append("</body></html>")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(parts), encoding="utf-8")
    return path


def dependency_analysis(
    model,
    processor,
    prompts: Sequence[Any],
    responses: Sequence[Sequence[int]] | Sequence[str],
    *,
    estimator: str = "sampled",
    perturbation: str = "blacken",
    prob: float = 0.5,
    micro_batch_size: int = 4,
    seed: int = 0,
    chunk_size: int | None = None,
    progress: bool = False,
) -> DependencyAnalysis:
    """Per-token visual dependency S of each response under `model` (ALGORITHMS.md §1), as the trainer computes it.

    For every micro-batch: `collate_rollout` builds the exact training inputs, one no-grad forward with the clean
    pixels and one with `perturb_pixels(mode=perturbation, prob=prob)` (a fresh mask per image, drawn from a
    generator seeded with `seed`), both at temperature 1.0. estimator="sampled" takes the log-prob of each
    response token in both passes and applies `token_dependency` (k3, what VPPO/PGPO train with);
    estimator="exact" is the full-vocabulary KL (`exact_token_dependency_from_hidden`). Logits come from the last
    hidden states chunk by chunk, so a [B, L, V] float32 tensor never exists.

    model: a Qwen2.5-VL / Qwen3-VL ForConditionalGeneration (eval mode is set here and restored after).
    prompts: N vppo_rollout Prompts (from build_prompt). responses: N token-id lists (preferred: the sampled ids)
        or N strings (tokenised without special tokens; re-tokenising can differ from the sampled ids).
    Returns a DependencyAnalysis whose arrays hold S over each response's tokens.
    """
    import torch

    from vppo_core.dependency import exact_token_dependency_from_hidden, token_dependency, trajectory_dependency
    from vppo_core.logprobs import logprobs_from_hidden
    from vppo_core.perturb import perturb_pixels
    from vppo_rollout.collate import collate_rollout, model_inputs

    if estimator not in ("sampled", "exact"):
        raise ValueError(f"estimator={estimator!r}: use 'sampled' (k3 on the sampled token) or 'exact' (full KL)")
    if len(prompts) != len(responses):
        raise ValueError(f"prompts ({len(prompts)}) and responses ({len(responses)}) must have one entry per response")
    if not isinstance(micro_batch_size, int) or micro_batch_size < 1:
        raise ValueError(f"micro_batch_size={micro_batch_size!r} must be an integer >= 1")
    tokenizer = processor.tokenizer
    ids = [
        tokenizer.encode(r, add_special_tokens=False) if isinstance(r, str) else [int(t) for t in r] for r in responses
    ]
    empty = [i for i, r in enumerate(ids) if not r]
    if empty:
        raise ValueError(f"responses {empty[:5]} are empty; dependency is defined on response tokens only")

    image_processor = processor.image_processor
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    # The processor's own pixel layout, so that "black" is exactly what it would emit for a black patch.
    layout = {
        key: getattr(image_processor, key)
        for key in ("rescale_factor", "patch_size", "temporal_patch_size", "merge_size")
        if getattr(image_processor, key, None) is not None
    }
    head = model.get_output_embeddings().weight
    was_training = model.training
    model.eval()
    token_s: list[np.ndarray] = []
    traj: list[float] = []
    try:
        from tqdm.auto import tqdm

        starts = range(0, len(ids), micro_batch_size)
        for start in tqdm(starts, desc="visual dependency", unit="batch", disable=not progress):
            batch_prompts = list(prompts[start : start + micro_batch_size])
            batch_ids = ids[start : start + micro_batch_size]
            batch = collate_rollout(processor, batch_prompts, batch_ids, model=model)
            p_len = int(batch["prompt_length"])
            labels = batch["responses"].to(device)
            mask = batch["response_mask"].to(device)
            inputs = {key: v.to(device) for key, v in model_inputs(batch).items()}
            length = labels.shape[1]
            altered = perturb_pixels(
                inputs["pixel_values"],
                inputs["image_grid_thw"],
                mode=perturbation,
                prob=prob,
                image_mean=image_processor.image_mean,
                image_std=image_processor.image_std,
                generator=generator,
                **layout,
            )
            with torch.no_grad():
                # Response token j is predicted at position P-1+j (collate left-pads prompts to P).
                h = model.model(**inputs, use_cache=False).last_hidden_state[:, p_len - 1 : p_len - 1 + length]
                h_alt = model.model(**{**inputs, "pixel_values": altered}, use_cache=False).last_hidden_state
                h_alt = h_alt[:, p_len - 1 : p_len - 1 + length]
                if estimator == "sampled":
                    lp = logprobs_from_hidden(h, head, labels, chunk_size=chunk_size)
                    lp_alt = logprobs_from_hidden(h_alt, head, labels, chunk_size=chunk_size)
                    s = token_dependency(lp, lp_alt, mask)
                else:
                    s = exact_token_dependency_from_hidden(h, h_alt, head, mask, chunk_size=chunk_size)
                s_bar = trajectory_dependency(s, mask)
            for row in range(s.shape[0]):
                valid = mask[row] != 0
                if int(valid.sum()) != len(batch_ids[row]):
                    raise RuntimeError(
                        f"collate_rollout kept {int(valid.sum())} of response {start + row}'s {len(batch_ids[row])} "
                        "tokens; the dependency would not line up with the tokens"
                    )
                token_s.append(s[row][valid].float().cpu().numpy())
                traj.append(float(s_bar[row]))
    finally:
        model.train(was_training)
    return DependencyAnalysis(
        token_dependency=token_s,
        trajectory_dependency=np.asarray(traj, dtype=np.float32),
        tokens=[token_texts(tokenizer, r) for r in ids],
        estimator=estimator,
        perturbation=perturbation,
    )


def write_dependency_report(
    analysis: DependencyAnalysis, out_dir: str | os.PathLike, *, headers: Sequence[str] | None = None
) -> dict[str, Path]:
    """Write dependency_hist.png (Fig. 1), dependency.html (shaded tokens) and dependency.json (`summary()`)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {
        "dependency_hist": plot_dependency_histograms(analysis, out / "dependency_hist.png"),
        "dependency_html": dependency_html(analysis, out / "dependency.html", headers=headers),
        "dependency_json": out / "dependency.json",
    }
    paths["dependency_json"].write_text(json_text(analysis.summary(), indent=2))
    return paths
