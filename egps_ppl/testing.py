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

from egps_ppl.errors import EGPSError
from egps_ppl.kernels.base import Kernel
from egps_ppl.models.base import is_prompt_table
from egps_ppl.models.exact import ExactPower
from egps_ppl.models.markov import MarkovLM
from egps_ppl.state import PAD, Sequences
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
        """Whether π looks preserved and the chains moved.

        Parameters
        ----------
        min_p_value : float
            Smallest acceptable chi-square p-value.
        tv_factor : float
            Largest acceptable ratio of ``tv`` to ``tv_noise``.
        min_moved : float
            Smallest acceptable fraction of chains that changed (NaN ``moved`` fails).

        Returns
        -------
        bool
        """
        return self.p_value >= min_p_value and self.tv <= tv_factor * self.tv_noise and self.moved >= min_moved


def exact_chains(target: PowerDistribution, num_chains: int, generator: torch.Generator) -> Sequences:
    """``num_chains`` sequences drawn exactly from π (Markov models only), with statistics under the
    target's default policy.

    Parameters
    ----------
    target : PowerDistribution
        A target over a :class:`~egps_ppl.models.markov.MarkovLM` (its ``log_factor`` is ignored).
    num_chains : int
        Number of i.i.d. draws.
    generator : torch.Generator
        Source of randomness.

    Returns
    -------
    Sequences

    Raises
    ------
    TypeError
        If the target's model is not a ``MarkovLM``.
    """
    seqs = target.empty(num_chains)
    tokens = torch.full_like(seqs.tokens, PAD)
    length = torch.zeros_like(seqs.length)
    for k in range(target.num_prompts):  # rows are problem-major: chains of problem k are one block
        drawn, lengths = _exact(target, k).sample(num_chains, generator)
        rows = slice(k * num_chains, (k + 1) * num_chains)
        tokens[rows, : drawn.shape[1]], length[rows] = drawn.to(seqs.device), lengths.to(seqs.device)
    scored, _ = target.lm.score(seqs.with_(tokens=tokens, length=length), torch.zeros_like(length))
    return scored


def distance_to_target(target: PowerDistribution, seqs: Sequences, moved: float = float("nan")) -> InvarianceReport:
    """Compare the empirical distribution of ``seqs`` with the exact π of ``target``.

    For a target over several prompts, each problem's rows are compared with its own π and the chi-square
    statistics are pooled (summed, with their degrees of freedom); ``tv`` and ``tv_noise`` are the means over
    problems.

    Parameters
    ----------
    target : PowerDistribution
        A target over a :class:`~egps_ppl.models.markov.MarkovLM`.
    seqs : Sequences
        The chains' current states.
    moved : float
        Fraction of chains that changed, copied into the report.

    Returns
    -------
    InvarianceReport
    """
    if target.batched:
        parts = [
            distance_to_target(target.problem_target(k), seqs.take((seqs.problem == k).nonzero().flatten()))
            for k in range(target.num_prompts)
        ]
        chi2, dof = sum(r.chi2 for r in parts), sum(r.dof for r in parts)
        return InvarianceReport(
            tv=sum(r.tv for r in parts) / len(parts),
            tv_noise=sum(r.tv_noise for r in parts) / len(parts),
            chi2=chi2,
            dof=dof,
            p_value=_chi2_sf(chi2, dof),
            moved=moved,
            num_chains=seqs.num_rows,
            num_states=sum(r.num_states for r in parts),
        )
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
    prompt: Sequence[int] | Sequence[Sequence[int]] = (),
) -> InvarianceReport:
    """Draw ``num_chains`` chains exactly from π, apply ``steps`` kernel steps, and compare with π.

    Parameters
    ----------
    kernel_factory : callable
        ``target -> Kernel``, e.g. a kernel class or ``lambda t: MetropolisHastings(t, selector=...)``.
    model : MarkovLM
        An enumerable Markov model (keep ``V`` and ``max_new_tokens`` small: the support is enumerated).
    alpha : float
        The power α.
    max_new_tokens : int
        Maximum completion length ``T``.
    num_chains : int
        Chains drawn exactly from π; more chains detect smaller biases.
    steps : int
        Kernel steps applied before the comparison.
    seed : int
        Seed of the generator used for the draws and the kernel.
    prompt : sequence of int, or sequence of sequences of int
        Prompt token ids; a list of prompts checks the kernel on a plate over problems (``num_chains`` chains
        each, all in one batch).

    Returns
    -------
    InvarianceReport
        Distance to π after the steps; see :meth:`InvarianceReport.passed`.
    """
    target = PowerDistribution(model, [list(p) for p in prompt] if is_prompt_table(prompt) else list(prompt), alpha,
                               max_new_tokens)  # fmt: skip
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
    prompt: Sequence[int] | Sequence[Sequence[int]] = (),
    min_p_value: float = 1e-4,
    tv_factor: float = 3.0,
    min_moved: float = 0.01,
) -> InvarianceReport:
    """:func:`check_invariance`, raising ``AssertionError`` with the report if π is not preserved
    (chi-square p-value below ``min_p_value``, TV above ``tv_factor`` times the sampling noise) or if the chains
    barely move (fewer than ``min_moved`` of them changed: a kernel that never moves is trivially invariant).

    Parameters
    ----------
    kernel_factory, model, alpha, max_new_tokens, num_chains, steps, seed, prompt
        As in :func:`check_invariance`.
    min_p_value, tv_factor, min_moved
        Thresholds of :meth:`InvarianceReport.passed`.

    Returns
    -------
    InvarianceReport
        The report of a kernel that passed.

    Raises
    ------
    AssertionError
        If the kernel fails, with the report in the message.

    Examples
    --------
    >>> from egps_ppl.kernels import MetropolisHastings, WindowProposal
    >>> from egps_ppl.models.testbeds import random_markov
    >>> def window_mh(target):
    ...     return MetropolisHastings(target, proposal=WindowProposal(target.default_policy(), widths=[1, 2]))
    >>> assert_invariant(window_mh, random_markov(3, seed=2), alpha=3.0, max_new_tokens=4,
    ...                  num_chains=20_000).passed()
    True
    """
    report = check_invariance(kernel_factory, model, alpha, max_new_tokens, num_chains, steps, seed, prompt)
    if not report.passed(min_p_value, tv_factor, min_moved):
        raise AssertionError(f"kernel does not leave π invariant (or does not move): {report}")
    return report


def _exact(target: PowerDistribution, problem: int = 0) -> ExactPower:
    if not isinstance(target.lm, MarkovLM):
        raise TypeError("exact checks need a MarkovLM target")
    return ExactPower(target.lm, target.alpha, target.max_new_tokens, target.prompts[problem].tolist())


def pearson_test(counts: torch.Tensor, probs: torch.Tensor, outside: float = 0.0) -> tuple[float, int, float]:
    """Pearson's chi-square test of observed ``counts`` against exact ``probs`` (same order), pooling the
    cells with expected count < 5 together with ``outside`` (observations outside the support).

    Returns ``(statistic, degrees of freedom, p-value)``.
    """
    probs = probs.double()
    if (probs < 0).any() or probs.isnan().any() or float(probs.sum()) > 1.0 + 1e-6:
        # A common slip is to pass log-probabilities; the test would then silently pass.
        raise EGPSError(
            f"pearson_test needs probabilities (>= 0, summing to at most 1), got values in "
            f"[{float(probs.min()):.3g}, {float(probs.max()):.3g}] summing to {float(probs.sum()):.6g}"
        )
    counts = counts.double()
    expected = (counts.sum() + outside) * probs
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
