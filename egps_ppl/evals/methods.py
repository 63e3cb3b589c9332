"""Evaluation methods: every sampler as a thin adapter over the library, with the same cost counters.

| name | what it runs |
| --- | --- |
| ``plain`` | one ancestral sample from the base model (temperature 1: ``PowerPolicy(1.0)``) |
| ``low-temp`` | one ancestral sample at temperature ``1/alpha`` (``PowerPolicy(alpha)``) |
| ``best-of-n`` | ``n`` plain samples in one batch; the answer is the one with the highest ``log p`` |
| ``smc`` | Power-SMC (:class:`~egps_ppl.infer.smc.PowerSMC`); the answer is one particle drawn ∝ weight |
| ``sps`` | Scalable Power Sampling (:class:`~egps_ppl.infer.sps.ScalablePowerSampler`) |
| ``mh`` | MCMC with the ``mh`` kernel of :mod:`egps_ppl.kernels.presets` on π ∝ p^α |
| ``entropy-mh`` | MCMC with the ``entropy-mh`` kernel |
| ``mtm`` | MCMC with the ``mtm`` kernel (Multiple-Try Metropolis) |
| ``egps`` | MCMC with the ``egps`` kernel (entropy-jump cuts, local multiple tries) |

Any other kernel spec of :func:`egps_ppl.kernels.presets.build_kernel` works too (``entropy-cut-mh``,
``cycle(mh,egps)``, ``mixture(mh:0.7,egps:0.3)``). The first five are :class:`SamplerMethod` adapters over
the samplers of :mod:`egps_ppl.infer` (one protocol: ``run(target, generator) -> SamplerResult``); the MCMC ones
are :class:`MCMCMethod`.

The answer of an MCMC method
----------------------------
Each chain runs ``steps`` kernel steps (optionally after a block-wise growth phase, see
:class:`~egps_ppl.infer.BlockSchedule`); the answer is the **final state of the chain whose final state has the
highest target log-probability** α·log p(x). With one chain (the default) that is simply the final state of chain
0, which is the papers' protocol (one MCMC sample per question). With several chains, taking the best final state
turns the extra chains into a best-of-C over approximate π-samples; pass ``select="first"`` to keep chain 0's
final state instead.

Cost counters
-------------
Every method reports the backend's :class:`~egps_ppl.models.base.Cost` summed over all rows (chains, tries,
the ``n`` samples of best-of-n): ``decode_tokens`` (sampled one after another), ``scored_tokens``
(teacher-forced), ``forward_calls`` (batched forward calls), and ``wall_s`` around the whole run.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch

from egps_ppl.errors import EGPSError, check_alpha, check_positive_int
from egps_ppl.infer.samplers import Sampler
from egps_ppl.models.base import Cost, LanguageModel
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

__all__ = [
    "MCMC_METHODS",
    "METHODS",
    "SAMPLER_METHODS",
    "MCMCMethod",
    "Method",
    "MethodResult",
    "SamplerMethod",
    "available_methods",
    "load_method",
]

SAMPLER_METHODS = ("plain", "low-temp", "best-of-n", "smc", "sps")
MCMC_METHODS = ("mh", "entropy-mh", "mtm", "egps")
METHODS: dict[str, str] = {
    "plain": "one ancestral sample at temperature 1",
    "low-temp": "one ancestral sample at temperature 1/alpha",
    "best-of-n": "n samples at temperature 1, keep the one with the highest log p",
    "smc": "Power-SMC: particles at temperature 1/alpha, alpha bridge, resampling; one particle by weight",
    "sps": "Scalable Power Sampling: next token (or block) from p^alpha times a rollout estimate of the future",
    "mh": "MCMC, uniform cut, suffix resampled at temperature 1/alpha (Karan & Du)",
    "entropy-mh": "MCMC, entropy-weighted cut, suffix at temperature 1/alpha",
    "mtm": "MCMC, uniform cut, Multiple-Try Metropolis",
    "egps": "MCMC, EGPS kernel (entropy-jump cuts, local multiple tries)",
}


@dataclass
class MethodResult:
    """What one method run produced for one prompt.

    Attributes
    ----------
    completion_ids : list of int
        The chosen completion's token ids (an EOS token included when the completion ended with one).
    completion_text : str
        ``lm.decode(completion_ids)`` (special tokens dropped by text backends).
    decode_tokens, scored_tokens, forward_calls : int
        The backend's cost counters, summed over every row the method ran.
    wall_s : float
        Wall-clock seconds of the whole run.
    extra : dict
        Method-specific JSON-serialisable details (``log_p`` of the answer, acceptance rate, chosen chain...).
    """

    completion_ids: list[int]
    completion_text: str
    decode_tokens: int
    scored_tokens: int
    forward_calls: int
    wall_s: float
    extra: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class Method(Protocol):
    """What the evaluation runner needs from a method."""

    name: str

    def run(self, lm: LanguageModel, prompt_ids: list[int], max_new_tokens: int, seed: int) -> MethodResult:
        """Produce one answer completion of ``prompt_ids``; the same ``seed`` gives the same completion."""
        ...

    def config(self) -> dict[str, Any]:
        """The method's settings (recorded with the run, compared on ``--resume``)."""
        ...


