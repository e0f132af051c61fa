"""The eight benchmarks of the VPPO paper: registry, loading, normalisation into ``Record``, filtering.

Each benchmark is one ``Benchmark`` entry: its Hugging Face id, config and split, the raw columns it needs, and a
function turning one raw row into a ``Record``. Every benchmark is loaded by the same code path
(``load_benchmark``) from

- its hub id (``source=None``, needs network or a populated HF cache),
- a local folder: a hub snapshot (``huggingface-cli download <id> --repo-type dataset --local-dir DIR``), a folder
  of parquet/jsonl data files, or a ``save_to_disk`` folder,
- a single local ``.parquet`` / ``.jsonl`` / ``.json`` / ``.csv`` / ``.arrow`` file in the raw schema.

Rows that cannot be used are skipped and counted by reason (``load_benchmark_report``), in the vocabulary training
uses too (``vppo_rollout.images.SKIP_REASONS``): ``empty_answer``, ``missing_image``, ``undecodable_image``,
``image_too_large``, ``empty_question``, ``bad_options`` and, for MathVerse, MathVision and DynaMath (filtered by
the paper to exact-match-checkable items, ALGORITHMS.md §8), ``not_exact_match``. Images are decoded by
``vppo_rollout.images.decode_image``, the decoder training uses.
A missing *column* is an error, not a skip: the source is then not the benchmark's schema at all.

Two data forms, each tied to an evaluation protocol (``PROTOCOLS``):

- ``raw`` — the benchmark's own release (hub schema, or the GitHub release form of LogicVista and DynaMath: one JSON
  object keyed by item id); vppo-eval's exact-match filter picks the items of MathVerse, MathVision and DynaMath.
- ``vppo`` — the authors' evaluation data: LLaMA-Factory "sharegpt" rows (``messages``: a user turn with one
  ``<image>`` placeholder per image, then an assistant turn holding the answer; ``images``: image paths, in the
  releases ``./data/images/...`` relative to the release root), one file per benchmark
  (``Benchmark.sharegpt_names``), in the layouts the releases ship (`vppo_eval.releases`: VPPO-Eval's JSON files,
  PAPO_eval's parquet shards and image zips, PAPO-Eval's prepared folder). The items are the authors' (already
  filtered); nothing is filtered here.
  LLaMA-Factory's other spelling (``conversations`` / ``messages`` of ``from``/``value`` turns, human / gpt) and
  content given as a list of parts are read too; any other shape refuses the file, naming it and the row.

Which schema facts were confirmed against dataset cards and which are assumed: packages/vppo-eval/README.md,
section "Benchmark schemas".
"""

from __future__ import annotations

import ast
import difflib
import re
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from vppo_eval.datafiles import iter_rows, load_data_file, load_data_folder
from vppo_eval.records import Record
from vppo_eval.releases import resolve_image
from vppo_eval.reward import choice_letters
from vppo_rollout.images import SkipRow, decode_image

__all__ = [
    "BENCHMARKS",
    "BENCHMARK_NAMES",
    "PROTOCOLS",
    "Benchmark",
    "BenchmarkUnavailableError",
    "LoadReport",
    "SkipRow",
    "decode_image",
    "fixture_path",
    "get_benchmark",
    "is_exact_match_answer",
    "item_sha256",
    "items_sha256",
    "load_benchmark",
    "load_benchmark_report",
    "resolve_benchmark_names",
]

_FIXTURES = Path(__file__).parent / "fixtures"
_OPTION_LETTERS = "ABCDEFGHIJ"

# protocol -> what it means; the data form each reads is checked by `load_benchmark_report`.
PROTOCOLS: dict[str, str] = {
    "vppo": "the authors' item sets (sharegpt files of PAPO-Eval / VPPO-Eval), avg@8, temperature 1.0, top-p 1.0, "
    "2048 new tokens",
    "raw": "the benchmarks' own releases with vppo-eval's exact-match filter, same decoding",
}
# The protocol of `vppo-eval` and of `evaluate` given registry names, when none is named: the paper's item sets.
DEFAULT_PROTOCOL = "vppo"


class BenchmarkUnavailableError(RuntimeError):
    """The benchmark's data could not be loaded (offline, missing files); the message says what to place where."""


@dataclass(frozen=True)
class Benchmark:
    """One benchmark of the suite.

    name: registry key (``"mathverse"``); title: the paper's column header (``"MathVerse"``).
    hf_id / config / split: where ``datasets`` finds it on the hub.
    columns: required raw columns; each entry is a group of alternative names of which one must exist
        (``("decoded_image", "image")``).
    normalize: ``(row, index, base_dir) -> Record``; raises ``SkipRow(reason)`` for unusable rows.
    exact_match_only: keep only items whose answer passes ``is_exact_match_answer`` (the paper's filter; DynaMath's
        own ``answer_type`` decides where a row has one).
    sharegpt_names: split names / file stems of this benchmark in the authors' release, the release's own first
        (``PAPO_MMK12``: PAPO-Eval's split, its ``data/PAPO_MMK12-00000-of-00001.parquet`` and prepared
        ``papo/PAPO_MMK12.json``); later ones are other spellings still read (LLaMA-Factory's dataset names in
        PAPO-Eval's ``dataset_info.json``, vppo-eval's earlier guesses).
    release: the hub dataset of the authors' release holding it (``PAPO-Galaxy/PAPO_eval`` or
        ``chamber111/VPPO-Eval``); release_rows: its row count there (protocol ``vppo``: what a complete copy keeps;
        the report warns when a run kept another number).
    subset: raw form only: a row predicate selecting a subset (rows outside it are skipped as ``not_in_subset``).
    in_table1: one of the eight columns of the paper's Table 1 (what ``"all"`` selects).
    """

    name: str
    title: str
    hf_id: str
    config: str | None
    split: str
    columns: tuple[tuple[str, ...], ...]
    normalize: Callable[[Mapping[str, Any], int, Path | None], Record]
    exact_match_only: bool = False
    sharegpt_names: tuple[str, ...] = ()
    release: str | None = None
    release_rows: int | None = None
    subset: Callable[[Mapping[str, Any]], bool] | None = None
    in_table1: bool = True

    @property
    def fixture(self) -> Path:
        """The small local file in this benchmark's raw schema shipped for offline tests."""
        return _FIXTURES / f"{self.name}.parquet"


