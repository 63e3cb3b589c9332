"""Fidelity to π on a real model: how far each sampler's answer distribution is from π's, against compute.

::

    python -m benchmarks.fidelity                       # SmolLM2-135M, 10 arithmetic problems
    python -m benchmarks.fidelity --quick --out /tmp/f  # tiny-gpt2, 2 problems (seconds; the tests)
    python -m benchmarks.fidelity --docs docs/benchmarks

Accuracy cannot tell sampling π from merely sharpening p. For each problem the **reference answer distribution
under π** is, by default (``--reference exact``), computed by certified best-first enumeration
(:func:`egps_ppl.analysis.enumeration.enumerate_power`): π's most probable completions are found until the mass
not yet found is provably at most ``--exact-tol`` of the total, so the reference is within that total variation
(TV) of π's true answer distribution; the bound reached is reported per problem, with **π's own accuracy** (the
reference's mass on correct answers). Two independent long runs are kept as a check of what sampling-based
references achieve (``--ref-chains 0`` / ``--ref-particles 0`` skip them):

* MCMC: ``--ref-chains`` MH chains of ``--ref-steps`` steps each from low-temperature starts (the answer of each
  chain's final state);
* Power-SMC: ``--ref-particles`` particles (the answers weighted by the final importance weights).

Their TV from each other and from the exact reference is reported per problem; with ``--reference runs`` their
average is the reference (the only choice for a backend without full next-token distributions). Each method then
runs ``--chains`` independent chains per problem at each budget, and the TV between the answer histogram of its
final states and the reference is plotted against decode tokens per chain. The answer is what the task grader
extracts (``None``: no answer). TVs carry Monte-Carlo noise from both sides: the noise floor of ``--chains``
samples from the reference itself is reported alongside (the expected TV of that many exact draws).

Alongside, the **mixing** comparison: for each MCMC method, ``--mix-chains`` chains per problem of
``--mix-steps`` steps recorded every step (the batched :class:`egps_ppl.infer.MCMC` runner, ArviZ export), giving
R-hat and bulk ESS of log p and of the indicator "answer = the reference's most likely answer", and bulk ESS
per 1,000 decode tokens.

Writes ``<out>/fidelity.json`` and ``<out>/fidelity.png``. Every stage (each reference run, each method at each
budget, each mixing run) is saved to ``<out>/fidelity_parts/`` as it finishes, with the settings it ran under;
rerunning the command reuses the stages whose settings match, so an interrupted run resumes.
"""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, copy_plots, environment, new_figure, run_cli, set_threads, write_results
from egps_ppl.cli.common import add_device_dtype_options

NAME = "fidelity"
METHODS = ("mh", "entropy-cut-mh", "egps", "egps-local")


def tv(p: dict[Any, float], q: dict[Any, float]) -> float:
    """Total variation between two distributions over answers (dicts of probabilities).

    Examples
    --------
    >>> tv({"1": 0.5, "2": 0.5}, {"1": 1.0})
    0.5
    """
    keys = set(p) | set(q)
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in keys)


def histogram(answers: list[Any], weights: list[float] | None = None) -> dict[Any, float]:
    """Normalised answer histogram (optionally weighted)."""
    weights = weights or [1.0] * len(answers)
    total = sum(weights)
    out: Counter = Counter()
    for a, w in zip(answers, weights, strict=True):
        out[str(a)] += w / total
    return dict(out)


def noise_floor(reference: dict[Any, float], n: int, reps: int = 400, seed: int = 0) -> float:
    """Mean TV between ``n`` exact draws from ``reference`` and ``reference`` itself."""
    rng = random.Random(seed)
    keys, probs = list(reference), list(reference.values())
    return float(np.mean([tv(histogram(rng.choices(keys, probs, k=n)), reference) for _ in range(reps)]))


def _answers(task: Any, lm: Any, problem: Any, seqs: Any) -> list[Any]:
    return [str(task.extract(lm.decode(seqs.row_tokens(r)))) for r in range(seqs.num_rows)]


def _stage(folder: Path, name: str, settings: dict[str, Any], compute: Any) -> Any:
    """``compute()``, or its saved value from an earlier run with the same ``settings`` (JSON in ``folder``)."""
    path = folder / f"{name}.json"
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") == settings:
            return saved["value"]
    value = compute()
    folder.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"settings": settings, "value": value}))
    tmp.replace(path)
    return value


