"""The reward = the grader: a table of tricky cases, parity with the reference pipeline, never raising on junk."""

from __future__ import annotations

import math
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mathruler.grader import extract_boxed_content, grade_answer

from vppo_eval.reward import (
    choice_letters,
    compute_rewards,
    extract_boxed,
    format_reward,
    grade,
    normalize_spacing,
)


def boxed(answer: str) -> str:
    return f"<think>some reasoning</think> The answer is \\boxed{{{answer}}}."


# (response, ground truth, expected accuracy, why)
TRICKY = [
    # fractions and LaTeX
    (boxed("\\frac{1}{2}"), "1/2", 1.0, "latex fraction vs slash fraction"),
    (boxed("\\dfrac{1}{2}"), "\\frac{1}{2}", 1.0, "dfrac"),
    (boxed("\\tfrac{3}{4}"), "0.75", 1.0, "tfrac vs decimal"),
    (boxed("0.5"), "\\frac{1}{2}", 1.0, "decimal vs fraction"),
    (boxed("2/4"), "1/2", 0.0, "unreduced fraction is wrong (mathruler rule)"),
    (boxed("\\frac{\\sqrt{3}}{2}"), "\\frac{\\sqrt3}{2}", 1.0, "sqrt with and without braces"),
    (boxed("3\\sqrt{2}"), "\\sqrt{18}", 1.0, "sympy equivalence"),
    (boxed("4.24"), "3\\sqrt{2}", 0.0, "a rounded value is not the exact value"),
    (boxed("2\\pi"), "2\\pi", 1.0, "pi"),
    (boxed("x=5"), "5", 1.0, "leading variable assignment"),
    (boxed("5.0"), "5", 1.0, "trailing zero"),
    (boxed("1,000"), "1000", 1.0, "thousands separator"),
    (boxed("(1,2)"), "(1, 2)", 1.0, "tuple spacing"),
    # units, degrees, percent
    (boxed("5 cm"), "5", 1.0, "unit dropped"),
    (boxed("60^\\circ"), "60", 1.0, "latex degree"),
    (boxed("60 degrees"), "60", 1.0, "degree word"),
    (boxed("50\\%"), "50", 1.0, "latex percent"),
    (boxed("50%"), "50", 1.0, "percent sign"),
    (boxed("61"), "60", 0.0, "wrong number"),
    # multiple choice
    (boxed("B"), "B", 1.0, "letter"),
    (boxed("(B)"), "B", 1.0, "parenthesised letter"),
    (boxed("b"), "B", 1.0, "lower-case letter"),
    (boxed("\\text{B}"), "B", 1.0, "text-wrapped letter"),
    (boxed("B. 12 cm"), "B", 1.0, "letter followed by the option text"),
    (boxed("B: 12"), "B", 1.0, "letter, colon, option text"),
    (boxed("C"), "B", 0.0, "wrong letter"),
    (boxed("Because"), "B", 0.0, "a word starting with the letter"),
    (boxed("A, C"), "A, C", 1.0, "two letters"),
    (boxed("A,C"), "A, C", 1.0, "two letters without space"),
    (boxed("C, A"), "A, C", 1.0, "two letters in another order"),
    (boxed("A and C"), "A, C", 1.0, "two letters joined by 'and'"),
    (boxed("A"), "A, C", 0.0, "a subset of the letters"),
    (boxed("A, B, C"), "A, C", 0.0, "a superset of the letters"),
    (boxed("AC"), "A, C", 0.0, "run-together letters are ambiguous"),
    (boxed("12"), "B", 0.0, "option value instead of its letter"),
    # extraction: two boxes, nesting, unbalanced braces, empty
    ("\\boxed{3} no wait \\boxed{4}", "4", 1.0, "the last box counts"),
    ("\\boxed{3} no wait \\boxed{4}", "3", 0.0, "an earlier box does not count"),
    ("\\boxed{\\frac{1}{\\sqrt{4}}}", "1/2", 1.0, "nested braces"),
    ("\\boxed{3} then \\boxed{4", "3", 0.0, "unbalanced last box: no answer, no fallback"),
    ("\\boxed{{5}", "5", 0.0, "never closes"),
    ("The answer is 5.", "5", 0.0, "no box"),
    ("\\boxed{}", "5", 0.0, "empty box"),
    ("", "5", 0.0, "empty response"),
    (boxed("5"), "", 0.0, "empty ground truth"),
    # spacing normalisation (Qwen2.5-VL-32B style)
    ("< think > x < / think > \\boxed{1 / 2}", "\\frac{1}{2}", 1.0, "spaces around < > /"),
    # words (the synthetic task's answers)
    (boxed("Red"), "red", 1.0, "case-insensitive words"),
    (boxed("left"), "right", 0.0, "different words"),
]


@pytest.mark.parametrize(("response", "answer", "expected", "why"), TRICKY, ids=[case[3] for case in TRICKY])
def test_grade_on_tricky_cases(response, answer, expected, why):
    assert grade(response, answer) == expected, why


