"""Tests of vppo_eval.evaluate: avg@k arithmetic, skips, resume after interruption, with the tiny real model."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vppo_eval.benchmarks import fixture_path
from vppo_eval.evaluate import CONFIG_FILE, ITEMS_FILE, RESULTS_FILE, EvalResults, evaluate, read_items
from vppo_eval.records import Record

FIXTURES = fixture_path("geo3k").parent
TWO = "geo3k,mmk12"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(model, processor) of a tiny random Qwen2.5-VL built offline by vppo-rollout."""
    from vppo_rollout.loading import load_policy, load_processor
    from vppo_rollout.tiny import build_tiny_checkpoint

    path = build_tiny_checkpoint(tmp_path_factory.mktemp("tiny_eval"), "qwen2_5_vl", seed=0)
    return load_policy(path), load_processor(path)


@pytest.fixture
def sampler(tiny):
    from vppo_rollout.transformers_engine import TransformersSampler

    model, processor = tiny
    return TransformersSampler(model, processor, batch_size=8)


class Recording:
    """Wraps a real sampler: records which prompts it was asked for, and raises after `fail_after` calls."""

    def __init__(self, inner, fail_after: int | None = None):
        self.inner, self.fail_after = inner, fail_after
        self.questions: list[str] = []
        self.calls = 0

    def sample(self, prompts, n, sampling):
        if self.fail_after is not None and self.calls >= self.fail_after:
            raise KeyboardInterrupt("simulated interruption")
        self.calls += 1
        self.questions += [p.question for p in prompts]
        return self.inner.sample(prompts, n, sampling)


class Scripted:
    """A sampler whose responses are given per question: lets a test know the exact avg@k in advance."""

    def __init__(self, script: dict[str, list[str]]):
        self.script = script

    def sample(self, prompts, n, sampling):
        from vppo_rollout.sampling import Rollouts

        texts = [self.script[p.question][j] for p in prompts for j in range(n)]
        return Rollouts(
            group_index=[g for g in range(len(prompts)) for _ in range(n)],
            token_ids=[[1] for _ in texts],
            texts=texts,
            finish_reasons=["stop"] * len(texts),
            logprobs=None,
        )


def _image(seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (56, 56, 3), dtype=np.uint8))


def _records(answers: list[str], prefix: str = "q") -> list[Record]:
    return [Record(id=f"{prefix}{i}", question=f"{prefix} question {i}", images=[_image(i)], answer=a)
            for i, a in enumerate(answers)]  # fmt: skip


def _ok(ans: str) -> str:
    return f"<think>look</think> \\boxed{{{ans}}}"


def test_tiny_model_on_two_fixture_benchmarks_k2(sampler, tiny, tmp_path):
    _, processor = tiny
    res = evaluate(sampler, TWO, processor=processor, data_dir=FIXTURES, protocol="raw", k=2, max_new_tokens=8,
                   out_dir=tmp_path, batch_size=2, progress=False)  # fmt: skip
    assert list(res.benchmarks) == ["geo3k", "mmk12"]
    rows = read_items(tmp_path / ITEMS_FILE)
    assert len(rows) == 6 and [r["benchmark"] for r in rows].count("geo3k") == 3
    for row in rows:
        assert row["status"] == "scored"
        assert len(row["responses"]) == len(row["accuracy"]) == len(row["finish_reasons"]) == 2
        assert row["item_accuracy"] == pytest.approx(sum(row["accuracy"]) / 2)
        assert set(row["finish_reasons"]) <= {"stop", "length"}
    for name, b in res.benchmarks.items():
        mine = [r["item_accuracy"] for r in rows if r["benchmark"] == name]
        assert b.n_items == 3 and b.avg_at_k == pytest.approx(sum(mine) / 3)
    assert res.average == pytest.approx((res.benchmarks["geo3k"].avg_at_k + res.benchmarks["mmk12"].avg_at_k) / 2)
    stored = EvalResults.from_dict(json.loads((tmp_path / RESULTS_FILE).read_text()))
    assert stored.benchmarks == res.benchmarks and stored.average == pytest.approx(res.average)
    # the fixture loader dropped nothing for these two benchmarks; a filtered one reports its drops
    assert res.benchmarks["geo3k"].load_skipped == {}