def run(args: argparse.Namespace) -> dict[str, Any]:
    from benchmarks.exact_pi import enumeration_settings, exact_answer_distribution, reusable
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.infer import MCMCSampler
    from egps_ppl.infer.batched import Unit, run_units
    from egps_ppl.infer.smc import PowerSMC
    from egps_ppl.models.registry import load_model
    from egps_ppl.target import PowerDistribution

    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    task = load_task(args.task)
    problems = task.problems(args.problems)
    prompts = [task.build_prompt(p, lm) for p in problems]

    def chains_of(sampler: Any, seed: int) -> list[Any]:
        units = [Unit(i, prompts[i], 1000 * seed + i) for i in range(len(problems))]
        outs = {o.key: o for o in run_units(sampler, lm, units, args.alpha, args.max_new_tokens, args.batch)}
        return [outs[i] for i in range(len(problems))]

    parts = Path(args.out) / "fidelity_parts"
    common = {"model": args.model, "task": args.task, "problems": args.problems, "alpha": args.alpha,
              "max_new_tokens": args.max_new_tokens}  # fmt: skip

    def ref_mh_answers() -> list[list[str]]:
        sampler = MCMCSampler("mh", steps=args.ref_steps, num_chains=args.ref_chains, select="first")
        return [_answers(task, lm, p, o.result.samples) for p, o in zip(problems, chains_of(sampler, 1), strict=True)]

    def ref_smc_answers() -> list[dict[str, Any]]:
        outs = chains_of(PowerSMC(num_particles=args.ref_particles, check_every=args.ess_every), 2)
        return [
            {
                "answers": _answers(task, lm, p, o.result.samples),
                "weights": o.result.log_weights.exp().tolist(),
                "ess": float(o.result.extra["final_ess"]),
            }
            for p, o in zip(problems, outs, strict=True)
        ]

    reuse = {}  # lines of a benchmarks.exact_pi run with the same settings (--exact-from)
    if args.exact_from:
        wanted = enumeration_settings(model=args.model, task=args.task, alpha=args.alpha,
                                      max_new_tokens=args.max_new_tokens, tol=args.exact_tol,
                                      top_children=args.exact_top_children, dtype=args.dtype)  # fmt: skip
        for line in Path(args.exact_from).read_text().splitlines():
            row = json.loads(line)
            if reusable(row, wanted, args.exact_tol, args.exact_expansions):
                reuse[row["problem_id"]] = row

    def exact_reference(i: int) -> dict[str, Any]:
        if problems[i].id in reuse:
            return reuse[problems[i].id]
        row = exact_answer_distribution(
            task, lm, problems[i], prompts[i], args.alpha, args.max_new_tokens, tol=args.exact_tol,
            max_expansions=args.exact_expansions, batch=args.exact_batch, top_children=args.exact_top_children,
        )  # fmt: skip
        print(f"exact reference, problem {i}: bound {row['tv_bound']:.4f} after {row['expansions']} expansions, "
              f"{row['completions']} completions", flush=True)  # fmt: skip
        return row

    # Reference: certified enumeration, and (as a check, or the reference with --reference runs) long MH chains
    # and Power-SMC, independently.
    exact = None
    if args.reference == "exact":
        settings = {**common, "tol": args.exact_tol, "expansions": args.exact_expansions,
                    "top_children": args.exact_top_children}  # fmt: skip
        exact = [
            _stage(parts, f"reference-exact-{i}", {**settings, "problem": i}, lambda i=i: exact_reference(i))
            for i in range(len(problems))
        ]
    ref_mh = _stage(parts, "reference-mh", {**common, "chains": args.ref_chains, "steps": args.ref_steps},
                    ref_mh_answers) if args.ref_chains else None  # fmt: skip
    ref_smc = _stage(parts, "reference-smc", {**common, "particles": args.ref_particles, "ess_every": args.ess_every},
                     ref_smc_answers) if args.ref_particles else None  # fmt: skip
    per_problem = []
    for i, problem in enumerate(problems):
        mh_hist = histogram(ref_mh[i]) if ref_mh else None
        smc_hist = histogram(ref_smc[i]["answers"], ref_smc[i]["weights"]) if ref_smc else None
        if exact is not None:
            reference = exact[i]["marginal"]
        else:
            assert mh_hist is not None and smc_hist is not None  # checked in main
            reference = {k: 0.5 * (mh_hist.get(k, 0.0) + smc_hist.get(k, 0.0)) for k in set(mh_hist) | set(smc_hist)}
        row: dict[str, Any] = {
            "problem_id": problem.id,
            "reference_answer": problem.answer,
            "reference": reference,
            "noise_floor": round(noise_floor(reference, args.chains), 4),  # of a method's --chains draws
            "top_answer": max(reference, key=reference.get),
        }
        if exact is not None:
            row.update(
                pi_accuracy=round(exact[i]["pi_accuracy"], 4),
                exact_tv_bound=exact[i]["tv_bound"],
                exact_expansions=exact[i]["expansions"],
                exact_completions=exact[i]["completions"],
            )
        if mh_hist is not None:
            row.update(mh_vs_reference_tv=round(tv(mh_hist, reference), 4),
                       mh_noise_floor=round(noise_floor(reference, args.ref_chains), 4))  # fmt: skip
        if smc_hist is not None and ref_smc is not None:
            row.update(smc_vs_reference_tv=round(tv(smc_hist, reference), 4), smc_ess=round(ref_smc[i]["ess"], 1))
        if mh_hist is not None and smc_hist is not None:
            row["mh_vs_smc_tv"] = round(tv(mh_hist, smc_hist), 4)
        per_problem.append(row)
    # Each method at each budget: answer histogram of independent chains.
    curves: dict[str, list[dict[str, Any]]] = {}
    samplers: list[tuple[str, int | None, Any]] = [("low-temp", None, None)]
    samplers += [
        (m, s, MCMCSampler(m, steps=s, num_chains=args.chains, select="first"))
        for m in args.methods
        for s in args.budgets
    ]
    from egps_ppl.infer.samplers import LowTempSampler

    for name, steps, sampler in samplers:

        def method_answers(sampler: Any = sampler) -> list[dict[str, Any]]:
            outs = chains_of(sampler or LowTempSampler(n=args.chains), 3)
            return [
                {
                    "answers": _answers(task, lm, p, o.result.samples),
                    "decode_per_chain": float(o.result.cost.decode_tokens.sum()) / args.chains,
                }
                for p, o in zip(problems, outs, strict=True)
            ]

        label = name if steps is None else f"{name}-steps{steps}"
        runs = _stage(parts, f"curve-{label}", {**common, "chains": args.chains}, method_answers)
        tvs, decode = [], []
        for i in range(len(problems)):
            tvs.append(tv(histogram(runs[i]["answers"]), per_problem[i]["reference"]))
            decode.append(runs[i]["decode_per_chain"])
        curves.setdefault(name, []).append(
            {
                "steps": steps,
                "tv_mean": round(float(np.mean(tvs)), 4),
                "tv_se": round(float(np.std(tvs, ddof=1) / math.sqrt(len(tvs))), 4) if len(tvs) > 1 else None,
                "decode_tokens_per_chain": round(float(np.mean(decode)), 1),
                "tv_per_problem": [round(float(t), 4) for t in tvs],  # for paired comparisons
            }
        )
        print(f"{name:>15} steps {steps}: TV {curves[name][-1]['tv_mean']:.3f}", flush=True)
    # Mixing: recorded chains per method, R-hat and ESS from ArviZ.
    mixing: dict[str, Any] = {}
    for method in args.methods:
        rows = []
        for i, problem in enumerate(problems[: args.mix_problems]):
            top = per_problem[i]["top_answer"]
            settings = {**common, "chains": args.mix_chains, "steps": args.mix_steps, "top": top}
            target = PowerDistribution(lm, prompts[i], args.alpha, args.max_new_tokens)

            def mix(target: Any = target, method: str = method, problem: Any = problem, i: int = i) -> dict:
                return _mixing_row(task, lm, target, method, problem, i, per_problem[i]["top_answer"], args)

            rows.append(_stage(parts, f"mixing-{method}-{i}", settings, mix))
        ess_per_k = [1000 * r["ess_bulk_log_p"] / r["decode_tokens"] for r in rows if r["ess_bulk_log_p"] is not None]
        ans_per_k = [1000 * r["ess_bulk_answer"] / r["decode_tokens"] for r in rows if r["ess_bulk_answer"] is not None]
        mixing[method] = {
            "problems": rows,
            "ess_log_p_per_1k_decode": round(float(np.mean(ess_per_k)), 3) if ess_per_k else None,
            "ess_answer_per_1k_decode": round(float(np.mean(ans_per_k)), 3) if ans_per_k else None,
        }
    return {"problems": per_problem, "curves": curves, "mixing": mixing}


