"""Accuracy against compute for every sampler, with paired differences over the same (problem, seed) units.

::

    python -m benchmarks.frontier --task arithmetic --limit 100 --seeds 0,1,2,3 --out runs/frontier
    python -m benchmarks.frontier --task arithmetic --report-only --out runs/frontier --docs docs/benchmarks
    python -m benchmarks.frontier --quick --out /tmp/frontier        # tiny-gpt2, 3 problems (seconds; the tests)

Each *point* is a method at one budget (MCMC steps; best-of-n's n; SMC particles; SPS rollouts) and is an
ordinary evaluation run directory ``<out>/<task>/<point>/`` written by :func:`egps_ppl.evals.runner.evaluate`
(batched across units where the method allows, resumable). The loop is **seed-major**: every point gets all
problems of seed 0 before any point gets seed 1, so an interrupted run leaves a balanced frontier; rerunning the
command resumes it (finished units are never recomputed).

For every point the report gives accuracy ± SE over seeds, decode and scored tokens per unit, and wall-clock
seconds per unit (total seconds of the point's ``evaluate`` calls over the units they computed, recorded in
``frontier_timing.json``, kept per device type; measured on a shared machine, so only the token counts are
exact). ``--device cuda`` runs the model on a GPU. Methods are compared by **paired differences** on the units
every compared point has finished: ``d = correct(A) - correct(B)`` per unit, averaged per problem over seeds, with
the SE over problems and a 95% bootstrap interval over problems (2,000 resamples), against the reference point
(``--reference``, default MH at its largest budget). MCMC points also report the share of units whose answer
differs from their starting low-temperature sample's.

Writes ``<out>/<task>/frontier.json``, ``frontier.md`` (the table) and ``frontier_<task>.png`` (accuracy against
decode tokens per unit). When :mod:`benchmarks.exact_pi` has run into the same folder, π's own accuracy (certified
enumeration: what every exact sampler of π converges to) is added as a row and a line, paired against the
reference over the problems both have.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.common import copy_plots, environment, new_figure, run_cli, set_threads
from egps_ppl.cli.common import add_device_dtype_options

NAME = "frontier"


@dataclass(frozen=True)
class Point:
    """One method at one budget."""

    method: str
    budget_name: str | None = None
    budget: int | None = None
    settings: tuple[tuple[str, Any], ...] = ()

    @property
    def label(self) -> str:
        return self.method if self.budget is None else f"{self.method}-{self.budget_name}{self.budget}"

    def load_settings(self) -> dict[str, Any]:
        out = dict(self.settings)
        if self.budget_name is not None:
            out[self.budget_name] = self.budget
        return out


MCMC_METHODS = ("mh", "entropy-cut-mh", "egps", "egps-local")
MCMC_STEPS = (2, 5, 10)


def default_points(steps: tuple[int, ...] = MCMC_STEPS) -> list[Point]:
    """The frontier of issue #10: MCMC at 3 step budgets (``steps``), the others at 2 budgets (low-temp has
    none)."""
    points = [Point("low-temp"), Point("plain")]
    points += [Point(m, "steps", s) for s in steps for m in MCMC_METHODS]
    points += [Point("best-of-n", "n", n) for n in (4, 8)]
    points += [Point("smc", "particles", p, (("ess_every", 8),)) for p in (8, 16)]
    sps = (("top_k", 4), ("horizon", 32), ("block_size", 16))
    points += [Point("sps", "rollouts", r, sps) for r in (2, 4)]
    return points


def quick_points() -> list[Point]:
    return [Point("low-temp"), Point("mh", "steps", 1), Point("mh", "steps", 2), Point("egps", "steps", 2)]


# ------------------------------------------------------------------------------------------------ running
TIMING_FILE = "frontier_timing.json"
"""Per point: ``{device kind: {"seconds": s, "units": n}}``, the wall-clock of the units computed there."""


def device_kind(device: str, dtype: str = "float32") -> str:
    """The key wall-clock time is kept under: the device type, and the dtype unless float32.

    Examples
    --------
    >>> device_kind("cpu"), device_kind("cuda:1", "bfloat16")
    ('cpu', 'cuda-bfloat16')
    """
    kind = device.split(":")[0]
    return kind if dtype == "float32" else f"{kind}-{dtype}"


def read_timing(run_dir: Path) -> dict[str, dict[str, float]]:
    """A point's :data:`TIMING_FILE` (empty if none; the one-device layout of older runs counts as ``cpu``)."""
    path = run_dir / TIMING_FILE
    if not path.exists():
        return {}
    timing = json.loads(path.read_text())
    return {"cpu": timing} if "seconds" in timing else timing


