"""Graders: boxed extraction, math equivalence (math-verify and the string fallback), choice letters, pass@k."""

from __future__ import annotations

import threading
from math import comb

import pytest

from egps_ppl.errors import EGPSError
from egps_ppl.evals import graders
from egps_ppl.evals.graders import (
    extract_boxed,
    extract_choice,
    extract_int_answer,
    grade_exact_int,
    grade_math,
    math_equal,
    pass_at_k,
)

EQUIVALENT = [
    (r"\frac{1}{2}", "0.5"),
    (r"\frac{1}{2}", "1/2"),
    (r"\dfrac{1}{2}", r"\frac12"),
    (r"2\sqrt{2}", r"\sqrt{8}"),
    (r"\frac{\sqrt{2}}{2}", r"\frac{1}{\sqrt{2}}"),
    ("[1,2)", "[1, 2)"),
    (r"(-\infty, 3)", r"(-\infty,3)"),
    ("10", r"10\text{ cm}"),
    ("90", r"90^\circ"),
    (r"\{1,2\}", r"\{2,1\}"),
    ("x^2+1", "1+x^2"),
    ("1000", "1,000"),
]
NOT_EQUIVALENT = [
    (r"\frac{1}{2}", r"\frac{1}{3}"),
    (r"2\sqrt{2}", r"\sqrt{2}"),
    ("[1,2)", "[1,2]"),
    ("(1,2]", "[1,2]"),
    ("10", "100"),
    ("3", "-3"),
    (r"\frac{1}{\sqrt{2}}", r"\sqrt{2}"),
]


def test_boxed_nested_and_last_wins() -> None:
    assert extract_boxed(r"\boxed{\frac{1}{\sqrt{2}}}") == r"\frac{1}{\sqrt{2}}"
    assert extract_boxed(r"first \boxed{3}, then \boxed{\{1, \{2\}\}} end") == r"\{1, \{2\}\}"
    assert extract_boxed(r"try \boxed{1} ... actually \boxed{2}") == "2"
    assert extract_boxed(r"\fbox{7}") == "7"
    assert extract_boxed(r"so \boxed 5.") == "5"
    assert extract_boxed("no box here") is None
    assert extract_boxed(r"\boxed{12} and a truncated \boxed{\frac{1}{2") == "12"  # unclosed one is not an answer


@pytest.mark.parametrize(("gold", "pred"), EQUIVALENT)
def test_equivalent(gold: str, pred: str) -> None:
    ok, _ = math_equal(gold, pred)
    assert ok, (gold, pred)


@pytest.mark.parametrize(("gold", "pred"), NOT_EQUIVALENT)
def test_not_equivalent(gold: str, pred: str) -> None:
    ok, _ = math_equal(gold, pred)
    assert not ok, (gold, pred)


def test_grade_math_uses_last_boxed() -> None:
    text = r"Maybe \boxed{\frac{1}{3}}. Checking again: the answer is \boxed{\frac{1}{\sqrt{2}}}."
    result = grade_math(r"\frac{\sqrt{2}}{2}", text)
    assert result.correct and result.extracted == r"\frac{1}{\sqrt{2}}"
    wrong = grade_math(r"\frac{1}{3}", text)
    assert not wrong.correct
    missing = grade_math("5", "The answer is 5.")  # the MATH500 protocol: boxed only
    assert not missing.correct and missing.extracted is None
    assert grade_math("5", "The answer is 5.", fallback=True).correct


def test_string_fallback_without_math_verify(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(graders, "has_math_verify", lambda: False)
    assert math_equal(r"\frac{1}{2}", "0.5") == (True, "string")
    assert math_equal(r"10", r"10\text{ cm}")[0]
    assert math_equal(r"\dfrac{3}{4}", r"\frac34")[0]
    assert not math_equal(r"\frac{1}{2}", "0.4")[0]
    assert not math_equal("12", "21")[0]


def test_grading_off_the_main_thread_matches() -> None:
    """math-verify 0.7 uses signal.alarm, which fails silently off the main thread; our path must not."""
    verdicts: dict[tuple[str, str], bool] = {}

    def work() -> None:
        for gold, pred in EQUIVALENT[:6] + NOT_EQUIVALENT[:3]:
            verdicts[(gold, pred)] = math_equal(gold, pred)[0]

    thread = threading.Thread(target=work)
    thread.start()
    thread.join()
    for gold, pred in EQUIVALENT[:6]:
        assert verdicts[(gold, pred)], (gold, pred)
    for gold, pred in NOT_EQUIVALENT[:3]:
        assert not verdicts[(gold, pred)], (gold, pred)


@pytest.mark.parametrize(
    ("text", "letter", "rule"),
    [
        (r"... so \boxed{C}", "C", "boxed"),
        (r"\boxed{A} hmm no \boxed{\text{(B)}}", "B", "boxed"),
        (r"\boxed{D) 42}", "D", "boxed"),
        ("After all that, the answer is (B).", "B", "answer-phrase"),
        ("Answer: D", "D", "answer-phrase"),
        ("A detailed look shows option C fits best", "C", "standalone"),
        ("no letter here at all", None, "none"),
    ],
)
def test_extract_choice(text: str, letter: str | None, rule: str) -> None:
    assert extract_choice(text) == (letter, rule)


def test_extract_choice_ignores_invalid_boxed_letter() -> None:
    # \boxed{E} is not a choice: fall back to the phrase
    assert extract_choice(r"The answer is (A), i.e. \boxed{E}")[0] == "A"


def test_exact_int_grading() -> None:
    assert grade_exact_int(13, "5 + 8 = 13. Answer: 13").correct
    assert grade_exact_int("13", "Answer: 12. Wait, no. Answer: 13").correct
    assert not grade_exact_int(13, "Answer: 13 is wrong, Answer: 14").correct
    assert grade_exact_int(1000, "Answer: 1,000").correct
    assert grade_exact_int(-4, "it drops to -4").correct  # fallback: last integer
    assert extract_int_answer("3 apples and 5 more gives 8") == ("8", "last-integer")
    assert not grade_exact_int(8, "no digits").correct


def test_pass_at_k() -> None:
    assert pass_at_k(10, 0, 1) == 0.0
    assert pass_at_k(10, 10, 5) == 1.0
    assert pass_at_k(10, 3, 1) == pytest.approx(0.3)
    assert pass_at_k(10, 3, 2) == pytest.approx(1 - comb(7, 2) / comb(10, 2))
    assert pass_at_k(5, 2, 4) == 1.0  # n - c < k: every draw of 4 contains a correct one
    for bad in [(0, 0, 1), (5, 6, 1), (5, 2, 6), (5, 2, 0)]:
        with pytest.raises(EGPSError):
            pass_at_k(*bad)