@dataclass
class LoadReport:
    """What ``load_benchmark_report`` read: the records kept, and how many rows were skipped, by reason."""

    benchmark: str
    source: str
    records: list[Record]
    n_rows: int
    skipped: dict[str, int] = field(default_factory=dict)
    data_form: str = "raw"
    # Rows of the authors' release (`Benchmark.release_rows`) when the data is in its sharegpt form, else None.
    expected_items: int | None = None
    # Other data dirs that also hold this benchmark and were not read (the first one given wins).
    also_in: tuple[str, ...] = ()

    @property
    def n_skipped(self) -> int:
        return sum(self.skipped.values())

    def items_sha256(self) -> str:
        """`items_sha256` of the kept records: two runs scored the same items iff these agree."""
        return items_sha256(self.records)

    def summary(self) -> dict[str, Any]:
        """What a result file records about the data: source, form, rows read, items kept, skips, id hash, the
        release's row count (``expected_items``; None outside the sharegpt form) and, when other data dirs also hold
        the benchmark, those (``also_in``)."""
        return {
            "source": self.source,
            "data_form": self.data_form,
            "rows": self.n_rows,
            "items": len(self.records),
            "skipped": dict(self.skipped),
            "items_sha256": self.items_sha256(),
            "expected_items": self.expected_items,
            **({"also_in": list(self.also_in)} if self.also_in else {}),
        }


def items_sha256(records: Iterable[Record]) -> str:
    """sha256 over the items' ids, questions and answers (one "id\tquestion\tanswer" JSON line per item, sorted).

    The ids alone would not tell two item sets apart when a file has none and rows are numbered (the authors'
    sharegpt files): the question and answer make the hash name the items themselves.
    """
    import hashlib
    import json

    lines = sorted(json.dumps([str(r.id), r.question, str(r.answer)], ensure_ascii=False) for r in records)
    return hashlib.sha256("\n".join(lines).encode("utf-8")).hexdigest()


def _image_sha256(image: Image.Image) -> str:
    """sha256 over an image's mode, size and RGB pixels.

    A loaded benchmark holds RGB images lazily opened on their encoded bytes (`vppo_rollout.images.decode_image`):
    those are decoded into a throwaway copy, so hashing does not keep every picture's pixels in memory, and the
    hash is the same whether or not the image has been loaded since (loading drops the bytes it was opened on)."""
    import hashlib
    import io

    digest = hashlib.sha256()
    fp = getattr(image, "fp", None)
    if isinstance(fp, io.BytesIO):  # lazily opened, not yet loaded
        with Image.open(io.BytesIO(fp.getvalue())) as copy:
            digest.update(f"{copy.mode} {copy.size}".encode())
            digest.update(copy.tobytes())
    else:
        digest.update(f"{image.mode} {image.size}".encode())
        digest.update(image.tobytes())
    return digest.hexdigest()


def item_sha256(record: Record) -> str:
    """sha256 of one item's content: its id, question, answer and the pixels of its images, in order.

    What a resumed evaluation compares item by item (`vppo_eval.evaluate`): a stored result is reused only for the
    item it was sampled for; a changed question, answer or picture under the same id is another item."""
    import hashlib
    import json

    text = json.dumps([str(record.id), record.question, str(record.answer)], ensure_ascii=False)
    images = [_image_sha256(image) for image in record.images]
    return hashlib.sha256("\n".join([text, *images]).encode("utf-8")).hexdigest()


# ---------------------------------------------------------------------------------------------------------------
# Row helpers
# ---------------------------------------------------------------------------------------------------------------


def _resolve(value: Any, base_dir: Path | None) -> Any:
    """A relative image path as the releases lay them out (`vppo_eval.releases.resolve_image`: next to the data
    file, in its ``images/`` folder, or under the release root the authors' ``./data/images/...`` paths are relative
    to, or in that root's image zips), as an absolute path or the bytes read from a zip. Anything else is returned
    as is (a relative path that is nowhere is then joined to ``base_dir`` once by the decoder and counted as
    ``missing_image``)."""
    return resolve_image(value, base_dir)


def _images(values: Iterable[Any], base_dir: Path | None) -> list[Image.Image]:
    images = [decode_image(_resolve(v, base_dir), base_dir=base_dir) for v in values if v is not None]
    if not images:
        raise SkipRow("missing_image")
    return images


def _image_cells(row: Mapping[str, Any], *names: str) -> list[Any]:
    """The image cell(s) of the first present column of ``names``, as a list (single image or list of images)."""
    value = _first(row, *names)
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _first(row: Mapping[str, Any], *names: str) -> Any:
    """Value of the first of ``names`` present in the row (the column check guarantees one is)."""
    for name in names:
        if name in row:
            return row[name]
    return None


