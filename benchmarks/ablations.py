"""Ablations of ``egps`` on a real model (issue #10, item 5): which part of the kernel earns its cost.

::

    python -m benchmarks.ablations --task arithmetic --limit 100 --seeds 2 --out runs/ablations   # resumable
    python -m benchmarks.ablations --report-only --out runs/ablations --docs docs/benchmarks
    python -m benchmarks.ablations --quick --out /tmp/ablations    # tiny-gpt2, 3 problems (seconds; the tests)

Each variant changes one part of ``egps``'s decision move (Multiple-Try Metropolis from an entropy-jump cut,
4 suffix tries whose first token is drawn at temperature 1 and the rest from q ∝ p^α) and is run at a budget
matched to the others: **8 suffix tries per unit** (``k`` tries × ``8 / k`` steps), so that the decode tokens per
unit are about equal and the comparison is at equal compute. The axes:

* ``tries``: k = 1, 2, 4, 8 tries per move (k = 1 is MH with the decision proposal);
* ``cut``: uniform, entropy (P(i) ∝ 0.001 + H_i) and entropy-jump cuts, all with 4 tries;
* ``temperature``: the first token of each try at temperature 1 (``egps``), 1/2, or 1/α (the rest's);
* ``kind``: window tries (``egps-local``: 8 rewrites of 4 tokens, tail kept) against suffix tries;
* references: ``mh`` at 2 and 8 steps (8 suffix proposals), ``egps`` at 2 steps, ``low-temp``.

Block skipping (the entropy-adaptive block schedule) is not an axis here: arithmetic completions are about 35
tokens, two blocks at most. Every point is an ordinary evaluation run directory written by the frontier's runner
(:func:`benchmarks.frontier.run_points`), so the report is the frontier's: accuracy, decode and scored tokens per
unit, the share of units whose answer moved off its start, and the paired difference against ``mh`` at 8 steps
over the same (problem, seed) units with its SE and bootstrap interval. Writes ``<out>/<task>/ablations.json``,
``ablations.md`` and ``ablations_<task>.png``.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

from benchmarks.common import copy_plots, environment, new_figure, run_cli
from benchmarks.frontier import Point, add_run_arguments, markdown_table, report, run_selected

NAME = "ablations"
TRY_BUDGET = 8
"""Suffix tries per unit every decision-move variant gets (``k`` tries × ``TRY_BUDGET / k`` steps)."""


def _variants() -> dict[str, tuple[str, str, Callable[..., Any]]]:
    """``name -> (axis, description, factory(target, policy))`` of the ablation kernels."""
    from egps_ppl.kernels.decision import DecisionSuffixProposal
    from egps_ppl.kernels.mtm import MultipleTryMetropolis
    from egps_ppl.kernels.presets import egps_suffix
    from egps_ppl.kernels.sites import EntropySite, UniformSite
    from egps_ppl.models.policy import PowerPolicy

    def suffix(k: int = 4, first_alpha: float | None = 1.0, site: Any = None) -> Callable[..., Any]:
        def build(target: Any, policy: Any) -> Any:
            first = target.alpha if first_alpha is None else first_alpha
            if site is None:
                return egps_suffix(target, policy, num_tries=k, first_alpha=first, name=None)
            first_policy = PowerPolicy(first, top_k=policy.top_k, top_p=policy.top_p)
            proposal = DecisionSuffixProposal(policy, first_policy)
            return MultipleTryMetropolis(target, num_tries=k, selector=site(), proposal=proposal)

        return build

    out: dict[str, tuple[str, str, Callable[..., Any]]] = {}
    for k in (1, 2, 4, 8):
        out[f"abl-k{k}"] = ("tries", f"{k} suffix tries at entropy-jump cuts, first token T=1", suffix(k))
    out["abl-cut-uniform"] = ("cut", "4 suffix tries at uniform cuts, first token T=1", suffix(4, site=UniformSite))
    out["abl-cut-entropy"] = (
        "cut",
        "4 suffix tries at cuts P(i) ∝ 0.001 + H_i, first token T=1",
        suffix(4, site=lambda: EntropySite(beta=1.0, floor=1e-3)),
    )
    out["abl-first-t0.5"] = ("temperature", "4 suffix tries, first token at T=1/2", suffix(4, first_alpha=2.0))
    out["abl-first-cold"] = ("temperature", "4 suffix tries, first token at T=1/α (as the rest)", suffix(4, None))
    return out


def register() -> dict[str, tuple[str, str]]:
    """Register the ablation kernels as presets in this process (kernel specs and ``load_method`` then know them)
    and return their ``name -> (axis, description)``."""
    from egps_ppl.kernels.presets import register_preset

    described = {}
    for name, (axis, description, factory) in _variants().items():
        register_preset(name, factory, description)
        described[name] = (axis, description)
    return described


def default_points() -> list[tuple[str, Point]]:
    """``(axis, point)`` of the ablation at the matched budget of :data:`TRY_BUDGET` suffix tries per unit."""
    points: list[tuple[str, Point]] = [
        ("reference", Point("low-temp")),
        ("reference", Point("mh", "steps", 2)),
        ("reference", Point("mh", "steps", TRY_BUDGET)),
        ("reference", Point("egps", "steps", 2)),
    ]
    for k in (1, 2, 4, 8):
        points.append(("tries", Point(f"abl-k{k}", "steps", TRY_BUDGET // k)))
    for name in ("abl-cut-uniform", "abl-cut-entropy"):
        points.append(("cut", Point(name, "steps", TRY_BUDGET // 4)))
    for name in ("abl-first-t0.5", "abl-first-cold"):
        points.append(("temperature", Point(name, "steps", TRY_BUDGET // 4)))
    points.append(("kind", Point("egps-local", "steps", 4)))  # 8 windows x 4 tokens x 4 steps ~ 2 x 4 suffixes
    return points


def quick_points() -> list[tuple[str, Point]]:
    return [
        ("reference", Point("mh", "steps", 2)),
        ("tries", Point("abl-k1", "steps", 2)),
        ("tries", Point("abl-k2", "steps", 1)),
        ("cut", Point("abl-cut-uniform", "steps", 1)),
    ]


def _plot(result: dict[str, Any], axes_of: dict[str, str], task: str, path: Path) -> Path:
    fig, axes = new_figure(1, 1, size=(7.4, 4.8))
    ax = axes[0, 0]
    markers = {"reference": "s", "tries": "o", "cut": "^", "temperature": "v", "kind": "D"}
    for label, e in sorted(result["points"].items()):
        axis = axes_of.get(label, "reference")
        diff = e.get("vs_reference") or {"diff": 0.0, "se": 0.0}
        ax.errorbar(
            e["decode_tokens_per_unit"], diff["diff"], yerr=diff["se"] or 0.0, marker=markers.get(axis, "o"),
            capsize=3, linestyle="none", label=label,
        )  # fmt: skip
    ax.axhline(0.0, color="0.6", lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens per unit (log)")
    ax.set_ylabel(f"paired accuracy difference vs {result['reference']} (± SE)")
    ax.set_title(f"{task}: egps ablations")
    ax.legend(fontsize="x-small", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    add_run_arguments(parser, seeds="2", out="runs/ablations", seeds_help="seeds 0 and 1 chose egps's defaults")
    parser.add_argument("--reference", default=None, help=f"point to compare against (default mh-steps{TRY_BUDGET})")
    parser.add_argument("--quick", action="store_true", help="tiny-gpt2, 3 problems, 4 points, 1 seed")
    args = parser.parse_args(argv)
    described = register()
    if args.quick:
        args.model, args.limit, args.seeds, args.max_new_tokens, args.batch = "tiny-gpt2", 3, "0", 8, 4
    axis_points = quick_points() if args.quick else default_points()
    axes_of = {p.label: a for a, p in axis_points}
    points, out = run_selected([p for _, p in axis_points], args)
    reference = args.reference or ("mh-steps2" if args.quick else f"mh-steps{TRY_BUDGET}")
    task_name = args.task.split(":")[0]
    result = report(points, out, reference)
    for label, entry in result["points"].items():
        entry["axis"] = axes_of[label]
        entry["description"] = described.get(entry["method"], ("", entry["method"]))[1]
    payload = {
        "benchmark": NAME,
        "task": args.task,
        "try_budget": TRY_BUDGET,
        "config": {k: getattr(args, k) for k in ("model", "limit", "seeds", "alpha", "max_new_tokens", "batch")},
        "environment": environment(),
        **result,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "ablations.json").write_text(json.dumps(payload, indent=2) + "\n")
    if result["points"]:
        table = markdown_table(result).splitlines()
        table[0] = "| axis " + table[0]
        table[1] = "|---" + table[1]
        table[2:] = [f"| {axes_of[line.split('|')[1].strip()]} {line}" for line in table[2:]]
        (out / "ablations.md").write_text("\n".join(table) + "\n")
        png = _plot(result, axes_of, task_name, out / f"ablations_{task_name}.png")
        copy_plots(args.docs, png)
    print(f"wrote {out / 'ablations.json'}")
    return payload


if __name__ == "__main__":
    run_cli(main, NAME)
