"""How much of the decoding of ``k`` Multiple-Try tries is duplicated work (issue #10: "tries that share work").

::

    python -m benchmarks.try_sharing --task arithmetic --problems 30 --tries 4
    python -m benchmarks.try_sharing --quick --out /tmp/ts     # the test: tiny-gpt2

Tries drawn from one cut share their prefix; past the cut, try ``r``'s token at position ``t`` repeats another
try's work when their tokens from the cut up to ``t`` are identical (a KV trie would decode it once). For each
problem this draws a low-temperature start, samples a cut with the kernel's selector and ``k`` tries with its
proposal, and counts try tokens and distinct (cut, history) nodes. ``shared_share = 1 - nodes / try tokens`` is
the decode work a prefix-sharing backend could save. Proposals: ``egps``'s decision tries (first token at
temperature 1, the rest at 1/α, entropy-jump cuts) and plain suffix tries at 1/α from entropy-jump and uniform
cuts. Writes ``<out>/try_sharing.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from benchmarks.common import RESULTS_DIR, environment, run_cli, set_threads

NAME = "try_sharing"


def count_shared(tokens: Any, lengths: list[int], cut: int) -> tuple[int, int]:
    """``(try tokens, distinct histories)`` past ``cut`` of tries ``tokens[k, T]`` with their ``lengths``.

    Examples
    --------
    >>> import torch
    >>> count_shared(torch.tensor([[5, 1, 2], [5, 1, 3], [5, 4, 4]]), [3, 3, 2], cut=1)
    (5, 4)
    """
    total = distinct = 0
    for pos in range(cut, max(lengths)):
        alive = [r for r in range(len(lengths)) if lengths[r] > pos]
        total += len(alive)
        distinct += len({tuple(tokens[r, cut : pos + 1].tolist()) for r in alive})
    return total, distinct


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--task", default="arithmetic")
    parser.add_argument("--problems", type=int, default=30)
    parser.add_argument("--tries", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=4.0)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default=str(RESULTS_DIR / NAME))
    args = parser.parse_args(argv)
    if args.quick:
        args.model, args.problems, args.max_new_tokens = "tiny-gpt2", 2, 8
    import torch

    from egps_ppl.evals.tasks import load_task
    from egps_ppl.kernels.decision import DecisionSuffixProposal
    from egps_ppl.kernels.proposals import SuffixProposal
    from egps_ppl.kernels.sites import EntropyJumpSite, UniformSite, sample_sites
    from egps_ppl.models.policy import PowerPolicy
    from egps_ppl.models.registry import load_model
    from egps_ppl.target import PowerDistribution

    set_threads(args.threads)
    lm, task = load_model(args.model), load_task(args.task)
    hot = PowerPolicy(1.0)
    kinds = {
        "egps decision tries (first token T=1), entropy-jump cuts": (
            EntropyJumpSite(beta=4.0, floor=1e-3), lambda t: DecisionSuffixProposal(t.default_policy(), hot)
        ),
        "suffix tries at 1/alpha, entropy-jump cuts": (
            EntropyJumpSite(beta=4.0, floor=1e-3), lambda t: SuffixProposal(t.default_policy())
        ),
        "suffix tries at 1/alpha, uniform cuts": (UniformSite(), lambda t: SuffixProposal(t.default_policy())),
    }  # fmt: skip
    rows = {}
    for label, (site, proposal) in kinds.items():
        generator = torch.Generator().manual_seed(args.seed)
        total = distinct = 0
        for problem in task.problems(args.problems):
            target = PowerDistribution(lm, task.build_prompt(problem, lm), args.alpha, args.max_new_tokens)
            x, _ = target.sample_proposal(1, generator)
            cut = sample_sites(site.log_probs(x), generator)
            if int(cut[0]) < 0:
                continue
            tries = proposal(target).propose(target, x, cut, args.tries, generator).seqs
            t, d = count_shared(tries.tokens, tries.length.tolist(), int(cut[0]))
            total, distinct = total + t, distinct + d
        rows[label] = {"try_tokens": total, "distinct": distinct,
                       "shared_share": round(1 - distinct / total, 4) if total else None}  # fmt: skip
        print(label, rows[label], flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = {k: getattr(args, k) for k in ("model", "task", "problems", "tries", "alpha", "max_new_tokens", "seed")}
    payload = {"benchmark": NAME, "config": config, "kinds": rows, "environment": environment()}
    (out / f"{NAME}.json").write_text(json.dumps(payload, indent=2) + "\n")
    return payload


if __name__ == "__main__":
    run_cli(main, NAME)
