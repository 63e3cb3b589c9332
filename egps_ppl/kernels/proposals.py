"""Proposals: what replaces the sequence from the cut on, as ``k`` tries per chain.

One interface serves Metropolis–Hastings (one try) and Multiple-Try Metropolis (``k`` tries): a proposal
returns its tries with ``log q(y | x)``, ``log q(x | y)`` and a validity mask, so no correction needs to know
how a proposal works. A new scheme is written once and runs under both.

Validity
--------
``valid[c, j]`` false means try ``j`` of chain ``c`` is not a candidate (it gets weight 0 in MTM and is rejected
by MH). The relation must be symmetric: ``y`` is a valid try from ``x`` exactly when ``x`` is a valid try from
``y``. A local move that must stay in a class of sequences (same prefix, same tail) expresses that this way.

Independence
------------
``independent = True`` declares that ``q(· | x) = q(· | y)`` for every valid try ``y`` of ``x`` (the tries depend
on ``x`` only through what ``y`` shares with it, e.g. the prefix before the cut). MTM then reuses the other
tries as the reference points of the reverse move, which costs nothing; for other proposals it draws
``k - 1`` reference tries from the chosen one.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from numbers import Integral
from typing import Protocol, runtime_checkable

import torch

from egps_ppl.errors import EGPSError
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.rng import categorical
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution


@dataclass
class Tries:
    """``k`` proposals for each of ``C`` chains, drawn in one batch.

    Attributes
    ----------
    seqs : Sequences
        ``C * k`` scored rows; the tries of chain ``c`` are rows ``c*k .. c*k + k - 1``.
    log_q_forward : torch.Tensor
        ``float64[C, k]``, ``log q(y_j | x)``.
    log_q_reverse : torch.Tensor
        ``float64[C, k]``, ``log q(x | y_j)``.
    valid : torch.Tensor
        ``bool[C, k]``, which tries are candidates (see the module docstring).
    cost : Cost
        What the tries spent, per chain (summed over its ``k`` rows).
    """

    seqs: Sequences
    log_q_forward: torch.Tensor
    log_q_reverse: torch.Tensor
    valid: torch.Tensor
    cost: Cost

    @property
    def num_tries(self) -> int:
        """``k``, the tries per chain."""
        return self.log_q_forward.shape[1]

    def pick(self, index: torch.Tensor) -> Sequences:
        """Try ``index[c]`` of every chain ``c`` as a ``C``-row batch (the cache follows the rows).

        Parameters
        ----------
        index : torch.Tensor
            ``long[C]``, one try per chain.

        Returns
        -------
        Sequences
        """
        if self.num_tries == 1:
            return self.seqs
        rows = torch.arange(index.numel(), device=index.device) * self.num_tries + index
        return self.seqs.take(rows)


@runtime_checkable
class Proposal(Protocol):
    """``propose(target, state, cut, num_tries, generator) -> Tries``.

    Attributes
    ----------
    policy : PowerPolicy
        The token policy the proposal samples with; the state's ``logq`` is kept under it.
    name : str
        Short name used in kernel names.
    independent : bool
        ``q(· | x)`` is the same for every valid try of ``x`` (see the module docstring).
    """

    policy: PowerPolicy
    name: str
    independent: bool

    def propose(
        self,
        target: PowerDistribution,
        state: Sequences,
        cut: torch.Tensor,
        num_tries: int,
        generator: torch.Generator | None,
    ) -> Tries:
        """Propose ``num_tries`` new sequences for every chain from its cut.

        Parameters
        ----------
        target : PowerDistribution
            The target (its backend does the sampling and scoring).
        state : Sequences
            The current chains, with statistics under ``self.policy``.
        cut : torch.Tensor
            ``long[C]``, the cut of each chain; ``-1`` means no move (its tries are invalid).
        num_tries : int
            ``k >= 1``.
        generator : torch.Generator or None
            Source of randomness.

        Returns
        -------
        Tries
        """
        ...


def replicate(state: Sequences, cut: torch.Tensor, num_tries: int) -> tuple[Sequences, torch.Tensor]:
    """Each row of ``state`` (and its cut) repeated ``num_tries`` times, consecutively; no copy for one try.

    Parameters
    ----------
    state : Sequences
        ``C`` rows.
    cut : torch.Tensor
        ``long[C]``.
    num_tries : int
        ``k``.

    Returns
    -------
    (Sequences, torch.Tensor)
        ``C * k`` rows and their cuts.
    """
    if num_tries == 1:
        return state, cut
    rows = torch.arange(state.num_rows, device=state.device).repeat_interleave(num_tries)
    return state.take(rows), cut[rows]


def per_chain(cost: Cost, num_tries: int) -> Cost:
    """A cost of ``C * k`` rows summed over each chain's ``k`` consecutive rows."""
    return Cost(
        cost.decode_tokens.view(-1, num_tries).sum(1),
        cost.scored_tokens.view(-1, num_tries).sum(1),
        cost.forward_calls,
    )


