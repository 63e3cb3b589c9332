"""SmolLM2 arithmetic pilot for the EGPS design: does a kernel change the answer of the sample it starts from?

Run from the repository root (one torch thread; resumable, one JSON line per unit as soon as it is done)::

    python -m benchmarks.egps_pilot --methods mh,entropy-cut-mh,egps-local,egps --limit 20 --seeds 0,1 \\
        --out runs/egps_pilot/select
    python -m benchmarks.egps_pilot --summary runs/egps_pilot/select        # the table of a run directory

Every method of a unit starts from the same low-temperature sample: the generator is seeded with the unit seed
of ``egps eval`` (:func:`egps_ppl.evals.runner.unit_seed`), the start is ``target.sample_proposal(1, generator)``
(what ``MCMC`` draws), and ``steps`` kernel steps follow with the same generator. Each record holds the start's
answer and completion, the final answer, whether it is correct, whether it changed from the start, and the
decode and scored tokens of the kernel steps (the start's decode tokens are recorded separately; every method
pays them). The library is driven directly, so this does not depend on the evaluation CLI.

Methods are kernel specs of :func:`~egps_ppl.kernels.presets.build_kernel`, or the ablation variants in
:data:`VARIANTS` (``egps[w=0.25,k=2,a=1,g=1]``-style names built by :func:`variant`).
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from benchmarks.common import run_cli
from egps_ppl.kernels.presets import build_kernel, make_egps

ALPHA = 4.0


def variant(spec: str, target: Any, policy: Any) -> Any:
    """``egps[w=0.5,k=4,a=1,g=0,lk=8]``: :func:`~egps_ppl.kernels.presets.make_egps` with those settings
    (w: suffix_weight, k: suffix_tries, a: first_alpha, g: gamma, lk: local_tries)."""
    keys = {"w": "suffix_weight", "k": "suffix_tries", "a": "first_alpha", "g": "gamma", "lk": "local_tries"}
    body = re.fullmatch(r"egps\[(.*)\]", spec)
    if body is None:
        return build_kernel(spec, target, policy)
    settings: dict[str, Any] = {}
    for part in body.group(1).split(","):
        key, _, value = part.partition("=")
        number = float(value)
        settings[keys[key]] = int(number) if key in ("k", "lk") else number
    return make_egps(target, policy, name=spec, **settings)


def run_unit(lm: Any, task: Any, problem: Any, seed: int, method: str, steps: int, max_new: int) -> dict[str, Any]:
    """One (problem, seed, method) unit; see the module docstring."""
    from egps_ppl.evals.runner import unit_seed
    from egps_ppl.target import PowerDistribution

    useed = unit_seed(seed, problem.id)
    prompt = task.build_prompt(problem, lm)
    target = PowerDistribution(lm, prompt, ALPHA, max_new)
    generator = torch.Generator().manual_seed(useed)
    tic = time.perf_counter()
    state, start_cost = target.sample_proposal(1, generator)
    start_ids = state.row_tokens(0)
    kernel = variant(method, target, target.default_policy())
    decode = scored = 0
    accepted = 0
    trajectory = []  # (decode tokens so far, answer) after every step: the answer at matched decode tokens
    for _ in range(steps):
        state, info = kernel.step(state, generator)
        decode += int(info.decode_tokens.sum())
        scored += int(info.scored_tokens.sum())
        accepted += int(info.accepted.sum())
        trajectory.append([decode, task.extract(lm.decode(state.row_tokens(0)))])
    ids = state.row_tokens(0)
    text, start_text = lm.decode(ids), lm.decode(start_ids)
    grade, start_grade = task.grade(problem, text), task.grade(problem, start_text)
    answer, start_answer = task.extract(text), task.extract(start_text)
    return {
        "problem_id": problem.id,
        "seed": seed,
        "unit_seed": useed,
        "method": method,
        "steps": steps,
        "start_answer": start_answer,
        "start_correct": bool(start_grade.correct),
        "answer": answer,
        "correct": bool(grade.correct),
        "answer_changed": answer != start_answer,
        "completion_changed": ids != start_ids,
        "start_decode_tokens": int(start_cost.decode_tokens.sum()),
        "decode_tokens": decode,
        "scored_tokens": scored,
        "accepted_steps": accepted,
        "log_p": float(state.log_p()[0]),
        "trajectory": trajectory,
        "wall_s": round(time.perf_counter() - tic, 2),
        "completion": text,
        "start_completion": start_text,
    }


def answer_at(row: dict[str, Any], budget: float) -> str | None:
    """The unit's answer after its last step within ``budget`` decode tokens (the start's before any step)."""
    answer = row["start_answer"]
    for spent, step_answer in row.get("trajectory", []):
        if spent > budget:
            break
        answer = step_answer
    return answer


def summarize(rows: list[dict[str, Any]], matched: float | None = None) -> list[dict[str, Any]]:
    """Per method: units, share of answers changed from the start, accuracy (and of the starts), tokens; with
    ``matched``, also the share changed within that many decode tokens (units with a per-step trajectory)."""
    out = []
    for method in dict.fromkeys(r["method"] for r in rows):
        mine = [r for r in rows if r["method"] == method]
        n = len(mine)

        def mean(key: str, rows: list[dict[str, Any]] = mine) -> float:
            return sum(float(r[key]) for r in rows) / len(rows)

        changed = mean("answer_changed")
        out.append(
            {
                "method": method,
                "units": n,
                "answer_changed": changed,
                "answer_changed_se": math.sqrt(changed * (1 - changed) / n) if n > 1 else float("nan"),
                "accuracy": mean("correct"),
                "start_accuracy": mean("start_correct"),
                "decode_tokens": mean("decode_tokens"),
                "scored_tokens": mean("scored_tokens"),
                "wall_s": mean("wall_s"),
            }
        )
        traced = [r for r in mine if "trajectory" in r]
        if matched is not None and traced:
            out[-1]["matched"] = matched
            out[-1]["matched_units"] = len(traced)
            out[-1]["answer_changed_at_matched"] = sum(
                answer_at(r, matched) != r["start_answer"] for r in traced
            ) / len(traced)
    return out


STORED = {"mh": "arithmetic-mh", "entropy-cut-mh": "arithmetic-entropy-cut-mh", "egps-local": "arithmetic-egps"}
"""The committed ``egps eval`` runs (docs/evals/, 30 problems x seeds 0, 1, 10 steps) of the baselines; their
``egps`` was today's ``egps-local``. ``arithmetic-low-temp`` holds the starts (the same unit seeds)."""


