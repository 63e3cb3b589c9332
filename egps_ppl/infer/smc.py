"""Power-SMC: sequential Monte Carlo over tokens for the power target π(x) ∝ p(x)^α (arXiv 2602.10273).

N particles (completions) grow one token at a time in one batched ``extend`` call per token. Each particle
carries an importance weight; when the effective sample size (ESS) drops, the population is resampled and the
KV caches follow the surviving particles (``Sequences.take``), so nothing is recomputed. The output is the weighted
population, one particle drawn in proportion to its final weight, and an estimate of ``log Σ_x p(x)^α``.

The weights
-----------
Write ``ℓ_s = log p(x_s | h_s)`` and ``ρ_s = log q(x_s | h_s)`` for the base model and the proposal policy ``q``
(temperature ``1/α`` by default), ``L_t = Σ_{s<=t} ℓ_s`` (``L_0 = 0``), and let the bridge be

    α_t = 1 + (α − 1) · min(t, B) / B      (t >= 1; α_t = α for every t when B = ``bridge_tokens`` = 0),

with ``α_0 = 1``. The intermediate target of an unfinished prefix after ``t`` tokens is ``p(x_{1:t})^{α_t}``,
and the target of a *finished* completion (EOS at position ``n``, or ``n = T`` tokens without EOS) is already
the final one, ``p(x_{1:n})^α · exp(f(x))`` with ``f`` the target's optional ``log_factor`` (0 by default).
The incremental log-weight of a particle that samples token ``t`` is therefore

    Δ_t = α_t ℓ_t − ρ_t                               (new token at the current power)
          + (α_t − α_{t−1}) L_{t−1}                    (catch-up: the prefix re-weighted to the new power)
          + 1[finishes at t] · ((α − α_t) L_t + f(x))  (finishing: straight to the final target)

and a finished particle keeps its weight from then on (it is extended by nothing, with ``q = p = 1``).
Summation by parts, ``α_t ℓ_t + (α_t − α_{t−1}) L_{t−1} = α_t L_t − α_{t−1} L_{t−1}``, telescopes the product
of increments of a completion of length ``n`` to

    log w(x) = α_n L_n − log q(x) + (α − α_n) L_n + f(x) = α log p(x) + f(x) − log q(x),

i.e. exactly the importance weight of π against the proposal, whether ``x`` ends inside the bridge (``n < B``,
where the finishing term supplies the missing ``(α − α_n) L_n``), after it (``α_n = α``, the term is 0) or at the
limit ``T`` without EOS (same support as :class:`~egps_ppl.target.PowerDistribution` and
:class:`~egps_ppl.models.exact.ExactPower`). Resampling between steps only changes *which* particles carry
these weights, so the final weighted population targets π exactly, for any ``B`` (including ``B > T``).

Resampling and the evidence
---------------------------
Every ``check_every`` tokens the ESS ``(Σ w)² / Σ w²`` is compared with ``ess_threshold · N``; below it, indices
are drawn by :func:`resample` and every weight is reset to the *mean* weight. Resetting to the mean (rather
than to 1) keeps ``log Ẑ = log((1/N) Σ_i w_i)`` valid at all times: it equals the sum over resampling epochs
of the log mean weight of each epoch, the standard unbiased SMC estimate of
``Z = Σ_x p(x)^α exp(f(x))`` over completions of at most ``T`` tokens (``ExactPower.log_normalizer`` when
``f = 0``). The ESS is also recorded once at the end, but the final weights are not resampled: they are output.

Caveats
-------
* Weighted averages and ``Ẑ`` are exact in expectation (``Ẑ``) or consistent as ``N → ∞`` (averages); the single
  output particle is a draw from ``E[Σ_i W_i δ_{x_i}]``, which carries the usual ``O(1/N)`` self-normalisation
  bias (measured on a 364-completion Markov model: P(final token = EOS) 0.624 / 0.710 / 0.732 at
  N = 16 / 64 / 256 against the exact 0.739).
* A truncating proposal (``top_k``/``top_p``) cannot propose every completion: the weights then target π
  restricted to the proposal's support.
* Costs are per *slot*: ``Sequences.take`` moves sequences between slots but the cost counters stay where they are
  and keep accumulating, so ``cost.decode_tokens[i]`` is the work done in slot ``i`` across all particles that
  lived there, and the sums over slots are the total work.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from egps_ppl.errors import EGPSError, check_positive_int
from egps_ppl.infer.samplers import SamplerResult
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.rng import Generator, uniform
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

__all__ = ["RESAMPLING_SCHEMES", "PowerSMC", "effective_sample_size", "resample"]

RESAMPLING_SCHEMES = ("systematic", "multinomial", "residual")
"""Names accepted by :func:`resample` and :class:`PowerSMC`."""

# Relative slack on the ESS comparison: equal weights give an ESS of N up to round-off, and resampling a
# population of equal weights (ess_threshold = 1) would only add noise.
_ESS_SLACK = 1e-9


def _normalised(log_weights: torch.Tensor) -> torch.Tensor:
    """``float64[N]`` probabilities from log-weights (``-inf`` allowed; not all of them, and no NaN/+inf)."""
    log_w = torch.as_tensor(log_weights).detach().to(device="cpu", dtype=torch.float64)
    if log_w.dim() != 1 or log_w.numel() == 0:
        raise EGPSError(f"log_weights must be a non-empty 1-D tensor, got shape {tuple(log_w.shape)}")
    if torch.isnan(log_w).any() or torch.isposinf(log_w).any():
        raise EGPSError("log_weights contain NaN or +inf")
    if torch.isneginf(log_w).all():
        raise EGPSError("every weight is zero (all log_weights are -inf): nothing to resample")
    return torch.softmax(log_w, dim=0)


def _check_scheme(scheme: str) -> str:
    if scheme not in RESAMPLING_SCHEMES:
        raise EGPSError(f"unknown resampling scheme {scheme!r}; choose one of {', '.join(RESAMPLING_SCHEMES)}")
    return scheme


def _invert_cdf(weights: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """Indices ``i`` with ``cdf[i-1] <= point < cdf[i]`` for points in ``[0, 1)`` of the total mass."""
    cdf = torch.cumsum(weights, 0)
    index = torch.searchsorted(cdf, points * cdf[-1], right=True)
    # Round-off can put a point at the total itself: give it to the last index of positive weight.
    last_positive = int(torch.nonzero(weights > 0).max())
    return index.clamp(max=last_positive)


def resample(
    log_weights: torch.Tensor,
    generator: Generator = None,
    scheme: str = "systematic",
    num: int | None = None,
    stream: int | None = None,
) -> torch.Tensor:
    """Ancestor indices drawn in proportion to ``exp(log_weights)``.

    Every scheme is unbiased: the expected number of copies of particle ``i`` is ``num · w_i`` (``w`` the
    normalised weights). They differ in variance: multinomial draws ``num`` i.i.d. indices; residual keeps
    ``floor(num · w_i)`` copies deterministically and draws the remainder multinomially from the residual
    weights; systematic uses one uniform ``u`` and the points ``(u + k) / num``, so particle ``i`` gets
    ``floor(num · w_i)`` or ``floor(num · w_i) + 1`` copies (the lowest variance of the three in practice).

    Parameters
    ----------
    log_weights : torch.Tensor
        ``[N]`` unnormalised log-weights; ``-inf`` entries (zero weight) are never drawn.
    generator : torch.Generator or Streams, optional
        CPU generator for the uniforms (the global one when ``None``).
    scheme : str
        ``"systematic"`` (default), ``"multinomial"`` or ``"residual"``.
    num : int, optional
        Number of indices to draw (default ``N``).
    stream : int, optional
        The stream every uniform comes from when ``generator`` is a :class:`~egps_ppl.rng.Streams`.

    Returns
    -------
    torch.LongTensor
        ``[num]`` indices into ``log_weights``, on the CPU, in non-decreasing order for systematic and
        residual resampling.

    Raises
    ------
    EGPSError
        Unknown scheme, a bad ``num``, an empty/NaN/+inf weight vector, or all weights zero.
    """
    _check_scheme(scheme)
    weights = _normalised(log_weights)
    n = weights.numel() if num is None else check_positive_int("num", num)

    def draws(count: int) -> torch.Tensor:
        return uniform(generator, count, None if stream is None else torch.full((count,), stream))

    if scheme == "multinomial":
        u = draws(n)
        # Sorted uniforms give sorted indices, which keeps copies of a particle next to each other.
        return _invert_cdf(weights, torch.sort(u).values)
    if scheme == "systematic":
        u = draws(1)
        points = (u + torch.arange(n, dtype=torch.float64)) / n
        return _invert_cdf(weights, points)
    # Residual: the integer part of num·w deterministically, the fractional parts by multinomial draws.
    expected = n * weights
    copies = torch.floor(expected).long()
    rest = n - int(copies.sum())
    index = torch.repeat_interleave(torch.arange(weights.numel()), copies)
    if rest > 0:
        residual = (expected - copies).clamp(min=0)
        if float(residual.sum()) <= 0:  # only possible through round-off: fall back to the weights
            residual = weights
        u = torch.sort(draws(rest)).values
        index = torch.sort(torch.cat([index, _invert_cdf(residual, u)])).values
    return index[:n]


def effective_sample_size(log_weights: torch.Tensor) -> float:
    """Kish's ESS ``(Σ w)² / Σ w²`` of unnormalised log-weights, in ``[1, N]``."""
    log_w = torch.as_tensor(log_weights, dtype=torch.float64)
    return float(torch.exp(2 * torch.logsumexp(log_w, 0) - torch.logsumexp(2 * log_w, 0)))


