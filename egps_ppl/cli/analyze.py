"""``egps analyze``: where π = p^α departs from p, position by position along completions, with plots.

Each completion to analyse is a *unit* ``(problem id, prompt text, prompt ids, completion ids or None, seed)``:
the prompts come from ``--task``, ``--prompt`` or ``--prompt-ids``; the completions from ``--completions`` or,
when none are given, from a sampler drawn as ``egps eval`` would (same seed per problem).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from typing import TYPE_CHECKING, Any, NamedTuple

from egps_ppl.cli.common import add_device_options, add_model_option, prompt_ids, set_threads
from egps_ppl.errors import EGPSError

if TYPE_CHECKING:
    from egps_ppl.analysis import DivergenceProfile
    from egps_ppl.evals.tasks import Task
    from egps_ppl.infer.samplers import Sampler
    from egps_ppl.models.base import LanguageModel

__all__ = ["Unit", "add_parser", "run"]

POSITIVE_INTS = ("max_new_tokens", "top_k", "rollouts", "positions_per_batch", "permutations", "samples")


class Unit(NamedTuple):
    """One completion to analyse."""

    problem_id: str
    prompt: str | None
    prompt_ids: list[int]
    completion_ids: list[int] | None
    seed: int


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``egps analyze`` to the ``egps`` subparsers."""
    an = subparsers.add_parser(
        "analyze", help="where pi = p^alpha departs from p: per-position divergence along completions, with plots"
    )
    add_model_option(an)
    source = an.add_mutually_exclusive_group()
    source.add_argument("--task", help="prompts of an eval task: arithmetic[:SEED], math500[:PATH.jsonl], jsonl:PATH")
    source.add_argument("--prompt", help="one prompt text (default: the built-in arithmetic demo question)")
    source.add_argument("--prompt-ids", help="one prompt as token ids, comma or space separated")
    an.add_argument("--limit", type=int, default=8, help="with --task: analyse the first N problems")
    an.add_argument("--samples", type=int, default=1, help="completions drawn per prompt (seeds SEED..SEED+N-1)")
    an.add_argument(
        "--chat", action=argparse.BooleanOptionalAction, default=None, help="encode prompts with the chat template"
    )
    an.add_argument("--alpha", type=float, default=4.0, help="the power alpha (> 0)")
    an.add_argument("--max-new-tokens", type=int, default=64, help="maximum completion length T")
    an.add_argument(
        "--estimator",
        default="myopic",
        choices=["exact", "myopic", "rollout"],
        help="exact (Markov models only), myopic (logits only, ignores the future), rollout (top-k x rollouts)",
    )
    an.add_argument("--top-k", type=int, default=8, help="rollout: candidates per position")
    an.add_argument("--rollouts", type=int, default=8, help="rollout: rollouts per candidate")
    an.add_argument("--horizon", type=int, default=32, help="rollout: tokens per rollout (0: to max-new-tokens)")
    an.add_argument("--positions-per-batch", type=int, default=8, help="rollout: positions evaluated together")
    an.add_argument(
        "--sampler", default="low-temp", help="how completions are drawn: plain, low-temp, or any `egps eval` method"
    )
    an.add_argument(
        "--completions", help="JSONL of completions to analyse instead: id lists, eval results.jsonl or profiles.jsonl"
    )
    an.add_argument("--fraction", type=float, default=0.1, help="share of positions counted as high-divergence")
    an.add_argument("--permutations", type=int, default=1000, help="shuffles of the clustering test")
    an.add_argument("--max-plots", type=int, default=12, help="profile plots for the first N completions")
    an.add_argument("--seed", type=int, default=0)
    add_device_options(an)
    an.add_argument("--out", required=True, help="folder for profiles.jsonl, summary.json and the plots")
    an.set_defaults(handler=run)
    return an


