"""The simple samplers against exact probabilities: plain draws p, low temperature is not π ∝ p^α."""

from __future__ import annotations

import math

import pytest
import torch

from egps_ppl.infer.samplers import (
    SAMPLERS,
    BestOfNSampler,
    LowTempSampler,
    PlainSampler,
    Sampler,
    available_samplers,
    load_sampler,
)
from egps_ppl.models.exact import ExactPower
from egps_ppl.models.testbeds import branch_probabilities, random_markov, sparse_decision
from egps_ppl.target import PowerDistribution
from egps_ppl.testing import pearson_test

DRAWS = 6000


def _counts(samples, completions: list[tuple[int, ...]]) -> torch.Tensor:
    index = {c: i for i, c in enumerate(completions)}
    counts = torch.zeros(len(completions), dtype=torch.long)
    for row in range(samples.num_rows):
        counts[index[tuple(samples.row_tokens(row))]] += 1
    return counts


def test_plain_draws_the_base_model_exactly():
    lm = random_markov(3, seed=2, eos_token_id=0)
    target = PowerDistribution(lm, [], alpha=4.0, max_new_tokens=4)
    completions, log_probs = ExactPower(lm, 1.0, 4).enumerate()
    probs = log_probs.exp()
    assert probs.sum().item() == pytest.approx(1.0)
    drawn = PlainSampler(n=DRAWS).run(target, torch.Generator().manual_seed(0))
    _, _, p_value = pearson_test(_counts(drawn.samples, completions), probs)
    assert p_value > 1e-4
    # ... and not π: the same draws are far from p^α.
    _, log_power = ExactPower(lm, 4.0, 4).enumerate()
    assert pearson_test(_counts(drawn.samples, completions), log_power.exp())[2] < 1e-12


def test_low_temperature_is_not_the_power_distribution():
    """On a decision whose likely branch leads into a spread-out future, π prefers the unlikely branch and
    token-level low temperature the likely one: the sampler matches the closed form for q, not π."""
    sd = sparse_decision(1, 2)
    alpha = 4.0
    exact = branch_probabilities(0.7, 4, 2, alpha)
    assert exact.power > 0.9 and exact.tempered < 0.05  # the test bed separates them
    target = PowerDistribution(sd.model, [], alpha, sd.max_new_tokens)
    drawn = LowTempSampler(n=DRAWS).run(target, torch.Generator().manual_seed(1))
    took = (drawn.samples.tokens == sd.unlikely_tokens[0]).any(1).double()
    rate = float(took.mean())
    se = math.sqrt(exact.tempered * (1 - exact.tempered) / DRAWS)
    assert abs(rate - exact.tempered) < 4 * se
    assert ExactPower(sd.model, alpha, sd.max_new_tokens).expected_visits(sd.unlikely_tokens[0]) == pytest.approx(
        exact.power, rel=1e-9
    )
    assert exact.power - rate > 0.8


def test_best_of_n_outputs_the_highest_log_p_and_unweighted_rows():
    lm = random_markov(4, seed=3)
    target = PowerDistribution(lm, [], alpha=2.0, max_new_tokens=5)
    result = BestOfNSampler(16).run(target, torch.Generator().manual_seed(2))
    log_p = result.samples.log_p()
    assert result.chosen == int(torch.argmax(log_p)) and result.samples.num_rows == 16
    assert torch.allclose(result.weights(), torch.full((16,), 1 / 16, dtype=torch.float64))
    assert result.log_weights is None and result.log_evidence is None


@pytest.mark.parametrize("sampler", [PlainSampler(), LowTempSampler(2), BestOfNSampler(3)])
def test_protocol_seeds_and_costs(sampler):
    assert isinstance(sampler, Sampler) and sampler.config()["name"] == sampler.name
    target = PowerDistribution(random_markov(4, seed=5), [], alpha=3.0, max_new_tokens=6)
    first = sampler.run(target, torch.Generator().manual_seed(9))
    again = sampler.run(target, torch.Generator().manual_seed(9))
    assert torch.equal(first.samples.tokens, again.samples.tokens) and first.chosen == again.chosen
    # Every token of every row was decoded once, one after another.
    assert torch.equal(first.cost.decode_tokens, first.samples.length)


def test_bad_settings_are_clear_errors():
    from egps_ppl.errors import EGPSError

    with pytest.raises(EGPSError, match="n must be"):
        BestOfNSampler(0)
    with pytest.raises(EGPSError, match="n must be"):
        PlainSampler(n=-1)


def test_pearson_test_refuses_log_probabilities():
    from egps_ppl.errors import EGPSError

    with pytest.raises(EGPSError, match="needs probabilities"):
        pearson_test(torch.tensor([5, 5]), torch.tensor([-0.7, -0.7]))


def test_samplers_by_name():
    """One registry: the built-in names, kernel specs as MCMC, settings each sampler takes, clear errors."""
    from egps_ppl.errors import EGPSError
    from egps_ppl.infer import MCMCSampler, PowerSMC, ScalablePowerSampler

    assert set(available_samplers()) == set(SAMPLERS) >= {"plain", "low-temp", "best-of-n", "smc", "sps", "egps"}
    assert isinstance(load_sampler("plain", n=5, steps=2), PlainSampler)  # n is best-of-n's, steps MCMC's
    assert load_sampler("best-of-n", n=5).n == 5
    assert load_sampler("smc", particles=7, ess_every=3).config()["check_every"] == 3
    sps = load_sampler("sps", top_k=3, rollouts=2, horizon=None, block_size=4, n=9)
    assert isinstance(sps, ScalablePowerSampler) and sps.block_size == 4 and sps.n == 1 and sps.horizon is None
    assert isinstance(load_sampler("smc"), PowerSMC)
    mixture = load_sampler("mixture(mh:0.7, egps:0.3)", steps=2, num_chains=3)
    assert isinstance(mixture, MCMCSampler) and mixture.name == "mixture(mh:0.7,egps:0.3)"
    assert mixture.num_chains == 3
    for spec, message in (("greedy", "unknown method 'greedy'"), ("cycle(mh,bogus)", "unknown kernel")):
        with pytest.raises(EGPSError, match=message):
            load_sampler(spec)
    with pytest.raises(EGPSError, match="unknown sampler setting"):
        load_sampler("plain", particle=3)
    with pytest.raises(EGPSError, match="adaptive schedule needs a block size"):
        load_sampler("mh", adaptive=True)
