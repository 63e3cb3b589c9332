"""MCMC with a block-wise schedule batched across units: every row has its own length limit, so the rows of
different units grow their blocks independently, and a unit's record does not depend on the batch and equals its
schedule run alone (:meth:`~egps_ppl.infer.schedule.BlockSchedule.grow`, then the sampling steps)."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from egps_ppl.infer import load_sampler
from egps_ppl.infer.batched import Unit, concat, row_seed, run_units, supports_batching
from egps_ppl.kernels.presets import build_kernel
from egps_ppl.models import registry
from egps_ppl.models.testbeds import random_markov
from egps_ppl.rng import Streams
from egps_ppl.target import PowerDistribution

DEVICE = os.environ.get("EGPS_TEST_DEVICE", "cpu")
tiny_gpt2 = functools.partial(registry.tiny_gpt2, device=DEVICE)

PROMPTS = [(), (2,), (3, 1), (1,)]
MODEL = random_markov(4, seed=1, eos_token_id=0, concentration=2.0)
SETTINGS = {
    "mh": {"steps": 3, "num_chains": 2, "block_size": 2, "steps_per_block": 2},
    "egps": {"steps": 2, "num_chains": 3, "block_size": 3, "steps_per_block": 1},
    "mtm-adaptive": {"steps": 2, "num_chains": 2, "block_size": 2, "steps_per_block": 1, "adaptive": True},
}


def _sampler(name: str):
    return load_sampler(name.split("-")[0], **SETTINGS[name])


def _units(prompts, seeds) -> list[Unit]:
    return [Unit((i, s), list(p), 1000 * i + s) for i, p in enumerate(prompts) for s in seeds]


def _outputs(sampler, lm, units, max_units, max_new_tokens=7):
    outs = {o.key: o.result for o in run_units(sampler, lm, units, 2.0, max_new_tokens, max_units=max_units)}
    assert sorted(outs) == sorted(u.key for u in units)
    return outs


class _Streamed(PowerDistribution):
    """A single-prompt target whose fresh rows draw from streams 0..C-1 (for the schedule run alone)."""

    def empty(self, num_chains, policy=None, limit=None):
        return super().empty(num_chains, policy, limit).with_(stream=torch.arange(num_chains))


def _alone(sampler, lm, unit: Unit, max_new_tokens=7):
    """The unit's schedule run on its own problem's target, as MCMC.run runs it, with the batched path's streams."""
    target = _Streamed(lm, unit.prompt, 2.0, max_new_tokens)
    kernel = build_kernel(sampler.kernel, target)
    streams = Streams([row_seed(unit.seed, c) for c in range(sampler.num_chains)])
    state, _ = sampler.schedule().grow(kernel, sampler.num_chains, streams)
    for _ in range(sampler.steps):
        state, _ = kernel.step(state, streams)
    return state


def test_block_schedules_are_batched():
    assert supports_batching(load_sampler("mh", block_size=4))
    assert supports_batching(load_sampler("egps", block_size=4, adaptive=True))


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_unit_records_do_not_depend_on_how_many_units_share_the_batch(name):
    sampler = _sampler(name)
    units = _units(PROMPTS, seeds=[0, 1, 2])
    alone = _outputs(sampler, MODEL, units, max_units=1)
    for max_units in (2, 5, 12):
        together = _outputs(sampler, MODEL, units, max_units=max_units)
        for key, out in alone.items():
            other = together[key]
            assert torch.equal(out.samples.tokens, other.samples.tokens), key
            assert torch.equal(out.samples.logp, other.samples.logp), key
            assert out.chosen == other.chosen and out.extra == other.extra
            assert torch.equal(out.cost.decode_tokens, other.cost.decode_tokens)
            assert out.samples.limit == 7
    assert "start_completion_ids" not in alone[(0, 0)].extra


@pytest.mark.parametrize("name", sorted(SETTINGS))
def test_units_in_a_mixed_batch_equal_their_schedule_run_alone(name):
    sampler = _sampler(name)
    units = _units(PROMPTS, seeds=[5, 6])
    together = _outputs(sampler, MODEL, units, max_units=3)
    for unit in units:
        single = _alone(sampler, MODEL, unit)
        out = together[unit.key].samples
        assert torch.equal(single.tokens, out.tokens) and torch.equal(single.length, out.length), unit.key
        torch.testing.assert_close(single.logp, out.logp, atol=1e-12, rtol=0)


def test_batched_block_schedules_on_a_transformers_model():
    model = tiny_gpt2(dtype="float64")
    prompts = [model.encode(t) for t in ("The cat", "A much longer prompt than that", "x y")]
    units = _units(prompts, seeds=[0, 1])
    sampler = load_sampler("mtm", steps=2, num_chains=2, block_size=3, steps_per_block=1)
    alone = _outputs(sampler, model, units, max_units=1, max_new_tokens=8)
    together = _outputs(sampler, model, units, max_units=6, max_new_tokens=8)
    for key, out in alone.items():
        assert torch.equal(out.samples.tokens, together[key].samples.tokens), key
        torch.testing.assert_close(out.samples.logp, together[key].samples.logp, atol=1e-9, rtol=0)
    for unit in units[::2]:
        single = _alone(sampler, model, unit, max_new_tokens=8)
        assert torch.equal(single.tokens, alone[unit.key].samples.tokens), unit.key


def test_rows_keep_their_own_limits():
    target = PowerDistribution(MODEL, [list(p) for p in PROMPTS], alpha=2.0, max_new_tokens=6)
    short = target.rows_for([0, 1], limit=2)
    both = concat(short, target.rows_for([2]))
    assert both.limit_rows().tolist() == [2, 2, 6] and both.take(torch.tensor([2, 0])).limit.tolist() == [6, 2]
    grown, _ = MODEL.extend(both, torch.zeros(3, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert (grown.length <= torch.tensor([2, 2, 6])).all() and bool(grown.complete().all())
    kernel = build_kernel("mtm", target)
    stepped, _ = kernel.step(grown, torch.Generator().manual_seed(1))
    assert stepped.limit_rows().tolist() == [2, 2, 6] and (stepped.length <= torch.tensor([2, 2, 6])).all()
