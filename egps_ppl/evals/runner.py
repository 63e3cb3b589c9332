"""The evaluation loop behind ``egps eval``: one graded record per (problem, seed), stored in a run directory.

:func:`evaluate_unit` runs a method on one problem with one seed and grades it: the unit of work, the same
locally and in a Ray actor (:mod:`egps_ppl.evals.ray_runner`). :func:`evaluate` plans a run, computes the units
left one after another and writes each record as soon as it is graded; the run directory (``config.json``,
``results.jsonl``, ``summary.json``, a plot) and resuming are :mod:`egps_ppl.evals.store`'s.

Seeds
-----
The generator of unit (problem, seed) is seeded with :func:`unit_seed` ``(seed, problem.id)``: the same seed gives
the same completion whatever the order, the ``--limit`` or the worker that runs the unit.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from egps_ppl.evals.methods import Method
from egps_ppl.evals.store import ResultWriter, finish_run, plan_run
from egps_ppl.evals.tasks import Problem, Task
from egps_ppl.models.base import LanguageModel

__all__ = [
    "evaluate",
    "evaluate_unit",
    "model_name",
    "unit_seed",
]


def model_name(lm: Any) -> str:
    """The name a run records for ``lm`` (``lm.name``, else its text)."""
    return str(getattr(lm, "name", lm))


def unit_seed(seed: int, problem_id: str) -> int:
    """The generator seed of one (problem, seed) unit: a 31-bit hash of both, stable across runs and machines."""
    digest = hashlib.sha256(f"egps-eval:{int(seed)}:{problem_id}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def evaluate_unit(
    task: Task,
    method: Method,
    lm: LanguageModel,
    problem: Problem,
    seed: int,
    *,
    max_new_tokens: int = 256,
    problem_index: int | None = None,
) -> dict[str, Any]:
    """Run ``method`` on one problem with one seed and grade it; the unit of work a (Ray) worker executes.

    Parameters
    ----------
    task, method, lm
        What to evaluate with what.
    problem : Problem
        One of ``task.problems()``.
    seed : int
        The run seed; the method's generator gets :func:`unit_seed` ``(seed, problem.id)``.
    max_new_tokens : int
        Completion length limit.
    problem_index : int or None
        Recorded only (the problem's position in the task).

    Returns
    -------
    dict
        A JSON-serialisable record with :data:`~egps_ppl.evals.store.RECORD_FIELDS` and ``problem_index``,
        ``task``, ``model``, ``reference``, ``grade_detail``, ``unit_seed``, ``prompt_tokens``, ``completion_ids``,
        ``completion_tokens``, ``grade_s`` and the method's ``extra``.
    """
    prompt_ids = task.build_prompt(problem, lm)
    useed = unit_seed(seed, problem.id)
    result = method.run(lm, prompt_ids, max_new_tokens, useed)
    started = time.perf_counter()
    grade = task.grade(problem, result.completion_text)
    return {
        "problem_id": problem.id,
        "problem_index": problem_index,
        "seed": int(seed),
        "unit_seed": useed,
        "method": method.name,
        "task": task.name,
        "model": model_name(lm),
        "completion": result.completion_text,
        "answer": grade.extracted,
        "reference": problem.answer,
        "correct": bool(grade.correct),
        "grade_detail": grade.detail,
        "decode_tokens": int(result.decode_tokens),
        "scored_tokens": int(result.scored_tokens),
        "forward_calls": int(result.forward_calls),
        "wall_s": round(float(result.wall_s), 4),
        "grade_s": round(time.perf_counter() - started, 4),
        "prompt_tokens": len(prompt_ids),
        "completion_tokens": len(result.completion_ids),
        "completion_ids": [int(t) for t in result.completion_ids],
        "extra": result.extra,
    }


def evaluate(
    task: Task,
    method: Method,
    lm: LanguageModel,
    seeds: Sequence[int],
    limit: int | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    max_new_tokens: int = 256,
    config: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Evaluate ``method`` on the first ``limit`` problems of ``task`` with every seed; write the run directory.

    Parameters
    ----------
    task, method, lm
        What to evaluate with what.
    seeds : sequence of int
        Run seeds (accuracy is computed per seed; the standard error is over seeds).
    limit : int or None
        How many problems (all when ``None``).
    out_dir : str or Path
        The run directory (created if needed).
    resume : bool
        Skip the (problem, seed) units already in ``results.jsonl``. Without it an existing non-empty results file
        is an error.
    progress : bool
        Show a progress bar with the running accuracy.
    max_new_tokens : int
        Completion length limit.
    config : dict or None
        Extra settings recorded in ``config.json`` (e.g. the command line).

    Returns
    -------
    dict
        The summary (also written to ``summary.json``).

    See Also
    --------
    egps_ppl.evals.ray_runner.evaluate_ray : the same run sharded over Ray actors (same files, same records).
    """
    plan = plan_run(
        task, method, model_name(lm), seeds, limit, out_dir, resume, max_new_tokens=max_new_tokens, config=config
    )
    started = time.perf_counter()
    with ResultWriter(plan, method.name, progress) as writer:
        for index, problem, seed in plan.todo:
            writer.write(
                evaluate_unit(task, method, lm, problem, seed, max_new_tokens=max_new_tokens, problem_index=index)
            )
    return finish_run(plan, task, method, started)
