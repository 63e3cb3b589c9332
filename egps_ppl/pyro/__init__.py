"""Pyro interop: the power distribution as a Pyro model (:mod:`egps_ppl.pyro.model`) and any egps_ppl kernel
under ``pyro.infer.MCMC`` (:mod:`egps_ppl.pyro.kernel`).

>>> from egps_ppl.models.testbeds import random_markov
>>> from egps_ppl.target import PowerDistribution
>>> target = PowerDistribution(random_markov(3, seed=0), [], alpha=2.0, max_new_tokens=3)
>>> model = power_model(target)  # a Pyro program: pyro.sample("x", ...) then pyro.factor("power", ...)
>>> potential = potential_fn(target)  # {"x": tokens} -> -log π(x), read through poutine
"""

from egps_ppl.pyro.kernel import PyroKernel
from egps_ppl.pyro.model import (
    SITE,
    CompletionSupport,
    PowerModel,
    PowerPotential,
    SequenceDistribution,
    completion_mask,
    potential_fn,
    power_model,
)

__all__ = [
    "SITE",
    "CompletionSupport",
    "PowerModel",
    "PowerPotential",
    "PyroKernel",
    "SequenceDistribution",
    "completion_mask",
    "potential_fn",
    "power_model",
]
