"""Samplers of the power target behind one interface, the simple ones (plain, low temperature, best-of-N) and
the registry of samplers by name.

Every sampler takes a :class:`~egps_ppl.target.PowerDistribution` and a generator and returns a
:class:`SamplerResult`: the population it drew, optional log-weights, the index of the single draw it outputs,
and the backend's cost counters. Power-SMC (:mod:`egps_ppl.infer.smc`), Scalable Power Sampling
(:mod:`egps_ppl.infer.sps`) and MCMC (:class:`~egps_ppl.infer.mcmc_sampler.MCMCSampler`) implement the same
protocol, so every comparison is a flag away.

Samplers by name
----------------
:func:`load_sampler` builds a sampler from a name in :data:`SAMPLERS` (``plain``, ``low-temp``, ``best-of-n``,
``smc``, ``sps``, ``mh``, ``entropy-mh``, ``mtm``, ``egps``) or from any kernel spec of
:func:`~egps_ppl.kernels.presets.build_kernel` (``entropy-cut-mh``, ``cycle(mh,egps)``, ...), which runs as an
:class:`~egps_ppl.infer.mcmc_sampler.MCMCSampler`. :func:`register_sampler` adds a name, as
:func:`~egps_ppl.kernels.presets.register_preset` does for kernels.

What each one samples
---------------------
``PlainSampler``       p itself (temperature 1): the baseline the power target is meant to improve on.
``LowTempSampler``     the token-level policy p(v | h)^α / Σ p^α, i.e. temperature 1/α. This is *not* π ∝ p^α:
                       it ignores how much probability each continuation has ahead of it (the future factor ζ).
``BestOfNSampler``     N draws from p, output the one with the highest log p (a mode seeker, not a sampler of π).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from egps_ppl.errors import EGPSError, check_positive_int
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

__all__ = [
    "SAMPLERS",
    "BestOfNSampler",
    "LowTempSampler",
    "PlainSampler",
    "PolicySampler",
    "Sampler",
    "SamplerFactory",
    "SamplerResult",
    "available_samplers",
    "load_sampler",
    "register_sampler",
]


@dataclass
class SamplerResult:
    """What a sampler drew for one prompt.

    Attributes
    ----------
    samples : Sequences
        The population (one row per particle or draw), with per-position statistics.
    chosen : int
        The row the sampler outputs as its single draw.
    cost : Cost
        Backend cost counters, one entry per row (``decode_tokens``, ``scored_tokens``) plus ``forward_calls``.
    log_weights : torch.Tensor or None
        Normalised log importance weights of the rows (``float64[N]``, ``logsumexp == 0``) when the sampler is
        weighted (SMC); ``None`` when every row is an unweighted draw.
    log_evidence : float or None
        An estimate of log Σ_x p(x)^α (SMC), if the sampler gives one.
    extra : dict
        Sampler-specific, JSON-serialisable details.
    """

    samples: Sequences
    chosen: int
    cost: Cost
    log_weights: torch.Tensor | None = None
    log_evidence: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def weights(self) -> torch.Tensor:
        """Normalised weights of the rows (uniform when the sampler is unweighted)."""
        if self.log_weights is None:
            n = self.samples.num_rows
            return torch.full((n,), 1.0 / n, dtype=torch.float64)
        return self.log_weights.exp()


@runtime_checkable
class Sampler(Protocol):
    """A sampler of the power target: ``run(target, generator) -> SamplerResult``."""

    name: str

    def run(self, target: PowerDistribution, generator: torch.Generator | None = None) -> SamplerResult:
        """Draw from ``target``; the same generator state gives the same result."""
        ...

    def config(self) -> dict[str, Any]:
        """The sampler's settings (JSON-serialisable)."""
        ...


class PolicySampler:
    """``n`` ancestral draws from a token policy in one batch; outputs the first (subclasses choose the policy).

    Parameters
    ----------
    n : int
        Draws per prompt.
    """

    name = "policy"

    def __init__(self, n: int = 1) -> None:
        self.n = check_positive_int("n", n)

    def policy(self, target: PowerDistribution) -> PowerPolicy:
        """The token policy the draws come from, for ``target``."""
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        """``{"name": ..., "n": ...}``."""
        return {"name": self.name, "n": self.n}

    def _draw(self, target: PowerDistribution, generator: torch.Generator | None) -> tuple[Sequences, Cost]:
        return target.sample_proposal(self.n, generator, self.policy(target))

    def run(self, target: PowerDistribution, generator: torch.Generator | None = None) -> SamplerResult:
        """Draw ``n`` completions of the target's prompt from the policy; output the first."""
        seqs, cost = self._draw(target, generator)
        return SamplerResult(seqs, 0, cost)


