"""``egps sample``: MCMC chains on π(x) ∝ p(x | prompt)^α, every draw written to an ArviZ NetCDF file.

Everything that needs no model is checked before it loads: ``--out`` (a writable ``.nc`` file, not a folder, with
room on its disk), α, the counts, the kernel spec, the ``--init`` file and whether the chains fit in memory. On
Ctrl-C the draws recorded so far are written, marked ``partial=1`` and ``draws_completed=N`` in the file's attrs,
and the command exits with 130.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egps_ppl.cli.common import add_device_options, add_model_option, prompt_ids, set_threads
from egps_ppl.errors import EGPSError

if TYPE_CHECKING:
    from egps_ppl.infer import MCMC
    from egps_ppl.models.base import LanguageModel

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``egps sample`` to the ``egps`` subparsers."""
    parser = subparsers.add_parser("sample", help="sample completions from p(x|prompt)^alpha and write an ArviZ file")
    add_model_option(parser)
    prompt = parser.add_mutually_exclusive_group()
    prompt.add_argument(
        "--prompt",
        action="append",
        help="prompt text (default: the built-in arithmetic demo question); repeat it to sample several problems in "
        "one batch (--num-chains chains each; the ArviZ file gets a problem dimension)",
    )
    prompt.add_argument("--prompt-ids", help="prompt as token ids, comma or space separated")
    parser.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="wrap the prompt in the model's chat template (default: only for the demo question)",
    )
    parser.add_argument("--alpha", type=float, default=4.0, help="the power alpha (> 0; papers use 4)")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="maximum completion length T")
    parser.add_argument(
        "--kernel",
        default="mh",
        help="mh, entropy-mh, entropy-cut-mh, mtm, egps, cycle(K1,K2,...), mixture(K1:w1,K2:w2,...)",
    )
    parser.add_argument("--num-chains", type=int, default=4)
    parser.add_argument("--num-samples", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--thin", type=int, default=1)
    parser.add_argument("--block-size", type=int, default=None, help="grow B tokens per block (Karan & Du)")
    parser.add_argument("--steps-per-block", type=int, default=10, help="kernel steps after each block")
    parser.add_argument(
        "--adaptive",
        action="store_true",
        help="with --block-size: skip deterministic blocks and spend moves in proportion to entropy mass",
    )
    parser.add_argument("--top-k", type=int, default=None, help="truncate the proposal to the top k tokens")
    parser.add_argument("--top-p", type=float, default=None, help="truncate the proposal to nucleus mass p")
    parser.add_argument("--init", help="JSONL file: line i is the list of completion token ids starting chain i")
    parser.add_argument("--seed", type=int, default=0)
    add_device_options(parser)
    parser.add_argument("--out", default="runs/sample.nc", help="ArviZ NetCDF file to write")
    parser.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--show", type=int, default=3, help="how many chains' final completions to print")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Build the target and kernel, run the chains, write the ArviZ file and print the summary."""
    import torch

    from egps_ppl.diagnostics import format_summary, save_netcdf, summarize
    from egps_ppl.errors import chain_memory, check_alpha, check_memory, check_positive_int, check_writable
    from egps_ppl.infer import MCMC, make_schedule
    from egps_ppl.kernels.presets import build_kernel
    from egps_ppl.models.policy import PowerPolicy
    from egps_ppl.models.registry import load_model
    from egps_ppl.target import PowerDistribution

    # Cheap checks first: nothing that can be known without the model is found after it loads.
    out = Path(args.out)
    if out.suffix != ".nc":
        raise EGPSError(f"--out must end in .nc (an ArviZ NetCDF file), got {args.out!r}")
    check_writable(out, "--out")
    alpha = check_alpha(args.alpha)
    for name in ("max_new_tokens", "num_chains", "num_samples", "thin"):
        check_positive_int(name, getattr(args, name))
    if args.warmup < 0:
        raise EGPSError(f"warmup_steps must be an integer >= 0, got {args.warmup}")
    policy = PowerPolicy(alpha, top_k=args.top_k, top_p=args.top_p)
    _check_kernel_spec(args.kernel, policy)
    initial = _read_init(args.init, args.num_chains) if args.init else None
    if initial is not None and args.prompt and len(args.prompt) > 1:
        raise EGPSError("--init starts the chains of one prompt; give a single --prompt with it")
    if initial is not None and args.block_size is not None:
        raise EGPSError("--init and --block-size exclude each other: a schedule grows its own start")
    schedule = make_schedule(args.block_size, args.steps_per_block, args.adaptive)
    what = f"--num-chains {args.num_chains} x --num-samples {args.num_samples} x --max-new-tokens {args.max_new_tokens}"
    needed, explanation = chain_memory(
        args.num_chains * len(args.prompt or [None]), args.max_new_tokens, args.num_samples
    )
    check_memory(needed, what, explanation, args.device)
    _check_disk(out, args.num_chains, args.num_samples, args.max_new_tokens)

    torch.manual_seed(args.seed)
    set_threads(args.threads)
    lm = load_model(args.model, device=args.device, dtype=args.dtype)
    needed, explanation = chain_memory(
        args.num_chains * len(args.prompt or [None]), args.max_new_tokens, args.num_samples, lm.vocab_size
    )
    check_memory(needed, what, explanation, args.device)
    texts = args.prompt or [None]
    prompts = [prompt_ids(lm, argparse.Namespace(**{**vars(args), "prompt": text})) for text in texts]
    target = PowerDistribution(lm, prompts if len(prompts) > 1 else prompts[0], alpha, args.max_new_tokens)
    kernel = build_kernel(args.kernel, target, policy)
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
    try:
        mcmc.run(initial)
    except KeyboardInterrupt:
        return _save_interrupted(mcmc, out)
    _check_disk(out, args.num_chains, mcmc.draws_completed, args.max_new_tokens)
    data = mcmc.to_arviz()
    save_netcdf(data, out)
    _print_result(lm, mcmc, format_summary(summarize(data)), out, args.show)
    return 0


def _check_kernel_spec(spec: str, policy: Any) -> None:
    """Build the kernel once on a throwaway two-token model, so a bad spec fails before the model loads."""
    from egps_ppl.kernels.presets import build_kernel
    from egps_ppl.models.markov import MarkovLM
    from egps_ppl.target import PowerDistribution

    lm = MarkovLM([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], eos_token_id=0)
    build_kernel(spec, PowerDistribution(lm, [], policy.alpha, 2), policy)


NETCDF_OVERHEAD = 256 * 1024
"""Bytes of a NetCDF file besides its arrays (HDF5 headers and attributes of the ~15 variables), rounded up."""


def _check_disk(out: Path, num_chains: int, draws: int, max_new_tokens: int) -> None:
    """The ArviZ file's size (token ids, log-probabilities and entropies per position; ten statistics per draw)
    against the free space where it goes: HDF5 can crash outright on a full disk."""
    from egps_ppl.errors import check_disk_space

    needed = num_chains * draws * (max_new_tokens * 24 + 10 * 8) + NETCDF_OVERHEAD
    check_disk_space(out, needed, "--out", f"{num_chains} chains x {draws} draws x {max_new_tokens} tokens")


def _save_interrupted(mcmc: MCMC, out: Path) -> int:
    """After Ctrl-C: write the draws so far (marked partial in the file's attrs) and say so; exit status 130."""
    from egps_ppl.diagnostics import save_netcdf

    done = mcmc.draws_completed
    if done == 0:
        print(f"egps: interrupted before the first draw was recorded; nothing written to {out}", file=sys.stderr)
        return 130
    _check_disk(out, mcmc.num_chains, done, mcmc.kernel.target.max_new_tokens)
    save_netcdf(mcmc.to_arviz(), out)
    print(
        f"egps: interrupted after {done} of {mcmc.num_samples} draws per chain; saved them to {out} "
        f"(attrs partial=1, draws_completed={done})",
        file=sys.stderr,
    )
    return 130


def _read_init(path: str, num_chains: int) -> list[list[int]]:
    from egps_ppl.errors import read_text

    lines = [line for line in read_text(path, "--init file").splitlines() if line.strip()]
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


def _print_result(lm: LanguageModel, mcmc: MCMC, summary_text: str, out: Path, show: int) -> None:
    samples = mcmc.get_samples()
    tokens, length = samples["tokens"], samples["length"]
    stats = mcmc.get_sample_stats()
    problems = mcmc.kernel.target.num_prompts
    each = f" per problem ({problems} problems)" if problems > 1 else ""
    alpha = mcmc.kernel.target.alpha
    print(f"kernel {mcmc.kernel.name}, alpha={alpha:g}, {mcmc.num_chains} chains{each}, seed {mcmc.seed}")
    for problem in range(problems):  # rows are problem-major
        for chain in range(min(show, mcmc.num_chains)):
            row = problem * mcmc.num_chains + chain
            ids = tokens[row, -1, : length[row, -1]].tolist()
            where = f"problem {problem}, chain {chain}" if problems > 1 else f"chain {chain}"
            print(f"--- {where} (final draw, log p = {samples['log_p'][row, -1]:.2f}) ---")
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
