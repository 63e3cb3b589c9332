"""EGPS vs Metropolis–Hastings: decode tokens (and wall-clock) to reach the power distribution, side by side.

Run from the repository root::

    python -m benchmarks.egps_speedup                      # full run (~30 min on 2 busy cores)
    python -m benchmarks.egps_speedup --quick              # tiny test bed, small budget, no SmolLM2 (seconds)
    python -m benchmarks.egps_speedup --out benchmarks/results --docs docs/benchmarks

Writes ``<out>/egps_speedup.json`` and the plots ``<out>/egps_speedup_*.png`` (``--docs DIR`` copies the PNGs
there too), and prints the result tables as Markdown.

**Part 1: sparse-decision test beds, where π is exact.** :func:`~egps_ppl.models.testbeds.sparse_decision`
builds a Markov chain of deterministic runs joined by ``D`` binary decisions whose branches merge again. With
α = 4 the power distribution π ∝ p^α takes the UNLIKELY branch at each decision with probability ~0.964, while
low-temperature sampling (q ∝ p(v|h)^α, the MH proposal) takes it with ~0.033. ``C`` chains start from
``target.sample_proposal(C, generator)`` (low-temperature samples: the bad start). After every kernel step the
empirical joint distribution of the ``D`` branch choices over the ``C`` chains (chain took the unlikely branch at
decision ``d`` ⇔ ``unlikely_tokens[d]`` is among its tokens) is compared with the exact joint (the product of
``ExactPower(model, α, T).expected_visits(unlikely_tokens[d])``: the decisions are independent under π) by total
variation (TV). Per kernel the benchmark records, cumulatively from the start, the mean decode tokens per chain
(``info.decode_tokens``), the mean scored (teacher-forced) tokens per chain and the wall-clock of the kernel calls
for the whole batch of ``C`` chains (TV bookkeeping excluded), and the whole TV curve. A kernel stops when its
TV first reaches ``TV_THRESHOLD`` (then a few confirmation steps check that it stays there), when it has spent
the decode-token budget per chain, or at the step cap. A kernel that never reaches the threshold gets the
budget as a lower bound and, separately and clearly labelled, an extrapolation: a least-squares line of
log TV against decode tokens over the last half of its budget, solved for TV = ``TV_THRESHOLD``.

**Part 2: SmolLM2-135M-Instruct on arithmetic questions.** ``mh`` and ``egps`` run with
:class:`egps_ppl.infer.MCMC` on the demo's few-shot chat prompt (α = 4, 4 chains), both from the same
low-temperature initial completions. ``egps`` runs a fixed number of steps; ``mh`` then runs the number of steps
expected to spend the same decode tokens (its mean suffix length is (n + 1) / 2 for a uniform cut on a length-n
completion); the actual totals are reported. Acceptance, tokens per step and ArviZ's R-hat / bulk ESS of
``log_p`` come from :func:`egps_ppl.diagnostics.summarize`. The entropy profile of one completion is plotted with
the cut positions each kernel chose.

Not measured: accuracy on a benchmark, GPU timings, and (part 1) any model other than the exact Markov test
beds. Wall-clock numbers are for one process on a shared 2-core machine with ``torch.set_num_threads(1)``.
"""

from __future__ import annotations

import argparse
import itertools
import math
import re
import shutil
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, environment, new_figure, run_cli, set_threads, write_results
from egps_ppl.kernels.presets import PRESETS, build_kernel
from egps_ppl.models.exact import ExactPower
from egps_ppl.models.testbeds import SparseDecisionModel, branch_probabilities, sparse_decision
from egps_ppl.target import PowerDistribution

NAME = "egps_speedup"
ALPHA = 4.0
TV_THRESHOLD = 0.05
KERNELS = ("mh", "entropy-mh", "entropy-cut-mh", "mtm", "egps-local", "egps")
BASELINE = "mh"
CANDIDATE = "egps"
PAPER_SPEEDUP = 12.6
"""EGPS's claimed wall-clock speed-up over MH (arXiv 2606.09926); the goal here is as many times fewer decode tokens."""
LENGTH_SCALING_GOAL = 1.5
"""Goal for EGPS: cost at 4× the run length / cost at 1× below this."""
MAX_CURVE_POINTS = 400
NOISE_FLOOR_REPS = 2000

SMOLLM2_QUESTIONS = (
    ("Sara has 7 marbles. Her friend gives her 6 more. How many marbles does Sara have now?", 13),
    ("A farmer has 15 cows and sells 4 of them. How many cows does the farmer have left?", 11),
    ("There are 9 birds on a fence. 5 more birds land on it. How many birds are on the fence now?", 14),
)
"""Arithmetic questions for part 2 and their answers (the first is the demo question of ``egps sample``)."""


# ---------------------------------------------------------------------------------------------- settings
@dataclass(frozen=True)
class Testbed:
    """One sparse-decision configuration and the kernels run on it."""

    num_decisions: int
    run_length: int
    kernels: tuple[str, ...] = KERNELS

    @property
    def label(self) -> str:
        return f"D={self.num_decisions}, L={self.run_length}"


