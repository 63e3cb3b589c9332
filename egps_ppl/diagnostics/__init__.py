"""Diagnostics: ArviZ export (``RUN.nc``), R-hat/ESS/acceptance summaries, trace/entropy plots, and the
per-position divergence analysis (where ``p^α`` departs from ``p``)."""

from egps_ppl.diagnostics.arviz_export import (
    group_dataset,
    group_names,
    load_netcdf,
    posterior_dataset,
    save_netcdf,
    to_arviz,
    uses_datatree,
)
from egps_ppl.diagnostics.divergence import (
    DivergenceProfile,
    clustering_test,
    correlations,
    divergence_profile,
    high_divergence_mask,
    myopic_divergence,
    plot_divergence_profile,
    pooled_summary,
    run_lengths,
    top_share,
    write_analysis,
)
from egps_ppl.diagnostics.plots import plot_entropy_profile, plot_trace
from egps_ppl.diagnostics.summary import format_summary, summarize

__all__ = [
    "DivergenceProfile",
    "clustering_test",
    "correlations",
    "divergence_profile",
    "format_summary",
    "group_dataset",
    "group_names",
    "high_divergence_mask",
    "load_netcdf",
    "myopic_divergence",
    "plot_divergence_profile",
    "plot_entropy_profile",
    "plot_trace",
    "pooled_summary",
    "posterior_dataset",
    "run_lengths",
    "save_netcdf",
    "summarize",
    "to_arviz",
    "top_share",
    "uses_datatree",
    "write_analysis",
]
