"""Continuous batching: many (prompt, seed) units advance in one batch, and a finished unit's rows are refilled.

An evaluation is thousands of *units* (one problem, one seed), each a small sampler run: ``C`` MCMC chains for
``S`` steps, or ``n`` ancestral samples. Run one at a time, a unit keeps the model at batch ``C``; run together
they share every forward pass. :func:`run_units` keeps up to ``max_units`` units in flight over a target that is
a plate of their prompts: each kernel step moves every row of every unit, a unit that has done its steps leaves
the batch and the next unit's rows join it (after their own start sample), so no row waits for the slowest unit.

Every row draws from its own random stream (:class:`~egps_ppl.rng.Streams`) seeded from the unit's seed and its
chain index, so a unit's result does not depend on the batch: ``max_units = 1`` and ``max_units = 32`` give the
same records (exactly in float64; in float32 up to rare ties from batch-shape-dependent rounding).

Supported samplers (:func:`supports_batching`): :class:`~egps_ppl.infer.mcmc_sampler.MCMCSampler` (refilled as
units finish; with a block-wise schedule every row has its own length limit, ``Sequences.limit[C]``, so the units
in flight grow their blocks independently, each as :meth:`~egps_ppl.infer.schedule.BlockSchedule.grow` would
alone), :class:`~egps_ppl.infer.sps.ScalablePowerSampler` (each unit one population of ``n`` rows; every row grows
on its own, and a unit joins as soon as another has finished: ``ScalablePowerSampler.iter_populations``), the
policy samplers (:class:`~egps_ppl.infer.samplers.PlainSampler`, ``LowTempSampler``, ``BestOfNSampler``) and
:class:`~egps_ppl.infer.smc.PowerSMC` (each unit one population, resampled within itself; a group of units starts
together and runs to its end). A sampler of your own (only ``run(target, generator)``) is not batched; the
evaluation runner runs it one unit at a time.
"""

from __future__ import annotations

import hashlib
import time
from collections import deque
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from egps_ppl.errors import EGPSError, check_positive_int
from egps_ppl.infer.mcmc_sampler import MCMCSampler
from egps_ppl.infer.samplers import BestOfNSampler, PolicySampler, Sampler, SamplerResult
from egps_ppl.infer.schedule import BlockSchedule
from egps_ppl.infer.smc import PowerSMC
from egps_ppl.infer.sps import ScalablePowerSampler
from egps_ppl.kernels.presets import build_kernel
from egps_ppl.models.base import Cost, LanguageModel
from egps_ppl.rng import Streams
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

__all__ = ["Unit", "UnitOutput", "concat", "row_seed", "run_units", "supports_batching"]


@dataclass(frozen=True)
class Unit:
    """One sampler run to do: a prompt and a seed, with a caller's key to recognise the output.

    Attributes
    ----------
    key : object
        Anything hashable (e.g. ``(problem_id, seed)``); handed back with the output.
    prompt : list of int
        Prompt token ids.
    seed : int
        The unit's seed; row ``c`` of the unit draws from a stream seeded with :func:`row_seed` ``(seed, c)``.
    """

    key: Any
    prompt: list[int]
    seed: int


@dataclass
class UnitOutput:
    """What one unit produced.

    Attributes
    ----------
    key : object
        The unit's key.
    result : SamplerResult
        Its rows (``C`` chains or ``n`` samples), the chosen row, the cost per row (a row's share of every batched
        forward call it took part in is counted in ``forward_calls``) and ``extra`` (MCMC: ``chosen_chain``,
        ``final_acceptance_rate``, and without a block schedule ``start_completion_ids`` of the chosen chain).
    wall_s : float
        Seconds from the unit's start to its end (shared with the other units in flight).
    """

    key: Any
    result: SamplerResult
    wall_s: float


@dataclass
class _Active:
    unit: Unit
    rows: int
    started: float
    steps_done: int = 0
    decode: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    scored: torch.Tensor = field(default_factory=lambda: torch.zeros(0, dtype=torch.long))
    calls: int = 0
    accept: list[torch.Tensor] = field(default_factory=list)
    start: Sequences | None = None
    growth: _Growth | None = None


@dataclass
class _Growth:
    """Where a unit is in its block-wise schedule: its rows' current length limit, the start of the current block,
    the kernel steps left in the current phase (``None``: the block was just grown, its steps not yet decided),
    and whether the growth is over (the last ``steps`` kernel steps, at the full length)."""

    limit: int
    block_start: int = 0
    todo: int | None = None
    final: bool = False


