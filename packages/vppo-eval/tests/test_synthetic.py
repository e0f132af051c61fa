"""The synthetic visual task: schema on disk, determinism, labels readable from the image, text-only = chance."""

from __future__ import annotations

from collections import Counter, defaultdict

import numpy as np
import pytest

from vppo_eval.reward import grade
from vppo_eval.synthetic import COLOURS, CORNERS, TASKS, build_visual_task

CHANCE = {"count": 1 / 4, "colour": 1 / 4, "side": 1 / 2}


@pytest.fixture(scope="module")
def task(tmp_path_factory):
    out = tmp_path_factory.mktemp("visual_task")
    # 96 training items = 32 per family: whole passes of every (question, answer) combination.
    return out, build_visual_task(out, n_train=96, n_test=12, seed=0)


def _rows(dataset):
    return [dataset[i] for i in range(len(dataset))]


def test_splits_and_columns_use_the_virl39k_names(task):
    import datasets

    _, dsd = task
    assert set(dsd) == {"train", "test"}
    assert (len(dsd["train"]), len(dsd["test"])) == (96, 12)
    features = dsd["train"].features
    assert features["problem"] == datasets.Value("string")
    assert features["answer"] == datasets.Value("string")
    assert features["id"] == datasets.Value("string")
    assert features["images"] == datasets.List(datasets.Image())
    row = dsd["train"][0]
    assert len(row["images"]) == 1 and row["images"][0].size == (56, 56)
    assert "<image>" not in row["problem"]


def test_on_disk_parquet_reloads_with_embedded_image_bytes(task):
    import datasets
    import pyarrow.parquet as pq

    out, dsd = task
    files = sorted(p.name for p in (out / "data").iterdir())
    assert files == ["test-00000-of-00001.parquet", "train-00000-of-00001.parquet"]
    table = pq.read_table(out / "data" / "train-00000-of-00001.parquet")
    first_image = table.column("images").to_pylist()[0][0]
    assert first_image["bytes"][:8] == b"\x89PNG\r\n\x1a\n" and first_image["path"] is None
    reloaded = datasets.load_dataset(str(out))
    assert reloaded["train"]["id"] == dsd["train"]["id"]
    assert reloaded["test"]["answer"] == dsd["test"]["answer"]


def _cell_colours(image, grid=2):
    """Colour name of the shape in each cell (None if empty), read from pixels."""
    pixels = np.asarray(image.convert("RGB")).astype(int)
    cell = pixels.shape[0] // grid
    out = {}
    for r in range(grid):
        for c in range(grid):
            block = pixels[r * cell : (r + 1) * cell, c * cell : (c + 1) * cell].reshape(-1, 3)
            coloured = block[(block != 255).any(axis=1)]
            if len(coloured) < 20:
                out[(r, c)] = None
                continue
            distances = {name: np.abs(coloured - np.array(rgb)).sum(axis=1) for name, rgb in COLOURS.items()}
            votes = Counter(min(distances, key=lambda n: distances[n][k]) for k in range(len(coloured)))
            out[(r, c)] = votes.most_common(1)[0][0]
    return out


def _answer_from_pixels(row, grid=2):
    cells = _cell_colours(row["images"][0], grid)
    question = row["problem"]
    if row["task"] == "count":
        colour = next(c for c in COLOURS if f" {c} " in question)
        return str(sum(v == colour for v in cells.values()))
    if row["task"] == "colour":
        corner = next(c for c in CORNERS if c in question)
        row_i = 0 if corner.startswith("top") else grid - 1
        col_i = 0 if corner.endswith("left") else grid - 1
        return cells[(row_i, col_i)]
    colour = next(c for c in COLOURS if f" {c} " in question)
    (col,) = {c for (_, c), v in cells.items() if v == colour}
    return "left" if col < grid / 2 else "right"


def test_every_answer_is_recoverable_from_the_image_alone(task):
    _, dsd = task
    rows = _rows(dsd["train"]) + _rows(dsd["test"])
    assert [_answer_from_pixels(r) for r in rows] == [r["answer"] for r in rows]


