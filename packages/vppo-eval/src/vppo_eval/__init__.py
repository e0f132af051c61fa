"""vppo-eval: the eight-benchmark avg@k suite, the reward, reports, and a synthetic visual task.

- Grading (the RL reward too): `compute_rewards`, `grade`, `extract_boxed`, `format_reward`.
- Benchmarks: `BENCHMARKS`, `load_benchmark` / `load_benchmark_report` -> `Record`s.
- Evaluation: `evaluate(sampler, benchmarks, processor=..., k=8, ...)` -> `EvalResults` (resumable; CLI `vppo-eval`).
- Reports: `write_report` (paper Table 1 beside the run), `dependency_analysis` + `plot_dependency_histograms` +
  `dependency_html` (token visual dependency, the paper's Fig. 1).
- Synthetic task: `build_visual_task`.
"""

from vppo_eval.benchmarks import (
    BENCHMARK_NAMES,
    BENCHMARKS,
    BenchmarkUnavailableError,
    fixture_path,
    load_benchmark,
    load_benchmark_report,
    resolve_benchmark_names,
)
from vppo_eval.evaluate import (
    BenchmarkResult,
    EmptyBenchmarkError,
    EvalResults,
    ResumeRefusedError,
    evaluate,
    load_benchmark_reports,
    load_benchmarks,
    model_identity,
    read_items,
    records_from_rows,
    summarize,
)
from vppo_eval.records import Record
from vppo_eval.report import (
    PAPER_BENCHMARKS,
    PAPER_TABLE1,
    DependencyAnalysis,
    comparison_table,
    dependency_analysis,
    dependency_html,
    format_markdown,
    plot_benchmark_bars,
    plot_dependency_histograms,
    token_texts,
    write_dependency_report,
    write_report,
)
from vppo_eval.reward import compute_rewards, extract_boxed, format_reward, grade
from vppo_eval.synthetic import build_visual_task

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_NAMES",
    "PAPER_BENCHMARKS",
    "PAPER_TABLE1",
    "BenchmarkResult",
    "BenchmarkUnavailableError",
    "DependencyAnalysis",
    "EmptyBenchmarkError",
    "EvalResults",
    "Record",
    "ResumeRefusedError",
    "build_visual_task",
    "comparison_table",
    "compute_rewards",
    "dependency_analysis",
    "dependency_html",
    "evaluate",
    "extract_boxed",
    "fixture_path",
    "format_markdown",
    "format_reward",
    "grade",
    "load_benchmark",
    "load_benchmark_report",
    "load_benchmark_reports",
    "load_benchmarks",
    "model_identity",
    "plot_benchmark_bars",
    "plot_dependency_histograms",
    "read_items",
    "records_from_rows",
    "resolve_benchmark_names",
    "summarize",
    "token_texts",
    "write_dependency_report",
    "write_report",
]
