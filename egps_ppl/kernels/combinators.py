"""Combinators: build new kernels from old ones. Each preserves π if its parts do."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from egps_ppl.errors import EGPSError
from egps_ppl.kernels.base import Kernel, StepInfo
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.rng import categorical
from egps_ppl.state import Sequences


class Cycle(Kernel):
    """Apply each kernel in turn within one step (a deterministic-scan composition).

    The info record sums the costs; ``accepted`` says whether any part moved the chain, ``accept_prob`` is the
    mean of the parts' acceptance probabilities, and ``cut`` is the last part's cut.

    Parameters
    ----------
    kernels : sequence of Kernel
        Applied in order; all must share the first kernel's target.

    Raises
    ------
    EGPSError
        If ``kernels`` is empty.
    """

    def __init__(self, kernels: Sequence[Kernel]) -> None:
        if not kernels:
            raise EGPSError("Cycle needs at least one kernel")
        self.kernels = list(kernels)
        self.target = self.kernels[0].target
        self.name = "cycle(" + ",".join(k.name for k in self.kernels) + ")"

    @property
    def policy(self) -> PowerPolicy:
        """The first kernel's policy (each part brings the state to its own before it moves)."""
        return self.kernels[0].policy

    def step(self, state: Sequences, generator: torch.Generator | None = None) -> tuple[Sequences, StepInfo]:
        infos = []
        for kernel in self.kernels:
            state, info = kernel.step(state, generator)
            infos.append(info)
        return state, _combine(infos)


class Mixture(Kernel):
    """Each chain independently picks kernel ``j`` with probability ``weights[j]`` at every step.

    Chains that picked the same kernel are advanced together in one batched call. The result keeps the input
    state's policy: rows moved by a kernel that proposes with another policy are rescored under it (one
    teacher-forced pass, counted in ``scored_tokens``), so every row's ``logq`` refers to the batch's policy.

    Parameters
    ----------
    kernels : sequence of Kernel
        The components; all must share the first kernel's target.
    weights : sequence of float, optional
        Non-negative, not all zero (normalised here); uniform by default.

    Raises
    ------
    EGPSError
        If ``kernels`` is empty or the weights are invalid.

    Examples
    --------
    >>> from egps_ppl.kernels import MetropolisHastings, MultipleTryMetropolis
    >>> from egps_ppl.models.testbeds import random_markov
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(random_markov(4, seed=0), [], alpha=4.0, max_new_tokens=5)
    >>> Mixture([MetropolisHastings(target), MultipleTryMetropolis(target)], [0.7, 0.3]).name
    'mixture(mh:0.7,mtm:0.3)'
    """

    def __init__(self, kernels: Sequence[Kernel], weights: Sequence[float] | None = None) -> None:
        if not kernels:
            raise EGPSError("Mixture needs at least one kernel")
        weights = [1.0] * len(kernels) if weights is None else [float(w) for w in weights]
        if len(weights) != len(kernels):
            raise EGPSError(f"Mixture got {len(kernels)} kernels but {len(weights)} weights")
        if any(not w >= 0 for w in weights) or sum(weights) <= 0:
            raise EGPSError(f"Mixture weights must be >= 0 and not all 0, got {weights}")
        self.kernels = list(kernels)
        self.weights = torch.tensor(weights, dtype=torch.float64) / sum(weights)
        self.target = self.kernels[0].target
        self.name = "mixture(" + ",".join(f"{k.name}:{w:g}" for k, w in zip(self.kernels, weights, strict=True)) + ")"

    @property
    def policy(self) -> PowerPolicy:
        """The first kernel's policy (each part brings the state to its own before it moves)."""
        return self.kernels[0].policy

    def step(self, state: Sequences, generator: torch.Generator | None = None) -> tuple[Sequences, StepInfo]:
        num = state.num_rows
        choice = categorical(self.weights, num, generator, state.stream).to(state.device)
        info = StepInfo.idle(num, state.device)
        parts: list[tuple[torch.Tensor, Sequences]] = []
        for j, kernel in enumerate(self.kernels):
            rows = (choice == j).nonzero().flatten()
            if rows.numel() == 0:
                continue
            # Every row picked this kernel: step the state itself (no row selection, so no cache rows copied).
            sub = state if rows.numel() == num else state.take(rows)
            sub_state, sub_info = kernel.step(sub, generator)
            if sub_state.policy != state.policy:
                # The merged batch keeps the input's policy: rescore logq/logz of these rows under it, else the
                # next kernel would take them as densities under a policy they were not computed with.
                sub_state, back = self.target.lm.with_policy(sub_state, state.policy)
                sub_info.scored_tokens = sub_info.scored_tokens + back.scored_tokens
                sub_info.forward_calls += back.forward_calls
            parts.append((rows, sub_state))
            info.accepted[rows] = sub_info.accepted
            info.accept_prob[rows] = sub_info.accept_prob
            info.cut[rows] = sub_info.cut
            info.decode_tokens[rows] += sub_info.decode_tokens
            info.scored_tokens[rows] += sub_info.scored_tokens
            info.forward_calls += sub_info.forward_calls
        if len(parts) == 1:
            # As the scatter below would: the rows of the part in the input's frame (limit, policy, EOS).
            only = parts[0][1]
            return only.with_(limit=state.limit, policy=state.policy, eos_token_id=state.eos_token_id), info
        return _scatter(state, parts), info


def _scatter(state: Sequences, parts: list[tuple[torch.Tensor, Sequences]]) -> Sequences:
    """One batch of ``state.num_rows`` rows whose rows ``rows_j`` are the rows of ``sub_j`` (the ``rows_j`` partition
    the batch).

    When every part's cache offers ``scatter(num_rows, [(rows, cache), ...])`` (the KV pool does), each cache row is
    copied once into the result; otherwise the caches are spread with ``take`` and merged with ``where``.
    """
    num = state.num_rows
    caches = [sub.cache for _, sub in parts]
    kinds = {type(c) for c in caches}
    direct = None not in caches and len(kinds) == 1 and hasattr(next(iter(kinds)), "scatter")
    result = state.with_(cache=None) if direct else state
    for rows, sub in parts:
        # Every row of the spread batch is some row of `sub`; only this part's rows are used.
        slot = torch.zeros(num, dtype=torch.long, device=state.device)
        slot[rows] = torch.arange(rows.numel(), device=state.device)
        mine = torch.zeros(num, dtype=torch.bool, device=state.device)
        mine[rows] = True
        spread = sub.with_(cache=None).take(slot) if direct else sub.take(slot)
        result = result.where(mine, spread)
    if direct:
        cache_type = next(iter(kinds))
        result = result.with_(cache=cache_type.scatter(num, [(rows, sub.cache) for rows, sub in parts]))
    return result


def _combine(infos: list[StepInfo]) -> StepInfo:
    first = infos[0]
    accepted = torch.zeros_like(first.accepted)
    for info in infos:
        accepted |= info.accepted
    return StepInfo(
        accepted=accepted,
        accept_prob=torch.stack([i.accept_prob for i in infos]).mean(0),
        cut=infos[-1].cut,
        decode_tokens=sum((i.decode_tokens for i in infos), torch.zeros_like(first.decode_tokens)),
        scored_tokens=sum((i.scored_tokens for i in infos), torch.zeros_like(first.scored_tokens)),
        forward_calls=sum(i.forward_calls for i in infos),
    )