def test_avg_at_k_is_mean_over_items_of_mean_over_samples(tiny):
    _, processor = tiny
    data = {"a": _records(["5", "B"], "a"), "b": _records(["\\frac{1}{2}"], "b")}
    script = {
        "a question 0": [_ok("5"), _ok("5"), _ok("6"), "no box"],  # 2/4
        "a question 1": [_ok("B")] * 4,  # 4/4
        "b question 0": [_ok("0.5"), _ok("1/2"), _ok("2"), _ok("\\frac12")],  # 0.5 and 1/2 and \frac12 match
    }
    res = evaluate(Scripted(script), data, processor=processor, k=4, progress=False)
    acc = res.item_accuracy()
    assert acc[("a", "a0")] == 0.5 and acc[("a", "a1")] == 1.0
    assert res.benchmarks["a"].avg_at_k == pytest.approx(0.75)
    assert res.benchmarks["b"].avg_at_k == pytest.approx(0.75)
    assert res.average == pytest.approx(0.75)
    assert res.benchmarks["a"].format_rate == pytest.approx(7 / 8)


def test_resume_after_interruption_recomputes_nothing_and_equals_uninterrupted(sampler, tiny, tmp_path):
    _, processor = tiny
    kw = dict(processor=processor, data_dir=FIXTURES, protocol="raw", k=2, max_new_tokens=6, batch_size=1, seed=7,
              progress=False)  # fmt: skip
    full = evaluate(sampler, TWO, out_dir=tmp_path / "full", **kw)

    broken = Recording(sampler, fail_after=4)
    with pytest.raises(KeyboardInterrupt):
        evaluate(broken, TWO, out_dir=tmp_path / "resumed", **kw)
    first = read_items(tmp_path / "resumed" / ITEMS_FILE)
    assert len(first) == 4  # every finished item was kept

    again = Recording(sampler)
    resumed = evaluate(again, TWO, out_dir=tmp_path / "resumed", **kw)
    done_before = {r["question"] for r in first}
    assert len(again.questions) == 2 and not done_before & set(again.questions)  # only the 2 missing items
    assert read_items(tmp_path / "resumed" / ITEMS_FILE)[:4] == first  # never lost nor rewritten
    assert resumed.items == full.items  # same responses, same grades
    assert resumed.benchmarks == full.benchmarks and resumed.average == full.average

    third = Recording(sampler)
    evaluate(third, TWO, out_dir=tmp_path / "resumed", **kw)
    assert third.calls == 0  # a finished evaluation samples nothing


def test_torn_last_line_is_dropped_and_only_that_item_resampled(tiny, tmp_path):
    _, processor = tiny
    data = {"a": _records(["1", "2", "3"], "a")}
    script = {f"a question {i}": [_ok(str(i + 1))] * 2 for i in range(3)}
    evaluate(Scripted(script), data, processor=processor, k=2, out_dir=tmp_path, batch_size=1, progress=False)
    path = tmp_path / ITEMS_FILE
    lines = path.read_text().splitlines(keepends=True)
    path.write_text("".join(lines[:2]) + lines[2][:25])  # killed in the middle of writing item 3
    rec = Recording(Scripted(script))
    res = evaluate(rec, data, processor=processor, k=2, out_dir=tmp_path, batch_size=1, progress=False)
    assert rec.questions == ["a question 2"]
    assert res.benchmarks["a"].avg_at_k == 1.0
    assert len(read_items(path)) == 3


def test_last_row_without_newline_is_kept_and_the_next_append_starts_a_new_line(tiny, tmp_path):
    _, processor = tiny
    data = {"a": _records(["1", "2"], "a")}
    script = {f"a question {i}": [_ok(str(i + 1))] * 2 for i in range(2)}
    evaluate(Scripted(script), {"a": data["a"][:1]}, processor=processor, k=2, out_dir=tmp_path, progress=False)
    path = tmp_path / ITEMS_FILE
    path.write_text(path.read_text().rstrip("\n"))  # killed between the row and its newline
    rec = Recording(Scripted(script))
    res = evaluate(rec, data, processor=processor, k=2, out_dir=tmp_path, batch_size=1, progress=False)
    assert rec.questions == ["a question 1"]
    assert len(read_items(path)) == 2 and res.benchmarks["a"].avg_at_k == 1.0


