"""Exact correctness checks for kernels, for our own tests and for users who write new proposals.

The strongest test of an MCMC kernel: draw many chains *exactly* from π on a Markov model small enough to
enumerate, apply the kernel, and check that the result is still distributed as π. A missing Hastings term,
a wrong proposal density or a forgotten cut-choice probability all fail it.

Examples
--------
>>> from egps_ppl.kernels import MetropolisHastings
>>> from egps_ppl.models.testbeds import random_markov
>>> report = assert_invariant(MetropolisHastings, random_markov(3, seed=1), alpha=2.0, max_new_tokens=3,
...                           num_chains=20_000)
>>> report.p_value > 1e-4
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from egps_ppl.kernels.base import Kernel
from egps_ppl.models.exact import ExactPower
from egps_ppl.models.markov import MarkovLM
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

KernelFactory = Callable[[PowerDistribution], Kernel]


@dataclass(frozen=True)
class InvarianceReport:
    """How far the chains are from π after the kernel steps.

    ``tv`` is the total-variation distance between the empirical and exact distributions; ``tv_noise`` the
    TV expected from sampling noise alone at this number of chains; ``p_value`` that of Pearson's chi-square
    test (bins with expected count < 5 pooled); ``moved`` the fraction of chains whose sequence changed.
    """

    tv: float
    tv_noise: float
    chi2: float
    dof: int
    p_value: float
    moved: float
    num_chains: int
    num_states: int

    def passed(self, min_p_value: float = 1e-4, tv_factor: float = 3.0, min_moved: float = 0.01) -> bool:
        return self.p_value >= min_p_value and self.tv <= tv_factor * self.tv_noise and self.moved >= min_moved


def exact_chains(target: PowerDistribution, num_chains: int, generator: torch.Generator) -> Sequences:
    """``num_chains`` sequences drawn exactly from π (Markov models only), with statistics under the
    target's default policy."""
    exact = _exact(target)
    tokens, length = exact.sample(num_chains, generator)
    seqs = target.empty(num_chains)
    seqs = seqs.with_(tokens=tokens.to(seqs.device), length=length.to(seqs.device))
    scored, _ = target.lm.score(seqs, torch.zeros_like(seqs.length))
    return scored


def distance_to_target(target: PowerDistribution, seqs: Sequences, moved: float = float("nan")) -> InvarianceReport:
    """Compare the empirical distribution of ``seqs`` with the exact π of ``target``."""
    support, log_pi = _exact(target).enumerate()
    index = {s: k for k, s in enumerate(support)}
    counts = torch.zeros(len(support), dtype=torch.float64)
    unique, found = torch.unique(torch.cat([seqs.tokens, seqs.length.unsqueeze(1)], 1), dim=0, return_counts=True)
    outside = 0
    for row, count in zip(unique.tolist(), found.tolist(), strict=True):
        key = tuple(row[: row[-1]])
        if key in index:
            counts[index[key]] += count
        else:
            outside += count
    n = seqs.num_rows
    probs = log_pi.exp()
    tv = 0.5 * ((counts / n - probs).abs().sum().item() + outside / n)
    tv_noise = 0.5 * torch.sqrt(2 * probs * (1 - probs) / (math.pi * n)).sum().item()
    chi2, dof, p_value = pearson_test(counts, probs, outside)
    return InvarianceReport(tv, tv_noise, chi2, dof, p_value, moved, n, len(support))


def check_invariance(
    kernel_factory: KernelFactory,
    model: MarkovLM,
    alpha: float,
    max_new_tokens: int,
    num_chains: int = 100_000,
    steps: int = 1,
    seed: int = 0,
    prompt: Sequence[int] = (),
) -> InvarianceReport:
    """Draw ``num_chains`` chains exactly from π, apply ``steps`` kernel steps, and compare with π."""
    target = PowerDistribution(model, list(prompt), alpha, max_new_tokens)
    kernel = kernel_factory(target)
    generator = torch.Generator().manual_seed(seed)
    start = exact_chains(target, num_chains, generator)
    state = start
    for _ in range(steps):
        state, _ = kernel.step(state, generator)
    changed = (state.tokens != start.tokens).any(1) | (state.length != start.length)
    return distance_to_target(target, state, moved=changed.double().mean().item())


def assert_invariant(
    kernel_factory: KernelFactory,
    model: MarkovLM,
    alpha: float,
    max_new_tokens: int,
    num_chains: int = 100_000,
    steps: int = 1,
    seed: int = 0,
    prompt: Sequence[int] = (),
    min_p_value: float = 1e-4,
    tv_factor: float = 3.0,
    min_moved: float = 0.01,
) -> InvarianceReport:
    """:func:`check_invariance`, raising ``AssertionError`` with the report if π is not preserved
    (chi-square p-value below ``min_p_value``, TV above ``tv_factor`` times the sampling noise) or if the chains
    barely move (fewer than ``min_moved`` of them changed: a kernel that never moves is trivially invariant)."""
    report = check_invariance(kernel_factory, model, alpha, max_new_tokens, num_chains, steps, seed, prompt)
    if not report.passed(min_p_value, tv_factor, min_moved):
        raise AssertionError(f"kernel does not leave π invariant (or does not move): {report}")
    return report


def _exact(target: PowerDistribution) -> ExactPower:
    if not isinstance(target.lm, MarkovLM):
        raise TypeError("exact checks need a MarkovLM target")
    return ExactPower(target.lm, target.alpha, target.max_new_tokens, target.prompt.tolist())


def pearson_test(counts: torch.Tensor, probs: torch.Tensor, outside: float = 0.0) -> tuple[float, int, float]:
    """Pearson's chi-square test of observed ``counts`` against exact ``probs`` (same order), pooling the
    cells with expected count < 5 together with ``outside`` (observations outside the support).

    Returns ``(statistic, degrees of freedom, p-value)``.
    """
    counts = counts.double()
    expected = (counts.sum() + outside) * probs.double()
    big = expected >= 5
    stat = (((counts - expected) ** 2) / expected)[big].sum().item()
    bins = int(big.sum())
    small_obs = counts[~big].sum().item() + outside
    small_exp = expected[~big].sum().item()
    if small_exp > 0:
        stat += (small_obs - small_exp) ** 2 / small_exp
        bins += 1
    elif outside:
        stat = math.inf
    dof = max(bins - 1, 1)
    return stat, dof, _chi2_sf(stat, dof)


def _chi2_sf(stat: float, dof: int) -> float:
    if math.isinf(stat):
        return 0.0
    return float(torch.special.gammaincc(torch.tensor(dof / 2, dtype=torch.float64), torch.tensor(stat / 2)))
