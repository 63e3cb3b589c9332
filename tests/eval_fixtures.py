"""A task over Markov models shared by the runner tests (local and Ray): no tokenizer, graded in one line."""

from __future__ import annotations

from egps_ppl.evals.graders import GradeResult
from egps_ppl.evals.tasks import Problem


class FirstTokenTask:
    """Problems over a Markov model (no tokenizer): correct when the first completion token is the answer."""

    def __init__(self, size: int = 4) -> None:
        self.name = "first-token"
        self._problems = [Problem(f"p{i}", f"problem {i}", str(1 + i % 3)) for i in range(size)]

    def problems(self, limit=None):
        return self._problems if limit is None else self._problems[:limit]

    def build_prompt(self, problem, lm):
        return []

    def extract(self, completion_text):
        return completion_text.split()[0] if completion_text.split() else None

    def grade(self, problem, completion_text):
        got = self.extract(completion_text)
        return GradeResult(got == problem.answer, got, "first token")
