"""π's own accuracy, exactly: how well would a perfect sampler of ``π ∝ p^α`` answer each problem?

::

    python -m benchmarks.exact_pi --task arithmetic --limit 100 --out runs/frontier
    python -m benchmarks.exact_pi --quick --out /tmp/exact_pi        # tiny-gpt2, 2 problems (seconds; the tests)

For each problem, :func:`egps_ppl.analysis.enumeration.enumerate_power` finds π's most probable completions until
the mass not yet found is provably at most ``--tol`` of the total; the problem's **π accuracy** is the found
completions' π mass on correct answers (graded by the task), within the certified bound of the truth (a bound on
the total variation bounds every event's probability). Problems are written one line at a time to
``<out>/<task>/exact-pi/problems.jsonl`` (rerunning resumes), and the summary to ``exact_pi.json``: mean π
accuracy ± SE over problems with its certified interval (each problem's found accuracy ± its bound), the bounds
reached, and — when the frontier's run directories are beside it — the paired difference between π and each
frontier point over the same problems (a point's accuracy per problem averaged over its seeds), over all problems
and over the certified ones (bound <= 0.05), where π's accuracy is known to ±0.05. This is the accuracy every
exact sampler of π converges to (not a ceiling: a chain that has not converged can score above it). Each line also
keeps π's :data:`TOP` most probable completions (text, π share of the mass found, log p, tokens, answer) and the
most probable correct one, to read what π prefers; ``--problems`` restricts a run to named problems.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path
from typing import Any

from benchmarks.common import environment, run_cli, set_threads
from benchmarks.frontier import _records, mean_se, paired
from egps_ppl.cli.common import add_device_dtype_options

NAME = "exact_pi"
FOLDER = "exact-pi"
TOP = 5
"""Most probable completions kept per problem line."""


def exact_answer_distribution(
    task: Any, lm: Any, problem: Any, prompt: list[int], alpha: float, max_new_tokens: int, *,
    tol: float, max_expansions: int, batch: int, top_children: int = 64,
) -> dict[str, Any]:  # fmt: skip
    """π's answer distribution for one problem by certified enumeration, with π's accuracy and the bound.

    Raises
    ------
    EGPSError
        If no completion was found within ``max_expansions``.
    """
    from egps_ppl.analysis.enumeration import enumerate_power
    from egps_ppl.errors import EGPSError
    from egps_ppl.target import PowerDistribution

    def answer(ids: list[int]) -> tuple[str, bool]:
        text = lm.decode(ids)
        return str(task.extract(text)), bool(task.grade(problem, text).correct)

    target = PowerDistribution(lm, prompt, alpha, max_new_tokens)
    started = time.perf_counter()
    found = enumerate_power(target, answer, tol=tol, max_expansions=max_expansions, batch=batch,
                            top_children=top_children)  # fmt: skip
    if not found.completions:
        raise EGPSError(f"{problem.id}: no completion in {found.expansions} expansions; raise the expansion budget")
    marginal = found.marginal()
    answers: dict[str, float] = {}
    for (text, _), p in marginal.items():
        answers[text] = answers.get(text, 0.0) + p

    def shown(i: int) -> dict[str, Any]:
        (ans, ok), lp, ids = found.answers[i], found.log_p[i], found.completions[i]
        return {"pi": math.exp(alpha * lp - found.log_found), "log_p": lp, "tokens": len(ids), "answer": ans,
                "correct": ok, "text": lm.decode(list(ids))}  # fmt: skip

    correct = next((i for i, (_, ok) in enumerate(found.answers) if ok), None)
    return {
        "problem_id": problem.id,
        "marginal": answers,
        "pi_accuracy": sum(p for (_, ok), p in marginal.items() if ok),
        "tv_bound": found.tv_bound,
        "completions": len(found.completions),
        "best_log_p": found.log_p[0],
        "expansions": found.expansions,
        "exhausted": found.exhausted,
        "scored_tokens": found.scored_tokens,
        "seconds": round(time.perf_counter() - started, 2),
        "top": [shown(i) for i in range(min(TOP, len(found.completions)))],
        "best_correct": None if correct is None else shown(correct),
    }


def run(args: argparse.Namespace, folder: Path) -> list[dict[str, Any]]:
    """Every problem's line of ``problems.jsonl``, computing the missing ones."""
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.registry import load_model

    path = folder / "problems.jsonl"
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            row = json.loads(line)
            if reusable(row, _settings(args, budget=False), args.tol, args.max_expansions):
                done[row["problem_id"]] = row
    task = load_task(args.task)
    problems = task.problems(args.limit)
    if args.problems:
        wanted = args.problems.split(",")
        unknown = sorted(set(wanted) - {p.id for p in problems})
        if unknown:
            raise SystemExit(f"exact_pi: --problems names {', '.join(unknown)}, not among the first {args.limit} "
                             f"problems of {args.task}")  # fmt: skip
        problems = [p for p in problems if p.id in wanted]
    missing = [p for p in problems if p.id not in done]
    if missing:
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        folder.mkdir(parents=True, exist_ok=True)
        for problem in missing:
            row = exact_answer_distribution(
                task, lm, problem, task.build_prompt(problem, lm), args.alpha, args.max_new_tokens, tol=args.tol,
                max_expansions=args.max_expansions, batch=args.batch, top_children=args.top_children,
            )  # fmt: skip
            row["settings"] = _settings(args)
            with path.open("a") as fh:
                fh.write(json.dumps(row) + "\n")
            done[problem.id] = row
            print(f"{problem.id}: pi accuracy {row['pi_accuracy']:.3f} (bound {row['tv_bound']:.4f}, "
                  f"{row['expansions']} expansions, {row['seconds']:.0f} s)", flush=True)  # fmt: skip
    return [done[p.id] for p in problems]


