"""Convergence and cost summary of one run: ArviZ's R-hat and ESS, acceptance, tokens per draw.

R-hat and ESS come from :func:`arviz.rhat` and :func:`arviz.ess` (never re-implemented here). Both ArviZ 0.x
and 1.x accept an :class:`xarray.Dataset`, so the group is pulled out as a Dataset first and one code path
serves InferenceData and DataTree alike.

Two statistics ArviZ does not have: the *moved fraction* (how often a draw differs from the draw before it, which
the acceptance rate overstates: an accepted proposal can be the current completion itself) and the *frozen
chains* (chains whose completion never changes). A chain whose values never change has zero within-chain
variance, where ArviZ divides by zero and numpy warns on every call; those RuntimeWarnings are silenced and the
frozen chains are listed in the summary instead.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np
import xarray as xr

from egps_ppl.diagnostics.arviz_export import az, group_dataset, group_names, posterior_dataset, select_problem
from egps_ppl.errors import EGPSError

__all__ = ["format_summary", "summarize"]

MIN_DRAWS = 4
"""ArviZ's minimum number of draws per chain for R-hat and ESS (it returns NaN below this)."""

MIN_CHAINS_RHAT = 2
"""R-hat compares chains; with one chain it is undefined and reported as NaN."""


def _sample_stats(data: Any) -> xr.Dataset | None:
    if isinstance(data, xr.Dataset) or "sample_stats" not in group_names(data):
        return None
    return group_dataset(data, "sample_stats")


def _per_draw_variable(data: Any, name: str) -> xr.DataArray:
    """Find ``name`` in posterior or sample_stats and check it is one number per draw."""
    for dataset in (posterior_dataset(data), _sample_stats(data)):
        if dataset is not None and name in dataset.data_vars:
            values = dataset[name]
            if set(values.dims) != {"chain", "draw"}:
                raise EGPSError(f"{name} has dims {values.dims}; summarize needs one number per (chain, draw)")
            return values.transpose("chain", "draw").astype(np.float64)
    raise EGPSError(f"no variable {name!r} in posterior or sample_stats")


def _arviz_scalar(function: Any, values: xr.DataArray, quiet: bool = False, **kwargs: Any) -> float:
    """Call an ArviZ diagnostic on a one-variable Dataset and return its value as a float.

    ``quiet`` silences RuntimeWarnings (division by a zero within-chain variance when a chain is constant).
    """
    with warnings.catch_warnings():
        if quiet:
            warnings.simplefilter("ignore", RuntimeWarning)
        result = function(xr.Dataset({values.name: values}), **kwargs)
    return float(result[values.name])


def _constant_chains(values: np.ndarray) -> np.ndarray:
    """Boolean [chain]: the chain's values never change over its draws (needs at least 2 draws)."""
    if values.shape[1] < 2:
        return np.zeros(values.shape[0], dtype=bool)
    return np.all(values == values[:, :1], axis=1)


def _variable_summary(values: xr.DataArray, notes: list[str]) -> dict[str, float]:
    n_chain, n_draw = values.shape
    flat = values.values.ravel()
    quiet = bool(_constant_chains(values.values).any())
    out = {
        "rhat": math.nan,
        "ess_bulk": math.nan,
        "ess_tail": math.nan,
        "mean": float(flat.mean()),
        "sd": float(flat.std(ddof=1)) if flat.size > 1 else math.nan,
    }
    if n_draw < MIN_DRAWS:
        # Skipped rather than called: ArviZ versions differ between returning NaN and raising here.
        notes.append(f"{values.name}: R-hat and ESS need at least {MIN_DRAWS} draws per chain (have {n_draw}): NaN")
        return out
    out["ess_bulk"] = _arviz_scalar(az.ess, values, quiet, method="bulk")
    out["ess_tail"] = _arviz_scalar(az.ess, values, quiet, method="tail")
    if n_chain < MIN_CHAINS_RHAT:
        notes.append(f"{values.name}: R-hat needs at least {MIN_CHAINS_RHAT} chains (have {n_chain}): NaN")
    elif np.all(flat == flat[0]):
        # Between- and within-chain variances are both 0; ArviZ 0.x returns NaN, and 1.x should not differ.
        notes.append(f"{values.name}: constant over all draws, so R-hat is undefined (NaN)")
    else:
        out["rhat"] = _arviz_scalar(az.rhat, values, quiet, method="rank")
    return out


