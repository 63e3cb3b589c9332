"""Units per second of batched evaluation (``egps eval --batch N``) against one unit at a time.

::

    python -m benchmarks.batched_eval                  # SmolLM2-135M, arithmetic, batch 1, 4, 8, 16, 32
    python -m benchmarks.batched_eval --quick          # tiny-gpt2, a few units (seconds; used by the tests)
    python -m benchmarks.batched_eval --docs docs/benchmarks

For each method (``plain``, ``low-temp``, ``mh`` and ``egps`` with 10 steps) and each batch size ``N`` it runs the
same units (arithmetic problems × seed 0) through :func:`egps_ppl.evals.runner.evaluate_batched` with
``batch = N`` and records wall-clock and CPU seconds (``time.process_time``: this process's own CPU time, which
other processes on a shared machine inflate far less than wall-clock; the speed-ups are quoted in units per
CPU-second, and with one torch thread the two agree on an idle machine), units per second, decode / scored tokens
and the peak resident memory of the process during that configuration (``VmHWM``, reset before each one through
``/proc/self/clear_refs`` after returning freed memory with ``malloc_trim``; an upper bound, since memory the
previous configuration still holds counts). ``N = 1`` is the one-at-a-time runner: every unit alone, as
``evaluate_unit`` runs it. Every configuration of a method runs the same units, and the benchmark checks that
their records are identical across batch sizes (completion and answer): batching changes the speed, not the
result.

The backend stores the prompt positions all rows share once (``HFModel(share_prefix=True)``, the default: the
few-shot part of every arithmetic prompt, and the whole prompt for a unit's chains and tries). ``--copied-batches``
also runs the given batch sizes with ``share_prefix=False``, the layout before it (every row holds its own copy of
its prompt's keys and values), for the side-by-side comparison of speed and memory.

Writes ``<out>/batched_eval.json`` and ``<out>/batched_eval.png`` (units per CPU-second and peak memory against
batch size).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import os
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, copy_plots, environment, new_figure, run_cli, set_threads, write_results

NAME = "batched_eval"
METHODS = ("mh", "egps", "low-temp", "plain")
BATCHES = (1, 4, 8, 16, 32)
QUICK_BATCHES = (1, 4)


def peak_rss_reset() -> bool:
    """Release freed memory to the OS and reset the process's peak resident set (Linux ``clear_refs`` 5), so the
    next peak is the next configuration's; ``False`` where unsupported."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
        return True
    return False


def peak_rss_mib() -> float | None:
    """Peak resident set size of this process in MiB (``VmHWM``), ``None`` where unknown."""
    with contextlib.suppress(OSError), open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return None


