"""Prefix (KV-cache) reuse per MH step, and C chains batched vs C separate runs, measured side by side.

Run from the repository root::

    python -m benchmarks.prefix_reuse                      # tiny-gpt2 and SmolLM2-135M (~10 min on 2 cores)
    python -m benchmarks.prefix_reuse --quick              # tiny-gpt2 only, fewer cuts, one repeat (< 1 min)
    python -m benchmarks.prefix_reuse --models smollm2-135m --threads 2 --out benchmarks/results

Writes ``<out>/prefix_reuse.json`` and ``<out>/prefix_reuse.png``.

**Part 1: one MH proposal from cut i, with reuse vs with recomputation.** One completion of exactly
``COMPLETION_TOKENS`` tokens is built per model by ancestral sampling from ``p`` restricted to its top-k tokens
with EOS masked (:class:`NoEOSPolicy`), then rescored under the proposal policy ``q ∝ p^α`` (α = 4, EOS masked)
and its KV pool compacted. From that state, ``lm.extend(state, i, stop=256)`` (a suffix-resampling proposal from
cut ``i``) is timed with the default backend (KV slot pool: only ``x_{i-1}`` is re-fed, then ``256 - i`` decode
steps) and with ``reuse_cache=False`` (prefill of prompt + ``x_{<i}`` with a fresh cache, then the same decode
steps: what the reference implementation of Karan & Du does). Both variants share the same weights and the
same random seeds, and EOS is masked in the proposal too, so every proposal resamples exactly ``256 - i``
tokens and the cost counters are deterministic. The two variants alternate within each repeat (order swapped
every repeat) and the median is reported (3 repeats; 2 where the suffix is over half the completion, whose
single measurements last longest and vary least). The recomputation's prefill is also timed on its own
(``extend`` to ``stop = i + 1``: prefill plus one sampled token) to explain the ratio: the gain of reuse is
bounded by ``(prefill + decode) / decode``.

**Part 2: C chains in one batch vs C separate single-chain runs.** ``MetropolisHastings`` (uniform cut, suffix
resampling at temperature 1/α, EOS allowed) on ``PowerDistribution(lm, prompt, α, max_new_tokens)``. The C
initial states are one batch of proposal samples; the batched run advances all C chains together (generator
seed ``s``), the separate runs advance row ``c`` alone (seed ``s + c``). Cuts are random, so the two variants do
not do identical work: throughput (sampled tokens per second, summed over chains) is the fair comparison, and
the lock-step efficiency (sampled tokens / (C x decode forward calls)) shows what batching wastes on rows that
finished early.

**Part 3: the pool over a long MH run.** ``CHAINS`` chains, ``--long-steps`` MH steps whose cuts all fall in the
first quarter of the completion (the case that leaves the most stale slots), with the default backend and with
compaction off (``compact_below = 0``): pool slots per step (all and live), pool bytes, and the peak resident
memory (``VmHWM``, reset by writing ``5`` to ``/proc/self/clear_refs`` before each variant; also reset and read
around parts 1 and 2, reported under ``memory``).

Threads: ``--threads`` (default 1) is set with ``torch.set_num_threads`` and recorded with the environment. On a
2-core machine shared with other work, two intra-op threads made single measurements up to ten times slower
at random (threads waiting for a descheduled partner), which no median of three repairs; one thread gives
stable ratios.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from benchmarks.common import Timer, environment, median, new_figure, run_cli, set_threads, write_results
from egps_ppl.evals.tasks import encode_prompt
from egps_ppl.kernels import MetropolisHastings
from egps_ppl.models.hf import HFModel
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.models.registry import load_model
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

NAME = "prefix_reuse"
COMPLETION_TOKENS = 256
CUTS = (0, 64, 128, 160, 192, 224, 240)
QUICK_CUTS = (0, 128, 192, 240)
DEFAULT_MODELS = ("tiny-gpt2", "smollm2-135m")
ALPHA = 4.0
SAMPLE_TOP_K = 20
TARGET_SPEEDUP = 3.0
CHAINS = 8
CHAIN_COUNTS = (1, 2, 4, 8)
MH_MAX_NEW_TOKENS = 64

PROMPTS = {
    "smollm2-135m": (
        "Write a long, detailed tutorial on how hash tables work: hashing, buckets, collisions, chaining, open "
        "addressing, resizing and load factor. Explain each idea step by step and give Python code examples."
    ),
    "tiny-gpt2": "Once upon a time, in a land far away, there lived a",
}
"""Chat prompts (SmolLM2 through its chat template; tiny-gpt2 has none and gets the plain bytes)."""


@dataclass(frozen=True)
class NoEOSPolicy(PowerPolicy):
    """:class:`PowerPolicy` with the token ``eos_token_id`` removed from the kept set (``-1``: nothing removed).

    Used only to make the benchmark's sequences exactly as long as asked; the compute per token is unchanged.
    """

    eos_token_id: int = -1

    def apply(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        scaled = self.alpha * logp
        if self.truncated:
            scaled = self._truncate(scaled)
        if 0 <= self.eos_token_id < scaled.shape[-1]:
            scaled = scaled.clone()
            scaled[..., self.eos_token_id] = -math.inf
        logz = torch.logsumexp(scaled, dim=-1)
        return scaled - logz.unsqueeze(-1), logz


# ---------------------------------------------------------------- setup
def load_pair(name: str) -> tuple[HFModel, HFModel, float]:
    """The model with KV reuse (default backend), the same weights with ``reuse_cache=False``, and load seconds."""
    with Timer() as t:
        lm = load_model(name, device="cpu", dtype="float32")
    if not isinstance(lm, HFModel):
        raise TypeError(f"{name}: the prefix-reuse benchmark needs a transformers model, got {type(lm).__name__}")
    recompute = HFModel(lm.model, lm.tokenizer, name=lm.name, reuse_cache=False)
    return lm, recompute, t.seconds


def prompt_ids(lm: HFModel, name: str) -> list[int]:
    """The benchmark prompt of ``name`` (chat template where the tokenizer has one)."""
    text = PROMPTS.get(name, PROMPTS["smollm2-135m"])
    return encode_prompt(lm, text)


def build_completion(lm: HFModel, prompt: Sequence[int], length: int, seed: int) -> tuple[Sequences, float]:
    """A state holding one completion of exactly ``length`` tokens, with statistics and a compact KV pool.

    Sampled from ``p`` restricted to its top-``SAMPLE_TOP_K`` tokens with EOS masked, then rescored under the
    proposal policy (α = ``ALPHA``, EOS masked) so the state is what an MH chain would hold.
    """
    eos = -1 if lm.eos_token_id is None else int(lm.eos_token_id)
    sample_policy = NoEOSPolicy(alpha=1.0, top_k=SAMPLE_TOP_K, eos_token_id=eos)
    with Timer() as t:
        seqs = lm.start(prompt, 1, length, sample_policy)
        seqs, _ = lm.extend(seqs, torch.zeros(1, dtype=torch.long), generator=torch.Generator().manual_seed(seed))
        seqs, _ = lm.with_policy(seqs, NoEOSPolicy(alpha=ALPHA, eos_token_id=eos))
        seqs = lm.compact(seqs)
    if int(seqs.length[0]) != length:
        raise RuntimeError(f"built a completion of {int(seqs.length[0])} tokens, expected {length}")
    return seqs, t.seconds


# ---------------------------------------------------------------- part 1: one proposal from cut i
def time_extend(lm: HFModel, state: Sequences, cut: int, stop: int, seed: int) -> dict[str, Any]:
    """Wall-clock and cost counters of ``lm.extend(state, cut, stop)`` for a one-row state."""
    generator = torch.Generator().manual_seed(seed)
    start = torch.tensor([cut], dtype=torch.long)
    with Timer() as t:
        _, cost = lm.extend(state, start, stop, generator)
    return {
        "seconds": t.seconds,
        "decode_tokens": int(cost.decode_tokens[0]),
        "scored_tokens": int(cost.scored_tokens[0]),
        "forward_calls": int(cost.forward_calls),
    }


def _variant_summary(runs: list[dict[str, Any]], resampled: int) -> dict[str, Any]:
    seconds = [r["seconds"] for r in runs]
    counters = {k: runs[0][k] for k in ("decode_tokens", "scored_tokens", "forward_calls")}
    if any({k: r[k] for k in counters} != counters for r in runs):
        raise RuntimeError("cost counters differ between repeats of the same measurement")
    mid = median(seconds)
    return {
        "seconds": seconds,
        "seconds_median": mid,
        "seconds_per_resampled_token": mid / resampled if resampled else None,
        **counters,
        # Tokens run through the model: the re-fed/prefilled ones plus every sampled token but the last.
        "fed_tokens": counters["scored_tokens"] + max(0, counters["decode_tokens"] - 1),
    }


def linear_fit(x: Sequence[float], y: Sequence[float]) -> dict[str, float]:
    """Least-squares ``y = intercept + slope * x`` with its R² and the intercept's share of the largest ``y``."""
    n = len(x)
    mx, my = sum(x) / n, sum(y) / n
    sxx = sum((a - mx) ** 2 for a in x)
    sxy = sum((a - mx) * (b - my) for a, b in zip(x, y, strict=True))
    slope = sxy / sxx if sxx else 0.0
    intercept = my - slope * mx
    ss_res = sum((b - intercept - slope * a) ** 2 for a, b in zip(x, y, strict=True))
    ss_tot = sum((b - my) ** 2 for b in y)
    return {
        "slope_seconds_per_token": slope,
        "intercept_seconds": intercept,
        "r2": 1.0 - ss_res / ss_tot if ss_tot else 1.0,
        "intercept_share_of_max": intercept / max(y) if max(y) else 0.0,
    }


