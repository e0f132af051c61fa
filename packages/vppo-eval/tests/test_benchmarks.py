"""Every benchmark loader on its fixture (raw schema, real PNGs), the exact-match filter, and bad input."""

from __future__ import annotations

import io
import json
import shutil

import pyarrow.parquet as pq
import pytest
from PIL import Image

from vppo_eval.benchmarks import (
    BENCHMARK_NAMES,
    BenchmarkUnavailableError,
    decode_image,
    fixture_path,
    get_benchmark,
    is_exact_match_answer,
    load_benchmark,
    load_benchmark_report,
    resolve_benchmark_names,
)
from vppo_eval.fixtures.build import draw_png, write_fixtures
from vppo_eval.records import Record
from vppo_eval.reward import grade

# name -> (rows in the fixture, records kept, skipped by reason)
EXPECTED = {
    "mathverse": (4, 3, {"not_exact_match": 1}),
    "dynamath": (3, 2, {"not_exact_match": 1}),
    "mmk12": (3, 3, {}),
    "geo3k": (3, 3, {}),
    "mathvision": (4, 3, {"not_exact_match": 1}),
    "wemath": (3, 3, {}),
    "logicvista": (3, 3, {}),
    "mmmu_pro": (3, 3, {}),
}


def test_registry_has_the_eight_paper_benchmarks_in_table_order():
    assert BENCHMARK_NAMES == tuple(EXPECTED)
    hub_ids = {name: get_benchmark(name).hf_id for name in BENCHMARK_NAMES}
    assert hub_ids == {
        "mathverse": "AI4Math/MathVerse",
        "dynamath": "DynaMath/DynaMath_Sample",
        "mmk12": "FanqingM/MMK12",
        "geo3k": "hiyouga/geometry3k",
        "mathvision": "MathLLMs/MathVision",
        "wemath": "We-Math/We-Math",
        "logicvista": "lscpku/LogicVista",
        "mmmu_pro": "MMMU/MMMU_Pro",
    }
    assert {n for n in BENCHMARK_NAMES if get_benchmark(n).exact_match_only} == {"mathverse", "mathvision", "dynamath"}


@pytest.mark.parametrize("name", BENCHMARK_NAMES)
def test_loader_normalises_its_fixture_into_valid_records(name):
    report = load_benchmark_report(name, fixture_path(name))
    n_rows, n_kept, skipped = EXPECTED[name]
    assert (report.n_rows, len(report.records), report.skipped) == (n_rows, n_kept, skipped)
    assert report.n_skipped == n_rows - n_kept
    ids = [r.id for r in report.records]
    assert len(set(ids)) == len(ids)
    for record in report.records:
        assert isinstance(record, Record)
        assert record.question.strip() and record.answer.strip()
        assert "<image>" not in record.question
        assert record.images and all(isinstance(im, Image.Image) and im.mode == "RGB" for im in record.images)
        assert all(im.size == (48, 48) for im in record.images)
        # The ground truth is gradable by the reward: a response boxing it scores 1.
        assert grade(f"<think>t</think>\\boxed{{{record.answer}}}", record.answer) == 1.0


def test_geo3k_strips_the_image_placeholder_and_keeps_choices():
    first = load_benchmark("geo3k", fixture_path("geo3k"))[0]
    assert first.question == "Find x."
    assert first.choices == ["3", "4", "5", "6"]
    assert first.answer == "5"
    assert first.meta["ground_truth"] == "C"


def test_geo3k_transparent_png_is_composited_on_white():
    third = load_benchmark("geo3k", fixture_path("geo3k"))[2]
    assert third.images[0].getpixel((0, 0)) == (255, 255, 255)


def test_wemath_parses_the_option_string_into_choices():
    first = load_benchmark("wemath", fixture_path("wemath"))[0]
    assert first.choices == ["30°", "45°", "60°", "90°", "No correct answer"]
    assert first.question.endswith("(A) 30°\n(B) 45°\n(C) 60°\n(D) 90°\n(E) No correct answer")
    assert first.id == "1steps_1"
    assert first.meta["knowledge concept"] == "Angles"


def test_mathverse_uses_question_for_eval_and_drops_free_form_expressions():
    records = {r.id: r for r in load_benchmark("mathverse", fixture_path("mathverse"))}
    assert set(records) == {"1", "2", "3"}  # "4" (answer y=2x+1) is filtered
    assert records["2"].question.startswith("According to the question shown in the image")
    assert records["1"].meta["problem_version"] == "Text Dominant"


