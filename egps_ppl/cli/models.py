"""``egps models``: the models that need no download, plus the ``markov:`` and path/hub-id forms."""

from __future__ import annotations

import argparse
from typing import Any

__all__ = ["add_parser", "run"]


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    """Add ``egps models`` to the ``egps`` subparsers."""
    parser = subparsers.add_parser("models", help="list the models that need no download")
    parser.set_defaults(handler=run)
    return parser


def run(args: argparse.Namespace) -> int:
    """Print every registered model name with its description."""
    from egps_ppl.models.registry import available_models

    for name, description in available_models():
        print(f"{name:<20} {description}")
    return 0