def prefix_reuse_sweep(
    reuse: HFModel,
    recompute: HFModel,
    state: Sequences,
    cuts: Sequence[int],
    repeats: int,
    seed: int,
) -> dict[str, Any]:
    """Part 1: per cut, the median time and the counters of one proposal with reuse vs with recomputation."""
    n = int(state.length[0])
    prompt_len = int(state.prompt.numel())
    plain = state.with_(cache=None)
    # Warm-up (allocator, first-call overheads), untimed.
    time_extend(reuse, state, n - 8, n, seed)
    time_extend(recompute, plain, n - 8, n, seed)
    rows = []
    for cut in cuts:
        runs: dict[str, list[dict[str, Any]]] = {"reuse": [], "recompute": [], "prefill": []}
        # A proposal resampling more than half the completion runs for many seconds on a CPU, where one repeat
        # fewer changes little: it keeps the full run near ten minutes.
        count = repeats - 1 if repeats >= 3 and n - cut > n // 2 else repeats
        for r in range(count):
            step_seed = seed + 1000 * cut + r
            order = ["reuse", "recompute"] if r % 2 == 0 else ["recompute", "reuse"]
            for variant in order:
                lm, st = (reuse, state) if variant == "reuse" else (recompute, plain)
                runs[variant].append(time_extend(lm, st, cut, n, step_seed))
            # The recomputation's prefill alone: prefix fed with a fresh cache, one token sampled.
            runs["prefill"].append(time_extend(recompute, plain, cut, cut + 1, step_seed))
        resampled = n - cut
        row: dict[str, Any] = {
            "cut": cut,
            "resampled_tokens": resampled,
            "prefix_tokens": prompt_len + cut,
            "repeats": count,
        }
        row["reuse"] = _variant_summary(runs["reuse"], resampled)
        row["recompute"] = _variant_summary(runs["recompute"], resampled)
        row["prefill_seconds_median"] = median([p["seconds"] for p in runs["prefill"]])
        row["speedup"] = row["recompute"]["seconds_median"] / row["reuse"]["seconds_median"]
        # The gain if time were proportional to tokens fed (compute-bound, e.g. a large model on a GPU).
        row["fed_tokens_ratio"] = row["recompute"]["fed_tokens"] / max(1, row["reuse"]["fed_tokens"])
        # What the speed-up would be if recomputation were reuse plus the prefill: (prefill + decode) / decode.
        row["prefill_bound"] = (row["prefill_seconds_median"] + row["reuse"]["seconds_median"]) / row["reuse"][
            "seconds_median"
        ]
        rows.append(row)
        print(
            f"  cut {cut:3d}: reuse {row['reuse']['seconds_median']:.3f}s  recompute "
            f"{row['recompute']['seconds_median']:.3f}s  x{row['speedup']:.2f}  (prefill "
            f"{row['prefill_seconds_median']:.3f}s; scored {row['reuse']['scored_tokens']} vs "
            f"{row['recompute']['scored_tokens']})",
            flush=True,
        )
    x = [float(r["resampled_tokens"]) for r in rows]
    fits = {v: linear_fit(x, [r[v]["seconds_median"] for r in rows]) for v in ("reuse", "recompute")}
    second_half = [r for r in rows if r["cut"] >= n // 2]
    speedups = [r["speedup"] for r in second_half]
    return {
        "completion_tokens": n,
        "prompt_tokens": prompt_len,
        "repeats": repeats,
        "rows": rows,
        "fit": fits,
        "target": {
            "speedup_at_least": TARGET_SPEEDUP,
            "cuts": [r["cut"] for r in second_half],
            "min_speedup": min(speedups) if speedups else None,
            "met": bool(speedups) and min(speedups) >= TARGET_SPEEDUP,
        },
    }


# ---------------------------------------------------------------- part 2: C chains batched vs separate
def run_steps(kernel: MetropolisHastings, state: Sequences, steps: int, seed: int) -> dict[str, Any]:
    """Time ``steps`` MH steps from ``state``; totals of the counters over steps and chains."""
    generator = torch.Generator().manual_seed(seed)
    decode = scored = calls = accepted = 0
    with Timer() as t:
        for _ in range(steps):
            state, info = kernel.step(state, generator)
            decode += int(info.decode_tokens.sum())
            scored += int(info.scored_tokens.sum())
            calls += int(info.forward_calls)
            accepted += int(info.accepted.sum())
    return {
        "seconds": t.seconds,
        "decode_tokens": decode,
        "scored_tokens": scored,
        "forward_calls": calls,
        "accepted": accepted,
    }


def _throughput(total: dict[str, Any], steps: int) -> dict[str, Any]:
    total = dict(total)
    total["seconds_per_step"] = total["seconds"] / steps
    total["tokens_per_second"] = total["decode_tokens"] / total["seconds"] if total["seconds"] else None
    return total


def batching(
    lm: HFModel,
    prompt: Sequence[int],
    chains: int,
    chain_counts: Sequence[int],
    steps: int,
    max_new_tokens: int,
    seed: int,
) -> dict[str, Any]:
    """Part 2: ``chains`` chains in one batch vs one by one, plus batched scaling over ``chain_counts``."""
    target = PowerDistribution(lm, list(prompt), alpha=ALPHA, max_new_tokens=max_new_tokens)
    kernel = MetropolisHastings(target)
    with Timer() as t:
        init, _ = target.sample_proposal(chains, torch.Generator().manual_seed(seed))
        init, _ = kernel.prepare(init)
    init_seconds = t.seconds

    def rows(count: int) -> Sequences:
        return init.take(torch.arange(count))

    run_steps(kernel, init.take(torch.tensor([0])), 1, seed)  # warm-up, untimed
    batched = run_steps(kernel, init, steps, seed + 1)
    batched["lockstep_efficiency"] = batched["decode_tokens"] / max(1, chains * batched["forward_calls"])
    per_chain = [run_steps(kernel, init.take(torch.tensor([c])), steps, seed + 1 + c) for c in range(chains)]
    separate = {k: sum(r[k] for r in per_chain) for k in per_chain[0]}
    separate["per_chain_seconds"] = [r["seconds"] for r in per_chain]
    batched = _throughput(batched, steps)
    separate = _throughput(separate, steps)
    scaling = []
    for count in chain_counts:
        res = batched if count == chains else _throughput(run_steps(kernel, rows(count), steps, seed + 1), steps)
        keys = ("seconds_per_step", "decode_tokens", "tokens_per_second")
        scaling.append({"chains": count, **{k: res[k] for k in keys}})
    out = {
        "chains": chains,
        "steps": steps,
        "max_new_tokens": max_new_tokens,
        "alpha": ALPHA,
        "initial_lengths": init.length.tolist(),
        "initial_sampling_seconds": init_seconds,
        "batched": batched,
        "separate": separate,
        "speedup_throughput": batched["tokens_per_second"] / separate["tokens_per_second"],
        "speedup_wall": separate["seconds"] / batched["seconds"],
        "scaling": scaling,
        "target": {"speedup_at_least": TARGET_SPEEDUP},
    }
    out["target"]["met"] = out["speedup_throughput"] >= TARGET_SPEEDUP
    # Rows that finished early still ride along in the lock-step decode calls: without that waste the batch
    # would have run the same row-steps at the same speed, so this is the raw gain of batching one decode step.
    out["speedup_per_row_step"] = out["speedup_throughput"] / batched["lockstep_efficiency"]
    print(
        f"  {chains} chains x {steps} steps: batched {batched['seconds']:.2f}s "
        f"({batched['tokens_per_second']:.1f} tok/s), separate {separate['seconds']:.2f}s "
        f"({separate['tokens_per_second']:.1f} tok/s): throughput x{out['speedup_throughput']:.2f}, "
        f"wall x{out['speedup_wall']:.2f}",
        flush=True,
    )
    return out


# ---------------------------------------------------------------- memory
def reset_peak_rss() -> bool:
    """Reset the process's peak resident memory (``VmHWM``) to the current one (Linux: ``5`` to ``clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def peak_rss_bytes() -> int | None:
    """``VmHWM`` of ``/proc/self/status`` in bytes (peak resident memory since the last reset), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def pool_bytes(state: Sequences) -> int:
    """Bytes of the keys/values a state's pool holds (its slots, valid or not)."""
    pool = state.cache
    if pool is None or not getattr(pool, "keys", None):
        return 0
    return sum(t.numel() * t.element_size() for t in (*pool.keys, *pool.values))


def long_run(lm: HFModel, prompt: Sequence[int], chains: int, steps: int, seed: int) -> dict[str, Any]:
    """Part 3: pool slots and peak memory over ``steps`` MH steps whose cuts all fall in the first quarter of the
    completion (the case that leaves the most stale slots), with the default pool and with compaction off
    (``compact_below = 0``: stale slots are kept until a row is copied)."""
    out: dict[str, Any] = {"chains": chains, "steps": steps, "max_new_tokens": MH_MAX_NEW_TOKENS, "variants": {}}
    for variant, compact_below in (("default", lm.compact_below), ("no_compaction", 0.0)):
        model = HFModel(lm.model, lm.tokenizer, name=lm.name, compact_below=compact_below)
        target = PowerDistribution(model, list(prompt), alpha=ALPHA, max_new_tokens=MH_MAX_NEW_TOKENS)
        kernel = MetropolisHastings(target, selector=EarlySite())
        generator = torch.Generator().manual_seed(seed)
        state, _ = target.sample_proposal(chains, generator)
        state, _ = kernel.prepare(state)
        reset = reset_peak_rss()
        base = peak_rss_bytes()
        slots, live, nbytes, accepted = [], [], [], 0
        with Timer() as t:
            for _ in range(steps):
                state, info = kernel.step(state, generator)
                accepted += int(info.accepted.sum())
                slots.append(state.cache.num_slots)
                live.append(int(state.cache.valid().sum(1).max()))
                nbytes.append(pool_bytes(state))
        peak = peak_rss_bytes()
        out["variants"][variant] = {
            "compact_below": compact_below,
            "seconds": t.seconds,
            "accepted": accepted,
            "pool_slots": slots,
            "live_slots": live,
            "pool_bytes": nbytes,
            "max_pool_slots": max(slots),
            "max_live_slots": max(live),
            "peak_rss_bytes": peak if reset else None,
            "peak_rss_growth_bytes": peak - base if reset and peak is not None and base is not None else None,
        }
        print(
            f"  {variant}: {steps} steps, pool slots max {max(slots)} (live max {max(live)}), last {slots[-1]}; "
            f"{t.seconds:.2f}s",
            flush=True,
        )
    return out


class EarlySite:
    """Cut uniformly over the first quarter of each row's completion (at least position 0)."""

    name = "early"

    def log_probs(self, seqs: Sequences) -> torch.Tensor:
        quarter = (seqs.length // 4).clamp(min=1).unsqueeze(1)
        allowed = seqs.positions() < torch.minimum(quarter, seqs.length.unsqueeze(1))
        n = allowed.sum(1, keepdim=True).clamp(min=1).double()
        return torch.where(allowed, -n.log(), torch.full_like(n, -torch.inf))


# ---------------------------------------------------------------- plot
def plot(results: dict[str, Any]) -> Any:
    """One row per model: time vs resampled tokens (with fits), speed-up vs cut, throughput vs chains."""
    models = results["models"]
    fig, axes = new_figure(len(models), 3)
    for row_axes, (name, res) in zip(axes, models.items(), strict=True):
        part1, part2 = res["prefix_reuse"], res["batching"]
        rows = part1["rows"]
        x = [r["resampled_tokens"] for r in rows]
        ax = row_axes[0]
        grid = [0, max(x)]
        for variant, colour in (("reuse", "tab:blue"), ("recompute", "tab:red")):
            ax.plot(x, [r[variant]["seconds_median"] for r in rows], "o", color=colour, label=variant)
            fit = part1["fit"][variant]
            fitted = [fit["intercept_seconds"] + fit["slope_seconds_per_token"] * g for g in grid]
            ax.plot(grid, fitted, "-", color=colour, alpha=0.5, lw=1)
        ax.set_xlabel("resampled tokens (256 - cut)")
        ax.set_ylabel("seconds per MH proposal")
        ax.set_title(f"{name}: time vs suffix length")
        ax.legend(fontsize=8)
        ax = row_axes[1]
        cuts = [r["cut"] for r in rows]
        ax.plot(cuts, [r["speedup"] for r in rows], "o-", label="measured")
        ax.plot(cuts, [r["prefill_bound"] for r in rows], "s--", alpha=0.6, label="(prefill + decode) / decode")
        ax.axhline(TARGET_SPEEDUP, color="grey", ls=":", label=f"target {TARGET_SPEEDUP:g}x")
        ax.set_xlabel("cut position i")
        ax.set_ylabel("recompute time / reuse time")
        ax.set_title(f"{name}: speed-up of prefix reuse")
        ax.legend(fontsize=8)
        ax = row_axes[2]
        counts = [s["chains"] for s in part2["scaling"]]
        ax.plot(counts, [s["tokens_per_second"] for s in part2["scaling"]], "o-", label="batched")
        ax.axhline(part2["separate"]["tokens_per_second"], color="tab:red", ls="--", label="separate runs")
        ax.set_xscale("log", base=2)
        ax.set_xticks(counts, [str(c) for c in counts])
        ax.set_xlabel("chains C")
        ax.set_ylabel("sampled tokens / s")
        ax.set_title(f"{name}: MH throughput")
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------- driver
def run(
    models: Sequence[str],
    cuts: Sequence[int],
    repeats: int,
    steps: int,
    chain_counts: Sequence[int],
    seed: int,
    threads: int | None,
    quick: bool,
    long_steps: int = 40,
) -> dict[str, Any]:
    """All three parts for every model; returns the payload written to JSON."""
    before = torch.get_num_threads()
    used = set_threads(threads)
    try:
        results: dict[str, Any] = {
            "benchmark": NAME,
            "environment": environment(),
            "config": {
                "quick": quick,
                "models": list(models),
                "threads": used,
                "dtype": "float32",
                "device": "cpu",
                "completion_tokens": COMPLETION_TOKENS,
                "cuts": list(cuts),
                "repeats": repeats,
                "alpha": ALPHA,
                "sample_top_k": SAMPLE_TOP_K,
                "chains": CHAINS,
                "chain_counts": list(chain_counts),
                "mh_steps": steps,
                "mh_max_new_tokens": MH_MAX_NEW_TOKENS,
                "long_run_steps": long_steps,
                "seed": seed,
            },
            "models": {},
        }
        with Timer() as total:
            for name in models:
                print(f"[{name}] loading", flush=True)
                reuse, recompute, load_seconds = load_pair(name)
                prompt = prompt_ids(reuse, name)
                state, build_seconds = build_completion(reuse, prompt, COMPLETION_TOKENS, seed)
                print(f"[{name}] prompt {len(prompt)} tokens; part 1 (prefix reuse)", flush=True)
                memory: dict[str, Any] = {"reset_supported": reset_peak_rss()}
                part1 = prefix_reuse_sweep(reuse, recompute, state, cuts, repeats, seed)
                memory["part1_peak_rss_bytes"] = peak_rss_bytes()
                print(f"[{name}] part 2 (batched chains)", flush=True)
                reset_peak_rss()
                part2 = batching(reuse, prompt, CHAINS, chain_counts, steps, MH_MAX_NEW_TOKENS, seed)
                memory["part2_peak_rss_bytes"] = peak_rss_bytes()
                print(f"[{name}] part 3 (pool over a long MH run with early cuts)", flush=True)
                # SmolLM2's MH steps take seconds each on a CPU: a quarter of the steps keeps the run near 15 min.
                part3 = long_run(reuse, prompt, CHAINS, long_steps if name == "tiny-gpt2" else long_steps // 4, seed)
                results["models"][name] = {
                    "load_seconds": load_seconds,
                    "prompt_text": PROMPTS.get(name, PROMPTS["smollm2-135m"]),
                    "completion_build_seconds": build_seconds,
                    "completion_preview": reuse.decode(state.row_tokens(0))[:400],
                    "prefix_reuse": part1,
                    "batching": part2,
                    "long_run": part3,
                    "memory": memory,
                }
        results["total_seconds"] = total.seconds
        return results
    finally:
        torch.set_num_threads(before)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.prefix_reuse", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny-gpt2 only, fewer cuts, one repeat (< 1 min)")
    parser.add_argument("--models", help=f"comma-separated registry names (default {','.join(DEFAULT_MODELS)})")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch intra-op threads (default 1: on a shared 2-core machine, 2 threads made single runs 10x slower)",
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="repeats per cut, median reported (default 3, one fewer for suffixes over half the completion; quick: 1)",
    )
    parser.add_argument("--steps", type=int, default=None, help="MH steps per chain in part 2 (default 2; quick: 1)")
    parser.add_argument(
        "--long-steps",
        type=int,
        default=None,
        help="MH steps of part 3 (tiny-gpt2; a quarter for others; default 40, quick 10)",
    )
    parser.add_argument("--cuts", default=None, help="comma-separated cut positions (default 0,64,...,240)")
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the payload."""
    args = parse_args(argv)
    models = args.models.split(",") if args.models else (["tiny-gpt2"] if args.quick else list(DEFAULT_MODELS))
    cuts = [int(c) for c in args.cuts.split(",")] if args.cuts else list(QUICK_CUTS if args.quick else CUTS)
    if any(not 0 <= c < COMPLETION_TOKENS for c in cuts):
        raise SystemExit(f"cut positions must lie in [0, {COMPLETION_TOKENS})")
    repeats = args.repeats or (1 if args.quick else 3)
    steps = args.steps or (1 if args.quick else 2)
    long_steps = args.long_steps or (10 if args.quick else 40)
    results = run(
        [m.strip() for m in models], cuts, repeats, steps, CHAIN_COUNTS, args.seed, args.threads, args.quick, long_steps
    )
    figure = plot(results)
    json_path, png_path = write_results(NAME, results, args.out, figure=figure)
    import matplotlib.pyplot as plt

    plt.close(figure)
    print(f"wrote {json_path} and {png_path} in {results['total_seconds']:.0f}s", flush=True)
    return results


if __name__ == "__main__":
    run_cli(main, NAME)
