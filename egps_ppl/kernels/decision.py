"""Suffix moves that branch at a decision: the first new token from a hotter policy than the rest.

At a decision point the token that π ∝ p^α prefers is often one that the low-temperature policy (q ∝ p^α per
token) almost never proposes, because π's preference comes from the futures (ζ), not from the token's own
probability. Resampling the whole suffix at temperature 1, on the other hand, fills the rest of the completion
with base-model noise that π down-weights by ``p^(α-1)`` per token. :class:`DecisionSuffixProposal` does both:
the token at the cut comes from ``first`` (default temperature 1, the base model), everything after it from the
proposal's ``policy`` (default the target's q ∝ p^α), so a try can take a different branch and still finish
coherently.

Its density is exact: ``log q(y | x) = log q_first(y_i | h_i) + Σ_{t > i} log q(y_t | y_<t)``, and the reverse
density needs x's own token at the cut under ``first``. For ``first`` at temperature 1 without truncation that
is ``log p(x_i | h_i)``, which the state already holds; any other ``first`` policy rescored the one position
(one scored token per chain). The token at the cut of every try is rescored under ``policy`` too (a stored
``logq`` must refer to the state's policy), which costs nothing for an untruncated policy (the normaliser at
the cut depends only on the shared prefix) and one scored token per try otherwise.
"""

from __future__ import annotations

import torch

from egps_ppl.kernels.proposals import Tries, WindowProposal, _check_tries, per_chain, replicate
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

__all__ = ["DecisionSuffixProposal", "HotWindowProposal"]


def _free_first(policy: PowerPolicy) -> bool:
    """``log q_first(v | h) = log p(v | h)``: temperature 1 and no truncation."""
    return policy.alpha == 1.0 and not policy.truncated


