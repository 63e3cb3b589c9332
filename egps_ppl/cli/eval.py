"""``egps eval``: one sampling method on one task, one JSON line per (problem, seed), locally or on Ray."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from egps_ppl.cli.common import add_device_options, add_model_option, set_threads
from egps_ppl.errors import EGPSError

__all__ = ["add_parser", "parse_seeds", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``egps eval`` to the ``egps`` subparsers."""
    ev = subparsers.add_parser("eval", help="evaluate a sampling method on a task; one JSON line per (problem, seed)")
    ev.add_argument(
        "--task",
        required=True,
        help="arithmetic[:SEED], multistep[:SEED], math500[:PATH.jsonl|:hub], humaneval, gpqa:PATH.csv, jsonl:PATH",
    )
    add_model_option(ev)
    ev.add_argument(
        "--method",
        required=True,
        help="plain, low-temp, best-of-n, smc, sps, mh, entropy-mh, mtm, egps, or a kernel spec such as cycle(mh,egps)",
    )
    ev.add_argument("--alpha", type=float, default=4.0, help="the power alpha (low-temp samples at 1/alpha)")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="maximum completion length T")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N problems (default: all)")
    ev.add_argument("--seeds", default="0", help="comma-separated run seeds; the SE of accuracy is over seeds")
    ev.add_argument("--seed-offset", type=int, default=0, help="add this to every seed in --seeds")
    ev.add_argument("--num-chains", type=int, default=1, help="MCMC chains per problem (answer: best final state)")
    ev.add_argument("--steps", type=int, default=10, help="MCMC kernel steps per chain")
    ev.add_argument("--n", type=int, default=8, help="samples of best-of-n")
    ev.add_argument("--particles", type=int, default=64, help="particles of smc")
    ev.add_argument("--ess-every", type=int, default=64, help="smc: tokens between ESS checks (resampling)")
    ev.add_argument("--top-k", type=int, default=8, help="sps: candidates per step")
    ev.add_argument("--rollouts", type=int, default=8, help="sps: rollouts per candidate")
    ev.add_argument("--horizon", type=int, default=192, help="sps: rollout horizon in tokens (0: to the end)")
    ev.add_argument("--block-size", type=int, default=None, help="MCMC: grow B tokens per block (Karan & Du)")
    ev.add_argument("--steps-per-block", type=int, default=10, help="MCMC: kernel steps after each block")
    ev.add_argument("--adaptive", action="store_true", help="with --block-size: entropy-adaptive moves per block")
    ev.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="encode prompts with the chat template; --no-chat: raw (default: the task's choice; math500, gpqa and "
        "jsonl use the template of an instruct/chat model)",
    )
    ev.add_argument(
        "--batch",
        type=int,
        default=32,  # = egps_ppl.evals.runner.DEFAULT_BATCH (not imported here: keeps `egps --help` light)
        help="units (problem x seed) in flight at once, refilled as they finish (every built-in method, sps and "
        "--block-size included); records do not depend on it",
    )
    ev.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished units")
    ev.add_argument(
        "--wait",
        action="store_true",
        help="when another egps eval is writing --out, wait for it to finish instead of failing (then --resume)",
    )
    ev.add_argument(
        "--ray",
        nargs="?",
        const="local",
        default=None,
        metavar="ADDRESS",
        help="shard problems x seeds over Ray actors (one model each): a local cluster, or join ADDRESS "
        "(auto, HOST:6379, ray://HOST:10001); see docs/ray.md",
    )
    ev.add_argument(
        "--ray-workers", type=int, default=None, help="Ray actors (default: as many as the cluster's CPUs/GPUs allow)"
    )
    ev.add_argument("--ray-cpus-per-worker", type=float, default=1.0, help="CPUs per Ray actor (its torch threads)")
    ev.add_argument("--ray-gpus-per-worker", type=float, default=0.0, help="GPUs per Ray actor (with --device cuda)")
    ev.add_argument("--ray-retries", type=int, default=2, help="retries of a unit whose Ray actor died")
    add_device_options(ev)
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    ev.add_argument("--out", required=True, help="run directory (results.jsonl, summary.json, a plot)")
    ev.set_defaults(handler=run)
    return ev


def parse_seeds(text: str, offset: int = 0) -> list[int]:
    """The run seeds of ``--seeds`` (comma or space separated), each plus ``offset``.

    Raises
    ------
    EGPSError
        For text that is not a list of integers, or an empty list.
    """
    try:
        seeds = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise EGPSError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise EGPSError("--seeds is empty; pass e.g. --seeds 0,1")
    return [s + offset for s in seeds]


