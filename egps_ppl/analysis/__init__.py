"""Analysis: where the power distribution departs from the base model (per-position divergence along
completions, its concentration and clustering), and π's answer distribution on a real model by certified
enumeration. It runs samplers and backends, so it sits above ``infer``."""

from egps_ppl.analysis.divergence import (
    DivergenceProfile,
    clustering_test,
    correlations,
    divergence_profile,
    high_divergence_mask,
    kl_divergence,
    myopic_divergence,
    next_token_log_probs,
    plot_divergence_profile,
    plot_divergence_vs_entropy,
    pooled_summary,
    rollout_divergence,
    run_lengths,
    top_share,
    write_analysis,
)
from egps_ppl.analysis.enumeration import PowerEnumeration, enumerate_power

__all__ = [
    "DivergenceProfile",
    "PowerEnumeration",
    "clustering_test",
    "correlations",
    "divergence_profile",
    "enumerate_power",
    "high_divergence_mask",
    "kl_divergence",
    "myopic_divergence",
    "next_token_log_probs",
    "plot_divergence_profile",
    "plot_divergence_vs_entropy",
    "pooled_summary",
    "rollout_divergence",
    "run_lengths",
    "top_share",
    "write_analysis",
]
