"""MCMC as a :class:`~egps_ppl.infer.samplers.Sampler`: chains of a kernel spec, one answer per prompt.

:class:`MCMCSampler` wraps the batched runner :class:`~egps_ppl.infer.mcmc.MCMC` in the protocol every other
sampler implements (``run(target, generator) -> SamplerResult``, ``config()``), so the evaluation harness, the
divergence analysis and your own scripts treat MCMC like plain sampling, Power-SMC or Scalable Power Sampling.

The answer
----------
Each chain runs ``steps`` kernel steps (optionally after a block-wise growth phase, see
:class:`~egps_ppl.infer.schedule.BlockSchedule`); the output row is the **final state of the chain whose final
state has the highest target log-probability** α·log p(x). With one chain (the default) that is the final state
of chain 0: the papers' protocol, one MCMC sample per question. With several chains, taking the best final state
turns the extra chains into a best-of-C over approximate π-samples; ``select="first"`` keeps chain 0's instead.
"""

from __future__ import annotations

from typing import Any

import torch

from egps_ppl.errors import EGPSError, check_positive_int
from egps_ppl.infer.mcmc import MCMC
from egps_ppl.infer.samplers import SamplerResult
from egps_ppl.infer.schedule import BlockSchedule, make_schedule
from egps_ppl.kernels.presets import build_kernel
from egps_ppl.target import PowerDistribution

__all__ = ["MCMCSampler"]


class MCMCSampler:
    """Power sampling with MCMC chains of a kernel spec, behind the :class:`~egps_ppl.infer.samplers.Sampler`
    protocol.

    Parameters
    ----------
    kernel : str
        A kernel spec of :func:`~egps_ppl.kernels.presets.build_kernel` (``mh``, ``entropy-mh``, ``mtm``, ``egps``,
        ``cycle(...)``, ``mixture(...)``, or a preset added with ``register_preset``); also the sampler's name.
    steps : int
        Kernel steps per chain after the start (or after the block-wise growth phase).
    num_chains : int
        Chains run together; the output is the best final state (see the module docstring).
    block_size : int or None
        Grow the completion ``block_size`` tokens at a time with ``steps_per_block`` kernel steps after each
        block; ``None`` starts from a full ancestral sample at temperature 1/α.
    steps_per_block : int
        Kernel steps after each block (``>= 0``).
    adaptive : bool
        Use :class:`~egps_ppl.infer.schedule.EntropyAdaptiveSchedule` (skip deterministic blocks); needs
        ``block_size``.
    select : {"best", "first"}
        Which final state is the output: the highest α·log p over chains, or chain 0's.

    Raises
    ------
    EGPSError
        For an unknown kernel or bad settings (checked here, before any model runs).

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> target = PowerDistribution(random_markov(4, seed=0), [], alpha=4.0, max_new_tokens=6)
    >>> result = MCMCSampler("mh", steps=5, num_chains=3).run(target, torch.Generator().manual_seed(0))
    >>> result.samples.num_rows, sorted(result.extra)
    (3, ['chosen_chain', 'final_acceptance_rate'])
    """

    def __init__(
        self,
        kernel: str = "mh",
        steps: int = 10,
        num_chains: int = 1,
        block_size: int | None = None,
        steps_per_block: int = 10,
        adaptive: bool = False,
        select: str = "best",
    ) -> None:
        if not isinstance(kernel, str) or not kernel.strip():
            raise EGPSError(f"kernel must be a non-empty kernel spec, got {kernel!r}")
        self.kernel = kernel.strip().replace(" ", "")
        self.name = self.kernel
        self.steps = check_positive_int("steps", steps)
        self.num_chains = check_positive_int("num_chains", num_chains)
        if block_size is not None:
            check_positive_int("block_size", block_size)
        if isinstance(steps_per_block, bool) or not isinstance(steps_per_block, int) or steps_per_block < 0:
            raise EGPSError(f"steps_per_block must be an integer >= 0, got {steps_per_block!r}")
        if select not in ("best", "first"):
            raise EGPSError(f"select must be 'best' or 'first', got {select!r}")
        self.block_size, self.steps_per_block = block_size, steps_per_block
        self.adaptive, self.select = bool(adaptive), select
        self.schedule()  # the adaptive schedule without a block size fails here
        _check_kernel_spec(self.kernel)

    def config(self) -> dict[str, Any]:
        """The MCMC settings (recorded with an evaluation run and compared on ``--resume``)."""
        return {
            "name": self.name,
            "steps": self.steps,
            "num_chains": self.num_chains,
            "block_size": self.block_size,
            "steps_per_block": self.steps_per_block if self.block_size else None,
            "adaptive": self.adaptive,
            "select": self.select,
        }

    def schedule(self) -> BlockSchedule | None:
        """The growth schedule of a run (``None`` without ``block_size``)."""
        return make_schedule(self.block_size, self.steps_per_block, self.adaptive)

    def run(self, target: PowerDistribution, generator: torch.Generator | None = None) -> SamplerResult:
        """Run the chains on ``target`` and output the selected final state.

        The chains' random stream is seeded from ``generator``: a freshly seeded one
        (``torch.Generator().manual_seed(s)``, as ``egps eval`` passes) gives exactly the run
        ``MCMC(..., seed=s)`` of ``egps sample``, and is then advanced; a generator that was used before gives a
        seed drawn from it. The same generator state gives the same result.

        Returns
        -------
        SamplerResult
            ``samples``: every chain's final state; ``chosen``: the selected chain; ``cost``: growth, warmup and
            sampling together; ``extra``: ``chosen_chain`` and ``final_acceptance_rate``.
        """
        kernel = build_kernel(self.kernel, target)
        mcmc = MCMC(
            kernel,
            num_samples=1,
            warmup_steps=self.steps - 1,
            num_chains=self.num_chains,
            seed=_chain_seed(generator),
            schedule=self.schedule(),
        ).run()
        state = mcmc.state
        row = int(torch.argmax(target.log_prob(state))) if self.select == "best" else 0
        accept = mcmc.get_sample_stats()["acceptance_rate"]
        extra = {"chosen_chain": row, "final_acceptance_rate": float(accept.mean())}
        return SamplerResult(state, row, mcmc.total_cost(), extra=extra)

    def __repr__(self) -> str:
        settings = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"MCMCSampler({self.kernel!r}, {settings})"


def _chain_seed(generator: torch.Generator | None) -> int | None:
    """The seed of the chains' generator: the caller's own seed while its generator is unused (so a run matches
    ``MCMC(seed=s)``), else a draw from it; the caller's generator is advanced either way."""
    if generator is None:
        return None
    seed = generator.initial_seed()
    fresh = torch.Generator(device=generator.device).manual_seed(seed)
    unused = torch.equal(fresh.get_state(), generator.get_state())
    drawn = int(torch.randint(0, 2**31 - 1, (1,), generator=generator, device=generator.device))
    return int(seed) if unused else drawn


def _check_kernel_spec(spec: str) -> None:
    """Build the kernel once against a throwaway target, so a typo fails before any model runs."""
    from egps_ppl.models.markov import MarkovLM

    lm = MarkovLM([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], eos_token_id=0)
    build_kernel(spec, PowerDistribution(lm, [], 2.0, 2))