def _reference_accuracy(response: str, ground_truth: str) -> float:
    """The VPPO/EasyR1 reference accuracy reward, verbatim."""
    response = re.sub(r"\s*(<|>|/)\s*", r"\1", response)
    return 1.0 if grade_answer(extract_boxed_content(response), ground_truth) else 0.0


@pytest.mark.parametrize(("response", "answer", "expected", "why"), TRICKY, ids=[case[3] for case in TRICKY])
def test_multiple_choice_off_reproduces_the_reference_reward(response, answer, expected, why):
    assert grade(response, answer, multiple_choice=False) == _reference_accuracy(response, answer), why


def test_multiple_choice_rule_only_adds_letter_matches_the_reference_misses():
    # Cases where the reference says 0 and we say 1 must all be letter-set ground truths.
    widened = [(r, a) for r, a, _, _ in TRICKY if grade(r, a) != _reference_accuracy(r, a)]
    assert widened, "the table should contain letter forms mathruler rejects"
    for response, answer in widened:
        assert grade(response, answer) == 1.0 and _reference_accuracy(response, answer) == 0.0
        assert choice_letters(answer) is not None


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("\\boxed{1}", "1"),
        ("a \\boxed{ 1 } b", "1"),
        ("\\boxed{1} \\boxed{2}", "2"),
        ("\\boxed{\\frac{a}{b}}", "\\frac{a}{b}"),
        ("\\boxed{1} \\boxed{2", None),
        ("no box", None),
        ("\\boxed{}", ""),
    ],
)
def test_extract_boxed_takes_the_last_balanced_box(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("answer", "expected"),
    [
        ("B", {"B"}),
        ("(b)", {"B"}),
        ("C, A", {"A", "C"}),
        ("A; C", {"A", "C"}),
        ("J", {"J"}),
        ("K", None),
        ("12", None),
        ("AB", None),
        ("", None),
    ],
)
def test_choice_letters_parses_option_sets(answer, expected):
    result = choice_letters(answer)
    assert (None if result is None else set(result)) == expected


def test_normalize_spacing_removes_spaces_around_angle_brackets_and_slash():
    assert normalize_spacing("< think >a / b< /think >") == "<think>a/b</think>"


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("<think>reasoning</think> so \\boxed{5}", 1.0),
        ("<think>\nmulti\nline\n</think>\n\\boxed{5}\nDone.", 1.0),
        ("< think > spaced < / think > \\boxed{5}", 1.0),
        ("<think>reasoning</think> no box", 0.0),
        ("reasoning</think> \\boxed{5}", 0.0),
        ("\\boxed{5}", 0.0),
        ("prefix <think>r</think> \\boxed{5}", 0.0),
    ],
)
def test_format_reward_requires_think_block_then_box(response, expected):
    assert format_reward(response) == expected


def test_compute_rewards_mixes_accuracy_and_format_with_weight():
    responses = [boxed("2"), "\\boxed{2}", "<think>x</think> \\boxed{3}", "junk"]
    out = compute_rewards(responses, ["2", "2", "2", "2"])
    assert out["accuracy"] == [1.0, 1.0, 0.0, 0.0]
    assert out["format"] == [1.0, 0.0, 1.0, 0.0]
    assert out["reward"] == pytest.approx([1.0, 0.9, 0.1, 0.0])
    weighted = compute_rewards(responses, ["2"] * 4, format_weight=0.5)
    assert weighted["reward"] == pytest.approx([1.0, 0.5, 0.5, 0.0])


def test_compute_rewards_rejects_mismatched_lengths_and_bad_weight():
    with pytest.raises(ValueError, match="same length"):
        compute_rewards(["a", "b"], ["a"])
    with pytest.raises(ValueError, match="format_weight"):
        compute_rewards(["a"], ["a"], format_weight=1.5)
    with pytest.raises(ValueError, match="sequences"):
        compute_rewards("a", "a")


def test_grade_returns_zero_for_non_string_inputs():
    assert grade(None, "1") == 0.0  # type: ignore[arg-type]
    assert grade(boxed("1"), None) == 0.0  # type: ignore[arg-type]
    assert format_reward(None) == 0.0  # type: ignore[arg-type]


_JUNK_PIECES = st.sampled_from(
    [
        "\\boxed{",
        "}",
        "{",
        "\\frac",
        "^{",
        "^",
        "<think>",
        "</think>",
        "/",
        "(",
        ")",
        ",",
        "A",
        "x",
        "1",
        "0",
        " ",
        "\\",
    ]
)


