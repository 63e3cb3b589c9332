"""The ``egps`` command: ``egps sample``, ``egps models``, ``egps eval``, ``egps report`` and ``egps analyze``."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from egps_ppl.errors import EGPSError

DEFAULT_MODEL = "smollm2-135m"
THREADS_HELP = "CPU threads for torch (default: half the cores, at least 1)"


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads. The default leaves half the cores free: with every core busy, one other
    process on the machine makes torch's spinning threads 20x slower (measured with SmolLM2 on 2 cores)."""
    import os

    import torch

    if threads is None:
        threads = max(1, (os.cpu_count() or 2) // 2)
    if threads < 1:
        raise EGPSError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with a one-line message)."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except EGPSError as exc:
        print(f"egps: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("egps: interrupted", file=sys.stderr)
        return 130


# ---------------------------------------------------------------- parsers
def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="egps", description="Power sampling from language models with MCMC.")
    sub = parser.add_subparsers(dest="command", required=True)

    sample = sub.add_parser("sample", help="sample completions from p(x|prompt)^alpha and write an ArviZ file")
    sample.add_argument("--model", default=DEFAULT_MODEL, help="registry name, local path, hub id or markov:PATH.json")
    prompt = sample.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help="prompt text (default: the built-in arithmetic demo question)")
    prompt.add_argument("--prompt-ids", help="prompt as token ids, comma or space separated")
    sample.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the model's chat template (default: only for the demo question)",
    )
    sample.add_argument("--alpha", type=float, default=4.0, help="the power alpha (> 0; papers use 4)")
    sample.add_argument("--max-new-tokens", type=int, default=48, help="maximum completion length T")
    sample.add_argument(
        "--kernel",
        default="mh",
        help="mh, entropy-mh, entropy-cut-mh, mtm, egps, cycle(K1,K2,...), mixture(K1:w1,K2:w2,...)",
    )
    sample.add_argument("--num-chains", type=int, default=4)
    sample.add_argument("--num-samples", type=int, default=10)
    sample.add_argument("--warmup", type=int, default=10)
    sample.add_argument("--thin", type=int, default=1)
    sample.add_argument("--block-size", type=int, default=None, help="grow B tokens per block (Karan & Du)")
    sample.add_argument("--steps-per-block", type=int, default=10, help="kernel steps after each block")
    sample.add_argument(
        "--adaptive",
        action="store_true",
        help="with --block-size: skip deterministic blocks and spend moves in proportion to entropy mass",
    )
    sample.add_argument("--top-k", type=int, default=None, help="truncate the proposal to the top k tokens")
    sample.add_argument("--top-p", type=float, default=None, help="truncate the proposal to nucleus mass p")
    sample.add_argument("--init", help="JSONL file: line i is the list of completion token ids starting chain i")
    sample.add_argument("--seed", type=int, default=0)
    sample.add_argument("--device", default="cpu")
    sample.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    sample.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    sample.add_argument("--out", default="runs/sample.nc", help="ArviZ NetCDF file to write")
    sample.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    sample.add_argument("--show", type=int, default=3, help="how many chains' final completions to print")
    sample.set_defaults(handler=_cmd_sample)

    models = sub.add_parser("models", help="list the models that need no download")
    models.set_defaults(handler=_cmd_models)

    ev = sub.add_parser("eval", help="evaluate a sampling method on a task; one JSON line per (problem, seed)")
    ev.add_argument(
        "--task",
        required=True,
        help="arithmetic[:SEED], math500[:PATH.jsonl|:hub], humaneval, gpqa:PATH.csv, jsonl:PATH",
    )
    ev.add_argument("--model", default=DEFAULT_MODEL, help="registry name, local path, hub id or markov:PATH.json")
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
        help="encode prompts with the chat template (default: the task's own choice)",
    )
    ev.add_argument("--resume", action="store_true", help="continue the run in --out, skipping finished units")
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
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    ev.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    ev.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    ev.add_argument("--out", required=True, help="run directory (results.jsonl, summary.json, a plot)")
    ev.set_defaults(handler=_cmd_eval)

    report = sub.add_parser("report", help="render several eval runs side by side (Markdown table and PNG)")
    report.add_argument("runs", nargs="+", metavar="DIR", help="egps eval --out directories")
    report.add_argument("--out", default=None, help="Markdown file to write (default: print the table)")
    report.add_argument("--plot", default=None, help="PNG of accuracy vs decode tokens (default: --out with .png)")
    report.set_defaults(handler=_cmd_report)

    an = sub.add_parser(
        "analyze", help="where pi = p^alpha departs from p: per-position divergence along completions, with plots"
    )
    an.add_argument("--model", default=DEFAULT_MODEL, help="registry name, local path, hub id or markov:PATH.json")
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
    an.add_argument("--device", default="cpu")
    an.add_argument("--threads", type=int, default=None, help=THREADS_HELP)
    an.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    an.add_argument("--out", required=True, help="folder for profiles.jsonl, summary.json and the plots")
    an.set_defaults(handler=_cmd_analyze)
    return parser


