"""Evaluation methods: any sampler of :mod:`egps_ppl.infer` as a method, with the same cost counters.

A method is what the runner calls per (problem, seed): ``run(lm, prompt_ids, max_new_tokens, seed) ->
MethodResult``. One adapter, :class:`SamplerMethod`, turns every :class:`~egps_ppl.infer.samplers.Sampler`
into a method: the answer is the row the sampler outputs. :func:`load_method` builds one by name from the
sampler registry (:func:`~egps_ppl.infer.samplers.load_sampler`):

| name | what it runs |
| --- | --- |
| ``plain`` | one ancestral sample from the base model (temperature 1: ``PowerPolicy(1.0)``) |
| ``low-temp`` | one ancestral sample at temperature ``1/alpha`` (``PowerPolicy(alpha)``) |
| ``best-of-n`` | ``n`` plain samples in one batch; the answer is the one with the highest ``log p`` |
| ``smc`` | Power-SMC (:class:`~egps_ppl.infer.smc.PowerSMC`); the answer is one particle drawn ∝ weight |
| ``sps`` | Scalable Power Sampling (:class:`~egps_ppl.infer.sps.ScalablePowerSampler`) |
| ``mh`` | MCMC (:class:`~egps_ppl.infer.mcmc_sampler.MCMCSampler`) with the ``mh`` kernel on π ∝ p^α |
| ``entropy-mh`` | MCMC with the ``entropy-mh`` kernel |
| ``mtm`` | MCMC with the ``mtm`` kernel (Multiple-Try Metropolis) |
| ``egps`` | MCMC with the ``egps`` kernel (entropy-jump cuts, local multiple tries) |

Any other kernel spec of :func:`egps_ppl.kernels.presets.build_kernel` works too (``entropy-cut-mh``,
``cycle(mh,egps)``, ``mixture(mh:0.7,egps:0.3)``), and so does any name added with
:func:`~egps_ppl.infer.samplers.register_sampler`. The answer of an MCMC method is the best final state over
its chains (chain 0's with one chain; see :mod:`egps_ppl.infer.mcmc_sampler`).

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

from egps_ppl.errors import check_alpha
from egps_ppl.infer.samplers import Sampler, SamplerResult, available_samplers, load_sampler
from egps_ppl.models.base import LanguageModel
from egps_ppl.target import PowerDistribution

__all__ = [
    "Method",
    "MethodResult",
    "SamplerMethod",
    "available_methods",
    "load_method",
]


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


def _generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


class SamplerMethod:
    """A sampler of :mod:`egps_ppl.infer` (anything with the :class:`~egps_ppl.infer.samplers.Sampler` protocol)
    as a method: the answer is the row the sampler outputs (``SamplerResult.chosen``).

    Parameters
    ----------
    sampler : Sampler
        ``PlainSampler``, ``LowTempSampler``, ``BestOfNSampler``, ``PowerSMC``, ``ScalablePowerSampler``,
        ``MCMCSampler`` or your own.
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
        """Run the sampler on π ∝ p(· | prompt)^α seeded by ``seed``; answer its chosen row.

        Samplers that batch across units (:func:`~egps_ppl.infer.batched.supports_batching`) run as a batch of
        one unit with per-row streams, so the record equals that of any batched run; the others get a
        ``torch.Generator`` seeded with ``seed``.
        """
        from egps_ppl.infer.batched import Unit, run_units, supports_batching

        if supports_batching(self.sampler):  # one unit of the batched path: the same record as in any batch
            (out,) = run_units(self.sampler, lm, [Unit(0, list(prompt_ids), seed)], self.alpha, max_new_tokens, 1)
            return self.result(lm, out.result, out.wall_s)
        started = time.perf_counter()
        target = PowerDistribution(lm, prompt_ids, self.alpha, max_new_tokens)
        drawn = self.sampler.run(target, _generator(seed))
        return self.result(lm, drawn, time.perf_counter() - started)

    def result(self, lm: LanguageModel, drawn: SamplerResult, wall_s: float) -> MethodResult:
        """The method's answer from what the sampler drew: its chosen row, costs summed over every row.

        Parameters
        ----------
        lm : LanguageModel
            Decodes the completion.
        drawn : SamplerResult
            The sampler's output for one prompt (from :meth:`run`, or from a batched run).
        wall_s : float
            Seconds the sampling took.

        Returns
        -------
        MethodResult
        """
        log_p = drawn.samples.log_p()
        extra: dict[str, Any] = {
            "log_p": round(float(log_p[drawn.chosen]), 4)
        }  # float32 noise of the batch shape rounded away
        if drawn.samples.num_rows > 1:
            extra["chosen"] = drawn.chosen
            extra["log_p_all"] = [round(float(v), 4) for v in log_p]
        if drawn.log_evidence is not None:
            extra["log_evidence"] = float(drawn.log_evidence)
        extra.update(drawn.extra)
        ids = drawn.samples.row_tokens(drawn.chosen)
        return MethodResult(
            completion_ids=ids,
            completion_text=lm.decode(ids),
            decode_tokens=int(drawn.cost.decode_tokens.sum()),
            scored_tokens=int(drawn.cost.scored_tokens.sum()),
            forward_calls=int(drawn.cost.forward_calls),
            wall_s=wall_s,
            extra=extra,
        )


def available_methods() -> dict[str, str]:
    """Method names and what each runs (the sampler registry: :func:`~egps_ppl.infer.samplers.available_samplers`)."""
    return available_samplers()


def load_method(spec: str, alpha: float = 4.0, **settings: Any) -> Method:
    """A method by name: the sampler :func:`~egps_ppl.infer.samplers.load_sampler` builds, as a
    :class:`SamplerMethod`.

    Parameters
    ----------
    spec : str
        ``plain``, ``low-temp``, ``best-of-n``, ``smc``, ``sps``, ``mh``, ``entropy-mh``, ``mtm``, ``egps``, a name
        added with :func:`~egps_ppl.infer.samplers.register_sampler`, or any other kernel spec
        :func:`~egps_ppl.kernels.presets.build_kernel` accepts (``entropy-cut-mh``, ``cycle(...)``,
        ``mixture(...)``).
    alpha : float
        The power α of the target handed to the sampler (temperature ``1/alpha`` for ``low-temp``; ``plain`` and
        ``best-of-n`` ignore it).
    **settings
        Sampler settings; each sampler takes the ones it knows (see
        :func:`~egps_ppl.infer.samplers.load_sampler`): ``n``; ``particles``, ``ess_every``; ``top_k``,
        ``rollouts``, ``horizon``; ``steps``, ``num_chains``, ``block_size``, ``steps_per_block``,
        ``adaptive``, ``select``.

    Returns
    -------
    Method

    Raises
    ------
    EGPSError
        For an unknown name (the message lists the valid ones) or bad settings.
    """
    check_alpha(alpha)
    return SamplerMethod(load_sampler(spec, **settings), alpha)