def test_mathvision_strips_image_tags_and_does_not_list_picture_only_option_letters():
    first = load_benchmark("mathvision", fixture_path("mathvision"))[0]
    assert first.question.startswith("Which of the shapes")
    # the options are drawn in the picture: the row's options are the bare letters, "(E) E" would add nothing
    assert "(E) E" not in first.question and "Options:" not in first.question and "<image1>" not in first.question
    assert first.choices == ["A", "B", "C", "D", "E"]


def test_mathvision_lists_options_that_have_text():
    from vppo_eval.benchmarks import BENCHMARKS

    row = {"id": "7", "question": "<image1> Which is largest?", "options": ["2", "3", "5"], "answer": "C",
           "image": None, "decoded_image": _png_bytes()}  # fmt: skip
    rec = BENCHMARKS["mathvision"].normalize(row, 0, None)
    assert rec.question == "Which is largest?\nOptions:\n(A) 2\n(B) 3\n(C) 5" and rec.choices == ["2", "3", "5"]


def _png_bytes() -> dict:
    import io

    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 10, 10)).save(buf, format="PNG")
    return {"bytes": buf.getvalue(), "path": None}


def test_dynamath_reads_ground_truth_and_filters_free_form():
    records = load_benchmark("dynamath", fixture_path("dynamath"))
    assert [(r.id, r.answer) for r in records] == [("1", "B"), ("2", "0.5")]


def test_logicvista_multi_letter_answer_is_order_insensitive():
    second = load_benchmark("logicvista", fixture_path("logicvista"))[1]
    assert second.answer == "A, C"
    assert grade("<think>t</think>\\boxed{C, A}", second.answer) == 1.0
    assert grade("<think>t</think>\\boxed{A}", second.answer) == 0.0


def test_mmmu_pro_collects_all_images_and_lists_ten_options():
    records = load_benchmark("mmmu_pro", fixture_path("mmmu_pro"))
    assert [len(r.images) for r in records] == [1, 2, 1]
    assert records[0].question.startswith("<image 1> What is")
    assert records[0].question.endswith("(J) 10")
    assert records[1].choices == ["The first", "The second", "They are equal", "Cannot be determined"]


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", True),
        ("A, C", True),
        ("12", True),
        ("-3.5", True),
        ("1/2", True),
        ("\\frac{1}{2}", True),
        ("1,000", True),
        ("30°", True),
        ("30^\\circ", True),
        ("45%", True),
        ("2\\sqrt{3}", False),
        ("y=2x+1", False),
        ("(1, 2)", False),
        ("\\pi", False),
        ("12 cm", False),
        ("", False),
    ],
)
def test_exact_match_filter_keeps_letters_and_plain_numbers(answer, expected):
    assert is_exact_match_answer(answer) is expected


def test_limit_counts_kept_records_after_filtering():
    report = load_benchmark_report("mathverse", fixture_path("mathverse"), limit=2)
    assert [r.id for r in report.records] == ["1", "2"]
    assert load_benchmark("geo3k", fixture_path("geo3k"), limit=0) == []
    with pytest.raises(ValueError, match="limit"):
        load_benchmark("geo3k", fixture_path("geo3k"), limit=-1)


def test_names_are_resolved_case_and_dash_insensitively():
    assert get_benchmark("We-Math").name == "wemath"
    assert get_benchmark("MMMU-Pro").name == "mmmu_pro"
    assert get_benchmark("Geometry3K").name == "geo3k"
    assert resolve_benchmark_names("all") == list(BENCHMARK_NAMES)
    assert resolve_benchmark_names("geo3k, MathVerse,geo3k") == ["geo3k", "mathverse"]


def test_unknown_benchmark_is_a_value_error_with_a_suggestion():
    with pytest.raises(ValueError, match=r"unknown benchmark 'mathvista'.*Did you mean 'mathvision'"):
        get_benchmark("mathvista")
    with pytest.raises(ValueError, match="unknown benchmark"):
        load_benchmark("nope", fixture_path("geo3k"))
    with pytest.raises(ValueError, match="at least one"):
        resolve_benchmark_names("")


def _rewrite_parquet(src, dst, edit):
    """Copy a fixture with one column edited: edit(table) -> table."""
    table = pq.read_table(src)
    pq.write_table(edit(table), dst)
    return dst