def _text(value: Any) -> str:
    """A text field as the model or the grader sees it; a number as written. A list or an object (a JSON field that
    holds one in this row) has no text: `UnreadableRow`, never its Python repr."""
    if isinstance(value, (list, tuple, Mapping)):
        raise UnreadableRow(f"a text field holds a {type(value).__name__}: {str(value)[:80]}")
    return "" if value is None else str(value).strip()


def _answer(value: Any) -> str:
    answer = _text(value)
    if not answer:
        raise SkipRow("empty_answer")
    return answer


def _question(value: Any) -> str:
    question = _text(value)
    if not question:
        raise SkipRow("empty_question")
    return question


_IMAGE_TAG = re.compile(r"<image\s*\d*>", re.IGNORECASE)


def _strip_image_tags(text: str) -> str:
    """Remove ``<image>`` / ``<image1>`` placeholders (the prompt builder inserts the image tokens itself)."""
    return _IMAGE_TAG.sub("", text).strip()


def _with_options(question: str, options: Sequence[str]) -> str:
    lines = [f"({_OPTION_LETTERS[i]}) {_text(opt)}" for i, opt in enumerate(options)]
    return question + "\nOptions:\n" + "\n".join(lines)


def _meta(row: Mapping[str, Any], skip: Iterable[str]) -> dict[str, Any]:
    """The row's remaining JSON-like fields (images and the fields already used are left out)."""
    skip = set(skip)
    meta = {}
    for key, value in row.items():
        if key in skip or _looks_like_image(value):
            continue
        if isinstance(value, (str, int, float, bool)) or value is None:
            meta[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (str, int, float, bool)) for v in value):
            meta[key] = list(value)
        elif isinstance(value, Mapping) and all(
            isinstance(v, (str, int, float, bool, type(None))) for v in value.values()
        ):
            meta[key] = dict(value)
    return meta


def _looks_like_image(value: Any) -> bool:
    if isinstance(value, (Image.Image, bytes, bytearray)):
        return True
    if isinstance(value, Mapping) and "bytes" in value:
        return True
    return isinstance(value, (list, tuple)) and any(_looks_like_image(v) for v in value)


def _row_id(row: Mapping[str, Any], index: int, *names: str) -> str:
    value = _first(row, *names)
    text = _text(value)
    return text if text else str(index)


# ---------------------------------------------------------------------------------------------------------------
# The exact-match filter (MathVerse, MathVision, DynaMath)
# ---------------------------------------------------------------------------------------------------------------

# A plain number: integer, decimal, a/b, \frac{a}{b} (also \dfrac, \tfrac), thousands commas, optional sign,
# optional trailing %, degree sign or ^\circ.
_NUM = r"[+-]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|[+-]?\.\d+"
_EXACT_NUMBER = re.compile(
    rf"""^\s*(?:
        (?:{_NUM})(?:\s*/\s*\d+)?
        | [+-]?\\[dt]?frac\{{\s*\d+\s*\}}\{{\s*\d+\s*\}}
    )\s*(?:\\?%|°|\^\s*\\circ|\^\s*\{{\s*\\circ\s*\}})?\s*$""",
    re.VERBOSE,
)


def is_exact_match_answer(answer: str) -> bool:
    """True when ``answer`` can be checked by exact match: option letter(s) or a plain number.

    This is our reading of the paper's filter for MathVerse, MathVision and DynaMath (the paper does not spell it
    out): kept are multiple-choice letters (``"B"``, ``"A, C"``) and numeric literals (``"12"``, ``"-3.5"``,
    ``"1/2"``, ``"\\frac{1}{2}"``, ``"30°"``, ``"45%"``); dropped are expressions, equations, intervals and text
    (``"2\\sqrt{3}"``, ``"y=2x+1"``, ``"(1, 2)"``). The number of dropped items is reported as ``not_exact_match``.
    """
    if not isinstance(answer, str):
        return False
    return choice_letters(answer) is not None or bool(_EXACT_NUMBER.match(answer))


# ---------------------------------------------------------------------------------------------------------------
# Normalisers: one per benchmark, raw row -> Record
# ---------------------------------------------------------------------------------------------------------------


def _geo3k(row: Mapping[str, Any], index: int, base_dir: Path | None) -> Record:
    # hiyouga/geometry3k: images (list of Image), problem ("<image>Find x."), answer (the value of the correct
    # choice), id, choices (the four values), ground_truth (the correct choice's letter).
    choices = [_text(c) for c in row.get("choices") or []] or None
    question = _question(_strip_image_tags(_text(row["problem"])))
    answer = _answer(row["answer"])
    if choices and choice_letters(answer) is not None:
        # Should `answer` be the letter after all (not confirmed, see the README), the model must see the options.
        question = _with_options(question, choices)
    return Record(
        id=_row_id(row, index, "id"),
        question=question,
        images=_images(row["images"] or [], base_dir),
        answer=answer,
        choices=choices,
        meta=_meta(row, {"problem", "answer", "images", "choices", "id"}),
    )


_WEMATH_OPTION = re.compile(r"(?:^|;)\s*([A-H])\s*[.:：]\s*")


