"""Site selectors: where a move cuts the sequence.

A selector returns ``log P_x(i)`` for every position of every row. Because the choice depends on the state,
the correction adds ``log P_{x'}(i) - log P_x(i)`` to the log acceptance ratio, with ``P_{x'}`` recomputed on the
proposed sequence. Forgetting this term is the classic bug when a move changes the length.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from egps_ppl.models.base import sample_from_cdf
from egps_ppl.rng import Generator
from egps_ppl.state import Sequences


@runtime_checkable
class SiteSelector(Protocol):
    """``log_probs(seqs) -> float64[C, T]``: log-probability of cutting each row at each position
    (``-inf`` where a cut is not allowed; a row with no allowed position has all ``-inf``)."""

    name: str

    def log_probs(self, seqs: Sequences) -> torch.Tensor:
        """Log-probability of cutting each row at each position.

        Parameters
        ----------
        seqs : Sequences
            The chains (their ``entropy`` and ``length`` are read).

        Returns
        -------
        torch.Tensor
            ``float64[C, T]``, normalised over each row's positions ``0 <= i < length``; ``-inf`` elsewhere.
        """
        ...


class UniformSite:
    """Cut uniformly over all generated positions ``0 <= i < n`` (Karan & Du)."""

    name = "uniform"

    def log_probs(self, seqs: Sequences) -> torch.Tensor:
        """Uniform over each row's positions ``0 <= i < length`` (see :meth:`SiteSelector.log_probs`)."""
        n = seqs.length.to(torch.float64).unsqueeze(1)
        return torch.where(seqs.valid_mask(), -n.log(), torch.full_like(n, -torch.inf))

    def __repr__(self) -> str:
        return "UniformSite()"


def sample_sites(log_probs: torch.Tensor, generator: Generator, streams: torch.Tensor | None = None) -> torch.Tensor:
    """One site per row from ``exp(log_probs[C, T])``; -1 for rows with no allowed site.

    Parameters
    ----------
    log_probs : torch.Tensor
        ``float64[C, T]`` from a selector's ``log_probs``.
    generator : torch.Generator, Streams or None
        Source of randomness.
    streams : torch.Tensor, optional
        ``long[C]``, each row's stream when ``generator`` is a :class:`~egps_ppl.rng.Streams`.

    Returns
    -------
    torch.Tensor
        ``long[C]``.
    """
    allowed = torch.isfinite(log_probs).any(1)
    top = torch.where(allowed, log_probs.max(1).values, torch.zeros_like(log_probs[:, 0]))
    weights = (log_probs - top.unsqueeze(1)).exp()  # exp(-inf) = 0 for disallowed sites
    weights[~allowed, 0] = 1.0  # any valid index; these rows get -1 below
    sites = sample_from_cdf(torch.cumsum(weights, dim=1), generator, streams)
    return torch.where(allowed, sites, torch.full_like(sites, -1))