def run_points(
    points: list[Point],
    task_spec: str,
    model: str,
    seeds: list[int],
    limit: int,
    out: Path,
    alpha: float,
    max_new_tokens: int,
    batch: int,
    device: str = "cpu",
    dtype: str = "float32",
) -> None:
    """Evaluate every point, seed-major, resuming whatever is already in ``out``; wall-clock time is kept per
    device type (``frontier_timing.json``), so a point resumed on a GPU does not mix its seconds with the CPU's."""
    from egps_ppl.evals.methods import load_method
    from egps_ppl.evals.runner import evaluate
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.registry import load_model

    task = load_task(task_spec)
    lm = load_model(model, device=device, dtype=dtype)
    kind = device_kind(device, dtype)
    for seed in seeds:
        for point in points:
            method = load_method(point.method, alpha=alpha, **point.load_settings())
            run_dir = out / point.label
            started = time.perf_counter()
            summary = evaluate(
                task, method, lm, [seed], limit, run_dir, resume=True, progress=False,
                max_new_tokens=max_new_tokens, batch=batch, config={"frontier": point.label, "dtype": dtype},
            )  # fmt: skip
            computed = int(summary.get("computed_this_run", 0))
            if computed:
                timing = read_timing(run_dir)
                spent = timing.get(kind, {"seconds": 0.0, "units": 0})
                timing[kind] = {"seconds": spent["seconds"] + time.perf_counter() - started,
                                "units": spent["units"] + computed}  # fmt: skip
                (run_dir / TIMING_FILE).write_text(json.dumps(timing) + "\n")
            print(f"seed {seed} {point.label:>22}: {computed} new units", flush=True)


# ------------------------------------------------------------------------------------------------ reporting
def _records(run_dir: Path) -> dict[tuple[str, int], dict[str, Any]]:
    from egps_ppl.evals.store import read_results

    path = run_dir / "results.jsonl"
    if not path.exists():
        return {}
    return {(r["problem_id"], int(r["seed"])): r for r in read_results(path)}


def mean_se(values: list[float]) -> tuple[float, float | None]:
    """Mean and standard error of the mean (``None`` for a single value).

    Examples
    --------
    >>> mean_se([1.0, 0.0])
    (0.5, 0.5)
    """
    n = len(values)
    mean = sum(values) / n
    return mean, (math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1) / n) if n > 1 else None)


def paired(
    a: dict[tuple[str, int], dict], b: dict[tuple[str, int], dict], rng: random.Random, reps: int = 2000
) -> dict[str, Any] | None:
    """Paired difference of accuracy ``A - B`` on their common units, clustered by problem."""
    common = sorted(set(a) & set(b))
    if not common:
        return None
    by_problem: dict[str, list[float]] = {}
    for key in common:
        by_problem.setdefault(key[0], []).append(float(a[key]["correct"]) - float(b[key]["correct"]))
    diffs = [sum(v) / len(v) for v in by_problem.values()]
    n = len(diffs)
    mean, se = mean_se(diffs)
    boots = sorted(sum(rng.choice(diffs) for _ in range(n)) / n for _ in range(reps))
    return {
        "diff": round(mean, 4),
        "se": None if se is None else round(se, 4),
        "ci95": [round(boots[int(0.025 * reps)], 4), round(boots[int(0.975 * reps) - 1], 4)],
        "units": len(common),
        "problems": n,
    }


def point_report(run_dir: Path, records: dict[tuple[str, int], dict]) -> dict[str, Any]:
    """Accuracy ± SE over seeds and the compute counters of one point."""
    if not records:
        return {"units": 0}
    by_seed: dict[int, list[bool]] = {}
    for (_, seed), r in records.items():
        by_seed.setdefault(seed, []).append(bool(r["correct"]))
    mean, se = mean_se([sum(v) / len(v) for v in by_seed.values()])
    units = len(records)
    wall = {k: round(t["seconds"] / t["units"], 3) for k, t in read_timing(run_dir).items() if t["units"]}
    changed = [r["answer_changed"] for r in records.values() if "answer_changed" in r]
    return {
        "units": units,
        "seeds": sorted(by_seed),
        "accuracy": round(mean, 4),
        "accuracy_se_seeds": None if se is None else round(se, 4),
        "decode_tokens_per_unit": round(sum(r["decode_tokens"] for r in records.values()) / units, 1),
        "scored_tokens_per_unit": round(sum(r["scored_tokens"] for r in records.values()) / units, 1),
        # The CPU's seconds when the point has them (the table's column), else the only device's.
        "wall_s_per_unit": wall.get("cpu", next(iter(wall.values())) if len(wall) == 1 else None),
        "wall_s_per_unit_by_device": wall,
        "answer_changed_share": round(sum(changed) / len(changed), 4) if changed else None,
    }


