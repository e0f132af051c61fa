"""A synthetic visual task for tests and the CPU demo: coloured shapes on a tiny canvas, questions only the image
can answer.

The canvas is a ``grid x grid`` board of cells (56 x 56 px, 2 x 2 cells by default: one cell = 28 px = one merged
Qwen2.5-VL visual token, so the tiny model sees 4 visual tokens per image). Each cell is empty or holds one filled
shape (circle, square, triangle) in one of four colours. Three question families, all answered with one word:

- ``count``:  "How many red shapes are in the image?"                       -> "1" .. "4"
- ``colour``: "What colour is the shape in the top-left corner?"            -> "red" | "green" | "blue" | "yellow"
- ``side``:   "Is the blue shape on the left or the right?"                 -> "left" | "right"

Answers are balanced *per question text* by construction: every (question, answer) combination of a family is used
once per shuffled pass, so given the text alone every answer of that family is equally likely and a text-only model
cannot beat chance (1/4 for count and colour, 1/2 for side). The answer vocabulary has 10 words, small enough for a
tiny model to learn in a few dozen RL steps.

Two options turn the ``colour`` family into the CPU demo's task, where the mechanism VPPO relies on can act
(``build_visual_task(..., hint=3, reasoning=True)``):

- ``hint=w``: the question carries a linguistic prior, "... corner? Hint: it is often blue." The hinted colour is the
  answer ``w`` times out of ``w + 3`` (the other three colours once each), per (corner, hint) pair and pass, so from
  the text alone the best possible accuracy is ``w / (w + 3)`` (1/2 for ``w = 3``): some correct answers can be
  guessed without looking, as in the paper's argument for TAS. Every colour is still the answer equally often.
- ``reasoning=True``: a ``response`` column holds an SFT target with a chain of thought in which most tokens do not
  depend on the image and are not deterministic (filler sentences and a random sum drawn per row), and one clause
  carries the visual evidence: ``<think>The top-left shape is blue. 7 plus 3 is 10. I check the
  corner.</think> \\boxed{blue}``.

Written as a ``datasets.DatasetDict`` (train/test) of parquet files with embedded PNG bytes, in the ViRL39K column
names the recipes default to: ``problem`` (the question, no ``<image>`` placeholder), ``answer``, ``images``
(``List(Image())``, one image) plus ``id`` and ``task`` (and ``response`` with ``reasoning=True``). Deterministic from
``seed``.

``claims=n`` adds VAPO's columns (ALGORITHMS.md §9.12): ``claim_1..claim_n``, statements about the image that the
builder knows to be true or false ("The top-left cell holds a red circle.", "The bottom-right cell is empty."), and
``label_1..label_n`` = ``CORRECT`` / ``WRONG``, each label drawn with probability 1/2. They come from their own random
stream, so every other column is the same with or without them.
"""

from __future__ import annotations

import io
import itertools
import random
from collections.abc import Iterator, Sequence
from pathlib import Path

from PIL import Image, ImageDraw

__all__ = [
    "COLOURS",
    "CORNERS",
    "FILLERS",
    "SHAPES",
    "TASKS",
    "build_visual_task",
    "cell_claim",
    "reasoning_response",
    "render_scene",
    "sample_item",
]

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 70, 230),
    "yellow": (240, 200, 20),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
TASKS: tuple[str, ...] = ("count", "colour", "side")
CORNERS: tuple[str, ...] = ("top-left", "top-right", "bottom-left", "bottom-right")
_MAX_COUNT = 4

# Sentences of the chain of thought that do not depend on the image ({a} + {b} = {c}: a random sum per row). The
# words come from the tiny tokenizer's corpus (vppo_rollout.tiny), so each is a few tokens.
FILLERS: tuple[str, ...] = (
    "I look at the image.",
    "Let me think step by step.",
    "count the objects in the picture.",
    "{a} plus {b} is {c}.",
    "What is in this image?",
    "I see the shapes.",
    "The answer is in the image.",
    "I check the corner.",
)

# A scene: cell (row, col) -> (shape, colour name); cells not in the dict are empty.
Scene = dict[tuple[int, int], tuple[str, str]]


