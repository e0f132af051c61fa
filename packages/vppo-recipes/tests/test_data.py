"""Data loading: every source kind, the column mapping, counted skips of bad rows, a resumable shared order."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from vppo_recipes.data import (
    ExampleStream,
    PromptIterator,
    SkipRow,
    VisualQADataset,
    build_response,
    load_source,
    rank_slice,
)

sys.path.insert(0, str(Path(__file__).parent))
from _bad_rows import write_rows

FEATURES = datasets.Features(
    {
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
    }
)


def _png(color: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.full((8, 8, 3), color, dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _dataset(n: int = 6, *, bad: bool = False) -> datasets.Dataset:
    """n good rows (answer = str(i)); with `bad`, three extra rows: no image, undecodable image, empty answer."""
    rows = {
        "problem": [f"How many? {i}" for i in range(n)],
        "answer": [str(i) for i in range(n)],
        "images": [[{"bytes": _png(i * 10), "path": None}] for i in range(n)],
    }
    if bad:
        rows["problem"] += ["no image", "broken image", "empty answer"]
        rows["answer"] += ["1", "2", "  "]
        rows["images"] += [[], [{"bytes": b"not a png", "path": None}], [{"bytes": _png(1), "path": None}]]
    return datasets.Dataset.from_dict(rows, features=FEATURES)


def test_save_to_disk_folder_loads_the_requested_split(tmp_path):
    datasets.DatasetDict({"train": _dataset(4), "test": _dataset(2)}).save_to_disk(tmp_path / "dd")
    assert len(load_source(tmp_path / "dd", "test")) == 2
    with pytest.raises(ValueError, match=r"data.split='val' not found .* available splits: \['train', 'test'\]"):
        load_source(tmp_path / "dd", "val")


def test_parquet_file_and_folder_of_parquet_splits_load(tmp_path):
    _dataset(5).to_parquet(str(tmp_path / "one.parquet"))
    ds = load_source(tmp_path / "one.parquet", "train")
    assert len(ds) == 5
    folder = tmp_path / "pq"
    folder.mkdir()
    _dataset(3).to_parquet(str(folder / "train.parquet"))
    _dataset(2).to_parquet(str(folder / "test.parquet"))
    assert len(load_source(folder, "test")) == 2
    ex = VisualQADataset.from_source(folder, "train").example(1)
    assert ex.answer == "1" and ex.images[0].mode == "RGB" and ex.images[0].size == (8, 8)


def test_jsonl_with_relative_image_paths_resolves_them_against_the_file(tmp_path):
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    (tmp_path / "d.jsonl").write_text(json.dumps({"q": "what?", "a": "7", "img": ["a.png"]}) + "\n")
    ds = VisualQADataset.from_source(tmp_path / "d.jsonl", "train", {"question": "q", "answer": "a", "images": "img"})
    ex = ds.example(0)
    assert (ex.question, ex.answer, ex.images[0].size) == ("what?", "7", (4, 4))


def test_missing_local_source_is_an_error_naming_data_source(tmp_path):
    with pytest.raises(ValueError, match=r"data\.source='.*nothing' does not exist"):
        load_source(tmp_path / "nothing", "train")


def test_hub_like_source_that_is_not_local_and_not_reachable_is_an_error(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    with pytest.raises(ValueError, match=r"data\.source='runs/visual_task' is neither a local folder/file"):
        load_source("runs/visual_task", "train")


def test_missing_column_names_the_columns_present_and_the_key_to_set():
    ds = _dataset(2).rename_column("problem", "question")
    with pytest.raises(ValueError) as info:
        VisualQADataset(ds)
    msg = str(info.value)
    assert "column 'problem' (the question column) is not in the dataset" in msg
    assert "['question', 'answer', 'images']" in msg
    assert "Set data.columns.question=" in msg
    assert VisualQADataset(ds, {"question": "question"}).example(0).question == "How many? 0"


def test_a_methods_extra_columns_reach_each_example_and_a_missing_one_is_named():
    """`Method.data_columns` (VAPO's claims): kept per row as the dataset holds them; a dataset without one is refused
    naming the column, who needs it, the columns present and the fix."""
    ds = _dataset(2).add_column("claim_1", ["a", "b"]).add_column("label_1", ["CORRECT", "WRONG"])
    example = VisualQADataset(ds, extra_columns=("claim_1", "label_1")).example(1)
    assert example.extra == {"claim_1": "b", "label_1": "WRONG"}
    assert VisualQADataset(ds).example(1).extra == {}  # none asked: none kept
    with pytest.raises(ValueError) as info:
        VisualQADataset(_dataset(2), extra_columns=("claim_1", "label_1"), needed_by="algorithm vapo", source="x")
    msg = str(info.value)
    assert "algorithm vapo needs the dataset column 'claim_1' (and 1 more of the 2 it reads), which x lacks" in msg
    assert "columns present: ['problem', 'answer', 'images']" in msg and "Use a dataset with those columns" in msg


@pytest.mark.parametrize(("row", "reason"), [(6, "missing_image"), (7, "undecodable_image"), (8, "empty_answer")])
def test_bad_row_raises_skiprow_with_its_reason(row, reason):
    with pytest.raises(SkipRow) as info:
        VisualQADataset(_dataset(6, bad=True)).example(row)
    assert info.value.reason == reason


def test_stream_skips_bad_rows_and_counts_each_reason():
    stream = ExampleStream(VisualQADataset(_dataset(6, bad=True)), seed=0)
    got = stream.take(12)  # 2 epochs of the 6 good rows, the 3 bad rows skipped twice each
    assert sorted(int(e.answer) for e in got) == sorted(list(range(6)) * 2)
    assert dict(stream.skipped) == {"missing_image": 2, "undecodable_image": 2, "empty_answer": 2}
    assert stream.drawn == 18


def test_stream_returns_what_prepare_makes_and_counts_its_skips_under_their_reason():
    def prepare(example):
        if example.answer == "3":
            raise SkipRow("prompt_too_long")
        return ("prepared", example.row, example.answer)

    stream = ExampleStream(VisualQADataset(_dataset(6)), seed=0, prepare=prepare)
    got = stream.take(5)
    assert all(tag == "prepared" for tag, _, _ in got) and "3" not in [answer for _, _, answer in got]
    assert stream.skipped["prompt_too_long"] == 1 and stream.drawn == 6


def test_dataset_without_any_usable_row_raises_instead_of_looping():
    ds = _dataset(0, bad=True)
    with pytest.raises(ValueError, match="no usable row in a full pass"):
        ExampleStream(VisualQADataset(ds), seed=0).take(1)


def test_iterator_order_is_a_permutation_per_epoch_fixed_by_seed():
    a = [next(it) for it in [PromptIterator(10, seed=3)] for _ in range(20)]
    b = [next(it) for it in [PromptIterator(10, seed=3)] for _ in range(20)]
    c = [next(it) for it in [PromptIterator(10, seed=4)] for _ in range(20)]
    assert a == b and a != c  # two "ranks" with the same seed see the same order
    assert sorted(a[:10]) == list(range(10)) and sorted(a[10:]) == list(range(10))
    assert a[:10] != a[10:]  # a fresh shuffle each epoch


def test_iterator_without_shuffle_is_in_row_order():
    it = PromptIterator(4, seed=0, shuffle=False)
    assert [next(it) for _ in range(6)] == [0, 1, 2, 3, 0, 1]


def test_stream_resumed_from_state_dict_continues_exactly():
    full = ExampleStream(VisualQADataset(_dataset(6, bad=True)), seed=1)
    first = full.take(4)
    state = json.loads(json.dumps(full.state_dict()))  # survives serialisation
    rest = [e.row for e in full.take(9)]
    resumed = ExampleStream(VisualQADataset(_dataset(6, bad=True)), seed=1)
    resumed.load_state_dict(state)
    assert [e.row for e in resumed.take(9)] == rest
    assert resumed.skipped == full.skipped and resumed.drawn == full.drawn
    assert len(first) == 4


def test_resume_with_a_different_seed_or_dataset_size_is_an_error():
    state = PromptIterator(10, seed=1).state_dict()
    with pytest.raises(ValueError, match="checkpoint has seed=1, this run has seed=2"):
        PromptIterator(10, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="num_rows=10"):
        PromptIterator(11, seed=1).load_state_dict(state)


def test_build_response_replaces_only_the_answer_placeholder():
    assert build_response("3", "<think>x</think> \\boxed{{answer}}") == "<think>x</think> \\boxed{3}"
    with pytest.raises(ValueError, match="must contain the literal '\\{answer\\}'"):
        build_response("3", "\\boxed{}")


def test_rank_slice_splits_evenly_or_raises():
    assert [rank_slice(8, r, 2) for r in range(2)] == [slice(0, 4), slice(4, 8)]
    with pytest.raises(ValueError, match="cannot be split evenly over 3 ranks"):
        rank_slice(8, 0, 3)


# --------------------------------------------------------------------------------------------------------------------
# Odd images and text: the same picture as evaluation, counted skips under evaluation's reasons
# --------------------------------------------------------------------------------------------------------------------


def _transparent_diagram_png() -> bytes:
    """A black diagonal on a fully transparent canvas (how geometry diagrams are often drawn)."""
    rgba = Image.new("RGBA", (16, 16), (0, 0, 0, 0))
    for i in range(16):
        rgba.putpixel((i, i), (0, 0, 0, 255))
    buf = io.BytesIO()
    rgba.save(buf, format="PNG")
    return buf.getvalue()


def _grey16_png() -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.array([[0, 257 * 100, 65535]], dtype=np.uint16)).save(buf, format="PNG")
    return buf.getvalue()


def _bomb_png() -> bytes:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", 20_000, 20_000, 8, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize("png", [_transparent_diagram_png, _grey16_png], ids=["transparent", "grey16"])
def test_training_decodes_an_image_to_the_same_picture_as_evaluation(tmp_path, png):
    """Training used to turn transparency black (evaluation: white) and clip 16-bit greyscale to white."""
    from vppo_eval.evaluate import records_from_rows

    rows = {"problem": ["q"], "answer": ["1"], "images": [[{"bytes": png(), "path": None}]]}
    datasets.Dataset.from_dict(rows, features=FEATURES).to_parquet(str(tmp_path / "train.parquet"))
    trained = VisualQADataset.from_source(tmp_path / "train.parquet", "train").example(0).images[0]
    records, skipped = records_from_rows(
        [{"problem": "q", "answer": "1", "images": [{"bytes": png(), "path": None}]}], id_column=None
    )
    evaluated = records[0].images[0]
    assert not skipped and np.array_equal(np.asarray(trained), np.asarray(evaluated))
    pixels = np.asarray(trained)
    if png is _transparent_diagram_png:
        assert (pixels[0, 5] == 255).all() and (pixels[5, 5] == 0).all()  # white canvas, black stroke
    else:
        assert pixels[0, :, 0].tolist() == [0, 100, 255]


def test_a_decompression_bomb_row_is_a_counted_skip_in_training_and_evaluation(tmp_path):
    """It used to kill the run at the step that drew it (and again after every resume)."""
    from vppo_eval.evaluate import records_from_rows

    bomb = {"bytes": _bomb_png(), "path": None}
    rows = {"problem": ["q0", "bomb", "q2"], "answer": ["0", "1", "2"], "images": [[{"bytes": _png(0), "path": None}], [bomb], [{"bytes": _png(2), "path": None}]]}  # fmt: skip
    datasets.Dataset.from_dict(rows, features=FEATURES).to_parquet(str(tmp_path / "train.parquet"))
    stream = ExampleStream(VisualQADataset.from_source(tmp_path / "train.parquet", "train"), seed=0, shuffle=False)
    assert [e.answer for e in stream.take(4)] == ["0", "2", "0", "2"]
    assert dict(stream.skipped) == {"image_too_large": 2}
    _, skipped = records_from_rows([{"problem": "q", "answer": "1", "images": [bomb]}], id_column=None)
    assert skipped == {"image_too_large": 1}


def test_a_question_that_is_not_utf8_is_counted_as_undecodable_text_not_as_an_image(tmp_path):
    features = datasets.Features(
        {
            "problem": datasets.Value("binary"),
            "answer": datasets.Value("string"),
            "images": datasets.List(datasets.Image()),
        }
    )
    rows = {
        "problem": ["How many? é".encode(), b"\xff\xfe not utf-8"],
        "answer": ["1", "2"],
        "images": [[{"bytes": _png(0), "path": None}]] * 2,
    }
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    ds = VisualQADataset.from_source(tmp_path / "train.parquet", "train")
    assert ds.example(0).question == "How many? é"
    with pytest.raises(SkipRow) as info:
        ds.example(1)
    assert info.value.reason == "undecodable_text" and "row 1 question" in str(info.value)


def test_a_missing_image_file_is_missing_image_in_training_as_in_evaluation(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"problem": "q", "answer": "1", "images": ["absent.png"]}) + "\n")
    with pytest.raises(SkipRow) as info:
        VisualQADataset.from_source(tmp_path / "train.jsonl", "train").example(0)
    assert info.value.reason == "missing_image" and "absent.png" in str(info.value)


# --------------------------------------------------------------------------------------------------------------------
# Damaged data files: an error naming the file and the line (vppo_eval.datafiles, shared with evaluation)
# --------------------------------------------------------------------------------------------------------------------


def test_an_empty_or_malformed_training_file_is_an_error_naming_the_file_and_line(tmp_path):
    (tmp_path / "empty.jsonl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"data.source='.*empty.jsonl' is empty"):  # was a bare StopIteration
        load_source(tmp_path / "empty.jsonl", "train")
    row = json.dumps({"problem": "q", "answer": "1", "images": ["a.png"]})
    (tmp_path / "bad.jsonl").write_text(row + "\n" + row[:-1] + "\n" + row + "\n")
    with pytest.raises(ValueError, match=r"bad.jsonl' cannot be read as json: line 2, column \d+"):  # "position 47"
        load_source(tmp_path / "bad.jsonl", "train")


def test_a_training_folder_with_a_jsonl_and_an_image_folder_is_read_as_the_jsonl(tmp_path):
    (tmp_path / "imgs").mkdir()
    for i in range(4):
        Image.fromarray(np.full((8, 8, 3), i, dtype=np.uint8)).save(tmp_path / "imgs" / f"{i}.png")
    rows = [{"problem": f"q{i}", "answer": str(i), "images": [f"imgs/{i}.png"]} for i in range(2)]
    (tmp_path / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    ds = VisualQADataset.from_source(tmp_path, "train")  # was read as an image folder: "column 'problem' ... not in"
    assert len(ds) == 2 and ds.example(1).images[0].getpixel((0, 0)) == (1, 1, 1)


def test_a_training_file_in_another_encoding_is_counted_row_by_row_and_named_when_nothing_is_usable(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    good = json.dumps({"problem": "q", "answer": "1", "images": ["a.png"]}).encode()
    latin1 = '{"problem": "caf\u00e9 ?", "answer": "1", "images": ["a.png"]}'.encode("latin-1")
    (tmp_path / "mixed.jsonl").write_bytes(good + b"\n" + latin1 + b"\n")
    stream = ExampleStream(VisualQADataset.from_source(tmp_path / "mixed.jsonl", "train"), seed=0, shuffle=False)
    assert [e.question for e in stream.take(2)] == ["q", "q"] and stream.skipped == {"undecodable_text": 1}
    (tmp_path / "latin1.jsonl").write_bytes(latin1 + b"\n" + latin1 + b"\n")
    stream = ExampleStream(VisualQADataset.from_source(tmp_path / "latin1.jsonl", "train"), seed=0)
    with pytest.raises(
        ValueError, match=r"no usable row in a full pass over .*latin1.jsonl \(split train\).*undecodable_text"
    ):
        stream.take(1)


@pytest.fixture(scope="module")
def tiny_processor(tmp_path_factory):
    from vppo_rollout.loading import load_processor
    from vppo_rollout.tiny import build_tiny_checkpoint

    return load_processor(build_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt", "qwen2_5_vl", seed=0))


def test_a_row_whose_prompt_cannot_be_built_is_a_counted_skip_naming_the_row_and_file(tmp_path, tiny_processor):
    """Issue 23: one training row with two <image> placeholders for one image, or one 10000x10 image, ended the run
    with an error naming neither the row nor the file. Now: skipped under the reason evaluation gives the same item
    (bad_prompt), counted, logged with its row and file, and the stream goes on with the good rows."""
    from vppo_recipes.data import prompt_or_skip

    path = write_rows(tmp_path, ["good", "two_placeholders", "good", "good", "wide", "good"])
    good = [0, 2, 3, 5]
    lines: list[str] = []
    stream = ExampleStream(
        VisualQADataset.from_source(path, "train"),
        seed=0,
        shuffle=False,
        prepare=lambda ex: (ex.row, prompt_or_skip(tiny_processor, ex, max_prompt_length=512)),
        log=lines.append,
    )
    taken = stream.take(4)
    assert [row for row, _ in taken] == good
    assert dict(stream.skipped) == {"bad_prompt": 2}
    assert len(lines) == 2, lines
    assert lines[0].startswith(f"skipped row 1 of {path} (split train): bad_prompt: ") and "placeholders" in lines[0]
    assert lines[1].startswith(f"skipped row 4 of {path} (split train): bad_prompt: ") and "aspect ratio" in lines[1]


def test_training_and_evaluation_give_an_unusable_prompt_the_same_skip_reason(tmp_path, tiny_processor):
    from vppo_eval.evaluate import _prompt_skip_reason
    from vppo_recipes.data import prompt_or_skip
    from vppo_rollout.prompts import build_prompt

    path = write_rows(tmp_path, ["good", "two_placeholders", "good", "good", "wide", "good"])
    ds = VisualQADataset.from_source(path, "train")
    for row, limit in ((1, 512), (4, 512), (0, 8)):  # two placeholders, 10000x10, prompt_too_long
        ex = ds.example(row)
        with pytest.raises(ValueError) as info:
            build_prompt(tiny_processor, ex.question, ex.images, max_prompt_length=limit)
        with pytest.raises(SkipRow) as skip:
            prompt_or_skip(tiny_processor, ex, max_prompt_length=limit)
        assert skip.value.reason == _prompt_skip_reason(info.value) and f"row {row}: " in skip.value.detail


def test_skips_are_logged_up_to_a_cap_per_reason_and_all_counted():
    """A dataset of thousands of too-long prompts would flood the log: the first LOGGED_SKIPS_PER_REASON of each
    reason are named, the last of them says the rest are only counted, and every one is counted."""
    from vppo_recipes.data import LOGGED_SKIPS_PER_REASON

    def too_long(example):
        raise SkipRow("prompt_too_long", f"row {example.row}")

    n = LOGGED_SKIPS_PER_REASON + 5
    lines: list[str] = []
    stream = ExampleStream(VisualQADataset(_dataset(n)), seed=0, shuffle=False, prepare=too_long, log=lines.append)
    with pytest.raises(ValueError, match="no usable row"):
        stream.take(1)
    assert stream.skipped == {"prompt_too_long": n}
    assert len(lines) == LOGGED_SKIPS_PER_REASON and "further prompt_too_long skips are only counted" in lines[-1]
