"""Scalable Power Sampling batched across units (problem, seed): every row draws from its own random stream, so a
unit's record does not depend on the batch, equals the unit run on its own problem's target, and each problem of a
plate is sampled from its own π."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from egps_ppl.errors import EGPSError
from egps_ppl.infer import ScalablePowerSampler, load_sampler
from egps_ppl.infer.batched import Unit, row_seed, run_units, supports_batching
from egps_ppl.models import registry
from egps_ppl.models.testbeds import random_markov
from egps_ppl.rng import Streams
from egps_ppl.target import PowerDistribution
from egps_ppl.testing import distance_to_target

DEVICE = os.environ.get("EGPS_TEST_DEVICE", "cpu")
tiny_gpt2 = functools.partial(registry.tiny_gpt2, device=DEVICE)

PROMPTS = [(), (2,), (3, 1), (1,)]
MODEL = random_markov(4, seed=1, eos_token_id=0, concentration=2.0)
VARIANTS = {
    "token": {"top_k": 3, "rollouts": 3, "horizon": 3},
    "block": {"top_k": 3, "rollouts": 2, "horizon": 2, "block_size": 2, "num_candidates": 5},
}


def _units(prompts, seeds) -> list[Unit]:
    return [Unit((i, s), list(p), 1000 * i + s) for i, p in enumerate(prompts) for s in seeds]


def _outputs(sampler, lm, units, max_units, max_new_tokens=6, alpha=2.0):
    outs = {o.key: o.result for o in run_units(sampler, lm, units, alpha, max_new_tokens, max_units=max_units)}
    assert sorted(outs) == sorted(u.key for u in units)
    return outs


def _alone(sampler, lm, unit: Unit, max_new_tokens=6, alpha=2.0):
    """The unit run on the single-prompt target of its problem, with the streams the batched path gives it."""
    target = PowerDistribution(lm, unit.prompt, alpha, max_new_tokens)
    n = sampler.n
    rows = target.empty(n).with_(stream=torch.arange(n))
    (result,) = sampler.run_populations(target, rows, Streams([row_seed(unit.seed, r) for r in range(n)]))
    return result


def _assert_same(a, b, logp_atol: float = 0.0) -> None:
    assert torch.equal(a.samples.tokens, b.samples.tokens) and torch.equal(a.samples.length, b.samples.length)
    torch.testing.assert_close(a.samples.logp, b.samples.logp, atol=logp_atol, rtol=0)
    assert a.chosen == b.chosen
    assert torch.equal(a.cost.decode_tokens, b.cost.decode_tokens)


def test_sps_is_batched():
    assert supports_batching(load_sampler("sps")) and supports_batching(load_sampler("sps", block_size=4))


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_unit_records_do_not_depend_on_how_many_units_share_the_batch(variant):
    sampler = ScalablePowerSampler(n=2, **VARIANTS[variant])
    units = _units(PROMPTS, seeds=[0, 1, 2])
    alone = _outputs(sampler, MODEL, units, max_units=1)
    for max_units in (2, 4, 12):
        together = _outputs(sampler, MODEL, units, max_units=max_units)
        for key, out in alone.items():
            other = together[key]
            _assert_same(out, other)
            assert torch.equal(out.cost.scored_tokens, other.cost.scored_tokens)
            assert out.extra == other.extra, key  # steps, candidate mass / distinct blocks: per unit
    # Different seeds of one problem give different draws (the streams differ).
    draws = {tuple(alone[(1, s)].samples.tokens.flatten().tolist()) for s in (0, 1, 2)}
    assert len(draws) > 1


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_units_in_a_mixed_batch_equal_single_problem_runs(variant):
    sampler = ScalablePowerSampler(n=2, **VARIANTS[variant])
    units = _units(PROMPTS, seeds=[3, 4])
    together = _outputs(sampler, MODEL, units, max_units=5)
    for unit in units:
        single = _alone(sampler, MODEL, unit)
        _assert_same(single, together[unit.key])
        assert single.extra == together[unit.key].extra


def test_units_join_as_others_finish():
    """With room for two units, six units of different lengths all finish; refilling does not change a record."""
    sampler = ScalablePowerSampler(n=1, **VARIANTS["token"])
    lm = random_markov(4, seed=7, eos_token_id=0, concentration=0.3)  # uneven lengths
    units = _units(PROMPTS[:3], seeds=[0, 1])
    order = [o.key for o in run_units(sampler, lm, units, 2.0, 8, max_units=2)]
    assert sorted(order) == sorted(u.key for u in units)
    refilled = _outputs(sampler, lm, units, max_units=2, max_new_tokens=8)
    for unit in units:
        _assert_same(_alone(sampler, lm, unit, max_new_tokens=8), refilled[unit.key])


def test_each_problem_of_a_plate_is_sampled_from_its_own_pi():
    """K = V, full horizon, M = 16 with the jackknife: each problem's draws in one shared batch pass a chi-square
    test against that problem's exact π (and not against another problem's)."""
    target = PowerDistribution(MODEL, [list(p) for p in PROMPTS], alpha=2.0, max_new_tokens=3)
    n = 1500
    sampler = ScalablePowerSampler(top_k=4, rollouts=16, horizon=None, n=n)
    results = sampler.run_populations(target, target.empty(n), torch.Generator().manual_seed(0))
    assert len(results) == len(PROMPTS)
    for k, result in enumerate(results):
        assert result.samples.problem.tolist() == [k] * n
        report = distance_to_target(target.problem_target(k), result.samples)
        assert report.p_value > 1e-3 and report.tv < 3 * report.tv_noise, (k, report)
    wrong = distance_to_target(target.problem_target(2), results[0].samples)
    assert wrong.p_value < 1e-6


def test_batched_units_on_a_transformers_model_match_across_batch_sizes():
    model = tiny_gpt2(dtype="float64")
    prompts = [model.encode(t) for t in ("The cat", "A much longer prompt than that", "x y")]
    units = _units(prompts, seeds=[0, 1])
    for variant in ("token", "block"):
        sampler = ScalablePowerSampler(n=2, **VARIANTS[variant])
        alone = _outputs(sampler, model, units, max_units=1)
        for max_units in (2, 6):
            together = _outputs(sampler, model, units, max_units=max_units)
            for key, out in alone.items():
                _assert_same(out, together[key], logp_atol=1e-9)
        # Each unit equals its run on the single-prompt target of its problem.
        for unit in units[::2]:
            _assert_same(_alone(sampler, model, unit), alone[unit.key], logp_atol=1e-9)


def test_bad_populations():
    sampler = ScalablePowerSampler(top_k=2, rollouts=2, n=2)
    target = PowerDistribution(MODEL, [list(p) for p in PROMPTS], alpha=2.0, max_new_tokens=3)
    with pytest.raises(EGPSError, match="populations of 2"):
        sampler.run_populations(target, target.rows_for([0, 0, 1]))
    with pytest.raises(EGPSError, match="single-prompt target"):
        sampler.run(target)
    with pytest.raises(EGPSError, match="max_populations"):
        next(sampler.iter_populations(target, [target.rows_for([0, 0])], max_populations=0))
    with pytest.raises(EGPSError, match="has 2 rows"):
        next(sampler.iter_populations(target, [target.rows_for([0])]))
