"""Every way of sampling p^α on equal footing: quality against decode tokens and wall-clock, side by side.

Run from the repository root::

    python -m benchmarks.baselines                 # test beds + SmolLM2 arithmetic (~30-40 min on 2 busy cores)
    python -m benchmarks.baselines --quick         # one tiny test bed, few replicates, no SmolLM2 (seconds)
    python -m benchmarks.baselines --docs docs/benchmarks

Writes ``<out>/baselines.json`` and ``<out>/baselines_*.png`` and prints Markdown tables.

Every method is an evaluation method of :func:`egps_ppl.evals.methods.load_method` (``plain``, ``low-temp``,
``best-of-n``, ``smc``, ``sps``, ``mh``, ``egps``), so the benchmark measures exactly what ``egps eval`` runs, with
the backend's cost counters. Each method runs at several compute settings (steps, particles, rollouts, n).

**Part 1: sparse-decision test beds, where π is exact.** Each (method, setting) produces ``R`` independent
outputs (one per replicate seed, one output per run: the chosen particle, the final chain state, the best of n).
Quality is the total variation between the empirical joint distribution of the ``D`` branch choices of those
outputs and its exact value under π (see :mod:`benchmarks.egps_speedup`), next to the TV that ``R`` exact draws
from π would score (the noise floor). Cost is the mean decode tokens and wall-clock per output.

**Part 2: SmolLM2-135M-Instruct on arithmetic word problems.** The methods run on the same problems, problem by
problem and method by method in one process (so machine noise hits every method alike); accuracy, decode tokens
and wall-clock per problem. With a few dozen problems the accuracy differences carry a standard error of
~0.05-0.09: read them together with the test-bed part.

Wall-clock numbers are for one process with ``torch.set_num_threads(1)`` on a shared 2-core machine.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, copy_plots, environment, new_figure, run_cli, set_threads, write_results
from benchmarks.egps_speedup import branch_bits, exact_summary, noise_floor, total_variation
from egps_ppl.evals.methods import load_method
from egps_ppl.models.testbeds import sparse_decision

NAME = "baselines"
ALPHA = 4.0
COLORS = {
    "plain": "#7f7f7f",
    "low-temp": "#bcbd22",
    "best-of-n": "#8c564b",
    "smc": "#9467bd",
    "sps": "#17becf",
    "mh": "#1f77b4",
    "egps": "#d62728",
}


@dataclass(frozen=True)
class Point:
    """One method at one compute setting: ``options`` go to :func:`load_method`."""

    method: str
    options: dict[str, Any] = field(default_factory=dict)

    @property
    def label(self) -> str:
        opts = ",".join(f"{k}={v}" for k, v in self.options.items())
        return f"{self.method}({opts})" if opts else self.method


BED_POINTS = (
    Point("plain"),
    Point("low-temp"),
    *(Point("best-of-n", {"n": n}) for n in (4, 16, 64)),
    Point("smc", {"particles": 128}),  # the paper's ESS check every 64 tokens: never inside these completions
    *(Point("smc", {"particles": n, "ess_every": 1}) for n in (8, 32, 128)),
    *(Point("sps", {"rollouts": m}) for m in (2, 8, 32)),
    *(Point("mh", {"steps": s}) for s in (2, 8, 32, 128)),
    *(Point("egps", {"steps": s}) for s in (2, 8, 32)),
)
SMOLLM2_POINTS = (
    Point("plain"),
    Point("low-temp"),
    Point("best-of-n", {"n": 8}),
    Point("smc", {"particles": 16, "ess_every": 8}),
    Point("sps", {"rollouts": 4, "top_k": 4, "horizon": 32, "block_size": 16}),
    Point("mh", {"steps": 10}),
    Point("egps", {"steps": 10}),
)


@dataclass(frozen=True)
class Settings:
    """What sizes a run."""

    beds: tuple[tuple[int, int], ...]  # (num_decisions, run_length)
    replicates: int
    bed_points: tuple[Point, ...]
    smollm2_problems: int
    smollm2_points: tuple[Point, ...] = SMOLLM2_POINTS
    max_new_tokens: int = 48
    seed: int = 0


FULL = Settings(beds=((3, 8),), replicates=400, bed_points=BED_POINTS, smollm2_problems=20)
QUICK = Settings(
    beds=((2, 4),),
    replicates=40,
    bed_points=(Point("plain"), Point("smc", {"particles": 8, "ess_every": 1}), Point("mh", {"steps": 4})),
    smollm2_problems=0,
)


# ---------------------------------------------------------------------------------------------- part 1
def run_bed(num_decisions: int, run_length: int, settings: Settings, log: bool = True) -> dict[str, Any]:
    """Every point on one sparse-decision bed: TV of the outputs' branch choices to π, and costs per output."""
    sd = sparse_decision(num_decisions, run_length, seed=settings.seed)
    exact = exact_summary(sd, ALPHA)
    joint = np.asarray(exact["joint"])
    unlikely = torch.tensor(sd.unlikely_tokens)
    rows = []
    for point in settings.bed_points:
        method = load_method(point.method, ALPHA, **point.options)
        bits, decode, scored, wall = [], [], [], []
        for rep in range(settings.replicates):
            result = method.run(sd.model, [], sd.max_new_tokens, settings.seed * 100_003 + rep)
            bits.append(int(branch_bits(torch.tensor([result.completion_ids]), unlikely)[0]))
            decode.append(result.decode_tokens)
            scored.append(result.scored_tokens)
            wall.append(result.wall_s)
        row = {
            "label": point.label,
            "method": point.method,
            "options": point.options,
            "tv": total_variation(torch.tensor(bits), joint),
            "unlikely_rate": float(np.mean([bin(b).count("1") for b in bits]) / num_decisions),
            "decode_tokens": float(np.mean(decode)),
            "scored_tokens": float(np.mean(scored)),
            "wall_ms": 1000 * float(np.mean(wall)),
        }
        rows.append(row)
        if log:
            print(
                f"  {row['label']:<28} TV {row['tv']:.3f}  unlikely {row['unlikely_rate']:.2f}  "
                f"decode {row['decode_tokens']:>9.0f}  wall {row['wall_ms']:8.1f} ms",
                file=sys.stderr,
            )
    return {
        "num_decisions": num_decisions,
        "run_length": run_length,
        "max_new_tokens": sd.max_new_tokens,
        "exact_unlikely_rate": float(np.mean(exact["unlikely_marginals"])),
        "noise_floor": noise_floor(joint, settings.replicates, settings.seed),
        "points": rows,
    }


