"""EGPS design ablation on the exact sparse-decision test beds: which cut, which tries, how many, how hot.

Run from the repository root::

    python -m benchmarks.egps_design                 # the recorded ablation (~15 min on one busy core)
    python -m benchmarks.egps_design --quick         # D=2, L=4, few variants, 2 seeds (seconds; the tests)
    python -m benchmarks.egps_design --out benchmarks/results --docs docs/benchmarks

Writes ``<out>/egps_design.json`` and ``<out>/egps_design.png`` and prints a Markdown table.

Every variant runs from the same low-temperature start as in :mod:`benchmarks.egps_speedup` (C chains, α = 4)
with :func:`benchmarks.egps_speedup.run_kernel`, so the numbers are the same measurement: decode tokens per
chain until the TV of the branch joint to the exact joint first reaches 0.05 (or the budget, reported as not
reached), over several seeds (median and range). Alongside, the TV after a fixed decode budget per chain
(``--matched``) compares variants at matched decode tokens; it is read off the TV curve at the last step within
that budget.

The variants change one thing at a time from the chosen ``egps`` (see :data:`VARIANTS`):

* cut rule of the suffix moves: uniform, entropy, entropy jump, entropy jump discounted by the remaining length;
* tries per suffix move: k = 1, 2, 4, 8;
* kind of tries: local windows (``egps-local``), suffix at temperature 1/α, suffix at temperature 1,
  decision suffix (first token at temperature 1/a for a = 1, 2, the rest at 1/α);
* the mixture weight of suffix moves: 0, 0.25, 0.5, 0.75, 1.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.common import RESULTS_DIR, environment, new_figure, run_cli, set_threads, write_results
from benchmarks.egps_speedup import ALPHA, TV_THRESHOLD, Settings, exact_summary, run_kernel
from egps_ppl.kernels.base import Kernel
from egps_ppl.kernels.mtm import MultipleTryMetropolis
from egps_ppl.kernels.presets import PRESETS, egps_suffix, make_egps, register_preset
from egps_ppl.kernels.proposals import SuffixProposal
from egps_ppl.kernels.sites import CostAwareJumpSite, EntropyJumpSite, EntropySite, UniformSite
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.models.testbeds import sparse_decision
from egps_ppl.target import PowerDistribution

NAME = "egps_design"
Factory = Callable[[PowerDistribution, PowerPolicy], Kernel]


def _suffix_mtm(selector: Any, k: int, first: float | None, rest: float | None = None) -> Factory:
    """MTM at ``selector`` cuts with ``k`` suffix tries: decision suffix (first token at temperature 1/first)
    or, with ``first=None``, a plain suffix at temperature 1/rest (default 1/α)."""

    def factory(target: PowerDistribution, policy: PowerPolicy) -> Kernel:
        if first is None:
            proposal = SuffixProposal(PowerPolicy(rest) if rest is not None else policy)
            return MultipleTryMetropolis(target, k, selector=selector, proposal=proposal)
        from egps_ppl.kernels.decision import DecisionSuffixProposal

        return MultipleTryMetropolis(
            target, k, selector=selector, proposal=DecisionSuffixProposal(policy, PowerPolicy(first))
        )

    return factory


JUMP = EntropyJumpSite(beta=4.0, floor=1e-3)
VARIANTS: dict[str, tuple[str, Factory]] = {
    # the chosen kernel and its two parts
    "egps": ("default: w=0.5, k=4", lambda t, p: make_egps(t, p)),
    "egps-local": ("kind: windows (w=0)", PRESETS["egps-local"][0]),
    # mixture weight of the suffix moves
    "w=0.25": ("weight", lambda t, p: make_egps(t, p, suffix_weight=0.25)),
    "w=0.75": ("weight", lambda t, p: make_egps(t, p, suffix_weight=0.75)),
    "w=1 (suffix only)": ("weight", lambda t, p: make_egps(t, p, suffix_weight=1.0)),
    # cheaper suffix moves inside the mixture
    "mix k=2": ("tries", lambda t, p: make_egps(t, p, suffix_tries=2)),
    "mix cut jump/len": ("cut", lambda t, p: make_egps(t, p, gamma=1.0)),
    "w=0.25, k=2": ("weight", lambda t, p: make_egps(t, p, suffix_weight=0.25, suffix_tries=2)),
    # tries per suffix move (suffix only, entropy-jump cuts)
    "suffix k=1": ("tries", lambda t, p: egps_suffix(t, p, num_tries=1, name=None)),
    "suffix k=2": ("tries", lambda t, p: egps_suffix(t, p, num_tries=2, name=None)),
    "suffix k=8": ("tries", lambda t, p: egps_suffix(t, p, num_tries=8, name=None)),
    # cut rule (suffix only, k=4)
    "cut uniform": ("cut", _suffix_mtm(UniformSite(), 4, 1.0)),
    "cut entropy": ("cut", _suffix_mtm(EntropySite(beta=1.0, floor=1e-3), 4, 1.0)),
    "cut jump/len": ("cut", _suffix_mtm(CostAwareJumpSite(4.0, 1e-3, 1.0), 4, 1.0)),
    # kind and temperature of the tries (suffix only, entropy-jump cuts, k=4)
    "suffix all 1/α": ("temperature", _suffix_mtm(JUMP, 4, None)),
    "suffix all T=1": ("temperature", _suffix_mtm(JUMP, 4, None, rest=1.0)),
    "suffix first T=1/2": ("temperature", _suffix_mtm(JUMP, 4, 2.0)),
    # mixture with suffix tries at temperature 1/alpha (no hot first token)
    "mix, suffix all 1/α": (
        "temperature",
        lambda t, p: make_egps(t, p, first_alpha=t.alpha),
    ),
}
"""Variant name -> (axis, factory); ``w=1 (suffix only)`` is decision suffix, k=4, entropy-jump cuts."""

QUICK_VARIANTS = ("egps", "egps-local", "w=1 (suffix only)", "suffix all 1/α")
LONG_VARIANTS = ("egps", "egps-local", "w=0.25", "mix k=2", "mix cut jump/len", "w=0.25, k=2", "suffix all T=1")
"""The variants also run on the long bed (L = 32): the mixtures, and the one suffix-only variant that reached
the threshold at L = 8."""


def run(
    beds: Sequence[tuple[int, int, Sequence[str]]],
    seeds: Sequence[int],
    chains: int,
    budget: float,
    matched: float,
    log: bool = True,
    on_progress: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Every variant on every bed with every seed; per (bed, variant) the seeds' costs and TV at ``matched``."""
    settings = Settings(
        testbeds=(), chains=chains, budget_decode_tokens=budget, max_steps=20_000, seed=0,
        candidate_seeds=(), length_pair=None, smollm2=False,
    )  # fmt: skip
    out = []
    for d, length, names in beds:
        sd = sparse_decision(num_decisions=d, run_length=length)
        target = PowerDistribution(sd.model, [], ALPHA, sd.max_new_tokens)
        joint = np.asarray(exact_summary(sd, ALPHA)["joint"])
        bed: dict[str, Any] = {"label": f"D={d}, L={length}", "max_new_tokens": sd.max_new_tokens, "variants": {}}
        out.append(bed)
        for name in names:
            axis, factory = VARIANTS[name]
            key = "_design:" + name.replace(" ", "_")
            register_preset(key, factory, name)
            runs = []
            for seed in seeds:
                res = run_kernel(target, sd, joint, key, settings, seed)
                curve = res["curve"]
                within = [i for i, tok in enumerate(curve["decode_tokens"]) if tok <= matched]
                runs.append(
                    {
                        "seed": seed,
                        "converged": res["converged"],
                        "decode_tokens": res["decode_tokens"],
                        "scored_tokens": res["scored_tokens"],
                        "wall_seconds": res["wall_seconds"],
                        "spent_decode_tokens": res["spent"]["decode_tokens"],
                        "tv_at_matched": curve["tv"][within[-1]] if within else None,
                        "acceptance": res["acceptance_rate_mean"],
                        "moved": res["moved_fraction"],
                    }
                )
            del PRESETS[key]
            entry = {"axis": axis, "runs": runs, **aggregate(runs, budget)}
            bed["variants"][name] = entry
            if log:
                print(f"[{bed['label']}] {name:<22} {describe(entry)}", flush=True)
            if on_progress is not None:
                on_progress(out)
    return out