def _mixing_row(task: Any, lm: Any, target: Any, method: str, problem: Any, seed: int, top: str, args: Any) -> dict:
    """R-hat and bulk ESS of log p and of the answer indicator from ``--mix-chains`` recorded chains."""
    from egps_ppl.infer import MCMC
    from egps_ppl.kernels.presets import build_kernel

    mcmc = MCMC(
        build_kernel(method, target), num_samples=args.mix_steps, num_chains=args.mix_chains, seed=seed,
        progress=False,
    ).run()  # fmt: skip
    summary = mcmc.summary()
    tokens = mcmc.get_samples()["tokens"]  # [chain, draw, position]
    indicator = np.array(
        [[float(str(task.extract(lm.decode([t for t in draw if t >= 0]))) == top) for draw in chain]
         for chain in tokens]
    )  # fmt: skip
    return {
        "problem_id": problem.id,
        "rhat_log_p": _get(summary, "rhat", "log_p"),
        "ess_bulk_log_p": _get(summary, "ess_bulk", "log_p"),
        "ess_bulk_answer": _ess(indicator),
        "rhat_answer": _rhat(indicator),
        "decode_tokens": float(mcmc.total_cost().decode_tokens.sum()),
    }


def _get(summary: dict[str, Any], key: str, var: str) -> float | None:
    value = summary.get("variables", {}).get(var, {}).get(key)
    return None if value is None or not math.isfinite(float(value)) else round(float(value), 3)


