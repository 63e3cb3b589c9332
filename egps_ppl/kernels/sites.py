"""Site selectors: where a move cuts the sequence.

A selector returns ``log P_x(i)`` for every position of every row. Because the choice depends on the state,
the correction adds ``log P_{x'}(i) - log P_x(i)`` to the log acceptance ratio, with ``P_{x'}`` recomputed on the
proposed sequence. Forgetting this term is the classic bug when a move changes the length.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from egps_ppl.models.base import sample_from_cdf
from egps_ppl.state import Sequences


@runtime_checkable
class SiteSelector(Protocol):
    """``log_probs(seqs) -> float64[C, T]``: log-probability of cutting each row at each position
    (``-inf`` where a cut is not allowed; a row with no allowed position has all ``-inf``)."""

    name: str

    def log_probs(self, seqs: Sequences) -> torch.Tensor: ...


class UniformSite:
    """Cut uniformly over all generated positions ``0 <= i < n`` (Karan & Du)."""

    name = "uniform"

    def log_probs(self, seqs: Sequences) -> torch.Tensor:
        n = seqs.length.to(torch.float64).unsqueeze(1)
        return torch.where(seqs.valid_mask(), -n.log(), torch.full_like(n, -torch.inf))

    def __repr__(self) -> str:
        return "UniformSite()"


def sample_sites(log_probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One site per row from ``exp(log_probs[C, T])``; -1 for rows with no allowed site."""
    allowed = torch.isfinite(log_probs).any(1)
    top = torch.where(allowed, log_probs.max(1).values, torch.zeros_like(log_probs[:, 0]))
    weights = (log_probs - top.unsqueeze(1)).exp()  # exp(-inf) = 0 for disallowed sites
    weights[~allowed, 0] = 1.0  # any valid index; these rows get -1 below
    sites = sample_from_cdf(torch.cumsum(weights, dim=1), generator)
    return torch.where(allowed, sites, torch.full_like(sites, -1))


def site_log_prob(log_probs: torch.Tensor, sites: torch.Tensor) -> torch.Tensor:
    """``log_probs[c, sites[c]]`` (``-inf`` where ``sites`` is -1)."""
    picked = log_probs.gather(1, sites.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(sites >= 0, picked, torch.full_like(picked, -torch.inf))
