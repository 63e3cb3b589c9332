"""Proposals: what replaces the sequence from the cut on.

A proposal returns the proposed batch with the forward and reverse proposal log-densities, so the correction
(MH or MTM) never needs to know how the proposal works.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution


@dataclass
class Proposed:
    """A proposal for each chain: ``seqs`` with ``log q(x' | x)`` and ``log q(x | x')``."""

    seqs: Sequences
    log_q_forward: torch.Tensor
    log_q_reverse: torch.Tensor
    cost: Cost


class Proposal(Protocol):
    """``propose(target, state, cut, generator) -> Proposed``; ``policy`` is the token policy it samples with."""

    policy: PowerPolicy

    def propose(
        self, target: PowerDistribution, state: Sequences, cut: torch.Tensor, generator: torch.Generator | None
    ) -> Proposed: ...


class SuffixProposal:
    """Resample everything from the cut on from the token policy (default q ∝ p^α), up to the length limit.

    ``log q(x' | x) = Σ_{t ≥ i} log q(x'_t | x'_<t)`` and the reverse is the same sum over the current suffix,
    which the state already holds.
    """

    name = "suffix"

    def __init__(self, policy: PowerPolicy) -> None:
        self.policy = policy

    def propose(
        self, target: PowerDistribution, state: Sequences, cut: torch.Tensor, generator: torch.Generator | None
    ) -> Proposed:
        start = cut.clamp(min=0)
        # Rows without a site keep their whole sequence: extend from their length samples nothing new
        # only if they are complete, so keep them unchanged by starting at their length and stopping there.
        stop = torch.where(cut >= 0, torch.full_like(cut, state.limit), state.length)
        start = torch.where(cut >= 0, start, state.length)
        proposed, cost = target.lm.extend(state, start, stop, generator)
        return Proposed(proposed, proposed.total("logq", start), state.total("logq", start), cost)

    def __repr__(self) -> str:
        return f"SuffixProposal({self.policy.describe()})"