def _parse_wemath_options(option: str) -> list[str] | None:
    """``"A. 4; B. 5; C. 6"`` -> ``["4", "5", "6"]`` (None when it does not parse as consecutive letters)."""
    parts = _WEMATH_OPTION.split(option)
    # split gives ["", "A", "4", "B", "5", ...]
    if len(parts) < 3 or parts[0].strip():
        return None
    letters, texts = parts[1::2], [p.strip().rstrip(";").strip() for p in parts[2::2]]
    if "".join(letters) != _OPTION_LETTERS[: len(letters)]:
        return None
    return texts


def _wemath(row: Mapping[str, Any], index: int, base_dir: Path | None) -> Record:
    # We-Math/We-Math testmini: ID, split, "knowledge concept", question, option ("A. ...; B. ..."), answer (letter),
    # key, "question number", "knowledge concept description", image_path (Image).
    question = _question(row["question"])
    option = _text(row["option"])
    choices = _parse_wemath_options(option) if option else None
    if choices:
        question = _with_options(question, choices)
    elif option:
        question = f"{question}\nOptions: {option}"
    image = _first(row, "image_path", "image")
    return Record(
        id=_row_id(row, index, "ID", "id"),
        question=question,
        images=_images([image], base_dir),
        answer=_answer(row["answer"]),
        choices=choices,
        meta=_meta(row, {"question", "option", "answer", "image_path", "image", "ID", "id"}),
    )


_CHOICE_LINE = re.compile(r"^\s*([A-H])\s*[.、．:：]\s*(.+?)\s*$")


def _inline_choices(question: str) -> list[str] | None:
    """Option texts written as lines ``"A. ..."`` / ``"B、..."`` in the question (None unless A, B, ... in order)."""
    found = [m.groups() for m in map(_CHOICE_LINE.match, question.splitlines()) if m]
    letters = "".join(letter for letter, _ in found)
    if len(found) < 2 or letters != _OPTION_LETTERS[: len(found)]:
        return None
    return [text for _, text in found]


def _mmk12(row: Mapping[str, Any], index: int, base_dir: Path | None) -> Record:
    # FanqingM/MMK12 test: id, subject (math/physics/chemistry/biology), question (options inline as "A. ..." lines),
    # answer (the letter), image. The question is shown as is; `choices` is parsed from it for reports.
    question = _question(_strip_image_tags(_text(row["question"])))
    return Record(
        id=_row_id(row, index, "id"),
        question=question,
        images=_images(_image_cells(row, "image", "images"), base_dir),
        answer=_answer(row["answer"]),
        choices=_inline_choices(question),
        meta=_meta(row, {"question", "answer", "image", "images", "id"}),
    )


def _mathverse(row: Mapping[str, Any], index: int, base_dir: Path | None) -> Record:
    # AI4Math/MathVerse testmini: sample_index, problem_index, problem_version, question, image, answer,
    # question_type ("multi-choice" | "free-form"), metadata, query_wo, query_cot, question_for_eval.
    # question_for_eval holds the question with its choices; "Vision Only" rows carry the question in the image.
    question = _text(row.get("question_for_eval")) or _text(row["question"]) or _text(row.get("query_wo"))
    return Record(
        id=_row_id(row, index, "sample_index"),
        question=_question(_strip_image_tags(question)),
        images=_images([row["image"]], base_dir),
        answer=_answer(row["answer"]),
        meta=_meta(row, {"sample_index", "question", "question_for_eval", "query_wo", "query_cot", "answer", "image"}),
    )


def _mathvision(row: Mapping[str, Any], index: int, base_dir: Path | None) -> Record:
    # MathLLMs/MathVision: id, question (with "<image1>" tags), options (list, empty when free-form), image (a
    # path string "images/1.jpg"), decoded_image (Image), answer (letter or value), solution, level, subject.
    options = [_text(o) for o in (row["options"] or [])]
    question = _question(_strip_image_tags(_text(row["question"])))
    # Options drawn in the picture come as their bare letters ("A" ... "E"): listing "(A) A" adds nothing.
    picture_only = options == list(_OPTION_LETTERS[: len(options)])
    if options and not picture_only:
        question = _with_options(question, options)
    image = row["decoded_image"] if row.get("decoded_image") is not None else row.get("image")
    return Record(
        id=_row_id(row, index, "id"),
        question=question,
        images=_images([image], base_dir),
        answer=_answer(row["answer"]),
        choices=options or None,
        meta=_meta(row, {"id", "question", "options", "image", "decoded_image", "answer", "solution"}),
    )


def _dynamath(row: Mapping[str, Any], index: int, base_dir: Path | None) -> Record:
    # DynaMath/DynaMath_Sample sample_variant<k>: id, question, image (path string), decoded_image (Image),
    # ground_truth, answer_type ("multiple choice" | "float" | "free form"), subject, knowledge_level.
    # The GitHub release (dataset/dataset.json, keyed by id) names the answer `answer`, the image a path `image`.
    image = row["decoded_image"] if row.get("decoded_image") is not None else row.get("image")
    return Record(
        id=_row_id(row, index, "id"),
        question=_question(_strip_image_tags(_text(row["question"]))),
        images=_images([image], base_dir),
        answer=_answer(_first(row, "ground_truth", "answer")),
        meta=_meta(row, {"id", "question", "image", "decoded_image", "ground_truth", "answer"}),
    )


# DynaMath's own answer types that exact match can check ("text" / "free form" answers are left out).
_DYNAMATH_EXACT_TYPES = {"multiple choice", "float"}