# ---------------------------------------------------------------------------------------------- part 2
def run_smollm2(settings: Settings, log: bool = True) -> dict[str, Any]:
    """Arithmetic accuracy and cost of every point on SmolLM2, problem-major so noise hits all methods alike."""
    from egps_ppl.evals.runner import evaluate_unit
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.registry import load_model

    lm = load_model("smollm2-135m")
    task = load_task("arithmetic")
    problems = task.problems(settings.smollm2_problems)
    methods = [(p, load_method(p.method, ALPHA, **p.options)) for p in settings.smollm2_points]
    records: dict[str, list[dict[str, Any]]] = {p.label: [] for p, _ in methods}
    for index, problem in enumerate(problems):
        for point, method in methods:
            record = evaluate_unit(
                task, method, lm, problem, settings.seed, max_new_tokens=settings.max_new_tokens, problem_index=index
            )
            records[point.label].append(record)
        if log:
            line = "  ".join(f"{p.label}:{sum(r['correct'] for r in records[p.label])}" for p, _ in methods)
            print(f"  problem {index + 1}/{len(problems)}  correct so far  {line}", file=sys.stderr)
    rows = []
    for point, _ in methods:
        recs = records[point.label]
        correct = [float(r["correct"]) for r in recs]
        rows.append(
            {
                "label": point.label,
                "method": point.method,
                "options": point.options,
                "accuracy": statistics.fmean(correct),
                "accuracy_se": statistics.stdev(correct) / len(correct) ** 0.5 if len(correct) > 1 else None,
                "decode_tokens": statistics.fmean(r["decode_tokens"] for r in recs),
                "scored_tokens": statistics.fmean(r["scored_tokens"] for r in recs),
                "wall_s": statistics.fmean(r["wall_s"] for r in recs),
                "log_p": statistics.fmean(r["extra"]["log_p"] for r in recs),
            }
        )
    plain_wall = next((r["wall_s"] for r in rows if r["method"] == "plain"), None)
    for row in rows:
        row["wall_vs_plain"] = row["wall_s"] / plain_wall if plain_wall else None
    return {"problems": len(problems), "max_new_tokens": settings.max_new_tokens, "points": rows}