def run(args: argparse.Namespace) -> int:
    """Check the settings, build the units, profile each one, write the analysis and print its summary."""
    from egps_ppl.analysis import write_analysis
    from egps_ppl.errors import check_alpha, check_writable
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.infer.samplers import load_sampler
    from egps_ppl.models.markov import MarkovLM
    from egps_ppl.models.registry import load_model

    # Cheap checks first: bad settings fail before the model loads.
    alpha = check_alpha(args.alpha)
    _check_settings(args)
    check_writable(args.out, "--out", directory=True)
    try:
        task = load_task(args.task, chat=args.chat) if args.task else None
    except UnicodeDecodeError as exc:
        raise EGPSError(f"--task {args.task}: the file is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    sampler = load_sampler(args.sampler)
    given = _read_completion_lines(args.completions) if args.completions else None
    set_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.estimator == "exact" and not isinstance(lm, MarkovLM):
        raise EGPSError(f"--estimator exact needs a Markov model (markov:PATH.json), not {args.model!r}")
    units = _units(lm, args, task, given)
    profiles = [
        _profile(lm, args, alpha, sampler, unit, number, len(units)) for number, unit in enumerate(units, start=1)
    ]
    summary = write_analysis(
        profiles,
        args.out,
        _config(args, alpha, given is not None),
        fraction=args.fraction,
        num_permutations=args.permutations,
        seed=args.seed,
        max_plots=args.max_plots,
    )
    _print_summary(summary, len(profiles), args, alpha)
    print(f"analysis written to {args.out}")
    return 0


def _check_settings(args: argparse.Namespace) -> None:
    from egps_ppl.errors import check_positive_int

    for flag in POSITIVE_INTS:
        check_positive_int("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.horizon < 0 or args.limit < 0 or args.max_plots < 0:
        raise EGPSError("--horizon, --limit and --max-plots must be >= 0")
    if not 0 < args.fraction <= 1:
        raise EGPSError(f"--fraction must lie in (0, 1], got {args.fraction}")


def _horizon(args: argparse.Namespace) -> int | None:
    return None if args.horizon == 0 else args.horizon


def _profile(
    lm: LanguageModel,
    args: argparse.Namespace,
    alpha: float,
    sampler: Sampler,
    unit: Unit,
    number: int,
    total: int,
) -> DivergenceProfile:
    """The divergence profile of one unit (its completion drawn first when it has none), with a progress line."""
    import torch

    from egps_ppl.analysis import divergence_profile
    from egps_ppl.evals.runner import unit_seed
    from egps_ppl.target import PowerDistribution

    started = time.perf_counter()
    useed = unit_seed(unit.seed, unit.problem_id)
    target = PowerDistribution(lm, unit.prompt_ids, alpha, args.max_new_tokens)
    ids = unit.completion_ids
    if ids is None:  # same seed per problem as `egps eval`, so its completions can be reproduced
        drawn = sampler.run(target, torch.Generator().manual_seed(useed))
        ids = drawn.samples.row_tokens(drawn.chosen)
    meta = {
        "problem_id": unit.problem_id,
        "prompt": unit.prompt,
        "prompt_tokens": len(unit.prompt_ids),
        "completion": lm.decode(ids),
        "sampler": "file" if unit.completion_ids is not None else args.sampler,
        "seed": unit.seed,
        "unit_seed": useed,
    }
    profile = divergence_profile(
        target,
        ids,
        args.estimator,
        top_k=args.top_k,
        rollouts=args.rollouts,
        horizon=_horizon(args),
        positions_per_batch=args.positions_per_batch,
        generator=torch.Generator().manual_seed(unit_seed(unit.seed, f"{unit.problem_id}:rollout")),
        meta=meta,
    )
    profile.meta["wall_s"] = round(time.perf_counter() - started, 3)
    share = profile.summary(args.fraction, num_permutations=1)["top_share"]
    print(
        f"[{number}/{total}] {unit.problem_id} (seed {unit.seed}): {profile.length} tokens, "
        f"total D {profile.divergence.sum():.3f}, "
        f"top-{args.fraction:.0%} share {'n/a' if share is None else f'{share:.2f}'} "
        f"({profile.meta['wall_s']:.1f} s)",
        flush=True,
    )
    return profile


def _config(args: argparse.Namespace, alpha: float, from_file: bool) -> dict[str, Any]:
    import torch

    config = {
        "argv": sys.argv[1:],
        "model": args.model,
        "task": args.task,
        "alpha": alpha,
        "max_new_tokens": args.max_new_tokens,
        "estimator": args.estimator,
        "sampler": "file" if from_file else args.sampler,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    if args.estimator == "rollout":
        config.update(top_k=args.top_k, rollouts=args.rollouts, horizon=_horizon(args))
    return config


def _print_summary(summary: dict[str, Any], count: int, args: argparse.Namespace, alpha: float) -> None:
    pooled, clus = summary["pooled"], summary["pooled"]["clustering"]

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(
        f"{count} completions, {pooled['positions']} positions ({args.estimator}, alpha={alpha:g}): "
        f"top-{args.fraction:.0%} share {fmt(pooled['top_share'])}; mean run length {fmt(clus['mean_run_length'])} "
        f"vs shuffled {fmt(clus['shuffled_mean_run_length'])} (p = {fmt(clus['p_value'])}); "
        f"Spearman(D, H) {fmt(pooled['corr_entropy']['spearman'])}"
    )


def _read_completion_lines(path: str) -> list[tuple[str | None, list[int]]]:
    """``--completions`` lines: a JSON list of token ids, or an object with ``completion_ids`` (and optionally
    ``problem_id``), e.g. the ``results.jsonl`` of ``egps eval``, or a line of an earlier ``profiles.jsonl``.

    Two lines of the same problem and seed (a results file with a unit written twice) are refused: each would be
    counted as its own completion."""
    from egps_ppl.errors import read_text

    lines = [line for line in read_text(path, "--completions file").splitlines() if line.strip()]
    if not lines:
        raise EGPSError(f"--completions file {path} is empty")
    out: list[tuple[str | None, list[int]]] = []
    seen: dict[tuple[str, object], int] = {}
    for number, line in enumerate(lines, start=1):
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise EGPSError(f"--completions line {number} is not JSON") from None
        pid = None
        if isinstance(row, dict):
            meta = row.get("meta") if isinstance(row.get("meta"), dict) else {}
            pid = row.get("problem_id", meta.get("problem_id"))
            pid = None if pid is None else str(pid)
            if pid is not None:
                key = (pid, json.dumps(row.get("seed", meta.get("seed"))))
                if key in seen:
                    raise EGPSError(
                        f"--completions file {path}: line {number} repeats problem {pid!r} seed {key[1]} of line "
                        f"{seen[key]}; each (problem, seed) may appear once (remove the duplicate line)"
                    )
                seen[key] = number
            row = row.get("completion_ids", row.get("tokens"))
        if not isinstance(row, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise EGPSError(
                f"--completions line {number} must be a list of token ids or have 'completion_ids' (or 'tokens')"
            )
        out.append((pid, row))
    return out


def _units(
    lm: LanguageModel, args: argparse.Namespace, task: Task | None, given: list[tuple[str | None, list[int]]] | None
) -> list[Unit]:
    """Every completion to analyse: ``--samples`` seeds per prompt when they are drawn, one per file line when
    they are given (seeded with ``--seed``)."""
    prompts = _prompts(lm, args, task, given)
    if given is None:  # one unit per (prompt, seed), seeded as `egps eval --seeds` would
        return [Unit(pid, text, ids, None, args.seed + i) for pid, text, ids, _ in prompts for i in range(args.samples)]
    return [Unit(pid, text, ids, completion, args.seed) for pid, text, ids, completion in prompts]


def _prompts(
    lm: LanguageModel, args: argparse.Namespace, task: Task | None, given: list[tuple[str | None, list[int]]] | None
) -> list[tuple[str, str | None, list[int], list[int] | None]]:
    """``(problem id, prompt text, prompt ids, completion ids or None)`` for each completion to analyse."""
    from egps_ppl.evals.tasks import DEMO_QUESTION

    if task is None:
        ids = prompt_ids(lm, args)
        text = args.prompt
        if text is None and args.prompt_ids is None and ids:
            text = DEMO_QUESTION  # what prompt_ids encodes when no prompt is given
        if given is None:
            return [("prompt", text, ids, None)]
        return [(pid or f"line{i}", text, ids, completion) for i, (pid, completion) in enumerate(given[: args.limit])]
    if given is None:
        return [(p.id, p.prompt, task.build_prompt(p, lm), None) for p in task.problems(args.limit)]
    if all(pid is not None for pid, _ in given):
        by_id = {p.id: p for p in task.problems()}
        missing = sorted({pid for pid, _ in given if pid not in by_id})
        if missing:
            raise EGPSError(f"--completions names problems that {task.name} does not have: {missing[:5]}")
        pairs = [(by_id[pid], ids) for pid, ids in given[: args.limit]]
    else:
        problems = task.problems(min(args.limit, len(given)))
        pairs = [(p, ids) for p, (_, ids) in zip(problems, given, strict=False)]
    return [(p.id, p.prompt, task.build_prompt(p, lm), ids) for p, ids in pairs]
