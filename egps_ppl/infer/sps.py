"""Scalable Power Sampling (arXiv 2601.21590): next-token (or next-block) conditionals of π ∝ p^α from rollouts.

The next-token conditional of the sequence-level power distribution is

    π(v | h) ∝ p(v | h)^α · ζ(h v),    ζ(h v) = Σ_y p(y | h v)^α = E_{y ∼ p(·|h v)}[p(y | h v)^(α−1)],

where ``y`` ranges over the futures of ``h v`` (the rest of a completion; ``ζ = 1`` when ``v`` is EOS or ``h v``
reaches the length limit). Scalable Power Sampling estimates ζ by Monte Carlo: ``M`` rollouts of at most ``H``
tokens from the *base* model (temperature 1) after each candidate, ``ζ̂ = mean_m p(rollout_m)^(α−1)``, then
samples the next token from ``π̂(v | h) ∝ p(v | h)^α ζ̂(v)`` and repeats.

Where it is exact and where it is not
-------------------------------------
* With the horizon covering the rest of the completion (``horizon=None``, or ``H >=`` the tokens left), ζ̂ is
  unbiased for the exact ζ, so π̂ is a ratio estimator of the exact next-token conditional of p^α: its bias is
  ``O(1/M)``; the jackknife (:func:`power_conditional`) reduces it to ``O(1/M²)``. A finite horizon ``H``
  estimates ``ζ_H(h v) = Σ_{y_1..H} p(y_1..H | h v)^α`` instead, i.e. it truncates the future: the factor of the
  tokens past ``H`` is taken to be 1 (their p^α mass is ignored), which is *not* ζ. Since ``p^α ≤ p`` for
  ``α > 1`` the truncation overrates candidates whose futures are long (every future looks as if it ended at
  ``H``), relative to those that end soon (EOS).
* Each draw uses fresh rollouts, so the sampled token is distributed as ``E[π̂]``: only the bias of π̂ (not its
  variance) makes the sampler's output differ from π.
* The token-level variant only considers the top-``K`` tokens of ``p(· | h)``: a token outside them is never
  drawn, so unless ``K`` covers every token of positive probability the output is π restricted (at every step)
  to those candidates and renormalised, an approximation whose error grows as ``K`` shrinks.
* The block variant draws ``L`` candidate blocks of ``B`` tokens at temperature ``1/α``, keeps the ``K`` distinct
  ones of highest ``log p`` and samples a block ``∝ p(block)^α ζ̂(block)``: exact in the limit where the kept
  blocks cover every block of positive probability, an approximation otherwise (no importance correction for
  how the candidates were found).
* Only the pure power target is supported: a target with a ``log_factor`` is rejected.

Everything is batched: the rollouts of all rows, candidates and repetitions (``R·K·M`` rows) go through one
``lm.extend`` call per step. Several units (problem, seed) share that batch through
:meth:`ScalablePowerSampler.run_populations` and :meth:`ScalablePowerSampler.iter_populations` (used by
:func:`~egps_ppl.infer.batched.run_units`): every row grows on its own, and with per-row random streams
(:class:`~egps_ppl.rng.Streams`) each row's candidates, rollouts and choices come from its own stream, so a unit's
result does not depend on the rows beside it.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from egps_ppl.errors import EGPSError, check_positive_int
from egps_ppl.infer.samplers import SamplerResult
from egps_ppl.models.base import Cost, LanguageModel, next_token_stats, sample_from_cdf
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.rng import Generator
from egps_ppl.state import PAD, Sequences
from egps_ppl.target import PowerDistribution

__all__ = [
    "ScalablePowerSampler",
    "next_token_logprobs",
    "power_conditional",
    "rollout_log_weights",
]

_BASE = PowerPolicy(1.0)


# ---------------------------------------------------------------------------------------------- validation
def _check_horizon(horizon: int | None) -> int | None:
    if horizon is None:
        return None
    return check_positive_int("horizon", horizon)


def _check_target(target: object) -> PowerDistribution:
    if not isinstance(target, PowerDistribution):
        raise EGPSError(f"Scalable Power Sampling needs a PowerDistribution target, got {type(target).__name__}")
    if target.log_factor is not None:
        raise EGPSError(
            "Scalable Power Sampling estimates the future factor of p^α only; a target with a log_factor "
            "(reward tilt or constraint) is not supported"
        )
    return target


def _per_row(values: torch.Tensor, groups: int) -> torch.Tensor:
    """Sum a per-rollout counter ``[groups * n]`` (rows grouped contiguously) into ``[groups]``."""
    return values.view(groups, -1).sum(1)


def _grouped_cost(cost: Cost, groups: int) -> Cost:
    return Cost(_per_row(cost.decode_tokens, groups), _per_row(cost.scored_tokens, groups), cost.forward_calls)


# ---------------------------------------------------------------------------------------------- rollouts
def _rollouts(
    target: PowerDistribution,
    rows: Sequences,
    rollouts: int,
    horizon: int | None,
    generator: Generator,
) -> tuple[torch.Tensor, Cost]:
    """``float64[N, M]`` = (α − 1)·log p(rollout) of ``M`` base-model rollouts after each of the ``N`` rows (which
    already end in their candidate token or block), and the cost summed per row. Rows that are complete (EOS, or
    at ``rows.limit``) get no rollout and weight 0: their future is empty, ζ = 1."""
    lm = target.lm
    n = rows.num_rows
    index = torch.arange(n, device=rows.device).repeat_interleave(rollouts)
    # The kept prefixes' logq/logz refer to another policy: harmless, only the new positions' logp is read.
    batch = rows.take(index).with_(policy=_BASE)
    start = batch.length.clone()
    stop = None if horizon is None else start + horizon
    out, cost = lm.extend(batch, start, stop, generator)
    log_w = (target.alpha - 1.0) * out.total("logp", start=start)
    return log_w.view(n, rollouts), _grouped_cost(cost, n)


def _append(seqs: Sequences, tokens: torch.Tensor, logp: torch.Tensor | None = None) -> Sequences:
    """Rows with one more token each (statistics of the new position: ``logp`` if given, else 0)."""
    pos = seqs.length.unsqueeze(1)
    zero = torch.zeros(seqs.num_rows, 1, dtype=torch.float64, device=seqs.device)
    new_logp = zero if logp is None else logp.to(torch.float64).unsqueeze(1)
    return seqs.with_(
        tokens=seqs.tokens.scatter(1, pos, tokens.unsqueeze(1)),
        length=seqs.length + 1,
        logp=seqs.logp.scatter(1, pos, new_logp),
        logq=seqs.logq.scatter(1, pos, zero),
        entropy=seqs.entropy.scatter(1, pos, zero),
        logz=seqs.logz.scatter(1, pos, zero),
    )


def rollout_log_weights(
    target: PowerDistribution,
    prefixes: Sequences,
    candidates: torch.Tensor,
    rollouts: int,
    horizon: int | None,
    generator: Generator = None,
) -> tuple[torch.Tensor, Cost]:
    """Log-weights ``(α − 1)·log p(rollout | prefix, candidate)`` of base-model rollouts after each candidate.

    Parameters
    ----------
    target : PowerDistribution
        Gives the model and α.
    prefixes : Sequences
        ``R`` rows of the target (e.g. from ``target.empty``); row ``r``'s prefix is ``tokens[r, :length[r]]``.
        Every row must be able to grow (no EOS at its end, ``length < limit``).
    candidates : torch.Tensor
        ``LongTensor[R, K]`` next-token ids appended (one at a time) to each prefix.
    rollouts : int
        ``M >= 1`` rollouts per (row, candidate).
    horizon : int or None
        Each rollout samples at most this many tokens after the candidate (fewer if it meets EOS or the row's
        ``limit``); ``None`` = up to ``prefixes.limit`` (normally the target's ``max_new_tokens``), in which case
        ``mean_m exp(weights)`` is an unbiased estimate of ``ζ = Σ_y p(y | h v)^α`` over all futures. A shorter
        horizon truncates the future (it estimates the sum over the first ``H`` tokens of the future only).
    generator : torch.Generator or Streams, optional
        CPU random generator for the rollouts (with :class:`~egps_ppl.rng.Streams`, each rollout draws from the
        stream of its prefix row).

    Returns
    -------
    log_weights : torch.Tensor
        ``float64[R, K, M]``; exactly 0 for a candidate that is EOS or that fills the last allowed position.
    cost : Cost
        Counters summed over the ``K·M`` rollouts of each prefix row (entries ``[R]``), ``forward_calls`` of the
        single batched ``extend`` call.
    """
    target = _check_target(target)
    check_positive_int("rollouts", rollouts)
    horizon = _check_horizon(horizon)
    candidates = torch.as_tensor(candidates)
    R = prefixes.num_rows
    if candidates.dim() != 2 or candidates.shape[0] != R:
        raise EGPSError(f"candidates must be [R, K] with R = {R} prefix rows, got {tuple(candidates.shape)}")
    if candidates.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise EGPSError(f"candidates must be integer token ids, got dtype {candidates.dtype}")
    K = candidates.shape[1]
    if K == 0:
        raise EGPSError("candidates must hold at least one token per row")
    V = target.lm.vocab_size
    if candidates.min() < 0 or candidates.max() >= V:
        raise EGPSError(f"candidate token ids must lie in [0, {V})")
    if prefixes.complete().any():
        raise EGPSError("every prefix row must be able to grow (no EOS at its end and length < limit)")
    index = torch.arange(R, device=prefixes.device).repeat_interleave(K)
    rows = _append(prefixes.take(index), candidates.reshape(-1).long().to(prefixes.device))
    log_w, cost = _rollouts(target, rows, rollouts, horizon, generator)
    return log_w.view(R, K, rollouts), _grouped_cost(cost, R)


# ---------------------------------------------------------------------------------------------- the estimator
def _normalise(log_scores: torch.Tensor) -> torch.Tensor:
    """Log-softmax over the last axis that tolerates -inf entries (not all of them)."""
    return log_scores - torch.logsumexp(log_scores, dim=-1, keepdim=True)


def power_conditional(
    log_p_candidates: torch.Tensor,
    log_weights: torch.Tensor,
    alpha: float,
    jackknife: bool = True,
) -> torch.Tensor:
    """Estimated next-token conditional of p^α over ``K`` candidates, ``log π̂(v | h)``.

    ``π̂(v) ∝ p(v | h)^α · ζ̂(v)`` with ``ζ̂(v) = mean_m exp(log_weights[..., v, m])``, normalised over the
    candidates. ζ̂ is unbiased, but π̂ is a ratio of such estimates, so ``E[π̂] − π = O(1/M)``.

    Jackknife: treat the ``M`` rollout indices as i.i.d. replicates (rollout ``i`` of every candidate is one
    replicate) and let ``π̂_{−i}`` be the estimate without replicate ``i``. Then
    ``π̂_jk = M·π̂ − (M − 1)·mean_i π̂_{−i}`` cancels the ``1/M`` term of the bias, leaving ``O(1/M²)``.
    ``π̂_jk`` sums to 1 but can have small negative entries; they are clipped at 0 and the result renormalised
    (the clipped mass is tiny when M is not, and clipping never empties the row since the sum before clipping
    is 1). With ``M = 1`` no replicate can be left out and the plain estimate is returned.

    The ``O(1/M²)`` is asymptotic. With heavy-tailed weights (large α, long futures) and very small ``M`` the
    correction can overshoot: on one V = 4 Markov model at α = 2 (tests/test_sps.py) the jackknifed bias is
    70–75 % of the plain one at M = 3–4, and 3× to 10× smaller from M = 8–16 on; on better-behaved models it is
    already 5× to 15× smaller at M = 2–4. The jackknife is computed on probabilities, so a candidate whose π̂
    underflows float64 gets probability exactly 0 (log π̂ = −inf); the plain estimate stays in log space.

    Parameters
    ----------
    log_p_candidates : torch.Tensor
        ``[R, K]`` ``log p(v | h)`` of the candidates (``-inf`` allowed: such a candidate gets probability 0).
    log_weights : torch.Tensor
        ``[R, K, M]`` rollout log-weights ``(α − 1)·log p(rollout)`` (see :func:`rollout_log_weights`).
    alpha : float
        The power α.
    jackknife : bool
        Apply the leave-one-out bias correction.

    Returns
    -------
    torch.Tensor
        ``float64[R, K]``, ``log π̂``; each row's exponentials sum to 1.
    """
    log_p = torch.as_tensor(log_p_candidates, dtype=torch.float64)
    log_w = torch.as_tensor(log_weights, dtype=torch.float64)
    if log_p.dim() != 2 or log_w.dim() != 3 or log_w.shape[:2] != log_p.shape or log_w.shape[2] < 1:
        raise EGPSError(
            f"power_conditional needs log_p_candidates[R, K] and log_weights[R, K, M >= 1]; got "
            f"{tuple(log_p.shape)} and {tuple(log_w.shape)}"
        )
    if torch.isnan(log_p).any() or torch.isnan(log_w).any() or torch.isposinf(log_p).any():
        raise EGPSError("power_conditional: NaN (or +inf log-probability) in the inputs")
    if not math.isfinite(alpha) or alpha <= 0:
        raise EGPSError(f"alpha must be finite and > 0, got {alpha!r}")
    M = log_w.shape[2]
    scaled = alpha * log_p
    # log ζ̂ = logsumexp_m − log M; the log M cancels in the normalisation, so work with log Σ_m.
    log_sum = torch.logsumexp(log_w, dim=2)
    score = scaled + log_sum
    if torch.isneginf(score).all(1).any():
        raise EGPSError("power_conditional: every candidate of a row has probability 0")
    log_pi = _normalise(score)
    if not jackknife or M == 1:
        return log_pi

    # Leave-one-out sums Σ_{m≠i} w_m in a stable way: relative to each (row, candidate)'s largest weight, S ≥ 1,
    # so S − w_i loses at most M ulps for every i except the argmax, whose sum is recomputed without it.
    top = log_w.max(dim=2, keepdim=True).values
    top = torch.where(torch.isfinite(top), top, torch.zeros_like(top))
    rel = (log_w - top).exp()  # [R, K, M], in [0, 1]
    total = rel.sum(2, keepdim=True)
    loo = (total - rel).clamp(min=0.0)
    arg = log_w.argmax(dim=2, keepdim=True)
    without_top = rel.scatter(2, arg, torch.zeros_like(rel)).sum(2, keepdim=True)
    loo = loo.scatter(2, arg, without_top)
    # log Σ_{m≠i} w_m (the 1/(M − 1) cancels in the normalisation over the candidates, axis 1).
    loo_score = scaled.unsqueeze(2) + loo.log() + top
    loo_norm = torch.logsumexp(loo_score, dim=1, keepdim=True)
    pi_loo = (loo_score - loo_norm).exp()
    # A replicate without which every candidate has weight 0 (only after underflow) carries no information.
    pi_loo = torch.where(torch.isfinite(loo_norm), pi_loo, log_pi.exp().unsqueeze(2))
    corrected = (M * log_pi.exp() - (M - 1) * pi_loo.mean(2)).clamp(min=0.0)
    return corrected.log() - corrected.sum(1, keepdim=True).log()


# ---------------------------------------------------------------------------------------------- next-token p
def next_token_logprobs(lm: LanguageModel, seqs: Sequences) -> tuple[torch.Tensor, Cost, Sequences]:
    """Full next-token log-distributions of every row (``LanguageModel.next_token_logprobs``), with the
    message the token-level sampler needs when a backend does not have them.

    Returns
    -------
    logp : torch.Tensor
        ``float64[R, V]`` (CPU).
    cost : Cost
        Tokens fed to get the distributions.
    seqs : Sequences
        The rows, with the backend cache advanced where there is one.
    """
    try:
        logp, cost, seqs = lm.next_token_logprobs(seqs)
    except (EGPSError, AttributeError) as err:
        raise EGPSError(
            f"the token-level Scalable Power Sampler needs full next-token distributions, which backend "
            f"{type(lm).__name__} does not expose (add a next_token_logprobs(seqs) method); the block variant "
            "(block_size >= 1) works with any backend"
        ) from err
    return torch.as_tensor(logp, dtype=torch.float64).cpu(), cost, seqs


# ---------------------------------------------------------------------------------------------- the sampler
def _sample_index(log_probs: torch.Tensor, generator: Generator, streams: torch.Tensor | None) -> torch.Tensor:
    """One draw per row from ``exp(log_probs[R, K])`` (row ``r`` from stream ``streams[r]`` with per-row streams)."""
    return sample_from_cdf(torch.cumsum(log_probs.exp(), dim=1), generator, streams)


def _first_occurrence(tokens: torch.Tensor, groups: int) -> torch.Tensor:
    """``bool[W, L]``: row ``l`` of group ``w`` (``tokens[W·L, T]``, padded with ``PAD``, groups contiguous) differs
    from every earlier row of its group; by sorting, so ``O(W·L·log(W·L))`` row comparisons."""
    n = tokens.shape[0]
    group = torch.arange(groups, device=tokens.device).repeat_interleave(n // groups)
    _, inverse = torch.unique(torch.cat([group.unsqueeze(1), tokens], 1), dim=0, return_inverse=True)
    index = torch.arange(n, device=tokens.device)
    first = torch.full((n,), n, dtype=torch.long, device=tokens.device).scatter_reduce(0, inverse, index, "amin")
    return (first[inverse] == index).view(groups, -1)


class ScalablePowerSampler:
    """Scalable Power Sampling: sample token by token (or block by block) from rollout estimates of π(· | h).

    Token level (``block_size=None``): at each step take the ``top_k`` most likely tokens of ``p(· | h)``, run
    ``rollouts`` base-model rollouts of ``horizon`` tokens after each, and draw the next token from
    ``π̂(v | h) ∝ p(v | h)^α ζ̂(v)`` (:func:`power_conditional`) over those candidates; append; repeat until EOS or
    the length limit. Restricting to the top-K is an approximation (a token outside them is never drawn); with
    ``top_k >=`` the vocabulary, ``horizon=None`` and many rollouts the output is distributed as π up to the
    (jackknifed, ``O(1/M²)``) bias of π̂. A finite horizon truncates the future factor (see the module notes).

    Block level (``block_size=B``): draw ``num_candidates`` blocks of ``B`` tokens at temperature ``1/α``, keep the
    ``top_k`` distinct ones with the highest ``log p(block | h)``, estimate ζ̂ after each with ``rollouts``
    rollouts and draw a block ``∝ p(block | h)^α ζ̂(block)``. Works with every backend (the token level needs
    full next-token distributions: see :func:`next_token_logprobs`).

    Parameters
    ----------
    top_k : int
        ``K``, candidates kept per step (default 8).
    rollouts : int
        ``M``, rollouts per candidate (default 8).
    horizon : int or None
        ``H``, the most tokens a rollout samples (default 192); ``None`` = to the length limit.
    block_size : int or None
        ``B``; ``None`` (default) for the token-level variant.
    num_candidates : int or None
        ``L``, candidate blocks drawn per step in the block variant (default ``2·top_k``); must be ``None`` at
        token level.
    jackknife : bool
        Use the jackknife bias correction of π̂ (default True).
    n : int
        Independent draws made together in one batch (default 1); the output is the first (``chosen = 0``).

    Notes
    -----
    Per step the rollouts of all rows, candidates and repetitions form one batch of ``n·K·M`` rows and go through
    one ``lm.extend`` call. The cost counters include the rollouts, the candidate blocks and the next-token
    forward passes.
    """

    name = "sps"

    def __init__(
        self,
        top_k: int = 8,
        rollouts: int = 8,
        horizon: int | None = 192,
        block_size: int | None = None,
        num_candidates: int | None = None,
        jackknife: bool = True,
        n: int = 1,
    ) -> None:
        self.top_k = check_positive_int("top_k", top_k)
        self.rollouts = check_positive_int("rollouts", rollouts)
        self.horizon = _check_horizon(horizon)
        self.block_size = None if block_size is None else check_positive_int("block_size", block_size)
        if self.block_size is None and num_candidates is not None:
            raise EGPSError("num_candidates applies to the block variant only; set block_size too")
        if self.block_size is not None:
            num_candidates = 2 * self.top_k if num_candidates is None else num_candidates
            check_positive_int("num_candidates", num_candidates)
        self.num_candidates = num_candidates
        if not isinstance(jackknife, bool):
            raise EGPSError(f"jackknife must be True or False, got {jackknife!r}")
        self.jackknife = jackknife
        self.n = check_positive_int("n", n)

    def config(self) -> dict[str, Any]:
        """The sampler's settings (JSON-serialisable)."""
        return {
            "name": self.name,
            "top_k": self.top_k,
            "rollouts": self.rollouts,
            "horizon": self.horizon,
            "block_size": self.block_size,
            "num_candidates": self.num_candidates,
            "jackknife": self.jackknife,
            "n": self.n,
        }

    # ------------------------------------------------------------------ one step
    def _token_step(
        self, target: PowerDistribution, work: Sequences, generator: Generator
    ) -> tuple[Sequences, Cost, dict[str, torch.Tensor]]:
        lm = target.lm
        W = work.num_rows
        logp_full, cost, work = next_token_logprobs(lm, work)
        k = min(self.top_k, logp_full.shape[1])
        top_logp, cand = logp_full.topk(k, dim=1)
        log_w, roll_cost = rollout_log_weights(target, work, cand, self.rollouts, self.horizon, generator)
        log_pi = power_conditional(top_logp, log_w, target.alpha, self.jackknife)
        choice = _sample_index(log_pi, generator, work.stream)
        rows = torch.arange(W)
        token = cand[rows, choice]
        # Statistics of the appended token under the output's policy, from the distribution already computed.
        stats = next_token_stats(logp_full, work.policy)
        pos = work.length.unsqueeze(1)
        work = work.with_(
            tokens=work.tokens.scatter(1, pos, token.to(work.device).unsqueeze(1)),
            length=work.length + 1,
            logp=work.logp.scatter(1, pos, stats.logp[rows, token].unsqueeze(1)),
            logq=work.logq.scatter(1, pos, stats.logq[rows, token].unsqueeze(1)),
            entropy=work.entropy.scatter(1, pos, stats.entropy.unsqueeze(1)),
            logz=work.logz.scatter(1, pos, stats.logz.unsqueeze(1)),
        )
        info = {"candidate_mass": top_logp.exp().sum(1)}
        return work, cost + roll_cost, info

    def _block_step(
        self, target: PowerDistribution, work: Sequences, generator: Generator
    ) -> tuple[Sequences, Cost, dict[str, torch.Tensor]]:
        lm = target.lm
        W, L = work.num_rows, self.num_candidates
        assert L is not None and self.block_size is not None
        index = torch.arange(W, device=work.device).repeat_interleave(L)
        start = work.length.repeat_interleave(L)
        blocks, draw_cost = lm.extend(work.take(index), start, start + self.block_size, generator)
        block_logp = blocks.total("logp", start=start).view(W, L)
        distinct = _first_occurrence(blocks.tokens, W).cpu()
        k = min(self.top_k, L)
        ranked = torch.where(distinct, block_logp, torch.full_like(block_logp, -math.inf))
        kept_logp, kept = ranked.topk(k, dim=1)  # duplicates (and missing blocks when < k distinct) get -inf
        flat = (torch.arange(W).unsqueeze(1) * L + kept).reshape(-1)
        kept_rows = blocks.take(flat.to(work.device))
        log_w, roll_cost = _rollouts(target, kept_rows, self.rollouts, self.horizon, generator)
        log_pi = power_conditional(kept_logp, log_w.view(W, k, self.rollouts), target.alpha, self.jackknife)
        choice = _sample_index(log_pi, generator, work.stream)
        chosen = torch.arange(W) * k + choice
        work = kept_rows.take(chosen.to(work.device))
        cost = _grouped_cost(draw_cost, W) + _grouped_cost(roll_cost, W)
        info = {"distinct_blocks": distinct.sum(1).to(torch.float64)}
        return work, cost, info

    # ------------------------------------------------------------------ the loop
    def run(self, target: PowerDistribution, generator: Generator = None) -> SamplerResult:
        """Draw ``n`` completions (one batch), output the first.

        Returns
        -------
        SamplerResult
            ``samples``: the ``n`` completions with statistics under ``target.default_policy()``; ``chosen = 0``;
            ``cost`` per completion (rollouts included); ``extra``: ``steps``, ``rollout`` settings and, at token
            level, ``mean_candidate_mass`` (average ``Σ_{top-K} p(v | h)``, 1 when the candidates cover p).
        """
        target = _check_target(target)
        if target.batched:
            raise EGPSError("ScalablePowerSampler.run takes a single-prompt target; use run_populations for a plate")
        (result,) = self.run_populations(target, target.empty(self.n), generator)
        return result

    def run_populations(
        self, target: PowerDistribution, seqs: Sequences, generator: Generator = None
    ) -> list[SamplerResult]:
        """Run several independent populations of ``n`` draws in one batch: one per unit (problem, seed).

        Parameters
        ----------
        target : PowerDistribution
            The target (a plate over problems, or a single prompt).
        seqs : Sequences
            Rows to complete, ``n`` per population, consecutive (normally empty; ``seqs.problem`` names each row's
            problem). With per-row streams (``seqs.stream`` and a :class:`~egps_ppl.rng.Streams` generator) every
            draw of a row (its candidates, rollouts and choices) comes from its own stream, so a population's result
            does not depend on the others.
        generator : torch.Generator or Streams, optional
            Source of randomness.

        Returns
        -------
        list of SamplerResult
            One per population, in row order (see :meth:`run`).
        """
        n = self.n
        if seqs.num_rows % n:
            raise EGPSError(f"{seqs.num_rows} rows are not populations of {n} draws")
        groups = (seqs.take(torch.arange(g * n, (g + 1) * n, device=seqs.device)) for g in range(seqs.num_rows // n))
        if seqs.num_rows == n:
            groups = iter([seqs])
        results = dict(self.iter_populations(target, groups, generator))
        return [results[g] for g in range(len(results))]

    def iter_populations(
        self,
        target: PowerDistribution,
        populations: Iterable[Sequences],
        generator: Generator = None,
        max_populations: int | None = None,
    ) -> Iterator[tuple[int, SamplerResult]]:
        """Run populations of ``n`` rows in one batch, up to ``max_populations`` at a time, each new one joining the
        batch as soon as another has finished (continuous batching).

        Every row grows on its own (a step appends one token or block to every unfinished row), so with per-row
        streams a population's result does not depend on which populations share the batch or when it joined.

        Parameters
        ----------
        target : PowerDistribution
            The target (a plate over problems, or a single prompt).
        populations : iterable of Sequences
            ``n`` rows each (see :meth:`run_populations`); read lazily, as room frees up in the batch.
        generator : torch.Generator or Streams, optional
            Source of randomness.
        max_populations : int, optional
            Populations in flight at once (default: all of them).

        Yields
        ------
        (int, SamplerResult)
            A population's position in ``populations`` and its result, as soon as its last row is complete.
        """
        target = _check_target(target)
        if max_populations is not None:
            check_positive_int("max_populations", max_populations)
        step = self._token_step if self.block_size is None else self._block_step
        source = iter(populations)
        flight: dict[int, _Population] = {}
        work: Sequences | None = None
        owner = torch.zeros(0, dtype=torch.long)  # the population of each working row
        slot = torch.zeros(0, dtype=torch.long)  # its row within the population
        joined, more = 0, True
        while True:
            while more and (max_populations is None or len(flight) < max_populations):
                rows = next(source, None)
                if rows is None:
                    more = False
                    break
                if rows.num_rows != self.n:
                    raise EGPSError(f"a population has {self.n} rows (n), got {rows.num_rows}")
                pop, index = _Population.open(rows), joined
                joined += 1
                growing = (~rows.complete()).nonzero().flatten().cpu()
                pop.left = growing.numel()
                if not pop.left:
                    yield index, self._result(pop)
                    continue
                flight[index] = pop
                fresh = rows.take(growing.to(rows.device))
                work = fresh if work is None else work.concat(fresh)
                owner = torch.cat([owner, torch.full_like(growing, index)])
                slot = torch.cat([slot, growing])
            if work is None:
                return
            work, cost, info = step(target, work, generator)
            decode, scored = cost.decode_tokens.cpu(), cost.scored_tokens.cpu()
            done = work.complete().cpu()
            finished = []
            for index in torch.unique(owner).tolist():
                pop, mine = flight[index], (owner == index).nonzero().flatten()
                rows = slot[mine]
                pop.steps += 1
                pop.calls += cost.forward_calls
                pop.decode.index_add_(0, rows, decode[mine])
                pop.scored.index_add_(0, rows, scored[mine])
                pop.row_steps.index_add_(0, rows, torch.ones_like(rows))
                for name, value in info.items():
                    pop.totals.setdefault(name, torch.zeros(self.n, dtype=torch.float64))
                    pop.totals[name].index_add_(0, rows, value[mine].cpu().to(torch.float64))
                ended = mine[done[mine]]
                if ended.numel():
                    at = ended.to(work.device)
                    for name, value in pop.fields.items():
                        value[slot[ended]] = getattr(work, name)[at].cpu()
                    pop.left -= ended.numel()
                    if not pop.left:
                        finished.append(index)
            if done.any():
                keep = (~done).nonzero().flatten()
                owner, slot = owner[keep], slot[keep]
                work = work.take(keep.to(work.device)) if keep.numel() else None
            for index in finished:
                yield index, self._result(flight.pop(index))

    def _result(self, pop: _Population) -> SamplerResult:
        """A finished population's :class:`SamplerResult`."""
        fields = dict(pop.fields)
        fields["tokens"] = torch.where(
            pop.rows.positions().cpu() < fields["length"].unsqueeze(1), fields["tokens"], PAD
        )
        device = pop.rows.device
        samples = pop.rows.with_(**{name: value.to(device) for name, value in fields.items()})
        extra: dict[str, Any] = {
            "variant": "token" if self.block_size is None else "block",
            "steps": pop.steps,
            "top_k": self.top_k,
            "rollouts": self.rollouts,
            "horizon": self.horizon,
            "block_size": self.block_size,
            "num_candidates": self.num_candidates,
            "jackknife": self.jackknife,
            "rollout_decode_tokens": int(pop.decode.sum()),
        }
        row_steps = float(pop.row_steps.sum())
        for name, key in (("candidate_mass", "mean_candidate_mass"), ("distinct_blocks", "mean_distinct_blocks")):
            if name in pop.totals and row_steps:
                extra[key] = float(pop.totals[name].sum()) / row_steps
        return SamplerResult(samples, 0, Cost(pop.decode, pop.scored, pop.calls), extra=extra)


@dataclass
class _Population:
    """One population in flight: its rows as they joined, and their outputs and counters as they finish.

    Per-row totals (cost, ``info`` of the steps, steps taken part in) are kept per row and summed over the rows
    only at the end, so a population's numbers do not depend on the rows beside it.
    """

    rows: Sequences
    fields: dict[str, torch.Tensor]
    decode: torch.Tensor
    scored: torch.Tensor
    row_steps: torch.Tensor
    totals: dict[str, torch.Tensor] = field(default_factory=dict)
    left: int = 0
    steps: int = 0
    calls: int = 0

    @classmethod
    def open(cls, rows: Sequences) -> _Population:
        """The bookkeeping of ``rows`` (their outputs start as the rows themselves)."""
        rows = rows.with_(cache=None)
        fields = {name: getattr(rows, name).cpu().clone() for name in _FIELDS}
        zeros = torch.zeros(rows.num_rows, dtype=torch.long)
        return cls(rows, fields, zeros, zeros.clone(), zeros.clone())


_FIELDS = ("tokens", "length", "logp", "logq", "entropy", "logz")
