"""Issue 23, "Rows read as written": a field that mixes numbers and text, sharegpt content as a list of parts, and
sharegpt's from/value turns are read as the file holds them (or the file is refused, named), never as JSON text or a
Python repr."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from vppo_eval.benchmarks import fixture_path, load_benchmark_report
from vppo_eval.reward import compute_rewards

SHAREGPT = fixture_path("geo3k").parent / "sharegpt"
GOOD = json.loads((SHAREGPT / "papo" / "hiyouga_geometry3k.json").read_text())[0]


def _write(folder: Path, rows) -> Path:
    shutil.copytree(SHAREGPT / "images", folder / "images", dirs_exist_ok=True)
    path = folder / "g.json"
    path.write_text(json.dumps(rows))
    return path


def _turns(question, answer, spelling=("role", "content", "user", "assistant")):
    role, content, user, assistant = spelling
    return [{role: user, content: question}, {role: assistant, content: answer}]


def _score(answer: str, response: str) -> float:
    return float(compute_rewards([response], [answer])["accuracy"][0])


def test_a_sharegpt_answer_column_mixing_numbers_and_text_reads_every_answer_as_written(tmp_path):
    """One `"content": 3` among strings made `datasets` store the column as Json: read through Arrow every string
    came back quoted ('"red"'), and a correct \\boxed{red} scored 0."""
    rows = [
        {**GOOD, "messages": _turns("<image>What colour is the shape?", "red")},
        {**GOOD, "messages": _turns("<image>How many sides?", 3)},
    ]
    rep = load_benchmark_report("geo3k", _write(tmp_path, rows), protocol="vppo")
    assert [r.answer for r in rep.records] == ["red", "3"]
    assert [r.question for r in rep.records] == ["What colour is the shape?", "How many sides?"]
    assert _score(rep.records[0].answer, "<think>it is red</think> \\boxed{red}") == 1.0
    assert _score(rep.records[1].answer, "<think>three</think> \\boxed{3}") == 1.0


def test_sharegpt_content_as_a_list_of_parts_is_read_as_its_text_with_image_placeholders(tmp_path):
    parts_q = [{"type": "image"}, {"type": "text", "text": "What colour is "}, {"type": "text", "text": "the shape?"}]
    rows = [
        {**GOOD, "messages": _turns(parts_q, [{"type": "text", "text": "red"}])},
        {**GOOD, "messages": _turns(parts_q, "blue")},  # text in one turn, parts in another: a Json column
        {**GOOD, "messages": _turns([{"type": "text", "text": "No image placeholder"}], "red")},
    ]
    rep = load_benchmark_report("geo3k", _write(tmp_path, rows), protocol="vppo")
    assert [(r.question, r.answer) for r in rep.records] == [
        ("What colour is the shape?", "red"),
        ("What colour is the shape?", "blue"),
    ]
    assert rep.skipped == {"bad_prompt": 1}  # the image part is the placeholder: none there, one image


def test_sharegpt_content_parts_of_an_unknown_kind_refuse_the_file_naming_it_and_the_row(tmp_path):
    rows = [
        {**GOOD, "messages": _turns("<image>Find x.", "3")},
        {**GOOD, "messages": _turns([{"type": "image_url", "image_url": "x.png"}, {"type": "text", "text": "?"}], "3")},
    ]
    path = _write(tmp_path, rows)
    with pytest.raises(ValueError, match=rf"{path}'?, row 1 .*'image_url'.*neither"):
        load_benchmark_report("geo3k", path, protocol="vppo")


@pytest.mark.parametrize("column", ["conversations", "messages"])
def test_sharegpt_from_value_turns_are_read(tmp_path, column):
    """LLaMA-Factory's default sharegpt spelling: {"from": "human"|"gpt", "value": ...} turns, under
    `conversations` or under `messages`; every item was counted as empty_question."""
    spelling = ("from", "value", "human", "gpt")
    rows = [
        {column: _turns("<image>What colour is the shape?", "red", spelling), "images": GOOD["images"]},
        {column: _turns("<image>How many sides?", "3", spelling), "images": GOOD["images"]},
    ]
    rep = load_benchmark_report("geo3k", _write(tmp_path, rows), protocol="vppo")
    assert rep.data_form == "sharegpt" and not rep.skipped
    assert [(r.question, r.answer) for r in rep.records] == [
        ("What colour is the shape?", "red"),
        ("How many sides?", "3"),
    ]


def test_sharegpt_turns_in_neither_spelling_refuse_the_file_naming_it(tmp_path):
    rows = [{**GOOD, "messages": [{"speaker": "user", "text": "<image>Find x."}, {"speaker": "bot", "text": "3"}]}]
    path = _write(tmp_path, rows)
    with pytest.raises(ValueError, match=rf"{path}'?, row 0 .*keys \['speaker', 'text'\]"):
        load_benchmark_report("geo3k", path, protocol="vppo")


def test_a_dataset_info_declaring_llama_factory_default_tags_is_read(tmp_path):
    """A declaration without tags means LLaMA-Factory's from/value/human/gpt: found and read, not refused."""
    from vppo_eval.evaluate import load_benchmark_reports

    spelling = ("from", "value", "human", "gpt")
    (tmp_path / "papo").mkdir()
    rows = [{"conversations": _turns("<image>Find x.", 3, spelling), "images": GOOD["images"]}]
    (tmp_path / "papo" / "g.json").write_text(json.dumps(rows))
    shutil.copytree(SHAREGPT / "images", tmp_path / "images")
    info = {
        "hiyouga_geometry3k": {"file_name": "papo/g.json", "formatting": "sharegpt", "columns": {"images": "images"}}
    }
    (tmp_path / "dataset_info.json").write_text(json.dumps(info))
    rep = load_benchmark_reports("geo3k", data_dir=tmp_path, protocol="vppo")["geo3k"]
    assert [(r.question, r.answer) for r in rep.records] == [("Find x.", "3")]


