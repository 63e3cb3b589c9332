"""Diagnostic plots written straight to PNG.

Figures are built with :class:`matplotlib.figure.Figure` and the Agg canvas, never through ``pyplot``, so
plotting from the CLI or a test never changes the backend or global state of a user's notebook session.
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from egps_ppl.diagnostics.arviz_export import group_dataset, group_names, posterior_dataset
from egps_ppl.errors import EGPSError

__all__ = ["plot_entropy_profile", "plot_trace"]

_MAX_LEGEND_CHAINS = 8  # beyond this a legend hides the traces


def new_figure(rows: int, height_per_row: float = 2.4) -> tuple[Figure, Any]:
    """A headless figure (Agg canvas) with ``rows`` stacked axes sharing x; returns ``(figure, axes)``."""
    fig = Figure(figsize=(9, height_per_row * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, 1, sharex=True, squeeze=False)[:, 0]
    return fig, axes


def save_figure(fig: Figure, path: str | os.PathLike[str]) -> Path:
    """Write ``fig`` as a PNG to ``path`` (parent folders created) and return the path."""
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(target, format="png", dpi=100)
    return target


def _plot_chains(ax: Any, values: np.ndarray, ylabel: str) -> None:
    """One line per chain of a [chain, draw] array."""
    draws = np.arange(values.shape[1])
    for chain, row in enumerate(values):
        ax.plot(draws, row, lw=0.8, alpha=0.8, label=f"chain {chain}")
    ax.set_ylabel(ylabel)


def _running_mean(values: np.ndarray) -> np.ndarray:
    """Running mean along draws of a [chain, draw] array (per-step acceptance is too noisy to read)."""
    return np.cumsum(values, axis=1) / np.arange(1, values.shape[1] + 1)


def plot_trace(data: Any, path: str | os.PathLike[str]) -> Path:
    """Plot traces of ``log_p`` and ``length`` per chain and the acceptance rate over draws.

    Parameters
    ----------
    data
        :class:`arviz.InferenceData` or :class:`xarray.DataTree` from :func:`~egps_ppl.diagnostics.to_arviz`.
    path
        PNG file to write (parent folders are created).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    EGPSError
        If the posterior lacks ``log_p`` or ``length``.
    """
    posterior = posterior_dataset(data)
    missing = [name for name in ("log_p", "length") if name not in posterior.data_vars]
    if missing:
        raise EGPSError(f"posterior is missing {', '.join(missing)}; cannot plot a trace")
    stats = group_dataset(data, "sample_stats") if "sample_stats" in group_names(data) else None
    has_acceptance = stats is not None and "acceptance_rate" in stats.data_vars
    fig, axes = new_figure(3 if has_acceptance else 2)
    _plot_chains(axes[0], posterior["log_p"].transpose("chain", "draw").values, "log p(x)")
    _plot_chains(axes[1], posterior["length"].transpose("chain", "draw").values, "length")
    if has_acceptance:
        rates = stats["acceptance_rate"].transpose("chain", "draw").values.astype(np.float64)
        _plot_chains(axes[2], _running_mean(rates), "acceptance rate\n(running mean)")
        axes[2].set_ylim(-0.02, 1.02)
    axes[-1].set_xlabel("draw")
    if posterior.sizes["chain"] <= _MAX_LEGEND_CHAINS:
        axes[0].legend(loc="best", fontsize="small")
    axes[0].set_title("MCMC trace")
    return save_figure(fig, path)


def plot_entropy_profile(entropy: Any, cut_positions: Any, path: str | os.PathLike[str]) -> Path:
    """Plot the entropy along the sequence with a histogram and rug of the chosen cut positions.

    Parameters
    ----------
    entropy
        Shannon entropy (nats) of the next-token distribution per position: shape ``[position]``, or
        ``[n, position]`` (e.g. one row per chain; NaN past a row's end), drawn as faint rows and their mean.
    cut_positions
        Cut positions of MH steps, any shape (e.g. ``sample_stats.cut_position``); -1 (no cut) is ignored.
    path
        PNG file to write (parent folders are created).

    Returns
    -------
    pathlib.Path
        ``path``.

    Raises
    ------
    EGPSError
        If ``entropy`` is not 1-D or 2-D.
    """
    if np.ndim(entropy) not in (1, 2):
        raise EGPSError(f"entropy must be [position] or [n, position], got shape {np.shape(entropy)}")
    rows = np.atleast_2d(np.asarray(entropy, dtype=np.float64))
    cuts = np.asarray(cut_positions).ravel()
    cuts = cuts[cuts >= 0]
    positions = np.arange(rows.shape[1])
    fig, (ax_entropy, ax_cuts) = new_figure(2)
    if rows.shape[0] > 1:
        for row in rows:
            ax_entropy.plot(positions, row, color="0.7", lw=0.6)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # all-NaN columns (past every row's end) give NaN
        mean = np.nanmean(rows, axis=0)
    ax_entropy.plot(positions, mean, color="C0", lw=1.5, label="mean entropy" if rows.shape[0] > 1 else "entropy")
    ax_entropy.set_ylabel("entropy (nats)")
    ax_entropy.legend(loc="best", fontsize="small")
    ax_entropy.set_title("Entropy profile and cut positions")
    bins = np.arange(max(rows.shape[1], int(cuts.max(initial=0)) + 1) + 1) - 0.5
    ax_cuts.hist(cuts, bins=bins, color="C1")
    ax_cuts.plot(cuts, np.zeros_like(cuts), "|", color="k", ms=10, alpha=0.3)
    ax_cuts.set_ylabel(f"cuts (n={cuts.size})")
    ax_cuts.set_xlabel("position")
    return save_figure(fig, path)
