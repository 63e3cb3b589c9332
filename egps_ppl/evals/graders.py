"""Answer extraction and grading: ``\\boxed{}`` answers graded by ``math-verify``, multiple-choice letters, pass@k.

The math grader follows the MATH500 protocol of the power-sampling papers: the answer is the content of the *last*
``\\boxed{...}`` (braces balanced, so ``\\boxed{\\frac{1}{\\sqrt{2}}}`` is read whole) and it is compared with the
reference by symbolic equivalence through ``math-verify`` (``parse`` + ``verify``). Without ``math-verify``
installed, or when it cannot parse either side, the comparison falls back to equality after a Hendrycks-style
string normalisation plus exact comparison of plain numbers (``\\frac{1}{2}`` = ``1/2`` = ``0.5``).

``math-verify`` 0.7 implements its timeouts with ``signal.alarm``, which only works on the main thread (elsewhere its
``parse`` silently returns nothing). Off the main thread this module therefore calls the same parsing and comparison
routines without the alarm, so grading gives the same verdicts from worker threads (with no time limit there).
"""

from __future__ import annotations

import logging
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from itertools import product
from math import comb

from egps_ppl.errors import EGPSError

__all__ = [
    "GradeResult",
    "extract_answer_line",
    "extract_boxed",
    "extract_choice",
    "extract_int_answer",
    "extract_math_answer",
    "grade_choice",
    "grade_exact_int",
    "grade_math",
    "has_math_verify",
    "math_equal",
    "normalize_math_answer",
    "pass_at_k",
]


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one completion.

    Attributes
    ----------
    correct : bool
        Whether the extracted answer matches the reference.
    extracted : str or None
        The answer read from the completion (``None`` when none was found).
    detail : str
        A short human-readable reason (which rule extracted the answer, which comparison decided).
    """

    correct: bool
    extracted: str | None
    detail: str


# --------------------------------------------------------------------------------------------------- extraction

_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*")


def _boxed_spans(text: str) -> list[str]:
    """Contents of every ``\\boxed{...}`` / ``\\fbox{...}`` (balanced braces) and ``\\boxed N`` in ``text``."""
    found: list[str] = []
    for match in _BOXED_RE.finditer(text):
        i = match.end()
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                ch = text[j]
                if ch == "\\" and j + 1 < len(text):  # an escaped brace \{ or \} does not count
                    j += 2
                    continue
                if ch == "{":
                    depth += 1
                elif ch == "}":
                    depth -= 1
                    if depth == 0:
                        found.append(text[i + 1 : j].strip())
                        break
                j += 1
            # an unbalanced (truncated) \boxed{ is not an answer
        else:  # "\boxed 5": the argument is the next token
            token = re.match(r"[^\s$]+", text[i:])
            if token and match.group(0).endswith((" ", "\t", "\n")):
                found.append(token.group(0).rstrip(".,;"))
    return found


def extract_boxed(text: str) -> str | None:
    """The content of the last ``\\boxed{...}`` in ``text``, with nested braces kept whole.

    Parameters
    ----------
    text : str
        A model completion.

    Returns
    -------
    str or None
        The stripped content of the last complete ``\\boxed{...}`` (or ``\\fbox{...}``, or ``\\boxed N``), or
        ``None`` when there is none (an unclosed ``\\boxed{`` from a truncated completion does not count).

    Examples
    --------
    >>> extract_boxed(r"so \\boxed{1} no, \\boxed{\\frac{1}{\\sqrt{2}}}.")
    '\\\\frac{1}{\\\\sqrt{2}}'
    """
    spans = _boxed_spans(text)
    return spans[-1] if spans else None


_ANSWER_LINE_RE = re.compile(
    r"(?:final answer|answer)\s*(?:is|:|=)?\s*:?\s*\$?\s*([^\n$]+?)\s*\$?\s*(?:\.\s*)?(?:\n|$)", re.IGNORECASE
)
_NUMBER_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?(?:/\d+)?")


def extract_answer_line(text: str) -> str | None:
    """The answer from the last ``Answer: X`` / ``the answer is X`` phrase in ``text``, else ``None``."""
    matches = _ANSWER_LINE_RE.findall(text)
    return matches[-1].strip() if matches else None


def extract_math_answer(text: str, fallback: bool = True) -> tuple[str | None, str]:
    """Read a math answer: the last ``\\boxed{}``, then (with ``fallback``) ``Answer: X``, then the last number.

    Parameters
    ----------
    text : str
        A model completion.
    fallback : bool
        Whether to try the ``Answer: X`` phrase and the last number when there is no ``\\boxed{}``. The MATH500
        protocol of the papers uses the boxed answer only (``fallback=False``).

    Returns
    -------
    (str or None, str)
        The answer and the rule that found it (``"boxed"``, ``"answer-line"``, ``"last-number"`` or ``"none"``).
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    if fallback:
        line = extract_answer_line(text)
        if line:
            return line, "answer-line"
        numbers = _NUMBER_RE.findall(text)
        if numbers:
            return numbers[-1].replace(",", ""), "last-number"
    return None, "none"


_LETTER_PATTERNS = [
    # "the answer is (B)", "Answer: B", "correct answer is B", "answer: **C**"
    re.compile(r"answer\s*(?:is|:)?\s*:?\s*(?:option\s*)?[\*\s]*\(?([A-Z])\)?(?![A-Za-z])", re.IGNORECASE),
]


def extract_choice(text: str, letters: str = "ABCD") -> tuple[str | None, str]:
    """Read a multiple-choice letter from ``text``.

    The rules, in order (the first that finds a letter in ``letters`` wins):

    1. the last ``\\boxed{...}`` whose content, after removing ``\\text{}``, ``\\mathrm{}``, parentheses and
       spaces, starts with one of ``letters`` not followed by another letter (``\\boxed{B}``,
       ``\\boxed{\\text{(C)}}``, ``\\boxed{D) 42}``);
    2. the last "answer is (X)" / "Answer: X" phrase;
    3. the last standalone capital letter among ``letters`` (a word of its own, e.g. "... so B.").

    Parameters
    ----------
    text : str
        A model completion.
    letters : str
        The valid choice letters (upper case).

    Returns
    -------
    (str or None, str)
        The letter and the rule that found it (``"boxed"``, ``"answer-phrase"``, ``"standalone"`` or ``"none"``).
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        inner = re.sub(r"\\(?:text|textbf|mathrm|mathbf)\s*\{([^{}]*)\}", r"\1", boxed)
        inner = inner.replace("(", "").replace(")", "").replace(" ", "").replace("$", "")
        if inner and inner[0].upper() in letters and (len(inner) == 1 or not inner[1].isalpha()):
            return inner[0].upper(), "boxed"
    for pattern in _LETTER_PATTERNS:
        hits = [h.upper() for h in pattern.findall(text) if h.upper() in letters]
        if hits:
            return hits[-1], "answer-phrase"
    standalone = re.findall(rf"(?<![A-Za-z0-9\\])([{re.escape(letters)}])(?![A-Za-z0-9])", text)
    if standalone:
        return standalone[-1], "standalone"
    return None, "none"


# ---------------------------------------------------------------------------------------------- normalisation

_UNIT_WORDS = (
    "degrees|degree|cm|centimeters|meters|meter|m|km|inches|inch|feet|foot|ft|units|unit|square|sq|cents|cent|"
    "dollars|dollar|hours|hour|minutes|minute|seconds|second|mph|pounds|lbs|miles|mile|days|day|years|year"
)


def normalize_math_answer(answer: str) -> str:
    """A Hendrycks-style normal form of a short LaTeX answer, for string comparison.

    Removes ``$``, ``\\left``/``\\right``, spacing commands, ``\\text{...}`` units and trailing unit words,
    ``^\\circ``, ``\\%``, a leading ``x =``, thousands separators in plain numbers, a trailing ``.``;
    turns ``\\dfrac``/``\\tfrac`` into ``\\frac`` and ``\\frac12`` into ``\\frac{1}{2}``; removes spaces.
    """
    s = answer.strip()
    s = s.replace("\\!", "").replace("\\,", "").replace("\\;", "").replace("\\:", "").replace("\\ ", " ")
    s = s.replace("$", "").replace("\\left", "").replace("\\right", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac").replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s).replace("\\circ", "").replace("°", "")
    s = s.replace("\\%", "").replace("%", "")
    # units: "10\text{ cm}", "10 \mbox{ inches}", "5 cm^2"
    s = re.sub(r"\\(?:text|mbox|mathrm)\s*\{\s*(?:" + _UNIT_WORDS + r")(?:\^?\d)?\s*\}(?:\^\{?\d\}?)?", "", s)
    s = re.sub(r"(?<=\d)\s*(?:" + _UNIT_WORDS + r")(?:\^?\d)?\s*$", "", s)
    s = re.sub(r"\\(?:text|textbf|mathrm|mbox)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"^\s*[a-zA-Z]\s*=\s*", "", s)  # "x = 5" -> "5"
    s = re.sub(r"\\frac(\d)(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\{([^{}]*)\}(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt(\d)", r"\\sqrt{\1}", s)
    s = s.strip().rstrip(".")
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")
    return s.replace(" ", "")


def _as_fraction(s: str) -> Fraction | None:
    """``s`` as an exact number if it is a plain integer, decimal, ``a/b`` or ``\\frac{a}{b}``."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}", s)
    try:
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) else value
        if re.fullmatch(r"-?\d+(\.\d+)?(/-?\d+(\.\d+)?)?", s):
            return Fraction(s)
    except (ValueError, ZeroDivisionError):
        return None
    return None