class PowerSMC:
    """Power-SMC: N particles grown token by token with importance weights and adaptive resampling.

    Implements the :class:`~egps_ppl.infer.samplers.Sampler` protocol; the weights and the bridge are derived
    in the module docstring (:mod:`egps_ppl.infer.smc`). Defaults follow the paper.

    Parameters
    ----------
    num_particles : int
        ``N >= 1`` particles, advanced together in one batched ``extend`` call per token (default 64).
    bridge_tokens : int
        ``B >= 0``: α rises linearly from 1 to the target's α over the first ``B`` tokens (default 400); 0 means
        no bridge (the power is α from the first token). Whatever ``B``, the final target is exactly π.
    ess_threshold : float
        Resample when ``ESS < ess_threshold · N``; in ``(0, 1]`` (default 0.5). 1 resamples at every check
        unless the weights are all equal.
    check_every : int
        The ESS is checked after every ``check_every`` tokens (default 64).
    resampling : str
        ``"systematic"`` (default), ``"multinomial"`` or ``"residual"``; see :func:`resample`.
    proposal : PowerPolicy, optional
        The token policy ``q`` the particles are extended with; default ``PowerPolicy(target.alpha)``
        (temperature ``1/α``). A truncating policy (top-k/top-p) restricts the target to its support.

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(random_markov(4, seed=0), prompt=[], alpha=4.0, max_new_tokens=5)
    >>> result = PowerSMC(num_particles=32, check_every=1).run(target, torch.Generator().manual_seed(0))
    >>> result.samples.num_rows, 0 <= result.chosen < 32, abs(result.log_weights.exp().sum().item() - 1) < 1e-12
    (32, True, True)
    """

    name = "smc"

    def __init__(
        self,
        num_particles: int = 64,
        bridge_tokens: int = 400,
        ess_threshold: float = 0.5,
        check_every: int = 64,
        resampling: str = "systematic",
        proposal: PowerPolicy | None = None,
    ) -> None:
        self.num_particles = check_positive_int("num_particles", num_particles)
        if isinstance(bridge_tokens, bool) or not isinstance(bridge_tokens, int) or bridge_tokens < 0:
            raise EGPSError(f"bridge_tokens must be an integer >= 0, got {bridge_tokens!r}")
        self.bridge_tokens = bridge_tokens
        try:
            threshold = float(ess_threshold)
        except (TypeError, ValueError):
            raise EGPSError(f"ess_threshold must be a number in (0, 1], got {ess_threshold!r}") from None
        if isinstance(ess_threshold, bool) or not 0.0 < threshold <= 1.0:
            raise EGPSError(f"ess_threshold must be in (0, 1], got {ess_threshold!r}")
        self.ess_threshold = threshold
        self.check_every = check_positive_int("check_every", check_every)
        self.resampling = _check_scheme(resampling)
        if proposal is not None and not isinstance(proposal, PowerPolicy):
            raise EGPSError(f"proposal must be a PowerPolicy or None, got {type(proposal).__name__}")
        self.proposal = proposal

    def config(self) -> dict[str, Any]:
        """The sampler's settings (JSON-serialisable)."""
        return {
            "name": self.name,
            "num_particles": self.num_particles,
            "bridge_tokens": self.bridge_tokens,
            "ess_threshold": self.ess_threshold,
            "check_every": self.check_every,
            "resampling": self.resampling,
            "proposal": None if self.proposal is None else self.proposal.describe(),
        }

    def alpha_at(self, t: torch.Tensor, alpha: float) -> torch.Tensor:
        """``float64``: the bridged power ``α_t`` after ``t`` tokens (``α_0 = 1``; ``α_t = α`` for ``t >= B``)."""
        t = torch.as_tensor(t, dtype=torch.float64)
        if self.bridge_tokens == 0:
            return torch.where(t > 0, torch.full_like(t, alpha), torch.ones_like(t))
        return 1.0 + (alpha - 1.0) * t.clamp(max=self.bridge_tokens) / self.bridge_tokens

    def run(self, target: PowerDistribution, generator: torch.Generator | None = None) -> SamplerResult:
        """Run Power-SMC on ``target``.

        Parameters
        ----------
        target : PowerDistribution
            The power target (any backend; its ``log_factor``, if any, is applied when a particle finishes).
        generator : torch.Generator, optional
            CPU generator for every draw (tokens, resampling, the output particle); the same state gives the
            same result.

        Returns
        -------
        SamplerResult
            ``samples``: the final particles; ``log_weights``: their normalised log-weights; ``chosen``: one
            particle drawn in proportion to its weight; ``log_evidence``: the estimate of
            ``log Σ_x p(x)^α exp(f(x))``; ``cost``: summed per slot over all steps; ``extra``:
            ``resample_count``, ``resample_steps``, ``ess_history`` (the ESS at each check and at the end),
            ``final_ess``, ``steps`` (tokens of the longest particle).

        Raises
        ------
        EGPSError
            If every particle ends with zero weight (e.g. a ``log_factor`` that forbids all of them).
        """
        if target.batched:
            raise EGPSError("PowerSMC.run takes a single-prompt target; use run_populations for a plate")
        policy = self.proposal if self.proposal is not None else PowerPolicy(target.alpha)
        (result,) = self.run_populations(target, target.empty(self.num_particles, policy), generator)
        return result

    def run_populations(self, target: PowerDistribution, seqs: Sequences, generator: Generator = None) -> list:
        """Run Power-SMC on several independent populations in one batch: one per problem of a plate target.

        Parameters
        ----------
        target : PowerDistribution
            The target (a plate over problems, or a single prompt).
        seqs : Sequences
            Empty rows, ``num_particles`` per population, consecutive (``seqs.problem`` names each row's problem;
            ``None``: one population). With per-row streams (``seqs.stream`` and a
            :class:`~egps_ppl.rng.Streams` generator) a population draws its resampling uniforms from the stream
            of its first row, so its result does not depend on the others.
        generator : torch.Generator or Streams, optional
            Source of randomness.

        Returns
        -------
        list of SamplerResult
            One per population, in row order (see :meth:`run`).
        """
        lm, n = target.lm, self.num_particles
        if seqs.num_rows % n:
            raise EGPSError(f"{seqs.num_rows} rows are not populations of {n} particles")
        groups = [torch.arange(g * n, (g + 1) * n) for g in range(seqs.num_rows // n)]
        streams = None if seqs.stream is None else [int(seqs.stream[g[0]]) for g in groups]
        device = seqs.device
        log_w = torch.zeros(seqs.num_rows, dtype=torch.float64, device=device)
        cost = Cost.zero(seqs.num_rows, device)
        ess_history: list[list[float]] = [[] for _ in groups]
        resample_steps: list[list[int]] = [[] for _ in groups]
        step = 0
        done = seqs.complete()
        while not bool(done.all()):
            old_length = seqs.length
            # One batched call grows every unfinished particle by one token; finished rows are left as they are.
            seqs, step_cost = lm.extend(seqs, start=old_length, stop=old_length + 1, generator=generator)
            cost = cost + step_cost
            step += 1
            done = seqs.complete()
            log_w = log_w + self._increment(target, seqs, old_length, done)
            if torch.isneginf(log_w).all():
                raise EGPSError(
                    "every particle has zero weight (the target's log_factor is -inf on all of them); "
                    "use more particles or a proposal that reaches the allowed completions"
                )
            if step % self.check_every == 0:
                index = torch.arange(seqs.num_rows, device=device)
                for g, rows in enumerate(groups):
                    if bool(done[rows].all()):
                        continue  # a finished population is not checked again
                    ess = effective_sample_size(log_w[rows])
                    ess_history[g].append(ess)
                    if ess < self.ess_threshold * n * (1.0 - _ESS_SLACK):
                        stream = None if streams is None else streams[g]
                        index[rows] = rows[0] + resample(log_w[rows], generator, self.resampling, stream=stream)
                        # Reset to the mean weight: log((1/N) Σ w) is unchanged, so it stays the evidence estimate.
                        log_w[rows] = float(torch.logsumexp(log_w[rows], 0)) - math.log(n)
                        resample_steps[g].append(step)
                if not torch.equal(index, torch.arange(seqs.num_rows, device=device)):
                    # take carries each survivor's KV cache rows (and stream) along: nothing is recomputed.
                    seqs, done = seqs.take(index), done[index]
        results = []
        for g, rows in enumerate(groups):
            final_ess = effective_sample_size(log_w[rows])
            ess_history[g].append(final_ess)
            log_total = torch.logsumexp(log_w[rows], 0)
            stream = None if streams is None else streams[g]
            chosen = int(resample(log_w[rows], generator, "multinomial", num=1, stream=stream)[0])
            population = seqs.take(rows) if len(groups) > 1 else seqs
            results.append(
                SamplerResult(
                    samples=population,
                    chosen=chosen,
                    cost=Cost(cost.decode_tokens[rows], cost.scored_tokens[rows], cost.forward_calls),
                    log_weights=log_w[rows] - log_total,
                    log_evidence=float(log_total) - math.log(n),
                    extra={
                        "resample_count": len(resample_steps[g]),
                        "resample_steps": resample_steps[g],
                        "ess_history": [round(e, 4) for e in ess_history[g]],
                        "final_ess": final_ess,
                        "steps": step,
                    },
                )
            )
        return results

    def _increment(
        self, target: PowerDistribution, seqs: Sequences, old_length: torch.Tensor, done: torch.Tensor
    ) -> torch.Tensor:
        """``float64[N]`` incremental log-weights ``Δ_t`` of one step (0 for rows that did not grow); ``done`` is
        ``seqs.complete()``."""
        grew = seqs.length > old_length
        pos = old_length.clamp(max=seqs.capacity - 1).unsqueeze(1)
        logp_new = seqs.logp.gather(1, pos).squeeze(1)
        logq_new = seqs.logq.gather(1, pos).squeeze(1)
        cum_logp = seqs.log_p()  # L_t for grown rows
        prev_logp = cum_logp - logp_new  # L_{t-1}
        alpha_t = self.alpha_at(seqs.length, target.alpha)
        alpha_prev = self.alpha_at(old_length, target.alpha)
        delta = alpha_t * logp_new - logq_new + (alpha_t - alpha_prev) * prev_logp
        finished = grew & done
        # Finishing: catch up to the final power (needed when the particle ends inside the bridge).
        delta = delta + torch.where(finished, (target.alpha - alpha_t) * cum_logp, torch.zeros_like(delta))
        if target.log_factor is not None and bool(finished.any()):
            rows = finished.nonzero().flatten()
            factor = torch.as_tensor(target.log_factor(seqs.take(rows)), dtype=torch.float64).to(delta.device)
            delta = delta.index_add(0, rows, factor.reshape(-1))
        return torch.where(grew, delta, torch.zeros_like(delta))