def _logicvista(row: Mapping[str, Any], index: int, base_dir: Path | None) -> Record:
    # lscpku/LogicVista test: id, question (options named in the text or drawn in the image), answer ("C", "A, C",
    # "3"), reasoning, image, skill, broad_capability, specific_capability, imagesource, sourcelink, ...
    # The GitHub release (data/dataset.json, keyed by id) names the image file `imagename` (in data/images/).
    return Record(
        id=_row_id(row, index, "id", "imagename"),
        question=_question(_strip_image_tags(_text(row["question"]))),
        images=_images(_image_cells(row, "image", "images", "imagename"), base_dir),
        answer=_answer(row["answer"]),
        meta=_meta(row, {"id", "question", "image", "images", "imagename", "answer", "reasoning"}),
    )


def _parse_mmmu_options(value: Any) -> list[str]:
    """MMMU-Pro stores options as the repr of a Python list (``"['1', '2']"``)."""
    if isinstance(value, (list, tuple)):
        return [_text(v) for v in value]
    try:
        parsed = ast.literal_eval(_text(value))
    except (ValueError, SyntaxError) as err:
        raise SkipRow("bad_options") from err
    if not isinstance(parsed, (list, tuple)) or not parsed or len(parsed) > len(_OPTION_LETTERS):
        raise SkipRow("bad_options")
    return [_text(v) for v in parsed]


def _mmmu_pro(row: Mapping[str, Any], index: int, base_dir: Path | None) -> Record:
    # MMMU/MMMU_Pro "standard (10 options)" test: id, question (with "<image 1>" references, kept as MMMU-Pro's
    # own prompt keeps them), options (list repr), explanation, image_1..image_7, img_type, answer (letter),
    # topic_difficulty, subject.
    options = _parse_mmmu_options(row["options"])
    images = [row.get(f"image_{k}") for k in range(1, 8)]
    return Record(
        id=_row_id(row, index, "id"),
        question=_with_options(_question(row["question"]), options),
        images=_images(images, base_dir),
        answer=_answer(row["answer"]),
        choices=options,
        meta=_meta(row, {"id", "question", "options", "answer", "explanation"} | {f"image_{k}" for k in range(1, 8)}),
    )


class UnreadableRow(ValueError):
    """A row whose shape the reader does not know (not a bad item but another schema): the whole file is refused,
    ``load_benchmark_report`` naming the file and the row."""


# The two sharegpt spellings LLaMA-Factory reads: (role key, content key, user role, assistant role). PAPO-Eval's
# files use the first; LLaMA-Factory's default tags (and most sharegpt files) the second.
SHAREGPT_TURN_SPELLINGS = (("role", "content", "user", "assistant"), ("from", "value", "human", "gpt"))
SHAREGPT_MESSAGE_COLUMNS = ("messages", "conversations")