# ---------------------------------------------------------------- commands
def _cmd_models(args: argparse.Namespace) -> int:
    from egps_ppl.models.registry import available_models

    for name, description in available_models():
        print(f"{name:<20} {description}")
    return 0


def _cmd_sample(args: argparse.Namespace) -> int:
    import torch

    from egps_ppl.diagnostics import format_summary, save_netcdf, summarize
    from egps_ppl.infer import MCMC, make_schedule
    from egps_ppl.kernels.presets import build_kernel
    from egps_ppl.models.policy import PowerPolicy
    from egps_ppl.models.registry import load_model
    from egps_ppl.target import PowerDistribution

    out = Path(args.out)
    if out.suffix != ".nc":
        raise EGPSError(f"--out must end in .nc (an ArviZ NetCDF file), got {args.out!r}")
    torch.manual_seed(args.seed)
    set_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    prompt_ids = _prompt_ids(lm, args)
    target = PowerDistribution(lm, prompt_ids, args.alpha, args.max_new_tokens)
    policy = PowerPolicy(args.alpha, top_k=args.top_k, top_p=args.top_p)
    kernel = build_kernel(args.kernel, target, policy)
    initial = _read_init(args.init, args.num_chains) if args.init else None
    if initial is not None and args.block_size is not None:
        raise EGPSError("--init and --block-size exclude each other: a schedule grows its own start")
    schedule = make_schedule(args.block_size, args.steps_per_block, args.adaptive)
    mcmc = MCMC(
        kernel,
        num_samples=args.num_samples,
        warmup_steps=args.warmup,
        num_chains=args.num_chains,
        thin=args.thin,
        seed=args.seed,
        progress=args.progress,
        schedule=schedule,
    )
    mcmc.run(initial)
    data = mcmc.to_arviz()
    save_netcdf(data, out)
    _print_result(lm, mcmc, format_summary(summarize(data)), out, args.show)
    return 0


