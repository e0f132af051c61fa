"""Issue 14: the authors' sharegpt form, the two protocols, the release forms of LogicVista and DynaMath, MathVerse's
vision-dependent subset, and what a result records about its data."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vppo_eval.benchmarks import (
    BENCHMARK_NAMES,
    BENCHMARKS,
    fixture_path,
    items_sha256,
    load_benchmark,
    load_benchmark_report,
)
from vppo_eval.evaluate import benchmark_source, load_benchmark_reports

RAW = fixture_path("geo3k").parent
SHAREGPT = RAW / "sharegpt"


def test_every_benchmark_reads_from_the_sharegpt_fixtures_like_its_raw_kept_items():
    reports = load_benchmark_reports("all", data_dir=SHAREGPT, protocol="vppo")
    assert list(reports) == list(BENCHMARK_NAMES) and len(reports) == 8
    for name, rep in reports.items():
        raw = load_benchmark(name, fixture_path(name), protocol="raw")
        assert rep.data_form == "sharegpt" and not rep.skipped, name
        assert [r.answer for r in rep.records] == [r.answer for r in raw], name
        assert [r.question for r in rep.records] == [r.question for r in raw], name  # placeholders removed
        assert [[im.tobytes() for im in r.images] for r in rep.records] == [
            [im.tobytes() for im in r.images] for r in raw
        ], name
        summary = rep.summary()
        assert summary["items"] == len(raw) and summary["items_sha256"] == items_sha256(rep.records)
        # found through dataset_info.json, as PAPO-Eval lays its data out
        assert Path(summary["source"]).parent.name == "papo"
    # the files have no ids (rows are numbered): the hash still tells equal-sized item sets apart
    assert len({r.summary()["items_sha256"] for r in reports.values()}) == 8


def test_sharegpt_files_are_found_without_dataset_info_by_their_names(tmp_path):
    (tmp_path / "papo").mkdir()
    shutil.copy(SHAREGPT / "papo" / "hiyouga_geometry3k.json", tmp_path / "papo")
    shutil.copytree(SHAREGPT / "images", tmp_path / "images")
    assert benchmark_source(tmp_path, "geo3k", "vppo") == tmp_path / "papo" / "hiyouga_geometry3k.json"
    assert len(load_benchmark_reports("geo3k", data_dir=tmp_path, protocol="vppo")["geo3k"].records) == 3
    # a name not found: the names looked for and what the folder holds
    with pytest.raises(
        FileNotFoundError,
        match=r"no benchmark 'mmk12'.*names looked for: mmk12, PAPO_MMK12, FanqingM_MMK12 \(PAPO-Galaxy/PAPO_eval, "
        r"2,000 rows\).*holds: papo/hiyouga_geometry3k\.json",
    ):
        benchmark_source(tmp_path, "mmk12", "vppo")


def test_a_dataset_info_that_declares_another_form_is_refused_with_the_difference(tmp_path):
    shutil.copytree(SHAREGPT, tmp_path / "d")
    info = json.loads((tmp_path / "d" / "dataset_info.json").read_text())
    info["hiyouga_geometry3k"]["columns"]["messages"] = "dialog"  # neither 'messages' nor 'conversations'
    (tmp_path / "d" / "dataset_info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match=r"'hiyouga_geometry3k' is declared as .*dialog.*not the sharegpt form"):
        benchmark_source(tmp_path / "d", "geo3k", "vppo")


def _write(path: Path, rows) -> Path:
    path.write_text(json.dumps(rows))
    return path


def test_bad_sharegpt_items_are_skipped_and_counted_by_reason(tmp_path):
    shutil.copytree(SHAREGPT / "images", tmp_path / "images")
    good = json.loads((SHAREGPT / "papo" / "hiyouga_geometry3k.json").read_text())[0]
    rows = [
        good,
        {**good, "messages": [{"role": "user", "content": "Find x."}, good["messages"][1]]},  # 0 placeholders, 1 image
        {**good, "messages": [good["messages"][0], {"role": "assistant", "content": " "}]},  # empty answer
        {**good, "messages": [good["messages"][0]]},  # no assistant turn
        {**good, "images": ["images/nowhere.png"]},  # image file missing
    ]
    rep = load_benchmark_report("geo3k", _write(tmp_path / "g.json", rows), protocol="vppo")
    assert len(rep.records) == 1 and rep.n_rows == 5
    assert rep.skipped == {"bad_prompt": 1, "empty_answer": 2, "missing_image": 1}


def test_a_protocol_refuses_data_of_the_other_form():
    with pytest.raises(
        ValueError, match=r"own schema, but protocol 'vppo' scores the authors' item sets.*hiyouga_geometry3k"
    ):
        load_benchmark_report("geo3k", fixture_path("geo3k"), protocol="vppo")
    with pytest.raises(ValueError, match=r"sharegpt conversation file .* protocol 'vppo'"):
        load_benchmark_report("geo3k", SHAREGPT / "papo" / "hiyouga_geometry3k.json", protocol="raw")
    with pytest.raises(ValueError, match="protocol must be one of"):
        load_benchmark_report("geo3k", fixture_path("geo3k"), protocol="paper")


def _release(tmp_path: Path, name: str, folder: str, image_dir: str, rename: dict[str, str]) -> Path:
    """The raw fixture's rows as the GitHub release: one JSON object keyed by id, images as files."""
    import datasets

    rows = datasets.load_dataset("parquet", data_files=str(fixture_path(name)))["train"]
    root = tmp_path / name / folder
    (root / image_dir).mkdir(parents=True)
    out = {}
    for row in rows:  # decoded rows (PIL images)
        item = {rename.get(k, k): v for k, v in row.items() if k not in ("image", "decoded_image", "images")}
        item_id = str(item.pop("id"))
        image = row.get("decoded_image") or row.get("image")
        if isinstance(image, list):
            image = image[0]
        file = f"{item_id}.png"
        image.save(root / image_dir / file)
        item["imagename" if name == "logicvista" else "image"] = file if name == "logicvista" else f"{image_dir}/{file}"
        out[item_id] = item
    path = root / "dataset.json"
    path.write_text(json.dumps(out))
    return path


