"""Proposals: what replaces the sequence from the cut on.

A proposal returns the proposed batch with the forward and reverse proposal log-densities, so the correction
(MH or MTM) never needs to know how the proposal works.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import torch

from egps_ppl.errors import EGPSError
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution


@dataclass
class Proposed:
    """A proposal for each chain: ``seqs`` with ``log q(x' | x)`` and ``log q(x | x')``.

    Attributes
    ----------
    seqs : Sequences
        The proposed sequences, scored.
    log_q_forward : torch.Tensor
        ``float64[C]``, ``log q(x' | x)``.
    log_q_reverse : torch.Tensor
        ``float64[C]``, ``log q(x | x')``.
    cost : Cost
        What the proposal spent.
    """

    seqs: Sequences
    log_q_forward: torch.Tensor
    log_q_reverse: torch.Tensor
    cost: Cost


class Proposal(Protocol):
    """``propose(target, state, cut, generator) -> Proposed``; ``policy`` is the token policy it samples with."""

    policy: PowerPolicy

    def propose(
        self, target: PowerDistribution, state: Sequences, cut: torch.Tensor, generator: torch.Generator | None
    ) -> Proposed:
        """Propose a new sequence for every chain from its cut.

        Parameters
        ----------
        target : PowerDistribution
            The target (its backend does the sampling and scoring).
        state : Sequences
            The current chains, with statistics under ``self.policy``.
        cut : torch.Tensor
            ``long[C]``, the cut of each chain; ``-1`` leaves the chain unchanged.
        generator : torch.Generator or None
            Source of randomness.

        Returns
        -------
        Proposed
            The proposals with ``log q(x' | x)``, ``log q(x | x')`` and the cost.
        """
        ...


class SuffixProposal:
    """Resample everything from the cut on from the token policy (default q ∝ p^α), up to the length limit.

    ``log q(x' | x) = Σ_{t ≥ i} log q(x'_t | x'_<t)`` and the reverse is the same sum over the current suffix,
    which the state already holds.

    Parameters
    ----------
    policy : PowerPolicy
        The token policy to resample with (the target's q ∝ p^α in the ``mh`` preset).
    """

    name = "suffix"

    def __init__(self, policy: PowerPolicy) -> None:
        self.policy = policy

    def propose(
        self, target: PowerDistribution, state: Sequences, cut: torch.Tensor, generator: torch.Generator | None
    ) -> Proposed:
        """Resample each chain from its cut to the end (see :meth:`Proposal.propose`)."""
        start = cut.clamp(min=0)
        # Rows without a site keep their whole sequence: extend from their length samples nothing new
        # only if they are complete, so keep them unchanged by starting at their length and stopping there.
        stop = torch.where(cut >= 0, torch.full_like(cut, state.limit), state.length)
        start = torch.where(cut >= 0, start, state.length)
        proposed, cost = target.lm.extend(state, start, stop, generator)
        return Proposed(proposed, proposed.total("logq", start), state.total("logq", start), cost)

    def __repr__(self) -> str:
        return f"SuffixProposal({self.policy.describe()})"


class WindowProposal:
    """Resample a window of ``W`` tokens from the cut and keep the tail (a local move).

    For a cut ``i`` in a sequence of length ``n``:

    * if ``n > i + W`` (there is a tail), positions ``i .. i+W-1`` are resampled from the policy and the old
      tail is kept and rescored in one batched pass (its conditionals changed, so its log p enters π); if the
      new window ends in EOS the tail is dropped;
    * otherwise the move resamples the whole suffix (as :class:`SuffixProposal`), since there is no tail.

    The reverse move from ``x'`` applies the same rule, so the reverse density is the policy's density of the
    first ``min(W, n - i)`` tokens of ``x`` from ``i`` when ``x'`` has a tail, else of its whole suffix. ``W``
    is drawn per move from ``widths`` (with ``weights``) independently of the state, so the width needs no
    correction term. A tail that the new window makes impossible gets log p = -inf and is rejected.

    Parameters
    ----------
    policy : PowerPolicy
        The token policy the window is resampled with.
    widths : int or sequence of int
        Window width ``W``, or several to choose from per move.
    weights : sequence of float, optional
        Probabilities of ``widths`` (uniform by default).

    Raises
    ------
    EGPSError
        For widths below 1, or weights that are negative, all zero or not one per width.
    """

    name = "window"

    def __init__(
        self, policy: PowerPolicy, widths: int | Sequence[int] = 8, weights: Sequence[float] | None = None
    ) -> None:
        self.policy = policy
        self.widths = torch.as_tensor([widths] if isinstance(widths, int) else list(widths), dtype=torch.long)
        if self.widths.numel() == 0 or (self.widths < 1).any():
            raise EGPSError(f"window widths must be integers >= 1, got {widths!r}")
        w = torch.ones(len(self.widths)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != self.widths.shape or (w < 0).any() or w.sum() <= 0:
            raise EGPSError("window weights must be >= 0, one per width, not all 0")
        self.weights = w.double() / w.sum()

    def propose(
        self, target: PowerDistribution, state: Sequences, cut: torch.Tensor, generator: torch.Generator | None
    ) -> Proposed:
        """Resample each chain's window after its cut and rescore the kept tail (see :meth:`Proposal.propose`)."""
        lm = target.lm
        pick = torch.multinomial(self.weights, state.num_rows, replacement=True, generator=generator)
        width = self.widths[pick].to(state.device)
        moving = cut >= 0
        start = torch.where(moving, cut, state.length)
        has_tail = moving & (state.length > cut + width)
        stop = torch.where(has_tail, cut + width, torch.where(moving, torch.full_like(cut, state.limit), state.length))
        window, cost = lm.extend(state, start, stop, generator)
        forward = window.total("logq", start)
        # Rows whose full window did not end in EOS take back their old tail, which is rescored.
        splice = has_tail & (window.length == cut + width) & ~window.finished()
        positions = state.positions()
        from_old = splice.unsqueeze(1) & (positions >= (cut + width).unsqueeze(1))
        spliced = window.with_(
            tokens=torch.where(from_old, state.tokens, window.tokens),
            length=torch.where(splice, state.length, window.length),
        )
        proposed, rescored = lm.score(spliced, torch.where(splice, cut + width, spliced.length))
        reverse_count = torch.where(
            proposed.length > cut + width, torch.minimum(width, state.length - start), state.length - start
        )
        reverse = state.total("logq", start, start + reverse_count)
        return Proposed(proposed, forward, reverse, cost + rescored)

    def __repr__(self) -> str:
        return f"WindowProposal({self.policy.describe()}, widths={self.widths.tolist()})"