@settings(max_examples=150, deadline=None)
@given(
    response=st.one_of(st.text(max_size=60), st.lists(_JUNK_PIECES, max_size=25).map("".join)),
    answer=st.one_of(st.text(max_size=10), st.sampled_from(["1/2", "A, C", "B", "\\frac{1}{2}", "x^2"])),
)
def test_rewards_never_raise_and_stay_in_range(response, answer):
    out = compute_rewards([response], [answer])
    assert out["accuracy"][0] in (0.0, 1.0)
    assert out["format"][0] in (0.0, 1.0)
    assert 0.0 <= out["reward"][0] <= 1.0


@pytest.mark.parametrize("junk", ["9**9**9", "9999999!", "factorial(99999999)", "pow(9, 9**99)", "gamma(10**9)"])
def test_inputs_that_hang_sympy_are_graded_without_it(junk):
    import threading

    result = {}
    worker = threading.Thread(target=lambda: result.update(score=grade(boxed(junk), "\\sqrt{2}")), daemon=True)
    worker.start()
    worker.join(timeout=10)
    assert result == {"score": 0.0}, f"grading {junk!r} did not finish within 10 s"
    assert grade(boxed(junk), junk) == 1.0  # string equality still counts


# ---------------------------------------------------------------------------------------------------------------
# Linear time: the reference's regular expressions, kept here as the specification
# ---------------------------------------------------------------------------------------------------------------

REFERENCE_SPACING = re.compile(r"\s*(<|>|/)\s*")
REFERENCE_FORMAT = re.compile(r"<think>.*</think>.*\\boxed\{.*\}.*", re.DOTALL)
# the characters the two patterns care about, plus some that they do not
PIECES = st.sampled_from(
    ["<think>", "</think>", "\\boxed{", "}", "{", "<", ">", "/", " ", "\n", "\t", "x", "1", "\u3000"]
)


@settings(max_examples=600, deadline=None)
@given(st.lists(PIECES, max_size=24).map("".join))
def test_normalize_spacing_equals_the_reference_substitution(text):
    assert normalize_spacing(text) == REFERENCE_SPACING.sub(r"\1", text)


@settings(max_examples=600, deadline=None)
@given(st.lists(PIECES, max_size=24).map("".join))
def test_format_reward_equals_the_reference_fullmatch(text):
    expected = 1.0 if REFERENCE_FORMAT.fullmatch(REFERENCE_SPACING.sub(r"\1", text)) else 0.0
    assert format_reward(text) == expected


ADVERSARIAL = {
    "spaces": " " * 100_000 + "x",  # the reference spacing rule: 113 s
    "spaces_then_tag": " " * 50_000 + "x" + " " * 50_000 + "<",
    "think_boxed": "<think>" + "</think>\\boxed{" * 6_600,
    "close_think_boxed": "</think>\\boxed{" * 6_600,
    "unclosed_box": "<think></think>\\boxed{" + "{" * 100_000,
    "angles": "< " * 50_000,
    "sum_box": "<think></think>\\boxed{" + "1+" * 50_000 + "1}",
    "frac_box": "<think></think>\\boxed{" + "\\frac{1}{2}" * 9_000 + "}",  # mathruler's normalisation: 1.2 s
    "sqrt_box": "<think></think>\\boxed{" + "\\sqrt{" * 5_000 + "2" + "}" * 5_001,
    "parens_box": "<think></think>\\boxed{" + "(" * 50_000 + "1" + ")" * 49_990 + "}",
    "letters_box": "<think></think>\\boxed{" + "A, " * 33_000 + "B}",
    "digits_box": "<think></think>\\boxed{" + "9" * 100_000 + "}",
    "many_boxes": "<think></think>" + "\\boxed{1}" * 11_000,
    "frac_box_at_the_cap": "<think></think>\\boxed{" + ("\\frac{1}{2}" * 100)[:1000] + "}",
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("multiple_choice", [False, True])
def test_adversarial_responses_up_to_100_kb_are_graded_in_under_50_ms(name, multiple_choice):
    import time

    text = ADVERSARIAL[name]
    assert len(text) <= 100_100
    compute_rewards([text], ["1"], multiple_choice=multiple_choice)  # warm caches (sympy imports, regexes)
    best = math.inf
    for _ in range(3):  # the best of three: a loaded CI machine can stall any single call
        start = time.perf_counter()
        compute_rewards([text], ["\\frac{1}{2}"], multiple_choice=multiple_choice)
        compute_rewards([text], ["A, B"], multiple_choice=multiple_choice)
        best = min(best, (time.perf_counter() - start) / 2)
    assert best < 0.05, f"{name}: {best * 1e3:.1f} ms"


def test_an_overlong_box_counts_only_when_identical_to_the_ground_truth():
    from vppo_eval.reward import MAX_ANSWER_CHARS

    long_truth = "1" * (MAX_ANSWER_CHARS + 1)
    assert grade(boxed(long_truth), long_truth) == 1.0
    assert grade(boxed("0.5" + "0" * MAX_ANSWER_CHARS), "1/2") == 0.0  # equivalent, but too long to grade
    assert grade(boxed("0.5" + "0" * 10), "1/2") == 1.0