def _check_tries(num_tries: int) -> None:
    if isinstance(num_tries, bool) or not isinstance(num_tries, int) or num_tries < 1:
        raise EGPSError(f"num_tries must be an integer >= 1, got {num_tries!r}")


class SuffixProposal:
    """Resample everything from the cut on from the token policy (default q ∝ p^α), up to the length limit.

    ``log q(y | x) = Σ_{t ≥ i} log q(y_t | y_<t)`` and ``log q(x | y)`` is the same sum over x's suffix, which
    the state already holds. The tries depend on x only through its prefix, so the proposal is independent.

    Parameters
    ----------
    policy : PowerPolicy
        The token policy to resample with (the target's q ∝ p^α in the ``mh`` preset).
    """

    name = "suffix"
    independent = True

    def __init__(self, policy: PowerPolicy) -> None:
        self.policy = policy

    def propose(
        self,
        target: PowerDistribution,
        state: Sequences,
        cut: torch.Tensor,
        num_tries: int,
        generator: torch.Generator | None,
    ) -> Tries:
        """Resample each chain from its cut to the end, ``num_tries`` times (see :meth:`Proposal.propose`)."""
        _check_tries(num_tries)
        base, cut_r = replicate(state, cut, num_tries)
        moving = cut_r >= 0
        # Rows without a site sample nothing: they start and stop at their own length.
        start = torch.where(moving, cut_r, base.length)
        stop = torch.where(moving, base.limit_rows(), base.length)
        drawn, cost = target.lm.extend(base, start, stop, generator)
        start_x = torch.where(cut >= 0, cut, state.length)
        shape = (state.num_rows, num_tries)
        return Tries(
            seqs=drawn,
            log_q_forward=drawn.total("logq", start).view(shape),
            log_q_reverse=state.total("logq", start_x).unsqueeze(1).expand(shape),
            valid=(cut >= 0).unsqueeze(1).expand(shape),
            cost=per_chain(cost, num_tries),
        )

    def __repr__(self) -> str:
        return f"SuffixProposal({self.policy.describe()})"