def _frozen_chains(posterior: xr.Dataset, notes: list[str]) -> list[int]:
    """Chains (their ``chain`` coordinate) that never moved; a note says which.

    A chain never moved when its ``tokens`` are the same in every draw. Its recorded ``log_p`` may still differ
    in the last digits (a re-proposed completion is rescored, in float32 on most models), so ``log_p`` is used
    only where the run has no ``tokens``: then a chain never moved when its ``log_p`` never changes.
    """
    n_chain, n_draw = posterior.sizes["chain"], posterior.sizes["draw"]
    if n_draw < 2:
        return []
    if "tokens" in posterior.data_vars:
        values, what = posterior["tokens"].transpose("chain", "draw", ...), "same completion"
    elif "log_p" in posterior.data_vars:
        values, what = posterior["log_p"].transpose("chain", "draw"), "same log_p"
    else:
        return []
    array = values.values.reshape(n_chain, n_draw, -1)
    still = np.all(array == array[:, :1], axis=(1, 2))
    frozen = [int(chain) for chain in values["chain"].values[still]]
    if frozen:
        shown = ", ".join(str(chain) for chain in frozen[:20]) + (" ..." if len(frozen) > 20 else "")
        notes.append(f"{len(frozen)} of {n_chain} chains never moved ({what} in all {n_draw} draws): chains {shown}")
    return frozen


def _moved_fraction(posterior: xr.Dataset, n_chain: int, notes: list[str]) -> dict[str, Any]:
    """Fraction of draws whose tokens differ from the previous draw's, overall and per chain."""
    n_draw = posterior.sizes["draw"]
    if "tokens" not in posterior.data_vars or n_draw < 2:
        reason = "no 'tokens' in posterior" if n_draw >= 2 else f"needs at least 2 draws (have {n_draw})"
        notes.append(f"moved fraction: {reason}: NaN")
        return {"mean": math.nan, "per_chain": [math.nan] * n_chain}
    tokens = posterior["tokens"].transpose("chain", "draw", ...).values
    moved = np.any(tokens[:, 1:] != tokens[:, :-1], axis=tuple(range(2, tokens.ndim)))  # [chain, draw - 1]
    return {"mean": float(moved.mean()), "per_chain": [float(v) for v in moved.mean(axis=1)]}


def _mean_stat(stats: xr.Dataset | None, name: str, n_chain: int, notes: list[str]) -> dict[str, Any]:
    """Overall and per-chain mean of a sample statistic; NaN (with a note) when the run did not record it."""
    if stats is None or name not in stats.data_vars:
        notes.append(f"sample_stats has no {name!r}: reported as NaN")
        return {"mean": math.nan, "per_chain": [math.nan] * n_chain}
    values = stats[name].astype(np.float64)
    per_chain = values.mean(dim=[d for d in values.dims if d != "chain"])
    return {"mean": float(values.mean()), "per_chain": [float(v) for v in per_chain.values]}