def report(points: list[Point], out: Path, reference: str | None, seed: int = 0) -> dict[str, Any]:
    """The frontier of the points found in ``out`` (one task's folder)."""
    rng = random.Random(seed)
    records = {p.label: _records(out / p.label) for p in points}
    present = [p for p in points if records[p.label]]
    if reference is None:
        mh = [p for p in present if p.method == "mh"]
        reference = max(mh, key=lambda p: p.budget or 0).label if mh else (present[0].label if present else None)
    common = set.intersection(*(set(records[p.label]) for p in present)) if present else set()
    result: dict[str, Any] = {"reference": reference, "common_units": len(common), "points": {}}
    for p in present:
        entry = {"method": p.method, "budget_name": p.budget_name, "budget": p.budget,
                 **point_report(out / p.label, records[p.label])}  # fmt: skip
        if reference and p.label != reference:
            entry["vs_reference"] = paired(records[p.label], records[reference], rng)
            shared = {k: records[p.label][k] for k in common}
            entry["vs_reference_common_units"] = paired(shared, {k: records[reference][k] for k in common}, rng)
        result["points"][p.label] = entry
    exact = out / "exact-pi" / "exact_pi.json"  # benchmarks.exact_pi: π's own accuracy, certified
    if exact.exists():
        summary = json.loads(exact.read_text())
        result["exact_pi"] = {
            "problems": summary["problems"],
            "accuracy": summary["pi_accuracy"],
            "accuracy_se_problems": summary["pi_accuracy_se"],
            "mean_tv_bound": summary["mean_tv_bound"],
            "vs_reference": summary["vs_points"].get(reference) if reference else None,
            "accuracy_interval": summary.get("pi_accuracy_interval"),
        }
        certified = summary.get("certified") or {}
        if certified.get("problems"):
            result["exact_pi"]["certified"] = {
                "bound": certified["bound"],
                "problems": certified["problems"],
                "accuracy": certified["pi_accuracy"],
                "accuracy_se_problems": certified["pi_accuracy_se"],
                "vs_reference": certified["vs_points"].get(reference) if reference else None,
            }
    return result


def _diff(entry: dict[str, Any] | None) -> str:
    if not entry:
        return ""
    se = "" if entry["se"] is None else f" ± {entry['se']:.3f}"
    low, high = entry["ci95"]
    return f"{entry['diff']:+.3f}{se} [{low:+.2f}, {high:+.2f}] ({entry['units']} units)"


