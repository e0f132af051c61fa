"""Tests of the `vppo-eval` command line (vppo_eval.cli)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from vppo_eval import cli
from vppo_eval.benchmarks import fixture_path

FIXTURES = fixture_path("geo3k").parent
PYPROJECT = Path(__file__).parents[1] / "pyproject.toml"


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from vppo_rollout.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_cli"), "qwen2_5_vl", seed=0)


def test_cli_end_to_end_writes_results_report_plots_and_dependency_view(ckpt, tmp_path, capsys):
    out = tmp_path / "eval"
    argv = ["--model", str(ckpt), "--benchmarks", "geo3k,mmk12", "--protocol", "raw", "--k", "2", "--out", str(out),
            "--data-dir", str(FIXTURES), "--limit", "2", "--max-new-tokens", "6", "--engine", "transformers",
            "--run-name", "tiny-ckpt", "--dependency", "2", "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    for name in ("items.jsonl", "eval_config.json", "results.json", "report.md", "report.json", "benchmarks.png",
                 "dependency_hist.png", "dependency.html", "dependency.json"):  # fmt: skip
        assert (out / name).is_file() and (out / name).stat().st_size > 0, name
    results = json.loads((out / "results.json").read_text())
    assert results["k"] == 2 and results["config"]["meta"]["engine"] == "transformers"
    assert {n: b["n_items"] for n, b in results["benchmarks"].items()} == {"geo3k": 2, "mmk12": 2}
    geo = 100 * results["benchmarks"]["geo3k"]["avg_at_k"]
    md = (out / "report.md").read_text()
    assert f"| **tiny-ckpt** | raw | {geo:.1f} |" in md
    assert "| Qwen2.5-VL-7B + VPPO | vppo | 46.5 | 82.8 |" in md
    assert results["config"]["protocol"] == "raw" and results["config"]["data"]["geo3k"]["data_form"] == "raw"
    assert "first 2 items" in md
    assert "tiny-ckpt" in capsys.readouterr().out
    dep = json.loads((out / "dependency.json").read_text())
    assert dep["n_responses"] == 2 and dep["n_tokens"] > 0
    assert (out / "dependency.html").read_text().count('class="resp"') == 2

    # Rerunning the same command resumes: nothing is appended, the numbers are unchanged.
    lines = (out / "items.jsonl").read_text()
    assert cli.main([*argv[:-3], "--no-progress"]) == 0
    assert (out / "items.jsonl").read_text() == lines
    assert json.loads((out / "results.json").read_text())["benchmarks"] == results["benchmarks"]


def test_cli_unknown_benchmark_exits_before_loading_the_model(ckpt, tmp_path, monkeypatch):
    import vppo_rollout.loading

    def boom(*a, **k):
        raise AssertionError("the model must not be loaded for a bad benchmark name")

    monkeypatch.setattr(vppo_rollout.loading, "load_policy", boom)
    monkeypatch.setattr(vppo_rollout.loading, "load_processor", boom)
    with pytest.raises(SystemExit, match="unknown benchmark 'mathvista'"):
        cli.main(["--model", str(ckpt), "--benchmarks", "geo3k,mathvista", "--protocol", "raw", "--out", str(tmp_path)])


@pytest.mark.parametrize(
    ("extra", "match"),
    [(["--k", "0"], "--k 0"), (["--limit", "0"], "--limit 0"), (["--dependency", "-1"], "--dependency")],
)
def test_cli_rejects_bad_numbers(ckpt, tmp_path, extra, match):
    with pytest.raises(SystemExit, match=match):
        cli.main(["--model", str(ckpt), "--out", str(tmp_path), *extra])


def test_cli_rejects_missing_model_folder(tmp_path):
    with pytest.raises(SystemExit, match="not a folder"):
        cli.main(["--model", str(tmp_path / "nope"), "--out", str(tmp_path)])


def test_choose_engine_prefers_vllm_only_with_vllm_and_a_gpu(monkeypatch):
    import torch

    real_find_spec = importlib.util.find_spec

    def with_vllm(present: bool):
        monkeypatch.setattr(
            importlib.util,
            "find_spec",
            lambda name, *a: (object() if present else None) if name == "vllm" else real_find_spec(name, *a),
        )

    for has_vllm, has_gpu, expected in [
        (True, True, "vllm"),
        (True, False, "transformers"),
        (False, True, "transformers"),
    ]:
        with_vllm(has_vllm)
        monkeypatch.setattr(torch.cuda, "is_available", lambda g=has_gpu: g)
        assert cli.choose_engine("auto") == expected
        assert cli.choose_engine("transformers") == "transformers"
    with_vllm(False)
    with pytest.raises(SystemExit, match="vllm is not installed"):
        cli.choose_engine("vllm")


def test_console_script_is_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    scripts = tomllib.loads(PYPROJECT.read_text())["project"]["scripts"]
    assert scripts["vppo-eval"] == "vppo_eval.cli:main"


@pytest.mark.vllm
def test_cli_vllm_engine_scores_every_fixture_like_the_transformers_engine(tmp_path):
    """`--engine vllm` on the real engine (CPU build): greedy avg@1 and every response equal the transformers
    engine's on the fixtures of all eight benchmarks (the second MMMU-Pro item has two images)."""
    from vppo_rollout.tiny import VLLM_CPU_SIZES, build_tiny_checkpoint

    ckpt = build_tiny_checkpoint(tmp_path / "tiny", "qwen2_5_vl", seed=0, **VLLM_CPU_SIZES)
    runs = {}
    for engine in ("vllm", "transformers"):
        out = tmp_path / engine
        argv = ["--model", str(ckpt), "--benchmarks", "all", "--protocol", "raw", "--k", "1", "--temperature", "0",
                "--out", str(out),
                "--data-dir", str(FIXTURES), "--limit", "2", "--max-new-tokens", "12", "--engine", engine,
                "--no-progress"]  # fmt: skip
        assert cli.main(argv) == 0
        results = json.loads((out / "results.json").read_text())
        assert results["config"]["meta"]["engine"] == engine
        items = [json.loads(line) for line in (out / "items.jsonl").read_text().splitlines()]
        runs[engine] = (results["benchmarks"], {(r["benchmark"], r["id"]): r.get("responses") for r in items})
    (bench_v, items_v), (bench_t, items_t) = runs["vllm"], runs["transformers"]
    assert len(bench_v) == 8 and all(b["n_items"] > 0 for b in bench_v.values())
    assert {n: b["avg_at_k"] for n, b in bench_v.items()} == {n: b["avg_at_k"] for n, b in bench_t.items()}
    assert items_v == items_t and any(any(r) for r in items_v.values() if r)