def _method_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The sampler settings of the command line (each method takes the ones it knows)."""
    return {
        "steps": args.steps,
        "num_chains": args.num_chains,
        "n": args.n,
        "particles": args.particles,
        "ess_every": args.ess_every,
        "top_k": args.top_k,
        "rollouts": args.rollouts,
        "horizon": args.horizon or None,
        "block_size": args.block_size,
        "steps_per_block": args.steps_per_block,
        "adaptive": args.adaptive,
    }


def _say_waiting(out: Any) -> Any:
    def say(holder: str) -> None:
        print(f"egps: {out} is being written by another egps eval ({holder}); waiting for it", file=sys.stderr)

    return say


def _check_memory(method: Any, args: argparse.Namespace) -> None:
    """Refuse chains (particles, samples) that cannot fit in memory, before the model loads."""
    from egps_ppl.errors import chain_memory, check_memory

    config = method.config()
    rows = max(int(config.get(k) or 1) for k in ("num_chains", "particles", "n"))
    needed, explanation = chain_memory(rows, args.max_new_tokens, draws=1)
    check_memory(needed, f"{method.name} with {rows} chains of {args.max_new_tokens} tokens", explanation, args.device)


def run(args: argparse.Namespace) -> int:
    """Check the settings, load the task and method (before the model), evaluate and print the accuracy."""
    from egps_ppl.evals.methods import load_method
    from egps_ppl.evals.store import check_out_dir, check_resume, lock_run_dir
    from egps_ppl.evals.tasks import load_task

    seeds = parse_seeds(args.seeds, args.seed_offset)
    if args.limit is not None and args.limit < 0:
        raise EGPSError(f"--limit must be >= 0, got {args.limit}")
    if args.max_new_tokens < 1:
        raise EGPSError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch < 1:
        raise EGPSError(f"--batch must be >= 1, got {args.batch}")
    # Cheap checks first: a bad task, method or --out fails before the model loads.
    try:
        task = load_task(args.task, chat=args.chat)
    except UnicodeDecodeError as exc:
        raise EGPSError(f"--task {args.task}: the file is not UTF-8 text (byte {exc.start}: {exc.reason})") from None
    method = load_method(args.method, alpha=args.alpha, **_method_settings(args))
    _check_memory(method, args)
    out = check_out_dir(args.out, args.resume)
    run_config = {"argv": sys.argv[1:], "device": args.device, "dtype": args.dtype}
    if args.resume:
        check_resume(out, task, method, max_new_tokens=args.max_new_tokens, config=run_config)
    common = {
        "resume": args.resume,
        "progress": args.progress,
        "max_new_tokens": args.max_new_tokens,
        "config": run_config,
    }
    # One writer per run directory, from before the model loads to the summary (the store's plan nests in it).
    with lock_run_dir(out, wait=args.wait, on_wait=_say_waiting(out)):
        if args.ray is not None:
            from egps_ppl.evals.ray_runner import evaluate_ray

            # The driver never loads the model: each Ray actor loads its own copy.
            summary = evaluate_ray(
                task,
                method,
                args.model,
                seeds,
                args.limit,
                args.out,
                **common,
                address=args.ray,
                num_workers=args.ray_workers,
                cpus_per_worker=args.ray_cpus_per_worker,
                gpus_per_worker=args.ray_gpus_per_worker,
                device=args.device,
                dtype=args.dtype,
                threads=args.threads,
                max_retries=args.ray_retries,
                batch=args.batch,
            )
        else:
            from egps_ppl.evals.runner import evaluate
            from egps_ppl.models.registry import load_model

            set_threads(args.threads)
            lm = load_model(args.model, device=args.device, dtype=args.dtype)
            summary = evaluate(task, method, lm, seeds, args.limit, args.out, **common, batch=args.batch)
    acc, se = summary["accuracy"], summary["accuracy_se"]
    accuracy = "n/a" if acc is None else f"{acc:.3f}" + (f" ± {se:.3f}" if se is not None else "")
    cost = summary["mean_decode_tokens"]
    print(
        f"{method.name} on {task.name}: accuracy {accuracy} over seeds {','.join(map(str, seeds))} "
        f"({summary['n_problems']} problems, {summary['n_results']} results); "
        f"decode tokens/problem {0 if cost is None else cost:.1f}"
    )
    print(f"results in {args.out}")
    for warning in summary.get("warnings", []):
        print(f"egps: warning: {warning}", file=sys.stderr)
    return 0
