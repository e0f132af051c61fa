"""Tests of vppo_eval.report: the Table 1 comparison, the plots, the dependency analysis and its HTML view."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pytest

from vppo_eval.evaluate import EvalResults, summarize
from vppo_eval.report import (
    PAPER_BENCHMARKS,
    PAPER_TABLE1,
    DependencyAnalysis,
    comparison_table,
    dependency_html,
    format_markdown,
    paper_column,
    plot_benchmark_bars,
    plot_dependency_histograms,
    token_texts,
    write_report,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from vppo_rollout.tiny import build_tiny_checkpoint

    return build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_report"), "qwen2_5_vl", seed=0)


@pytest.fixture(scope="module")
def tiny_processor(tiny_ckpt):
    from vppo_rollout.loading import load_processor

    return load_processor(tiny_ckpt)


def _item(benchmark: str, item_id: str, acc: list[float], *, fmt: float = 1.0, finish: str = "stop") -> dict:
    return {
        "benchmark": benchmark,
        "id": item_id,
        "status": "scored",
        "question": "q",
        "answer": "1",
        "responses": ["r"] * len(acc),
        "finish_reasons": [finish] * len(acc),
        "accuracy": acc,
        "format": [fmt] * len(acc),
        "item_accuracy": sum(acc) / len(acc),
    }


def _results(items: list[dict], k: int = 2, limit: int | None = None) -> EvalResults:
    per = summarize(items)
    vals = [b.avg_at_k for b in per.values() if b.n_items]
    config = {"k": k, "temperature": 1.0, "top_p": 1.0, "max_new_tokens": 16, "limit": limit}
    return EvalResults(k=k, benchmarks=per, average=sum(vals) / len(vals), items=items, config=config)


@pytest.fixture
def results() -> EvalResults:
    # geo3k: items at 1.0, 0.5, 0.5 -> 66.67 %; mmk12: 0.0 and 0.5 -> 25 %, plus one skipped item.
    items = [
        _item("geo3k", "a", [1.0, 1.0]),
        _item("geo3k", "b", [1.0, 0.0]),
        _item("geo3k", "c", [0.0, 1.0], finish="length"),
        _item("mmk12", "x", [0.0, 0.0], fmt=0.0),
        _item("mmk12", "y", [1.0, 0.0]),
        {"benchmark": "mmk12", "id": "z", "status": "skipped", "reason": "empty_answer"},
    ]
    return _results(items)


def test_paper_table_published_avg_is_mean_of_its_row():
    # Guards the transcription of Table 1: each published Avg is the rounded mean of its eight scores.
    for model, (scores, avg) in PAPER_TABLE1.items():
        assert len(scores) == len(PAPER_BENCHMARKS), model
        assert abs(sum(scores) / len(scores) - avg) <= 0.05 + 1e-9, model


@pytest.mark.parametrize(
    ("name", "column"),
    [
        ("geo3k", "Geo3k"),
        ("geometry3k", "Geo3k"),
        ("we_math", "We-Math"),
        ("WeMath", "We-Math"),
        ("mmmu_pro", "MMMU-Pro"),
        ("MathVerse", "MathVerse"),
        ("dynamath", "DynaMath"),
        ("synthetic", None),
        ("mathv", "MathVision"),
    ],
)
def test_paper_column_maps_registry_spellings(name, column):
    assert paper_column(name) == column


def test_summarize_counts_scored_skipped_and_truncated(results):
    geo, mmk = results.benchmarks["geo3k"], results.benchmarks["mmk12"]
    assert geo.avg_at_k == pytest.approx(2 / 3)
    assert (geo.n_items, geo.n_skipped) == (3, 0)
    assert geo.truncated_rate == pytest.approx(2 / 6)
    assert mmk.avg_at_k == pytest.approx(0.25)
    assert (mmk.n_items, mmk.n_skipped, mmk.skipped) == (2, 1, {"empty_answer": 1})
    assert mmk.format_rate == pytest.approx(0.5)


def test_comparison_table_puts_run_in_percent_and_paper_rows_on_same_subset(results):
    table = comparison_table(results, run_name="mine")
    assert table["columns"] == ["geo3k", "mmk12"]
    run = table["rows"][-1]
    assert run["model"] == "mine" and run["source"] == "run"
    assert run["scores"]["geo3k"] == pytest.approx(200 / 3)
    assert run["scores"]["mmk12"] == pytest.approx(25.0)
    assert run["avg_these"] == pytest.approx((200 / 3 + 25.0) / 2)
    base = next(r for r in table["rows"] if r["model"] == "Qwen2.5-VL-7B")
    assert base["scores"] == {"geo3k": 37.1, "mmk12": 42.5}
    assert base["avg_these"] == pytest.approx((37.1 + 42.5) / 2)
    assert base["avg_published"] == 38.3
    assert [r["model"] for r in table["rows"] if r["source"] == "paper"] == list(PAPER_TABLE1)
    assert all(r["protocol"] == "vppo" for r in table["rows"] if r["source"] == "paper")
    # the known independent re-runs sit beside them, each with the protocol and source it states
    repro = [r for r in table["rows"] if r["source"] == "reproduction"]
    assert [r["scores"]["mmk12"] for r in repro] == [80.57, None] and repro[1]["avg_published"] == 54.08
    assert "VPPO-RL/issues/13" in repro[0]["reference"]


def test_comparison_table_leaves_non_paper_benchmark_empty():
    res = _results([_item("synthetic", "a", [1.0, 0.0]), _item("geo3k", "a", [1.0, 1.0])], limit=1)
    table = comparison_table(res)
    base = table["rows"][0]
    assert base["scores"]["synthetic"] is None
    assert base["avg_these"] is None  # a mean over a different subset would mislead
    assert "first 1 items" in table["note"]
    md = format_markdown(table)
    assert "| Model | Protocol | synthetic | Geo3k | Avg (these) | Avg (published, 8) |" in md
    assert "| Qwen2.5-VL-7B | vppo | – | 37.1 | – | 38.3 |" in md


def test_write_report_files_exist_and_contain_the_numbers(results, tmp_path):
    paths = write_report(results, tmp_path / "rep", run_name="tiny run")
    md = paths["markdown"].read_text()
    assert "| **tiny run** | unnamed | 66.7 | 25.0 | 45.8 | – |" in md
    assert "| Qwen2.5-VL-7B + VPPO | vppo | 46.5 | 82.8 | 64.7 | 57.5 |" in md
    assert (
        "| Qwen2.5-VL-7B + VPPO, official script re-run | vppo (PAPO-Eval on the authors' released evaluation data) | – | 80.6 |"
        in md
    )
    assert "mmk12: 2 scored, 1 skipped, 0 dropped at load" in md
    data = json.loads(paths["json"].read_text())
    run = data["rows"][-1]
    assert run["scores"]["geo3k"] == pytest.approx(200 / 3)
    assert data["results"]["benchmarks"]["mmk12"]["avg_at_k"] == pytest.approx(0.25)
    assert EvalResults.from_dict(data["results"]).benchmarks == results.benchmarks
    png = paths["bars"].read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_results_json_roundtrip_turns_nan_into_null():
    res = _results([_item("geo3k", "a", [1.0, 0.0])])
    empty = summarize([{"benchmark": "mmk12", "id": "z", "status": "skipped", "reason": "r"}])
    res = EvalResults(k=2, benchmarks={**res.benchmarks, **empty}, average=0.5, items=[], config={})
    text = json.dumps(res.to_dict(), allow_nan=False)  # raises if a NaN slipped through
    back = EvalResults.from_dict(json.loads(text))
    assert math.isnan(back.benchmarks["mmk12"].avg_at_k)
    assert back.benchmarks["geo3k"] == res.benchmarks["geo3k"]


def test_plot_benchmark_bars_rejects_unknown_reference_row(results, tmp_path):
    with pytest.raises(ValueError, match="reference_rows"):
        plot_benchmark_bars(results, tmp_path / "b.png", reference_rows=["GPT-5"])


def _analysis() -> DependencyAnalysis:
    s = [np.array([0.0, 0.5, 2.0], dtype=np.float32), np.array([0.1, 0.0], dtype=np.float32)]
    return DependencyAnalysis(
        token_dependency=s,
        trajectory_dependency=np.array([2.5 / 3, 0.05], dtype=np.float32),
        tokens=[["<script>", "a&b", " \\boxed{1}"], ["x", "\n"]],
        estimator="sampled",
        perturbation="blacken",
    )


def test_dependency_summary_reports_quantiles_and_top_share():
    info = _analysis().summary()
    assert info["n_tokens"] == 5 and info["n_responses"] == 2
    assert info["max"] == pytest.approx(2.0)
    assert info["mean"] == pytest.approx(2.6 / 5)
    # top 10 % of 5 tokens = ceil(0.5) = 1 token (S = 2.0) of a total 2.6
    assert info["top10_share"] == pytest.approx(2.0 / 2.6)


def test_dependency_html_escapes_text_and_shades_by_s(tmp_path):
    path = dependency_html(_analysis(), tmp_path / "dep.html", headers=["Q: is 1<2? A: <b>yes</b>", "second"], vmax=2.0)
    page = path.read_text()
    assert "<script>" not in page and "&lt;script&gt;" in page
    assert "a&amp;b" in page and "&lt;b&gt;yes&lt;/b&gt;" in page
    alphas = [float(a) for a in re.findall(r"rgba\(220,40,30,([0-9.]+)\)", page)]
    assert alphas == pytest.approx([0.0, 0.25, 1.0, 0.05, 0.0])
    assert page.count('class="resp"') == 2


def test_write_dependency_report_writes_the_three_files_with_the_summary(tmp_path):
    from vppo_eval.report import write_dependency_report

    paths = write_dependency_report(_analysis(), tmp_path / "dep", headers=["a", "b"])
    assert paths["dependency_hist"].read_bytes().startswith(PNG_MAGIC)
    assert paths["dependency_html"].read_text().count('class="resp"') == 2
    info = json.loads(paths["dependency_json"].read_text())
    assert info["n_tokens"] == 5 and info["max"] == pytest.approx(2.0)


def test_dependency_html_rejects_header_count_mismatch(tmp_path):
    with pytest.raises(ValueError, match="headers"):
        dependency_html(_analysis(), tmp_path / "x.html", headers=["only one"])


def test_dependency_histograms_png_is_written(tmp_path):
    png = plot_dependency_histograms(_analysis(), tmp_path / "hist.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 5000


def test_dependency_histograms_tick_labels_do_not_collide_on_a_narrow_range(overlapping_tick_labels):
    """Responses whose S̄ all sit in [1e-4, 1.3e-4] (a weakly trained model): matplotlib's default locator put nine
    8-character labels under the trajectory panel, each running into the next."""
    import matplotlib.pyplot as plt

    from vppo_eval.report import dependency_histograms_figure

    rng = np.random.default_rng(0)
    narrow = DependencyAnalysis(
        [rng.exponential(1e-4, 20).astype(np.float32) for _ in range(32)],
        rng.uniform(1e-4, 1.3e-4, 32).astype(np.float32),
        [["x"] * 20] * 32,
        "sampled",
        "blacken",
    )
    for analysis in (narrow, _analysis()):
        fig = dependency_histograms_figure(analysis)
        assert overlapping_tick_labels(fig) == []
        plt.close(fig)


def test_dependency_json_is_strict_json_when_a_share_is_undefined(tmp_path):
    """All S = 0: the top-10 % share is 0/0; dependency.json says null, not a bare NaN (which is not JSON)."""
    from vppo_eval.report import write_dependency_report

    zeros = DependencyAnalysis(
        [np.zeros(3, np.float32)], np.zeros(1, np.float32), [["a", "b", "c"]], "sampled", "blacken"
    )
    text = write_dependency_report(zeros, tmp_path)["dependency_json"].read_text()
    info = json.loads(text, parse_constant=lambda c: pytest.fail(f"{c} in dependency.json"))
    assert info["top10_share"] is None and info["n_tokens"] == 3


def test_dependency_histograms_reject_empty_analysis(tmp_path):
    empty = DependencyAnalysis([], np.zeros(0, np.float32), [], "sampled", "blacken")
    with pytest.raises(ValueError, match="no tokens"):
        plot_dependency_histograms(empty, tmp_path / "h.png")


def test_token_texts_reassemble_the_decoded_response(tiny_processor):
    tok = tiny_processor.tokenizer
    text = "é€ <think>two red</think> 1<2 \\boxed{3}"
    ids = tok.encode(text, add_special_tokens=False)
    pieces = token_texts(tok, ids)
    assert len(pieces) == len(ids)
    assert "".join(pieces) == tok.decode(ids)
    assert "\ufffd" not in "".join(pieces)


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    from vppo_rollout.loading import load_policy

    return load_policy(tiny_ckpt)


def _prompts_and_responses(processor, n: int = 3):
    from PIL import Image

    from vppo_rollout.prompts import build_prompt

    rng = np.random.default_rng(0)
    prompts = [
        build_prompt(
            processor, f"How many red shapes? ({i})", [Image.fromarray(rng.integers(0, 255, (56, 56, 3), np.uint8))]
        )
        for i in range(n)
    ]
    texts = ["<think>two red</think> \\boxed{2}", "three", "<think>one</think> the answer is \\boxed{1}"][:n]
    ids = [processor.tokenizer.encode(t, add_special_tokens=False) for t in texts]
    return prompts, ids


def test_dependency_analysis_matches_a_plain_forward_with_the_same_mask(tiny_model, tiny_processor):
    # Reference: the model's own full logits on each example alone, the same perturbation (same seed -> same
    # patch mask for a single image), then the k3 formula of ALGORITHMS.md §1 written out here.
    import torch

    from vppo_core.perturb import perturb_pixels
    from vppo_eval.report import dependency_analysis
    from vppo_rollout.collate import collate_rollout, model_inputs

    prompts, ids = _prompts_and_responses(tiny_processor)
    got = dependency_analysis(tiny_model, tiny_processor, prompts, ids, micro_batch_size=2, seed=3)
    assert [len(s) for s in got.token_dependency] == [len(r) for r in ids]
    assert [len(t) for t in got.tokens] == [len(r) for r in ids]

    ip = tiny_processor.image_processor
    gen = torch.Generator().manual_seed(3)
    for row, (prompt, resp) in enumerate(zip(prompts, ids)):
        if row == 2:  # the third response is the first of the second micro-batch: the generator moved on
            break
        batch = collate_rollout(tiny_processor, [prompt], [resp], model=tiny_model)
        inputs = model_inputs(batch)
        p_len, n = batch["prompt_length"], len(resp)
        alt = perturb_pixels(inputs["pixel_values"], inputs["image_grid_thw"], image_mean=ip.image_mean,
                             image_std=ip.image_std, generator=gen)  # fmt: skip
        with torch.no_grad():
            logits = tiny_model(**inputs).logits[0, p_len - 1 : p_len - 1 + n].float()
            logits_alt = tiny_model(**{**inputs, "pixel_values": alt}).logits[0, p_len - 1 : p_len - 1 + n].float()
        tgt = torch.tensor(resp)
        lp = torch.log_softmax(logits, -1)[torch.arange(n), tgt]
        lp_alt = torch.log_softmax(logits_alt, -1)[torch.arange(n), tgt]
        d = (lp_alt - lp).clamp(-20, 20)
        ref = (d.exp() - d - 1).clamp(0, 10).numpy()
        np.testing.assert_allclose(got.token_dependency[row], ref, rtol=1e-4, atol=1e-6)
        assert got.trajectory_dependency[row] == pytest.approx(float(ref.mean()), rel=1e-4, abs=1e-7)
    assert all(float(s.max()) > 0 for s in got.token_dependency)  # the image matters somewhere in a random model


def test_dependency_analysis_exact_kl_is_finite_and_nonnegative_per_token(tiny_model, tiny_processor):
    from vppo_eval.report import dependency_analysis

    prompts, ids = _prompts_and_responses(tiny_processor, n=2)
    exact = dependency_analysis(tiny_model, tiny_processor, prompts, ids, estimator="exact", seed=1)
    assert exact.estimator == "exact"
    for s, r in zip(exact.token_dependency, ids):
        assert s.shape == (len(r),) and (s >= 0).all() and np.isfinite(s).all()
    assert exact.all_tokens().max() > 0


def test_dependency_analysis_accepts_strings_and_rejects_bad_input(tiny_model, tiny_processor):
    from vppo_eval.report import dependency_analysis

    prompts, ids = _prompts_and_responses(tiny_processor, n=2)
    texts = [tiny_processor.tokenizer.decode(r) for r in ids]
    from_text = dependency_analysis(tiny_model, tiny_processor, prompts, texts, seed=0)
    from_ids = dependency_analysis(tiny_model, tiny_processor, prompts, ids, seed=0)
    for a, b in zip(from_text.token_dependency, from_ids.token_dependency):
        np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="estimator"):
        dependency_analysis(tiny_model, tiny_processor, prompts, ids, estimator="full")
    with pytest.raises(ValueError, match="one entry per response"):
        dependency_analysis(tiny_model, tiny_processor, prompts, ids[:1])
    with pytest.raises(ValueError, match="empty"):
        dependency_analysis(tiny_model, tiny_processor, prompts, [ids[0], []])


def test_dependency_analysis_on_qwen3_vl_draws_a_fresh_mask_per_response(tmp_path):
    # Qwen3-VL: 16 px patches (the layout comes from its image processor). The same prompt and response twice in
    # one micro-batch must get two independent patch masks (ALGORITHMS.md §1), hence different S.
    from PIL import Image

    from vppo_eval.report import dependency_analysis
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.prompts import build_prompt
    from vppo_rollout.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path / "q3", "qwen3_vl", seed=0)
    model, processor = load_policy(path), load_processor(path)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8))
    prompt = build_prompt(processor, "How many red shapes?", [image])
    ids = processor.tokenizer.encode("<think>two</think> \\boxed{2}", add_special_tokens=False)
    dep = dependency_analysis(model, processor, [prompt, prompt], [ids, ids], micro_batch_size=2, seed=0)
    a, b = dep.token_dependency
    assert a.shape == b.shape == (len(ids),) and (a >= 0).all() and (b >= 0).all()
    assert not np.allclose(a, b)


def test_paper_average_uses_only_benchmarks_the_run_scored():
    items = [_item("geo3k", "a", [1.0, 0.0]), {"benchmark": "mmk12", "id": "z", "status": "skipped", "reason": "r"}]
    per = summarize(items)
    res = EvalResults(k=2, benchmarks=per, average=0.5, items=items, config={})
    table = comparison_table(res)
    base = table["rows"][0]
    assert base["scores"] == {"geo3k": 37.1, "mmk12": 42.5}
    assert base["avg_these"] == pytest.approx(37.1)  # mmk12 has no run score, so it is left out of both averages
    assert table["rows"][-1]["scores"]["mmk12"] is None and table["rows"][-1]["avg_these"] == pytest.approx(50.0)