def test_missing_column_is_an_error_naming_it(tmp_path):
    path = _rewrite_parquet(fixture_path("geo3k"), tmp_path / "geo3k.parquet", lambda t: t.drop_columns(["answer"]))
    with pytest.raises(ValueError, match=r"lacks column\(s\) 'answer'"):
        load_benchmark("geo3k", path)
    with pytest.raises(ValueError, match=r"'decoded_image' or 'image'"):
        load_benchmark(
            "mathvision",
            _rewrite_parquet(
                fixture_path("mathvision"),
                tmp_path / "mv.parquet",
                lambda t: t.drop_columns(["image", "decoded_image"]),
            ),
        )


def test_undecodable_image_and_empty_answer_are_counted_skips(tmp_path):
    import pyarrow as pa

    def corrupt(table):
        images = table.column("images").to_pylist()
        images[0] = [{"bytes": b"not a png at all", "path": None}]
        images[2] = []
        answers = table.column("answer").to_pylist()
        answers[1] = "  "
        table = table.set_column(
            table.schema.get_field_index("images"), "images", pa.array(images, type=table.schema.field("images").type)
        )
        return table.set_column(table.schema.get_field_index("answer"), "answer", pa.array(answers))

    path = _rewrite_parquet(fixture_path("geo3k"), tmp_path / "bad.parquet", corrupt)
    # keep the Hugging Face feature metadata so `images` is still read as List(Image())
    meta = pq.read_schema(fixture_path("geo3k")).metadata
    pq.write_table(pq.read_table(path).replace_schema_metadata(meta), path)
    report = load_benchmark_report("geo3k", path)
    assert report.records == []
    assert report.skipped == {"undecodable_image": 1, "empty_answer": 1, "missing_image": 1}


def test_bad_mmmu_options_are_a_counted_skip(tmp_path):
    import pyarrow as pa

    def corrupt(table):
        options = table.column("options").to_pylist()
        options[0] = "['unterminated"
        return table.set_column(table.schema.get_field_index("options"), "options", pa.array(options))

    meta = pq.read_schema(fixture_path("mmmu_pro")).metadata
    path = tmp_path / "mmmu.parquet"
    pq.write_table(corrupt(pq.read_table(fixture_path("mmmu_pro"))).replace_schema_metadata(meta), path)
    report = load_benchmark_report("mmmu_pro", path)
    assert (len(report.records), report.skipped) == (2, {"bad_options": 1})


def test_offline_hub_load_says_which_files_to_place_where(monkeypatch):
    import datasets

    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach 'hiyouga/geometry3k' on the Hub (OfflineModeIsEnabled)")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(BenchmarkUnavailableError) as info:
        load_benchmark("geo3k")
    message = str(info.value)
    assert "hiyouga/geometry3k" in message and "huggingface-cli download" in message
    assert "source=" in message and "[images, problem, answer]" in message and "'test'" in message


def test_missing_local_path_and_unknown_extension_are_value_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        load_benchmark("geo3k", str(tmp_path / "nothing_here.parquet"))
    odd = tmp_path / "data.txt"
    odd.write_text("x")
    with pytest.raises(ValueError, match=r"suffix '\.txt'; supported files"):
        load_benchmark("geo3k", odd)


def test_hub_snapshot_folder_with_split_files_loads_the_registry_split(tmp_path):
    (tmp_path / "data").mkdir()
    shutil.copy(fixture_path("geo3k"), tmp_path / "data" / "test-00000-of-00001.parquet")
    shutil.copy(fixture_path("geo3k"), tmp_path / "data" / "train-00000-of-00001.parquet")
    records = load_benchmark("geo3k", tmp_path)
    assert [r.id for r in records] == ["0", "1", "2"]
    with pytest.raises(ValueError, match=r"has splits \['test', 'train'\], not 'validation'"):
        load_benchmark("geo3k", tmp_path, split="validation")


def test_save_to_disk_folder_loads(tmp_path):
    import datasets

    datasets.load_dataset("parquet", data_files=str(fixture_path("logicvista")), split="train").save_to_disk(
        str(tmp_path / "lv")
    )
    assert [r.answer for r in load_benchmark("logicvista", tmp_path / "lv")] == ["C", "A, C", "3"]


