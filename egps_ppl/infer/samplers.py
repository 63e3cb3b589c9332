"""Non-MCMC samplers of the power target behind one interface: plain, low temperature and best-of-N.

Every sampler takes a :class:`~egps_ppl.target.PowerDistribution` and a generator and returns a
:class:`SamplerResult`: the population it drew, optional log-weights, the index of the single draw it outputs,
and the backend's cost counters. Power-SMC (:mod:`egps_ppl.infer.smc`) and Scalable Power Sampling
(:mod:`egps_ppl.infer.sps`) implement the same protocol, so every comparison is a flag away.

What each one samples
---------------------
``PlainSampler``       p itself (temperature 1): the baseline the power target is meant to improve on.
``LowTempSampler``     the token-level policy p(v | h)^α / Σ p^α, i.e. temperature 1/α. This is *not* π ∝ p^α:
                       it ignores how much probability each continuation has ahead of it (the future factor ζ).
``BestOfNSampler``     N draws from p, output the one with the highest log p (a mode seeker, not a sampler of π).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from egps_ppl.errors import check_positive_int
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

__all__ = [
    "BestOfNSampler",
    "LowTempSampler",
    "PlainSampler",
    "Sampler",
    "SamplerResult",
]


@dataclass
class SamplerResult:
    """What a sampler drew for one prompt.

    Attributes
    ----------
    samples : Sequences
        The population (one row per particle or draw), with per-position statistics.
    chosen : int
        The row the sampler outputs as its single draw.
    cost : Cost
        Backend cost counters, one entry per row (``decode_tokens``, ``scored_tokens``) plus ``forward_calls``.
    log_weights : torch.Tensor or None
        Normalised log importance weights of the rows (``float64[N]``, ``logsumexp == 0``) when the sampler is
        weighted (SMC); ``None`` when every row is an unweighted draw.
    log_evidence : float or None
        An estimate of log Σ_x p(x)^α (SMC), if the sampler gives one.
    extra : dict
        Sampler-specific, JSON-serialisable details.
    """

    samples: Sequences
    chosen: int
    cost: Cost
    log_weights: torch.Tensor | None = None
    log_evidence: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def weights(self) -> torch.Tensor:
        """Normalised weights of the rows (uniform when the sampler is unweighted)."""
        if self.log_weights is None:
            n = self.samples.num_rows
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        return self.log_weights.exp()


@runtime_checkable
class Sampler(Protocol):
    """A sampler of the power target: ``run(target, generator) -> SamplerResult``."""

    name: str

    def run(self, target: PowerDistribution, generator: torch.Generator | None = None) -> SamplerResult:
        """Draw from ``target``; the same generator state gives the same result."""
        ...

    def config(self) -> dict[str, Any]:
        """The sampler's settings (JSON-serialisable)."""
        ...


class _PolicySampler:
    """``n`` ancestral draws from a token policy in one batch; outputs the first."""

    name = "policy"

    def __init__(self, n: int = 1) -> None:
        self.n = check_positive_int("n", n)

    def _policy(self, target: PowerDistribution) -> PowerPolicy:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "n": ...}``."""
        return {"name": self.name, "n": self.n}

    def _draw(self, target: PowerDistribution, generator: torch.Generator | None) -> tuple[Sequences, Cost]:
        return target.sample_proposal(self.n, generator, self._policy(target))

    def run(self, target: PowerDistribution, generator: torch.Generator | None = None) -> SamplerResult:
        """Draw ``n`` completions of the target's prompt from the policy; output the first."""
        seqs, cost = self._draw(target, generator)
        return SamplerResult(seqs, 0, cost)


class PlainSampler(_PolicySampler):
    """Ancestral sampling from the base model at temperature 1.

    Parameters
    ----------
    n : int
        Independent draws made in one batch; the output is the first.
    """

    name = "plain"

    def _policy(self, target: PowerDistribution) -> PowerPolicy:
        return PowerPolicy(1.0)


class LowTempSampler(_PolicySampler):
    """Ancestral sampling at temperature ``1/alpha`` (the token-level power policy of the target's α).

    Parameters
    ----------
    n : int
        Independent draws made in one batch; the output is the first.
    """

    name = "low-temp"

    def _policy(self, target: PowerDistribution) -> PowerPolicy:
        return PowerPolicy(target.alpha)


class BestOfNSampler(_PolicySampler):
    """``n`` draws from the base model at temperature 1; the output is the draw with the highest ``log p``.

    Parameters
    ----------
    n : int
        Number of draws (``>= 1``).
    """

    name = "best-of-n"

    def __init__(self, n: int = 8) -> None:
        super().__init__(n)

    def _policy(self, target: PowerDistribution) -> PowerPolicy:
        return PowerPolicy(1.0)

    def run(self, target: PowerDistribution, generator: torch.Generator | None = None) -> SamplerResult:
        """Draw ``n`` completions at temperature 1; output the one with the highest ``log p``."""
        seqs, cost = self._draw(target, generator)
        log_p = seqs.log_p()
        return SamplerResult(seqs, int(torch.argmax(log_p)), cost)
