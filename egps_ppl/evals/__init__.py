"""Evaluation: tasks (arithmetic, MATH500, HumanEval, GPQA, your own JSONL), graders and a process sandbox."""

from egps_ppl.evals.graders import GradeResult, extract_boxed, extract_choice, grade_math, math_equal, pass_at_k
from egps_ppl.evals.sandbox import SandboxResult, run_humaneval, run_python
from egps_ppl.evals.tasks import Problem, Task, available_tasks, load_task

__all__ = [
    "GradeResult",
    "Problem",
    "SandboxResult",
    "Task",
    "available_tasks",
    "extract_boxed",
    "extract_choice",
    "grade_math",
    "load_task",
    "math_equal",
    "pass_at_k",
    "run_humaneval",
    "run_python",
]