def _ess(values: np.ndarray) -> float | None:
    from egps_ppl.diagnostics.arviz_export import az

    if np.all(values == values.flat[0]):
        return None  # a constant indicator has no defined ESS
    return round(float(az.ess(values, method="bulk")), 3)


def _rhat(values: np.ndarray) -> float | None:
    from egps_ppl.diagnostics.arviz_export import az

    if np.all(values == values.flat[0]):
        return None
    return round(float(az.rhat(values)), 3)


def plot(result: dict[str, Any], path: Path) -> Any:
    fig, axes = new_figure(1, 1, size=(7.0, 4.6))
    ax = axes[0, 0]
    for name, points in result["curves"].items():
        x = [p["decode_tokens_per_chain"] for p in points]
        y = [p["tv_mean"] for p in points]
        err = [p["tv_se"] or 0.0 for p in points]
        ax.errorbar(x, y, yerr=err, marker="o", capsize=3, label=name)
    floor = np.mean([p["noise_floor"] for p in result["problems"]])
    ax.axhline(floor, color="0.5", ls="--", lw=0.8, label="noise floor (exact draws from the reference)")
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens per chain (log)")
    ax.set_ylabel("TV of the answer distribution to π's")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", default="smollm2-135m")
    add_device_dtype_options(parser)
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--problems", type=int, default=10)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--reference",
        choices=("exact", "runs"),
        default="exact",
        help="exact: certified enumeration (default); runs: the average of the MH and SMC runs",
    )
    parser.add_argument("--exact-tol", type=float, default=0.01, help="certified TV bound the enumeration stops at")
    parser.add_argument("--exact-expansions", type=int, default=50_000, help="most prefixes expanded per problem")
    parser.add_argument("--exact-top-children", type=int, default=64, help="children generated per prefix")
    parser.add_argument("--exact-batch", type=int, default=64, help="prefixes followed together by the enumeration")
    parser.add_argument("--exact-from", default=None,
                        help="problems.jsonl of a benchmarks.exact_pi run to reuse")  # fmt: skip
    parser.add_argument("--ref-chains", type=int, default=32)
    parser.add_argument("--ref-steps", type=int, default=30)
    parser.add_argument("--ref-particles", type=int, default=64)
    parser.add_argument("--ess-every", type=int, default=8)
    parser.add_argument("--chains", type=int, default=16)
    parser.add_argument("--budgets", default="2,5,10")
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--mix-chains", type=int, default=4)
    parser.add_argument("--mix-steps", type=int, default=20)
    parser.add_argument("--mix-problems", type=int, default=10)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS_DIR))
    parser.add_argument("--docs", default=None)
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.problems, args.max_new_tokens = "tiny-gpt2", 2, 6
        args.ref_chains, args.ref_steps, args.ref_particles, args.chains = 8, 4, 8, 4
        args.budgets, args.methods, args.mix_steps, args.mix_problems = "1,2", "mh,egps", 4, 1
        # tiny-gpt2 is nearly uniform: no bound is reachable; one child per prefix finds the greedy completion.
        args.exact_expansions, args.exact_top_children = 48, 1
    if args.reference == "runs" and not (args.ref_chains and args.ref_particles):
        parser.error("--reference runs needs --ref-chains and --ref-particles above 0")
    args.budgets = [int(b) for b in args.budgets.split(",")]
    args.methods = args.methods.split(",")
    threads = set_threads(args.threads)
    result = run(args)
    config = {k: v for k, v in vars(args).items() if k not in ("out", "docs")}
    payload = {"benchmark": NAME, "config": {**config, "threads": threads}, "environment": environment(), **result}
    json_path, png_path = write_results(NAME, payload, args.out, plot(result, Path(args.out)))
    copy_plots(args.docs, png_path)
    print(f"wrote {json_path}")
    return json.loads(json_path.read_text())


if __name__ == "__main__":
    run_cli(main, NAME)