class WindowProposal:
    """Resample a window of ``W`` tokens from the cut and keep the tail: a local move.

    For a cut ``i`` in ``x`` of length ``n``, the move stays in the class of sequences that share x's prefix
    before ``i`` and its tail from ``i + W`` on:

    * if x has a tail (``n > i + W``), a try resamples positions ``i .. i+W-1`` from the policy and is valid
      when the window is full and has no EOS; x's tail is spliced back and rescored in one batched pass (its
      conditionals changed, so its log p enters π);
    * otherwise a try resamples at most ``W`` tokens and is valid when it ends (EOS, or the length limit)
      within them.

    Both x and every valid try belong to the same class, and the tries depend on x only through what the class
    shares, so the proposal is independent: ``log q(x | y)`` is the policy's density of x's own window. ``W`` is
    drawn per chain and step from ``widths`` (with ``weights``) independently of the state, and shared by that
    chain's tries, so it needs no correction term.

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
    independent = True

    def __init__(
        self, policy: PowerPolicy, widths: int | Sequence[int] = 8, weights: Sequence[float] | None = None
    ) -> None:
        self.policy = policy
        listed = [widths] if isinstance(widths, Integral) else list(widths)
        if not all(isinstance(w, Integral) and not isinstance(w, bool) for w in listed):
            raise EGPSError(f"window widths must be integers >= 1, got {widths!r}")
        self.widths = torch.as_tensor([int(w) for w in listed], dtype=torch.long)
        if self.widths.numel() == 0 or (self.widths < 1).any():
            raise EGPSError(f"window widths must be integers >= 1, got {widths!r}")
        w = torch.ones(len(self.widths)) if weights is None else torch.as_tensor(weights, dtype=torch.float64)
        if w.shape != self.widths.shape or not bool(torch.isfinite(w).all()) or (w < 0).any() or w.sum() <= 0:
            raise EGPSError("window weights must be finite, >= 0, one per width, not all 0")
        self.weights = w.double() / w.sum()

    def propose(
        self,
        target: PowerDistribution,
        state: Sequences,
        cut: torch.Tensor,
        num_tries: int,
        generator: torch.Generator | None,
    ) -> Tries:
        """Resample each chain's window after its cut ``num_tries`` times and rescore the kept tail."""
        windows = self.draw_windows(target, state, cut, num_tries, generator)
        splice = windows.valid & windows.has_tail
        proposed, rescored = target.lm.score(windows.spliced, torch.where(splice, windows.end, windows.spliced.length))
        return windows.tries(proposed, rescored, state.total("logq", *windows.own))

    def draw_windows(
        self,
        target: PowerDistribution,
        state: Sequences,
        cut: torch.Tensor,
        num_tries: int,
        generator: torch.Generator | None,
    ) -> Windows:
        """Draw ``num_tries`` windows per chain from ``self.policy`` and splice x's tail back where the try is valid
        (not yet rescored): the move both this proposal and variants that rescore differently share."""
        _check_tries(num_tries)
        pick = categorical(self.weights, state.num_rows, generator, state.stream)
        width = self.widths[pick].to(state.device)
        base, cut_r = replicate(state, cut, num_tries)
        end = cut_r + (width.repeat_interleave(num_tries) if num_tries > 1 else width)
        moving = cut_r >= 0
        start = torch.where(moving, cut_r, base.length)
        has_tail = base.length > end
        stop = torch.where(moving, torch.minimum(end, base.limit_rows()), base.length)
        drawn, cost = target.lm.extend(base.with_(policy=self.policy), start, stop, generator)
        full_window = (drawn.length == end) & ~drawn.finished()
        valid = moving & torch.where(has_tail, full_window, drawn.complete())
        # Valid tries of a chain with a tail take that tail back; it is rescored under the new window.
        splice = valid & has_tail
        from_old = splice.unsqueeze(1) & (base.positions() >= end.unsqueeze(1))
        spliced = drawn.with_(
            tokens=torch.where(from_old, base.tokens, drawn.tokens),
            length=torch.where(splice, base.length, drawn.length),
        )
        return Windows(spliced, drawn.total("logq", start), start, end, width, moving, has_tail, valid, cost)

    def __repr__(self) -> str:
        return f"WindowProposal({self.policy.describe()}, widths={self.widths.tolist()})"


@dataclass
class Windows:
    """What :meth:`WindowProposal.draw_windows` drew: ``C * k`` rows and, per row, the window's bounds.

    Attributes
    ----------
    spliced : Sequences
        The tries with x's tail put back where valid (statistics of the tail not yet rescored).
    forward : torch.Tensor
        ``log q(window)`` under the drawing policy, per row.
    start, end : torch.Tensor
        The window's first position and its end (``start + W``) per row.
    width : torch.Tensor
        ``W`` per chain.
    moving, has_tail, valid : torch.Tensor
        Per row: the chain has a cut; x has a tail past the window; the try is a candidate.
    cost : Cost
        The draw's cost per row.
    """

    spliced: Sequences
    forward: torch.Tensor
    start: torch.Tensor
    end: torch.Tensor
    width: torch.Tensor
    moving: torch.Tensor
    has_tail: torch.Tensor
    valid: torch.Tensor
    cost: Cost

    @property
    def own(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Per chain, the bounds ``(lo, hi)`` of x's own window: from the cut (or the length, for a chain without
        one) to ``W`` tokens after it."""
        lo = self.start.view(self.width.shape[0], -1)[:, 0]
        return lo, lo + self.width

    def tries(
        self, proposed: Sequences, rescored: Cost, log_q_reverse: torch.Tensor, extra: Cost | None = None
    ) -> Tries:
        """The :class:`Tries` of these windows once rescored: ``proposed`` (``C * k`` rows), what rescoring
        cost per row, ``log q`` of x's own window per chain and any further cost per chain (``extra``)."""
        chains = self.width.shape[0]
        num_tries = self.valid.shape[0] // chains
        shape = (chains, num_tries)
        cost = per_chain(self.cost + rescored, num_tries)
        return Tries(
            seqs=proposed,
            log_q_forward=self.forward.view(shape),
            log_q_reverse=log_q_reverse.unsqueeze(1).expand(shape),
            valid=self.valid.view(shape),
            cost=cost if extra is None else cost + extra,
        )
