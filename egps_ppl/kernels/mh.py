"""Metropolis–Hastings: a site selector chooses the cut, a proposal resamples from it, MH corrects."""

from __future__ import annotations

import torch

from egps_ppl.kernels.base import Kernel, StepInfo, metropolis_accept, parts_name
from egps_ppl.kernels.proposals import Proposal, SuffixProposal
from egps_ppl.kernels.sites import SiteSelector, UniformSite, sample_sites, site_log_prob
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution


class MetropolisHastings(Kernel):
    """MH with a state-dependent cut: the complete Hastings ratio

    ``log r = log π(x') - log π(x) + log q(x | x') - log q(x' | x) + log P_{x'}(i) - log P_x(i)``.

    With the defaults (uniform cut, suffix resampling at temperature 1/α) this is the sampler of Karan & Du,
    with the cut-choice term they omit (it matters whenever EOS changes the length). Any
    :class:`~egps_ppl.kernels.proposals.Proposal` works; MH asks it for one try.

    Parameters
    ----------
    target:
        The power distribution to leave invariant.
    selector:
        Where to cut (default :class:`UniformSite`).
    proposal:
        What to propose from the cut (default :class:`SuffixProposal` with the target's q ∝ p^α).
    name:
        Display name (default ``mh``, with the selector and proposal in brackets when they are not the defaults).

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(random_markov(4, seed=0), [], alpha=4.0, max_new_tokens=5)
    >>> kernel = MetropolisHastings(target)
    >>> kernel.name
    'mh'
    >>> state, _ = target.sample_proposal(3, torch.Generator().manual_seed(0))
    >>> new_state, info = kernel.step(state, torch.Generator().manual_seed(1))
    >>> info.accepted.shape
    torch.Size([3])
    """

    def __init__(
        self,
        target: PowerDistribution,
        selector: SiteSelector | None = None,
        proposal: Proposal | None = None,
        name: str | None = None,
    ) -> None:
        self.target = target
        self.selector = selector or UniformSite()
        self.proposal = proposal or SuffixProposal(target.default_policy())
        self.name = name or parts_name("mh", self.selector, self.proposal)

    @property
    def policy(self) -> PowerPolicy:
        """The proposal's token policy."""
        return self.proposal.policy

    def prepare(self, state: Sequences) -> tuple[Sequences, Cost]:
        return self.target.lm.with_policy(state, self.policy)

    def step(self, state: Sequences, generator: torch.Generator | None = None) -> tuple[Sequences, StepInfo]:
        state, cost = self.prepare(state)
        site_lp = self.selector.log_probs(state)
        cut = sample_sites(site_lp, generator, state.stream)
        tries = self.proposal.propose(self.target, state, cut, 1, generator)
        proposed = tries.seqs
        current_lp = self.target.log_prob(state)
        log_ratio = (
            self.target.log_prob(proposed)
            - current_lp
            + tries.log_q_reverse[:, 0]
            - tries.log_q_forward[:, 0]
            + site_log_prob(self.selector.log_probs(proposed), cut)
            - site_log_prob(site_lp, cut)
        )
        accepted, accept_prob = metropolis_accept(log_ratio, current_lp, generator, state.stream)
        moved = tries.valid[:, 0] & (cut >= 0)
        accepted &= moved
        accept_prob = torch.where(moved, accept_prob, torch.zeros_like(accept_prob))
        new_state = state.where(accepted, proposed)
        return new_state, StepInfo.from_cost(accepted, accept_prob, cut, cost + tries.cost)


__all__ = ["MetropolisHastings"]