# ---------------------------------------------------------------------------------------------- output
def plot(payload: dict[str, Any], out_dir: Path) -> list[Path]:
    """Quality against decode tokens (log scale), one panel per bed, plus SmolLM2 accuracy against wall-clock."""
    paths = []
    beds = payload["beds"]
    if beds:
        fig, axes = new_figure(1, len(beds), size=(5.5, 4.0))
        for ax, bed in zip(axes[0], beds, strict=True):
            for series in dict.fromkeys(_series(p) for p in bed["points"]):
                pts = [p for p in bed["points"] if _series(p) == series]
                ax.plot(
                    [p["decode_tokens"] for p in pts],
                    [p["tv"] for p in pts],
                    "o-" if series == pts[0]["method"] or len(pts) > 1 else "s",
                    color=COLORS.get(pts[0]["method"]),
                    label=series,
                )
            ax.axhline(bed["noise_floor"]["mean"], color="k", ls=":", lw=1, label="exact draws (noise floor)")
            ax.set_xscale("log")
            ax.set_xlabel("decode tokens per output")
            ax.set_ylabel("TV of branch choices to π")
            ax.set_title(f"sparse decision D={bed['num_decisions']}, L={bed['run_length']}")
            ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / f"{NAME}_beds.png"))
    smol = payload.get("smollm2")
    if smol:
        fig, axes = new_figure(1, 1, size=(5.5, 4.0))
        ax = axes[0][0]
        for row in smol["points"]:
            ax.errorbar(
                row["wall_s"],
                row["accuracy"],
                yerr=row["accuracy_se"] or 0.0,
                fmt="o",
                color=COLORS.get(row["method"]),
                label=row["label"],
            )
        ax.set_xscale("log")
        ax.set_xlabel("wall-clock seconds per problem (1 thread)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"SmolLM2-135M arithmetic, {smol['problems']} problems, α={ALPHA:g}")
        ax.legend(fontsize=7)
        paths.append(_save(fig, out_dir / f"{NAME}_smollm2.png"))
    return paths


SWEPT = ("n", "particles", "rollouts", "steps")
"""Options a curve sweeps; points that differ only in these share a line in the plot."""


def _series(point: dict[str, Any]) -> str:
    fixed = {k: v for k, v in point["options"].items() if k not in SWEPT}
    return point["method"] + (f" ({', '.join(f'{k}={v}' for k, v in fixed.items())})" if fixed else "")


def _save(fig: Any, path: Path) -> Path:
    import matplotlib.pyplot as plt

    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown_tables(payload: dict[str, Any]) -> str:
    """The result tables as Markdown."""
    lines = []
    for bed in payload["beds"]:
        lines += [
            f"**Sparse decision D={bed['num_decisions']}, L={bed['run_length']}** "
            f"(T={bed['max_new_tokens']}, {payload['settings']['replicates']} outputs per row; π takes the unlikely "
            f"branch with probability {bed['exact_unlikely_rate']:.3f}; exact draws score TV "
            f"{bed['noise_floor']['mean']:.3f})",
            "",
            "| method | TV to π | unlikely-branch rate | decode tokens / output | scored tokens / output | wall ms |",
            "| --- | ---: | ---: | ---: | ---: | ---: |",
        ]
        for p in bed["points"]:
            lines.append(
                f"| {p['label']} | {p['tv']:.3f} | {p['unlikely_rate']:.3f} | {p['decode_tokens']:,.0f} | "
                f"{p['scored_tokens']:,.0f} | {p['wall_ms']:.1f} |"
            )
        lines.append("")
    smol = payload.get("smollm2")
    if smol:
        lines += [
            f"**SmolLM2-135M-Instruct, arithmetic, {smol['problems']} problems, seed 0, "
            f"{smol['max_new_tokens']} new tokens, α={ALPHA:g}**",
            "",
            "| method | accuracy ± SE | mean log p | decode tokens | scored tokens | wall s | × plain |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for r in smol["points"]:
            se = f" ± {r['accuracy_se']:.3f}" if r["accuracy_se"] is not None else ""
            ratio = f"{r['wall_vs_plain']:.1f}" if r["wall_vs_plain"] else "–"
            lines.append(
                f"| {r['label']} | {r['accuracy']:.3f}{se} | {r['log_p']:.2f} | {r['decode_tokens']:,.0f} | "
                f"{r['scored_tokens']:,.0f} | {r['wall_s']:.1f} | {ratio} |"
            )
    return "\n".join(lines)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a tiny bed and few replicates, no SmolLM2")
    parser.add_argument("--no-smollm2", action="store_true", help="skip part 2")
    parser.add_argument("--problems", type=int, default=None, help="SmolLM2 problems (default 20)")
    parser.add_argument("--replicates", type=int, default=None, help="outputs per (method, setting) on the beds")
    parser.add_argument("--out", default=str(RESULTS_DIR), help="folder for the JSON and PNGs")
    parser.add_argument("--docs", default=None, help="also copy the PNGs into this folder")
    parser.add_argument("--threads", type=int, default=1)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    set_threads(args.threads)
    settings = QUICK if args.quick else FULL
    if args.replicates is not None:
        settings = Settings(**{**settings.__dict__, "replicates": args.replicates})
    problems = 0 if args.no_smollm2 else (args.problems if args.problems is not None else settings.smollm2_problems)
    started = time.perf_counter()
    beds = []
    for d, length in settings.beds:
        print(f"sparse decision D={d}, L={length}", file=sys.stderr)
        beds.append(run_bed(d, length, settings))
    smol = None
    if problems > 0:
        print(f"SmolLM2 arithmetic, {problems} problems", file=sys.stderr)
        smol = run_smollm2(Settings(**{**settings.__dict__, "smollm2_problems": problems}))
    payload = {
        "benchmark": NAME,
        "alpha": ALPHA,
        "settings": {"replicates": settings.replicates, "quick": args.quick, "smollm2_problems": problems},
        "beds": beds,
        "smollm2": smol,
        "seconds": time.perf_counter() - started,
        "environment": environment(),
    }
    out = Path(args.out)
    write_results(NAME, payload, out)
    pngs = plot(payload, out)
    copy_plots(args.docs, *pngs)
    print(markdown_tables(payload))
    return payload


if __name__ == "__main__":
    run_cli(main, NAME)