def stored_rows(root: Path, offset: int, limit: int, seeds: Sequence[int]) -> list[dict[str, Any]]:
    """The committed baseline runs as pilot records: the start is the low-temperature run's unit (the same
    sample: same unit seed), and the decode tokens of the steps are the run's minus the start's."""
    ids = {f"arithmetic-0-{i}" for i in range(offset, offset + limit)}

    def load(name: str) -> dict[tuple[str, int], dict[str, Any]]:
        rows = [json.loads(line) for line in (root / name / "results.jsonl").read_text().splitlines() if line]
        return {(r["problem_id"], r["seed"]): r for r in rows if r["problem_id"] in ids and r["seed"] in seeds}

    starts = load("arithmetic-low-temp")
    out = []
    for method, name in STORED.items():
        for key, r in load(name).items():
            start = starts[key]
            out.append(
                {
                    "problem_id": key[0],
                    "seed": key[1],
                    "method": f"{method} (stored)",
                    "start_answer": start["answer"],
                    "start_correct": start["correct"],
                    "answer": r["answer"],
                    "correct": r["correct"],
                    "answer_changed": r["answer"] != start["answer"],
                    "decode_tokens": r["decode_tokens"] - start["decode_tokens"],
                    "scored_tokens": r["scored_tokens"] - start["scored_tokens"],
                    "wall_s": r["wall_s"],
                }
            )
    return out


def read_rows(path: Path) -> list[dict[str, Any]]:
    file = path / "results.jsonl"
    if not file.exists():
        return []
    rows = []
    for line in file.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by a kill
            continue
    return rows


def table(summary: list[dict[str, Any]]) -> str:
    lines = [
        "| method | units | answer changed from start | accuracy (start) | decode tok/unit | scored tok/unit "
        "| wall s/unit |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in summary:
        lines.append(
            f"| {s['method']} | {s['units']} | {s['answer_changed']:.2f} ± {s['answer_changed_se']:.2f} | "
            f"{s['accuracy']:.2f} ({s['start_accuracy']:.2f}) | {s['decode_tokens']:.0f} | "
            f"{s['scored_tokens']:.0f} | {s['wall_s']:.1f} |"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.egps_pilot", description=__doc__.splitlines()[0])
    parser.add_argument("--methods", default="mh,entropy-cut-mh,egps-local,egps")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--limit", type=int, default=20)
    parser.add_argument("--offset", type=int, default=0, help="skip the first problems")
    parser.add_argument("--seeds", default="0,1")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--out", default="runs/egps_pilot/select")
    parser.add_argument("--matched", type=float, default=None, help="also tabulate answers at this many decode tokens")
    parser.add_argument("--summary", default=None, help="print the table of this run directory and exit")
    parser.add_argument("--stored", default=None, help="with --summary: add the committed runs under this folder")
    args = parser.parse_args(argv)
    if args.summary:
        rows = read_rows(Path(args.summary))
        if args.stored:
            seeds = [int(x) for x in args.seeds.split(",")]
            rows = stored_rows(Path(args.stored), args.offset, args.limit, seeds) + rows
        summary = summarize(rows, args.matched)
        print(table(summary))
        for s in summary:
            if "matched" in s:
                print(
                    f"{s['method']}: answer changed within {s['matched']:.0f} decode tokens in "
                    f"{s['answer_changed_at_matched']:.2f} of {s['matched_units']} units"
                )
        return
    torch.set_num_threads(1)
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.registry import load_model

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    done = {(r["problem_id"], r["seed"], r["method"]) for r in read_rows(out)}
    config = {k: v for k, v in vars(args).items() if k != "summary"}
    (out / "config.json").write_text(json.dumps({**config, "alpha": ALPHA, "command": sys.argv}, indent=1))
    task = load_task(args.task)
    problems = task.problems(args.offset + args.limit)[args.offset :]
    lm = load_model("smollm2-135m")
    methods = [m.strip() for m in args.methods.split(";" if ";" in args.methods else ",") if m.strip()]
    with (out / "results.jsonl").open("a") as sink:
        for method in methods:
            for seed in [int(s) for s in args.seeds.split(",")]:
                for problem in problems:
                    if (problem.id, seed, method) in done:
                        continue
                    row = run_unit(lm, task, problem, seed, method, args.steps, args.max_new_tokens)
                    sink.write(json.dumps(row) + "\n")
                    sink.flush()
                    print(
                        f"{method} {problem.id} s{seed}: {row['start_answer']} -> {row['answer']} "
                        f"({'ok' if row['correct'] else 'x'}) {row['decode_tokens']} dec {row['wall_s']} s",
                        flush=True,
                    )
    print(table(summarize(read_rows(out))))


if __name__ == "__main__":
    run_cli(main, "egps_pilot")