@dataclass(frozen=True)
class Settings:
    """Everything that sizes a run (``FULL`` or ``QUICK``)."""

    testbeds: tuple[Testbed, ...]
    chains: int
    budget_decode_tokens: float
    max_steps: int
    seed: int
    candidate_seeds: tuple[int, ...]
    length_pair: tuple[int, int] | None
    smollm2: bool
    smollm2_questions: int = 2
    smollm2_chains: int = 4
    smollm2_max_new_tokens: int = 48
    smollm2_egps_steps: int = 16
    notes: tuple[str, ...] = field(default_factory=tuple)


FULL = Settings(
    testbeds=(
        Testbed(3, 8),
        Testbed(3, 32),
        Testbed(2, 8, (BASELINE, CANDIDATE)),
        Testbed(4, 8, (BASELINE, CANDIDATE)),
    ),
    chains=1000,
    budget_decode_tokens=100_000,
    max_steps=20_000,
    seed=0,
    candidate_seeds=(0, 1, 2, 3, 4),
    length_pair=(8, 32),
    smollm2=True,
)

QUICK = Settings(
    testbeds=(Testbed(2, 4),),
    chains=300,
    budget_decode_tokens=4_000,
    max_steps=2_000,
    seed=0,
    candidate_seeds=(0, 1),
    length_pair=None,
    smollm2=False,
)


# ---------------------------------------------------------------------------------------------- exact target
def branch_bits(tokens: torch.Tensor, unlikely: torch.Tensor) -> torch.Tensor:
    """``long[C]``: the joint branch choice of each chain as a D-bit number (bit ``D-1-d`` set ⇔ the chain took
    the unlikely branch at decision ``d``, i.e. ``unlikely[d]`` is among its tokens; padding is -1)."""
    took = (tokens.unsqueeze(-1) == unlikely).any(1).long()  # [C, D]
    weights = 2 ** torch.arange(unlikely.numel() - 1, -1, -1)
    return (took * weights).sum(1)


def exact_joint(marginals: Sequence[float]) -> np.ndarray:
    """``float64[2^D]``: the exact joint of independent decisions, indexed like :func:`branch_bits`."""
    return np.array(
        [
            math.prod(p if bit else 1.0 - p for p, bit in zip(marginals, bits, strict=True))
            for bits in itertools.product((0, 1), repeat=len(marginals))
        ]
    )


def total_variation(bits: torch.Tensor, joint: np.ndarray) -> float:
    """TV between the empirical distribution of ``bits`` and ``joint``."""
    counts = torch.bincount(bits, minlength=joint.size).double().numpy()
    return 0.5 * float(np.abs(counts / counts.sum() - joint).sum())


def noise_floor(joint: np.ndarray, chains: int, seed: int, reps: int = NOISE_FLOOR_REPS) -> dict[str, float]:
    """TV of ``chains`` exact i.i.d. draws from ``joint`` (what a perfectly mixed sampler scores): mean and p95."""
    rng = np.random.default_rng(seed)
    counts = rng.multinomial(chains, joint, size=reps)
    tv = 0.5 * np.abs(counts / chains - joint).sum(1)
    return {"mean": float(tv.mean()), "p95": float(np.quantile(tv, 0.95))}


def exact_summary(sd: SparseDecisionModel, alpha: float) -> dict[str, Any]:
    """Exact per-decision probabilities of the unlikely branch (DP and closed form) and the exact joint."""
    exact = ExactPower(sd.model, alpha, sd.max_new_tokens)
    marginals = [exact.expected_visits(int(u)) for u in sd.unlikely_tokens]
    closed = branch_probabilities(0.7, 4, 2, alpha)  # the sparse_decision defaults
    return {
        "unlikely_marginals": marginals,
        "closed_form": closed._asdict(),
        "joint": exact_joint(marginals).tolist(),
    }


