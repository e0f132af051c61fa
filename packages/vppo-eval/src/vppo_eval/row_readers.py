"""How one row of each benchmark's release becomes a `Record`: the row helpers, the exact-match filter, one reader
per raw release (Geo3k, We-Math, MMK12, MathVerse, MathVision, DynaMath, LogicVista, MMMU-Pro) and the reader of the
authors' sharegpt files. The registry that names them is `vppo_eval.benchmarks`.

A reader takes (row, index, base_dir) and returns a Record, or raises `SkipRow` (counted by reason) or
`UnreadableRow` (the file is refused, naming the row).
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from vppo_eval.records import Record
from vppo_eval.releases import resolve_image
from vppo_eval.reward import choice_letters
from vppo_rollout.images import SkipRow, decode_image

_OPTION_LETTERS = "ABCDEFGHIJ"


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
