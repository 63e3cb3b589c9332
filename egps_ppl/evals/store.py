"""The run directory of an evaluation: its files, the plan of a run, appending results, and the summary.

Files in the run directory
--------------------------
``config.json``
    Task, model, method settings and ``max_new_tokens`` (checked on ``--resume``: a run cannot silently mix
    methods), plus the seeds and limit of the latest invocation.
``results.jsonl``
    One JSON object per finished (problem, seed), appended and fsync'ed as soon as it finishes
    (see :data:`RECORD_FIELDS`). A killed run leaves at most one truncated last line, which ``resume=True``
    removes before appending.
``summary.json``
    :func:`summarize_results` of the selected (problem, seed) units.
``accuracy_vs_compute.png``
    Accuracy (± standard error over seeds) against mean decode tokens per problem.

The steps of a run, shared by the local loop (:func:`egps_ppl.evals.runner.evaluate`) and the Ray runner
(:func:`egps_ppl.evals.ray_runner.evaluate_ray`), which compute the units differently but store them with the same
code: :func:`check_out_dir`, :func:`plan_run`, :class:`ResultWriter`, :func:`finish_run`. Nothing here runs a
model (this module does not import torch), so ``egps report`` and scripts that read results stay light.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egps_ppl.errors import EGPSError
from egps_ppl.evals.graders import pass_at_k
from egps_ppl.evals.tasks import Problem

if TYPE_CHECKING:
    from egps_ppl.evals.methods import Method
    from egps_ppl.evals.tasks import Task

__all__ = [
    "CONFIG_FILE",
    "COST_FIELDS",
    "PLOT_FILE",
    "RECORD_FIELDS",
    "RESULTS_FILE",
    "RESUME_KEYS",
    "SUMMARY_FILE",
    "ResultWriter",
    "RunPlan",
    "check_out_dir",
    "check_seeds",
    "finish_run",
    "plan_run",
    "plot_accuracy_vs_compute",
    "read_results",
    "run_label",
    "summarize_results",
]

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
PLOT_FILE = "accuracy_vs_compute.png"
RECORD_FIELDS = (
    "problem_id",
    "seed",
    "method",
    "completion",
    "answer",
    "correct",
    "decode_tokens",
    "scored_tokens",
    "forward_calls",
    "wall_s",
)
"""Fields every line of ``results.jsonl`` has (more are written: see :func:`egps_ppl.evals.runner.evaluate_unit`)."""
COST_FIELDS = ("decode_tokens", "scored_tokens", "forward_calls", "wall_s")
"""The cost fields of a record, averaged per unit in the summary (``mean_decode_tokens``, ...)."""
RESUME_KEYS = ("task", "model", "method", "max_new_tokens")
"""Settings in ``config.json`` that must match for ``--resume`` to continue a run."""


# ------------------------------------------------------------------------------------------------ the file


def read_results(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl`` file (an empty list when it does not exist).

    A last line without its newline (a run killed mid-write), or a last line that is not valid JSON, is dropped;
    with ``repair=True`` the file is also truncated to its last complete line so appending can resume.

    Raises
    ------
    EGPSError
        For an invalid line before the last one or a record missing :data:`RECORD_FIELDS`.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good_end = 0
    position = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        end = position + len(raw) + (0 if last else 1)
        if last:  # the bytes after the final newline: empty, or a truncated record
            break
        if raw.strip():
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if number == len(lines) - 1:  # the last line, newline written but record damaged
                    break
                raise EGPSError(
                    f"{path}:{number}: not valid JSON; the results file is damaged (remove that line, or start "
                    f"again with another --out)"
                ) from None
            missing = [f for f in RECORD_FIELDS if not isinstance(record, dict) or f not in record]
            if missing:
                raise EGPSError(f"{path}:{number}: a result line without {', '.join(missing)}")
            records.append(record)
        good_end = end
        position = end
    if repair and good_end != len(data):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return records


def _append(fh: Any, record: dict[str, Any]) -> None:
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


def _write_json(path: Path, value: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)


def _check_resume_config(path: Path, config: dict[str, Any]) -> None:
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError):
        raise EGPSError(f"{path} is damaged; remove it to resume, or start again with another --out") from None
    differ = [k for k in RESUME_KEYS if k in old and old[k] != config[k]]
    if differ:
        detail = "; ".join(f"{k}: was {old[k]!r}, now {config[k]!r}" for k in differ)
        raise EGPSError(f"cannot resume {path.parent}: the run used different settings ({detail}); use another --out")


# ------------------------------------------------------------------------------------------------ a run


@dataclass
class RunPlan:
    """What :func:`plan_run` decided: the run directory, its config and the units still to compute.

    Attributes
    ----------
    out : Path
        The run directory.
    results_path : Path
        ``out / results.jsonl``.
    config : dict
        What ``config.json`` holds.
    problems : list of Problem
        The selected problems (the first ``limit``).
    seeds : list of int
        The run seeds.
    todo : list of (int, Problem, int)
        ``(problem_index, problem, seed)`` of every selected unit not yet in ``results.jsonl``, in problem order.
    finished : set of (str, int)
        ``(problem_id, seed)`` of every unit already in ``results.jsonl`` (selected or not).
    correct, counted : int
        Correct and total finished units among the selected ones (the progress bar's running accuracy).
    """

    out: Path
    results_path: Path
    config: dict[str, Any]
    problems: list[Problem]
    seeds: list[int]
    todo: list[tuple[int, Problem, int]]
    finished: set[tuple[str, int]]
    correct: int = 0
    counted: int = 0


def check_out_dir(out_dir: str | Path, resume: bool) -> Path:
    """``out_dir`` as a Path after the checks that need no model: not a file, no results unless ``resume``.

    Raises
    ------
    EGPSError
        When ``out_dir`` is a file, or holds results and ``resume`` is false.
    """
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise EGPSError(f"--out {out} is a file; pass a directory")
    results_path = out / RESULTS_FILE
    if not resume and results_path.exists() and results_path.stat().st_size > 0:
        raise EGPSError(f"{results_path} already has results; pass --resume to continue that run, or another --out")
    return out


def plan_run(
    task: Task,
    method: Method,
    model_name: str,
    seeds: Sequence[int],
    limit: int | None,
    out_dir: str | Path,
    resume: bool,
    *,
    max_new_tokens: int,
    config: dict[str, Any] | None = None,
) -> RunPlan:
    """Check and create the run directory, write ``config.json`` and list the units left to compute.

    With ``resume`` the settings are compared with the existing ``config.json`` and a truncated last line of
    ``results.jsonl`` is removed (see :func:`read_results`).
    """
    seeds = check_seeds(seeds)
    out = check_out_dir(out_dir, resume)
    out.mkdir(parents=True, exist_ok=True)
    results_path = out / RESULTS_FILE
    run_config = {
        "task": task.name,
        "model": model_name,
        "method": method.config(),
        "max_new_tokens": int(max_new_tokens),
        "seeds": seeds,
        "limit": limit,
        **(config or {}),
    }
    if resume:
        _check_resume_config(out / CONFIG_FILE, run_config)
    done = read_results(results_path, repair=True) if resume else []
    _write_json(out / CONFIG_FILE, run_config)

    problems = task.problems(limit)
    finished = {(r["problem_id"], int(r["seed"])) for r in done}
    todo = [(i, p, s) for i, p in enumerate(problems) for s in seeds if (p.id, s) not in finished]
    selected = {(p.id, s) for p in problems for s in seeds}
    correct = sum(1 for r in done if (r["problem_id"], int(r["seed"])) in selected and r["correct"])
    return RunPlan(out, results_path, run_config, problems, seeds, todo, finished, correct, len(finished & selected))


class ResultWriter:
    """Appends result records to a run's ``results.jsonl`` (one fsync'ed line each) and drives the progress bar.

    A record whose (problem, seed) is already in the file is not written again (:meth:`write` returns False), so
    a unit delivered twice (a retried Ray unit) cannot make a duplicate line. Use as a context manager.
    """

    def __init__(self, plan: RunPlan, desc: str, progress: bool) -> None:
        self.plan = plan
        self.written: set[tuple[str, int]] = set(plan.finished)
        self._fh = plan.results_path.open("a", encoding="utf-8")
        self._bar = _progress_bar(len(plan.todo), desc, progress)

    def write(self, record: dict[str, Any]) -> bool:
        """Append ``record`` unless its unit is already in the file; returns whether it was written."""
        key = (record["problem_id"], int(record["seed"]))
        if key in self.written:
            return False
        _append(self._fh, record)
        self.written.add(key)
        self.plan.counted += 1
        self.plan.correct += bool(record["correct"])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(acc=f"{self.plan.correct / self.plan.counted:.3f}", refresh=False)
        return True

    def close(self) -> None:
        """Close the file and the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._fh.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def finish_run(plan: RunPlan, task: Task, method: Method, started: float, **extra: Any) -> dict[str, Any]:
    """Summarise the selected units from ``results.jsonl``; write ``summary.json`` and the plot.

    ``started`` is the ``time.perf_counter()`` at the start of the computation; ``extra`` goes into the summary.
    """
    records = read_results(plan.results_path)
    summary = summarize_results(records, problems=[p.id for p in plan.problems], seeds=plan.seeds)
    summary.update(
        task=task.name,
        method=method.name,
        model=plan.config["model"],
        method_config=plan.config["method"],
        max_new_tokens=plan.config["max_new_tokens"],
        run_wall_s=round(time.perf_counter() - started, 3),
        computed_this_run=len(plan.todo),
        **extra,
    )
    _write_json(plan.out / SUMMARY_FILE, summary)
    plot_accuracy_vs_compute([summary], plan.out / PLOT_FILE)
    return summary


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """``seeds`` as a list, checked: at least one, integers, distinct.

    Raises
    ------
    EGPSError
        Otherwise, saying what to pass.
    """
    seeds = list(seeds)
    if not seeds:
        raise EGPSError("give at least one seed (--seeds 0,1,...)")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise EGPSError(f"seeds must be integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise EGPSError(f"seeds must be distinct, got {seeds!r}")
    return seeds


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run")


# ------------------------------------------------------------------------------------------------ summary


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize_results(
    records: Sequence[dict[str, Any]],
    problems: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Accuracy and cost of a set of result records.

    Accuracy is computed per seed (the mean of ``correct`` over that seed's problems); ``accuracy`` is the mean of
    the per-seed accuracies and ``accuracy_se`` their standard error (sample standard deviation with ``ddof=1``
    over ``sqrt(number of seeds)``; ``None`` with a single seed). ``accuracy_per_problem`` is the mean over seeds
    for each problem. Costs are means per (problem, seed) unit, i.e. per problem attempt.

    ``pass_at_k`` maps ``k`` (as a string) to the mean over problems of the unbiased pass@k estimator
    (:func:`~egps_ppl.evals.graders.pass_at_k`), treating the ``n`` seeds of a problem as ``n`` samples of which
    ``c`` are correct; ``k`` runs over 1, 2, 4, ... and the number of seeds. A problem enters pass@k only when it
    has at least ``k`` results (an unfinished run); with every result in, pass@1 equals ``accuracy``.

    ``empty_completions`` counts the units whose completion is empty (or only whitespace): the model ended its
    reply at once, and the grader marks the unit wrong. When that is most of them, ``warnings`` (a list of
    sentences, empty otherwise) says so; ``egps eval`` prints it to stderr.

    Parameters
    ----------
    records : sequence of dict
        Result lines (duplicates of a (problem, seed) keep the first).
    problems, seeds : sequences or None
        Restrict to these problem ids and seeds, and report how many of their units are missing.

    Returns
    -------
    dict
    """
    problem_set = None if problems is None else {str(p) for p in problems}
    seed_set = None if seeds is None else {int(s) for s in seeds}
    keep: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        key = (str(r["problem_id"]), int(r["seed"]))
        if (problem_set is None or key[0] in problem_set) and (seed_set is None or key[1] in seed_set):
            keep.setdefault(key, r)
    units = list(keep.values())
    by_seed: dict[int, list[float]] = defaultdict(list)
    by_problem: dict[str, list[float]] = defaultdict(list)
    for (pid, seed), r in keep.items():
        by_seed[seed].append(float(bool(r["correct"])))
        by_problem[pid].append(float(bool(r["correct"])))
    seed_list = sorted(by_seed) if seeds is None else [int(s) for s in seeds]
    problem_list = sorted(by_problem) if problems is None else [str(p) for p in problems]
    per_seed = {str(s): _mean(by_seed[s]) for s in seed_list if s in by_seed}
    per_problem = {pid: _mean(by_problem[pid]) for pid in problem_list if pid in by_problem}
    seed_acc = list(per_seed.values())
    accuracy = _mean(seed_acc)
    se = None
    if len(seed_acc) >= 2:
        var = sum((a - accuracy) ** 2 for a in seed_acc) / (len(seed_acc) - 1)
        se = math.sqrt(var / len(seed_acc))
    expected = len(problem_list) * len(seed_list)
    pass_k = _pass_at_ks(by_problem, len(seed_list))
    summary: dict[str, Any] = {
        "n_problems": len(per_problem),
        "seeds": [int(s) for s in seed_list],
        "n_results": len(units),
        "expected_results": expected,
        "complete": len(units) == expected,
        "accuracy": accuracy,
        "accuracy_se": se,
        "accuracy_per_seed": per_seed,
        "accuracy_per_problem": per_problem,
        "pass_at_k": pass_k,
        "total_wall_s": round(sum(float(r["wall_s"]) for r in units), 3),
        "empty_completions": sum(1 for r in units if not str(r["completion"]).strip()),
    }
    summary["warnings"] = _warnings(summary)
    for name in COST_FIELDS:
        summary[f"mean_{name}"] = _mean(float(r[name]) for r in units)
    return summary


def _warnings(summary: dict[str, Any]) -> list[str]:
    """Sentences about a run that is probably not measuring what was meant (most completions empty)."""
    empty, total = summary["empty_completions"], summary["n_results"]
    if total and 2 * empty > total:
        return [
            f"{empty} of {total} completions are empty (the model ended its reply at once) and were graded wrong; "
            "an instruct model given a raw prompt does this: pass --chat, or check the prompt and --max-new-tokens"
        ]
    return []


def _pass_at_ks(by_problem: dict[str, list[float]], n_seeds: int) -> dict[str, float]:
    """Mean unbiased pass@k over problems for k = 1, 2, 4, ... and ``n_seeds`` (problems with >= k samples)."""
    ks = [1 << i for i in range(max(n_seeds, 1).bit_length()) if 1 << i <= n_seeds]
    if n_seeds >= 1 and n_seeds not in ks:
        ks.append(n_seeds)
    out: dict[str, float] = {}
    for k in ks:
        values = [
            pass_at_k(len(outcomes), int(sum(outcomes)), k) for outcomes in by_problem.values() if len(outcomes) >= k
        ]
        if values:
            out[str(k)] = sum(values) / len(values)
    return out


def plot_accuracy_vs_compute(summaries: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy (± SE over seeds) against mean decode tokens per problem, one point per summary; a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted = [s for s in summaries if s.get("accuracy") is not None and s.get("mean_decode_tokens") is not None]
    for s in plotted:
        x, y = s["mean_decode_tokens"], s["accuracy"]
        ax.errorbar([x], [y], yerr=[s["accuracy_se"] or 0.0], fmt="o", capsize=4, label=run_label(s))
    ax.set_xlabel("decode tokens per problem (mean)")
    ax.set_ylabel("accuracy (mean ± SE over seeds)")
    ax.set_ylim(-0.02, 1.02)
    if any(s["mean_decode_tokens"] > 0 for s in plotted):
        ax.set_xscale("log")
    title = {s.get("task") for s in plotted} or {"no results yet"}
    ax.set_title(f"accuracy vs compute: {', '.join(sorted(str(t) for t in title))}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path)
    return path


def run_label(summary: dict[str, Any]) -> str:
    """A run's short name for tables and legends: the method, then α, steps and n where they apply (``mh α=4 10
    steps``)."""
    config = summary.get("method_config") or {}
    label = str(summary.get("method", "?"))
    if "alpha" in config and label != "plain":
        label += f" α={config['alpha']:g}"
    if config.get("steps"):
        label += f" {config['steps']} steps"
    if config.get("n"):
        label += f" n={config['n']}"
    return label
