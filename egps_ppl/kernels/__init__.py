"""Transition kernels: site selectors, proposals, corrections and combinators."""

from egps_ppl.kernels.base import Kernel, StepInfo, metropolis_accept
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
    "metropolis_accept",
]


def __getattr__(name: str):
    # The Pyro adapter pulls in pyro.infer; import it only when asked for.
    if name == "PyroKernel":
        from egps_ppl.kernels.pyro_adapter import PyroKernel

        return PyroKernel
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