class PlainSampler(PolicySampler):
    """Ancestral sampling from the base model at temperature 1.

    Parameters
    ----------
    n : int
        Independent draws made in one batch; the output is the first.
    """

    name = "plain"

    def policy(self, target: PowerDistribution) -> PowerPolicy:
        return PowerPolicy(1.0)


class LowTempSampler(PolicySampler):
    """Ancestral sampling at temperature ``1/alpha`` (the token-level power policy of the target's α).

    Parameters
    ----------
    n : int
        Independent draws made in one batch; the output is the first.
    """

    name = "low-temp"

    def policy(self, target: PowerDistribution) -> PowerPolicy:
        return PowerPolicy(target.alpha)


class BestOfNSampler(PolicySampler):
    """``n`` draws from the base model at temperature 1; the output is the draw with the highest ``log p``.

    Parameters
    ----------
    n : int
        Number of draws (``>= 1``).
    """

    name = "best-of-n"

    def __init__(self, n: int = 8) -> None:
        super().__init__(n)

    def policy(self, target: PowerDistribution) -> PowerPolicy:
        return PowerPolicy(1.0)

    def run(self, target: PowerDistribution, generator: torch.Generator | None = None) -> SamplerResult:
        """Draw ``n`` completions at temperature 1; output the one with the highest ``log p``."""
        seqs, cost = self._draw(target, generator)
        log_p = seqs.log_p()
        return SamplerResult(seqs, int(torch.argmax(log_p)), cost)


# ------------------------------------------------------------------------------------------------ registry

SamplerFactory = Callable[..., Sampler]
"""Builds a sampler from keyword settings: ``factory(**settings) -> Sampler``. It declares the settings it takes
as keyword parameters with defaults (``n``, ``steps``, ``particles``, ...); :func:`load_sampler` passes it only
those, so one set of command-line settings serves every sampler."""


def _plain() -> Sampler:
    return PlainSampler()


def _low_temp() -> Sampler:
    return LowTempSampler()


def _best_of_n(n: int = 8) -> Sampler:
    return BestOfNSampler(n)


def _smc(particles: int = 64, ess_every: int = 64) -> Sampler:
    from egps_ppl.infer.smc import PowerSMC

    return PowerSMC(num_particles=particles, check_every=ess_every)


def _sps(top_k: int = 8, rollouts: int = 8, horizon: int | None = 192, block_size: int | None = None) -> Sampler:
    from egps_ppl.infer.sps import ScalablePowerSampler

    return ScalablePowerSampler(top_k=top_k, rollouts=rollouts, horizon=horizon, block_size=block_size)


def _mcmc(
    kernel: str,
    steps: int = 10,
    num_chains: int = 1,
    block_size: int | None = None,
    steps_per_block: int = 10,
    adaptive: bool = False,
    select: str = "best",
) -> Sampler:
    from egps_ppl.infer.mcmc_sampler import MCMCSampler

    return MCMCSampler(
        kernel,
        steps=steps,
        num_chains=num_chains,
        block_size=block_size,
        steps_per_block=steps_per_block,
        adaptive=adaptive,
        select=select,
    )


def _mcmc_preset(kernel: str) -> SamplerFactory:
    """The factory of MCMC with the kernel preset ``kernel`` (a real signature: :func:`load_sampler` reads it)."""

    def factory(
        steps: int = 10,
        num_chains: int = 1,
        block_size: int | None = None,
        steps_per_block: int = 10,
        adaptive: bool = False,
        select: str = "best",
    ) -> Sampler:
        return _mcmc(kernel, steps, num_chains, block_size, steps_per_block, adaptive, select)

    return factory


SAMPLERS: dict[str, tuple[SamplerFactory, str]] = {
    "plain": (_plain, "one ancestral sample at temperature 1"),
    "low-temp": (_low_temp, "one ancestral sample at temperature 1/alpha"),
    "best-of-n": (_best_of_n, "n samples at temperature 1, keep the one with the highest log p"),
    "smc": (_smc, "Power-SMC: particles at temperature 1/alpha, alpha bridge, resampling; one particle by weight"),
    "sps": (
        _sps,
        "Scalable Power Sampling: next token (or block) from p^alpha times a rollout estimate of the future",
    ),
    "mh": (_mcmc_preset("mh"), "MCMC, uniform cut, suffix resampled at temperature 1/alpha (Karan & Du)"),
    "entropy-mh": (_mcmc_preset("entropy-mh"), "MCMC, entropy-weighted cut, suffix at temperature 1/alpha"),
    "mtm": (_mcmc_preset("mtm"), "MCMC, uniform cut, Multiple-Try Metropolis"),
    "egps": (_mcmc_preset("egps"), "MCMC, EGPS kernel (entropy-jump cuts, local multiple tries)"),
}
"""Sampler name -> ``(factory, description)``; extend it with :func:`register_sampler`."""


