"""Generators of exact Markov language models for tests and benchmarks.

* :func:`random_markov`: dense random transition rows, reproducible from a seed.
* :func:`sparse_decision`: a "reasoning trace" chain — long deterministic runs, a few decision states whose two
  branches merge again — built so that the power distribution ``p^α`` and token-level low-temperature sampling
  disagree at every decision, which is the case power sampling is for.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np
import torch

from egps_ppl.errors import EGPSError, check_alpha, check_positive_int
from egps_ppl.models.markov import MarkovLM


def random_markov(vocab_size: int, seed: int, eos_token_id: int = 0, concentration: float = 1.0) -> MarkovLM:
    """A Markov model whose initial distribution and transition rows are i.i.d. Dirichlet(concentration).

    Parameters
    ----------
    vocab_size:
        ``V >= 2`` tokens, EOS included.
    seed:
        Seed of the NumPy generator; the same seed gives the same model.
    eos_token_id:
        The EOS id, in ``[0, V)``.
    concentration:
        Dirichlet concentration ``> 0``: small values give peaked rows, large values nearly uniform ones.

    Returns
    -------
    MarkovLM
    """
    check_positive_int("vocab_size", vocab_size)
    if vocab_size < 2:
        raise EGPSError(f"vocab_size must be >= 2 (EOS and at least one other token), got {vocab_size}")
    if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or not 0 <= eos_token_id < vocab_size:
        raise EGPSError(f"eos_token_id must be in [0, {vocab_size}), got {eos_token_id!r}")
    if not (isinstance(concentration, int | float) and math.isfinite(concentration) and concentration > 0):
        raise EGPSError(f"concentration must be a finite number > 0, got {concentration!r}")
    rng = np.random.default_rng(seed)
    rows = rng.dirichlet(np.full(vocab_size, float(concentration)), size=vocab_size + 1)
    rows = rows / rows.sum(axis=1, keepdims=True)  # exact row sums in float64
    table = torch.as_tensor(rows, dtype=torch.float64)
    return MarkovLM(table[0], table[1:], eos_token_id, name=f"random_markov(V={vocab_size}, seed={seed})")


@dataclass(frozen=True)
class SparseDecisionModel:
    """A sparse-decision chain and the token ids a test or benchmark needs to read it.

    Attributes
    ----------
    model:
        The Markov model (empty prompt; every completion has exactly ``max_new_tokens`` tokens, EOS last).
    decision_tokens:
        For each decision ``d``, the token right before it (the last token of deterministic run ``d``).
    likely_tokens, unlikely_tokens:
        The first token of the likely (noisy) and unlikely (deterministic) branch of each decision. Each
        appears at most once in a completion, so ``ExactPower.expected_visits(unlikely_tokens[d])`` is the
        probability of taking the unlikely branch at decision ``d``.
    max_new_tokens:
        The common length of all completions.
    """

    model: MarkovLM
    decision_tokens: list[int]
    likely_tokens: list[int]
    unlikely_tokens: list[int]
    max_new_tokens: int


class BranchProbabilities(NamedTuple):
    """Probability of the UNLIKELY branch at one decision under three distributions."""

    base: float  # under p (= 1 - likely_prob)
    power: float  # under the sequence-level power distribution π ∝ p^α
    tempered: float  # under token-level low-temperature sampling q ∝ p(v|h)^α


def noisy_profile(width: int) -> list[float]:
    """Next-token probabilities inside a noisy segment: linearly decreasing, ``∝ width, width-1, ..., 1``.

    Spread out on purpose (``[0.4, 0.3, 0.2, 0.1]`` for width 4): every particular continuation has small
    probability, so ``Σ_v p(v)^α`` is small.
    """
    check_positive_int("noisy_width", width)
    total = width * (width + 1) / 2
    return [(width - i) / total for i in range(width)]


def branch_probabilities(likely_prob: float, noisy_width: int, noisy_length: int, alpha: float) -> BranchProbabilities:
    """Closed-form probability of the unlikely branch at one decision of :func:`sparse_decision`.

    With ``ℓ = likely_prob`` and ``z = Σ_v profile(v)^α`` (one noisy step), the runs are deterministic and both
    branches merge, so the decisions are independent under ``π`` and
    ``π(unlikely) = (1-ℓ)^α / ((1-ℓ)^α + ℓ^α z^S)`` with ``S = noisy_length``, while token-level tempering only
    sees the decision state: ``q(unlikely) = (1-ℓ)^α / ((1-ℓ)^α + ℓ^α)``.
    """
    alpha = check_alpha(alpha)
    ell = float(likely_prob)
    log_z = math.log(sum(v**alpha for v in noisy_profile(noisy_width)))
    log_unlikely = alpha * math.log1p(-ell)
    log_likely = alpha * math.log(ell)
    power = 1.0 / (1.0 + math.exp(log_likely + noisy_length * log_z - log_unlikely))
    tempered = 1.0 / (1.0 + math.exp(log_likely - log_unlikely))
    return BranchProbabilities(base=1.0 - ell, power=power, tempered=tempered)


def sparse_decision(
    num_decisions: int,
    run_length: int,
    seed: int = 0,
    likely_prob: float = 0.7,
    noisy_width: int = 4,
    noisy_length: int = 2,
) -> SparseDecisionModel:
    """A chain of deterministic runs joined by binary decisions whose branches merge again.

    Layout of every completion (``D = num_decisions``, ``L = run_length``, ``S = noisy_length``)::

        run_0 (L) | branch_1 (1 + S) | run_1 (L) | ... | branch_D (1 + S) | run_D (L) | EOS

    so ``max_new_tokens = (D + 1) L + D (1 + S) + 1`` on both branches. Each run position is its own token and
    leads to the next with probability 1. From the last token of ``run_{d-1}`` (``decision_tokens[d-1]``) the
    LIKELY branch token follows with probability ``likely_prob`` and leads into a NOISY segment of ``S`` steps,
    each with ``noisy_width`` tokens (per step, so the state knows the step) drawn with the spread-out
    :func:`noisy_profile` (assigned to tokens in a seeded random order per row). The UNLIKELY branch token
    (probability ``1 - likely_prob``) leads into ``S`` deterministic tokens. Both branches end in
    ``run_d``. Non-EOS token ids are shuffled with ``seed``; EOS is token 0.

    With the defaults (``likely_prob = 0.7``, width 4, ``S = 2``) and ``α = 4`` (see
    :func:`branch_probabilities`): ``p`` takes the unlikely branch with probability 0.3, token-level
    low-temperature sampling with about 0.033, and the power distribution with about 0.964. Lengthening the
    runs (``run_length``) changes none of these: cost should scale with the entropy mass, not the length.

    Parameters
    ----------
    num_decisions:
        ``D >= 1`` decisions.
    run_length:
        ``L >= 1`` tokens per deterministic run.
    seed:
        Seed for the token-id shuffle and the order of the noisy probabilities.
    likely_prob:
        Probability of the likely (noisy) branch, in ``(0, 1)``.
    noisy_width:
        ``>= 2`` tokens per noisy step.
    noisy_length:
        ``S >= 1`` steps after each branch token.

    Returns
    -------
    SparseDecisionModel
    """
    D = check_positive_int("num_decisions", num_decisions)
    L = check_positive_int("run_length", run_length)
    S = check_positive_int("noisy_length", noisy_length)
    W = check_positive_int("noisy_width", noisy_width)
    if W < 2:
        raise EGPSError(f"noisy_width must be >= 2 (a noisy step needs several tokens), got {W}")
    if not (isinstance(likely_prob, int | float) and 0.0 < float(likely_prob) < 1.0):
        raise EGPSError(f"likely_prob must lie strictly between 0 and 1, got {likely_prob!r}")
    ell = float(likely_prob)
    rng = np.random.default_rng(seed)

    eos = 0
    vocab = 1 + (D + 1) * L + D * (2 + S * W + S)
    # Shuffled ids, so that samplers and tests cannot lean on a regular numbering.
    pool = iter((rng.permutation(vocab - 1) + 1).tolist())

    def fresh(n: int) -> list[int]:
        return [next(pool) for _ in range(n)]

    runs = [fresh(L) for _ in range(D + 1)]
    likely = fresh(D)
    unlikely = fresh(D)
    noisy = [[fresh(W) for _ in range(S)] for _ in range(D)]
    deterministic = [fresh(S) for _ in range(D)]

    # Built in NumPy: thousands of scalar writes are much cheaper there than as tensor ops.
    transition = np.zeros((vocab, vocab))
    profile = np.asarray(noisy_profile(W))

    def spread(src: int, targets: list[int]) -> None:
        transition[src, np.asarray(targets)[rng.permutation(W)]] = profile

    def chain(tokens: list[int], then: int) -> None:
        for a, b in zip(tokens, [*tokens[1:], then], strict=True):
            transition[a, b] = 1.0

    transition[eos, eos] = 1.0  # never used: a completion stops at EOS
    for d in range(D):
        chain(runs[d][:-1], runs[d][-1])
        transition[runs[d][-1], likely[d]] = ell
        transition[runs[d][-1], unlikely[d]] = 1.0 - ell
    chain(runs[D], eos)
    for d in range(D):
        merge = runs[d + 1][0]
        steps = noisy[d]
        spread(likely[d], steps[0])
        for j in range(S):
            for tok in steps[j]:
                if j + 1 < S:
                    spread(tok, steps[j + 1])
                else:
                    transition[tok, merge] = 1.0
        chain([unlikely[d], *deterministic[d]], merge)

    initial = np.zeros(vocab)
    initial[runs[0][0]] = 1.0
    model = MarkovLM(
        torch.from_numpy(initial),
        torch.from_numpy(transition),
        eos,
        name=f"sparse_decision(D={D}, L={L}, seed={seed}, likely={ell:g}, width={W}, noisy_length={S})",
    )
    return SparseDecisionModel(
        model=model,
        decision_tokens=[runs[d][-1] for d in range(D)],
        likely_tokens=likely,
        unlikely_tokens=unlikely,
        max_new_tokens=(D + 1) * L + D * (1 + S) + 1,
    )


__all__ = [
    "BranchProbabilities",
    "SparseDecisionModel",
    "branch_probabilities",
    "noisy_profile",
    "random_markov",
    "sparse_decision",
]