def _string_equal(gold: str, pred: str) -> bool:
    a, b = normalize_math_answer(gold), normalize_math_answer(pred)
    if not a or not b:
        return False
    if a == b:
        return True
    fa, fb = _as_fraction(a), _as_fraction(b)
    return fa is not None and fb is not None and fa == fb


# ------------------------------------------------------------------------------------------------- math-verify

_log = logging.getLogger(__name__)


def has_math_verify() -> bool:
    """Whether ``math-verify`` can be imported (else the grader uses string normalisation only)."""
    try:
        import math_verify  # noqa: F401
    except ImportError:
        return False
    return True


def _mv_parse(text: str) -> list:
    """``math_verify.parse`` of ``text``; off the main thread, the same routine without the signal alarm."""
    import math_verify

    if threading.current_thread() is threading.main_thread():
        return math_verify.parse(text)
    from math_verify.parser import (
        ExprExtractionConfig,
        LatexExtractionConfig,
        extract_target_from_pred,
        get_extraction_regexes,
    )

    try:
        regexes = get_extraction_regexes([LatexExtractionConfig(), ExprExtractionConfig()])
        return extract_target_from_pred(text, regexes, fallback_mode="first_match", extraction_mode="any_match")
    except Exception:
        _log.debug("math-verify could not parse %r", text[:200], exc_info=True)
        return []