def site_log_prob(log_probs: torch.Tensor, sites: torch.Tensor) -> torch.Tensor:
    """``log_probs[c, sites[c]]`` (``-inf`` where ``sites`` is -1)."""
    picked = log_probs.gather(1, sites.clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(sites >= 0, picked, torch.full_like(picked, -torch.inf))


def _normalised(weights: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """``log(weights / sum)`` over ``valid`` positions; uniform over them where every weight is 0."""
    weights = torch.where(valid, weights.clamp(min=0), torch.zeros_like(weights))
    total = weights.sum(1, keepdim=True)
    uniform = valid.to(weights.dtype)
    weights = torch.where(total > 0, weights, uniform)
    logw = weights.log() - weights.sum(1, keepdim=True).log()
    return torch.where(valid & (weights > 0), logw, torch.full_like(logw, -torch.inf))


class EntropySite:
    """Cut where the model is uncertain: ``P(i) ∝ floor + H_i^beta`` (``H_i``: entropy of p(. | x_<i)).

    With ``threshold`` set, positions with ``H_i < threshold`` get only the ``floor`` weight. The floor keeps
    every position reachable (so the chain stays irreducible); ``floor = 0`` with a threshold gives the pure
    "decision point" rule, uniform over all positions when no position passes the threshold.

    Parameters
    ----------
    beta : float
        Power of the entropy (``entropy-mh`` uses 1).
    floor : float
        Constant weight added at every position.
    threshold : float, optional
        Positions with entropy below it get only the floor.
    """

    def __init__(self, beta: float = 1.0, floor: float = 1e-3, threshold: float | None = None) -> None:
        self.beta, self.floor, self.threshold = float(beta), float(floor), threshold
        self.name = "entropy" if threshold is None else "decision"

    def log_probs(self, seqs: Sequences) -> torch.Tensor:
        """``∝ floor + H_i^beta`` (``floor`` alone below the threshold) over each row's positions; see the class."""
        weight = seqs.entropy.clamp(min=0) ** self.beta
        if self.threshold is not None:
            weight = torch.where(seqs.entropy >= self.threshold, weight, torch.zeros_like(weight))
        return _normalised(weight + self.floor, seqs.valid_mask())

    def __repr__(self) -> str:
        return f"EntropySite(beta={self.beta:g}, floor={self.floor:g}, threshold={self.threshold})"


class EntropyJumpSite:
    """Entropy-Cut MH (Zhou, Mehrotra & Liu): ``P(i) ∝ max(0, H_i - H_{i-1})^beta`` with ``H_{-1} = 0``;
    uniform when every jump is 0. ``floor`` adds a constant weight to keep all positions reachable.

    Parameters
    ----------
    beta : float
        Power of the entropy jump (4 in ``entropy-cut-mh`` and ``egps``).
    floor : float
        Constant weight added at every position (``egps`` uses 1e-3).
    """

    name = "entropy-jump"

    def __init__(self, beta: float = 4.0, floor: float = 0.0) -> None:
        self.beta, self.floor = float(beta), float(floor)

    def log_probs(self, seqs: Sequences) -> torch.Tensor:
        """``∝ floor + max(0, H_i - H_(i-1))^beta`` over each row's positions; see the class."""
        previous = torch.nn.functional.pad(seqs.entropy[:, :-1], (1, 0))
        jump = (seqs.entropy - previous).clamp(min=0) ** self.beta
        return _normalised(jump + self.floor, seqs.valid_mask())

    def __repr__(self) -> str:
        return f"EntropyJumpSite(beta={self.beta:g}, floor={self.floor:g})"


class CostAwareJumpSite:
    """Entropy jumps discounted by what a suffix move from there costs:
    ``P(i) ∝ (floor + max(0, H_i - H_{i-1})^beta) / (n - i)^gamma`` on a length-``n`` completion.

    A suffix move cut at ``i`` decodes ``n - i`` tokens per try (about), so among decisions of similar size it
    prefers the later, cheaper ones; ``gamma = 0`` is :class:`EntropyJumpSite`. The weights depend on the state
    (its entropies and length) like any selector's; kernels add ``log P_y(i) - log P_x(i)``.

    Parameters
    ----------
    beta : float
        Power of the entropy jump.
    floor : float
        Constant weight added at every position before the discount (keeps every position reachable).
    gamma : float
        Power of the remaining length in the discount, ``>= 0``.

    Raises
    ------
    EGPSError
        For a negative or non-finite ``beta``, ``floor`` or ``gamma``.
    """

    name = "cost-jump"

    def __init__(self, beta: float = 4.0, floor: float = 1e-3, gamma: float = 1.0) -> None:
        from egps_ppl.errors import EGPSError

        values = {"beta": beta, "floor": floor, "gamma": gamma}
        for key, value in values.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value < float("inf"):
                raise EGPSError(f"CostAwareJumpSite: {key} must be a finite number >= 0, got {value!r}")
        self.beta, self.floor, self.gamma = float(beta), float(floor), float(gamma)

    def log_probs(self, seqs: Sequences) -> torch.Tensor:
        """``∝ (floor + jump_i^beta) / (n - i)^gamma`` over each row's positions; see the class."""
        previous = torch.nn.functional.pad(seqs.entropy[:, :-1], (1, 0))
        jump = (seqs.entropy - previous).clamp(min=0) ** self.beta + self.floor
        remaining = (seqs.length.unsqueeze(1) - seqs.positions()).clamp(min=1).to(jump.dtype)
        return _normalised(jump / remaining**self.gamma, seqs.valid_mask())

    def __repr__(self) -> str:
        return f"CostAwareJumpSite(beta={self.beta:g}, floor={self.floor:g}, gamma={self.gamma:g})"
