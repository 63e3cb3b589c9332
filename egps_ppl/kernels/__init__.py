"""Transition kernels: site selectors, proposals, corrections and combinators."""

from egps_ppl.kernels.base import Kernel, StepInfo
from egps_ppl.kernels.combinators import Cycle, Mixture
from egps_ppl.kernels.mh import MetropolisHastings
from egps_ppl.kernels.proposals import Proposed, SuffixProposal
from egps_ppl.kernels.sites import SiteSelector, UniformSite

__all__ = [
    "Cycle",
    "Kernel",
    "MetropolisHastings",
    "Mixture",
    "Proposed",
    "SiteSelector",
    "StepInfo",
    "SuffixProposal",
    "UniformSite",
]