def run_config(
    task: Any, method: Any, lm: Any, todo: list, batch: int, max_new_tokens: int, layout: str = "shared"
) -> dict[str, Any]:
    """One (method, batch) configuration: every unit of ``todo`` through the batched runner."""
    from egps_ppl.evals.runner import evaluate_batched

    reset = peak_rss_reset()
    started, cpu_started = time.perf_counter(), time.process_time()
    records = list(evaluate_batched(task, method, lm, todo, batch=batch, max_new_tokens=max_new_tokens))
    seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
    return {
        "batch": batch,
        "layout": layout,
        "units": len(records),
        "seconds": round(seconds, 3),
        "cpu_seconds": round(cpu_seconds, 3),
        "units_per_second": round(len(records) / seconds, 4),
        "units_per_cpu_second": round(len(records) / cpu_seconds, 4),
        "decode_tokens": sum(r["decode_tokens"] for r in records),
        "scored_tokens": sum(r["scored_tokens"] for r in records),
        "accuracy": sum(r["correct"] for r in records) / len(records),
        "peak_rss_mib": round(peak_rss_mib(), 1) if reset and peak_rss_mib() is not None else None,
        "records": {r["problem_id"]: [r["completion_ids"], r["answer"]] for r in records},
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny-gpt2, few units, batch 1 and 4")
    parser.add_argument(
        "--units", type=int, default=None, help="units per configuration (default: 2 x the largest batch)"
    )
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes")
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10, help="MCMC kernel steps")
    parser.add_argument(
        "--copied-batches", default="", help="batch sizes also run with every row holding its own prompt copy"
    )
    parser.add_argument("--copied-methods", default=None, help="methods that get --copied-batches (default: all)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--docs", default=None, help="also copy the plot into this folder")
    args = parser.parse_args(argv)

    from egps_ppl.evals.methods import load_method
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.registry import load_model

    threads = set_threads(args.threads)
    batches = tuple(int(b) for b in args.batches.split(",")) if args.batches else (
        QUICK_BATCHES if args.quick else BATCHES
    )  # fmt: skip
    copied_batches = tuple(int(b) for b in args.copied_batches.split(",") if b.strip())
    units = args.units or (6 if args.quick else 2 * max(batches))
    model_name = "tiny-gpt2" if args.quick else "smollm2-135m"
    lm = load_model(model_name)
    copied_lm = load_model(model_name, share_prefix=False) if copied_batches else None
    task = load_task("arithmetic")
    problems = task.problems(units)
    todo = [(i, p, 0) for i, p in enumerate(problems)]
    results: dict[str, Any] = {}
    for spec in args.methods.split(","):
        method = load_method(spec, alpha=4.0, steps=args.steps)
        rows = []
        copied_here = args.copied_methods is None or spec in args.copied_methods.split(",")
        configs = [(b, "shared", lm) for b in batches]
        configs += [(b, "copied", copied_lm) for b in copied_batches if copied_here]
        for batch, layout, model in configs:
            row = run_config(task, method, model, todo, batch, args.max_new_tokens, layout)
            print(
                f"{spec:>9} batch {batch:>3} {layout}: {row['units_per_second']:.3f} units/s, "
                f"{row['units_per_cpu_second']:.3f} units/CPU-s, peak {row['peak_rss_mib']} MiB",
                flush=True,
            )
            rows.append(row)
            partial = {"rows": [{k: v for k, v in r.items() if k != "records"} for r in rows]}
            _write(args, model_name, units, batches, threads, {**results, spec: partial})
        base = rows[0]
        for row in rows:
            row["speedup_vs_batch_1"] = round(row["units_per_second"] / base["units_per_second"], 3)
            row["cpu_speedup_vs_batch_1"] = round(row["units_per_cpu_second"] / base["units_per_cpu_second"], 3)
            row["same_records_as_batch_1"] = row["records"] == base["records"]
        best = max((r for r in rows if r["layout"] == "shared"), key=lambda r: r["units_per_cpu_second"])
        results[spec] = {
            "rows": [{k: v for k, v in r.items() if k != "records"} for r in rows],
            "best_batch": best["batch"],
            "best_speedup": best["speedup_vs_batch_1"],
            "best_cpu_speedup": best["cpu_speedup_vs_batch_1"],
            "records_identical_across_batches": all(r["same_records_as_batch_1"] for r in rows),
            "accuracy": base["accuracy"],
        }
        _write(args, model_name, units, batches, threads, results)  # partial results survive an interruption
    json_path = _write(args, model_name, units, batches, threads, results)
    print(f"wrote {json_path}")
    return json.loads(json_path.read_text())


def _write(
    args: argparse.Namespace, model_name: str, units: int, batches: tuple, threads: int, results: dict[str, Any]
) -> Path:
    payload = {
        "benchmark": NAME,
        "config": {
            "quick": args.quick,
            "model": model_name,
            "task": "arithmetic",
            "units": units,
            "batches": list(batches),
            "copied_batches": [int(b) for b in args.copied_batches.split(",") if b.strip()],
            "max_new_tokens": args.max_new_tokens,
            "steps": args.steps,
            "threads": threads,
            "alpha": 4.0,
        },
        "environment": environment(),
        "methods": results,
        "goal": "≥ 5x units/s at the best batch for mh and egps on a 2-core CPU",
    }
    json_path, png_path = write_results(NAME, payload, args.out, _plot(results))
    copy_plots(args.docs, png_path)
    return json_path


def _plot(results: dict[str, Any]) -> Any:
    fig, axes = new_figure(1, 2)
    for spec, res in results.items():
        for layout, style in (("shared", "-o"), ("copied", "--s")):
            rows = [r for r in res["rows"] if r.get("layout", "shared") == layout and "cpu_speedup_vs_batch_1" in r]
            if not rows:
                continue
            label = spec if layout == "shared" else f"{spec} (prompt copied per row)"
            batch = [r["batch"] for r in rows]
            axes[0, 0].plot(batch, [r["cpu_speedup_vs_batch_1"] for r in rows], style, label=label)
            memory = [r["peak_rss_mib"] for r in rows]
            if all(m is not None for m in memory):
                axes[0, 1].plot(batch, memory, style, label=label)
    titles = ("units per CPU-second relative to batch 1", "peak resident memory (MiB)")
    for ax, title in zip(axes[0], titles, strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("units in flight (--batch)")
        ax.set_title(title)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
    axes[0, 0].axhline(1.0, color="0.6", lw=0.8)
    fig.tight_layout()
    return fig


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    run_cli(main, NAME)