def _result(
    lm: LanguageModel, seqs: Sequences, row: int, cost: Cost, started: float, extra: dict[str, Any]
) -> MethodResult:
    ids = seqs.row_tokens(row)
    return MethodResult(
        completion_ids=ids,
        completion_text=lm.decode(ids),
        decode_tokens=int(cost.decode_tokens.sum()),
        scored_tokens=int(cost.scored_tokens.sum()),
        forward_calls=int(cost.forward_calls),
        wall_s=time.perf_counter() - started,
        extra=extra,
    )


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class SamplerMethod:
    """A sampler of :mod:`egps_ppl.infer` (anything with the :class:`~egps_ppl.infer.samplers.Sampler` protocol)
    as a method: the answer is the row the sampler outputs (``SamplerResult.chosen``).

    Parameters
    ----------
    sampler : Sampler
        ``PlainSampler``, ``LowTempSampler``, ``BestOfNSampler``, ``PowerSMC``, ``ScalablePowerSampler`` or your own.
    alpha : float
        The power α of the target π ∝ p^α handed to the sampler.
    """

    def __init__(self, sampler: Sampler, alpha: float = 4.0) -> None:
        self.sampler, self.alpha = sampler, check_alpha(alpha)
        self.name = sampler.name

    def config(self) -> dict[str, Any]:
        """The sampler's settings plus ``name`` and ``alpha``."""
        return {**self.sampler.config(), "name": self.name, "alpha": self.alpha}

    def run(self, lm: LanguageModel, prompt_ids: list[int], max_new_tokens: int, seed: int) -> MethodResult:
        """Run the sampler on π ∝ p(· | prompt)^α with a generator seeded by ``seed``; answer its chosen row."""
        started = time.perf_counter()
        target = PowerDistribution(lm, prompt_ids, self.alpha, max_new_tokens)
        drawn = self.sampler.run(target, _generator(seed))
        log_p = drawn.samples.log_p()
        extra: dict[str, Any] = {"log_p": float(log_p[drawn.chosen])}
        if drawn.samples.num_rows > 1:
            extra["chosen"] = drawn.chosen
            extra["log_p_all"] = [round(float(v), 4) for v in log_p]
        if drawn.log_evidence is not None:
            extra["log_evidence"] = float(drawn.log_evidence)
        extra.update(drawn.extra)
        return _result(lm, drawn.samples, drawn.chosen, drawn.cost, started, extra)


