"""Where does the power distribution depart from the base model? Per-position divergence along a completion.

For one completion ``x`` of a prompt ``c`` and every position ``t`` (history ``h_t = c, x_<t``) this module
computes

* ``H_t``: the Shannon entropy of the base conditional ``p(. | h_t)`` (nats);
* ``logZ_t = log Σ_v p(v | h_t)^α``;
* ``D_t = KL(π(. | h_t) || p(. | h_t))``: how far the next-token conditional of the sequence-level power
  distribution ``π(x) ∝ p(x)^α`` is from the base conditional, where
  ``π(v | h) = p(v | h)^α ζ(h, v) / Σ_u p(u | h)^α ζ(h, u)`` and ``ζ(h, v) = Σ_future p(future | h, v)^α``.

EGPS rests on the premise that ``D_t`` is small almost everywhere and large at a sparse, clustered set of
high-entropy positions; :class:`DivergenceProfile` and its :meth:`~DivergenceProfile.summary` measure exactly
that (share of the total divergence in the top 10% of positions, clustering of those positions against a
shuffled baseline, correlation with the entropy).

Estimators of ``D_t``
---------------------
``exact`` (Markov models only)
    ``π(v | h) = p(v | h)^α Z(h v) / Z(h)`` with ``Z`` the future normaliser of
    :class:`~egps_ppl.models.exact.ExactPower` (its backward messages), so ``D_t`` is exact.
``myopic`` (any model with full next-token distributions; free)
    ``D_t ≈ KL(p^α / Σ p^α || p)`` from the logits alone: the future factor ``ζ`` is set to 1. It is exactly
    the divergence of token-level low-temperature sampling (temperature ``1/α``) from ``p``, so it measures
    where the *local* sharpening acts, not where the futures differ.
``rollout`` (any model; costs ``K·M`` rollouts of ``H`` tokens per position)
    Over the top-``K`` candidates ``v_1..v_K`` of ``p(. | h_t)``:
    ``π̂(v_k | h) ∝ p(v_k | h)^α ζ̂(v_k)``, with ``ζ̂`` estimated from ``M`` rollouts of horizon ``H`` drawn
    from ``p`` after ``v_k`` (``ζ̂ = mean exp((α−1) log p(rollout))``, jackknife bias correction), as in
    Scalable Power Sampling (:func:`egps_ppl.infer.sps.rollout_log_weights`,
    :func:`egps_ppl.infer.sps.power_conditional`). It is compared with ``p`` **restricted to the same K
    candidates and renormalised**: ``D̂_t = KL(π̂ || p̃_K)``. Approximations: the tail of ``p`` outside the
    top ``K`` is dropped, futures are cut at ``H`` tokens, and ``ζ̂`` is a noisy Monte-Carlo estimate (the
    jackknife leaves an ``O(1/M²)`` bias in ``log ζ̂``).

``myopic`` is also stored alongside every profile (it is free once the logits are there), so the other
estimators can be compared with it.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from egps_ppl.errors import EGPSError, check_alpha, check_positive_int
from egps_ppl.models.base import LanguageModel, next_token_stats
from egps_ppl.models.markov import MarkovLM
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import PAD, Sequences
from egps_ppl.target import PowerDistribution

__all__ = [
    "ESTIMATORS",
    "DivergenceProfile",
    "clustering_test",
    "completion_summary",
    "correlations",
    "divergence_profile",
    "high_divergence_mask",
    "kl_divergence",
    "myopic_divergence",
    "next_token_log_probs",
    "plot_divergence_profile",
    "plot_divergence_vs_entropy",
    "pooled_summary",
    "rollout_divergence",
    "run_lengths",
    "top_share",
    "write_analysis",
]

ESTIMATORS = ("exact", "myopic", "rollout")
DEFAULT_FRACTION = 0.1
DEFAULT_PERMUTATIONS = 1000


# ================================================================================================ divergences
def kl_divergence(log_a: torch.Tensor, log_b: torch.Tensor) -> torch.Tensor:
    """``KL(a || b) = Σ_v a(v) (log a(v) − log b(v))`` over the last axis, with ``0 log 0 = 0``.

    Parameters
    ----------
    log_a, log_b:
        Normalised log-distributions of the same shape ``[..., V]``; ``b`` must be positive wherever ``a`` is.

    Returns
    -------
    ``float64[...]``, clamped at 0 (rounding can leave tiny negative values).
    """
    log_a, log_b = log_a.double(), log_b.double()
    a = log_a.exp()
    terms = torch.where(a > 0, a * (log_a - log_b), torch.zeros((), dtype=torch.float64))
    return terms.sum(-1).clamp(min=0.0)


def myopic_divergence(log_p: torch.Tensor, alpha: float) -> torch.Tensor:
    """``KL(p^α / Σ p^α || p)`` per row of ``log_p[..., V]``: the divergence with the future factor set to 1.

    Parameters
    ----------
    log_p:
        Base log-probabilities ``[..., V]`` (``-inf`` allowed for impossible tokens).
    alpha:
        The power ``α > 0``.

    Returns
    -------
    ``float64[...]``. Zero where ``p`` is deterministic (one token has all the mass) and at ``α = 1``.
    """
    alpha = check_alpha(alpha)
    log_p = log_p.double()
    log_q = torch.log_softmax(alpha * log_p, dim=-1)
    return kl_divergence(log_q, log_p)


def next_token_log_probs(
    lm: LanguageModel,
    prompt: Sequence[int] | torch.Tensor,
    completion: Sequence[int] | torch.Tensor,
    chunk: int = 16,
) -> torch.Tensor:
    """Full base conditionals along a completion: row ``t`` is ``log p(. | prompt, x_<t)``, ``float64[n, V]``.

    Read through the backend protocol (:meth:`~egps_ppl.models.base.LanguageModel.next_token_logprobs` on the
    ``n`` prefixes of the completion, in chunks of ``chunk`` rows), so any backend that exposes full
    distributions works.

    Raises
    ------
    EGPSError
        For a backend without full distributions, an empty completion, or a sequence longer than the context
        window.
    """
    ids = _as_ids(completion, "completion")
    if ids.numel() == 0:
        raise EGPSError("the completion is empty: there is no position to analyse")
    prompt_ids = _as_ids(prompt, "prompt")
    if lm.requires_prompt and prompt_ids.numel() == 0:
        raise EGPSError(f"model {lm.name!r} needs a non-empty prompt")
    n = ids.numel()
    ctx = lm.context_length
    if ctx is not None and prompt_ids.numel() + n - 1 > ctx:
        raise EGPSError(f"prompt + completion ({prompt_ids.numel() + n} tokens) exceed the context window ({ctx})")
    rows = []
    for lo in range(0, n, chunk):
        lengths = torch.arange(lo, min(lo + chunk, n))
        seqs = lm.start(prompt_ids, lengths.numel(), n, PowerPolicy(1.0))
        keep = seqs.positions() < lengths.unsqueeze(1)
        tokens = torch.where(keep, ids.unsqueeze(0).to(seqs.device), torch.full_like(seqs.tokens, PAD))
        logp, _, _ = lm.next_token_logprobs(seqs.with_(tokens=tokens, length=lengths.to(seqs.device)))
        rows.append(logp)
    return torch.cat(rows).double().cpu()


def rollout_divergence(
    target: PowerDistribution,
    completion: Sequence[int] | torch.Tensor,
    log_p: torch.Tensor,
    *,
    top_k: int = 8,
    rollouts: int = 8,
    horizon: int | None = 32,
    jackknife: bool = True,
    positions_per_batch: int = 8,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, int]]:
    """Rollout estimate ``D̂_t = KL(π̂ || p̃_K)`` at every position of one completion.

    ``π̂(v_k | h_t) ∝ p(v_k | h_t)^α ζ̂(v_k)`` over the top-``K`` candidates of ``p(. | h_t)``, with ``ζ̂`` from
    ``M`` rollouts of horizon ``H`` (:func:`egps_ppl.infer.sps.rollout_log_weights` and
    :func:`egps_ppl.infer.sps.power_conditional`); ``p̃_K`` is ``p`` restricted to the same candidates and
    renormalised. Candidates with ``p = 0`` get ``π̂ = 0``; a position with one possible token has ``D̂ = 0``.

    Parameters
    ----------
    target:
        The power target (model, prompt, ``α``, ``max_new_tokens``).
    completion:
        Token ids ``x_1..x_n``.
    log_p:
        ``float64[n, V]`` base conditionals along the completion (:func:`next_token_log_probs`).
    top_k, rollouts, horizon:
        ``K`` candidates, ``M`` rollouts per candidate, ``H`` tokens per rollout (cut at ``max_new_tokens``;
        ``None``: up to ``max_new_tokens``, so that ``ζ̂`` is unbiased for the full future factor).
    jackknife:
        Use the jackknife bias correction of ``log ζ̂``.
    positions_per_batch:
        Positions evaluated together (``R``); a batch runs ``R·K·M`` rollouts at once.
    generator:
        CPU random generator of the rollouts.

    Returns
    -------
    divergence:
        ``float64[n]``.
    cost:
        ``{"decode_tokens", "scored_tokens", "forward_calls"}`` summed over all rollouts.
    """
    from egps_ppl.infer.sps import power_conditional, rollout_log_weights

    check_positive_int("top_k", top_k)
    check_positive_int("rollouts", rollouts)
    if horizon is not None:
        check_positive_int("horizon", horizon)
    check_positive_int("positions_per_batch", positions_per_batch)
    ids = _as_ids(completion, "completion")
    n = int(ids.numel())
    if log_p.shape[0] != n:
        raise EGPSError(f"log_p has {log_p.shape[0]} rows for a completion of {n} tokens")
    K = min(top_k, log_p.shape[1])
    top_logp, candidates = torch.topk(log_p, K, dim=-1)
    seqs, cost = target.from_completions([ids.tolist()])
    totals = {
        "decode_tokens": 0,
        "scored_tokens": int(cost.scored_tokens.sum()),
        "forward_calls": int(cost.forward_calls),
    }
    out = torch.zeros(n, dtype=torch.float64)
    for lo in range(0, n, positions_per_batch):
        pos = torch.arange(lo, min(n, lo + positions_per_batch))
        lp = top_logp[pos]
        alive = torch.isfinite(lp).sum(1) > 1  # one possible candidate: π̂ = p̃ = that token, D = 0
        if not bool(alive.any()):
            continue
        pos, lp, cand = pos[alive], lp[alive], candidates[pos[alive]]
        prefixes = seqs.take(torch.zeros(pos.numel(), dtype=torch.long)).truncated(pos)
        log_w, step_cost = rollout_log_weights(target, prefixes, cand, rollouts, horizon, generator)
        totals["decode_tokens"] += int(step_cost.decode_tokens.sum())
        totals["scored_tokens"] += int(step_cost.scored_tokens.sum())
        totals["forward_calls"] += int(step_cost.forward_calls)
        log_pi = power_conditional(lp, log_w, target.alpha, jackknife=jackknife)
        log_p_k = torch.log_softmax(lp, dim=-1)
        out[pos] = kl_divergence(log_pi, log_p_k)
    return out, totals


# ================================================================================================ profile
@dataclass
class DivergenceProfile:
    """Per-position entropy, log-normaliser and divergence along one completion.

    Attributes
    ----------
    tokens:
        ``int64[n]`` completion token ids.
    logp:
        ``float64[n]``: ``log p(x_t | h_t)``.
    entropy:
        ``float64[n]``: ``H_t``, Shannon entropy of ``p(. | h_t)`` (nats).
    logz:
        ``float64[n]``: ``log Σ_v p(v | h_t)^α``.
    divergence:
        ``float64[n]``: ``D_t`` from ``estimator``.
    myopic:
        ``float64[n]``: the myopic divergence ``KL(p^α/Σp^α || p)`` (equal to ``divergence`` when
        ``estimator == "myopic"``).
    alpha:
        The power.
    estimator:
        ``"exact"``, ``"myopic"`` or ``"rollout"``.
    token_strings:
        Optional decoded text of each token (for plot labels).
    meta:
        JSON-serialisable extras (problem id, model, estimator settings, cost, ...).
    """

    tokens: np.ndarray
    logp: np.ndarray
    entropy: np.ndarray
    logz: np.ndarray
    divergence: np.ndarray
    myopic: np.ndarray
    alpha: float
    estimator: str
    token_strings: list[str] | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tokens = np.asarray(self.tokens, dtype=np.int64)
        n = self.tokens.shape[0]
        for name in ("logp", "entropy", "logz", "divergence", "myopic"):
            value = np.asarray(getattr(self, name), dtype=np.float64)
            if value.shape != (n,):
                raise EGPSError(f"DivergenceProfile.{name} must have shape ({n},), got {value.shape}")
            setattr(self, name, value)
        if self.token_strings is not None and len(self.token_strings) != n:
            raise EGPSError(f"token_strings has {len(self.token_strings)} entries for {n} tokens")

    @property
    def length(self) -> int:
        """Number of positions (completion tokens) in the profile."""
        return int(self.tokens.shape[0])

    def summary(
        self,
        fraction: float = DEFAULT_FRACTION,
        num_permutations: int = DEFAULT_PERMUTATIONS,
        seed: int = 0,
    ) -> dict[str, Any]:
        """Concentration statistics of ``divergence`` (see :func:`pooled_summary`, here for one completion)."""
        return pooled_summary([self], fraction, num_permutations, seed)

    def to_record(self, digits: int = 6) -> dict[str, Any]:
        """A JSON-serialisable dict (floats rounded to ``digits``); :meth:`from_record` reads it back."""

        def rounded(values: np.ndarray) -> list[float]:
            return [round(float(v), digits) for v in values]

        return {
            "estimator": self.estimator,
            "alpha": self.alpha,
            "length": self.length,
            "tokens": self.tokens.tolist(),
            "token_strings": self.token_strings,
            "logp": rounded(self.logp),
            "entropy": rounded(self.entropy),
            "logz": rounded(self.logz),
            "divergence": rounded(self.divergence),
            "myopic": rounded(self.myopic),
            "meta": self.meta,
        }

    @classmethod
    def from_record(cls, record: dict[str, Any]) -> DivergenceProfile:
        """Inverse of :meth:`to_record`."""
        try:
            return cls(
                tokens=record["tokens"],
                logp=record["logp"],
                entropy=record["entropy"],
                logz=record["logz"],
                divergence=record["divergence"],
                myopic=record["myopic"],
                alpha=float(record["alpha"]),
                estimator=str(record["estimator"]),
                token_strings=record.get("token_strings"),
                meta=dict(record.get("meta") or {}),
            )
        except KeyError as exc:
            raise EGPSError(f"a divergence profile record lacks {exc.args[0]!r}") from None


def divergence_profile(
    target: PowerDistribution,
    completion: Sequences | Sequence[int] | torch.Tensor,
    estimator: str = "myopic",
    *,
    row: int = 0,
    top_k: int = 8,
    rollouts: int = 8,
    horizon: int | None = 32,
    jackknife: bool = True,
    positions_per_batch: int = 8,
    generator: torch.Generator | None = None,
    meta: dict[str, Any] | None = None,
) -> DivergenceProfile:
    """Entropy, ``logZ_α`` and ``D_t = KL(π(. | h_t) || p(. | h_t))`` at every position of one completion.

    Parameters
    ----------
    target:
        The power target ``π ∝ p^α`` (model, prompt, ``α``, ``max_new_tokens``); no extra log-factor.
    completion:
        A row of :class:`~egps_ppl.state.Sequences` (``row`` selects it) or a list of token ids.
    estimator:
        ``"exact"`` (Markov models: exact ``π(v | h)`` from :class:`~egps_ppl.models.exact.ExactPower`),
        ``"myopic"`` (``KL(p^α/Σp^α || p)``, future factor ignored) or ``"rollout"`` (top-``K`` candidates,
        ``M`` rollouts of horizon ``H``; compared with ``p`` restricted to the same candidates). See the
        module docstring for the approximations.
    top_k, rollouts, horizon, jackknife, positions_per_batch:
        Settings of the rollout estimator (see :func:`rollout_divergence`).
    generator:
        CPU random generator (rollout estimator only).
    meta:
        Extra JSON-serialisable fields stored with the profile.

    Returns
    -------
    DivergenceProfile

    Raises
    ------
    EGPSError
        Unknown estimator, ``exact`` on a non-Markov model, a target with an extra log-factor (``exact`` and
        ``rollout`` target ``p^α`` only), or a completion that is empty, too long, or has EOS before its end.
    """
    if estimator not in ESTIMATORS:
        raise EGPSError(f"unknown estimator {estimator!r}; choose one of {', '.join(ESTIMATORS)}")
    lm = target.lm
    if estimator == "exact" and not isinstance(lm, MarkovLM):
        raise EGPSError(
            f"the exact estimator needs a Markov model (markov:PATH.json); {lm.name!r} is not one: "
            "use --estimator myopic or rollout"
        )
    if estimator != "myopic" and target.log_factor is not None:
        raise EGPSError(f"the {estimator} estimator targets p^alpha only; the target has an extra log-factor")
    if isinstance(completion, Sequences):
        if not 0 <= row < completion.num_rows:
            raise EGPSError(f"row {row} is outside the batch of {completion.num_rows} rows")
        ids = torch.as_tensor(completion.row_tokens(row), dtype=torch.long)
    else:
        ids = _as_ids(completion, "completion")
    _check_completion(ids, lm, target.max_new_tokens)
    log_p = next_token_log_probs(lm, target.prompt, ids)
    stats = next_token_stats(log_p, PowerPolicy(target.alpha))
    myopic = myopic_divergence(log_p, target.alpha)
    info: dict[str, Any] = {"max_new_tokens": target.max_new_tokens, "model": getattr(lm, "name", "")}
    if estimator == "exact":
        from egps_ppl.models.exact import ExactPower

        exact = ExactPower(lm, target.alpha, target.max_new_tokens, target.prompt)
        divergence = kl_divergence(exact.conditional_log_probs(ids), log_p)
    elif estimator == "myopic":
        divergence = myopic
    else:
        divergence, cost = rollout_divergence(
            target,
            ids,
            log_p,
            top_k=top_k,
            rollouts=rollouts,
            horizon=horizon,
            jackknife=jackknife,
            positions_per_batch=positions_per_batch,
            generator=generator,
        )
        info.update(top_k=top_k, rollouts=rollouts, horizon=horizon, jackknife=jackknife, cost=cost)
    token_strings = None
    if getattr(lm, "tokenizer", None) is not None:
        token_strings = [lm.decode([t]) for t in ids.tolist()]
    info.update(meta or {})
    return DivergenceProfile(
        tokens=ids.numpy(),
        logp=log_p.gather(1, ids.unsqueeze(1)).squeeze(1).numpy(),
        entropy=stats.entropy.numpy() + 0.0,  # + 0.0 turns the -0.0 of deterministic rows into 0.0
        logz=stats.logz.numpy(),
        divergence=divergence.numpy(),
        myopic=myopic.numpy(),
        alpha=target.alpha,
        estimator=estimator,
        token_strings=token_strings,
        meta=info,
    )


def _as_ids(value: Sequence[int] | torch.Tensor, what: str) -> torch.Tensor:
    try:
        ids = torch.as_tensor(list(value) if not torch.is_tensor(value) else value, dtype=torch.long)
    except (TypeError, ValueError, RuntimeError):
        raise EGPSError(f"the {what} must be a list of integer token ids") from None
    if ids.dim() != 1:
        raise EGPSError(f"the {what} must be a flat list of token ids")
    return ids.cpu()


def _check_completion(ids: torch.Tensor, lm: LanguageModel, max_new_tokens: int) -> None:
    n = int(ids.numel())
    if n == 0:
        raise EGPSError("the completion is empty: there is no position to analyse")
    if n > max_new_tokens:
        raise EGPSError(f"the completion has {n} tokens > max_new_tokens={max_new_tokens}")
    if (ids < 0).any() or (ids >= lm.vocab_size).any():
        raise EGPSError(f"completion token ids must lie in [0, {lm.vocab_size})")
    if lm.eos_token_id is not None and (ids[:-1] == lm.eos_token_id).any():
        raise EGPSError("the completion has EOS before its last token")


# ================================================================================================ statistics
def _check_fraction(fraction: float) -> float:
    value = float(fraction)
    if not 0.0 < value <= 1.0:
        raise EGPSError(f"fraction must lie in (0, 1], got {fraction!r}")
    return value


def _top_count(n: int, fraction: float) -> int:
    """``ceil(fraction · n)`` (at least 1 for a non-empty sequence), robust to float round-off."""
    return 0 if n == 0 else max(1, math.ceil(fraction * n - 1e-9))


def top_share(divergence: Sequence[float] | np.ndarray, fraction: float = DEFAULT_FRACTION) -> float | None:
    """Share of ``Σ_t D_t`` carried by the ``ceil(fraction · n)`` largest ``D_t``.

    Returns ``None`` when the total is 0 (nothing to share). A uniform profile gives about ``fraction``; a
    profile with all its divergence at a few positions gives 1.
    """
    fraction = _check_fraction(fraction)
    values = np.asarray(divergence, dtype=np.float64).ravel()
    total = float(values.sum())
    if values.size == 0 or not total > 0:
        return None
    k = _top_count(values.size, fraction)
    return float(np.sort(values)[::-1][:k].sum() / total)


def high_divergence_mask(divergence: Sequence[float] | np.ndarray, fraction: float = DEFAULT_FRACTION) -> np.ndarray:
    """``bool[n]``: the ``ceil(fraction · n)`` largest ``D_t`` that are ``> 0`` ("high-divergence positions").

    Ties are broken by position (earlier first). Positions with ``D_t = 0`` are never marked, so a profile
    with fewer positive values than the quota marks just those.
    """
    fraction = _check_fraction(fraction)
    values = np.asarray(divergence, dtype=np.float64).ravel()
    mask = np.zeros(values.size, dtype=bool)
    if values.size == 0:
        return mask
    order = np.argsort(-values, kind="stable")[: _top_count(values.size, fraction)]
    mask[order[values[order] > 0]] = True
    return mask


def run_lengths(mask: Sequence[bool] | np.ndarray) -> np.ndarray:
    """Lengths of the maximal runs of consecutive ``True`` in a 1-D mask (``int64``, in order)."""
    m = np.asarray(mask, dtype=bool).ravel().astype(np.int8)
    edges = np.diff(np.concatenate([[0], m, [0]]))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return (stops - starts).astype(np.int64)


def clustering_test(
    masks: np.ndarray | Sequence[np.ndarray],
    num_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> dict[str, Any]:
    """Are the marked positions clustered? Mean run length observed vs its permutation distribution.

    The statistic is the mean length of the runs of consecutive marked positions, pooled over all sequences
    (total marked / total runs). The null shuffles the positions of each sequence independently (same number of
    marked positions per sequence), ``num_permutations`` times with a seeded NumPy generator. The one-sided
    p-value is ``(1 + #{shuffled >= observed}) / (1 + num_permutations)``.

    Parameters
    ----------
    masks:
        One 1-D boolean mask, or a list of them (one per completion).
    num_permutations:
        Number of shuffles (``>= 1``).
    seed:
        Seed of the shuffles.

    Returns
    -------
    dict
        ``marked``, ``runs``, ``mean_run_length``, ``shuffled_mean_run_length`` (mean over shuffles),
        ``shuffled_sd``, ``clustering_ratio`` (observed / shuffled mean) and ``p_value``; the statistics are
        ``None`` when nothing (or everything) is marked, where clustering is undefined.
    """
    check_positive_int("num_permutations", num_permutations)
    if isinstance(masks, np.ndarray) and masks.ndim == 1:
        masks = [masks]
    rows = [np.asarray(m, dtype=bool).ravel() for m in masks]
    marked = int(sum(int(r.sum()) for r in rows))
    runs = int(sum(run_lengths(r).size for r in rows))
    result: dict[str, Any] = {
        "marked": marked,
        "runs": runs,
        "mean_run_length": None,
        "shuffled_mean_run_length": None,
        "shuffled_sd": None,
        "clustering_ratio": None,
        "p_value": None,
        "num_permutations": num_permutations,
    }
    if marked == 0 or all(r.all() for r in rows):
        return result
    observed = marked / runs
    rng = np.random.default_rng(seed)
    shuffled_runs = np.zeros(num_permutations)
    for r in rows:
        if r.size == 0 or not r.any():
            continue
        # Argsort of uniforms gives independent permutations of every row at once.
        perm = np.argsort(rng.random((num_permutations, r.size)), axis=1)
        shuffled = r[perm]
        starts = np.diff(np.concatenate([np.zeros((num_permutations, 1), bool), shuffled], axis=1).astype(np.int8))
        shuffled_runs += (starts == 1).sum(1)
    shuffled_mean = marked / shuffled_runs
    result.update(
        mean_run_length=float(observed),
        shuffled_mean_run_length=float(shuffled_mean.mean()),
        shuffled_sd=float(shuffled_mean.std(ddof=1)) if num_permutations > 1 else 0.0,
        clustering_ratio=float(observed / shuffled_mean.mean()),
        p_value=float((1 + np.sum(shuffled_mean >= observed - 1e-12)) / (1 + num_permutations)),
    )
    return result


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks with ties averaged (as Spearman's rho needs)."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(values.size, dtype=np.float64)
    ranks[order] = np.arange(values.size, dtype=np.float64)
    sorted_values = values[order]
    # Average the ranks inside each group of equal values.
    _, first, counts = np.unique(sorted_values, return_index=True, return_counts=True)
    for start, count in zip(first, counts, strict=True):
        if count > 1:
            ranks[order[start : start + count]] = start + (count - 1) / 2
    return ranks


def _pearson(x: np.ndarray, y: np.ndarray) -> float | None:
    if x.size < 2:
        return None
    dx, dy = x - x.mean(), y - y.mean()
    denom = math.sqrt(float((dx * dx).sum()) * float((dy * dy).sum()))
    return None if denom == 0 else float((dx * dy).sum() / denom)


def correlations(x: Sequence[float] | np.ndarray, y: Sequence[float] | np.ndarray) -> dict[str, float | None]:
    """Spearman (rank, ties averaged) and Pearson correlation of two equal-length arrays.

    ``None`` where a correlation is undefined (fewer than 2 points, or a constant array).
    """
    a = np.asarray(x, dtype=np.float64).ravel()
    b = np.asarray(y, dtype=np.float64).ravel()
    if a.shape != b.shape:
        raise EGPSError(f"correlations need arrays of equal length, got {a.size} and {b.size}")
    return {"spearman": _pearson(_ranks(a), _ranks(b)), "pearson": _pearson(a, b)}


def pooled_summary(
    profiles: Sequence[DivergenceProfile],
    fraction: float = DEFAULT_FRACTION,
    num_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> dict[str, Any]:
    """Concentration statistics of the divergence, pooled over completions.

    * ``top_share``: share of the total divergence in the top ``fraction`` of all pooled positions
      (:func:`top_share`), and ``top_share_mean``: the mean of the per-completion shares;
    * ``clustering``: :func:`clustering_test` of the high-divergence positions (:func:`high_divergence_mask`,
      marked per completion), shuffled within each completion;
    * ``corr_entropy``: Spearman and Pearson correlation of ``D_t`` with ``H_t`` over all positions;
      ``corr_myopic``: of ``D_t`` with the myopic divergence (only for the other estimators);
    * totals and means of ``D_t``, ``H_t``, and the fraction of positions with ``D_t`` above 1e-6.
    """
    fraction = _check_fraction(fraction)
    if not profiles:
        raise EGPSError("no divergence profiles to summarise")
    D = np.concatenate([p.divergence for p in profiles])
    H = np.concatenate([p.entropy for p in profiles])
    per_share = [top_share(p.divergence, fraction) for p in profiles]
    shares = [s for s in per_share if s is not None]
    summary: dict[str, Any] = {
        "estimator": profiles[0].estimator,
        "alpha": profiles[0].alpha,
        "completions": len(profiles),
        "positions": int(D.size),
        "fraction": fraction,
        "total_divergence": float(D.sum()),
        "mean_divergence": float(D.mean()) if D.size else None,
        "mean_entropy": float(H.mean()) if H.size else None,
        "positive_fraction": float((D > 1e-6).mean()) if D.size else None,
        "top_share": top_share(D, fraction),
        "top_share_mean": float(np.mean(shares)) if shares else None,
        "clustering": clustering_test(
            [high_divergence_mask(p.divergence, fraction) for p in profiles], num_permutations, seed
        ),
        "corr_entropy": correlations(D, H),
    }
    if any(p.estimator != "myopic" for p in profiles):
        summary["corr_myopic"] = correlations(D, np.concatenate([p.myopic for p in profiles]))
        summary["total_myopic"] = float(sum(p.myopic.sum() for p in profiles))
    return summary


# ================================================================================================ plots
def plot_divergence_profile(
    profile: DivergenceProfile,
    path: str | os.PathLike[str],
    fraction: float = DEFAULT_FRACTION,
    title: str | None = None,
    label_top: int = 8,
) -> Path:
    """Entropy (top) and divergence (bottom) along the sequence, with the high-divergence positions marked.

    Parameters
    ----------
    profile:
        The profile to draw.
    path:
        PNG file to write (parent folders are created).
    fraction:
        The share of positions marked as high-divergence (:func:`high_divergence_mask`).
    title:
        Figure title (default: estimator, α and the headline statistics).
    label_top:
        Label this many of the largest-divergence positions with their token text (when known).

    Returns
    -------
    pathlib.Path
        ``path``.
    """
    from egps_ppl.diagnostics.plots import new_figure, save_figure

    mask = high_divergence_mask(profile.divergence, fraction)
    x = np.arange(profile.length)
    fig, (ax_h, ax_d) = new_figure(2, height_per_row=2.6)
    ax_h.plot(x, profile.entropy, color="C0", lw=1.2, label="entropy $H_t$")
    ax_h.plot(x[mask], profile.entropy[mask], "o", color="C3", ms=4, label=f"top {fraction:.0%} by $D_t$")
    ax_h.set_ylabel("entropy (nats)")
    ax_h.legend(loc="upper right", fontsize="small")
    ax_d.plot(x, profile.divergence, color="C1", lw=1.2, label=f"$D_t$ ({profile.estimator})")
    if profile.estimator != "myopic":
        ax_d.plot(x, profile.myopic, color="0.5", lw=0.9, ls="--", label="myopic $D_t$")
    ax_d.plot(x[mask], profile.divergence[mask], "o", color="C3", ms=4)
    for t in np.flatnonzero(mask):
        for ax in (ax_h, ax_d):
            ax.axvspan(t - 0.5, t + 0.5, color="C3", alpha=0.12, lw=0)
    if profile.token_strings is not None and label_top > 0:
        for t in np.argsort(-profile.divergence, kind="stable")[:label_top]:
            if profile.divergence[t] > 0:
                text = repr(profile.token_strings[t])[1:-1][:12]
                ax_d.annotate(text, (t, profile.divergence[t]), fontsize=7, rotation=45, xytext=(2, 3),
                              textcoords="offset points")  # fmt: skip
    ax_d.set_ylabel("KL(π(·|h) ‖ p(·|h)) (nats)")
    ax_d.set_xlabel("completion position t")
    ax_d.legend(loc="upper right", fontsize="small")
    if title is None:
        s = profile.summary(fraction, num_permutations=200)
        share = "n/a" if s["top_share"] is None else f"{s['top_share']:.2f}"
        rho = s["corr_entropy"]["spearman"]
        title = (
            f"{profile.estimator} divergence, α={profile.alpha:g}: top {fraction:.0%} share {share}, "
            f"Spearman(D, H) {'n/a' if rho is None else f'{rho:.2f}'}"
        )
    ax_h.set_title(title, fontsize="medium")
    return save_figure(fig, path)


def plot_divergence_vs_entropy(
    profiles: Sequence[DivergenceProfile], path: str | os.PathLike[str], title: str | None = None
) -> Path:
    """Scatter of ``D_t`` against ``H_t`` over all positions of all profiles (symlog divergence axis)."""
    from egps_ppl.diagnostics.plots import new_figure, save_figure

    if not profiles:
        raise EGPSError("no divergence profiles to plot")
    D = np.concatenate([p.divergence for p in profiles])
    H = np.concatenate([p.entropy for p in profiles])
    fig, (ax,) = new_figure(1, height_per_row=4.0)
    ax.scatter(H, D, s=6, alpha=0.5, color="C1", lw=0)
    positive = D[D > 0]
    ax.set_yscale("symlog", linthresh=float(np.quantile(positive, 0.1)) if positive.size else 1e-3)
    ax.set_xlabel("entropy $H_t$ (nats)")
    ax.set_ylabel(f"$D_t$ ({profiles[0].estimator}, nats)")
    if title is None:
        c = correlations(D, H)
        rho = "n/a" if c["spearman"] is None else f"{c['spearman']:.2f}"
        title = f"divergence vs entropy over {D.size} positions ({len(profiles)} completions): Spearman {rho}"
    ax.set_title(title, fontsize="medium")
    return save_figure(fig, path)


# ================================================================================================ run folder
PROFILES_FILE = "profiles.jsonl"
SUMMARY_FILE = "summary.json"
SCATTER_FILE = "divergence_vs_entropy.png"


def completion_summary(
    profile: DivergenceProfile,
    fraction: float = DEFAULT_FRACTION,
    num_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
) -> dict[str, Any]:
    """The headline statistics of one profile as a flat dict (one row of ``summary.json``)."""
    s = profile.summary(fraction, num_permutations, seed)
    c = s["clustering"]
    return {
        "length": profile.length,
        "total_divergence": s["total_divergence"],
        "top_share": s["top_share"],
        "marked": c["marked"],
        "mean_run_length": c["mean_run_length"],
        "shuffled_mean_run_length": c["shuffled_mean_run_length"],
        "clustering_p_value": c["p_value"],
        "spearman_entropy": s["corr_entropy"]["spearman"],
        "pearson_entropy": s["corr_entropy"]["pearson"],
    }


def write_analysis(
    profiles: Sequence[DivergenceProfile],
    out: str | os.PathLike[str],
    config: dict[str, Any] | None = None,
    *,
    fraction: float = DEFAULT_FRACTION,
    num_permutations: int = DEFAULT_PERMUTATIONS,
    seed: int = 0,
    max_plots: int = 12,
) -> dict[str, Any]:
    """Write an analysis folder: ``profiles.jsonl``, ``summary.json`` and PNG plots.

    Parameters
    ----------
    profiles:
        One profile per completion (its ``meta`` is kept in the JSON line).
    out:
        The folder (created if needed).
    config:
        Settings recorded in ``summary.json`` under ``"config"``.
    fraction, num_permutations, seed:
        Settings of the statistics (:func:`pooled_summary`).
    max_plots:
        Draw :func:`plot_divergence_profile` for the first this many completions (``profile_NNN.png``), plus
        the pooled :func:`plot_divergence_vs_entropy` scatter.

    Returns
    -------
    dict
        The content of ``summary.json``: ``config``, ``pooled`` (:func:`pooled_summary`) and ``per_completion``
        (:func:`completion_summary` plus each profile's ``meta``).
    """
    import json

    if not profiles:
        raise EGPSError("no completions to analyse")
    folder = Path(out)
    folder.mkdir(parents=True, exist_ok=True)
    per_completion = []
    with (folder / PROFILES_FILE).open("w", encoding="utf-8") as fh:
        for index, profile in enumerate(profiles):
            row = {"index": index, **completion_summary(profile, fraction, num_permutations, seed)}
            fh.write(json.dumps({"index": index, "summary": row, **profile.to_record()}) + "\n")
            per_completion.append({**row, **{k: v for k, v in profile.meta.items() if k not in row}})
    plots = []
    for index, profile in enumerate(profiles[:max_plots]):
        plots.append(plot_divergence_profile(profile, folder / f"profile_{index:03d}.png", fraction).name)
    plots.append(plot_divergence_vs_entropy(profiles, folder / SCATTER_FILE).name)
    summary = {
        "config": config or {},
        "pooled": pooled_summary(profiles, fraction, num_permutations, seed),
        "per_completion": per_completion,
        "plots": plots,
    }
    (folder / SUMMARY_FILE).write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    return summary
