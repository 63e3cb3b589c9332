"""bfloat16 against float32 on this machine's CPU: how much faster, and how much the target moves.

::

    python -m benchmarks.precision                       # SmolLM2-135M, 32 arithmetic units
    python -m benchmarks.precision --quick               # tiny-gpt2, 4 units (seconds; the tests)
    python -m benchmarks.precision --docs docs/benchmarks
    python -m benchmarks.precision --device cuda --model HUB_ID   # the same question on a GPU (wall seconds)

CPUs with AMX or AVX512-BF16 units (Intel Sapphire Rapids and later, AMD Zen 4 and later) multiply bf16 matrices
several times faster than float32 ones, so ``--dtype bfloat16`` can pay on the CPU too. But the power target is
``π ∝ p^α``: whatever bf16 does to ``log p`` is multiplied by α, and MH's acceptance ratio is a difference of two
such sums. Both models are loaded in one process and measured side by side:

1. **Speed**: the batched evaluation (:func:`egps_ppl.evals.runner.evaluate_batched`) of the same units with
   ``low-temp`` and ``mh`` (2 steps), CPU seconds of this process (wall seconds on a GPU) per dtype (the dtypes
   alternate, ``--rounds`` times, and the median is kept), and the accuracy each dtype's records get.
2. **Numerics**: ``--samples`` completions per problem drawn by the float32 model at temperature 1/α, scored by
   teacher forcing under both models. Reported: ``|Δ log p|`` per sequence and per token (bf16 − float32); the
   error of a log ratio ``log p(a) − log p(b)`` between two completions of the same problem (what an MH
   acceptance reads, times α); the share of such pairs whose order flips; and, within the bf16 model alone, how far
   the log p it records while decoding a completion is from the log p it gives the same completion when teacher
   forced (the two code paths round differently; float32's own gap is the baseline).

Writes ``<out>/precision.json`` and ``precision.png``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import (
    RESULTS_DIR,
    copy_plots,
    environment,
    grouped_bars,
    new_figure,
    run_cli,
    set_threads,
    write_results,
)

NAME = "precision"
DTYPES = ("float32", "bfloat16")


def bf16_units() -> list[str] | None:
    """The CPU's bf16 matrix units named in ``/proc/cpuinfo`` (``None`` where there is no such file)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return None
    flags = set(text.split())
    return sorted(flags & {"amx_bf16", "amx_tile", "avx512_bf16"})


def clock(device: str) -> Callable[[], float]:
    """This process's CPU seconds on the CPU; wall seconds after the device's queue is done elsewhere."""
    import torch

    if torch.device(device).type == "cpu":
        return time.process_time

    def wall() -> float:
        torch.cuda.synchronize(device)
        return time.perf_counter()

    return wall


def speed(models: dict[str, Any], task: Any, units: int, alpha: float, max_new_tokens: int, rounds: int,
          device: str = "cpu") -> dict:  # fmt: skip
    """Seconds (:func:`clock`; median over ``rounds``) and accuracy of the batched evaluation per method and
    dtype."""
    from egps_ppl.evals.methods import load_method
    from egps_ppl.evals.runner import evaluate_batched

    now = clock(device)
    todo = [(i, p, 0) for i, p in enumerate(task.problems(units))]
    out: dict[str, Any] = {}
    for name, settings in (("low-temp", {}), ("mh", {"steps": 2})):
        method = load_method(name, alpha=alpha, **settings)
        seconds: dict[str, list[float]] = {d: [] for d in models}
        records: dict[str, list[dict[str, Any]]] = {}
        for _ in range(rounds):
            for dtype, lm in models.items():
                started = now()
                records[dtype] = list(evaluate_batched(task, method, lm, todo, batch=units,
                                                       max_new_tokens=max_new_tokens))  # fmt: skip
                seconds[dtype].append(now() - started)
        entry: dict[str, Any] = {}
        for dtype in models:
            rows = records[dtype]
            entry[dtype] = {
                "seconds": round(statistics.median(seconds[dtype]), 2),
                "accuracy": round(sum(r["correct"] for r in rows) / len(rows), 4),
                "decode_tokens": sum(r["decode_tokens"] for r in rows),
            }
        a, b = records["float32"], records["bfloat16"]
        entry["speedup"] = round(entry["float32"]["seconds"] / max(entry["bfloat16"]["seconds"], 1e-9), 2)
        pairs = list(zip(a, b, strict=True))
        entry["same_completion"] = f"{sum(x['completion'] == y['completion'] for x, y in pairs)}/{len(a)}"
        entry["same_correctness"] = f"{sum(x['correct'] == y['correct'] for x, y in pairs)}/{len(a)}"
        out[name] = entry
    return out