class MCMCMethod:
    """Power sampling with an MCMC kernel from :func:`~egps_ppl.kernels.presets.build_kernel`.

    Parameters
    ----------
    kernel : str
        A kernel spec (``mh``, ``entropy-mh``, ``mtm``, ``egps``, or a combinator).
    alpha : float
        The power α of the target π ∝ p^α.
    steps : int
        Kernel steps per chain after the start (or after the block-wise growth phase).
    num_chains : int
        Chains run together; the answer is the best final state (see the module docstring).
    block_size : int or None
        Grow the completion ``block_size`` tokens at a time with ``steps_per_block`` kernel steps after each
        block (:class:`~egps_ppl.infer.BlockSchedule`); ``None`` starts from a full ancestral sample.
    steps_per_block : int
        Kernel steps after each block.
    adaptive : bool
        Use :class:`~egps_ppl.infer.EntropyAdaptiveSchedule` (skip deterministic blocks).
    select : {"best", "first"}
        Which final state answers: the highest α·log p over chains, or chain 0's.
    """

    def __init__(
        self,
        kernel: str,
        alpha: float = 4.0,
        steps: int = 10,
        num_chains: int = 1,
        block_size: int | None = None,
        steps_per_block: int = 10,
        adaptive: bool = False,
        select: str = "best",
    ) -> None:
        self.name = kernel
        self.alpha = check_alpha(alpha)
        self.steps = check_positive_int("steps", steps)
        self.num_chains = check_positive_int("num_chains", num_chains)
        if block_size is not None:
            check_positive_int("block_size", block_size)
        elif adaptive:
            raise EGPSError("the adaptive schedule needs a block size (--block-size)")
        if isinstance(steps_per_block, bool) or not isinstance(steps_per_block, int) or steps_per_block < 0:
            raise EGPSError(f"steps_per_block must be an integer >= 0, got {steps_per_block!r}")
        if select not in ("best", "first"):
            raise EGPSError(f"select must be 'best' or 'first', got {select!r}")
        self.block_size, self.steps_per_block = block_size, steps_per_block
        self.adaptive, self.select = adaptive, select

    def config(self) -> dict[str, Any]:
        """The MCMC settings (recorded with a run and compared on ``--resume``)."""
        return {
            "name": self.name,
            "alpha": self.alpha,
            "steps": self.steps,
            "num_chains": self.num_chains,
            "block_size": self.block_size,
            "steps_per_block": self.steps_per_block if self.block_size else None,
            "adaptive": self.adaptive,
            "select": self.select,
        }

    def _schedule(self) -> Any:
        from egps_ppl.infer import make_schedule

        return make_schedule(self.block_size, self.steps_per_block, self.adaptive)

    def run(self, lm: LanguageModel, prompt_ids: list[int], max_new_tokens: int, seed: int) -> MethodResult:
        """Run the chains with seed ``seed`` and answer the selected final state (see the module docstring)."""
        from egps_ppl.infer import MCMC
        from egps_ppl.kernels.presets import build_kernel

        started = time.perf_counter()
        target = PowerDistribution(lm, prompt_ids, self.alpha, max_new_tokens)
        kernel = build_kernel(self.name, target)
        mcmc = MCMC(
            kernel,
            num_samples=1,
            warmup_steps=self.steps - 1,
            num_chains=self.num_chains,
            seed=int(seed),
            schedule=self._schedule(),
        ).run()
        state = mcmc.state
        lp = target.log_prob(state)
        row = int(torch.argmax(lp)) if self.select == "best" else 0
        accept = mcmc.get_sample_stats()["acceptance_rate"]
        extra = {
            "log_p": float(state.log_p()[row]),
            "chosen_chain": row,
            "final_acceptance_rate": float(accept.mean()),
        }
        return _result(lm, state, row, mcmc.total_cost(), started, extra)


def available_methods() -> dict[str, str]:
    """Method names and what each runs."""
    return dict(METHODS)