def reusable(row: dict[str, Any], settings: dict[str, Any], tol: float, max_expansions: int) -> bool:
    """Whether a saved line answers a run with these ``settings`` (all but the budget), ``tol`` and budget: a line
    carries its own certificate, so it counts if it reached ``tol``, ran out of prefixes, or spent at least
    ``max_expansions`` (a larger budget recomputes the problems a smaller one left open)."""
    saved = {"dtype": "float32", **row.get("settings", {})}  # lines written before the dtype was recorded
    if saved.pop("max_expansions", None) is None or saved != settings:
        return False
    return row["tv_bound"] <= tol or row.get("exhausted", False) or row["expansions"] >= max_expansions


def enumeration_settings(
    *, model: str, task: str, alpha: float, max_new_tokens: int, tol: float, top_children: int, dtype: str
) -> dict[str, Any]:
    """What a saved line of ``problems.jsonl`` must match to be reused (everything but the budget)."""
    return {"model": model, "task": task, "alpha": alpha, "max_new_tokens": max_new_tokens, "tol": tol,
            "top_children": top_children, "dtype": dtype}  # fmt: skip


def _settings(args: argparse.Namespace, budget: bool = True) -> dict[str, Any]:
    out = enumeration_settings(model=args.model, task=args.task, alpha=args.alpha, max_new_tokens=args.max_new_tokens,
                               tol=args.tol, top_children=args.top_children, dtype=args.dtype)  # fmt: skip
    return {**out, "max_expansions": args.max_expansions} if budget else out


CERTIFIED = 0.05
"""A problem counts as certified when its bound is at most this (every event's π probability known to ±0.05)."""


def summarize(rows: list[dict[str, Any]], task_folder: Path, seed: int = 0) -> dict[str, Any]:
    """Mean π accuracy ± SE over problems, its certified interval, and paired differences against the frontier's
    points: over all problems (π taken as what was found) and over the certified ones (bound <= 0.05)."""
    n = len(rows)
    bounds = [r["tv_bound"] for r in rows]
    summary: dict[str, Any] = {
        "problems": n,
        **_accuracy(rows),
        # A TV bound b bounds every event: the true π accuracy of a problem lies in [found - b, found + b].
        "pi_accuracy_interval": [round(sum(max(0.0, r["pi_accuracy"] - r["tv_bound"]) for r in rows) / n, 4),
                                 round(sum(min(1.0, r["pi_accuracy"] + r["tv_bound"]) for r in rows) / n, 4)],
        "mean_tv_bound": round(sum(bounds) / n, 5),
        "max_tv_bound": round(max(bounds), 5),
        "expansions_median": sorted(r["expansions"] for r in rows)[n // 2],
        "seconds_per_problem": round(sum(r["seconds"] for r in rows) / n, 1),
        "vs_points": {},
    }  # fmt: skip
    certified = [r for r in rows if r["tv_bound"] <= CERTIFIED]
    summary["certified"] = {"bound": CERTIFIED, "problems": len(certified), "vs_points": {}}
    if certified:
        summary["certified"].update(_accuracy(certified))
    rng = random.Random(seed)
    for run_dir in sorted(p for p in task_folder.iterdir() if p.is_dir() and p.name != FOLDER):
        records = _records(run_dir)
        if not records:
            continue
        seeds = sorted({s for _, s in records})
        for part, subset in ((summary, rows), (summary["certified"], certified)):
            pi = {(r["problem_id"], s): {"correct": r["pi_accuracy"]} for r in subset for s in seeds}
            diff = paired(pi, records, rng)
            if diff is not None:
                part["vs_points"][run_dir.name] = diff
    return summary


def _accuracy(rows: list[dict[str, Any]]) -> dict[str, Any]:
    mean, se = mean_se([r["pi_accuracy"] for r in rows])
    return {"pi_accuracy": round(mean, 4), "pi_accuracy_se": None if se is None else round(se, 4)}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--tol", type=float, default=0.01, help="certified TV bound to stop at, per problem")
    parser.add_argument("--max-expansions", type=int, default=50_000)
    parser.add_argument("--top-children", type=int, default=64)
    parser.add_argument("--batch", type=int, default=64, help="prefixes followed together (one forward call)")
    parser.add_argument("--threads", type=int, default=1)
    add_device_dtype_options(parser)
    parser.add_argument("--out", default="runs/frontier")
    parser.add_argument("--problems", default=None, help="comma-separated problem ids to run (default: all)")
    parser.add_argument("--quick", action="store_true", help="tiny-gpt2, 2 problems, 6 tokens, greedy children")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.limit, args.max_new_tokens, args.max_expansions, args.top_children = "tiny-gpt2", 2, 6, 48, 1
    set_threads(args.threads)
    task_folder = Path(args.out) / args.task.replace(":", "-")
    folder = task_folder / FOLDER
    rows = run(args, folder)
    payload = {"benchmark": NAME, "task": args.task, "config": _settings(args) | {"limit": args.limit},
               "environment": environment(), **summarize(rows, task_folder)}  # fmt: skip
    (folder / "exact_pi.json").write_text(json.dumps(payload, indent=2) + "\n")
    se = "" if payload["pi_accuracy_se"] is None else f" ± {payload['pi_accuracy_se']:.3f}"
    low, high = payload["pi_accuracy_interval"]
    print(f"pi accuracy {payload['pi_accuracy']:.3f}{se} over {payload['problems']} problems, certified within "
          f"[{low:.3f}, {high:.3f}] (mean bound {payload['mean_tv_bound']:.4f}; {payload['certified']['problems']} "
          f"problems at <= {CERTIFIED}); wrote {folder / 'exact_pi.json'}")  # fmt: skip
    return payload


if __name__ == "__main__":
    run_cli(main, NAME)
