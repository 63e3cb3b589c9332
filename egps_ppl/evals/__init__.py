"""Evaluation: tasks (arithmetic, MATH500, HumanEval, GPQA, your own JSONL), graders and a process sandbox."""

from egps_ppl.evals.graders import GradeResult, extract_boxed, extract_choice, grade_math, math_equal, pass_at_k
from egps_ppl.evals.sandbox import SandboxResult, run_humaneval, run_python
from egps_ppl.evals.tasks import Problem, Task, available_tasks, load_task

# The methods, runner and report import torch and the samplers: loaded on first use, so the graders and tasks
# stay light to import (e.g. in the sandbox or a data-only script).
_LAZY = {
    "Method": "egps_ppl.evals.methods",
    "MethodResult": "egps_ppl.evals.methods",
    "available_methods": "egps_ppl.evals.methods",
    "load_method": "egps_ppl.evals.methods",
    "SamplerMethod": "egps_ppl.evals.methods",
    "evaluate": "egps_ppl.evals.runner",
    "evaluate_unit": "egps_ppl.evals.runner",
    "evaluate_ray": "egps_ppl.evals.ray_runner",  # Ray itself is imported only when it runs
    "read_results": "egps_ppl.evals.store",
    "summarize_results": "egps_ppl.evals.store",
    "write_report": "egps_ppl.evals.report",
}


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'egps_ppl.evals' has no attribute {name!r}")


__all__ = [
    "GradeResult",
    "Method",
    "MethodResult",
    "Problem",
    "SamplerMethod",
    "SandboxResult",
    "Task",
    "available_methods",
    "available_tasks",
    "evaluate",
    "evaluate_ray",
    "evaluate_unit",
    "extract_boxed",
    "extract_choice",
    "grade_math",
    "load_method",
    "load_task",
    "math_equal",
    "pass_at_k",
    "read_results",
    "run_humaneval",
    "run_python",
    "summarize_results",
    "write_report",
]