def test_a_last_line_cut_anywhere_even_inside_a_utf8_character_is_dropped(tmp_path):
    """A cut inside a multi-byte character used to end the resume with UnicodeDecodeError."""
    path = tmp_path / ITEMS_FILE
    rows = [{"benchmark": "a", "id": f"a{i}", "status": "ok", "response": f"三角形 {i} é ∠ABC"} for i in range(2)]
    first = (json.dumps(rows[0], ensure_ascii=False) + "\n").encode()
    last = (json.dumps(rows[1], ensure_ascii=False) + "\n").encode()
    assert len(last) > len(json.dumps(rows[1], ensure_ascii=False))  # multi-byte characters in the line
    for cut in range(1, len(last) - 1):  # every byte offset of the last line, without its newline
        path.write_bytes(first + last[:cut])
        assert read_items(path) == rows[:1], cut
        assert path.read_bytes() == first  # the torn tail is cut off the file
    path.write_bytes(first + last[:-1])  # complete row, no newline: kept
    assert read_items(path) == rows and path.read_bytes() == first + last


def test_corrupt_middle_line_or_foreign_row_raises_instead_of_resuming(tmp_path):
    path = tmp_path / ITEMS_FILE
    path.write_text('{"benchmark": "a", "id": "a0", "status": "skipped"}\n{oops\n{"id": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not valid JSON"):
        read_items(path)
    path.write_text('{"benchmark": "a", "id": "a0", "status": "skipped"}\n{"id": 1}\n')
    with pytest.raises(ValueError, match="line 2 is not an evaluation item"):
        read_items(path)


def test_rerun_with_other_settings_in_same_out_dir_raises(tiny, tmp_path):
    _, processor = tiny
    data = {"a": _records(["1"], "a")}
    script = {"a question 0": [_ok("1")] * 4}
    evaluate(Scripted(script), data, processor=processor, k=2, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match=r"k: stored 2 vs now 4"):
        evaluate(Scripted(script), data, processor=processor, k=4, out_dir=tmp_path, progress=False)
    assert json.loads((tmp_path / CONFIG_FILE).read_text())["k"] == 2


def test_raising_the_limit_samples_only_the_new_items(tiny, tmp_path):
    _, processor = tiny
    data = {"a": _records(["1", "2", "3"], "a")}
    script = {f"a question {i}": [_ok("1")] * 2 for i in range(3)}
    evaluate(Scripted(script), data, processor=processor, k=2, limit=1, out_dir=tmp_path, batch_size=1, progress=False)
    rec = Recording(Scripted(script))
    res = evaluate(rec, data, processor=processor, k=2, limit=3, out_dir=tmp_path, batch_size=1, progress=False)
    assert rec.questions == ["a question 1", "a question 2"]
    assert res.benchmarks["a"].n_items == 3 and res.benchmarks["a"].avg_at_k == pytest.approx(1 / 3)


def test_empty_answer_and_unreadable_image_are_counted_skips_not_zeros(tiny, tmp_path):
    """Counted under the reasons training uses (they used to be "empty answer" and "prompt: ValueError: ...")."""
    _, processor = tiny
    records = [
        *_records(["1"], "a"),
        Record(id="empty", question="a question e", images=[_image()], answer="  "),
        Record(id="noq", question="  ", images=[_image()], answer="1"),
        Record(id="badimg", question="a question b", images=[Image.new("RGB", (0, 0))], answer="1"),
        Record(id="placeholders", question="<image> and <image>", images=[_image()], answer="1"),
    ]
    script = {"a question 0": [_ok("1")] * 2}
    res = evaluate(Scripted(script), {"a": records}, processor=processor, k=2, out_dir=tmp_path, progress=False)
    b = res.benchmarks["a"]
    assert (b.n_items, b.n_skipped, b.avg_at_k) == (1, 4, 1.0)
    assert b.skipped == {"bad_prompt": 1, "empty_answer": 1, "empty_question": 1, "undecodable_image": 1}
    from vppo_rollout.images import SKIP_REASONS

    assert set(b.skipped) <= set(SKIP_REASONS)
    detail = {r["id"]: r.get("detail", "") for r in read_items(tmp_path / ITEMS_FILE)}
    assert "zero-size" in detail["badimg"] and "placeholder" in detail["placeholders"]


def test_unknown_benchmark_raises_before_sampling(tiny, tmp_path):
    _, processor = tiny
    rec = Recording(Scripted({}))
    with pytest.raises(ValueError, match="mathvista"):
        evaluate(rec, "geo3k,mathvista", processor=processor, data_dir=FIXTURES, out_dir=tmp_path, progress=False)
    assert rec.calls == 0 and not (tmp_path / ITEMS_FILE).exists()


def test_missing_benchmark_in_data_dir_names_the_expected_path(tiny, tmp_path):
    _, processor = tiny
    with pytest.raises(FileNotFoundError, match=r"geo3k\.parquet"):
        evaluate(Scripted({}), "geo3k", processor=processor, data_dir=tmp_path, protocol="raw", progress=False)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"k": 0}, "k=0"), ({"top_p": 0.0}, "top_p"), ({"temperature": 0.0}, "temperature"), ({"limit": 0}, "limit"),
     ({"batch_size": 0}, "batch_size"), ({"max_new_tokens": 0}, "max_new_tokens"),
     ({"format_weight": 2.0}, "format_weight")],
)  # fmt: skip
def test_bad_arguments_raise_naming_the_argument(tiny, kwargs, match):
    _, processor = tiny
    with pytest.raises(ValueError, match=match):
        evaluate(Scripted({}), {"a": _records(["1"])}, processor=processor, progress=False, **kwargs)