def test_text_only_baseline_cannot_beat_chance(task):
    _, dsd = task
    by_question = defaultdict(Counter)
    tasks = {}
    for row in _rows(dsd["train"]):
        by_question[row["problem"]][row["answer"]] += 1
        tasks[row["problem"]] = row["task"]
    # The best text-only predictor answers each question text with its most frequent answer.
    best_text_only = sum(counts.most_common(1)[0][1] for counts in by_question.values()) / len(dsd["train"])
    chance = sum(CHANCE[tasks[q]] * sum(c.values()) for q, c in by_question.items()) / len(dsd["train"])
    assert chance == pytest.approx((1 / 4 + 1 / 4 + 1 / 2) / 3)
    assert best_text_only == pytest.approx(chance)
    # and every question text is asked with every answer of its family equally often
    for question, counts in by_question.items():
        assert len(set(counts.values())) == 1, question
        assert len(counts) == round(1 / CHANCE[tasks[question]]), question


def test_text_only_baseline_stays_near_chance_for_unbalanced_sizes(tmp_path):
    dsd = build_visual_task(tmp_path, n_train=100, n_test=0, seed=3)
    by_question = defaultdict(Counter)
    for row in _rows(dsd["train"]):
        by_question[row["problem"]][row["answer"]] += 1
    best_text_only = sum(c.most_common(1)[0][1] for c in by_question.values()) / 100
    assert best_text_only <= (1 / 4 + 1 / 4 + 1 / 2) / 3 + 0.1


def test_answer_vocabulary_is_small_and_gradable(task):
    _, dsd = task
    answers = set(dsd["train"]["answer"]) | set(dsd["test"]["answer"])
    assert answers <= {"1", "2", "3", "4", "red", "green", "blue", "yellow", "left", "right"}
    assert Counter(dsd["train"]["task"]) == {t: 32 for t in TASKS}
    for answer in answers:
        assert grade(f"<think>look</think> \\boxed{{{answer}}}", answer) == 1.0
        assert grade(f"<think>look</think> \\boxed{{{answer.upper()}}}", answer) == 1.0


def test_same_seed_gives_identical_data_and_other_seeds_differ(tmp_path):
    a = build_visual_task(tmp_path / "a", n_train=9, n_test=3, seed=7)
    b = build_visual_task(tmp_path / "b", n_train=9, n_test=3, seed=7)
    c = build_visual_task(tmp_path / "c", n_train=9, n_test=3, seed=8)

    def content(dsd):
        return [
            (r["id"], r["problem"], r["answer"], [im.tobytes() for im in r["images"]])
            for split in ("train", "test")
            for r in _rows(dsd[split])
        ]

    assert content(a) == content(b)
    assert content(a) != content(c)
    assert [im.tobytes() for im in a["train"]["images"][0]] != [im.tobytes() for im in a["test"]["images"][0]]


