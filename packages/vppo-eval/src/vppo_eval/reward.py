"""The math reward, which is also the benchmark grader (ALGORITHMS.md §8).

One function grades both RL rollouts and evaluation samples, so a training curve and an avg@k number mean the same
thing. The pipeline is the one of the VPPO reference reward (EasyR1 ``examples/reward_function/math.py``, also used
verbatim by PAPO-Eval):

1. ``normalize_spacing``: drop whitespace around ``<``, ``>`` and ``/`` (Qwen2.5-VL-32B writes ``< think >``).
2. ``extract_boxed``: the content of the **last** ``\\boxed{`` in the text, read up to its matching ``}``.
3. ``mathruler.grader.grade_answer(boxed, ground_truth)``: string normalisation, then a sympy equivalence check
   (skipped for strings with ``**``, ``!``, ``factorial`` or ``gamma``, which can make sympy run forever).

Accuracy is 1.0 or 0.0, the format reward is 1.0 when the whole response matches
``<think>…</think>…\\boxed{…}…``, and ``reward = (1 - format_weight) * accuracy + format_weight * format``
(0.9 / 0.1 by default).

One addition over the reference, on by default and switchable off (``multiple_choice=False`` gives the reference
result on every input except the guards noted here: the sympy guard above; a response without a box, which the
reference grades as the string ``"None"``; and a boxed answer longer than ``max(MAX_ANSWER_CHARS, 4 × the ground
truth)``, which counts only when identical to the ground truth, because mathruler's normalisation is super-linear in
the answer's length (1.2 s for a 100 KB box of ``\frac{1}{2}``)): when the ground truth is a set of option letters (``"B"``, ``"A, C"``), a boxed answer that
names exactly the same set of letters is also correct — ``"(B)"``, ``"B. 12 cm"``, ``"\\text{B}"``, ``"C, A"``,
``"A and C"``. mathruler alone accepts ``"(B)"`` and ``"A,C"`` but rejects ``"C, A"`` and ``"B. 12 cm"``. The extra
rule can only turn a 0 into a 1, never the reverse, and never for a non-letter ground truth.

Nothing here raises on model output: junk, ``None``, unbalanced braces, sympy blow-ups all score 0. Every step
takes time linear in the response's length (the reference's two regular expressions backtrack super-linearly:
113 s for 100 KB of spaces); ``tests/test_reward.py`` bounds adversarial 100 KB responses to 50 ms each.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from mathruler.grader import _normalize, grade_answer
from mathruler.math_normalize import normalize_answer

__all__ = [
    "DEFAULT_FORMAT_WEIGHT",
    "MAX_ANSWER_CHARS",
    "choice_letters",
    "compute_rewards",
    "extract_boxed",
    "format_reward",
    "grade",
    "normalize_spacing",
]

DEFAULT_FORMAT_WEIGHT = 0.1
# Longest boxed answer handed to mathruler (see the module docstring); ground truths are a few characters.
MAX_ANSWER_CHARS = 1000

# A whitespace run before or after "<", ">" or "/". The reference's r"\s*(<|>|/)\s*" is retried from every position
# inside a run and rescans the rest of it each time: quadratic, 113 s for 100 KB of spaces. Here a run can start a
# match only at its first character (the look-behind), so each run is scanned a bounded number of times.
_SPACE_AT_DELIMITER = re.compile(r"(?<!\s)\s+(?=[<>/])|(?<=[<>/])\s+")
_BOXED = "\\boxed{"

# One option letter, optionally wrapped as "(A)", "[A]", "\text{A}", "\textbf{A}", "\mathrm{A}", followed by nothing
# or by the option text after ".", ":" or ")" ("A. 12 cm", "A: yes", "A) 5"). Letters A-J cover MMMU-Pro's 10 options.
_LETTER_ITEM = re.compile(
    r"""^\s*
    (?:\\(?:text|textbf|mathrm|mathbf)\s*\{\s*)?   # optional LaTeX text wrapper
    [(\[]?\s*(?P<letter>[A-Ja-j])\s*[)\]]?          # the letter, maybe in brackets
    \s*\}?                                         # closing brace of the wrapper
    (?:\s*[.:)]\s*.*)?                             # optional option text after . : )
    \s*$""",
    re.VERBOSE | re.DOTALL,
)
# mathruler guards its sympy check against "^{", "^(" and long "^" exponents, but not against Python's "**" or "!",
# which sympy's parser evaluates eagerly: grading "9**9**9" or "9999999!" never returns. For such strings only
# mathruler's two string-normalisation comparisons are run (identical results wherever sympy was not needed).
_UNSAFE_FOR_SYMPY = re.compile(r"\*\*|!|factorial|gamma", re.IGNORECASE)
# Ground truths count as option letters only in upper case: a lower-case "a" may be a variable.
_GT_LETTERS = re.compile(r"^\s*\(?[A-J]\)?(?:\s*(?:,|;|and|&)\s*\(?[A-J]\)?)*\s*$")
_SPLIT_LETTERS = re.compile(r"\s*(?:,|;|\band\b|&)\s*")


def normalize_spacing(text: str) -> str:
    """Remove whitespace around ``<``, ``>`` and ``/``: the reference's ``re.sub(r"\\s*(<|>|/)\\s*", r"\\1", text)``,
    in time linear in the length."""
    return _SPACE_AT_DELIMITER.sub("", text)


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{…}`` in ``text``, brace-balanced, stripped; ``None`` when there is none.

    Only the *last* ``\\boxed{`` is considered (as in ``mathruler.grader.extract_boxed_content``): a response whose
    last box never closes (``"\\boxed{1} … \\boxed{2"``) has no answer — we do not fall back to an earlier box, so
    a model cannot hedge with several boxes. Non-string input returns ``None``.
    """
    if not isinstance(text, str):
        return None
    start = text.rfind(_BOXED)
    if start == -1:
        return None
    depth = 0
    body_start = start + len(_BOXED)
    for i in range(body_start, len(text)):
        char = text[i]
        if char == "{":
            depth += 1
        elif char == "}":
            if depth == 0:
                return text[body_start:i].strip()
            depth -= 1
    return None


