"""π's answer distribution on a real model, exactly up to a certified bound, by best-first enumeration.

For ``α >= 1`` the power distribution ``π(x) ∝ p(x)^α`` is concentrated on few completions, and the mass it puts
on everything below a prefix is bounded by the prefix itself: for any prefix ``u`` (completions that extend it
have ``p(x) <= p(u)`` and ``Σ_{x ⊒ u} p(x) = p(u)``)

.. math::

    \\sum_{x \\sqsupseteq u} p(x)^α \\le p(u)^{α-1} \\sum_{x \\sqsupseteq u} p(x) = p(u)^α .

:func:`enumerate_power` runs a best-first search over prefixes ordered by ``log p``: it takes the ``batch`` most
probable prefixes of the frontier and follows each greedily to a completion ("dives", one token fed per step with
the cache carried along), expanding every node on the way; each expanded prefix's other children enter the
frontier lazily, best first (``top_children`` per prefix; the rest stay in the bound). At any moment the mass of
π not yet found is at most

.. math::

    U = \\sum_{u \\in \\text{frontier}} p(u)^α
        + \\sum_{\\text{expanded } u} p(u)^α \\sum_{v \\text{ not yet in the frontier}} p(v|u)^α ,

so with ``F`` the mass of the completions found, the found completions' answer distribution ``π̂`` obeys
``TV(π̂, π_answer) <= U / (F + U)`` (:attr:`PowerEnumeration.tv_bound`): a **certificate**, not an estimate. The
search stops once the bound is at most ``tol`` (or at ``max_expansions``, reporting whatever bound it reached).

On SmolLM2-135M and arithmetic word problems at ``α = 4`` a few thousand expansions certify a bound below 0.01
(docs/benchmarks/fidelity.md): this is the reference that :mod:`benchmarks.fidelity` compares samplers against,
where long MH runs and Power-SMC had disagreed with each other.

Cost: a dive feeds its starting prefix once (the backend's prompt cache is shared), then one token per step; the
forward calls are memory-bound at small batches, so ``batch`` 32–128 is much faster per expansion than 1 on a CPU.
Completions are returned best first (sorted at the end).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable, Hashable
from dataclasses import dataclass

import torch

from egps_ppl.errors import EGPSError, check_positive_int
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

AnswerFn = Callable[[list[int]], Hashable]

SLACK = 1e-9
"""Added to every logarithm of a bound on unexplored mass (a relative ``1e-9``), so that float64 rounding of the
sum never lowers the bound."""


@dataclass
class PowerEnumeration:
    """What :func:`enumerate_power` found.

    Attributes
    ----------
    completions : list of tuple of int
        The completions found (with their EOS when they end in one), best first.
    log_p : list of float
        ``log p(x)`` of each completion.
    answers : list
        ``answer(x)`` of each completion (the completion itself when no answer function was given).
    alpha : float
        The power.
    log_rest_bound : float
        ``log U``: the bound on the log mass ``log Σ p(x)^α`` of every completion not found.
    expansions : int
        Prefixes run through the model.
    scored_tokens : int
        Tokens fed to the model in all.
    log_found : float
        ``log F``: the log mass ``log Σ p(x)^α`` of the completions found.
    exhausted : bool
        Whether the search ran out of prefixes (every completion reachable through ``top_children`` children per
        prefix was found; what remains of the bound is the children never generated).
    """

    completions: list[tuple[int, ...]]
    log_p: list[float]
    answers: list[Hashable]
    alpha: float
    log_rest_bound: float
    expansions: int
    scored_tokens: int
    log_found: float = -math.inf
    exhausted: bool = False

    @property
    def tv_bound(self) -> float:
        """``U / (F + U)``: the total variation between :meth:`marginal` and π's true answer distribution is at
        most this (1 when nothing was found)."""
        if self.log_found == -math.inf:
            return 1.0
        return math.exp(self.log_rest_bound - _logaddexp(self.log_found, self.log_rest_bound))

    def marginal(self) -> dict[Hashable, float]:
        """π's answer distribution restricted to the completions found, most probable answer first.

        Raises
        ------
        EGPSError
            If no completion was found.
        """
        if not self.completions:
            raise EGPSError("enumerate_power found no completion: raise max_expansions")
        weights = torch.tensor(self.log_p, dtype=torch.float64) * self.alpha
        probs = torch.softmax(weights, dim=0).tolist()
        out: dict[Hashable, float] = {}
        for answer, prob in zip(self.answers, probs, strict=True):
            out[answer] = out.get(answer, 0.0) + prob
        return dict(sorted(out.items(), key=lambda kv: -kv[1]))


def _logaddexp(a: float, b: float) -> float:
    if a == -math.inf:
        return b
    if b == -math.inf:
        return a
    hi = max(a, b)
    return hi + math.log(math.exp(a - hi) + math.exp(b - hi))


def _logsumexp(values: list[float]) -> float:
    if not values:
        return -math.inf
    return float(torch.logsumexp(torch.tensor(values, dtype=torch.float64), dim=0))


@dataclass
class _Parent:
    """An expanded prefix: its best ``K`` children (log p, ids, best first) and ``log_rest[j]``, the log of
    ``Σ_{rank >= j} p(v|u)^α`` (``log_rest[K]``: the children beyond the best ``K``)."""

    tokens: tuple[int, ...]
    log_p: float
    child_log_p: list[float]
    child_ids: list[int]
    log_rest: list[float]


def enumerate_power(
    target: PowerDistribution,
    answer: AnswerFn | None = None,
    *,
    tol: float = 1e-3,
    max_expansions: int = 100_000,
    batch: int = 32,
    top_children: int = 64,
) -> PowerEnumeration:
    """Enumerate π's most probable completions until their answer distribution is certified within ``tol``.

    Parameters
    ----------
    target : PowerDistribution
        A single-prompt target with ``α >= 1`` and no ``log_factor``, on a backend with full next-token
        distributions (:meth:`~egps_ppl.models.base.LanguageModel.next_token_logprobs`).
    answer : callable, optional
        Maps a completion's token ids (as :meth:`Sequences.row_tokens` gives them) to its answer; default the
        completion itself.
    tol : float
        Stop once :attr:`PowerEnumeration.tv_bound` is at most this (``0``: run until nothing is left).
    max_expansions : int
        Stop once this many prefixes were expanded, whatever the bound (the step that reaches it finishes, so up
        to ``batch - 1`` more).
    batch : int
        Frontier prefixes followed (dived) together, one forward call per step.
    top_children : int
        Children generated per prefix (best first); the rest are only ever counted in the bound.

    Returns
    -------
    PowerEnumeration

    Raises
    ------
    EGPSError
        For ``α < 1`` (the bound needs ``α >= 1``), a target with several prompts or a ``log_factor``, a ``tol``
        outside ``[0, 1)``, non-positive counts, or a backend without full next-token distributions.

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> target = PowerDistribution(random_markov(3, seed=0), prompt=[], alpha=4.0, max_new_tokens=3)
    >>> found = enumerate_power(target, answer=lambda ids: ids[-1], tol=0.0)
    >>> round(sum(found.marginal().values()), 6), found.tv_bound < 1e-12
    (1.0, True)
    """
    if target.alpha < 1:
        raise EGPSError(f"enumerate_power needs alpha >= 1 (its bound is p(prefix)^alpha), got {target.alpha}")
    if target.num_prompts != 1:
        raise EGPSError(
            f"enumerate_power takes a single-prompt target, got {target.num_prompts}; use target.problem_target(i)"
        )
    if target.log_factor is not None:
        raise EGPSError("enumerate_power does not bound a target with a log_factor")
    if isinstance(tol, bool) or not isinstance(tol, int | float) or not 0 <= tol < 1:
        raise EGPSError(f"tol must be a number in [0, 1), got {tol!r}")
    max_expansions = check_positive_int("max_expansions", max_expansions)
    batch = check_positive_int("batch", batch)
    top_children = check_positive_int("top_children", top_children)
    lm, alpha, T, eos = target.lm, target.alpha, target.max_new_tokens, target.lm.eos_token_id
    policy = PowerPolicy(1.0)
    answer_of: AnswerFn = answer if answer is not None else tuple

    # Frontier: (-log p, tie-break, tokens, parent index, child rank); the root has no parent.
    heap: list[tuple[float, int, tuple[int, ...], int, int]] = [(-0.0, 0, (), -1, -1)]
    counter = 1  # tie-break: first pushed, first popped
    parents: list[_Parent] = []
    side: dict[int, float] = {}  # parent -> α log p(u) + log Σ (its children not yet pushed)
    found = PowerEnumeration([], [], [], alpha, 0.0, 0, 0)
    K = min(top_children, lm.vocab_size)

    def finished(tokens: tuple[int, ...]) -> bool:
        return len(tokens) >= T or (len(tokens) > 0 and tokens[-1] == eos)

    def push(log_p: float, tokens: tuple[int, ...], parent: int, rank: int) -> None:
        nonlocal counter
        heapq.heappush(heap, (-log_p, counter, tokens, parent, rank))
        counter += 1

    def taken(parent: int, rank: int) -> None:
        """Child ``rank`` of ``parent`` left the frontier: its next sibling enters it."""
        p = parents[parent]
        if rank + 1 < len(p.child_ids):
            push(p.log_p + p.child_log_p[rank + 1], (*p.tokens, p.child_ids[rank + 1]), parent, rank + 1)
        rest = p.log_rest[min(rank + 2, len(p.child_ids))]
        if rest == -math.inf:
            side.pop(parent, None)
        else:
            side[parent] = alpha * p.log_p + rest

    def record(tokens: tuple[int, ...], log_p: float) -> None:
        found.completions.append(tokens)
        found.log_p.append(log_p)
        found.answers.append(answer_of(list(tokens)))

    def expand(tokens: tuple[int, ...], log_p: float, logp: torch.Tensor) -> tuple[tuple[int, ...], float] | None:
        """Register an expanded prefix and take its most probable child (returned, or None if it has none)."""
        child_lp, ids = torch.topk(logp, K)
        keep = child_lp > -math.inf
        child_lp, ids = child_lp[keep], ids[keep]
        if child_lp.numel() == 0:
            return None
        # log Σ_{rank >= j} p^α for j = 0..k-1, then the children beyond the best k: summed directly (a difference
        # of sums would lose them to rounding at large α, and a slack scaled to the whole sum would swamp π's mass).
        suffix = torch.logcumsumexp((alpha * child_lp).flip(0), dim=0).flip(0)
        beyond = -math.inf
        if lm.vocab_size > K:
            rest = alpha * logp
            rest[ids] = -math.inf
            beyond = float(torch.logsumexp(rest, dim=0)) + SLACK  # rounding must never lower the bound
        log_rest = [_logaddexp(float(v), beyond) for v in suffix] + [beyond]
        parents.append(_Parent(tokens, log_p, child_lp.tolist(), ids.tolist(), log_rest))
        taken(len(parents) - 1, 0)
        return (*tokens, int(ids[0])), log_p + float(child_lp[0])

    rows: list[tuple[tuple[int, ...], float]] = []  # the prefixes being dived, with their log p

    def done() -> bool:
        # Unfound mass: the frontier, the children not yet in it, and the prefixes being dived.
        frontier = [alpha * -h[0] for h in heap] + [alpha * lp for _, lp in rows] + list(side.values())
        found.log_found = _logsumexp([alpha * lp for lp in found.log_p])
        found.log_rest_bound = _logsumexp(frontier)
        return found.tv_bound <= tol or found.expansions >= max_expansions

    def fresh(prefixes: list[tuple[tuple[int, ...], float]]) -> Sequences:
        seqs = lm.start(target.prompt, len(prefixes), T, policy)
        tokens_t = seqs.tokens.clone()
        for r, (tokens, _) in enumerate(prefixes):
            tokens_t[r, : len(tokens)] = torch.tensor(tokens, dtype=torch.long)
        return seqs.with_(tokens=tokens_t, length=torch.tensor([len(t) for t, _ in prefixes], dtype=torch.long))

    # The most probable prefixes of the frontier are followed greedily ("dived") to a completion: every node on the
    # way is expanded (one token fed per step, the cache carried), its other children enter the frontier lazily,
    # best first. When half the dives have ended, the batch is refilled from the frontier.
    seqs: Sequences | None = None
    while not done():
        if len(rows) <= batch // 2 and heap:
            new: list[tuple[tuple[int, ...], float]] = []
            while heap and len(rows) + len(new) < batch:
                neg, _, tokens, parent, rank = heapq.heappop(heap)
                if parent >= 0:
                    taken(parent, rank)
                if finished(tokens):
                    record(tokens, -neg)
                else:
                    new.append((tokens, -neg))
            if new:
                seqs = fresh(new) if seqs is None else seqs.concat(fresh(new))
                rows += new
        if not rows:
            if heap:
                continue
            break
        assert seqs is not None
        logp, cost, seqs = lm.next_token_logprobs(seqs)
        found.expansions += len(rows)
        found.scored_tokens += int(cost.scored_tokens.sum())
        alive, kept = [], []
        for r, (tokens, log_p) in enumerate(rows):
            child = expand(tokens, log_p, logp[r])
            if child is None:
                continue
            if finished(child[0]):
                record(*child)
            else:
                alive.append(child)
                kept.append(r)
        rows = alive
        if not rows:
            seqs = None
            continue
        seqs = seqs.take(torch.tensor(kept, dtype=torch.long))
        tokens_t, length = seqs.tokens.clone(), seqs.length.clone()
        tokens_t[torch.arange(len(rows)), length] = torch.tensor([t[-1] for t, _ in rows], dtype=torch.long)
        seqs = seqs.with_(tokens=tokens_t, length=length + 1)
    for tokens, log_p in rows:  # stopped mid-dive: the prefixes reached go back to the frontier (no sibling owed)
        push(log_p, tokens, -1, -1)
    rows = []
    done()
    found.exhausted = not heap
    order = sorted(range(len(found.completions)), key=lambda n: -found.log_p[n])
    found.completions = [found.completions[n] for n in order]
    found.log_p = [found.log_p[n] for n in order]
    found.answers = [found.answers[n] for n in order]
    return found


__all__ = ["PowerEnumeration", "enumerate_power"]