def register_sampler(name: str, factory: SamplerFactory, description: str) -> None:
    """Make ``name`` usable by :func:`load_sampler` (and so by ``egps eval --method``) in this process.

    Parameters
    ----------
    name : str
        The sampler's name; an existing sampler of that name is replaced.
    factory : callable
        ``factory(**settings) -> Sampler``; it receives only the settings it declares as parameters.
    description : str
        One line for listings.

    Examples
    --------
    >>> register_sampler("best-of-4", lambda: BestOfNSampler(4), "4 samples at temperature 1, highest log p")
    >>> load_sampler("best-of-4", n=16).n
    4
    >>> del SAMPLERS["best-of-4"]
    """
    if not isinstance(name, str) or not name.strip():
        raise EGPSError(f"a sampler name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise EGPSError(f"the factory of sampler {name!r} must be callable")
    SAMPLERS[name.strip()] = (factory, description)


def available_samplers() -> dict[str, str]:
    """Sampler names and what each runs (any kernel spec works too: see :func:`load_sampler`)."""
    return {name: description for name, (_, description) in SAMPLERS.items()}


def _parameters(factory: Callable[..., Any]) -> tuple[set[str], bool]:
    """The keyword parameters ``factory`` takes, and whether it takes any (``**kwargs``)."""
    try:
        params = inspect.signature(factory).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature: give it nothing
        return set(), False
    names = {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    return names, any(p.kind is p.VAR_KEYWORD for p in params)


def _is_kernel_spec(spec: str) -> bool:
    from egps_ppl.kernels.presets import PRESETS

    return spec in PRESETS or spec.startswith(("cycle(", "mixture("))


def load_sampler(spec: str, **settings: Any) -> Sampler:
    """A sampler by name, or MCMC with a kernel spec.

    Parameters
    ----------
    spec : str
        A name in :data:`SAMPLERS` (see :func:`available_samplers`), or any other kernel spec of
        :func:`~egps_ppl.kernels.presets.build_kernel` (``entropy-cut-mh``, ``cycle(mh,egps)``,
        ``mixture(mh:0.7,egps:0.3)``, a preset added with ``register_preset``), run by
        :class:`~egps_ppl.infer.mcmc_sampler.MCMCSampler`.
    **settings
        Keyword settings; each factory gets the ones it declares and ignores the rest, so one set serves every
        sampler. The built-in ones: ``n`` (best-of-n), ``particles`` and ``ess_every`` (smc), ``top_k``,
        ``rollouts``, ``horizon`` and ``block_size`` (sps), and ``steps``, ``num_chains``, ``block_size``,
        ``steps_per_block``, ``adaptive`` and ``select`` (MCMC). A name no registered factory takes is an error.

    Returns
    -------
    Sampler

    Raises
    ------
    EGPSError
        For an unknown name (the message lists the valid ones), an unknown setting, or bad settings.

    Examples
    --------
    >>> load_sampler("best-of-n", n=4, steps=3).config()
    {'name': 'best-of-n', 'n': 4}
    >>> load_sampler("cycle(mh,egps)", steps=3).config()["steps"]
    3
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EGPSError(f"a sampler name must be a non-empty string; choose one of: {', '.join(SAMPLERS)}")
    spec = spec.strip().replace(" ", "")
    known: set[str] = set(_parameters(_mcmc)[0]) - {"kernel"}
    for factory, _ in SAMPLERS.values():
        names, anything = _parameters(factory)
        known |= names
        if anything:
            known = set()  # a factory takes any setting: nothing can be called unknown
            break
    unknown = sorted(set(settings) - known) if known else []
    if unknown:
        raise EGPSError(f"unknown sampler setting(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
    if spec in SAMPLERS:
        factory = SAMPLERS[spec][0]
        kernel_args: dict[str, Any] = {}
    elif _is_kernel_spec(spec):
        factory, kernel_args = _mcmc, {"kernel": spec}
    else:
        raise EGPSError(
            f"unknown method {spec!r}; choose one of: {', '.join(SAMPLERS)}, or a kernel spec such as cycle(mh,egps)"
        )
    names, anything = _parameters(factory)
    given = {k: v for k, v in settings.items() if anything or k in names}
    return factory(**kernel_args, **given)