def aggregate(runs: list[dict[str, Any]], budget: float) -> dict[str, Any]:
    """Median and range over seeds of the decode tokens to the threshold (a seed that did not reach it counts
    as the budget, and the median is then a lower bound when half or more did not), and of the TV at the
    matched budget."""
    costs = [r["decode_tokens"] if r["converged"] else budget for r in runs]
    tvs = [r["tv_at_matched"] for r in runs if r["tv_at_matched"] is not None]
    reached = sum(r["converged"] for r in runs)
    return {
        "reached": reached,
        "decode_median": statistics.median(costs),
        "decode_min": min(costs),
        "decode_max": max(costs),
        "median_is_lower_bound": reached <= len(runs) // 2,
        "scored_median": statistics.median([r["scored_tokens"] for r in runs if r["converged"]] or [float("nan")]),
        "tv_matched_median": statistics.median(tvs) if tvs else None,
        "tv_matched_min": min(tvs) if tvs else None,
        "tv_matched_max": max(tvs) if tvs else None,
    }


def describe(entry: dict[str, Any]) -> str:
    bound = ">" if entry["median_is_lower_bound"] else ""
    tv = entry["tv_matched_median"]
    return (
        f"reached {entry['reached']}/{len(entry['runs'])}, decode to TV<={TV_THRESHOLD}: {bound}"
        f"{entry['decode_median']:.0f} [{entry['decode_min']:.0f}, {entry['decode_max']:.0f}], "
        f"TV at matched {'n/a' if tv is None else f'{tv:.3f}'}"
    )