def test_logicvista_release_form_loads_like_the_hub_form(tmp_path):
    path = _release(tmp_path, "logicvista", "data", "images", {})
    rel = load_benchmark_report("logicvista", path, protocol="raw")
    hub = load_benchmark("logicvista", fixture_path("logicvista"), protocol="raw")
    assert [(r.id, r.answer, r.question) for r in rel.records] == [(r.id, r.answer, r.question) for r in hub]
    assert [r.images[0].tobytes() for r in rel.records] == [r.images[0].tobytes() for r in hub]


def test_dynamath_release_form_loads_and_its_answer_type_drives_the_filter(tmp_path):
    path = _release(tmp_path, "dynamath", "dataset", "images", {"ground_truth": "answer"})
    rel = load_benchmark_report("dynamath", path, protocol="raw")
    assert [(r.id, r.answer) for r in rel.records] == [("1", "B"), ("2", "0.5")]
    assert rel.skipped == {"not_exact_match": 1}  # the "free form" item
    # answer_type decides even where the answer's form alone would pass the regex
    data = json.loads(path.read_text())
    data["2"]["answer_type"] = "text"
    path.write_text(json.dumps(data))
    assert [r.id for r in load_benchmark("dynamath", path, protocol="raw")] == ["1"]


def test_mathverse_vision_dependent_subset_is_selectable_and_not_in_all():
    assert "mathverse_vision" in BENCHMARKS and "mathverse_vision" not in BENCHMARK_NAMES
    raw = load_benchmark_report("mathverse_vision", fixture_path("mathverse"), protocol="raw")
    # the fixture's versions: Text Dominant, Vision Only, Text Lite, Text Dominant
    assert [r.meta["problem_version"] for r in raw.records] == ["Vision Only"]
    assert raw.skipped == {"not_in_subset": 3}
    shared = load_benchmark_reports("mathverse_vision", data_dir=SHAREGPT, protocol="vppo")["mathverse_vision"]
    assert shared.source.endswith("AI4Math_MathVerse-vision-dependent.json") and len(shared.records) == 1


def test_committed_sharegpt_fixtures_are_what_the_builder_writes(tmp_path):
    from vppo_eval.fixtures.build import write_sharegpt_fixtures

    write_sharegpt_fixtures(tmp_path)
    committed = sorted(p.relative_to(SHAREGPT) for p in SHAREGPT.rglob("*") if p.is_file())
    assert committed == sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*") if p.is_file())
    for rel in committed:
        assert (SHAREGPT / rel).read_bytes() == (tmp_path / rel).read_bytes(), rel