def test_jsonl_with_relative_image_paths_resolves_them_next_to_the_file(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "1.png").write_bytes(draw_png("7"))
    rows = [
        {"id": "1", "question": "How many?", "options": [], "image": "images/1.png", "answer": "7"},
        {"id": "2", "question": "Gone?", "options": [], "image": "images/missing.png", "answer": "1"},
    ]
    path = tmp_path / "mathvision.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    report = load_benchmark_report("mathvision", path)
    assert [r.id for r in report.records] == ["1"] and report.skipped == {"missing_image": 1}
    assert report.records[0].images[0].size == (48, 48)


def test_decode_image_accepts_pil_bytes_dicts_and_rejects_junk(tmp_path):
    png = draw_png("x")
    assert decode_image(Image.open(io.BytesIO(png))).mode == "RGB"
    assert decode_image(png).size == (48, 48)
    assert decode_image({"bytes": png, "path": None}).size == (48, 48)
    from vppo_eval.benchmarks import SkipRow

    for junk, reason in [
        (b"junk", "undecodable_image"),
        (None, "missing_image"),
        ({"bytes": None, "path": None}, "missing_image"),
    ]:
        with pytest.raises(SkipRow) as info:
            decode_image(junk)
        assert info.value.reason == reason


def test_committed_fixtures_match_the_generator(tmp_path):
    write_fixtures(tmp_path)
    for name in BENCHMARK_NAMES:
        committed = load_benchmark(name, fixture_path(name))
        regenerated = load_benchmark(name, tmp_path / f"{name}.parquet")
        assert [(r.id, r.question, r.answer, r.choices) for r in committed] == [
            (r.id, r.question, r.answer, r.choices) for r in regenerated
        ]
        assert [[im.tobytes() for im in r.images] for r in committed] == [
            [im.tobytes() for im in r.images] for r in regenerated
        ]


def test_truncated_image_is_undecodable_not_lazy(tmp_path):
    from vppo_eval.benchmarks import SkipRow

    png = draw_png("x", size=64)
    with pytest.raises(SkipRow) as info:
        decode_image(png[: len(png) // 2])
    assert info.value.reason == "undecodable_image"


def test_rgb_images_stay_compressed_until_used():
    buffer = io.BytesIO()
    Image.new("RGB", (32, 32), (10, 20, 30)).save(buffer, format="PNG")
    image = decode_image(buffer.getvalue())
    assert image.mode == "RGB" and image._im is None  # pixels not decoded yet (PIL-private attribute)
    assert image.getpixel((0, 0)) == (10, 20, 30)


def test_geo3k_with_letter_answers_shows_the_options(tmp_path):
    # Guards the unconfirmed reading of hiyouga/geometry3k: if `answer` held the letter, the options must be shown.
    table = pq.read_table(fixture_path("geo3k"))
    letters = table.set_column(table.schema.get_field_index("answer"), "answer", table.column("ground_truth"))
    path = tmp_path / "geo3k_letters.parquet"
    pq.write_table(letters.replace_schema_metadata(table.schema.metadata), path)
    first = load_benchmark("geo3k", path)[0]
    assert first.answer == "C"
    assert first.question == "Find x.\nOptions:\n(A) 3\n(B) 4\n(C) 5\n(D) 6"


def test_logicvista_accepts_an_images_list_column(tmp_path):
    import pyarrow as pa

    table = pq.read_table(fixture_path("logicvista"))
    image = table.column("image")
    as_list = table.drop_columns(["image"]).append_column(
        "images", pa.array([[cell] for cell in image.to_pylist()], type=pa.list_(image.type))
    )
    path = tmp_path / "lv.parquet"
    pq.write_table(as_list, path)  # no HF metadata: images come back as {"bytes", "path"} structs
    records = load_benchmark("logicvista", path)
    assert [r.answer for r in records] == ["C", "A, C", "3"]
    assert [len(r.images) for r in records] == [1, 1, 1] and records[0].images[0].size == (48, 48)


def test_mmk12_keeps_inline_options_and_parses_them_into_choices():
    records = load_benchmark("mmk12", fixture_path("mmk12"))
    assert records[0].question.endswith("A. 40°\nB. 70°\nC. 80°\nD. 140°")
    assert records[0].choices == ["40°", "70°", "80°", "140°"]
    assert records[2].choices == ["O$_2$", "H$_2$", "NH$_3$", "CH$_4$"]  # "A、" style
    assert [r.answer for r in records] == ["B", "B", "A"]