def _mv_verify(gold: list, pred: list) -> bool:
    """``math_verify.verify``; off the main thread, the same comparisons without the signal alarm."""
    import math_verify

    if threading.current_thread() is threading.main_thread():
        return bool(math_verify.verify(gold, pred))
    from math_verify.grader import sympy_expr_eq
    from sympy import Basic, MatrixBase

    def one(g: object, t: object) -> bool:
        try:
            if isinstance(g, Basic | MatrixBase) and isinstance(t, Basic | MatrixBase):
                return bool(sympy_expr_eq(g, t, float_rounding=6, numeric_precision=15, strict=True))
            if isinstance(g, str) and isinstance(t, str):
                return bool(g.strip()) and g.strip() == t.strip()
        except Exception:
            _log.debug("math-verify comparison failed", exc_info=True)
        return False

    return any(one(g, t) for g, t in product(gold, pred))


def _latex(answer: str) -> str:
    """Wrap a bare answer in ``$...$`` so math-verify reads it as LaTeX (intervals, sets, radicals)."""
    return f"${answer.strip().strip('$')}$"


def math_equal(gold: str, pred: str) -> tuple[bool, str]:
    """Whether ``pred`` is mathematically equivalent to the reference ``gold``.

    Parameters
    ----------
    gold : str
        The reference answer (LaTeX, without ``\\boxed``).
    pred : str
        The extracted answer.

    Returns
    -------
    (bool, str)
        The verdict and which comparison gave it (``"math-verify"`` or ``"string"``).
    """
    if has_math_verify():
        try:
            gold_parsed = _mv_parse(_latex(gold))
            pred_parsed = _mv_parse(_latex(pred))
            if gold_parsed and pred_parsed and _mv_verify(gold_parsed, pred_parsed):
                return True, "math-verify"
        except Exception:  # math-verify must never take a run down
            _log.debug("math-verify failed on %r vs %r", gold, pred, exc_info=True)
    if _string_equal(gold, pred):
        return True, "string"
    return False, "math-verify" if has_math_verify() else "string"