def markdown_table(result: dict[str, Any]) -> str:
    """The frontier as a Markdown table: one row per point, cheapest first within each method.

    Examples
    --------
    >>> point = {"method": "mh", "budget": 2, "units": 4, "seeds": [0], "accuracy": 0.5,
    ...          "accuracy_se_seeds": None, "decode_tokens_per_unit": 70.0, "scored_tokens_per_unit": 3.0,
    ...          "wall_s_per_unit": 0.5, "answer_changed_share": 0.25}
    >>> print(markdown_table({"reference": "mh-steps2", "points": {"mh-steps2": point}}).splitlines()[2])
    | mh-steps2 | 4 | 1 | 0.500 | 70 | 3 | 0.50 | 25% | reference |
    """
    lines = [
        "| point | units | seeds | accuracy ± SE (seeds) | decode tok/unit | scored tok/unit | wall s/unit "
        f"| answer changed | paired diff vs {result['reference']} |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    entries = sorted(result["points"].items(), key=lambda kv: (kv[1]["method"], kv[1]["decode_tokens_per_unit"]))
    for label, e in entries:
        se = "" if e.get("accuracy_se_seeds") is None else f" ± {e['accuracy_se_seeds']:.3f}"
        wall = "" if e.get("wall_s_per_unit") is None else f"{e['wall_s_per_unit']:.2f}"
        changed = "" if e.get("answer_changed_share") is None else f"{100 * e['answer_changed_share']:.0f}%"
        diff = "reference" if label == result["reference"] else _diff(e.get("vs_reference"))
        lines.append(
            f"| {label} | {e['units']} | {len(e['seeds'])} | {e['accuracy']:.3f}{se} | "
            f"{e['decode_tokens_per_unit']:.0f} | {e['scored_tokens_per_unit']:.0f} | {wall} | {changed} | {diff} |"
        )
    pi = result.get("exact_pi")
    rows = []
    if pi:
        rows.append((f"π itself (found; mean bound {pi['mean_tv_bound']:.3f})", pi))
        if pi.get("certified"):
            rows.append((f"π itself (certified, bound <= {pi['certified']['bound']})", pi["certified"]))
    for label, e in rows:
        se = "" if e["accuracy_se_problems"] is None else f" ± {e['accuracy_se_problems']:.3f} (problems)"
        lines.append(
            f"| {label} | {e['problems']} problems | – | {e['accuracy']:.3f}{se} | – | – | – |  | "
            f"{_diff(e.get('vs_reference'))} |"
        )
    return "\n".join(lines)


def plot(result: dict[str, Any], task: str, path: Path) -> Path:
    fig, axes = new_figure(1, 1, size=(7.0, 4.6))
    ax = axes[0, 0]
    by_method: dict[str, list[dict]] = {}
    for entry in result["points"].values():
        by_method.setdefault(entry["method"], []).append(entry)
    for method, entries in sorted(by_method.items()):
        entries.sort(key=lambda e: e["decode_tokens_per_unit"])
        x = [e["decode_tokens_per_unit"] for e in entries]
        y = [e["accuracy"] for e in entries]
        err = [e["accuracy_se_seeds"] or 0.0 for e in entries]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=method)
    pi = result.get("exact_pi")
    if pi:
        se = pi["accuracy_se_problems"] or 0.0
        label = f"π itself ({pi['problems']} problems, mean bound {pi['mean_tv_bound']:.2f}; ± SE)"
        ax.axhline(pi["accuracy"], color="k", ls="--", lw=1.0, label=label)
        ax.axhspan(pi["accuracy"] - se, pi["accuracy"] + se, color="k", alpha=0.08)
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens per unit (log)")
    ax.set_ylabel("accuracy (± SE over seeds)")
    ax.set_title(f"{task}: accuracy against compute")
    ax.legend(fontsize="small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def add_run_arguments(parser: argparse.ArgumentParser, *, seeds: str, out: str, seeds_help: str | None = None) -> None:
    """The options of a benchmark made of :class:`Point` runs (this one and :mod:`benchmarks.ablations`): task,
    model, problems, seeds, α, tokens, batch, threads, device, dtype, ``--points``, ``--report-only``, ``--out``
    and ``--docs``."""
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--limit", type=int, default=100)
    parser.add_argument("--seeds", default=seeds, help=seeds_help)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    add_device_dtype_options(parser)
    parser.add_argument("--points", default=None, help="comma-separated point labels to run (default: all)")
    parser.add_argument("--report-only", action="store_true", help="do not run anything; report what is in --out")
    parser.add_argument("--out", default=out)
    parser.add_argument("--docs", default=None, help="copy the plot into this folder")


def run_selected(points: list[Point], args: argparse.Namespace) -> tuple[list[Point], Path]:
    """The points ``--points`` selects, run into ``<out>/<task>/`` unless ``--report-only``; returns them and
    that folder."""
    if args.points:
        wanted = set(args.points.split(","))
        points = [p for p in points if p.label in wanted]
    out = Path(args.out) / args.task.replace(":", "-")
    set_threads(args.threads)
    if not args.report_only:
        seeds = [int(s) for s in args.seeds.split(",")]
        run_points(points, args.task, args.model, seeds, args.limit, out, args.alpha, args.max_new_tokens, args.batch,
                   args.device, args.dtype)  # fmt: skip
    return points, out


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, seeds="0,1,2,3", out="runs/frontier")
    parser.add_argument("--reference", default=None, help="point label to compare against (default: largest mh)")
    parser.add_argument("--quick", action="store_true", help="tiny-gpt2, 3 problems, 4 points, 2 seeds")
    parser.add_argument("--mcmc-steps", default=",".join(map(str, MCMC_STEPS)),
                        help="comma-separated kernel-step budgets of the MCMC points (default: 2,5,10)")  # fmt: skip
    args = parser.parse_args(argv)
    try:
        steps = tuple(int(s) for s in args.mcmc_steps.split(","))
    except ValueError:
        parser.error(f"--mcmc-steps must be comma-separated integers, got {args.mcmc_steps!r}")
    if any(s < 1 for s in steps):
        parser.error(f"--mcmc-steps must be at least 1, got {args.mcmc_steps!r}")
    if args.quick:
        args.model, args.limit, args.seeds, args.max_new_tokens, args.batch = "tiny-gpt2", 3, "0,1", 8, 4
    points, out = run_selected(quick_points() if args.quick else default_points(steps), args)
    task_name = args.task.split(":")[0]
    result = report(points, out, args.reference)
    payload = {
        "benchmark": NAME,
        "task": args.task,
        "config": {
            "model": args.model,
            "limit": args.limit,
            "seeds": args.seeds,
            "alpha": args.alpha,
            "max_new_tokens": args.max_new_tokens,
            "batch": args.batch,
            "threads": args.threads,
            "device": args.device,
            "dtype": args.dtype,
        },
        "environment": environment(),
        **result,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "frontier.json").write_text(json.dumps(payload, indent=2) + "\n")
    if result["points"]:
        (out / "frontier.md").write_text(markdown_table(result) + "\n")
    png = plot(result, task_name, out / f"frontier_{task_name}.png") if result["points"] else None
    copy_plots(args.docs, png)
    print(f"wrote {out / 'frontier.json'}")
    return payload


if __name__ == "__main__":
    run_cli(main, NAME)