def test_cli_protocol_vppo_scores_every_benchmark_from_the_authors_sharegpt_files(ckpt, tmp_path):
    """The issue-14 command: `vppo-eval --benchmarks all --data-dir <sharegpt fixtures> --protocol vppo`; the report
    names the protocol, each benchmark's source, the items kept and their id hash."""
    from vppo_eval.benchmarks import BENCHMARK_NAMES

    out = tmp_path / "vppo"
    argv = ["--model", str(ckpt), "--benchmarks", "all", "--data-dir", str(FIXTURES / "sharegpt"), "--protocol",
            "vppo", "--k", "2", "--max-new-tokens", "6", "--engine", "transformers", "--out", str(out),
            "--no-progress"]  # fmt: skip
    assert cli.main(argv) == 0
    results = json.loads((out / "results.json").read_text())
    assert list(results["benchmarks"]) == list(BENCHMARK_NAMES)
    assert all(b["n_items"] > 0 and b["n_skipped"] == 0 for b in results["benchmarks"].values())
    config = results["config"]
    assert config["protocol"] == "vppo"
    assert config["meta"]["protocol_deviations"] == {
        "k": {"protocol": 8, "used": 2}, "max_new_tokens": {"protocol": 2048, "used": 6}
    }  # fmt: skip
    md = (out / "report.md").read_text()
    assert "Protocol of this run: **vppo**" in md and "deviates from its protocol's decoding: k 2" in md
    for name in BENCHMARK_NAMES:
        data = config["data"][name]
        assert data["data_form"] == "sharegpt" and data["items"] == results["benchmarks"][name]["n_items"]
        expected = f"{data['expected_items']:,}"  # the authors' release's rows: the fixtures keep a few of them
        assert f"| {data['source']} | sharegpt | {data['items']} / {expected} | `{data['items_sha256'][:16]}` |" in md
    run_row = next(line for line in md.splitlines() if line.startswith("| **"))
    assert run_row.split(" | ")[1] == "vppo"


def test_cli_protocol_vppo_without_the_authors_data_says_where_to_get_it(ckpt, tmp_path):
    with pytest.raises(SystemExit, match=r"chamber111/VPPO-Eval.*pass --data-dir"):
        cli.main(["--model", str(ckpt), "--benchmarks", "geo3k", "--out", str(tmp_path)])
    with pytest.raises(SystemExit, match=r"geo3k\.parquet is there: the benchmark's own release, which protocol 'raw'"):
        cli.main(["--model", str(ckpt), "--benchmarks", "geo3k", "--data-dir", str(FIXTURES), "--out", str(tmp_path)])