def numerics(models: dict[str, Any], prompts: list[list[int]], samples: int, alpha: float, max_new_tokens: int,
             seed: int) -> dict[str, Any]:  # fmt: skip
    """How bf16 moves ``log p`` of float32's own completions, and each model's decode/teacher-forcing gap."""
    import torch

    from egps_ppl.models.policy import PowerPolicy

    policy = PowerPolicy(alpha)
    rows = [p for p in prompts for _ in range(samples)]
    logp: dict[str, torch.Tensor] = {}
    gaps: dict[str, torch.Tensor] = {}
    completions: list[list[int]] = []
    lengths = None
    for dtype, lm in models.items():
        generator = torch.Generator().manual_seed(seed)
        start = lm.start(rows, len(rows), max_new_tokens, policy)
        drawn, _ = lm.extend(start, torch.zeros(len(rows), dtype=torch.long), generator=generator)
        rescored, _ = lm.score(drawn, torch.zeros_like(drawn.length))
        gaps[dtype] = (drawn.total("logp") - rescored.total("logp")).abs()
        if dtype == "float32":
            completions = [drawn.row_tokens(r) for r in range(len(rows))]
            lengths = drawn.length.double()
    for dtype, lm in models.items():
        scored, _ = lm.from_tokens(rows, completions, max_new_tokens, policy)
        logp[dtype] = scored.total("logp")
    assert lengths is not None
    diff = logp["bfloat16"] - logp["float32"]
    pair_err, flips, pairs = [], 0, 0
    for p in range(len(prompts)):
        block = range(p * samples, (p + 1) * samples)
        for i in block:
            for j in block:
                if i < j and completions[i] != completions[j]:
                    d32 = float(logp["float32"][i] - logp["float32"][j])
                    d16 = float(logp["bfloat16"][i] - logp["bfloat16"][j])
                    pair_err.append(abs(d16 - d32))
                    flips += (d16 > 0) != (d32 > 0)
                    pairs += 1

    def spread(x: list[float]) -> dict[str, float]:
        xs = sorted(x)
        return {
            "mean": round(statistics.fmean(xs), 4),
            "p90": round(xs[int(0.9 * (len(xs) - 1))], 4),
            "max": round(xs[-1], 4),
        }

    return {
        "sequences": len(rows),
        "mean_tokens": round(float(lengths.mean()), 1),
        "abs_dlogp_per_sequence": spread(diff.abs().tolist()),
        "abs_dlogp_per_token": round(float((diff.abs() / lengths.clamp(min=1)).mean()), 5),
        "mean_dlogp_per_sequence": round(float(diff.mean()), 4),
        "pairs": pairs,
        "abs_log_ratio_error": spread(pair_err) if pair_err else None,
        "abs_log_pi_ratio_error_mean": round(alpha * statistics.fmean(pair_err), 4) if pair_err else None,
        "order_flips": f"{flips}/{pairs}",
        "decode_vs_forced": {d: spread(g.tolist()) for d, g in gaps.items()},
    }


def plot(result: dict[str, Any]) -> Any:
    fig, axes = new_figure(1, 2, size=(4.6, 3.4))
    e2e = result["speed"]
    grouped_bars(axes[0, 0], list(e2e), {dtype: [e2e[m][dtype]["seconds"] for m in e2e] for dtype in DTYPES})
    unit = "CPU" if result["config"]["device"] == "cpu" else "wall"
    axes[0, 0].set_ylabel(f"{unit} seconds, batched evaluation")
    axes[0, 0].set_title(f"{result['config']['units']} arithmetic units")
    num = result["numerics"]
    labels = ["|Δ log p|\nper sequence", "|Δ log ratio|\nof a pair", "decode vs\nforced, bf16",
              "decode vs\nforced, f32"]  # fmt: skip
    stats = [num["abs_dlogp_per_sequence"], num["abs_log_ratio_error"] or {"mean": 0, "max": 0},
             num["decode_vs_forced"]["bfloat16"], num["decode_vs_forced"]["float32"]]  # fmt: skip
    axes[0, 1].bar(range(4), [s["mean"] for s in stats], label="mean")
    axes[0, 1].scatter(range(4), [s["max"] for s in stats], color="k", marker="_", s=200, label="max")
    axes[0, 1].set_xticks(range(4), labels, fontsize=7)
    axes[0, 1].set_ylabel("nats of log p (log π: × α)")
    axes[0, 1].set_title(f"{num['sequences']} float32 completions")
    axes[0, 1].legend()
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--units", type=int, default=32, help="arithmetic problems (seed 0), run as one batch")
    parser.add_argument("--samples", type=int, default=4, help="completions per problem for the numerics")
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--rounds", type=int, default=2, help="timed runs per dtype (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--device", default="cpu", help="torch device of both models (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--docs", default=None, help="copy the plot into this folder")
    parser.add_argument("--quick", action="store_true", help="tiny-gpt2, 4 units, 8 tokens, 1 round")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.units, args.max_new_tokens, args.rounds = "tiny-gpt2", 4, 8, 1
    threads = set_threads(args.threads)

    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.registry import load_model

    models = {dtype: load_model(args.model, device=args.device, dtype=dtype) for dtype in DTYPES}
    task = load_task("arithmetic")
    prompts = [task.build_prompt(p, models["float32"]) for p in task.problems(args.units)]
    result: dict[str, Any] = {
        "benchmark": NAME,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "docs")} | {"threads": threads},
        "environment": environment() | {"cpu_bf16_units": bf16_units() if args.device == "cpu" else None},
        "numerics": numerics(models, prompts, args.samples, args.alpha, args.max_new_tokens, args.seed),
        "speed": speed(models, task, args.units, args.alpha, args.max_new_tokens, args.rounds, args.device),
    }
    json_path, png_path = write_results(NAME, result, args.out, plot(result))
    copy_plots(args.docs, png_path)
    for name, entry in result["speed"].items():
        print(f"{name}: float32 {entry['float32']['seconds']} s, bfloat16 {entry['bfloat16']['seconds']} s "
              f"({entry['speedup']}x); accuracy {entry['float32']['accuracy']} / {entry['bfloat16']['accuracy']}; "
              f"same completion {entry['same_completion']}")  # fmt: skip
    num = result["numerics"]
    print(f"|dlogp| per sequence {num['abs_dlogp_per_sequence']}, pair log-ratio error {num['abs_log_ratio_error']}, "
          f"order flips {num['order_flips']}, decode vs forced {num['decode_vs_forced']}")  # fmt: skip
    print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    run_cli(main, NAME)
