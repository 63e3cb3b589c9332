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
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from egps_ppl.errors import check_positive_int
from egps_ppl.evals.methods import Method, MethodResult, SamplerMethod
from egps_ppl.evals.store import ResultWriter, finish_run, plan_run
from egps_ppl.evals.tasks import Problem, Task
from egps_ppl.models.base import LanguageModel

DEFAULT_BATCH = 32
"""Units in flight by default, chosen by ``benchmarks/batched_eval.py`` on SmolLM2 (CPU, one thread) with MH on
arithmetic problems 0-63 (problems the frontier also evaluates): units per CPU-second grew about 2.2x at 8, 5x at
32 and 6.3x at 64 against one unit at a time, with peak memory 1.6 -> 2.3 -> 3.0 GB; 32 takes most of the gain at
three quarters of the memory of 64. Not confirmed on other data (``docs/benchmarks/batched_eval.md``)."""

__all__ = [
    "DEFAULT_BATCH",
    "batchable",
    "evaluate",
    "evaluate_batched",
    "evaluate_unit",
    "grade_record",
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
    return grade_record(task, method, lm, problem, seed, prompt_ids, result, problem_index=problem_index)


def grade_record(
    task: Task,
    method: Method,
    lm: LanguageModel,
    problem: Problem,
    seed: int,
    prompt_ids: list[int],
    result: MethodResult,
    *,
    problem_index: int | None = None,
) -> dict[str, Any]:
    """Grade one unit's result into its record (see :func:`evaluate_unit` for the fields).

    When the method reports the chain's starting completion (``extra["start_completion_ids"]``, MCMC), the start
    is graded too: ``start_answer``, ``start_correct`` and ``answer_changed`` say whether the moves changed it.
    """
    started = time.perf_counter()
    grade = task.grade(problem, result.completion_text)
    useed = unit_seed(seed, problem.id)
    record = {
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
    start_ids = result.extra.get("start_completion_ids")
    if start_ids is not None:
        start = task.grade(problem, lm.decode(start_ids))
        record["start_answer"] = start.extracted
        record["start_correct"] = bool(start.correct)
        record["answer_changed"] = start.extracted != grade.extracted
        record["grade_s"] = round(time.perf_counter() - started, 4)
    return record


def evaluate_batched(
    task: Task,
    method: SamplerMethod,
    lm: LanguageModel,
    todo: Sequence[tuple[int, Problem, int]],
    *,
    batch: int = DEFAULT_BATCH,
    max_new_tokens: int = 256,
) -> Iterator[dict[str, Any]]:
    """Grade records of the ``(index, problem, seed)`` units in ``todo``, up to ``batch`` units sharing one batch.

    Units are started in order and refilled as they finish (:func:`~egps_ppl.infer.batched.run_units`); each
    record is yielded as soon as its unit is done. A unit's rows draw from streams seeded by :func:`unit_seed`,
    so its record is the same whatever ``batch``.
    """
    from egps_ppl.infer.batched import Unit, run_units

    units, meta = [], {}
    for index, problem, seed in todo:
        prompt_ids = task.build_prompt(problem, lm)
        key = (problem.id, int(seed))
        units.append(Unit(key, prompt_ids, unit_seed(seed, problem.id)))
        meta[key] = (index, problem, seed, prompt_ids)
    for out in run_units(method.sampler, lm, units, method.alpha, max_new_tokens, max_units=batch):
        index, problem, seed, prompt_ids = meta[out.key]
        result = method.result(lm, out.result, out.wall_s)
        result.extra["batch"] = batch
        yield grade_record(task, method, lm, problem, seed, prompt_ids, result, problem_index=index)


def batchable(method: Method) -> bool:
    """Whether ``method`` runs through the batched path (a sampler that :func:`supports_batching`)."""
    from egps_ppl.infer.batched import supports_batching

    return isinstance(method, SamplerMethod) and supports_batching(method.sampler)


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
    batch: int = DEFAULT_BATCH,
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
    batch : int
        Units in flight at once for methods that batch across units (every built-in sampler: :func:`batchable`);
        the others (a sampler of your own) run one unit at a time. A record does not depend on ``batch``.

    Returns
    -------
    dict
        The summary (also written to ``summary.json``).

    See Also
    --------
    egps_ppl.evals.ray_runner.evaluate_ray : the same run sharded over Ray actors (same files, same records).
    """
    check_positive_int("batch", batch)
    plan = plan_run(
        task, method, model_name(lm), seeds, limit, out_dir, resume, max_new_tokens=max_new_tokens, config=config
    )
    started = time.perf_counter()
    with ResultWriter(plan, method.name, progress) as writer:
        if batchable(method):
            for record in evaluate_batched(task, method, lm, plan.todo, batch=batch, max_new_tokens=max_new_tokens):
                writer.write(record)
        else:
            for index, problem, seed in plan.todo:
                writer.write(
                    evaluate_unit(task, method, lm, problem, seed, max_new_tokens=max_new_tokens, problem_index=index)
                )
    return finish_run(plan, task, method, started)
