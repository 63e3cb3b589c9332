"""Metropolis–Hastings: a site selector chooses the cut, a proposal resamples from it, MH corrects."""

from __future__ import annotations

import torch

from egps_ppl.kernels.base import Kernel, StepInfo, metropolis_accept
from egps_ppl.kernels.proposals import Proposal, SuffixProposal
from egps_ppl.kernels.sites import SiteSelector, UniformSite, sample_sites, site_log_prob
from egps_ppl.models.base import Cost
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution


class MetropolisHastings(Kernel):
    """MH with a state-dependent cut: the complete Hastings ratio

    ``log r = log π(x') - log π(x) + log q(x | x') - log q(x' | x) + log P_{x'}(i) - log P_x(i)``.

    With the defaults (uniform cut, suffix resampling at temperature 1/α) this is the sampler of Karan & Du,
    with the cut-choice term they omit (it matters whenever EOS changes the length).

    Parameters
    ----------
    target:
        The power distribution to leave invariant.
    selector:
        Where to cut (default :class:`UniformSite`).
    proposal:
        What to propose from the cut (default :class:`SuffixProposal` with the target's q ∝ p^α).

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(random_markov(4, seed=0), [], alpha=4.0, max_new_tokens=5)
    >>> kernel = MetropolisHastings(target)
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
        self.name = name or f"mh[{getattr(self.selector, 'name', 'site')}]"

    def prepare(self, state: Sequences) -> tuple[Sequences, Cost]:
        return self.target.lm.with_policy(state, self.proposal.policy)

    def step(self, state: Sequences, generator: torch.Generator | None = None) -> tuple[Sequences, StepInfo]:
        state, cost = self.prepare(state)
        site_lp = self.selector.log_probs(state)
        cut = sample_sites(site_lp, generator)
        proposed = self.proposal.propose(self.target, state, cut, generator)
        current_lp = self.target.log_prob(state)
        log_ratio = (
            self.target.log_prob(proposed.seqs)
            - current_lp
            + proposed.log_q_reverse
            - proposed.log_q_forward
            + site_log_prob(self.selector.log_probs(proposed.seqs), cut)
            - site_log_prob(site_lp, cut)
        )
        accepted, accept_prob = metropolis_accept(log_ratio, current_lp, generator)
        accepted &= cut >= 0
        accept_prob = torch.where(cut >= 0, accept_prob, torch.zeros_like(accept_prob))
        new_state = self.target.lm.merge(accepted, state, proposed.seqs)
        return new_state, StepInfo.from_cost(accepted, accept_prob, cut, cost + proposed.cost)
