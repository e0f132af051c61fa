"""Local data files and folders: what `datasets` reads, and errors naming the file, the line and the fix."""

from __future__ import annotations

import json

import pytest
from PIL import Image

from vppo_eval.datafiles import load_data_file, load_data_folder

ROW = {"problem": "q", "answer": "1", "images": ["imgs/a.png"]}


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_an_empty_file_is_an_error_naming_it_not_a_bare_stop_iteration(tmp_path):
    (tmp_path / "train.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data.source='.*train.jsonl' is empty \(0 bytes\)"):
        load_data_file(tmp_path / "train.jsonl")


def test_a_file_of_blank_lines_has_no_rows(tmp_path):
    (tmp_path / "train.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"train.jsonl.*(has no rows|cannot be read)"):
        load_data_file(tmp_path / "train.jsonl")


def test_a_malformed_json_line_is_named_by_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROW) + "\n" + '{"problem": "q2", "answer": 2\n' + json.dumps(ROW) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl' cannot be read as json: line 2, column \d+: Expecting"):
        load_data_file(path)


def test_a_json_line_that_is_not_an_object_is_named(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text(json.dumps(ROW) + "\n[1, 2]\n")
    with pytest.raises(ValueError, match=r"line 2 is a JSON list, not an object"):
        load_data_file(path)


def test_a_whole_json_document_that_is_cut_is_named_with_its_line(tmp_path):
    path = tmp_path / "train.json"
    path.write_text('[\n  {"problem": "q", "answer": "1"},\n  {"problem": "q2", "ans')
    with pytest.raises(ValueError, match=r"train.json' cannot be read as json: .*line 3"):
        load_data_file(path)


def test_a_truncated_parquet_file_says_so(tmp_path):
    import datasets

    datasets.Dataset.from_list([{"problem": "q", "answer": "1"}] * 50).to_parquet(str(tmp_path / "full.parquet"))
    data = (tmp_path / "full.parquet").read_bytes()
    (tmp_path / "cut.parquet").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"cut.parquet' cannot be read as parquet: not a readable parquet file"):
        load_data_file(tmp_path / "cut.parquet")


def test_an_unsupported_suffix_lists_the_supported_ones(tmp_path):
    (tmp_path / "train.txt").write_text("x")
    with pytest.raises(ValueError, match=r"suffix '.txt'; supported files: .arrow, .csv, .json, .jsonl, .parquet"):
        load_data_file(tmp_path / "train.txt")


def test_a_folder_with_one_jsonl_and_a_folder_of_images_is_read_as_the_jsonl(tmp_path):
    """datasets alone infers an image folder (the PNGs outnumber the JSONL) and returns only an `image` column."""
    (tmp_path / "imgs").mkdir()
    for i in range(5):
        Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / f"{i}.png")
    _jsonl(tmp_path / "data.jsonl", [ROW, ROW])
    loaded = load_data_folder(tmp_path)
    assert list(loaded) == ["train"] and loaded["train"].column_names == ["problem", "answer", "images"]
    assert len(loaded["train"]) == 2


def test_a_folder_splits_files_by_name_and_refuses_mixed_kinds_and_empty_files(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [ROW] * 3)
    _jsonl(tmp_path / "test.jsonl", [ROW])
    loaded = load_data_folder(tmp_path)
    assert {k: len(v) for k, v in loaded.items()} == {"train": 3, "test": 1}
    (tmp_path / "train.csv").write_text("problem,answer\nq,1\n")
    with pytest.raises(ValueError, match=r"mixes data file kinds \(csv, json\)"):
        load_data_folder(tmp_path)
    (tmp_path / "train.csv").unlink()
    (tmp_path / "validation.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"empty data file\(s\).*validation.jsonl"):
        load_data_folder(tmp_path)


def test_a_folder_without_data_files_says_what_to_point_at(tmp_path):
    (tmp_path / "imgs").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "imgs" / "a.png")
    with pytest.raises(ValueError, match=r"holds no data file .*point data.source at a data file"):
        load_data_folder(tmp_path)


def test_a_bad_file_inside_a_folder_is_named(tmp_path):
    _jsonl(tmp_path / "train.jsonl", [ROW])
    (tmp_path / "test.jsonl").write_text(json.dumps(ROW) + "\n{oops\n")
    with pytest.raises(ValueError, match=r"test.jsonl' cannot be read as json: line 2"):
        load_data_folder(tmp_path)


def test_a_folder_under_a_hidden_folder_is_read_and_hidden_sub_folders_are_ignored(tmp_path, monkeypatch):
    """CI runs under .nox/…/tmp: a hidden *parent* must not hide the files (a filter on "/." in the absolute path
    did); a hidden sub-folder of the data folder (.cache) is still not data. Relative paths work too."""
    folder = tmp_path / ".venv" / "tmp" / "task"
    folder.mkdir(parents=True)
    _jsonl(folder / "train.jsonl", [ROW] * 3)
    (folder / ".cache").mkdir()
    _jsonl(folder / ".cache" / "train.jsonl", [ROW] * 5)
    assert {k: len(v) for k, v in load_data_folder(folder).items()} == {"train": 3}
    monkeypatch.chdir(tmp_path / ".venv")
    assert {k: len(v) for k, v in load_data_folder("tmp/task").items()} == {"train": 3}
