"""What subnormal floats cost the token statistics on a CPU, and what flushing them to zero saves.

::

    python -m benchmarks.subnormal                       # SmolLM2-135M, 16 arithmetic units, low-temp and mh
    python -m benchmarks.subnormal --quick               # tiny-gpt2, 4 units (seconds; the tests)
    python -m benchmarks.subnormal --docs docs/benchmarks

At α = 4, ``α · log p`` spreads a 49k-token vocabulary over 150+ nats, and about 30% of SmolLM2's policy
probabilities ``q = exp(α log p - log Z)`` fall below float32's smallest normal number (1.2e-38). A CPU computes
``exp`` of such arguments on a slow path, 50-60x slower than on the rest, and every decode step takes ``exp`` of
the whole row three times (``log Z``, the entropy's ``p``, the sampling CDF). :func:`egps_ppl.models.policy.exp_flushed`
and :func:`~egps_ppl.models.policy.logsumexp_flushed` keep every argument in the normal range and set the
results below it to 0 (a token with ``q < 1.2e-38`` is never drawn; float32 CDFs could not resolve it anyway).

Two parts, each run with the flushed functions and with plain ``torch.exp`` / ``torch.logsumexp`` (the code
before the change, patched in for the comparison), side by side in one process:

1. **Per step**: :func:`~egps_ppl.models.base.next_token_stats` and :func:`~egps_ppl.models.base.sample_tokens`
   on real next-token logits of 16 arithmetic prompts (median of ``--repeats`` calls).
2. **End to end**: the batched evaluation (:func:`egps_ppl.evals.runner.evaluate_batched`) of the same units with
   ``low-temp`` and ``mh`` (2 steps), in CPU seconds of this process; and whether the two give identical records
   (they do unless a token of probability below 1.2e-38 was drawn, or ``log Z`` differs in its last bit).

Writes ``<out>/subnormal.json`` and ``subnormal.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Callable, Iterator
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

NAME = "subnormal"
MODES = ("flushed", "plain")


@contextlib.contextmanager
def plain_exp() -> Iterator[None]:
    """Put back plain ``torch.exp`` / ``torch.logsumexp`` where the token statistics use the flushed ones."""
    import torch

    from egps_ppl.models import base, policy

    saved = policy.logsumexp_flushed, base.exp_flushed
    policy.logsumexp_flushed = lambda x, dim=-1: torch.logsumexp(x, dim)
    base.exp_flushed = torch.exp
    try:
        yield
    finally:
        policy.logsumexp_flushed, base.exp_flushed = saved


def _median_ms(fn: Callable[[], Any], repeats: int) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 3)


def per_step(lm: Any, prompts: list[list[int]], alpha: float, repeats: int) -> dict[str, Any]:
    """Milliseconds of one step's statistics and draw for the prompts' next-token logits, per mode."""
    import torch

    from egps_ppl.models.base import next_token_stats, sample_tokens
    from egps_ppl.models.policy import PowerPolicy

    width = min(len(p) for p in prompts)
    ids = torch.tensor([p[-width:] for p in prompts], device=lm.device)
    with torch.no_grad():
        logits = lm.model(ids).logits[:, -1, :].float().contiguous()
    policy = PowerPolicy(alpha)
    stats = next_token_stats(logits, policy)
    tiny = torch.finfo(torch.float32).tiny
    q = stats.logq.double().exp()
    out: dict[str, Any] = {
        "rows": int(logits.shape[0]),
        "vocab": int(logits.shape[1]),
        "subnormal_share_q": round(float(((q > 0) & (q < tiny)).double().mean()), 4),
    }
    generator = torch.Generator().manual_seed(0)
    for mode in MODES:
        with plain_exp() if mode == "plain" else contextlib.nullcontext():
            out[mode] = {
                "next_token_stats_ms": _median_ms(lambda: next_token_stats(logits, policy), repeats),
                "sample_tokens_ms": _median_ms(lambda: sample_tokens(stats.logq, generator), repeats),
            }
    return out


def end_to_end(lm: Any, task: Any, units: int, alpha: float, max_new_tokens: int) -> dict[str, Any]:
    """CPU seconds of the batched evaluation of the same units per method and mode, and whether records agree."""
    from egps_ppl.evals.methods import load_method
    from egps_ppl.evals.runner import evaluate_batched

    todo = [(i, p, 0) for i, p in enumerate(task.problems(units))]
    out: dict[str, Any] = {}
    for name, settings in (("low-temp", {}), ("mh", {"steps": 2})):
        method = load_method(name, alpha=alpha, **settings)
        entry: dict[str, Any] = {}
        records = {}
        for mode in MODES:
            with plain_exp() if mode == "plain" else contextlib.nullcontext():
                started = time.process_time()
                records[mode] = list(
                    evaluate_batched(task, method, lm, todo, batch=units, max_new_tokens=max_new_tokens)
                )
                entry[f"{mode}_cpu_s"] = round(time.process_time() - started, 2)
        entry["speedup"] = round(entry["plain_cpu_s"] / max(entry["flushed_cpu_s"], 1e-9), 2)
        keys = ("problem_id", "completion", "correct", "decode_tokens", "scored_tokens")
        same = [all(a[k] == b[k] for k in keys) for a, b in zip(records["flushed"], records["plain"], strict=True)]
        entry["identical_records"] = f"{sum(same)}/{len(same)}"
        entry["decode_tokens"] = sum(r["decode_tokens"] for r in records["flushed"])
        out[name] = entry
    return out


def plot(result: dict[str, Any]) -> Any:
    fig, axes = new_figure(1, 2, size=(4.6, 3.4))
    step = result["per_step"]
    labels = ["next_token_stats", "sample_tokens"]
    grouped_bars(axes[0, 0], labels, {mode: [step[mode][f"{k}_ms"] for k in labels] for mode in MODES})
    axes[0, 0].set_ylabel(f"ms per call ({step['rows']} rows x {step['vocab']} tokens)")
    axes[0, 0].set_title("one decode step's statistics")
    e2e = result["end_to_end"]
    grouped_bars(axes[0, 1], list(e2e), {mode: [e2e[m][f"{mode}_cpu_s"] for m in e2e] for mode in MODES})
    axes[0, 1].set_ylabel("CPU seconds, batched evaluation")
    axes[0, 1].set_title(f"{result['config']['units']} arithmetic units")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--units", type=int, default=16, help="arithmetic problems (seed 0), run as one batch")
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--repeats", type=int, default=30, help="calls per per-step timing (median reported)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--docs", default=None, help="copy the plot into this folder")
    parser.add_argument("--quick", action="store_true", help="tiny-gpt2, 4 units, 8 tokens")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.units, args.max_new_tokens, args.repeats = "tiny-gpt2", 4, 8, 3
    threads = set_threads(args.threads)

    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.registry import load_model

    lm = load_model(args.model)
    task = load_task("arithmetic")
    prompts = [task.build_prompt(p, lm) for p in task.problems(args.units)]
    result: dict[str, Any] = {
        "benchmark": NAME,
        "config": {k: v for k, v in vars(args).items() if k not in ("out", "docs")} | {"threads": threads},
        "environment": environment(),
        "per_step": per_step(lm, prompts, args.alpha, args.repeats),
        "end_to_end": end_to_end(lm, task, args.units, args.alpha, args.max_new_tokens),
    }
    json_path, png_path = write_results(NAME, result, args.out, plot(result))
    copy_plots(args.docs, png_path)
    step = result["per_step"]
    print(f"per step: stats {step['plain']['next_token_stats_ms']} -> {step['flushed']['next_token_stats_ms']} ms, "
          f"draw {step['plain']['sample_tokens_ms']} -> {step['flushed']['sample_tokens_ms']} ms")  # fmt: skip
    for name, entry in result["end_to_end"].items():
        print(f"{name}: {entry['plain_cpu_s']} -> {entry['flushed_cpu_s']} CPU s ({entry['speedup']}x), "
              f"identical records {entry['identical_records']}")  # fmt: skip
    print(f"wrote {json_path}")
    return result


if __name__ == "__main__":
    run_cli(main, NAME)