def test_a_jsonl_column_mixing_numbers_and_text_is_read_as_written(tmp_path):
    """The raw form read by the same reader: an MMK12 JSON Lines copy whose answers mix letters and numbers."""
    shutil.copytree(SHAREGPT / "images", tmp_path / "images")
    image = "images/PAPO_MMK12/math_0_0.png"
    rows = [{"question": "Which? A. 1 B. 2", "answer": "B", "image": image}, {"question": "How many?", "answer": 3,
            "image": image}, {"question": "How long?", "answer": 2.5, "image": image}]  # fmt: skip
    (tmp_path / "mmk12.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    rep = load_benchmark_report("mmk12", tmp_path / "mmk12.jsonl", protocol="raw")
    assert [r.answer for r in rep.records] == ["B", "3", "2.5"]
    assert _score(rep.records[0].answer, "<think>b</think> \\boxed{B}") == 1.0


def test_a_keyed_json_release_whose_items_mix_numbers_and_text_is_read_as_written(tmp_path):
    """LogicVista's GitHub release form (one object keyed by id): an answer that is a number in one item and text
    in another was refused as "items do not share one schema"; it is read like a JSON Lines file of the same rows."""
    shutil.copytree(SHAREGPT / "images" / "lscpku_LogicVista", tmp_path / "images")
    image = sorted(p.name for p in (tmp_path / "images").iterdir())[0]
    release = {"1": {"question": "Which?", "answer": "A", "imagename": image},
               "2": {"question": "Select from 1-5.", "answer": 3, "imagename": image}}  # fmt: skip
    (tmp_path / "dataset.json").write_text(json.dumps(release))
    rep = load_benchmark_report("logicvista", tmp_path / "dataset.json", protocol="raw")
    assert [(r.id, r.answer) for r in rep.records] == [("1", "A"), ("2", "3")]


def test_a_sharegpt_images_column_mixing_one_path_and_lists_reads_the_path_as_one_image(tmp_path):
    """`"images": "images/x.png"` in one item and a list in the others: a Json column; the string is one image (it
    was read as JSON text, then as a list of its characters: `bad_prompt`)."""
    rows = [{**GOOD, "images": GOOD["images"][0]}, GOOD]
    rep = load_benchmark_report("geo3k", _write(tmp_path, rows), protocol="vppo")
    assert len(rep.records) == 2 and not rep.skipped
    assert rep.records[0].images[0].tobytes() == rep.records[1].images[0].tobytes()


def test_a_text_field_holding_a_list_refuses_the_file_naming_it_and_the_row(tmp_path):
    """An answer that is a list in one row (text in the others): it has no text to grade against; it was graded
    against its Python repr "['A', 'C']", which no response matches."""
    shutil.copytree(SHAREGPT / "images", tmp_path / "images")
    image = "images/PAPO_MMK12/math_0_0.png"
    rows = [{"question": "Which?", "answer": "B", "image": image}, {"question": "Which two?", "answer": ["A", "C"],
            "image": image}]  # fmt: skip
    path = tmp_path / "mmk12.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(ValueError, match=rf"{path}'?, row 1 .*a text field holds a list: \['A', 'C'\].*raw schema"):
        load_benchmark_report("mmk12", path, protocol="raw")
