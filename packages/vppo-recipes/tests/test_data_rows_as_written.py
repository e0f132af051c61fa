"""Issue 23, "Rows read as written", on the training side: a JSONL column that mixes numbers and text (one
`"answer": 3` among strings) is read as written, so a correct \\boxed{red} is rewarded 1 (it read '"red"')."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from vppo_eval.reward import compute_rewards
from vppo_recipes.data import SkipRow, VisualQADataset


def test_a_training_jsonl_whose_answers_mix_numbers_and_text_reads_every_answer_as_written(tmp_path):
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    rows = [
        {"problem": "<image>What colour?", "answer": "red", "images": ["a.png"]},
        {"problem": "<image>How many?", "answer": 3, "images": ["a.png"]},
        {"problem": "<image>How long?", "answer": 2.5, "images": ["a.png"]},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = VisualQADataset.from_source(tmp_path / "train.jsonl", "train")
    examples = [data.example(i) for i in range(len(data))]
    assert [e.answer for e in examples] == ["red", "3", "2.5"]
    assert [e.question for e in examples] == ["<image>What colour?", "<image>How many?", "<image>How long?"]
    rewards = compute_rewards(["<think>red</think> \\boxed{red}"], [examples[0].answer])
    assert float(rewards["accuracy"][0]) == 1.0


def test_a_training_cell_holding_a_list_is_a_counted_skip_never_its_python_repr(tmp_path):
    """Decoded as written, a JSON list in a text column is a list: the row is skipped as undecodable_text, naming the
    row and the column, not trained on as "['3', '4']" (a reward of 0 for every response)."""
    Image.fromarray(np.zeros((8, 8, 3), dtype=np.uint8)).save(tmp_path / "a.png")
    rows = [
        {"problem": "<image>What colour?", "answer": "red", "images": ["a.png"]},
        {"problem": "<image>Which two?", "answer": ["3", "4"], "images": ["a.png"]},
    ]
    (tmp_path / "train.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    data = VisualQADataset.from_source(tmp_path / "train.jsonl", "train")
    assert data.example(0).answer == "red"
    with pytest.raises(SkipRow) as caught:
        data.example(1)
    assert caught.value.reason == "undecodable_text"
    assert "row 1 answer" in str(caught.value) and "list" in str(caught.value)
