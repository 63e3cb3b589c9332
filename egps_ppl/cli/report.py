"""``egps report DIR...``: several evaluation runs side by side (Markdown table and PNG)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``egps report`` to the ``egps`` subparsers."""
    parser = subparsers.add_parser("report", help="render several eval runs side by side (Markdown table and PNG)")
    parser.add_argument("runs", nargs="+", metavar="DIR", help="egps eval --out directories")
    parser.add_argument("--out", default=None, help="Markdown file to write (default: print the table)")
    parser.add_argument("--plot", default=None, help="PNG of accuracy vs decode tokens (default: --out with .png)")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Render the runs with :func:`~egps_ppl.evals.report.write_report`; print the table without ``--out``.

    The numbers are recomputed from each run's ``results.jsonl``; a ``summary.json`` that disagreed (left by an
    interrupted ``--resume``) is named on stderr.
    """
    from egps_ppl.evals.report import load_run_summary, write_report

    summaries = [load_run_summary(d) for d in args.runs]
    for s in summaries:
        if s.get("stale_summary"):
            print(
                f"egps: note: {s['run_dir']}/summary.json is stale (an interrupted run?); the table uses "
                f"results.jsonl ({s['n_results']} results)",
                file=sys.stderr,
            )
    table, plot = write_report(args.runs, args.out, args.plot, summaries=summaries)
    if args.out is None:
        print(table, end="")
    else:
        print(f"report written to {args.out}" + (f" (plot {plot})" if plot else ""))
    return 0