def render_scene(scene: Scene, *, grid: int, image_size: int) -> Image.Image:
    """Draw ``scene`` on a white ``image_size`` x ``image_size`` RGB canvas, one shape centred per cell."""
    image = Image.new("RGB", (image_size, image_size), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    cell = image_size // grid
    margin = max(2, cell // 7)
    for (row, col), (shape, colour) in scene.items():
        x0, y0 = col * cell + margin, row * cell + margin
        x1, y1 = (col + 1) * cell - margin - 1, (row + 1) * cell - margin - 1
        fill = COLOURS[colour]
        if shape == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif shape == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([(x0, y1), (x1, y1), ((x0 + x1) // 2, y0)], fill=fill)
    return image


def _corner_cell(corner: str, grid: int) -> tuple[int, int]:
    row = 0 if corner.startswith("top") else grid - 1
    col = 0 if corner.endswith("left") else grid - 1
    return row, col


def _side_columns(side: str, grid: int) -> list[int]:
    # The middle column of an odd grid is neither left nor right.
    half = grid // 2
    return list(range(half)) if side == "left" else list(range(grid - half, grid))


def _fill_rest(scene: Scene, rng: random.Random, cells: Sequence[tuple[int, int]], colours: Sequence[str]) -> None:
    """Each still-empty cell gets, with probability 1/2, a random shape in one of ``colours``."""
    for cell in cells:
        if cell not in scene and rng.random() < 0.5:
            scene[cell] = (rng.choice(SHAPES), rng.choice(list(colours)))


def sample_item(task: str, parameter: str, answer: str, rng: random.Random, *, grid: int) -> tuple[str, Scene]:
    """The question text and a random scene whose true answer is ``answer``.

    task: one of TASKS; parameter: the colour (count, side) or the corner (colour) the question names.
    """
    cells = [(r, c) for r in range(grid) for c in range(grid)]
    scene: Scene = {}
    if task == "count":
        others = [c for c in COLOURS if c != parameter]
        for cell in rng.sample(cells, int(answer)):
            scene[cell] = (rng.choice(SHAPES), parameter)
        _fill_rest(scene, rng, cells, others)
        return f"How many {parameter} shapes are in the image?", scene
    if task == "colour":
        scene[_corner_cell(parameter, grid)] = (rng.choice(SHAPES), answer)
        _fill_rest(scene, rng, cells, list(COLOURS))
        return f"What colour is the shape in the {parameter} corner?", scene
    if task == "side":
        columns = _side_columns(answer, grid)
        cell = rng.choice([(r, c) for r in range(grid) for c in columns])
        scene[cell] = (rng.choice(SHAPES), parameter)
        _fill_rest(scene, rng, cells, [c for c in COLOURS if c != parameter])
        return f"Is the {parameter} shape on the left or the right?", scene
    raise ValueError(f"task must be one of {TASKS}, got {task!r}")


def reasoning_response(corner: str, answer: str, rng: random.Random, *, n_fillers: int = 2) -> str:
    """An SFT target for a ``colour`` item: a chain of thought with random filler around the one visual clause.

    The visual clause comes first, so the colour token sits at the same place in every response (behind the
    image, a fixed distance away: a tiny decoder learns that lookup, and not one at a varying distance); then
    ``n_fillers`` sentences drawn with replacement from FILLERS (the sum's operands drawn in 0..12); then the
    answer, which copies the clause.
    """

    def filler() -> str:
        a, b = rng.randrange(13), rng.randrange(13)
        return rng.choice(FILLERS).format(a=a, b=b, c=a + b)

    fillers = " ".join(filler() for _ in range(n_fillers))
    return f"<think>The {corner} shape is {answer}. {fillers}</think> \\boxed{{{answer}}}"


def _cell_name(cell: tuple[int, int], grid: int) -> str:
    row, col = cell
    if grid == 2:
        return f"{'top' if row == 0 else 'bottom'}-{'left' if col == 0 else 'right'}"
    return f"row {row + 1}, column {col + 1}"


def cell_claim(scene: Scene, rng: random.Random, *, grid: int) -> tuple[str, str]:
    """A statement about one random cell of ``scene`` and its label: ``(claim, "CORRECT" | "WRONG")``.

    The label is drawn first (each with probability 1/2), then a cell; a true claim states what the cell holds
    (its shape and colour, or that it is empty), a false one changes the colour or the shape, calls a full cell
    empty, or puts a random shape in an empty one.
    """
    correct = rng.random() < 0.5
    cell = rng.choice([(r, c) for r in range(grid) for c in range(grid)])
    where = f"The {_cell_name(cell, grid)} cell"
    held = scene.get(cell)
    if held is None:
        if correct:
            return f"{where} is empty.", "CORRECT"
        return f"{where} holds a {rng.choice(list(COLOURS))} {rng.choice(SHAPES)}.", "WRONG"
    shape, colour = held
    if correct:
        return f"{where} holds a {colour} {shape}.", "CORRECT"
    change = rng.randrange(3)
    if change == 0:
        return f"{where} holds a {rng.choice([c for c in COLOURS if c != colour])} {shape}.", "WRONG"
    if change == 1:
        return f"{where} holds a {colour} {rng.choice([s for s in SHAPES if s != shape])}.", "WRONG"
    return f"{where} is empty.", "WRONG"


def _combinations(task: str, grid: int, hint: int | None = None) -> list[tuple[str, str]]:
    """Every (question parameter, answer) pair of a family; each pair is used once per pass.

    With ``hint`` (colour only) the parameter is ``(corner, hinted colour)`` and the hinted answer appears ``hint``
    times per pass, every other colour once.
    """
    if task == "colour" and hint is not None:
        return [
            ((corner, hinted), answer)
            for corner in CORNERS
            for hinted in COLOURS
            for answer in [hinted] * hint + [c for c in COLOURS if c != hinted]
        ]
    if task == "count":
        counts = [str(k) for k in range(1, min(_MAX_COUNT, grid * grid) + 1)]
        return list(itertools.product(COLOURS, counts))
    if task == "colour":
        return list(itertools.product(CORNERS, COLOURS))
    return list(itertools.product(COLOURS, ("left", "right")))


def _balanced(task: str, grid: int, rng: random.Random, hint: int | None = None) -> Iterator[tuple]:
    combos = _combinations(task, grid, hint)
    while True:
        rng.shuffle(combos)
        yield from combos


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _split_columns(
    split: str,
    n: int,
    *,
    seed: int,
    tasks: Sequence[str],
    grid: int,
    image_size: int,
    hint: int | None = None,
    reasoning: bool = False,
    claims: int = 0,
) -> dict[str, list]:
    # String seeds are hashed with SHA-512 by `random`, so this is stable across processes and PYTHONHASHSEED.
    rng = random.Random(f"vppo-visual-task/{seed}/{split}")
    # The chain of thought has its own stream, so adding it leaves every other column as it was.
    text_rng = random.Random(f"vppo-visual-task/{seed}/{split}/reasoning")
    claim_rng = random.Random(f"vppo-visual-task/{seed}/{split}/claims")  # likewise
    streams = {
        task: _balanced(task, grid, random.Random(f"vppo-visual-task/{seed}/{split}/{task}"), hint) for task in tasks
    }
    columns: dict[str, list] = {"id": [], "problem": [], "answer": [], "images": [], "task": []}
    if reasoning:
        columns["response"] = []
    for j in range(1, claims + 1):
        columns[f"claim_{j}"], columns[f"label_{j}"] = [], []
    for i in range(n):
        task = tasks[i % len(tasks)]
        parameter, answer = next(streams[task])
        hinted = None
        if task == "colour" and hint is not None:
            parameter, hinted = parameter
        question, scene = sample_item(task, parameter, answer, rng, grid=grid)
        if hinted is not None:
            question = f"{question} Hint: it is often {hinted}."
        image = render_scene(scene, grid=grid, image_size=image_size)
        columns["id"].append(f"{split}-{i:05d}")
        columns["problem"].append(question)
        columns["answer"].append(answer)
        columns["images"].append([{"bytes": _png(image), "path": None}])
        columns["task"].append(task)
        if reasoning:
            columns["response"].append(reasoning_response(parameter, answer, text_rng))
        for j in range(1, claims + 1):
            claim, label = cell_claim(scene, claim_rng, grid=grid)
            columns[f"claim_{j}"].append(claim)
            columns[f"label_{j}"].append(label)
    return columns


def build_visual_task(
    out_dir: str | Path,
    *,
    n_train: int,
    n_test: int,
    seed: int = 0,
    image_size: int = 56,
    grid: int = 2,
    tasks: Sequence[str] = TASKS,
    hint: int | None = None,
    reasoning: bool = False,
    claims: int = 0,
):
    """Generate the task, write ``out_dir/data/{train,test}-00000-of-00001.parquet``, return the ``DatasetDict``.

    A split with 0 items is left out (of the files and of the returned ``DatasetDict``).

    ``datasets.load_dataset(str(out_dir))`` reads the same two splits back. Images are ``image_size`` px squares
    split into ``grid x grid`` cells (keep ``image_size / grid`` a multiple of the ViT merge size — 28 px for
    Qwen2.5-VL — so each cell is one visual token). Same arguments -> same data, byte for byte in every column.
    ``hint`` and ``reasoning`` (module docstring) need ``tasks=("colour",)``. ``claims``: the number of VAPO claim /
    label column pairs (module docstring; 0: none).
    """
    import datasets

    for arg, value in (("n_train", n_train), ("n_test", n_test), ("seed", seed), ("image_size", image_size)):
        if not isinstance(value, int) or isinstance(value, bool):
            raise ValueError(f"{arg} must be an int, got {value!r}")
    if n_train < 0 or n_test < 0 or n_train + n_test == 0:
        raise ValueError(f"n_train and n_test must be >= 0 with at least one item in total, got {n_train}, {n_test}")
    if not isinstance(grid, int) or not 2 <= grid <= 6:
        raise ValueError(f"grid must be an int in [2, 6], got {grid!r}")
    if image_size < 8 * grid or image_size % grid:
        raise ValueError(f"image_size must be a multiple of grid={grid} and >= {8 * grid} px, got {image_size}")
    tasks = tuple(tasks)
    unknown = [t for t in tasks if t not in TASKS]
    if not tasks or unknown:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks!r}")
    if (hint is not None or reasoning) and tasks != ("colour",):
        raise ValueError(f"hint and reasoning are options of the colour family: pass tasks=('colour',), got {tasks!r}")
    if hint is not None and (not isinstance(hint, int) or isinstance(hint, bool) or hint < 1):
        raise ValueError(
            f"hint must be an int >= 1 (the hinted colour's weight against 1 for each other), got {hint!r}"
        )

    if not isinstance(claims, int) or isinstance(claims, bool) or claims < 0:
        raise ValueError(f"claims must be an int >= 0 (claim / label column pairs), got {claims!r}")

    schema = {
        "id": datasets.Value("string"),
        "problem": datasets.Value("string"),
        "answer": datasets.Value("string"),
        "images": datasets.List(datasets.Image()),
        "task": datasets.Value("string"),
    }
    if reasoning:
        schema["response"] = datasets.Value("string")
    for j in range(1, claims + 1):
        schema[f"claim_{j}"] = schema[f"label_{j}"] = datasets.Value("string")
    features = datasets.Features(schema)
    data_dir = Path(out_dir) / "data"
    data_dir.mkdir(parents=True, exist_ok=True)
    files = {}
    for split, n in (("train", n_train), ("test", n_test)):
        for stale in data_dir.glob(f"{split}-*.parquet"):  # a previous build must not leak into this one
            stale.unlink()
        if n == 0:  # an empty parquet split cannot be loaded back; the split is left out instead
            continue
        columns = _split_columns(
            split, n, seed=seed, tasks=tasks, grid=grid, image_size=image_size, hint=hint, reasoning=reasoning,
            claims=claims,
        )  # fmt: skip
        path = data_dir / f"{split}-00000-of-00001.parquet"
        datasets.Dataset.from_dict(columns, features=features).to_parquet(str(path))
        files[split] = str(path)
    return datasets.load_dataset("parquet", data_files=files, features=features)
