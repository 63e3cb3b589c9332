"""What every transition kernel shares: a typed info record and the ``step`` contract."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch

from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.rng import Generator, uniform
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution


@dataclass
class StepInfo:
    """What one kernel step did, per chain.

    Attributes
    ----------
    accepted:
        ``bool[C]``: the state changed (a proposal was accepted).
    accept_prob:
        ``float64[C]``: the acceptance probability ``min(1, r)`` (1 for kernels that always move).
    cut:
        ``long[C]``: the chosen site, -1 where the step made no proposal.
    decode_tokens, scored_tokens:
        ``long[C]``: tokens sampled sequentially / teacher-forced, as counted by the backend.
    forward_calls:
        Batched forward calls the step made (shared by all chains).
    """

    accepted: torch.Tensor
    accept_prob: torch.Tensor
    cut: torch.Tensor
    decode_tokens: torch.Tensor
    scored_tokens: torch.Tensor
    forward_calls: int = 0

    @classmethod
    def from_cost(cls, accepted: torch.Tensor, accept_prob: torch.Tensor, cut: torch.Tensor, cost: Cost) -> StepInfo:
        """An info record whose token counters and forward calls come from a backend :class:`Cost`.

        Parameters
        ----------
        accepted : torch.Tensor
            ``bool[C]``, whether each chain moved.
        accept_prob : torch.Tensor
            ``float64[C]``, the acceptance probabilities.
        cut : torch.Tensor
            ``long[C]``, the chosen sites (-1: no proposal).
        cost : Cost
            Everything the step spent.

        Returns
        -------
        StepInfo
        """
        return cls(accepted, accept_prob, cut, cost.decode_tokens, cost.scored_tokens, cost.forward_calls)

    @classmethod
    def idle(cls, num_chains: int, device: torch.device | str = "cpu") -> StepInfo:
        """A step that did nothing (used by schedules that skip a block)."""
        zeros = torch.zeros(num_chains, dtype=torch.long, device=device)
        return cls(
            torch.zeros(num_chains, dtype=torch.bool, device=device),
            torch.zeros(num_chains, dtype=torch.float64, device=device),
            torch.full((num_chains,), -1, dtype=torch.long, device=device),
            zeros,
            zeros.clone(),
        )

    @property
    def cost(self) -> Cost:
        """The step's token counters and forward calls as a :class:`Cost`."""
        return Cost(self.decode_tokens, self.scored_tokens, self.forward_calls)


class Kernel(ABC):
    """A Markov transition kernel that leaves ``target`` invariant: ``step(state, generator) -> (state, info)``.

    Kernels are pure functions of the state and the random generator: all chains advance in one batched call.
    Subclasses set ``target`` and ``name`` and implement :meth:`step`; kernels that propose with a token policy
    other than the target's default override :attr:`policy`. Prove a new kernel correct with
    :func:`egps_ppl.testing.assert_invariant`.

    Attributes
    ----------
    target : PowerDistribution
        The distribution the kernel leaves invariant.
    name : str
        Short name, used in progress bars, run attributes and combinator names.
    """

    target: PowerDistribution
    name: str = "kernel"

    @abstractmethod
    def step(self, state: Sequences, generator: torch.Generator | None = None) -> tuple[Sequences, StepInfo]:
        """Advance every chain by one transition.

        Parameters
        ----------
        state : Sequences
            The current chains (all rows advance together).
        generator : torch.Generator, optional
            Source of randomness; the same generator state gives the same step.

        Returns
        -------
        (Sequences, StepInfo)
            The new chains and what the step did per chain.
        """

    @property
    def policy(self) -> PowerPolicy:
        """The token policy the kernel proposes with (the target's q ∝ p^α unless set); chains start with their
        ``logq`` under it."""
        return self.__dict__.get("_policy") or self.target.default_policy()

    @policy.setter
    def policy(self, value: PowerPolicy) -> None:
        self._policy = value

    def prepare(self, state: Sequences) -> tuple[Sequences, Cost]:
        """Bring a state into the form this kernel's ratios assume (e.g. ``logq`` under its policy)."""
        return state, Cost.zero(state.num_rows, state.device)

    def __repr__(self) -> str:
        return self.name


def parts_name(prefix: str, selector: object, proposal: object, *extras: str) -> str:
    """A kernel's display name: ``prefix``, with the parts that differ from the defaults in brackets.

    Parameters
    ----------
    prefix : str
        ``mh``, ``mtm``, ...
    selector, proposal : object
        Their ``name`` is shown unless it is ``uniform`` / ``suffix``.
    *extras : str
        Further settings to show (e.g. ``k=8``).

    Returns
    -------
    str

    Examples
    --------
    >>> class Site:
    ...     name = "entropy"
    >>> class Suffix:
    ...     name = "suffix"
    >>> parts_name("mh", Site(), Suffix()), parts_name("mtm", None, None, "k=8")
    ('mh[entropy]', 'mtm[k=8]')
    """
    parts = [getattr(selector, "name", "uniform"), getattr(proposal, "name", "suffix")]
    shown = [p for p, default in zip(parts, ("uniform", "suffix"), strict=True) if p != default]
    shown += [e for e in extras if e]
    return prefix + (f"[{','.join(shown)}]" if shown else "")


def metropolis_accept(
    log_ratio: torch.Tensor, current_lp: torch.Tensor, generator: Generator, streams: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Accept with probability ``min(1, exp(log_ratio))``; return ``(accepted, accept_prob)``.

    A NaN ratio (both states impossible) is a rejection; a chain stuck at an impossible state
    (``current_lp = -inf``) accepts any possible proposal, so a bad start can still recover.

    Parameters
    ----------
    log_ratio : torch.Tensor
        ``float64[C]``, the log acceptance ratios.
    current_lp : torch.Tensor
        ``float64[C]``, ``log π`` of the current states.
    generator : torch.Generator, Streams or None
        Source of the uniform draws (on the CPU, so results do not depend on the device).
    streams : torch.Tensor, optional
        ``long[C]``, each chain's stream (``state.stream``) when ``generator`` is a :class:`~egps_ppl.rng.Streams`.

    Returns
    -------
    (torch.Tensor, torch.Tensor)
        ``bool[C]`` accepted, and ``float64[C]`` acceptance probabilities.

    Examples
    --------
    >>> accepted, prob = metropolis_accept(torch.tensor([0.0, -torch.inf]), torch.zeros(2), None)
    >>> accepted.tolist(), prob.tolist()
    ([True, False], [1.0, 0.0])
    """
    stuck = torch.isneginf(current_lp)
    log_ratio = torch.where(stuck & ~torch.isnan(log_ratio), torch.full_like(log_ratio, torch.inf), log_ratio)
    log_ratio = torch.nan_to_num(log_ratio, nan=-torch.inf, posinf=torch.inf)
    accept_prob = log_ratio.clamp(max=0.0).exp()
    u = uniform(generator, log_ratio.numel(), streams).to(log_ratio.device)
    return u.log() < log_ratio, accept_prob