def _parse_seeds(text: str, offset: int) -> list[int]:
    try:
        seeds = [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise EGPSError(f"--seeds must be comma-separated integers, e.g. 0,1,2; got {text!r}") from None
    if not seeds:
        raise EGPSError("--seeds is empty; pass e.g. --seeds 0,1")
    return [s + offset for s in seeds]


def _cmd_eval(args: argparse.Namespace) -> int:
    from egps_ppl.evals.methods import load_method
    from egps_ppl.evals.runner import evaluate
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.registry import load_model

    seeds = _parse_seeds(args.seeds, args.seed_offset)
    if args.limit is not None and args.limit < 0:
        raise EGPSError(f"--limit must be >= 0, got {args.limit}")
    if args.max_new_tokens < 1:
        raise EGPSError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    # Cheap checks first: a bad task or method fails before the model loads.
    task = load_task(args.task, chat=args.chat)
    method = load_method(
        args.method,
        alpha=args.alpha,
        steps=args.steps,
        num_chains=args.num_chains,
        n=args.n,
        particles=args.particles,
        ess_every=args.ess_every,
        top_k=args.top_k,
        rollouts=args.rollouts,
        horizon=args.horizon or None,
        block_size=args.block_size,
        steps_per_block=args.steps_per_block,
        adaptive=args.adaptive,
    )
    run_config = {"argv": sys.argv[1:], "device": args.device, "dtype": args.dtype}
    run = {
        "resume": args.resume,
        "progress": args.progress,
        "max_new_tokens": args.max_new_tokens,
        "config": run_config,
    }
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
            **run,
            address=args.ray,
            num_workers=args.ray_workers,
            cpus_per_worker=args.ray_cpus_per_worker,
            gpus_per_worker=args.ray_gpus_per_worker,
            device=args.device,
            dtype=args.dtype,
            threads=args.threads,
            max_retries=args.ray_retries,
        )
    else:
        set_threads(args.threads)
        lm = load_model(args.model, device=args.device, dtype=args.dtype)
        summary = evaluate(task, method, lm, seeds, args.limit, args.out, **run)
    acc, se = summary["accuracy"], summary["accuracy_se"]
    accuracy = "n/a" if acc is None else f"{acc:.3f}" + (f" ± {se:.3f}" if se is not None else "")
    cost = summary["mean_decode_tokens"]
    print(
        f"{method.name} on {task.name}: accuracy {accuracy} over seeds {','.join(map(str, seeds))} "
        f"({summary['n_problems']} problems, {summary['n_results']} results); "
        f"decode tokens/problem {0 if cost is None else cost:.1f}"
    )
    print(f"results in {args.out}")
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from egps_ppl.evals.report import write_report

    table, plot = write_report(args.runs, args.out, args.plot)
    if args.out is None:
        print(table, end="")
    else:
        print(f"report written to {args.out}" + (f" (plot {plot})" if plot else ""))
    return 0


