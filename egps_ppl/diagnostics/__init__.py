"""Diagnostics: ArviZ export (``RUN.nc``), R-hat/ESS/acceptance summaries and trace/entropy plots.

A data-only layer: it reads arrays and ArviZ files and imports nothing of the samplers, so the runner
(:mod:`egps_ppl.infer`) can use it. The divergence analysis, which runs models, is :mod:`egps_ppl.analysis`."""

from egps_ppl.diagnostics.arviz_export import (
    group_dataset,
    group_names,
    load_netcdf,
    posterior_dataset,
    save_netcdf,
    select_problem,
    to_arviz,
    uses_datatree,
)
from egps_ppl.diagnostics.plots import plot_entropy_profile, plot_trace
from egps_ppl.diagnostics.summary import format_summary, summarize

__all__ = [
    "format_summary",
    "group_dataset",
    "group_names",
    "load_netcdf",
    "plot_entropy_profile",
    "plot_trace",
    "posterior_dataset",
    "save_netcdf",
    "select_problem",
    "summarize",
    "to_arviz",
    "uses_datatree",
]
