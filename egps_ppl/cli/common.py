"""What several subcommands share: the model and device options, torch threads and the prompt options."""

from __future__ import annotations

import argparse
import os
from typing import TYPE_CHECKING

from egps_ppl.errors import EGPSError

if TYPE_CHECKING:
    from egps_ppl.models.base import LanguageModel

__all__ = [
    "DEFAULT_MODEL",
    "THREADS_HELP",
    "add_device_dtype_options",
    "add_device_options",
    "add_model_option",
    "prompt_ids",
    "set_threads",
]

DEFAULT_MODEL = "smollm2-135m"
"""``--model`` when none is given."""
THREADS_HELP = "CPU threads for torch (default: half the cores, at least 1)"


def add_model_option(parser: argparse.ArgumentParser) -> None:
    """``--model`` (registry name, path, hub id or ``markov:PATH.json``; default :data:`DEFAULT_MODEL`)."""
    parser.add_argument("--model", default=DEFAULT_MODEL, help="registry name, local path, hub id or markov:PATH.json")


def add_device_options(parser: argparse.ArgumentParser) -> None:
    """``--device``, ``--threads`` and ``--dtype``."""
    add_device_dtype_options(parser)
    parser.add_argument("--threads", type=int, default=None, help=THREADS_HELP)


def add_device_dtype_options(parser: argparse.ArgumentParser) -> None:
    """``--device`` and ``--dtype`` of the model (the benchmarks add these with their own ``--threads``)."""
    parser.add_argument("--device", default="cpu", help="torch device of the model (cpu, cuda, cuda:1, ...)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads. The default leaves half the cores free: with every core busy, one other
    process on the machine makes torch's spinning threads 20x slower (measured with SmolLM2 on 2 cores)."""
    import torch

    if threads is None:
        threads = max(1, (os.cpu_count() or 2) // 2)
    if threads < 1:
        raise EGPSError(f"--threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)
    return threads


def prompt_ids(lm: LanguageModel, args: argparse.Namespace) -> list[int]:
    """The prompt of ``--prompt`` / ``--prompt-ids`` / ``--chat`` as token ids of ``lm``.

    Without a prompt: the demo question (:data:`~egps_ppl.evals.tasks.DEMO_QUESTION`) with its worked examples
    (chat template where the model has one) unless ``--no-chat``; an empty prompt for a model without a
    tokenizer (a Markov model).
    """
    from egps_ppl.evals.tasks import DEMO_QUESTION, arithmetic_prompt, encode_prompt

    if args.prompt_ids is not None:
        try:
            return [int(t) for t in args.prompt_ids.replace(",", " ").split()]
        except ValueError:
            raise EGPSError(f"--prompt-ids must be integers, got {args.prompt_ids!r}") from None
    if args.prompt is None:
        if getattr(lm, "tokenizer", None) is None:
            return []  # Markov models: the prompt is empty unless --prompt-ids is given
        return arithmetic_prompt(lm, DEMO_QUESTION) if args.chat is not False else lm.encode(DEMO_QUESTION)
    if not args.prompt.strip():
        raise EGPSError("the prompt is empty; pass some text with --prompt")
    return encode_prompt(lm, args.prompt, chat=bool(args.chat))