# ---------------------------------------------------------------------------------------------- one kernel
def run_kernel(
    target: PowerDistribution,
    sd: SparseDecisionModel,
    joint: np.ndarray,
    kernel_name: str,
    settings: Settings,
    seed: int,
) -> dict[str, Any]:
    """Run ``kernel_name`` from the low-temperature start until TV <= ``TV_THRESHOLD`` (plus confirmation
    steps), the decode-token budget, or the step cap; return costs at the threshold and the TV curve."""
    kernel = build_kernel(kernel_name, target)
    generator = torch.Generator().manual_seed(seed)
    unlikely = torch.tensor(sd.unlikely_tokens, dtype=torch.long)
    state, init_cost = target.sample_proposal(settings.chains, generator)
    start_tv = total_variation(branch_bits(state.tokens, unlikely), joint)
    wall = time.perf_counter()
    state, prep = kernel.prepare(state)
    wall = time.perf_counter() - wall
    decode = prep.decode_tokens.double().mean().item()
    scored = prep.scored_tokens.double().mean().item()
    curve: dict[str, list[float]] = {
        "step": [0],
        "decode_tokens": [decode],
        "scored_tokens": [scored],
        "wall_seconds": [wall],
        "tv": [start_tv],
    }
    accept_sum = moved_sum = 0.0
    hit: int | None = None
    stop_after: int | None = None
    step = 0
    while decode < settings.budget_decode_tokens and step < settings.max_steps:
        previous = state.tokens
        tic = time.perf_counter()
        state, info = kernel.step(state, generator)
        wall += time.perf_counter() - tic
        step += 1
        moved_sum += (state.tokens != previous).any(1).double().mean().item()
        decode += info.decode_tokens.double().mean().item()
        scored += info.scored_tokens.double().mean().item()
        accept_sum += info.accept_prob.double().mean().item()
        tv = total_variation(branch_bits(state.tokens, unlikely), joint)
        for key, value in zip(curve, (step, decode, scored, wall, tv), strict=True):
            curve[key].append(value)
        if hit is None and tv <= TV_THRESHOLD:
            hit = step
            stop_after = step + max(10, step // 4)  # confirmation steps: does it stay below the threshold?
        if stop_after is not None and step >= stop_after:
            break
    result: dict[str, Any] = {
        "kernel": kernel_name,
        "description": PRESETS[kernel_name][1],
        "seed": seed,
        "converged": hit is not None,
        "initial_decode_tokens": init_cost.decode_tokens.double().mean().item(),
        "start_tv": start_tv,
        "spent": {
            "steps": step,
            "decode_tokens": decode,
            "scored_tokens": scored,
            "wall_seconds": wall,
        },
        "final_tv": curve["tv"][-1],
        "min_tv": min(curve["tv"]),
        "acceptance_rate_mean": accept_sum / max(step, 1),
        "moved_fraction": moved_sum / max(step, 1),
    }
    if hit is not None:
        after = curve["tv"][hit:]
        result.update(
            steps=hit,
            decode_tokens=curve["decode_tokens"][hit],
            scored_tokens=curve["scored_tokens"][hit],
            wall_seconds=curve["wall_seconds"][hit],
            tv_at_threshold=curve["tv"][hit],
            confirmation={
                "steps": len(after) - 1,
                "max_tv": max(after),
                "fraction_at_or_below_threshold": sum(v <= TV_THRESHOLD for v in after) / len(after),
            },
            lower_bound=None,
            extrapolation=None,
        )
    else:
        result.update(
            steps=None,
            decode_tokens=None,
            scored_tokens=None,
            wall_seconds=None,
            tv_at_threshold=None,
            confirmation=None,
            lower_bound={"decode_tokens": decode, "scored_tokens": scored, "wall_seconds": wall, "steps": step},
            extrapolation=extrapolate(curve),
        )
    result["curve"] = thin_curve(curve, hit)
    return result


def extrapolate(curve: dict[str, list[float]]) -> dict[str, Any] | None:
    """Decode tokens (and wall-clock, at the run's seconds per decode token) at which a least-squares line of
    log TV against decode tokens, fitted over the last half of the run's decode tokens, reaches
    ``TV_THRESHOLD``. ``None`` when the fit does not decrease. This is a model of the curve, not a measurement;
    the TV curve flattens towards its noise floor, so a straight-line fit of log TV tends to be optimistic
    (it predicts fewer tokens than the kernel would really need)."""
    tokens = np.asarray(curve["decode_tokens"])
    tv = np.asarray(curve["tv"])
    use = (tokens >= 0.5 * tokens[-1]) & (tv > 0)
    if use.sum() < 3:
        return None
    slope, intercept = np.polyfit(tokens[use], np.log(tv[use]), 1)
    if slope >= 0:
        return None
    predicted = (math.log(TV_THRESHOLD) - intercept) / slope
    seconds_per_token = curve["wall_seconds"][-1] / max(tokens[-1], 1e-12)
    return {
        "method": "least-squares fit of log(TV) vs decode tokens per chain over the last half of the budget",
        "fit_range_decode_tokens": [float(tokens[use][0]), float(tokens[use][-1])],
        "fit_points": int(use.sum()),
        "decode_tokens_per_e_fold": float(-1.0 / slope),
        "decode_tokens": float(max(predicted, tokens[-1])),
        "wall_seconds": float(max(predicted, tokens[-1]) * seconds_per_token),
    }


def thin_curve(curve: dict[str, list[float]], keep: int | None) -> dict[str, Any]:
    """At most ~``MAX_CURVE_POINTS`` points of the curve, geometrically spaced in steps (all of a short run),
    always keeping the first, the last and the threshold step."""
    n = len(curve["step"])
    if n <= MAX_CURVE_POINTS:
        index = list(range(n))
    else:
        grid = np.unique(np.round(np.geomspace(1, n - 1, MAX_CURVE_POINTS)).astype(int))
        index = sorted({0, n - 1, *grid.tolist(), *([keep] if keep is not None else [])})
    out: dict[str, Any] = {key: [_round(values[i]) for i in index] for key, values in curve.items()}
    out["thinned"] = n > MAX_CURVE_POINTS
    out["points_recorded"] = n
    return out


def _round(value: float) -> float:
    return float(f"{value:.6g}")


# ---------------------------------------------------------------------------------------------- part 1
def ratio_entry(numerator: dict[str, Any], denominator: dict[str, Any], key: str) -> dict[str, Any]:
    """``numerator[key] / denominator[key]`` as a measured value, a lower bound (numerator did not converge:
    its spent budget over the denominator's cost) and, if available, an extrapolated value."""
    if not denominator["converged"] or not denominator[key]:
        return {"value": None, "lower_bound": None, "extrapolated": None, "note": f"{CANDIDATE} did not converge"}
    base = denominator[key]
    if numerator["converged"]:
        return {"value": numerator[key] / base, "lower_bound": None, "extrapolated": None}
    extra = numerator["extrapolation"]
    extrapolated = extra[key] / base if extra and key in extra else None
    return {"value": None, "lower_bound": numerator["lower_bound"][key] / base, "extrapolated": extrapolated}


def run_testbed(bed: Testbed, settings: Settings, log: bool = True) -> dict[str, Any]:
    """All kernels of one test bed, side by side, plus extra seeds of the candidate kernel."""
    sd = sparse_decision(num_decisions=bed.num_decisions, run_length=bed.run_length)
    target = PowerDistribution(sd.model, [], ALPHA, sd.max_new_tokens)
    exact = exact_summary(sd, ALPHA)
    joint = np.asarray(exact["joint"])
    out: dict[str, Any] = {
        "label": bed.label,
        "num_decisions": bed.num_decisions,
        "run_length": bed.run_length,
        "max_new_tokens": sd.max_new_tokens,
        "vocab_size": sd.model.vocab_size,
        "chains": settings.chains,
        "alpha": ALPHA,
        "exact": exact,
        "noise_floor_tv": noise_floor(joint, settings.chains, settings.seed),
        "kernels": {},
    }
    for name in bed.kernels:
        res = run_kernel(target, sd, joint, name, settings, settings.seed)
        out["kernels"][name] = res
        if log:
            _log_kernel(bed, res)
    if CANDIDATE in bed.kernels:
        seeds = []
        for seed in settings.candidate_seeds:
            res = out["kernels"][CANDIDATE] if seed == settings.seed else None
            if res is None:
                res = run_kernel(target, sd, joint, CANDIDATE, settings, seed)
            seeds.append({k: res[k] for k in ("seed", "converged", "steps", "decode_tokens", "scored_tokens")})
            seeds[-1]["wall_seconds"] = res["wall_seconds"]
        out["candidate_seeds"] = seeds
        out["ratios_vs_candidate"] = {
            name: {key: ratio_entry(res, out["kernels"][CANDIDATE], key) for key in ("decode_tokens", "wall_seconds")}
            for name, res in out["kernels"].items()
            if name != CANDIDATE
        }
    return out


def _log_kernel(bed: Testbed, res: dict[str, Any]) -> None:
    spent = res["spent"]
    status = (
        f"TV<={TV_THRESHOLD} at {res['decode_tokens']:.0f} decode tokens/chain, {res['wall_seconds']:.1f} s"
        if res["converged"]
        else f"not converged: TV {res['final_tv']:.3f} after {spent['decode_tokens']:.0f} decode tokens/chain"
    )
    print(f"[{bed.label}] {res['kernel']:<15} {status} ({spent['steps']} steps, {spent['wall_seconds']:.1f} s)")
    sys.stdout.flush()


def length_scaling(testbeds: list[dict[str, Any]], pair: tuple[int, int] | None) -> dict[str, Any] | None:
    """Cost at the long run length / cost at the short one, at the same number of decisions."""
    if pair is None:
        return None
    short_l, long_l = pair
    found = {}
    for bed in testbeds:
        if bed["run_length"] in pair and bed["num_decisions"] == 3:
            found[bed["run_length"]] = bed
    if set(found) != set(pair):
        return None
    short, long = found[short_l], found[long_l]
    out: dict[str, Any] = {
        "num_decisions": 3,
        "run_lengths": list(pair),
        "max_new_tokens": [short["max_new_tokens"], long["max_new_tokens"]],
        "goal": LENGTH_SCALING_GOAL,
        "kernels": {},
    }
    for name in short["kernels"]:
        if name not in long["kernels"]:
            continue
        a, b = short["kernels"][name], long["kernels"][name]
        entry: dict[str, Any] = {}
        for key in ("decode_tokens", "scored_tokens", "wall_seconds"):
            if a["converged"] and b["converged"]:
                entry[key] = b[key] / a[key]
            else:
                entry[key] = None
        out["kernels"][name] = entry
    if "candidate_seeds" in short and "candidate_seeds" in long:
        ratios = [
            lb["decode_tokens"] / sb["decode_tokens"]
            for sb, lb in zip(short["candidate_seeds"], long["candidate_seeds"], strict=True)
            if sb["converged"] and lb["converged"]
        ]
        medians = [
            float(np.median([s["decode_tokens"] for s in bed["candidate_seeds"] if s["converged"]] or [np.nan]))
            for bed in (short, long)
        ]
        out["candidate_seeds"] = {
            "decode_tokens_ratio_per_seed": ratios,
            "decode_tokens_median_short_long": medians,
            "ratio_of_medians": medians[1] / medians[0] if all(np.isfinite(medians)) else None,
        }
    return out


# ---------------------------------------------------------------------------------------------- part 2
def extract_answer(text: str) -> int | None:
    """The integer after the last ``Answer:`` in ``text``."""
    found = re.findall(r"Answer:\s*(-?\d+)", text)
    return int(found[-1]) if found else None


def moved_fraction(tokens: np.ndarray, initial: Sequence[Sequence[int]]) -> float:
    """Fraction of (chain, step) pairs whose completion changed (an accepted proposal can equal the current
    completion, so the acceptance rate overstates how often a chain moves). ``tokens``: [chain, draw, position]
    padded with -1; ``initial``: the completions before the first step."""
    width = tokens.shape[2]
    start = np.full((tokens.shape[0], 1, width), -1, dtype=tokens.dtype)
    for c, row in enumerate(initial):
        start[c, 0, : len(row)] = row
    before = np.concatenate([start, tokens[:, :-1]], axis=1)
    return float((tokens != before).any(2).mean())


def run_smollm2(settings: Settings, out_dir: Path) -> dict[str, Any]:
    """``mh`` and ``egps`` on SmolLM2-135M at (about) equal decode tokens; see the module docstring."""
    from egps_ppl.diagnostics import plot_entropy_profile, summarize
    from egps_ppl.evals.tasks import arithmetic_prompt
    from egps_ppl.infer import MCMC
    from egps_ppl.models.registry import load_model

    tic = time.perf_counter()
    lm = load_model("smollm2-135m")
    load_seconds = time.perf_counter() - tic
    out: dict[str, Any] = {
        "model": "smollm2-135m",
        "alpha": ALPHA,
        "chains": settings.smollm2_chains,
        "max_new_tokens": settings.smollm2_max_new_tokens,
        "egps_steps": settings.smollm2_egps_steps,
        "load_seconds": load_seconds,
        "questions": [],
        "plots": [],
    }
    for q_index, (question, answer) in enumerate(SMOLLM2_QUESTIONS[: settings.smollm2_questions]):
        prompt = arithmetic_prompt(lm, question)  # the few-shot chat prompt (egps_ppl.demo moved into the tasks)
        target = PowerDistribution(lm, prompt, ALPHA, settings.smollm2_max_new_tokens)
        generator = torch.Generator().manual_seed(settings.seed + q_index)
        init_state, _ = target.sample_proposal(settings.smollm2_chains, generator)
        initial = [init_state.row_tokens(c) for c in range(settings.smollm2_chains)]
        entry: dict[str, Any] = {
            "question": question,
            "answer": answer,
            "prompt_tokens": len(prompt),
            "initial_lengths": [len(row) for row in initial],
            "kernels": {},
        }
        runs = {}
        egps_decode: float | None = None
        for name in (CANDIDATE, BASELINE):
            if name == CANDIDATE:
                steps = settings.smollm2_egps_steps
            else:
                # Equal decode budget: a uniform cut on a length-n completion resamples (n + 1) / 2 tokens on
                # average; n from the candidate's draws.
                mean_len = float(runs[CANDIDATE].get_samples()["length"].mean())
                steps = max(4, round(egps_decode / ((mean_len + 1) / 2)))
            mcmc = MCMC(
                build_kernel(name, target), num_samples=steps, num_chains=settings.smollm2_chains, seed=settings.seed
            )
            mcmc.run(initial)
            runs[name] = mcmc
            stats = mcmc.get_sample_stats()
            samples = mcmc.get_samples()
            decode_total = float(stats["decode_tokens"].sum(1).mean())
            if name == CANDIDATE:
                egps_decode = decode_total
            summary = summarize(mcmc.to_arviz())
            texts = [
                lm.decode([int(t) for t in samples["tokens"][c, d] if t >= 0])
                for c in range(samples["tokens"].shape[0])
                for d in range(samples["tokens"].shape[1])
            ]
            answers = [extract_answer(t) for t in texts]
            log_p = summary["variables"]["log_p"]
            entry["kernels"][name] = {
                "steps": steps,
                "wall_seconds": mcmc.wall_seconds,
                "decode_tokens_per_chain": decode_total,
                "scored_tokens_per_chain": float(stats["scored_tokens"].sum(1).mean()),
                "decode_tokens_per_step": summary["decode_tokens_per_draw"]["mean"],
                "scored_tokens_per_step": summary["scored_tokens_per_draw"]["mean"],
                "acceptance_rate": summary["acceptance_rate"]["mean"],
                "accepted_fraction": summary["accepted_fraction"]["mean"],
                "moved_fraction": moved_fraction(samples["tokens"], initial),
                "log_p": {
                    "rhat": log_p["rhat"],
                    "ess_bulk": log_p["ess_bulk"],
                    "ess_tail": log_p["ess_tail"],
                    "mean": log_p["mean"],
                    "sd": log_p["sd"],
                    "first_draw_mean": float(samples["log_p"][:, 0].mean()),
                    "last_draw_mean": float(samples["log_p"][:, -1].mean()),
                },
                "ess_bulk_per_1k_decode_tokens": (
                    log_p["ess_bulk"] / (decode_total * settings.smollm2_chains) * 1000
                    if math.isfinite(log_p["ess_bulk"])
                    else None
                ),
                "correct_fraction_all_draws": sum(a == answer for a in answers) / len(answers),
                "final_completions": [texts[(c + 1) * steps - 1] for c in range(settings.smollm2_chains)],
                "summary_notes": summary["notes"],
            }
            if q_index == 0:
                final = mcmc.state
                length = int(final.length[0])
                path = out_dir / f"{NAME}_smollm2_entropy_{name}.png"
                plot_entropy_profile(final.entropy[0, :length].numpy(), stats["cut_position"], path)
                out["plots"].append(path.name)
                entry["kernels"][name]["profile_completion"] = {
                    "chain": 0,
                    "length": length,
                    "text": lm.decode(final.row_tokens(0)),
                    "cut_histogram": np.bincount(
                        stats["cut_position"][stats["cut_position"] >= 0].ravel(),
                        minlength=settings.smollm2_max_new_tokens,
                    ).tolist(),
                }
            print(
                f"[smollm2 q{q_index}] {name:<5} {steps} steps, {decode_total:.0f} decode tokens/chain, "
                f"accept {summary['acceptance_rate']['mean']:.2f}, R-hat {log_p['rhat']:.2f}, "
                f"ESS {log_p['ess_bulk']:.1f}, {mcmc.wall_seconds:.0f} s"
            )
            sys.stdout.flush()
        out["questions"].append(entry)
    return out


# ---------------------------------------------------------------------------------------------- plots
def plot_curves(testbeds: list[dict[str, Any]], out_dir: Path) -> Path:
    """TV vs decode tokens per chain (top) and vs wall-clock (bottom), one column per test bed (log axes; the
    starting point, at zero cost, is left out)."""
    fig, axes = new_figure(2, len(testbeds), size=(4.8, 3.6))
    for col, bed in enumerate(testbeds):
        for row, key, label in ((0, "decode_tokens", "decode tokens per chain"), (1, "wall_seconds", "wall-clock (s)")):
            ax = axes[row, col]
            for name, res in bed["kernels"].items():
                x = np.asarray(res["curve"][key], dtype=float)[1:]
                tv = np.asarray(res["curve"]["tv"], dtype=float)[1:]
                ax.plot(x, tv, color=_color(name), label=name, lw=1.2)
                if not res["converged"]:
                    ax.plot(x[-1:], tv[-1:], "x", color=_color(name))
            ax.axhline(TV_THRESHOLD, color="k", ls="--", lw=0.8, label=f"TV = {TV_THRESHOLD}")
            ax.axhline(bed["noise_floor_tv"]["mean"], color="0.5", ls=":", lw=0.8, label="i.i.d. floor")
            ax.set_xscale("log")
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("TV to exact branch joint")
            ax.set_title(f"{bed['label']} (T={bed['max_new_tokens']}, C={bed['chains']})", fontsize="medium")
            ax.grid(True, which="major", alpha=0.3)
    axes[0, 0].legend(fontsize="small", loc="lower left")
    fig.suptitle("Sparse-decision test beds from a bad start (×: budget spent, not reached)", fontsize="medium")
    fig.tight_layout()
    path = out_dir / f"{NAME}_tv.png"
    fig.savefig(path, dpi=110)
    _close(fig)
    return path


def _color(name: str) -> str:
    return f"C{KERNELS.index(name)}" if name in KERNELS else "k"


def plot_costs(testbeds: list[dict[str, Any]], out_dir: Path) -> Path:
    """Decode tokens per chain to TV <= threshold per kernel and test bed (hatched: not reached, the spent budget
    is drawn as a lower bound)."""
    fig, axes = new_figure(1, 1, size=(max(6.5, 1.8 * len(testbeds) + 3), 4.4))
    ax = axes[0, 0]
    names = [k for k in KERNELS if any(k in bed["kernels"] for bed in testbeds)]
    width = 0.8 / len(names)
    top = 0.0
    for j, name in enumerate(names):
        for i, bed in enumerate(testbeds):
            res = bed["kernels"].get(name)
            if res is None:
                continue
            value = res["decode_tokens"] if res["converged"] else res["lower_bound"]["decode_tokens"]
            top = max(top, value)
            x = i + (j - (len(names) - 1) / 2) * width
            ax.bar(
                x,
                value,
                width,
                color=_color(name),
                hatch=None if res["converged"] else "//",
                edgecolor="k" if not res["converged"] else None,
                label=name if not any(name in b["kernels"] for b in testbeds[:i]) else None,
            )
            text = f"{'>' if not res['converged'] else ''}{value:,.0f}"
            ax.text(x, value * 1.08, text, ha="center", va="bottom", fontsize=7, rotation=90)
    ax.set_xticks(range(len(testbeds)), [bed["label"] for bed in testbeds])
    ax.set_yscale("log")
    ax.set_ylim(top=top * 8)
    ax.set_ylabel(f"decode tokens per chain to TV <= {TV_THRESHOLD}")
    ax.set_title("Cost to reach π from a bad start (hatched: not reached; bar = budget spent)", fontsize="medium")
    ax.legend(fontsize="small", ncol=len(names), loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    path = out_dir / f"{NAME}_cost.png"
    fig.savefig(path, dpi=110)
    _close(fig)
    return path


def _close(fig: Any) -> None:
    """Release a pyplot figure made by :func:`benchmarks.common.new_figure`."""
    import matplotlib.pyplot as plt

    plt.close(fig)


# ---------------------------------------------------------------------------------------------- tables
def _cost(res: dict[str, Any], key: str, fmt: str = "{:,.0f}") -> str:
    if res["converged"]:
        return fmt.format(res[key])
    return ">" + fmt.format(res["lower_bound"][key])


def _extrapolated(extra: dict[str, Any] | None) -> str:
    return "—" if not extra else f"≈ {extra['decode_tokens']:,.0f}"


def _ratio(entry: dict[str, Any]) -> str:
    if entry["value"] is not None:
        return f"{entry['value']:.1f}×"
    if entry["lower_bound"] is not None:
        extra = f" (extrap. ≈ {entry['extrapolated']:.0f}×)" if entry["extrapolated"] else ""
        return f">{entry['lower_bound']:.0f}×{extra}"
    return "n/a"


def markdown_tables(payload: dict[str, Any]) -> str:
    """The result tables as Markdown (what ``docs/benchmarks/egps_speedup.md`` quotes)."""
    lines = []
    for bed in payload["testbeds"]:
        lines += [
            f"#### {bed['label']} (T = {bed['max_new_tokens']}, V = {bed['vocab_size']}, C = {bed['chains']}; "
            f"start TV {next(iter(bed['kernels'].values()))['start_tv']:.3f}, i.i.d. floor "
            f"{bed['noise_floor_tv']['mean']:.3f})",
            "",
            "| kernel | steps | decode tok/chain | scored tok/chain | wall-clock (s, C chains) | accept | moved | "
            "final TV | decode ratio vs egps | wall ratio vs egps | extrapolated decode tok/chain |",
            "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, res in bed["kernels"].items():
            ratios = bed.get("ratios_vs_candidate", {}).get(name)
            extra = res["extrapolation"]
            lines.append(
                f"| {name} | {_cost(res, 'steps', '{:,}')} | {_cost(res, 'decode_tokens')} | "
                f"{_cost(res, 'scored_tokens')} | {_cost(res, 'wall_seconds', '{:,.1f}')} | "
                f"{res['acceptance_rate_mean']:.3f} | {res['moved_fraction']:.3f} | {res['final_tv']:.3f} | "
                f"{_ratio(ratios['decode_tokens']) if ratios else '1×'} | "
                f"{_ratio(ratios['wall_seconds']) if ratios else '1×'} | "
                f"{_extrapolated(extra)} |"
            )
        seeds = bed.get("candidate_seeds")
        if seeds:
            values = [s["decode_tokens"] for s in seeds if s["converged"]]
            lines += [
                "",
                f"{CANDIDATE} over seeds {[s['seed'] for s in seeds]}: decode tokens/chain to TV <= {TV_THRESHOLD} "
                + ", ".join(f"{s['decode_tokens']:.0f}" if s["converged"] else "not reached" for s in seeds)
                + (f" (median {np.median(values):.0f})" if values else ""),
            ]
        lines.append("")
    scaling = payload.get("length_scaling")
    if scaling:
        lines += [
            f"#### Length scaling (D = 3, L = {scaling['run_lengths'][0]} → {scaling['run_lengths'][1]}, "
            f"T = {scaling['max_new_tokens'][0]} → {scaling['max_new_tokens'][1]})",
            "",
            "| kernel | decode tokens ratio | scored tokens ratio | wall-clock ratio |",
            "| --- | ---: | ---: | ---: |",
        ]
        for name, entry in scaling["kernels"].items():
            cells = [f"{entry[k]:.2f}" if entry[k] is not None else "n/a (not reached)" for k in entry]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
        seeds = scaling.get("candidate_seeds")
        if seeds and seeds["ratio_of_medians"] is not None:
            lines += [
                "",
                f"{CANDIDATE} over seeds: per-seed decode ratios "
                + ", ".join(f"{r:.2f}" for r in seeds["decode_tokens_ratio_per_seed"])
                + f"; ratio of medians {seeds['ratio_of_medians']:.2f} (goal < {scaling['goal']}).",
            ]
        lines.append("")
    smol = payload.get("smollm2")
    if smol and "questions" in smol:
        lines += [
            f"#### SmolLM2-135M (α = {smol['alpha']:g}, {smol['chains']} chains, max_new_tokens = "
            f"{smol['max_new_tokens']})",
            "",
            "| question | kernel | steps | decode tok/chain | decode tok/step | scored tok/step | accept | moved | "
            "R-hat log p | bulk ESS log p | ESS / 1k decode tok | correct (all draws) | wall (s) |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for i, q in enumerate(smol["questions"]):
            for name, k in q["kernels"].items():
                ess_rate = k["ess_bulk_per_1k_decode_tokens"]
                lines.append(
                    f"| q{i} | {name} | {k['steps']} | {k['decode_tokens_per_chain']:.0f} | "
                    f"{k['decode_tokens_per_step']:.1f} | {k['scored_tokens_per_step']:.1f} | "
                    f"{k['acceptance_rate']:.2f} | {k['moved_fraction']:.2f} | "
                    f"{_num(k['log_p']['rhat'], 2)} | {_num(k['log_p']['ess_bulk'], 1)} | "
                    f"{_num(ess_rate, 2)} | {k['correct_fraction_all_draws']:.2f} | {k['wall_seconds']:.0f} |"
                )
        lines.append("")
    return "\n".join(lines)


def _num(value: float | None, digits: int) -> str:
    return "nan" if value is None or not math.isfinite(value) else f"{value:.{digits}f}"


# ---------------------------------------------------------------------------------------------- main
def headline(testbeds: list[dict[str, Any]], scaling: dict[str, Any] | None) -> dict[str, Any]:
    """The numbers the issue asks for, per test bed: both kernels' costs and the baseline/candidate ratios."""
    out: dict[str, Any] = {"threshold": TV_THRESHOLD, "paper_wall_clock_speedup": PAPER_SPEEDUP, "testbeds": {}}
    for bed in testbeds:
        if BASELINE not in bed["kernels"] or CANDIDATE not in bed["kernels"]:
            continue
        base, cand = bed["kernels"][BASELINE], bed["kernels"][CANDIDATE]
        bound = base["lower_bound"] or {}
        ratios = bed["ratios_vs_candidate"][BASELINE]
        decode_ratio = ratios["decode_tokens"]
        best = decode_ratio["value"] if decode_ratio["value"] is not None else decode_ratio["lower_bound"]
        out["testbeds"][bed["label"]] = {
            f"{BASELINE}_decode_tokens": base["decode_tokens"],
            f"{BASELINE}_decode_tokens_lower_bound": bound.get("decode_tokens"),
            f"{CANDIDATE}_decode_tokens": cand["decode_tokens"],
            f"{BASELINE}_wall_seconds": base["wall_seconds"],
            f"{BASELINE}_wall_seconds_lower_bound": bound.get("wall_seconds"),
            f"{CANDIDATE}_wall_seconds": cand["wall_seconds"],
            "decode_tokens_ratio": decode_ratio,
            "wall_seconds_ratio": ratios["wall_seconds"],
            "meets_paper_ratio_in_decode_tokens": None if best is None else bool(best >= PAPER_SPEEDUP),
        }
    if scaling and CANDIDATE in scaling["kernels"]:
        ratio = scaling["kernels"][CANDIDATE]["decode_tokens"]
        out["length_scaling_decode_tokens"] = ratio
        out["length_scaling_meets_goal"] = None if ratio is None else bool(ratio < LENGTH_SCALING_GOAL)
    return out


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.egps_speedup", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D=2, L=4, C=300, small budget, no SmolLM2 (seconds)")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    parser.add_argument("--docs", default=None, help="also copy the PNGs into this folder (e.g. docs/benchmarks)")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--skip-smollm2", action="store_true", help="skip part 2 even in the full run")
    parser.add_argument("--budget", type=float, default=None, help="decode-token budget per chain per kernel")
    parser.add_argument("--chains", type=int, default=None, help="chains per test bed")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the benchmark; return the payload that was written to ``<out>/egps_speedup.json``."""
    args = parse_args(argv)
    threads = set_threads(args.threads)
    settings = QUICK if args.quick else FULL
    if args.budget is not None or args.chains is not None:
        settings = Settings(
            **{
                **{k: getattr(settings, k) for k in settings.__dataclass_fields__},
                **({"budget_decode_tokens": args.budget} if args.budget is not None else {}),
                **({"chains": args.chains} if args.chains is not None else {}),
            }
        )
    if args.skip_smollm2 and settings.smollm2:
        settings = Settings(**{**{k: getattr(settings, k) for k in settings.__dataclass_fields__}, "smollm2": False})
    out_dir = Path(args.out) if args.out is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    command = "python -m benchmarks.egps_speedup " + " ".join(sys.argv[1:] if argv is None else argv)
    payload: dict[str, Any] = {
        "name": NAME,
        "command": command.strip(),
        "quick": args.quick,
        "torch_threads": threads,
        "environment": environment(),
        "settings": asdict(settings),
        "tv_threshold": TV_THRESHOLD,
        "alpha": ALPHA,
    }
    started = time.perf_counter()
    testbeds = [run_testbed(bed, settings) for bed in settings.testbeds]
    scaling = length_scaling(testbeds, settings.length_pair)
    payload.update(testbeds=testbeds, length_scaling=scaling, headline=headline(testbeds, scaling))
    payload["testbed_seconds"] = time.perf_counter() - started
    plots = [plot_curves(testbeds, out_dir), plot_costs(testbeds, out_dir)]
    if settings.smollm2:
        tic = time.perf_counter()
        payload["smollm2"] = run_smollm2(settings, out_dir)
        payload["smollm2"]["seconds"] = time.perf_counter() - tic
        plots += [out_dir / name for name in payload["smollm2"]["plots"]]
    else:
        payload["smollm2"] = {"skipped": "--quick" if args.quick else "--skip-smollm2"}
    payload["plots"] = [p.name for p in plots]
    payload["total_seconds"] = time.perf_counter() - started
    payload["environment_end"] = {"load_average": environment()["load_average"]}
    write_results(NAME, payload, out_dir)
    if args.docs:
        docs = Path(args.docs)
        docs.mkdir(parents=True, exist_ok=True)
        for path in plots:
            shutil.copy2(path, docs / path.name)
    print(markdown_tables(payload))
    return payload


if __name__ == "__main__":
    run_cli(main, NAME)
