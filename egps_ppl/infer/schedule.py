"""Schedules: how a completion is grown while the kernel runs.

The block-wise schedule of Karan & Du: extend every unfinished chain by ``block_size`` tokens from the
proposal, then run ``steps_per_block`` kernel steps whose target is p^α on the sequence generated so far
(the length limit is the current block end, so a row that reaches it without EOS is a valid, unfinished
member of that intermediate target). EOS is checked at block ends: finished rows stop growing.

A schedule only decides *when* kernels run and on which intermediate target; every kernel it calls leaves
that target invariant, so the schedule cannot bias a kernel.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch

from egps_ppl.errors import EGPSError, check_positive_int
from egps_ppl.kernels.base import Kernel, StepInfo
from egps_ppl.models.base import Cost
from egps_ppl.state import Sequences

Hook = Callable[[str, int, Sequences, StepInfo], None]


@dataclass(frozen=True)
class BlockSchedule:
    """Grow ``block_size`` tokens, then ``steps_per_block`` kernel steps, until ``max_new_tokens``.

    Parameters
    ----------
    block_size : int
        ``B``, tokens grown per block (Karan & Du use 192).
    steps_per_block : int
        ``N``, kernel steps after each block (``>= 0``).
    """

    block_size: int = 192
    steps_per_block: int = 10

    def __post_init__(self) -> None:
        check_positive_int("block_size", self.block_size)
        if self.steps_per_block < 0:
            raise ValueError("steps_per_block must be >= 0")

    def steps_for_block(self, state: Sequences, block_start: int) -> int:
        """How many kernel steps this block gets (constant here; adaptive schedules override it)."""
        return self.steps_per_block

    def grow(
        self,
        kernel: Kernel,
        num_chains: int,
        generator: torch.Generator | None,
        hook: Hook | None = None,
    ) -> tuple[Sequences, Cost]:
        """Run the whole schedule from empty completions; return the final state and the cost spent."""
        target = kernel.target
        limit = min(self.block_size, target.max_new_tokens)
        state = target.empty(num_chains, kernel.policy, limit=limit)
        state, cost = target.lm.extend(state, torch.zeros_like(state.length), generator=generator)
        step = 0
        block_start = 0
        while True:
            for _ in range(self.steps_for_block(state, block_start)):
                state, info = kernel.step(state, generator)
                cost = cost + info.cost
                if hook is not None:
                    hook("block", step, state, info)
                step += 1
            if limit >= target.max_new_tokens:
                return state, cost
            if bool(state.finished().all()):
                # Every chain has ended: the remaining blocks would add nothing.
                return state.with_(limit=target.max_new_tokens), cost
            block_start, limit = limit, min(limit + self.block_size, target.max_new_tokens)
            state = state.with_(limit=limit)
            state, grown = target.lm.extend(state, state.length, generator=generator)
            cost = cost + grown


@dataclass(frozen=True)
class EntropyAdaptiveSchedule(BlockSchedule):
    """The block-wise schedule with moves spent where the model is uncertain.

    After each block is grown, its entropy mass ``M`` (the sum of the per-position entropies over the new
    block, averaged over chains) decides the number of kernel steps: none when ``M < epsilon`` (a
    deterministic block: nothing there for p^α to reweight), else ``ceil(moves_per_nat * M)`` capped at
    ``max_steps``. Only *when* kernels run changes; every kernel still leaves its intermediate target
    invariant, and the final sampling phase at full length is untouched, so the chain's limit is still π.

    Parameters
    ----------
    block_size, steps_per_block
        As in :class:`BlockSchedule` (``steps_per_block`` is unused: the entropy mass decides).
    epsilon : float
        Entropy mass (nats) below which a block gets no steps.
    moves_per_nat : float
        Steps per nat of entropy mass.
    max_steps : int
        Cap on the steps of one block.
    """

    epsilon: float = 0.05
    moves_per_nat: float = 2.0
    max_steps: int = 40

    def steps_for_block(self, state: Sequences, block_start: int) -> int:
        block = (state.positions() >= block_start) & state.valid_mask()
        mass = torch.where(block, state.entropy, torch.zeros_like(state.entropy)).sum(1).mean().item()
        if mass < self.epsilon:
            return 0
        return min(self.max_steps, math.ceil(self.moves_per_nat * mass))


def make_schedule(block_size: int | None, steps_per_block: int, adaptive: bool = False) -> BlockSchedule | None:
    """The growth schedule for command-line style options: none without ``block_size``; the adaptive one
    may spend up to 4x ``steps_per_block`` on a block with high entropy mass.

    Parameters
    ----------
    block_size : int or None
        ``--block-size``; ``None`` for no schedule.
    steps_per_block : int
        ``--steps-per-block``.
    adaptive : bool
        ``--adaptive``: an :class:`EntropyAdaptiveSchedule` instead of a :class:`BlockSchedule`.

    Returns
    -------
    BlockSchedule or None

    Raises
    ------
    EGPSError
        If ``adaptive`` is set without a ``block_size``.

    Examples
    --------
    >>> make_schedule(192, 10)
    BlockSchedule(block_size=192, steps_per_block=10)
    >>> make_schedule(192, 10, adaptive=True).max_steps
    40
    >>> make_schedule(None, 10) is None
    True
    """
    if block_size is None:
        if adaptive:
            raise EGPSError("the adaptive schedule needs a block size (--block-size)")
        return None
    if adaptive:
        return EntropyAdaptiveSchedule(block_size, steps_per_block, max_steps=4 * steps_per_block)
    return BlockSchedule(block_size, steps_per_block)
