"""How much of a real completion is deterministic: the entropy mass of its blocks (issue #10, block skipping).

::

    python -m benchmarks.block_entropy docs/evals/frontier/multistep-easy-0/low-temp --docs docs/benchmarks
    python -m benchmarks.block_entropy RUN_DIR --quick           # the test: tiny-gpt2, a few records

EGPS's entropy-adaptive block schedule (:class:`egps_ppl.infer.schedule.EntropyAdaptiveSchedule`) gives a block
no kernel steps when its entropy mass ``M = Σ_t H_t`` (nats, the base model's Shannon entropy at each position)
is below ``epsilon`` (0.05 by default), and ``ceil(2 M)`` steps (capped) otherwise. Skipping saves compute only
if real completions have such blocks. This rescored the completions of an evaluation run directory (its
``completion_ids`` after each problem's prompt) and reports, per block size, the share of blocks under
``epsilon``, the median block mass and the steps the schedule would give, plus the share of positions whose own
entropy is under ``epsilon`` and the share of the entropy mass in the top 10% of positions.

Writes ``<out>/block_entropy.json`` and ``block_entropy.png`` (the distribution of block masses).
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.common import RESULTS_DIR, copy_plots, environment, new_figure, run_cli, set_threads

NAME = "block_entropy"
BLOCKS = (8, 16, 32, 48)
EPSILON = 0.05


def block_masses(entropy: np.ndarray, block: int) -> np.ndarray:
    """Entropy mass of consecutive blocks of ``block`` positions (the last one may be shorter).

    Examples
    --------
    >>> block_masses(np.array([0.0, 0.5, 1.0, 0.0, 0.25]), 2).tolist()
    [0.5, 1.0, 0.25]
    """
    n = len(entropy)
    return np.array([float(entropy[i : i + block].sum()) for i in range(0, n, block)])


def completion_entropies(
    run_dir: Path, model: str | None = None, limit: int | None = None, batch: int = 16
) -> list[np.ndarray]:
    """Per-position base-model entropies along each recorded completion of an ``egps eval`` run directory."""
    import torch

    from egps_ppl.evals.store import read_results
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.policy import PowerPolicy
    from egps_ppl.models.registry import load_model

    config = json.loads((run_dir / "config.json").read_text())
    lm = load_model(model or config["model"])
    task = load_task(config["task"])
    problems = {p.id: p for p in task.problems()}
    records = [r for r in read_results(run_dir / "results.jsonl") if r.get("completion_ids")][:limit]
    out = []
    for lo in range(0, len(records), batch):  # one teacher-forced forward pass per batch of completions
        chunk = [(r, r["completion_ids"]) for r in records[lo : lo + batch]]
        prompts = [task.build_prompt(problems[r["problem_id"]], lm) for r, _ in chunk]
        lengths = [len(ids) for _, ids in chunk]
        seqs = lm.start(prompts, len(chunk), max(lengths), PowerPolicy(1.0))
        tokens = seqs.tokens.clone()
        for row, (_, ids) in enumerate(chunk):
            tokens[row, : len(ids)] = torch.tensor(ids, device=tokens.device)
        seqs = seqs.with_(tokens=tokens, length=torch.tensor(lengths, device=tokens.device))
        scored, _ = lm.score(seqs, torch.zeros(len(chunk), dtype=torch.long, device=tokens.device))
        out += [scored.entropy[row, :n].double().cpu().numpy() for row, n in enumerate(lengths)]
    return out


def summarize(entropies: list[np.ndarray], blocks: tuple[int, ...] = BLOCKS, epsilon: float = EPSILON) -> dict:
    """Shares of deterministic blocks and positions over all completions (see the module docstring)."""
    flat = np.concatenate(entropies) if entropies else np.zeros(0)
    top = []
    for h in entropies:
        k = max(1, math.ceil(0.1 * len(h)))
        total = h.sum()
        if total > 0:
            top.append(float(np.sort(h)[::-1][:k].sum() / total))
    per_block = {}
    for b in blocks:
        masses = np.concatenate([block_masses(h, b) for h in entropies]) if entropies else np.zeros(0)
        steps = np.where(masses < epsilon, 0, np.minimum(40, np.ceil(2.0 * masses)))
        per_block[str(b)] = {
            "blocks": int(masses.size),
            "share_below_epsilon": round(float((masses < epsilon).mean()), 4) if masses.size else None,
            "median_mass": round(float(np.median(masses)), 4) if masses.size else None,
            "mean_adaptive_steps": round(float(steps.mean()), 3) if masses.size else None,
        }
    return {
        "completions": len(entropies),
        "positions": int(flat.size),
        "mean_length": round(float(flat.size / max(1, len(entropies))), 1),
        "mean_entropy_mass": round(float(flat.sum() / max(1, len(entropies))), 3),
        "share_positions_below_epsilon": round(float((flat < epsilon).mean()), 4) if flat.size else None,
        "top10_share_of_mass": round(float(np.mean(top)), 4) if top else None,
        "blocks": per_block,
        "epsilon": epsilon,
    }


def _plot(entropies: list[np.ndarray], path: Path, title: str) -> Path:
    fig, axes = new_figure(1, 1, size=(6.6, 4.2))
    ax = axes[0, 0]
    for b in BLOCKS:
        masses = np.sort(np.concatenate([block_masses(h, b) for h in entropies]))
        ax.plot(np.maximum(masses, 1e-4), np.arange(1, masses.size + 1) / masses.size, label=f"{b}-token blocks")
    ax.axvline(EPSILON, color="0.5", ls="--", lw=0.8, label=f"ε = {EPSILON}")
    ax.set_xscale("log")
    ax.set_xlabel("block entropy mass (nats, log)")
    ax.set_ylabel("share of blocks at or below")
    ax.set_title(title)
    ax.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", help="egps eval run directories (their completions are rescored)")
    parser.add_argument("--model", default=None, help="default: the run's model")
    parser.add_argument("--limit", type=int, default=None, help="completions per run")
    parser.add_argument("--quick", action="store_true", help="tiny-gpt2, 4 completions per run")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", default=str(RESULTS_DIR / NAME))
    parser.add_argument("--docs", default=None, help="copy the plot into this folder")
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.limit = "tiny-gpt2", 4
    set_threads(args.threads)
    runs = {}
    everything: list[np.ndarray] = []
    for run in args.runs:
        entropies = completion_entropies(Path(run), args.model, args.limit)
        runs[run] = summarize(entropies)
        everything += entropies
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"benchmark": NAME, "runs": runs, "environment": environment()}
    (out / f"{NAME}.json").write_text(json.dumps(payload, indent=2) + "\n")
    png = _plot(everything, out / f"{NAME}.png", "entropy mass of completion blocks")
    copy_plots(args.docs, png)
    print(json.dumps(runs, indent=2))
    return payload


if __name__ == "__main__":
    run_cli(main, NAME)
