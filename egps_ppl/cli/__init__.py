"""The ``egps`` command: ``egps sample``, ``egps models``, ``egps eval``, ``egps report`` and ``egps analyze``.

One module per subcommand (:mod:`~egps_ppl.cli.sample`, :mod:`~egps_ppl.cli.models`, :mod:`~egps_ppl.cli.eval`,
:mod:`~egps_ppl.cli.report`, :mod:`~egps_ppl.cli.analyze`), each with ``add_parser(subparsers)`` and
``run(args) -> int``; the options shared by several are in :mod:`~egps_ppl.cli.common`. A subcommand imports
the library (and torch) only when it runs, so ``egps --help`` is instant.
"""

from __future__ import annotations

import argparse
import errno
import sys
from collections.abc import Sequence

from egps_ppl.cli import analyze, models, report, sample
from egps_ppl.cli import eval as eval_command
from egps_ppl.errors import EGPSError

__all__ = ["COMMANDS", "build_parser", "main"]

COMMANDS = (sample, models, eval_command, report, analyze)
"""The subcommand modules, in the order ``egps --help`` lists them."""
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.EFBIG})
"""``OSError`` numbers that mean "the file system refused" (full, read-only, no permission): reported in one
line like bad input, not as a traceback."""


def build_parser() -> argparse.ArgumentParser:
    """The ``egps`` argument parser with every subcommand; a parsed namespace's ``handler`` runs it."""
    parser = argparse.ArgumentParser(prog="egps", description="Power sampling from language models with MCMC.")
    subparsers = parser.add_subparsers(dest="command", required=True)
    for command in COMMANDS:
        command.add_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for bad input, with a one-line message; 130 on Ctrl-C)."""
    args = build_parser().parse_args(argv)
    try:
        return args.handler(args)
    except EGPSError as exc:
        print(f"egps: error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        if exc.errno not in STORAGE_ERRNOS:
            raise
        where = f": {exc.filename}" if exc.filename else ""
        print(f"egps: error: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("egps: interrupted", file=sys.stderr)
        return 130