def grade_math(gold: str, completion: str, fallback: bool = False) -> GradeResult:
    """Grade a completion against a reference math answer.

    Parameters
    ----------
    gold : str
        The reference answer.
    completion : str
        The model's completion text.
    fallback : bool
        Also accept an ``Answer: X`` phrase or the last number when there is no ``\\boxed{}``.

    Returns
    -------
    GradeResult
    """
    extracted, rule = extract_math_answer(completion, fallback=fallback)
    if extracted is None:
        return GradeResult(False, None, "no \\boxed{} answer" if not fallback else "no answer found")
    ok, how = math_equal(gold, extracted)
    return GradeResult(ok, extracted, f"{rule}; {how}: {'equivalent' if ok else 'not equivalent'}")


def grade_choice(gold_letter: str, completion: str, letters: str = "ABCD") -> GradeResult:
    """Grade a multiple-choice completion: the letter from :func:`extract_choice` against ``gold_letter``."""
    letter, rule = extract_choice(completion, letters)
    if letter is None:
        return GradeResult(False, None, "no choice letter found")
    ok = letter == gold_letter.upper()
    return GradeResult(ok, letter, f"{rule}: {letter} vs {gold_letter.upper()}")


_ANSWER_INT_RE = re.compile(r"answer\s*(?:is)?\s*[:=]?\s*\$?\s*(-?\d[\d,]*)", re.IGNORECASE)
_INT_RE = re.compile(r"-?\d[\d,]*")


def extract_int_answer(text: str) -> tuple[str | None, str]:
    """The integer after the last ``Answer: N``, else the last integer in ``text``."""
    hits = _ANSWER_INT_RE.findall(text)
    if hits:
        return hits[-1].replace(",", ""), "answer-line"
    ints = [m.group(0).strip(",") for m in _INT_RE.finditer(text)]
    ints = [i.replace(",", "") for i in ints if i not in ("", "-")]
    if ints:
        return ints[-1], "last-integer"
    return None, "none"


def grade_exact_int(gold: int | str, completion: str) -> GradeResult:
    """Grade an integer answer exactly (the arithmetic task): ``Answer: N`` first, else the last integer."""
    extracted, rule = extract_int_answer(completion)
    if extracted is None:
        return GradeResult(False, None, "no integer found")
    try:
        ok = int(extracted) == int(gold)
    except ValueError:
        ok = False
    return GradeResult(ok, extracted, f"{rule}: {extracted} vs {gold}")


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k estimator of Chen et al. (2021): ``1 - C(n-c, k) / C(n, k)``.

    Parameters
    ----------
    n : int
        Samples drawn for a problem.
    c : int
        How many of them are correct.
    k : int
        The k of pass@k (``1 <= k <= n``).

    Returns
    -------
    float
        The probability that at least one of ``k`` samples drawn without replacement from the ``n`` is correct.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise EGPSError(f"pass_at_k: {name} must be an integer, got {value!r}")
    if n < 1 or not 0 <= c <= n or not 1 <= k <= n:
        raise EGPSError(f"pass_at_k needs n >= 1, 0 <= c <= n and 1 <= k <= n; got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - comb(n - c, k) / comb(n, k)