def _at(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``values[r, index[r]]`` (0 where ``index`` is negative)."""
    return values.gather(1, index.clamp(min=0).unsqueeze(1)).squeeze(1)


class DecisionSuffixProposal:
    """Resample from the cut to the end: the token at the cut from ``first``, the rest from ``policy``.

    The tries depend on x only through its prefix before the cut, so the proposal is independent (MTM reuses
    the other tries as reference points). With ``first == policy`` it is :class:`SuffixProposal`.

    Parameters
    ----------
    policy : PowerPolicy
        The policy of every token after the cut (the state's ``logq`` is kept under it).
    first : PowerPolicy, optional
        The policy of the token at the cut (default temperature 1, no truncation: free to evaluate).

    Raises
    ------
    EGPSError
        If ``policy`` or ``first`` is not a :class:`~egps_ppl.models.policy.PowerPolicy`.

    Examples
    --------
    >>> from egps_ppl.kernels import MultipleTryMetropolis
    >>> from egps_ppl.kernels.sites import EntropyJumpSite
    >>> from egps_ppl.models.testbeds import random_markov
    >>> target = PowerDistribution(random_markov(4, seed=0), [], alpha=4.0, max_new_tokens=6)
    >>> proposal = DecisionSuffixProposal(target.default_policy())
    >>> kernel = MultipleTryMetropolis(target, 4, selector=EntropyJumpSite(floor=1e-3), proposal=proposal)
    >>> kernel.name
    'mtm[entropy-jump,decision-suffix]'
    """

    name = "decision-suffix"
    independent = True

    def __init__(self, policy: PowerPolicy, first: PowerPolicy | None = None) -> None:
        from egps_ppl.errors import EGPSError

        first = PowerPolicy(1.0) if first is None else first
        if not isinstance(policy, PowerPolicy) or not isinstance(first, PowerPolicy):
            raise EGPSError("DecisionSuffixProposal needs PowerPolicy objects for policy and first")
        self.policy, self.first = policy, first

    def propose(
        self,
        target: PowerDistribution,
        state: Sequences,
        cut: torch.Tensor,
        num_tries: int,
        generator: torch.Generator | None,
    ) -> Tries:
        """Draw ``num_tries`` suffixes per chain from its cut (see the class and :meth:`Proposal.propose`)."""
        _check_tries(num_tries)
        lm = target.lm
        base, cut_r = replicate(state, cut, num_tries)
        moving = cut_r >= 0
        start = torch.where(moving, cut_r, base.length)
        # 1. The token at the cut, from `first`.
        one = torch.where(moving, torch.minimum(cut_r + 1, base.limit_rows()), base.length)
        drawn, cost = lm.extend(base.with_(policy=self.first), start, one, generator)
        first_lq = torch.where(moving, _at(drawn.logq, start), torch.zeros_like(start, dtype=torch.float64))
        # 2. Its statistics under `policy` (the state's policy): the normaliser depends only on the prefix.
        drawn = drawn.with_(policy=self.policy)
        if self.policy.truncated:
            drawn, rescored = lm.score(drawn, torch.where(moving, start, drawn.length))
            cost = cost + rescored
        else:
            pos = drawn.positions() == start.unsqueeze(1)
            at_cut = pos & moving.unsqueeze(1)
            logz = _at(base.logz, start).unsqueeze(1)
            drawn = drawn.with_(
                logz=torch.where(at_cut, logz, drawn.logz),
                logq=torch.where(at_cut, self.policy.alpha * drawn.logp - logz, drawn.logq),
            )
        # 3. The rest, from `policy`.
        rest = torch.where(moving, base.limit_rows(), drawn.length)
        drawn, more = lm.extend(drawn, drawn.length, rest, generator)
        cost = cost + more
        after = torch.where(moving, start + 1, drawn.length)
        forward = first_lq + drawn.total("logq", after)
        # Reverse: x's token at its cut under `first`, the rest under `policy` (held by the state).
        start_x = torch.where(cut >= 0, cut, state.length)
        reverse_first, reverse_cost = self._first_log_q(target, state, cut)
        reverse = reverse_first + state.total("logq", start_x + 1)
        shape = (state.num_rows, num_tries)
        return Tries(
            seqs=drawn,
            log_q_forward=forward.view(shape),
            log_q_reverse=reverse.unsqueeze(1).expand(shape),
            valid=(cut >= 0).unsqueeze(1).expand(shape),
            cost=per_chain(cost, num_tries) + reverse_cost,
        )

    def _first_log_q(self, target: PowerDistribution, state: Sequences, cut: torch.Tensor) -> tuple[torch.Tensor, Cost]:
        """``log q_first(x_i | h_i)`` at each chain's cut (0 where there is none) and what it cost."""
        moving = cut >= 0
        zero = torch.zeros(state.num_rows, dtype=torch.float64, device=state.device)
        if _free_first(self.first):
            return torch.where(moving, _at(state.logp, cut), zero), Cost.zero(state.num_rows, state.device)
        if self.first == self.policy:
            return torch.where(moving, _at(state.logq, cut), zero), Cost.zero(state.num_rows, state.device)
        stop = torch.where(moving, cut + 1, state.length)
        short = state.truncated(stop).with_(policy=self.first)
        scored, cost = target.lm.score(short, torch.where(moving, cut, short.length))
        return torch.where(moving, _at(scored.logq, cut), zero), cost

    def __repr__(self) -> str:
        return f"DecisionSuffixProposal({self.policy.describe()}, first={self.first.describe()})"


class HotWindowProposal:
    """A local window move drawn from ``window_policy`` while the state stays under ``policy``.

    The same move as :class:`~egps_ppl.kernels.proposals.WindowProposal` (resample ``W`` tokens from the cut,
    keep and rescore the tail; the same validity rule), but the window's tokens come from ``window_policy``
    (default temperature 1) and the state's ``logq`` stays under ``policy``. Kernels that mix it with suffix
    moves at ``policy`` then share one policy, so no part has to rescore the whole state before it moves. The
    window and the tail are rescored under ``policy`` (``W`` more scored tokens per try than ``WindowProposal``);
    the reverse density of x's window under ``window_policy`` is free at temperature 1 without truncation
    (``Σ log p``) and rescored otherwise.

    Parameters
    ----------
    policy : PowerPolicy
        The state's policy.
    window_policy : PowerPolicy, optional
        The policy of the window's tokens (default temperature 1, no truncation).
    widths, weights
        As in :class:`~egps_ppl.kernels.proposals.WindowProposal`.

    Raises
    ------
    EGPSError
        For bad widths or weights, or policies that are not :class:`~egps_ppl.models.policy.PowerPolicy`.
    """

    name = "hot-window"
    independent = True

    def __init__(
        self,
        policy: PowerPolicy,
        window_policy: PowerPolicy | None = None,
        widths: int | list[int] = 4,
        weights: list[float] | None = None,
    ) -> None:
        from egps_ppl.errors import EGPSError

        window_policy = PowerPolicy(1.0) if window_policy is None else window_policy
        if not isinstance(policy, PowerPolicy) or not isinstance(window_policy, PowerPolicy):
            raise EGPSError("HotWindowProposal needs PowerPolicy objects for policy and window_policy")
        self._widths = WindowProposal(window_policy, widths, weights)  # validates widths and weights
        self.policy, self.window_policy = policy, window_policy

    def propose(
        self,
        target: PowerDistribution,
        state: Sequences,
        cut: torch.Tensor,
        num_tries: int,
        generator: torch.Generator | None,
    ) -> Tries:
        """Resample each chain's window ``num_tries`` times and rescore window and tail under ``policy``."""
        windows = self._widths.draw_windows(target, state, cut, num_tries, generator)  # drawn at window_policy
        spliced = windows.spliced.with_(policy=self.policy)
        proposed, rescored = target.lm.score(spliced, torch.where(windows.moving, windows.start, spliced.length))
        reverse, reverse_cost = self._window_log_q(target, state, cut, *windows.own)
        return windows.tries(proposed, rescored, reverse, reverse_cost)

    def _window_log_q(
        self, target: PowerDistribution, state: Sequences, cut: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor
    ) -> tuple[torch.Tensor, Cost]:
        """``log q_window(x_lo .. x_hi-1 | prefix)`` per chain and what it cost."""
        if _free_first(self.window_policy):
            return state.total("logp", lo, hi), Cost.zero(state.num_rows, state.device)
        if self.window_policy == self.policy:
            return state.total("logq", lo, hi), Cost.zero(state.num_rows, state.device)
        moving = cut >= 0
        stop = torch.where(moving, torch.minimum(hi, state.length), state.length)
        short = state.truncated(stop).with_(policy=self.window_policy)
        scored, cost = target.lm.score(short, torch.where(moving, lo, short.length))
        return scored.total("logq", lo, hi), cost

    def __repr__(self) -> str:
        return (
            f"HotWindowProposal({self.policy.describe()}, window={self.window_policy.describe()}, "
            f"widths={self._widths.widths.tolist()})"
        )