def _content_text(content: Any) -> str:
    """A turn's content as the text the model is shown: a string as is; a number as written (a JSON field mixing
    numbers and text, ``"content": 3``); a list of parts (the multimodal chat form, ``[{"type": "image"}, {"type":
    "text", "text": "..."}]``) joined as Qwen's chat template joins them, without separator, an image part becoming
    the ``<image>`` placeholder in its place. Raises `UnreadableRow` for any other shape."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (int, float)) and not isinstance(content, bool):
        return str(content)
    if isinstance(content, (list, tuple)):
        pieces = []
        for part in content:
            kind = part.get("type") if isinstance(part, Mapping) else None
            if kind == "image":
                pieces.append("<image>")
            elif kind == "text" and isinstance(part.get("text"), str):
                pieces.append(part["text"])
            else:
                raise UnreadableRow(
                    f"a content part {part!r} is neither {{'type': 'image'}} nor {{'type': 'text', 'text': str}}"
                )
        return "".join(pieces)
    raise UnreadableRow(f"a turn's content is a {type(content).__name__} ({content!r}), not text or a list of parts")


def _turns(messages: Any) -> tuple[str, str]:
    """(user text, assistant text) of a sharegpt conversation: the first user turn and the first assistant turn
    after it. Turns are ``{"role", "content"}`` with roles user / assistant (PAPO-Eval's tags) or ``{"from",
    "value"}`` with human / gpt (LLaMA-Factory's default tags); a turn in neither spelling raises `UnreadableRow`."""
    if not isinstance(messages, (list, tuple)):
        raise SkipRow("bad_prompt", detail=f"messages is a {type(messages).__name__}, not a list of turns")
    user = assistant = None
    for turn in messages:
        if not isinstance(turn, Mapping):
            raise SkipRow("bad_prompt", detail="a turn of messages is not an object with role and content")
        spelling = next((sp for sp in SHAREGPT_TURN_SPELLINGS if sp[0] in turn and turn[sp[0]] is not None), None)
        if spelling is None:
            raise UnreadableRow(
                f"a turn has keys {sorted(turn)}; sharegpt turns are {{'role', 'content'}} or {{'from', 'value'}}"
            )
        role_key, content_key, user_role, assistant_role = spelling
        role = turn[role_key]
        if role == user_role and user is None:
            user = _content_text(turn.get(content_key))
        elif role == assistant_role and user is not None and assistant is None:
            assistant = _content_text(turn.get(content_key))
    if user is None:
        raise SkipRow("empty_question", detail="no user turn in messages")
    return user.strip(), (assistant or "").strip()


_PLACEHOLDER = re.compile(r"<image>")


def _sharegpt(row: Mapping[str, Any], index: int, base_dir: Path | None) -> Record:
    """One item of the authors' sharegpt files: the user turn is the question (its ``<image>`` placeholders, one
    per image, are removed: the prompt builder places the images), the assistant turn the answer."""
    user, assistant = _turns(_first(row, *SHAREGPT_MESSAGE_COLUMNS))
    images = row.get("images")
    # One path as a string (a file mixing that with lists reads back as written): one image, not its characters.
    paths = [images] if isinstance(images, str) else list(images or [])
    placeholders = len(_PLACEHOLDER.findall(user))
    if placeholders != len(paths):
        raise SkipRow("bad_prompt", detail=f"{placeholders} <image> placeholder(s) for {len(paths)} image(s)")
    return Record(
        id=_row_id(row, index, "id"),
        question=_question(_PLACEHOLDER.sub("", user).strip()),
        images=_images(paths, base_dir),
        answer=_answer(assistant),
        meta={"images": [str(p) for p in paths]},
    )


# The authors' two releases (protocol "vppo"), as the public preparation code reads them (zsxm1998/
# awesome-perception-aware-rlvr eval/prepare/{papo_eval,vppo_eval}.py; xhguo7/PAPO-Eval papo_eval/preprocess/
# prepare_data.py): PAPO-Eval holds six of Table 1's columns and the vision-dependent MathVerse subset, VPPO-Eval the
# two the VPPO authors added (DynaMath, MathVision). Row counts are those the preparation code checks.
PAPO_EVAL = "PAPO-Galaxy/PAPO_eval"
VPPO_EVAL = "chamber111/VPPO-Eval"

_MATHVERSE_VISION_VERSIONS = {"Vision Intensive", "Vision Dominant", "Vision Only"}


# Order = the paper's Table 1 columns.
BENCHMARKS: dict[str, Benchmark] = {
    b.name: b
    for b in [
        Benchmark(
            name="mathverse",
            title="MathVerse",
            hf_id="AI4Math/MathVerse",
            config="testmini",
            split="testmini",
            columns=(("sample_index",), ("question",), ("image",), ("answer",)),
            normalize=_mathverse,
            exact_match_only=True,
            sharegpt_names=("AI4Math_MathVerse",),
            release=PAPO_EVAL,
            release_rows=2180,
        ),
        Benchmark(
            name="dynamath",
            title="DynaMath",
            hf_id="DynaMath/DynaMath_Sample",
            config=None,
            split="sample_variant1",
            columns=(("id",), ("question",), ("ground_truth", "answer"), ("decoded_image", "image")),
            normalize=_dynamath,
            exact_match_only=True,
            sharegpt_names=("DynaMath_DynaMath_Sample", "DynaMath_DynaMath"),
            release=VPPO_EVAL,
            release_rows=3666,
        ),
        Benchmark(
            name="mmk12",
            title="MMK12",
            hf_id="FanqingM/MMK12",
            config=None,
            split="test",
            columns=(("question",), ("answer",), ("image", "images")),
            normalize=_mmk12,
            sharegpt_names=("PAPO_MMK12", "FanqingM_MMK12"),
            release=PAPO_EVAL,
            release_rows=2000,
        ),
        Benchmark(
            name="geo3k",
            title="Geo3k",
            hf_id="hiyouga/geometry3k",
            config=None,
            split="test",
            columns=(("images",), ("problem",), ("answer",)),
            normalize=_geo3k,
            sharegpt_names=("hiyouga_geometry3k",),
            release=PAPO_EVAL,
            release_rows=601,
        ),
        Benchmark(
            name="mathvision",
            title="MathVision",
            hf_id="MathLLMs/MathVision",
            config=None,
            split="test",
            columns=(("id",), ("question",), ("options",), ("answer",), ("decoded_image", "image")),
            normalize=_mathvision,
            exact_match_only=True,
            sharegpt_names=("MathLLMs_MathVision",),
            release=VPPO_EVAL,
            release_rows=2907,
        ),
        Benchmark(
            name="wemath",
            title="We-Math",
            hf_id="We-Math/We-Math",
            config=None,
            split="testmini",
            columns=(("question",), ("option",), ("answer",), ("image_path", "image")),
            normalize=_wemath,
            sharegpt_names=("We_Math", "We-Math_We-Math"),
            release=PAPO_EVAL,
            release_rows=1740,
        ),
        Benchmark(
            name="logicvista",
            title="LogicVista",
            hf_id="lscpku/LogicVista",
            config=None,
            split="test",
            columns=(("question",), ("answer",), ("image", "images", "imagename")),
            normalize=_logicvista,
            sharegpt_names=("lscpku_LogicVista",),
            release=PAPO_EVAL,
            release_rows=447,
        ),
        Benchmark(
            name="mmmu_pro",
            title="MMMU-Pro",
            hf_id="MMMU/MMMU_Pro",
            config="standard (10 options)",
            split="test",
            columns=(("id",), ("question",), ("options",), ("answer",), ("image_1",)),
            normalize=_mmmu_pro,
            sharegpt_names=("MMMU_MMMU_Pro",),
            release=PAPO_EVAL,
            release_rows=1730,
        ),
        # Not a Table 1 column: MathVerse restricted to the problem versions whose information is (partly) only in
        # the image, PAPO-Eval's "vision-dependent" file. Our raw-form reading of that subset: the problem
        # versions "Vision Intensive", "Vision Dominant" and "Vision Only".
        Benchmark(
            name="mathverse_vision",
            title="MathVerse-V",
            hf_id="AI4Math/MathVerse",
            config="testmini",
            split="testmini",
            columns=(("sample_index",), ("question",), ("image",), ("answer",), ("problem_version",)),
            normalize=_mathverse,
            exact_match_only=True,
            sharegpt_names=("AI4Math_MathVerse_vision_dependent", "AI4Math_MathVerse-vision-dependent"),
            release=PAPO_EVAL,
            release_rows=1308,
            subset=lambda row: row.get("problem_version") in _MATHVERSE_VISION_VERSIONS,
            in_table1=False,
        ),
    ]
}
# The eight columns of the paper's Table 1, in its order: what "all" selects.
BENCHMARK_NAMES: tuple[str, ...] = tuple(name for name, b in BENCHMARKS.items() if b.in_table1)

_ALIASES = {"geometry3k": "geo3k", "mathv": "mathvision", "mmmupro": "mmmu_pro", "wemath": "wemath"}


def _key(name: str) -> str:
    return re.sub(r"[^a-z0-9]", "", name.lower())


def get_benchmark(name: str) -> Benchmark:
    """The registry entry for ``name``; case, ``-`` and ``_`` are ignored (``"We-Math"``, ``"MMMU_Pro"``)."""
    if not isinstance(name, str):
        raise ValueError(f"benchmark name must be a string, got {type(name).__name__}")
    keys = {_key(b.name): b.name for b in BENCHMARKS.values()} | {_key(b.title): b.name for b in BENCHMARKS.values()}
    keys |= {_key(alias): target for alias, target in _ALIASES.items()}
    found = keys.get(_key(name))
    if found is None:
        close = difflib.get_close_matches(name.lower(), list(BENCHMARKS), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ValueError(f"unknown benchmark {name!r}; valid names: {', '.join(BENCHMARKS)}.{hint}")
    return BENCHMARKS[found]


def resolve_benchmark_names(names: str | Sequence[str]) -> list[str]:
    """``"all"`` -> the eight names in Table 1 order; ``"geo3k,We-Math"`` or a list -> registry names, validated."""
    if isinstance(names, str):
        names = [n for n in (p.strip() for p in names.split(",")) if n]
    if not names:
        raise ValueError("benchmarks must name at least one benchmark, or 'all'")
    if any(_key(n) == "all" for n in names):
        return list(BENCHMARK_NAMES)
    resolved: list[str] = []
    for n in names:
        key = get_benchmark(n).name
        if key not in resolved:
            resolved.append(key)
    return resolved


def fixture_path(name: str) -> Path:
    """The shipped fixture file of benchmark ``name`` (a few rows in its raw schema, real PNG images)."""
    return get_benchmark(name).fixture


# ---------------------------------------------------------------------------------------------------------------
# Loading
# ---------------------------------------------------------------------------------------------------------------


def _unavailable(spec: Benchmark, source: str, config: str | None, split: str, err: Exception) -> Exception:
    columns = ", ".join(" | ".join(group) for group in spec.columns)
    return BenchmarkUnavailableError(
        f"could not load {spec.title} from {source!r} (config={config!r}, split={split!r}): "
        f"{type(err).__name__}: {err}\n"
        f"Offline? On a machine with network run\n"
        f"    huggingface-cli download {spec.hf_id} --repo-type dataset --local-dir DIR\n"
        f"then copy DIR here and pass it as the source (load_benchmark({spec.name!r}, source=DIR)); or pass "
        f"source=FILE, one .parquet/.jsonl file of the {split!r} split with the raw columns [{columns}]."
    )


def _open(spec: Benchmark, source: str | Path | None, split: str, config: str | None) -> tuple[Any, Path | None, str]:
    """Open the raw split as a ``datasets.Dataset``; returns (dataset, base_dir for relative image paths, label)."""
    import datasets

    if source is None:
        source = spec.hf_id
    # Resolved once, here: the folder relative image paths are joined to is absolute, so no later join (ours or
    # the image decoder's) can apply a relative folder twice, and the label names the file wherever it is read.
    path = Path(source).expanduser().resolve()
    label = str(path) if path.exists() else str(source)
    if path.is_file():
        return load_data_file(path, "train", label="source"), path.parent, label
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            loaded = datasets.load_from_disk(str(path))
            return _pick_split(loaded, split, label), path, label
        return _pick_split(load_data_folder(path, label="source", config=config), split, label), path, label
    if str(source).startswith((".", "/", "~")) or "\\" in str(source):
        raise ValueError(f"source {label!r} does not exist; pass an existing file or folder, or a hub id")
    try:
        return datasets.load_dataset(str(source), name=config, split=split), None, label
    except Exception as err:  # offline, unknown id, missing split: one clear message
        raise _unavailable(spec, label, config, split, err) from err


def _pick_split(loaded: Any, split: str, label: str) -> Any:
    import datasets

    if isinstance(loaded, datasets.Dataset):
        return loaded
    if split in loaded:
        return loaded[split]
    if len(loaded) == 1:  # a single data file: its split name says nothing about the benchmark split
        return next(iter(loaded.values()))
    raise ValueError(f"source {label!r} has splits {sorted(loaded)}, not {split!r}; pass split= one of them")


def _check_columns(spec: Benchmark, column_names: Sequence[str], label: str) -> None:
    missing = [group for group in spec.columns if not any(name in column_names for name in group)]
    if missing:
        wanted = ", ".join(" or ".join(repr(n) for n in group) for group in missing)
        raise ValueError(
            f"{spec.title} source {label!r} lacks column(s) {wanted}; it has {sorted(column_names)}. "
            f"Pass the raw {spec.hf_id} data (split {spec.split!r}) or rename the columns."
        )


def _unique_ids(records: list[Record]) -> list[Record]:
    seen: Counter[str] = Counter()
    out = []
    for rec in records:
        seen[rec.id] += 1
        if seen[rec.id] > 1:
            rec = Record(rec.id + f"#{seen[rec.id]}", rec.question, rec.images, rec.answer, rec.choices, rec.meta)
        out.append(rec)
    return out


SHAREGPT_COLUMNS = ("messages", "images")


def data_form(column_names: Sequence[str]) -> str:
    """ "sharegpt" for conversation files (a ``messages`` or ``conversations`` column), else "raw"."""
    return "sharegpt" if any(c in column_names for c in SHAREGPT_MESSAGE_COLUMNS) else "raw"


def load_benchmark_report(
    name: str,
    source: str | Path | None = None,
    limit: int | None = None,
    *,
    split: str | None = None,
    config: str | None = None,
    protocol: str | None = None,
) -> LoadReport:
    """Load benchmark ``name`` and normalise it into ``Record`` s, reporting skipped rows by reason.

    source: None (the hub id), a hub id, a local folder or a local data file (see the module docstring).
    limit: keep at most this many records (counted after skips and filtering; rows are read in order).
    split / config: override the registry's (ignored for a single local file, which holds one split).
    protocol: None reads either data form; "vppo" requires the authors' sharegpt files and "raw" a benchmark's own
        release (``PROTOCOLS``), so a number is never labelled with a protocol its items do not follow.
    Raises ValueError for an unknown benchmark, a bad argument, a missing column or data of the wrong form;
    ``BenchmarkUnavailableError`` when the data cannot be read (e.g. offline without a local copy).
    """
    spec = get_benchmark(name)
    if limit is not None and (not isinstance(limit, int) or isinstance(limit, bool) or limit < 0):
        raise ValueError(f"limit must be None or a non-negative int, got {limit!r}")
    if protocol is not None and protocol not in PROTOCOLS:
        raise ValueError(f"protocol must be one of {sorted(PROTOCOLS)}, got {protocol!r}")
    split = split or spec.split
    config = spec.config if config is None else config
    dataset, base_dir, label = _open(spec, source, split, config)
    form = data_form(dataset.column_names)
    if protocol == "vppo" and form != "sharegpt":
        raise ValueError(
            f"{spec.title} source {label!r} is in the benchmark's own schema, but protocol 'vppo' scores the authors' "
            f"item sets: pass their sharegpt file ({' or '.join(n + '.json' for n in spec.sharegpt_names)}; see the "
            "vppo-eval README, 'Protocols'), or use protocol 'raw' for this data"
        )
    if protocol == "raw" and form != "raw":
        raise ValueError(
            f"{spec.title} source {label!r} is a sharegpt conversation file (the authors' item sets): evaluate it "
            "with protocol 'vppo', or pass the benchmark's own release for protocol 'raw'"
        )
    if form == "sharegpt":
        if "images" not in dataset.column_names:
            raise ValueError(
                f"{spec.title} source {label!r} has a conversation column but lacks 'images'; the sharegpt form this "
                f"reader follows has columns {list(SHAREGPT_COLUMNS)} (PAPO-Eval's data/dataset_info.json; "
                "'conversations' in place of 'messages' is read too)"
            )
        normalize, exact_filter, subset = _sharegpt, False, None  # the authors' items, as they are
    else:
        _check_columns(spec, dataset.column_names, label)
        normalize, exact_filter, subset = spec.normalize, spec.exact_match_only, spec.subset

    records: list[Record] = []
    skipped: Counter[str] = Counter()
    n_rows = 0
    for index, row in enumerate(iter_rows(dataset)):
        if limit is not None and len(records) >= limit:
            break
        n_rows += 1
        if subset is not None and not subset(row):
            skipped["not_in_subset"] += 1
            continue
        try:
            record = normalize(row, index, base_dir)
        except SkipRow as skip:
            skipped[skip.reason] += 1
            continue
        except UnreadableRow as err:
            schema = "the sharegpt form" if form == "sharegpt" else f"{spec.title}'s raw schema ('Benchmark schemas')"
            raise ValueError(
                f"{spec.title} source {label!r}, row {index} (counting from 0): {err}. Convert the file to {schema} "
                "as the vppo-eval README describes"
            ) from err
        if exact_filter and not _exact_match_item(record, row):
            skipped["not_exact_match"] += 1
            continue
        records.append(record)
    expected = spec.release_rows if form == "sharegpt" else None
    return LoadReport(
        spec.name, label, _unique_ids(records), n_rows, dict(skipped), data_form=form, expected_items=expected
    )


def _exact_match_item(record: Record, row: Mapping[str, Any]) -> bool:
    """The paper's exact-match filter: DynaMath's own ``answer_type`` where the row has one, else the answer's
    form (``is_exact_match_answer``)."""
    answer_type = row.get("answer_type")
    if isinstance(answer_type, str) and answer_type.strip():
        return answer_type.strip().lower() in _DYNAMATH_EXACT_TYPES
    return is_exact_match_answer(record.answer)


def load_benchmark(
    name: str,
    source: str | Path | None = None,
    limit: int | None = None,
    *,
    split: str | None = None,
    config: str | None = None,
    protocol: str | None = None,
) -> list[Record]:
    """``load_benchmark_report(...).records``: the usable items of benchmark ``name`` as ``Record`` s."""
    return load_benchmark_report(name, source, limit, split=split, config=config, protocol=protocol).records