def load_method(
    spec: str,
    alpha: float = 4.0,
    *,
    steps: int = 10,
    num_chains: int = 1,
    n: int = 8,
    particles: int = 64,
    ess_every: int = 64,
    top_k: int = 8,
    rollouts: int = 8,
    horizon: int | None = 192,
    block_size: int | None = None,
    steps_per_block: int = 10,
    adaptive: bool = False,
    select: str = "best",
) -> Method:
    """A method by name.

    Parameters
    ----------
    spec : str
        ``plain``, ``low-temp``, ``best-of-n``, ``smc``, ``sps``, ``mh``, ``entropy-mh``, ``mtm``, ``egps``, or any
        other kernel spec :func:`~egps_ppl.kernels.presets.build_kernel` accepts (``entropy-cut-mh``,
        ``cycle(...)``, ``mixture(...)``).
    alpha : float
        The power α (temperature ``1/alpha`` for ``low-temp``; the target of every other method but ``plain`` and
        ``best-of-n``).
    steps, num_chains, steps_per_block, adaptive, select
        MCMC settings (see :class:`MCMCMethod`).
    n : int
        Samples of ``best-of-n``.
    particles, ess_every : int
        ``smc`` (:class:`~egps_ppl.infer.smc.PowerSMC`): particles, and tokens between ESS checks (the paper's 64
        suits completions of thousands of tokens; a short completion needs a check within it to resample at all).
    top_k, rollouts, horizon
        ``sps`` (:class:`~egps_ppl.infer.sps.ScalablePowerSampler`): candidates per step, rollouts per candidate
        and their horizon (``None``: to the end).
    block_size : int or None
        MCMC: grow the completion ``block_size`` tokens at a time; ``sps``: sample blocks of that many tokens
        instead of single tokens.

    Returns
    -------
    Method

    Raises
    ------
    EGPSError
        For an unknown name (the message lists the valid ones) or bad settings.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EGPSError(f"a method name must be a non-empty string; choose one of: {', '.join(METHODS)}")
    spec = spec.strip().replace(" ", "")
    check_alpha(alpha)
    if spec in SAMPLER_METHODS:
        return SamplerMethod(
            _sampler(
                spec,
                n=n,
                particles=particles,
                ess_every=ess_every,
                top_k=top_k,
                rollouts=rollouts,
                horizon=horizon,
                block=block_size,
            ),
            alpha,
        )
    mcmc_kwargs = {
        "alpha": alpha,
        "steps": steps,
        "num_chains": num_chains,
        "block_size": block_size,
        "steps_per_block": steps_per_block,
        "adaptive": adaptive,
        "select": select,
    }
    if spec in MCMC_METHODS:
        return MCMCMethod(spec, **mcmc_kwargs)
    if spec.startswith(("cycle(", "mixture(")) or _is_kernel_preset(spec):
        _check_kernel_spec(spec)
        return MCMCMethod(spec, **mcmc_kwargs)
    raise EGPSError(
        f"unknown method {spec!r}; choose one of: {', '.join(METHODS)}, or a kernel spec such as cycle(mh,egps)"
    )


def _sampler(
    spec: str,
    *,
    n: int,
    particles: int,
    ess_every: int,
    top_k: int,
    rollouts: int,
    horizon: int | None,
    block: int | None,
) -> Sampler:
    from egps_ppl.infer import samplers

    if spec == "plain":
        return samplers.PlainSampler()
    if spec == "low-temp":
        return samplers.LowTempSampler()
    if spec == "best-of-n":
        return samplers.BestOfNSampler(n)
    if spec == "smc":
        from egps_ppl.infer.smc import PowerSMC

        return PowerSMC(num_particles=particles, check_every=ess_every)
    from egps_ppl.infer.sps import ScalablePowerSampler

    return ScalablePowerSampler(top_k=top_k, rollouts=rollouts, horizon=horizon, block_size=block)


def _is_kernel_preset(spec: str) -> bool:
    from egps_ppl.kernels.presets import PRESETS

    return spec in PRESETS


def _check_kernel_spec(spec: str) -> None:
    """Parse a kernel spec once against a throwaway target, so typos fail before any problem is run."""
    from egps_ppl.kernels.presets import build_kernel
    from egps_ppl.models.markov import MarkovLM

    lm = MarkovLM([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], eos_token_id=0)
    build_kernel(spec, PowerDistribution(lm, [], 2.0, 2))
