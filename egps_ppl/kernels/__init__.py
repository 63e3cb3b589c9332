"""Transition kernels: site selectors, proposals, corrections and combinators."""

from egps_ppl.kernels.base import Kernel, StepInfo
from egps_ppl.kernels.combinators import Cycle, Mixture
from egps_ppl.kernels.mh import MetropolisHastings
from egps_ppl.kernels.mtm import MultipleTryMetropolis
from egps_ppl.kernels.proposals import Proposed, SuffixProposal, WindowProposal
from egps_ppl.kernels.sites import EntropyJumpSite, EntropySite, SiteSelector, UniformSite

__all__ = [
    "Cycle",
    "EntropyJumpSite",
    "EntropySite",
    "Kernel",
    "MetropolisHastings",
    "Mixture",
    "MultipleTryMetropolis",
    "Proposed",
    "SiteSelector",
    "StepInfo",
    "SuffixProposal",
    "UniformSite",
    "WindowProposal",
]