def _cmd_analyze(args: argparse.Namespace) -> int:
    import time

    import torch

    from egps_ppl.diagnostics.divergence import divergence_profile, write_analysis
    from egps_ppl.errors import check_alpha, check_positive_int
    from egps_ppl.evals.methods import load_method
    from egps_ppl.evals.runner import unit_seed
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.markov import MarkovLM
    from egps_ppl.models.registry import load_model
    from egps_ppl.target import PowerDistribution

    # Cheap checks first: bad settings fail before the model loads.
    alpha = check_alpha(args.alpha)
    for flag in ("max_new_tokens", "top_k", "rollouts", "positions_per_batch", "permutations", "samples"):
        check_positive_int("--" + flag.replace("_", "-"), getattr(args, flag))
    if args.horizon < 0 or args.limit < 0 or args.max_plots < 0:
        raise EGPSError("--horizon, --limit and --max-plots must be >= 0")
    if not 0 < args.fraction <= 1:
        raise EGPSError(f"--fraction must lie in (0, 1], got {args.fraction}")
    task = load_task(args.task, chat=args.chat) if args.task else None
    sampler = load_method(args.sampler, alpha=alpha)
    given = _read_completion_lines(args.completions) if args.completions else None
    set_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    if args.estimator == "exact" and not isinstance(lm, MarkovLM):
        raise EGPSError(f"--estimator exact needs a Markov model (markov:PATH.json), not {args.model!r}")
    units = _analysis_units(lm, args, task, given)
    if given is None:  # one unit per (prompt, seed), seeded as `egps eval --seeds` would
        units = [(pid, text, ids, None, args.seed + i) for pid, text, ids, _ in units for i in range(args.samples)]
    else:
        units = [(*unit, args.seed) for unit in units]
    horizon = None if args.horizon == 0 else args.horizon
    profiles = []
    for number, (pid, text, prompt_ids, ids, seed) in enumerate(units, start=1):
        started = time.perf_counter()
        useed = unit_seed(seed, pid)
        target = PowerDistribution(lm, prompt_ids, alpha, args.max_new_tokens)
        if ids is None:  # same seed per problem as `egps eval`, so its completions can be reproduced
            ids = sampler.run(lm, prompt_ids, args.max_new_tokens, useed).completion_ids
        meta = {"problem_id": pid, "prompt": text, "prompt_tokens": len(prompt_ids), "completion": lm.decode(ids)}
        meta["sampler"] = "file" if given is not None else args.sampler
        meta.update(seed=seed, unit_seed=useed)
        profile = divergence_profile(
            target,
            ids,
            args.estimator,
            top_k=args.top_k,
            rollouts=args.rollouts,
            horizon=horizon,
            positions_per_batch=args.positions_per_batch,
            generator=torch.Generator().manual_seed(unit_seed(seed, f"{pid}:rollout")),
            meta=meta,
        )
        profile.meta["wall_s"] = round(time.perf_counter() - started, 3)
        profiles.append(profile)
        share = profile.summary(args.fraction, num_permutations=1)["top_share"]
        print(
            f"[{number}/{len(units)}] {pid} (seed {seed}): {profile.length} tokens, "
            f"total D {profile.divergence.sum():.3f}, "
            f"top-{args.fraction:.0%} share {'n/a' if share is None else f'{share:.2f}'} "
            f"({profile.meta['wall_s']:.1f} s)",
            flush=True,
        )
    config = {
        "argv": sys.argv[1:],
        "model": args.model,
        "task": args.task,
        "alpha": alpha,
        "max_new_tokens": args.max_new_tokens,
        "estimator": args.estimator,
        "sampler": "file" if given is not None else args.sampler,
        "seed": args.seed,
        "threads": torch.get_num_threads(),
    }
    if args.estimator == "rollout":
        config.update(top_k=args.top_k, rollouts=args.rollouts, horizon=horizon)
    summary = write_analysis(
        profiles,
        args.out,
        config,
        fraction=args.fraction,
        num_permutations=args.permutations,
        seed=args.seed,
        max_plots=args.max_plots,
    )
    pooled, clus = summary["pooled"], summary["pooled"]["clustering"]

    def fmt(value: float | None) -> str:
        return "n/a" if value is None else f"{value:.3f}"

    print(
        f"{len(profiles)} completions, {pooled['positions']} positions ({args.estimator}, alpha={alpha:g}): "
        f"top-{args.fraction:.0%} share {fmt(pooled['top_share'])}; mean run length {fmt(clus['mean_run_length'])} "
        f"vs shuffled {fmt(clus['shuffled_mean_run_length'])} (p = {fmt(clus['p_value'])}); "
        f"Spearman(D, H) {fmt(pooled['corr_entropy']['spearman'])}"
    )
    print(f"analysis written to {args.out}")
    return 0


def _read_completion_lines(path: str) -> list[tuple[str | None, list[int]]]:
    """``--completions`` lines: a JSON list of token ids, or an object with ``completion_ids`` (and optionally
    ``problem_id``), e.g. the ``results.jsonl`` of ``egps eval``, or a line of an earlier ``profiles.jsonl``."""
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise EGPSError(f"cannot read --completions file {path}: {exc.strerror}") from None
    if not lines:
        raise EGPSError(f"--completions file {path} is empty")
    out: list[tuple[str | None, list[int]]] = []
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
            row = row.get("completion_ids", row.get("tokens"))
        if not isinstance(row, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in row):
            raise EGPSError(
                f"--completions line {number} must be a list of token ids or have 'completion_ids' (or 'tokens')"
            )
        out.append((pid, row))
    return out


