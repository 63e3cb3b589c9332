"""Choose a ``multistep`` difficulty for a model: low-temperature accuracy and answer length per level variant.

::

    python -m benchmarks.multistep_levels --task-seed 100 --problems 20 --variants default,steps34,small,both
    python -m benchmarks.multistep_levels --task-seed 0 --problems 50 --variants small,both   # the check

Each variant is a set of overrides of the multistep level (``egps_ppl.evals.tasks._MULTISTEP_LEVEL``); every
variant runs low temperature (α = 4, 192 new tokens) on the first ``--problems`` problems of seed
``--task-seed`` × run seeds 0 and 1, and reports accuracy, completion tokens and the share of completions of at
least 100 tokens. Choose on one task seed, check on another. Writes ``<out>/multistep_levels.json``.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, environment, run_cli, set_threads

NAME = "multistep_levels"
VARIANTS: dict[str, dict[str, Any]] = {
    "default": {},
    "steps34": {"steps": (3, 4)},
    "small": {"start": (3, 8), "add": (1, 3), "sub": 3, "bags": 0.0},  # = MULTISTEP_LEVELS["easy"]
    "both": {"steps": (3, 4), "start": (3, 8), "add": (1, 3), "sub": 3, "bags": 0.0},
}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task-seed", type=int, default=100)
    parser.add_argument("--problems", type=int, default=20)
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--batch", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS_DIR / NAME))
    args = parser.parse_args(argv)
    from egps_ppl.evals.methods import load_method
    from egps_ppl.evals.runner import evaluate_batched
    from egps_ppl.evals.tasks import MultiStepTask
    from egps_ppl.models.registry import load_model

    set_threads(args.threads)
    lm = load_model(args.model)
    method = load_method("low-temp", alpha=4.0)
    rows = []
    for name in args.variants.split(","):
        task = MultiStepTask(args.task_seed, size=args.problems, level=VARIANTS[name])
        todo = [(i, p, s) for s in (0, 1) for i, p in enumerate(task.problems())]
        started = time.perf_counter()
        records = list(evaluate_batched(task, method, lm, todo, batch=args.batch, max_new_tokens=192))
        n = len(records)
        rows.append({
            "variant": name, "overrides": VARIANTS[name], "task_seed": args.task_seed, "units": n,
            "accuracy": sum(r["correct"] for r in records) / n,
            "completion_tokens": sum(r["completion_tokens"] for r in records) / n,
            "share_at_least_100_tokens": sum(r["completion_tokens"] >= 100 for r in records) / n,
            "seconds": round(time.perf_counter() - started, 1),
        })  # fmt: skip
        print(json.dumps(rows[-1]), flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": NAME, "model": args.model, "variants": rows, "environment": environment()}
    (out / f"{NAME}_seed{args.task_seed}.json").write_text(json.dumps(payload, indent=2, default=list) + "\n")
    return payload


if __name__ == "__main__":
    run_cli(main, NAME)