def test_larger_grid_and_task_subset(tmp_path):
    dsd = build_visual_task(tmp_path, n_train=8, n_test=0, seed=1, image_size=84, grid=3, tasks=("side",))
    rows = _rows(dsd["train"])
    assert {r["task"] for r in rows} == {"side"}
    assert all(r["images"][0].size == (84, 84) for r in rows)
    assert [_answer_from_pixels(r, grid=3) for r in rows] == [r["answer"] for r in rows]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"n_train": -1, "n_test": 2}, "n_train and n_test"),
        ({"n_train": 0, "n_test": 0}, "at least one"),
        ({"n_train": 2, "n_test": 2, "image_size": 57}, "image_size"),
        ({"n_train": 2, "n_test": 2, "grid": 1}, "grid"),
        ({"n_train": 2, "n_test": 2, "tasks": ("count", "shape")}, "tasks"),
        ({"n_train": 2.5, "n_test": 2}, "n_train must be an int"),
    ],
)
def test_bad_arguments_raise_value_errors_naming_them(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_visual_task(tmp_path, **kwargs)


# ---------------------------------------------------------------- the demo's task: a hint (linguistic prior) + CoT


@pytest.fixture(scope="module")
def hinted(tmp_path_factory):
    out = tmp_path_factory.mktemp("hinted_task")
    # 4 corners x 4 hinted colours x (3 + 3) answers = 96 items per pass; two passes
    return build_visual_task(out, n_train=192, n_test=24, seed=0, tasks=("colour",), hint=3, reasoning=True)


def _hint_of(question: str) -> str:
    return question.split("Hint: it is often ", 1)[1].rstrip(".")


def test_hinted_task_text_only_ceiling_is_the_hint_weight_and_no_text_rule_beats_it(hinted):
    rows = _rows(hinted["train"])
    by_question = defaultdict(Counter)
    for row in rows:
        by_question[row["problem"]][row["answer"]] += 1
    # The best text-only predictor answers each question text with its most frequent answer: the hinted colour,
    # right 3 times in 6.
    best_text_only = sum(c.most_common(1)[0][1] for c in by_question.values()) / len(rows)
    assert best_text_only == pytest.approx(0.5)
    for question, counts in by_question.items():
        assert counts.most_common(1)[0][0] == _hint_of(question)
        assert sorted(counts.values()) == [2, 2, 2, 6], question  # 3 + 1 + 1 + 1 per pass, two passes
    # following the hint is exactly the ceiling, and every colour is the answer equally often
    assert sum(_hint_of(r["problem"]) == r["answer"] for r in rows) / len(rows) == 0.5
    assert set(Counter(r["answer"] for r in rows).values()) == {48}
    assert [_answer_from_pixels(r) for r in rows] == [r["answer"] for r in rows]


def test_reasoning_targets_put_the_visual_clause_first_and_grade_as_correct(hinted):
    import re

    from vppo_eval.reward import compute_rewards

    rows = _rows(hinted["train"])
    responses = [r["response"] for r in rows]
    scores = compute_rewards(responses, [r["answer"] for r in rows])
    assert scores["accuracy"] == [1.0] * len(rows) and scores["format"] == [1.0] * len(rows)
    pattern = re.compile(r"<think>The (top|bottom)-(left|right) shape is (\w+)\. (.+)</think> \\boxed\{(\w+)\}")
    fillers = set()
    for row, text in zip(rows, responses):
        m = pattern.fullmatch(text)
        assert m, text
        assert f"{m.group(1)}-{m.group(2)}" in row["problem"] and m.group(3) == m.group(5) == row["answer"]
        fillers.add(m.group(4))
    assert len(fillers) > len(rows) // 2  # the filler varies from row to row (drawn, not a template)


def test_plain_build_is_unchanged_by_the_new_options(tmp_path):
    plain = build_visual_task(tmp_path / "a", n_train=12, n_test=0, seed=0, tasks=("colour",))
    with_cot = build_visual_task(tmp_path / "b", n_train=12, n_test=0, seed=0, tasks=("colour",), reasoning=True)
    assert "response" not in plain["train"].features
    for column in ("id", "problem", "answer"):
        assert plain["train"][column] == with_cot["train"][column]
    assert [r["images"][0].tobytes() for r in _rows(plain["train"])] == [
        r["images"][0].tobytes() for r in _rows(with_cot["train"])
    ]


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"hint": 3}, "colour family"),
        ({"tasks": ("colour",), "hint": 0}, "hint must be an int >= 1"),
        ({"reasoning": True, "tasks": ("count",)}, "colour family"),
    ],
)
def test_hint_and_reasoning_arguments_are_checked(tmp_path, kwargs, match):
    with pytest.raises(ValueError, match=match):
        build_visual_task(tmp_path, n_train=4, n_test=0, **kwargs)


def test_claim_columns_are_true_or_false_statements_about_the_scene_and_change_no_other_column(tmp_path):
    """`claims=n` (VAPO's columns): claim_j / label_j pairs whose label is what the image shows, about half of them
    CORRECT; every other column byte for byte as without them."""
    import pyarrow.parquet as pq

    from vppo_eval.synthetic import cell_claim

    build_visual_task(tmp_path / "plain", n_train=40, n_test=2, seed=3)
    dsd = build_visual_task(tmp_path / "claims", n_train=40, n_test=2, seed=3, claims=5)
    plain = pq.read_table(tmp_path / "plain" / "data" / "train-00000-of-00001.parquet")
    full = pq.read_table(tmp_path / "claims" / "data" / "train-00000-of-00001.parquet")
    assert full.column_names == plain.column_names + [f"{k}_{j}" for j in range(1, 6) for k in ("claim", "label")]
    assert all(full[c].equals(plain[c]) for c in plain.column_names)
    labels = [r[f"label_{j}"] for r in _rows(dsd["train"]) for j in range(1, 6)]
    assert set(labels) == {"CORRECT", "WRONG"} and 0.3 < labels.count("CORRECT") / len(labels) < 0.7
    import random

    scene = {(0, 0): ("circle", "red")}  # top-left red circle, the rest empty
    for seed in range(200):
        claim, label = cell_claim(scene, random.Random(seed), grid=2)
        true = claim in ("The top-left cell holds a red circle.",) or (
            claim.endswith("is empty.") and not claim.startswith("The top-left")
        )
        assert (label == "CORRECT") == true, claim