def markdown(payload: dict[str, Any]) -> str:
    lines = []
    for bed in payload["beds"]:
        lines += [
            f"#### {bed['label']} (T = {bed['max_new_tokens']}, C = {payload['chains']}, seeds "
            f"{payload['seeds']}, budget {payload['budget']:,.0f} decode tok/chain)",
            "",
            f"| variant | axis | reached | decode tok/chain to TV ≤ {TV_THRESHOLD} (median [min, max]) | "
            f"scored tok/chain | TV at {payload['matched']:,.0f} decode tok (median [min, max]) | accept | moved |",
            "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
        ]
        for name, e in bed["variants"].items():
            bound = ">" if e["median_is_lower_bound"] else ""
            tv = e["tv_matched_median"]
            tv_text = "n/a" if tv is None else f"{tv:.3f} [{e['tv_matched_min']:.3f}, {e['tv_matched_max']:.3f}]"
            acc = statistics.mean(r["acceptance"] for r in e["runs"])
            moved = statistics.mean(r["moved"] for r in e["runs"])
            lines.append(
                f"| {name} | {e['axis']} | {e['reached']}/{len(e['runs'])} | {bound}{e['decode_median']:,.0f} "
                f"[{e['decode_min']:,.0f}, {e['decode_max']:,.0f}] | {_scored(e['scored_median'])} | {tv_text} | "
                f"{acc:.2f} | {moved:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


def _scored(value: float | None) -> str:
    return "—" if value is None or value != value else f"{value:,.0f}"


def plot(payload: dict[str, Any], out_dir: Path) -> Path:
    """Decode tokens to the threshold per variant (bar: median; whiskers: min and max over seeds), per bed."""
    beds = payload["beds"]
    rows = max(len(bed["variants"]) for bed in beds)
    fig, axes = new_figure(1, len(beds), size=(6.0, 0.35 * rows + 1.5))
    for col, bed in enumerate(beds):
        ax = axes[0, col]
        names = list(bed["variants"])
        med = [bed["variants"][n]["decode_median"] for n in names]
        lo = [m - bed["variants"][n]["decode_min"] for m, n in zip(med, names, strict=True)]
        hi = [bed["variants"][n]["decode_max"] - m for m, n in zip(med, names, strict=True)]
        colors = [
            "C3" if n == "egps" else ("0.6" if bed["variants"][n]["median_is_lower_bound"] else "C0") for n in names
        ]
        ax.barh(range(len(names)), med, xerr=[lo, hi], color=colors, capsize=2)
        ax.set_yticks(range(len(names)), names, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        ax.axvline(payload["budget"], color="k", ls=":", lw=0.8)
        ax.set_xlabel(f"decode tokens per chain to TV ≤ {TV_THRESHOLD} (grey: budget hit)")
        ax.set_title(f"{bed['label']} (T={bed['max_new_tokens']})", fontsize="medium")
        ax.grid(True, axis="x", alpha=0.3)
    fig.suptitle("EGPS design ablation on sparse-decision test beds (median, min–max over seeds)", fontsize="medium")
    fig.tight_layout()
    path = out_dir / f"{NAME}.png"
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def merge(paths: Sequence[str], out_dir: Path, docs: str | None = None) -> dict[str, Any]:
    """One record of several runs (e.g. the long bed and a smaller budget for the suffix-only variants): every
    run's payload under ``parts``, and their beds merged by label (each variant keeps its own run's budget in
    ``budget``) for the plot."""
    import json

    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [json.loads(Path(p).read_text()) for p in paths]
    beds: dict[str, dict[str, Any]] = {}
    for part in parts:
        for bed in part["beds"]:
            merged = beds.setdefault(bed["label"], {**bed, "variants": {}})
            for name, entry in bed["variants"].items():
                merged["variants"][name] = {**entry, "budget": part["budget"]}
    payload = {
        "name": NAME,
        "command": "python -m benchmarks.egps_design --merge " + " ".join(paths),
        "parts": parts,
        "beds": list(beds.values()),
        "budget": max(part["budget"] for part in parts),
        "matched": parts[0]["matched"],
        "chains": parts[0]["chains"],
        "seeds": parts[0]["seeds"],
    }
    path = plot(payload, out_dir)
    payload["plots"] = [path.name]
    write_results(NAME, payload, out_dir)
    if docs:
        Path(docs).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(docs) / path.name)
    for part in parts:
        print(markdown(part))
    return payload


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.egps_design", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="D=2, L=4, 4 variants, 2 seeds, C=300")
    parser.add_argument("--out", default=None, help="output folder (default benchmarks/results)")
    parser.add_argument("--docs", default=None, help="also copy the PNG into this folder")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", default=None, help="';'-separated subset of VARIANTS")
    parser.add_argument("--seeds", default=None, help="comma-separated seeds (default 0,1,2)")
    parser.add_argument("--chains", type=int, default=None, help="chains per run (default 500)")
    parser.add_argument("--beds", default=None, help="comma-separated DxL beds, e.g. 3x8,3x32 (default both)")
    parser.add_argument("--budget", type=float, default=None, help="decode tokens per chain (default 10,000)")
    parser.add_argument("--merge", nargs="+", default=None, help="merge these egps_design.json files and exit")
    args = parser.parse_args(argv)
    threads = set_threads(args.threads)
    if args.merge:
        return merge(args.merge, Path(args.out) if args.out else RESULTS_DIR, args.docs)
    if args.quick:
        beds, seeds, chains, budget, matched = [(2, 4, QUICK_VARIANTS)], [0, 1], 300, 4_000.0, 300.0
    else:
        beds, seeds = [(3, 8, tuple(VARIANTS)), (3, 32, LONG_VARIANTS)], [0, 1, 2]
        chains, budget, matched = 500, 10_000.0, 800.0
    if args.variants:
        names = tuple(n.strip() for n in args.variants.split(";"))
        beds = [(d, length, names) for d, length, _ in beds]
    if args.beds:
        wanted = {tuple(int(v) for v in bed.split("x")) for bed in args.beds.split(",")}
        beds = [bed for bed in beds if bed[:2] in wanted]
    if args.seeds:
        seeds = [int(s) for s in args.seeds.split(",")]
    chains = args.chains or chains
    budget = args.budget or budget
    out_dir = Path(args.out) if args.out is not None else RESULTS_DIR
    out_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    payload: dict[str, Any] = {
        "name": NAME,
        "command": ("python -m benchmarks.egps_design " + " ".join(sys.argv[1:] if argv is None else argv)).strip(),
        "quick": args.quick,
        "torch_threads": threads,
        "environment": environment(),
        "alpha": ALPHA,
        "tv_threshold": TV_THRESHOLD,
        "chains": chains,
        "seeds": seeds,
        "budget": budget,
        "matched": matched,
        "variants": {n: VARIANTS[n][0] for _, _, names in beds for n in names},
    }

    def partial(done: list[dict[str, Any]]) -> None:  # results so far, written as they come
        write_results(NAME, {**payload, "beds": done, "partial": True}, out_dir)

    payload["beds"] = run(beds, seeds, chains, budget, matched, on_progress=partial)
    payload["seconds"] = time.perf_counter() - started
    path = plot(payload, out_dir)
    payload["plots"] = [path.name]
    write_results(NAME, payload, out_dir)
    if args.docs:
        Path(args.docs).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(args.docs) / path.name)
    print(markdown(payload))
    return payload


if __name__ == "__main__":
    torch.set_num_threads(1)
    run_cli(main, NAME)
