"""The ``egps`` command: ``egps sample``, ``egps models``, ``egps eval`` and ``egps report``."""

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
        help="plain, low-temp, best-of-n, mh, entropy-mh, mtm, egps, or a kernel spec such as cycle(mh,egps)",
    )
    ev.add_argument("--alpha", type=float, default=4.0, help="the power alpha (low-temp samples at 1/alpha)")
    ev.add_argument("--max-new-tokens", type=int, default=256, help="maximum completion length T")
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N problems (default: all)")
    ev.add_argument("--seeds", default="0", help="comma-separated run seeds; the SE of accuracy is over seeds")
    ev.add_argument("--seed-offset", type=int, default=0, help="add this to every seed in --seeds")
    ev.add_argument("--num-chains", type=int, default=1, help="MCMC chains per problem (answer: best final state)")
    ev.add_argument("--steps", type=int, default=10, help="MCMC kernel steps per chain")
    ev.add_argument("--n", type=int, default=8, help="samples of best-of-n")
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
        "--ray", nargs="?", const="local", default=None, metavar="ADDRESS", help="scale out with Ray (not built yet)"
    )
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

    if args.ray is not None:
        raise EGPSError("--ray is not built yet (Ray scale-out is the last part of issue 4); run without --ray")
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
        block_size=args.block_size,
        steps_per_block=args.steps_per_block,
        adaptive=args.adaptive,
    )
    set_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    summary = evaluate(
        task,
        method,
        lm,
        seeds,
        args.limit,
        args.out,
        resume=args.resume,
        progress=args.progress,
        max_new_tokens=args.max_new_tokens,
        config={"argv": sys.argv[1:], "device": args.device, "dtype": args.dtype},
    )
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