def choice_letters(answer: str) -> frozenset[str] | None:
    """The set of option letters named by ``answer`` (``"(B)"`` -> {B}, ``"C, A"`` -> {A, C}), or ``None``.

    ``None`` when any comma/``and``-separated item is not a single option letter (A-J), e.g. ``"12"`` or ``"AB"``.
    """
    if not isinstance(answer, str) or not answer.strip():
        return None
    letters = set()
    for item in _SPLIT_LETTERS.split(answer.strip()):
        if not item:
            return None
        match = _LETTER_ITEM.match(item)
        if match is None:
            return None
        letters.add(match.group("letter").upper())
    return frozenset(letters)


def _grade_answer_safe(given: str, ground_truth: str) -> bool:
    """``mathruler.grader.grade_answer`` without its sympy stage for inputs that can hang it."""
    if not (_UNSAFE_FOR_SYMPY.search(given) or _UNSAFE_FOR_SYMPY.search(ground_truth)):
        return grade_answer(given, ground_truth)
    if normalize_answer(given) == normalize_answer(ground_truth):
        return True
    normalized = _normalize(ground_truth)
    return normalized is not None and normalized == _normalize(given)


def _is_letter_answer(ground_truth: str) -> bool:
    return bool(_GT_LETTERS.match(ground_truth))


def _grade_boxed(boxed: str | None, ground_truth: str, *, multiple_choice: bool) -> float:
    """Grade an already extracted answer. Never raises."""
    if boxed is None or not isinstance(ground_truth, str) or not ground_truth.strip():
        return 0.0
    if len(boxed) > max(MAX_ANSWER_CHARS, 4 * len(ground_truth)):
        return 1.0 if boxed == ground_truth.strip() else 0.0
    try:
        if _grade_answer_safe(boxed, ground_truth):
            return 1.0
    except Exception:  # sympy/latex parsing of junk may raise anything; junk scores 0
        return 0.0
    if multiple_choice and _is_letter_answer(ground_truth):
        predicted = choice_letters(boxed)
        if predicted is not None and predicted == choice_letters(ground_truth):
            return 1.0
    return 0.0


def grade(response: str, answer: str, *, multiple_choice: bool = True) -> float:
    """Accuracy of one response: 1.0 if its last ``\\boxed{}`` matches ``answer``, else 0.0. Never raises.

    response: the model's full text; answer: the ground truth (e.g. ``"\\frac{1}{2}"``, ``"B"``, ``"A, C"``).
    ``multiple_choice=False`` gives exactly the reference reward (mathruler only), see the module docstring.
    """
    if not isinstance(response, str):
        return 0.0
    return _grade_boxed(extract_boxed(normalize_spacing(response)), answer, multiple_choice=multiple_choice)


def format_reward(response: str) -> float:
    """1.0 when the space-normalised response fully matches ``<think>…</think>…\\boxed{…}…``, else 0.0.

    The reference is ``re.fullmatch(r"<think>.*</think>.*\\\\boxed\\{.*\\}.*", text, re.DOTALL)``, whose nested
    ``.*`` backtrack super-linearly. Since every ``.*`` matches anything, the pattern matches exactly when the text
    starts with ``<think>`` and ``</think>``, ``\\boxed{`` and ``}`` follow in that order; taking the earliest of
    each leaves the most room for the next, so four ``find`` calls decide it in linear time.
    """
    if not isinstance(response, str):
        return 0.0
    text = normalize_spacing(response)
    if not text.startswith("<think>"):
        return 0.0
    end_think = text.find("</think>", len("<think>"))
    if end_think == -1:
        return 0.0
    box = text.find(_BOXED, end_think + len("</think>"))
    if box == -1:
        return 0.0
    return 1.0 if text.find("}", box + len(_BOXED)) != -1 else 0.0


def compute_rewards(
    responses: Sequence[str],
    answers: Sequence[str],
    *,
    format_weight: float = DEFAULT_FORMAT_WEIGHT,
    multiple_choice: bool = True,
) -> dict[str, list[float]]:
    """Batch reward, the function a recipe calls on a rollout batch.

    responses: [N] model texts; answers: [N] ground truths (response i is graded against answers[i]; repeat each
    answer G times for a group of G responses).
    Returns ``{"reward": [N], "accuracy": [N], "format": [N]}`` with
    ``reward = (1 - format_weight) * accuracy + format_weight * format``.
    Raises ValueError on mismatched lengths or ``format_weight`` outside [0, 1] (caller bugs, not model output).
    """
    if isinstance(responses, str) or isinstance(answers, str):
        raise ValueError("responses and answers must be sequences of strings, not a single string; wrap it in a list")
    if len(responses) != len(answers):
        raise ValueError(
            f"responses and answers must have the same length, got {len(responses)} and {len(answers)}; "
            "repeat each answer once per sampled response"
        )
    if not 0.0 <= format_weight <= 1.0:
        raise ValueError(f"format_weight must be in [0, 1], got {format_weight}")
    accuracy = [grade(r, a, multiple_choice=multiple_choice) for r, a in zip(responses, answers)]
    fmt = [format_reward(r) for r in responses]
    reward = [(1.0 - format_weight) * acc + format_weight * f for acc, f in zip(accuracy, fmt)]
    return {"reward": reward, "accuracy": accuracy, "format": fmt}