def _analysis_units(
    lm, args: argparse.Namespace, task, given: list[tuple[str | None, list[int]]] | None
) -> list[tuple[str, str | None, list[int], list[int] | None]]:
    """``(problem id, prompt text, prompt ids, completion ids or None)`` for each completion to analyse."""
    from egps_ppl.demo import DEMO_QUESTION

    if task is None:
        prompt_ids = _prompt_ids(lm, args)
        text = args.prompt
        if text is None and args.prompt_ids is None and prompt_ids:
            text = DEMO_QUESTION  # what _prompt_ids encodes when no prompt is given
        if given is None:
            return [("prompt", text, prompt_ids, None)]
        return [(pid or f"line{i}", text, prompt_ids, ids) for i, (pid, ids) in enumerate(given[: args.limit])]
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
        pairs = list(zip(problems, given, strict=False))
        pairs = [(p, ids) for p, (_, ids) in pairs]
    return [(p.id, p.prompt, task.build_prompt(p, lm), ids) for p, ids in pairs]


def _prompt_ids(lm, args: argparse.Namespace) -> list[int]:
    from egps_ppl.demo import DEMO_QUESTION, encode_chat, few_shot_messages

    if args.prompt_ids is not None:
        try:
            ids = [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise EGPSError(f"--prompt-ids must be integers, got {args.prompt_ids!r}") from None
        return ids
    if args.prompt is None:
        if getattr(lm, "tokenizer", None) is None:
            return []  # Markov models: the prompt is empty unless --prompt-ids is given
        return encode_chat(lm, few_shot_messages(DEMO_QUESTION)) if args.chat is not False else lm.encode(DEMO_QUESTION)
    if not args.prompt.strip():
        raise EGPSError("the prompt is empty; pass some text with --prompt")
    if args.chat:
        return encode_chat(lm, [{"role": "user", "content": args.prompt}])
    return lm.encode(args.prompt)


def _read_init(path: str, num_chains: int) -> list[list[int]]:
    try:
        lines = [line for line in Path(path).read_text().splitlines() if line.strip()]
    except OSError as exc:
        raise EGPSError(f"cannot read --init file {path}: {exc.strerror}") from None
    if len(lines) < num_chains:
        raise EGPSError(f"--init file {path} has {len(lines)} lines for {num_chains} chains")
    completions = []
    for number, line in enumerate(lines[:num_chains], start=1):
        try:
            ids = json.loads(line)
        except json.JSONDecodeError:
            raise EGPSError(f"--init line {number} is not JSON") from None
        if not isinstance(ids, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise EGPSError(f"--init line {number} must be a JSON list of token ids")
        completions.append(ids)
    return completions


def _print_result(lm, mcmc, summary_text: str, out: Path, show: int) -> None:
    samples = mcmc.get_samples()
    tokens, length = samples["tokens"], samples["length"]
    stats = mcmc.get_sample_stats()
    print(f"kernel {mcmc.kernel.name}, alpha={mcmc.kernel.target.alpha:g}, {mcmc.num_chains} chains, seed {mcmc.seed}")
    for chain in range(min(show, tokens.shape[0])):
        ids = tokens[chain, -1, : length[chain, -1]].tolist()
        print(f"--- chain {chain} (final draw, log p = {samples['log_p'][chain, -1]:.2f}) ---")
        print(lm.decode(ids))
    total = mcmc.total_cost()
    print("---")
    print(f"acceptance rate: {stats['acceptance_rate'].mean():.3f} (accepted {stats['is_accepted'].mean():.3f})")
    print(
        f"decode tokens: {int(total.decode_tokens.sum())}, scored tokens: {int(total.scored_tokens.sum())}, "
        f"wall clock: {mcmc.wall_seconds:.1f} s"
    )
    print(summary_text)
    print(f"ArviZ data written to {out}")


if __name__ == "__main__":
    raise SystemExit(main())