def summarize(data: Any, var_names: Sequence[str] = ("log_p", "length")) -> dict[str, Any]:
    """Summarise convergence, acceptance and cost of one run.

    Parameters
    ----------
    data
        :class:`arviz.InferenceData` or :class:`xarray.DataTree` as returned by
        :func:`~egps_ppl.diagnostics.to_arviz` or :func:`~egps_ppl.diagnostics.load_netcdf`.
    var_names
        Per-draw scalar variables (from ``posterior`` or ``sample_stats``) to diagnose.

    Returns
    -------
    dict
        ``num_chains``, ``num_draws``;
        ``variables``: ``{name: {"rhat", "ess_bulk", "ess_tail", "mean", "sd"}}`` where ``rhat`` is ArviZ's
        rank-normalised split R-hat and ``ess_*`` ArviZ's bulk/tail ESS (NaN where undefined: one chain,
        fewer than 4 draws, or a constant variable);
        ``acceptance_rate`` and ``accepted_fraction``: ``{"mean", "per_chain"}`` means of the sample stats
        ``acceptance_rate`` and ``is_accepted``;
        ``moved_fraction``: ``{"mean", "per_chain"}``, the fraction of draws (from the second on) whose tokens
        differ from the previous draw's (NaN with one draw);
        ``frozen_chains``: the chains that never moved: the same ``tokens`` in every draw (or, with no tokens,
        the same ``log_p``); a note names them, and ArviZ's warnings about zero within-chain variance are
        silenced;
        ``decode_tokens_per_draw``, ``scored_tokens_per_draw``: ``{"mean", "per_chain"}``;
        ``notes``: list of strings saying why any value is NaN.

        For a run over several prompts (a ``problem`` dimension): ``{"num_problems": P, "problems": [one summary
        as above per problem]}``.

    Raises
    ------
    EGPSError
        If a variable is missing or is not one number per (chain, draw).
    """
    posterior = posterior_dataset(data)
    if "problem" in posterior.dims:
        count = int(posterior.sizes["problem"])
        return {
            "num_problems": count,
            "problems": [summarize(select_problem(data, k), var_names) for k in range(count)],
        }
    n_chain, n_draw = posterior.sizes["chain"], posterior.sizes["draw"]
    stats = _sample_stats(data)
    notes: list[str] = []
    frozen = _frozen_chains(posterior, notes)
    variables = {name: _variable_summary(_per_draw_variable(data, name), notes) for name in var_names}
    return {
        "num_chains": int(n_chain),
        "num_draws": int(n_draw),
        "variables": variables,
        "acceptance_rate": _mean_stat(stats, "acceptance_rate", n_chain, notes),
        "accepted_fraction": _mean_stat(stats, "is_accepted", n_chain, notes),
        "moved_fraction": _moved_fraction(posterior, n_chain, notes),
        "frozen_chains": frozen,
        "decode_tokens_per_draw": _mean_stat(stats, "decode_tokens", n_chain, notes),
        "scored_tokens_per_draw": _mean_stat(stats, "scored_tokens", n_chain, notes),
        "notes": notes,
    }


def _fmt(value: float, digits: int = 3) -> str:
    if math.isnan(value):
        return "nan"
    return f"{value:.{digits}f}" if abs(value) < 1e6 else f"{value:.3g}"


def _per_chain(values: Sequence[float], limit: int = 8) -> str:
    shown = " ".join(_fmt(v, 2) for v in values[:limit])
    return shown + (f" ... ({len(values)} chains)" if len(values) > limit else "")


def format_summary(summary: dict[str, Any]) -> str:
    """Render :func:`summarize`'s result as a compact text table.

    Parameters
    ----------
    summary
        The dict returned by :func:`summarize`.

    Returns
    -------
    str
        Several lines: one row per variable (mean, sd, R-hat, bulk/tail ESS), then acceptance, moved fraction
        and token counts (overall and per chain), then any notes (frozen chains among them); one such block per
        problem for a run over several prompts.
    """
    if "problems" in summary:
        return "\n\n".join(f"problem {k}: " + format_summary(part) for k, part in enumerate(summary["problems"]))
    lines = [f"{summary['num_chains']} chains x {summary['num_draws']} draws"]
    name_width = max([8, *(len(name) for name in summary["variables"])])
    header = f"{'variable':<{name_width}} {'mean':>10} {'sd':>10} {'r_hat':>7} {'ess_bulk':>9} {'ess_tail':>9}"
    lines += [header, "-" * len(header)]
    for name, row in summary["variables"].items():
        lines.append(
            f"{name:<{name_width}} {_fmt(row['mean']):>10} {_fmt(row['sd']):>10} {_fmt(row['rhat']):>7}"
            f" {_fmt(row['ess_bulk'], 1):>9} {_fmt(row['ess_tail'], 1):>9}"
        )
    lines.append("")
    for key, label in (
        ("acceptance_rate", "acceptance rate"),
        ("accepted_fraction", "accepted fraction"),
        ("moved_fraction", "moved fraction"),
        ("decode_tokens_per_draw", "decode tokens/draw"),
        ("scored_tokens_per_draw", "scored tokens/draw"),
    ):
        stat = summary[key]
        lines.append(f"{label:<19} {_fmt(stat['mean']):>10}   per chain: {_per_chain(stat['per_chain'])}")
    lines += [f"note: {note}" for note in summary["notes"]]
    return "\n".join(lines)