def test_duplicate_item_ids_raise(tiny):
    _, processor = tiny
    recs = _records(["1", "2"])
    recs[1] = Record(id=recs[0].id, question="x", images=[_image()], answer="2")
    with pytest.raises(ValueError, match="duplicate item ids"):
        evaluate(Scripted({}), {"a": recs}, processor=processor, progress=False)


def test_sampler_returning_too_few_responses_raises(tiny):
    _, processor = tiny

    class Short(Scripted):
        def sample(self, prompts, n, sampling):
            return super().sample(prompts, n - 1, sampling)

    with pytest.raises(RuntimeError, match="expected k=2"):
        evaluate(Short({"q question 0": [_ok("1")] * 2}), {"a": _records(["1"])}, processor=processor, k=2,
                 progress=False)  # fmt: skip


def test_records_from_rows_reads_the_synthetic_task_and_counts_bad_images(tiny, tmp_path):
    from vppo_eval.evaluate import records_from_rows
    from vppo_eval.synthetic import build_visual_task

    ds = build_visual_task(tmp_path / "task", n_train=0, n_test=4, seed=0)["test"]
    records, skipped = records_from_rows(ds)
    assert skipped == {} and len(records) == 4
    assert [r.id for r in records] == list(ds["id"]) and [r.answer for r in records] == list(ds["answer"])
    assert all(len(r.images) == 1 and r.images[0].mode == "RGB" for r in records)
    good = {"problem": "q", "answer": "3", "images": records[0].images[0]}  # a single image, not a list
    bad = [{"problem": "q", "answer": "1", "images": [b"not an image"]}, {"problem": "q", "answer": "2", "images": []}]
    recs, skipped = records_from_rows([*bad, good], id_column=None)
    assert skipped == {"undecodable_image": 1, "missing_image": 1}
    assert [(r.id, r.answer, len(r.images)) for r in recs] == [("2", "3", 1)]
    with pytest.raises(ValueError, match=r"no column\(s\) \['question'\]"):
        records_from_rows([{"problem": "q", "answer": "1", "images": []}], question="question")
    _, processor = tiny
    script = {r.question: [_ok(r.answer)] * 2 for r in records}
    res = evaluate(Scripted(script), {"synthetic": records}, processor=processor, k=2, progress=False)
    assert res.benchmarks["synthetic"].avg_at_k == 1.0
