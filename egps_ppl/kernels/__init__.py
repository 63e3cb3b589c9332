"""Transition kernels: site selectors, proposals, corrections and combinators."""

from egps_ppl.kernels.base import Kernel, StepInfo, metropolis_accept
from egps_ppl.kernels.combinators import Cycle, Mixture
from egps_ppl.kernels.mh import MetropolisHastings
from egps_ppl.kernels.mtm import MultipleTryMetropolis
from egps_ppl.kernels.proposals import Proposal, SuffixProposal, Tries, WindowProposal
from egps_ppl.kernels.sites import EntropyJumpSite, EntropySite, SiteSelector, UniformSite

__all__ = [
    "Cycle",
    "EntropyJumpSite",
    "EntropySite",
    "Kernel",
    "MetropolisHastings",
    "Mixture",
    "MultipleTryMetropolis",
    "Proposal",
    "SiteSelector",
    "StepInfo",
    "SuffixProposal",
    "Tries",
    "UniformSite",
    "WindowProposal",
    "metropolis_accept",
]
