"""Run an egps_ppl kernel under ``pyro.infer.MCMC``, for users who already live in Pyro.

>>> import pyro
>>> from pyro.infer import MCMC
>>> from egps_ppl.pyro import PyroKernel
>>> from egps_ppl.kernels import MetropolisHastings
>>> from egps_ppl.models.testbeds import random_markov
>>> from egps_ppl.target import PowerDistribution
>>> target = PowerDistribution(random_markov(3, seed=0), [], alpha=4.0, max_new_tokens=3)
>>> pyro.set_rng_seed(0)
>>> mcmc = MCMC(PyroKernel(MetropolisHastings(target)), num_samples=50, warmup_steps=10, disable_progbar=True)
>>> mcmc.run()
>>> mcmc.get_samples()["x"].shape
torch.Size([50, 3])
>>> 0.0 < mcmc.kernel.diagnostics()["acceptance rate"] <= 1.0
True
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from pyro.infer.mcmc.mcmc_kernel import MCMCKernel

from egps_ppl.errors import EGPSError
from egps_ppl.kernels.base import Kernel, StepInfo
from egps_ppl.pyro.model import SITE, PowerPotential, completion_mask, power_model
from egps_ppl.state import PAD, Sequences
from egps_ppl.target import PowerDistribution


class PyroKernel(MCMCKernel):
    """An egps_ppl :class:`Kernel` as a Pyro ``MCMCKernel`` over the site ``"x"`` (one chain).

    ``pyro.infer.MCMC(PyroKernel(kernel), num_samples=..., warmup_steps=...).run()`` then samples the power
    distribution with Pyro's runner: ``get_samples()["x"]`` is a ``LongTensor[num_samples, T]`` of completions
    padded with ``-1`` (the value format of :class:`egps_ppl.pyro.model.SequenceDistribution`).

    The adapter keeps the kernel's chain state (a one-row :class:`Sequences` with its per-token statistics and
    backend cache) between ``sample`` calls and only rescores when Pyro hands back parameters that differ from
    it, so an acceptance ratio still costs only the changed suffix.

    Parameters
    ----------
    kernel:
        Any egps_ppl kernel (``MetropolisHastings``, ``Cycle``, ``Mixture``, ...).
    initial:
        Optional start: a completion (token ids, with or without ``-1`` padding) or a one-row ``Sequences``.
        Default: a draw from ``target.sample_proposal(1)`` (token-level sampling from ``q ∝ p^α``) at each
        ``setup``, i.e. at the start of every chain. ``MCMC(..., initial_params={"x": tokens})`` also works.
    generator:
        Optional random generator for the kernel's steps and the initial draw. Default ``None``: torch's global
        generator, which Pyro seeds per chain (``pyro.set_rng_seed``; each worker process of a multi-chain run
        gets its own seed). Leave it ``None`` when ``num_chains > 1``: every process would copy one generator
        and run identical chains.

    Attributes
    ----------
    model:
        The Pyro model of the target (:func:`egps_ppl.pyro.model.power_model`), for Pyro utilities that want one.
    potential_fn:
        Its potential through Pyro's poutine (:func:`egps_ppl.pyro.model.potential_fn`).
    transforms:
        ``{}``: the site is discrete, so there is no transform to unconstrained space.
    state:
        The current chain state (``None`` before the first ``setup``).
    last_info:
        The :class:`StepInfo` of the latest step.

    Notes
    -----
    Pyro's runner advances one chain per kernel call; ``num_chains > 1`` runs chains one after another or in
    separate processes, each step a forward pass of batch 1. It cannot batch chains into one forward pass the
    way :class:`egps_ppl.infer.MCMC` does (``C`` chains per step, and MTM tries, in a single batched call), so
    prefer that runner for throughput and this adapter for interoperability with Pyro code.

    ``diagnostics()`` reports the acceptance rate of the sampling phase (warmup excluded, as HMC does). Pyro
    1.9's ``MCMC.diagnostics()`` and ``MCMC.summary()`` compute ESS with float operations and fail on the integer
    site ``"x"``; read this kernel's ``diagnostics()`` (``mcmc.kernel.diagnostics()``) and compute ESS on a
    float function of the draws (e.g. ``log p``) instead, or export through ``egps_ppl``'s own runner.
    """

    def __init__(
        self,
        kernel: Kernel,
        initial: Sequence[int] | torch.Tensor | Sequences | None = None,
        generator: torch.Generator | None = None,
    ) -> None:
        if not isinstance(kernel, Kernel):
            raise EGPSError(f"PyroKernel wraps an egps_ppl Kernel, got {type(kernel).__name__}")
        self.kernel = kernel
        self.target: PowerDistribution = kernel.target
        self.generator = generator
        self.model = power_model(self.target)
        self.potential_fn = PowerPotential(self.target)
        self.transforms: dict[str, Any] = {}
        self.state: Sequences | None = None
        self.last_info: StepInfo | None = None
        self._pending: Sequences | None = None if initial is None else self._to_state(initial)
        self._warmup_steps = 0
        self._reset_counters()

    # ------------------------------------------------------------------ Pyro's MCMCKernel interface
    def setup(self, warmup_steps: int, *args: Any, **kwargs: Any) -> None:
        """Start a chain: take the pending initial parameters (given, or else a fresh proposal draw)."""
        if args or kwargs:
            raise EGPSError("PyroKernel's model takes no arguments; call MCMC.run() without any")
        self._warmup_steps = int(warmup_steps)
        self._reset_counters()
        start = self._pending
        if start is None:
            start, _ = self.target.sample_proposal(1, self.generator)
        self._pending = None
        self.state, _ = self.kernel.prepare(start)

    @property
    def initial_params(self) -> dict[str, torch.Tensor]:
        """``{"x": tokens[T]}``: the chain's start (drawn now if none was given and no chain has started)."""
        if self._pending is None and self.state is None:
            self._pending, _ = self.target.sample_proposal(1, self.generator)
        start = self._pending if self._pending is not None else self.state
        assert start is not None
        return {SITE: start.tokens[0].clone()}

    @initial_params.setter
    def initial_params(self, params: Mapping[str, torch.Tensor]) -> None:
        if SITE not in params:
            raise EGPSError(f"initial_params needs the site {SITE!r}; got {sorted(params)}")
        self._pending = self._to_state(params[SITE])

    def sample(self, params: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """One kernel step from ``params["x"]`` (the kept state when it matches, rescored otherwise)."""
        if self.state is None:
            self.setup(0)
        assert self.state is not None
        x = torch.as_tensor(params[SITE])
        if not self._matches(x):
            self.state, _ = self.kernel.prepare(self._to_state(x))
        if self._t == self._warmup_steps:
            self.end_warmup()
        self.state, info = self.kernel.step(self.state, self.generator)
        self.last_info = info
        self._t += 1
        self._steps += 1
        self._accepted += int(info.accepted.sum())
        self._accept_prob += float(info.accept_prob.sum())
        self._decode_tokens += int(info.decode_tokens.sum())
        self._scored_tokens += int(info.scored_tokens.sum())
        self._forward_calls += int(info.forward_calls)
        return {SITE: self.state.tokens[0].clone()}

    def end_warmup(self) -> None:
        """Reset the acceptance counters, so ``diagnostics()`` covers the sampling phase only."""
        self._steps = 0
        self._accepted = 0
        self._accept_prob = 0.0

    def logging(self) -> OrderedDict[str, str]:
        """What Pyro's progress bar shows after each step."""
        return OrderedDict(
            [
                ("acc. rate", f"{self.acceptance_rate:.3f}"),
                ("len", str(int(self.state.length[0])) if self.state is not None else "-"),
            ]
        )

    def diagnostics(self) -> dict[str, float | int]:
        """Acceptance rate (fraction of accepted proposals) and mean acceptance probability of the sampling
        phase, plus the run's compute counters (warmup included)."""
        return {
            "acceptance rate": self.acceptance_rate,
            "mean accept prob": self._accept_prob / self._steps if self._steps else float("nan"),
            "decode tokens": self._decode_tokens,
            "scored tokens": self._scored_tokens,
            "forward calls": self._forward_calls,
        }

    @property
    def acceptance_rate(self) -> float:
        """Accepted proposals / steps since the end of warmup (since the start while warming up)."""
        return self._accepted / self._steps if self._steps else float("nan")

    # ------------------------------------------------------------------ helpers
    def _reset_counters(self) -> None:
        self._t = 0
        self._steps = 0
        self._accepted = 0
        self._accept_prob = 0.0
        self._decode_tokens = 0
        self._scored_tokens = 0
        self._forward_calls = 0

    def _matches(self, x: torch.Tensor) -> bool:
        assert self.state is not None
        current = self.state.tokens[0]
        return x.shape == current.shape and bool((x.to(current.device) == current).all())

    def _to_state(self, value: Sequence[int] | torch.Tensor | Sequences) -> Sequences:
        """A one-row scored state from a completion (padded or not) or a one-row ``Sequences``."""
        if isinstance(value, Sequences):
            if value.num_rows != 1:
                raise EGPSError(f"PyroKernel runs one chain; the initial state has {value.num_rows} rows")
            return value
        tokens = torch.as_tensor(value).reshape(-1).long().cpu()
        if tokens.numel() > self.target.max_new_tokens:
            raise EGPSError(
                f"an initial completion has {tokens.numel()} positions > max_new_tokens={self.target.max_new_tokens}"
            )
        padded = torch.full((1, self.target.max_new_tokens), PAD, dtype=torch.long)
        padded[0, : tokens.numel()] = tokens
        length, _ = completion_mask(padded, self.target.lm.vocab_size, self.target.max_new_tokens, None)
        if (padded[0, int(length[0]) :] != PAD).any():
            raise EGPSError(f"initial completion {tokens.tolist()} has padding (-1) before a real token")
        seqs, _ = self.target.from_completions([padded[0, : int(length[0])].tolist()])
        return seqs

    def __repr__(self) -> str:
        return f"PyroKernel({self.kernel!r})"


__all__ = ["PyroKernel"]