def row_seed(seed: int, row: int) -> int:
    """The stream seed of row ``row`` of a unit seeded ``seed`` (31 bits of a hash of both).

    Examples
    --------
    >>> row_seed(7, 0) == row_seed(7, 0) != row_seed(7, 1)
    True
    """
    digest = hashlib.sha256(f"egps-row:{int(seed)}:{int(row)}".encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


def supports_batching(sampler: Sampler) -> bool:
    """Whether :func:`run_units` can batch ``sampler`` across units (see the module docstring).

    Examples
    --------
    >>> from egps_ppl.infer.samplers import load_sampler
    >>> supports_batching(load_sampler("sps")), supports_batching(load_sampler("mh", block_size=4))
    (True, True)
    """
    if isinstance(sampler, MCMCSampler):
        return True
    return isinstance(sampler, PolicySampler | PowerSMC | ScalablePowerSampler)


def concat(first: Sequences | None, second: Sequences) -> Sequences:
    """The rows of ``first`` followed by those of ``second`` (caches, prompts, problems, streams and limits
    included; see :meth:`~egps_ppl.state.Sequences.concat`).

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> target = PowerDistribution(random_markov(3, seed=0), [[1], [2]], alpha=2.0, max_new_tokens=3)
    >>> concat(target.rows_for([0]), target.rows_for([1, 1])).problem.tolist()
    [0, 1, 1]
    """
    if first is None or first.num_rows == 0:
        return second
    return first.concat(second)


def run_units(
    sampler: Sampler,
    lm: LanguageModel,
    units: Sequence[Unit],
    alpha: float,
    max_new_tokens: int,
    max_units: int = 8,
) -> Iterator[UnitOutput]:
    """Run every unit with ``sampler`` on π ∝ p(· | prompt)^α, up to ``max_units`` at a time in one batch.

    Parameters
    ----------
    sampler : Sampler
        A sampler for which :func:`supports_batching` is true.
    lm : LanguageModel
        The backend.
    units : sequence of Unit
        The work, started in order.
    alpha : float
        The power α.
    max_new_tokens : int
        Completion length limit.
    max_units : int
        Units in flight at once (the batch holds ``max_units`` × rows per unit).

    Yields
    ------
    UnitOutput
        One per unit, as soon as it finishes (not necessarily in input order).

    Raises
    ------
    EGPSError
        For a sampler that cannot be batched, or bad settings (before any model runs).
    """
    check_positive_int("max_units", max_units)
    if not supports_batching(sampler):
        raise EGPSError(f"sampler {sampler.name!r} cannot be batched across units; run it one unit at a time")
    units = list(units)
    if not units:
        return
    prompts = {tuple(u.prompt) for u in units}
    index = {p: i for i, p in enumerate(sorted(prompts))}
    target = PowerDistribution(lm, [list(p) for p in sorted(prompts)], alpha, max_new_tokens)
    if isinstance(sampler, MCMCSampler):
        yield from _run_mcmc(sampler, target, units, index, max_units)
    elif isinstance(sampler, PowerSMC):
        yield from _run_smc(sampler, target, units, index, max_units)
    elif isinstance(sampler, ScalablePowerSampler):
        yield from _run_sps(sampler, target, units, index, max_units)
    else:
        yield from _run_policy(sampler, target, units, index, max_units)


def _empty_rows(
    target: PowerDistribution, units: Iterable[Unit], index: dict, rows_per_unit: int, streams: Streams, policy: Any
) -> Sequences:
    """Empty rows of ``units`` (``rows_per_unit`` each, consecutive), each with its own stream."""
    problems, stream_ids = [], []
    for unit in units:
        for row in range(rows_per_unit):
            problems.append(index[tuple(unit.prompt)])
            stream_ids.append(streams.add(row_seed(unit.seed, row)))
    return target.rows_for(problems, policy).with_(stream=torch.tensor(stream_ids))


def _start_rows(
    target: PowerDistribution, units: Iterable[Unit], index: dict, rows_per_unit: int, streams: Streams, policy: Any
) -> tuple[Sequences, Cost]:
    """Fresh rows of ``units`` (``rows_per_unit`` each, own streams) sampled from ``policy``."""
    rows = _empty_rows(target, units, index, rows_per_unit, streams, policy)
    return target.lm.extend(rows, torch.zeros(rows.num_rows, dtype=torch.long), generator=streams)


def _run_smc(
    sampler: PowerSMC, target: PowerDistribution, units: list[Unit], index: dict, max_units: int
) -> Iterator[UnitOutput]:
    n = sampler.num_particles
    policy = sampler.proposal if sampler.proposal is not None else target.default_policy()
    for first in range(0, len(units), max_units):
        group = units[first : first + max_units]
        started = time.perf_counter()
        streams = Streams()
        rows = _empty_rows(target, group, index, n, streams, policy)
        results = sampler.run_populations(target, rows, streams)
        wall = time.perf_counter() - started
        for unit, result in zip(group, results, strict=True):
            result.samples = result.samples.with_(problem=None, stream=None, cache=None)
            yield UnitOutput(unit.key, result, wall)


def _run_sps(
    sampler: ScalablePowerSampler, target: PowerDistribution, units: list[Unit], index: dict, max_units: int
) -> Iterator[UnitOutput]:
    streams = Streams()
    started: dict[int, float] = {}

    def populations() -> Iterator[Sequences]:
        # Read lazily by the sampler as room frees up: a unit's clock and streams start when it joins.
        for number, unit in enumerate(units):
            started[number] = time.perf_counter()
            yield _empty_rows(target, [unit], index, sampler.n, streams, target.default_policy())

    for number, result in sampler.iter_populations(target, populations(), streams, max_populations=max_units):
        result.samples = result.samples.with_(problem=None, stream=None, cache=None)
        yield UnitOutput(units[number].key, result, time.perf_counter() - started[number])


def _run_policy(
    sampler: PolicySampler, target: PowerDistribution, units: list[Unit], index: dict, max_units: int
) -> Iterator[UnitOutput]:
    n = sampler.n
    policy = sampler.policy(target)
    for first in range(0, len(units), max_units):
        group = units[first : first + max_units]
        started = time.perf_counter()
        seqs, cost = _start_rows(target, group, index, n, Streams(), policy)
        wall = time.perf_counter() - started
        for j, unit in enumerate(group):
            rows = torch.arange(j * n, (j + 1) * n)
            mine = seqs.take(rows).with_(problem=None, stream=None, cache=None)
            chosen = int(torch.argmax(mine.log_p())) if isinstance(sampler, BestOfNSampler) else 0
            share = Cost(cost.decode_tokens[rows], cost.scored_tokens[rows], cost.forward_calls)
            yield UnitOutput(unit.key, SamplerResult(mine, chosen, share), wall)


def _run_mcmc(
    sampler: MCMCSampler, target: PowerDistribution, units: list[Unit], index: dict, max_units: int
) -> Iterator[UnitOutput]:
    kernel = build_kernel(sampler.kernel, target)
    schedule = sampler.schedule()
    chains, steps = sampler.num_chains, sampler.steps
    streams = Streams()
    pending: deque[Unit] = deque(units)
    active: list[_Active] = []
    state: Sequences | None = None
    while pending or active:
        if pending and len(active) < max_units:
            joining = [pending.popleft() for _ in range(min(max_units - len(active), len(pending)))]
            if schedule is None:
                fresh, cost = _start_rows(target, joining, index, chains, streams, target.default_policy())
                fresh, prep = kernel.prepare(fresh)
                cost = cost + prep
            else:
                fresh, cost = _first_blocks(schedule, target, joining, index, chains, streams, kernel.policy)
            now = time.perf_counter()
            for j, unit in enumerate(joining):
                rows = slice(j * chains, (j + 1) * chains)
                entry = _Active(unit, chains, now, decode=cost.decode_tokens[rows].cpu().clone())
                entry.scored, entry.calls = cost.scored_tokens[rows].cpu().clone(), cost.forward_calls
                if schedule is None:
                    entry.start = fresh.take(torch.arange(j * chains, (j + 1) * chains)).with_(cache=None)
                else:
                    entry.growth = _Growth(min(schedule.block_size, target.max_new_tokens))
                active.append(entry)
            state = concat(state, fresh)
        assert state is not None
        if schedule is not None:
            state = _grow_blocks(schedule, target, state, active, steps, streams)
        state, info = kernel.step(state, streams)
        offset, keep, done = 0, [], []
        for entry in active:
            rows = slice(offset, offset + entry.rows)
            entry.decode = entry.decode + info.decode_tokens[rows].cpu()
            entry.scored = entry.scored + info.scored_tokens[rows].cpu()
            entry.calls += info.forward_calls
            entry.steps_done += 1
            growth = entry.growth
            if growth is None:
                entry.accept.append(info.accept_prob[rows].cpu())
                finished = entry.steps_done >= steps
            else:
                assert growth.todo is not None
                growth.todo -= 1
                if growth.final:  # the acceptance rates of the sampling steps, as MCMC.run records them
                    entry.accept.append(info.accept_prob[rows].cpu())
                finished = growth.final and growth.todo == 0
            (done if finished else keep).append((entry, offset))
            offset += entry.rows
        for entry, at in done:
            mine = state.take(torch.arange(at, at + entry.rows))
            yield UnitOutput(entry.unit.key, _mcmc_result(sampler, target, entry, mine), _since(entry))
        if done:
            active = [entry for entry, _ in keep]
            survivors = [torch.arange(at, at + entry.rows) for entry, at in keep]
            state = state.take(torch.cat(survivors)) if survivors else None


def _first_blocks(
    schedule: BlockSchedule,
    target: PowerDistribution,
    units: list[Unit],
    index: dict,
    rows_per_unit: int,
    streams: Streams,
    policy: Any,
) -> tuple[Sequences, Cost]:
    """Rows of ``units`` grown to their first block: the length limit (one per row) is the first block's end."""
    rows = _empty_rows(target, units, index, rows_per_unit, streams, policy)
    limit = min(schedule.block_size, target.max_new_tokens)
    rows = rows.with_(limit=torch.full((rows.num_rows,), limit, dtype=torch.long, device=rows.device))
    return target.lm.extend(rows, torch.zeros(rows.num_rows, dtype=torch.long), generator=streams)


def _grow_blocks(
    schedule: BlockSchedule,
    target: PowerDistribution,
    state: Sequences,
    active: list[_Active],
    steps: int,
    streams: Streams,
) -> Sequences:
    """Bring every unit of a block-wise schedule to a phase with a kernel step left (what
    :meth:`~egps_ppl.infer.schedule.BlockSchedule.grow` then ``MCMC.run`` do, unit by unit).

    A unit whose block has no steps left moves on: to its last ``steps`` kernel steps at the full length when its
    limit is the full length or all its rows have ended in EOS, else to its next block (its rows' limit grows by
    ``block_size`` and the unfinished rows are extended to it; the units growing at once share one ``extend``
    call, each row drawing from its own stream). A new block's steps come from ``schedule.steps_for_block`` on
    the unit's rows (which may be 0: then the unit moves on again).
    """
    full = target.max_new_tokens
    while True:
        limits = state.limit_rows().clone()
        grow = torch.zeros(state.num_rows, dtype=torch.bool, device=state.device)
        growing: list[tuple[_Active, slice]] = []
        offset = 0
        for entry in active:
            rows, growth = slice(offset, offset + entry.rows), entry.growth
            offset += entry.rows
            if growth is None or growth.final:
                continue
            if growth.todo is None:
                mine = state.with_(cache=None).take(torch.arange(rows.start, rows.stop, device=state.device))
                growth.todo = schedule.steps_for_block(mine, growth.block_start)
            if growth.todo > 0:
                continue
            if growth.limit >= full or bool(state.finished()[rows].all()):
                growth.final, growth.todo, growth.limit = True, steps, full
            else:
                growth.block_start, growth.limit = growth.limit, min(growth.limit + schedule.block_size, full)
                growth.todo = None
                grow[rows] = True
                growing.append((entry, rows))
            limits[rows] = growth.limit
        state = state.with_(limit=limits)
        if not growing:
            return state
        state, cost = target.lm.extend(state, state.length, torch.where(grow, limits, state.length), streams)
        for entry, rows in growing:
            entry.decode = entry.decode + cost.decode_tokens[rows].cpu()
            entry.scored = entry.scored + cost.scored_tokens[rows].cpu()
            entry.calls += cost.forward_calls


def _mcmc_result(sampler: MCMCSampler, target: PowerDistribution, entry: _Active, mine: Sequences) -> SamplerResult:
    lp = target.log_prob(mine)
    row = int(torch.argmax(lp)) if sampler.select == "best" else 0
    accept = torch.stack(entry.accept)
    start = entry.start
    extra: dict[str, Any] = {
        "chosen_chain": row,
        "final_acceptance_rate": float(accept[-1].mean()),
        "acceptance_rate": float(accept.mean()),
    }
    if start is not None:  # a block-wise schedule has no single starting completion: its start grows
        extra["start_completion_ids"] = start.row_tokens(row)
    clean = mine.with_(problem=None, stream=None, cache=None, limit=target.max_new_tokens)
    return SamplerResult(clean, row, Cost(entry.decode, entry.scored, entry.calls), extra=extra)


def _since(entry: _Active) -> float:
    return time.perf_counter() - entry.started
