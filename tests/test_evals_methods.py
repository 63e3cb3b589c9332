"""Evaluation methods: thin adapters over the library with consistent cost counters (exact Markov models, fast)."""

from __future__ import annotations

import pytest
import torch

from egps_ppl.errors import EGPSError
from egps_ppl.evals.methods import (
    Method,
    MethodResult,
    SamplerMethod,
    available_methods,
    load_method,
)
from egps_ppl.infer.mcmc_sampler import MCMCSampler
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.models.testbeds import random_markov
from egps_ppl.target import PowerDistribution

T = 10
ALL = ("plain", "low-temp", "best-of-n", "smc", "sps", "mh", "entropy-mh", "mtm", "egps")


@pytest.fixture(scope="module")
def lm():
    return random_markov(6, seed=4, eos_token_id=0, concentration=0.5)


def _run(spec: str, lm, seed: int = 3, **kwargs) -> MethodResult:
    return load_method(spec, alpha=4.0, **{"steps": 3, "n": 4, **kwargs}).run(lm, [], T, seed)


@pytest.mark.parametrize("spec", ALL)
def test_every_method_runs_with_counters(lm, spec):
    method = load_method(spec, steps=3, n=4)
    assert isinstance(method, Method) and method.name == spec
    result = method.run(lm, [], T, 11)
    assert 1 <= len(result.completion_ids) <= T
    assert result.completion_text == lm.decode(result.completion_ids)
    assert result.decode_tokens >= len(result.completion_ids)
    assert result.scored_tokens >= 0 and result.forward_calls >= 1 and result.wall_s > 0
    assert isinstance(result.extra["log_p"], float)
    # Same seed, same completion; the config is JSON-like and names the method.
    again = method.run(lm, [], T, 11)
    assert again.completion_ids == result.completion_ids and again.decode_tokens == result.decode_tokens
    assert method.config()["name"] == spec


def _streamed(target, n, seed, policy):
    """``n`` rows sampled from ``policy`` with the per-row streams a method's unit of seed ``seed`` uses."""
    from egps_ppl.infer.batched import row_seed
    from egps_ppl.rng import Streams

    streams = Streams([row_seed(seed, r) for r in range(n)])
    rows = target.empty(n, policy).with_(stream=torch.arange(n))
    seqs, cost = target.lm.extend(rows, torch.zeros(n, dtype=torch.long), generator=streams)
    return seqs, cost, streams


def test_plain_and_low_temp_are_library_samples(lm):
    for spec, alpha in (("plain", 1.0), ("low-temp", 4.0)):
        result = _run(spec, lm, seed=5)
        target = PowerDistribution(lm, [], 4.0, T)
        seqs, cost, _ = _streamed(target, 1, 5, PowerPolicy(alpha))
        assert result.completion_ids == seqs.row_tokens(0)
        # One sequential sample: decode tokens = completion length.
        assert result.decode_tokens == len(result.completion_ids) == int(cost.decode_tokens.sum())
        assert result.extra["log_p"] == pytest.approx(float(seqs.log_p()[0]), abs=1e-4)


def test_plain_decode_tokens_equal_length_without_eos():
    lm = random_markov(5, seed=1, eos_token_id=0, concentration=50.0)  # near uniform: rarely EOS early
    for seed in range(5):
        result = _run("plain", lm, seed=seed)
        assert result.decode_tokens == len(result.completion_ids)


def test_best_of_n_sums_decode_tokens_and_keeps_max_log_p(lm):
    n = 6
    result = load_method("best-of-n", n=n).run(lm, [], T, 9)
    target = PowerDistribution(lm, [], 4.0, T)
    seqs, _, _ = _streamed(target, n, 9, PowerPolicy(1.0))
    assert result.decode_tokens == int(seqs.length.sum())  # the sum over the n samples
    best = int(torch.argmax(seqs.log_p()))
    assert result.completion_ids == seqs.row_tokens(best)
    assert result.extra["log_p"] == pytest.approx(max(result.extra["log_p_all"]), abs=1e-3)
    assert len(result.extra["log_p_all"]) == n


@pytest.mark.parametrize("spec", ["mh", "entropy-mh", "egps"])
def test_mcmc_costs_at_least_its_initial_sample(lm, spec):
    # Every MCMC method starts from the same low-temperature sample, drawn first from the same generator
    # (egps proposes at temperature 1 but starts where mh starts, so the two compare on equal footing).
    start = "low-temp"
    for seed in range(3):
        mcmc = _run(spec, lm, seed=seed, steps=4)
        init = _run(start, lm, seed=seed)
        assert mcmc.decode_tokens >= init.decode_tokens
        assert mcmc.forward_calls > init.forward_calls
        assert 0.0 <= mcmc.extra["final_acceptance_rate"] <= 1.0


def test_mcmc_more_steps_cost_more(lm):
    few, many = _run("mh", lm, steps=2), _run("mh", lm, steps=12)
    assert many.forward_calls > few.forward_calls
    assert many.decode_tokens + many.scored_tokens > few.decode_tokens + few.scored_tokens


def test_several_chains_pick_the_best_final_state(lm):
    for seed in range(4):
        best = _run("mh", lm, seed=seed, num_chains=4, select="best")
        first = _run("mh", lm, seed=seed, num_chains=4, select="first")
        assert first.extra["chosen_chain"] == 0
        assert best.extra["log_p"] >= first.extra["log_p"] - 1e-9
        assert best.decode_tokens == first.decode_tokens  # the same run, only the pick differs


def test_block_schedule_methods(lm):
    for adaptive in (False, True):
        result = _run("egps", lm, block_size=3, steps_per_block=2, adaptive=adaptive)
        assert 1 <= len(result.completion_ids) <= T
        assert result.forward_calls >= 1
    with pytest.raises(EGPSError, match="block size"):
        load_method("mh", adaptive=True)


def test_kernel_specs_are_methods(lm):
    method = load_method("cycle(mh,egps)", steps=2)
    assert isinstance(method, SamplerMethod) and isinstance(method.sampler, MCMCSampler)
    assert method.name == "cycle(mh,egps)"
    assert method.run(lm, [], T, 0).forward_calls >= 1
    with pytest.raises(EGPSError, match="unknown kernel"):
        load_method("cycle(mh,bogus)")


def test_unknown_methods_list_the_valid_ones():
    with pytest.raises(EGPSError) as err:
        load_method("greedy")
    message = str(err.value)
    assert all(name in message for name in available_methods())
    with pytest.raises(EGPSError, match="steps"):
        load_method("mh", steps=0)
    with pytest.raises(EGPSError, match="alpha"):
        load_method("plain", alpha=-1)
    with pytest.raises(EGPSError, match="n must be"):
        load_method("best-of-n", n=0)
    assert set(available_methods()) == set(ALL)
    assert all(isinstance(load_method(name), SamplerMethod) for name in ALL)  # one adapter for every method
    with pytest.raises(EGPSError, match="unknown sampler setting"):
        load_method("mh", stepz=3)


def test_smc_and_sps_are_library_samplers(lm):
    from egps_ppl.infer import PowerSMC, ScalablePowerSampler

    target = PowerDistribution(lm, [], 4.0, T)
    # sps and smc are batched across units, so each runs as one population of the batched path with per-row
    # streams (egps_ppl.infer.batched).
    from egps_ppl.infer.batched import row_seed
    from egps_ppl.rng import Streams

    sps = ScalablePowerSampler(top_k=3, rollouts=2, horizon=4)
    result = _run("sps", lm, seed=7, top_k=3, rollouts=2, horizon=4)
    (drawn,) = sps.run_populations(target, target.empty(1).with_(stream=torch.arange(1)), Streams([row_seed(7, 0)]))
    assert result.completion_ids == drawn.samples.row_tokens(drawn.chosen)
    assert result.decode_tokens == int(drawn.cost.decode_tokens.sum())
    result = _run("smc", lm, seed=7, particles=16)
    streams = Streams([row_seed(7, r) for r in range(16)])
    rows = target.empty(16).with_(stream=torch.arange(16))
    (drawn,) = PowerSMC(num_particles=16, check_every=64).run_populations(target, rows, streams)
    assert result.completion_ids == drawn.samples.row_tokens(drawn.chosen)
    assert result.decode_tokens == int(drawn.cost.decode_tokens.sum())
    smc = _run("smc", lm, particles=16)
    assert isinstance(smc.extra["log_evidence"], float) and len(smc.extra["log_p_all"]) == 16


def test_any_sampler_is_a_method(lm):
    """A user's own sampler (the Sampler protocol) evaluates like the built-in ones."""
    from egps_ppl.infer.samplers import LowTempSampler, SamplerResult

    class LastOfTwo:
        name = "last-of-two"

        def config(self):
            return {"name": self.name}

        def run(self, target, generator=None):
            drawn = LowTempSampler(n=2).run(target, generator)
            return SamplerResult(drawn.samples, 1, drawn.cost)

    method = SamplerMethod(LastOfTwo(), alpha=4.0)
    assert isinstance(method, Method) and method.config() == {"name": "last-of-two", "alpha": 4.0}
    result = method.run(lm, [], T, 5)
    seqs, _ = PowerDistribution(lm, [], 4.0, T).sample_proposal(2, torch.Generator().manual_seed(5))
    assert result.completion_ids == seqs.row_tokens(1) and result.extra["chosen"] == 1


def test_mcmc_method_records_match_the_mcmc_runner(lm):
    """The MCMC method is MCMCSampler behind SamplerMethod: the same run as MCMC(seed=unit seed), the same config
    keys as the run directories written before the change (so --resume accepts them), the same record fields."""
    from egps_ppl.infer import MCMC
    from egps_ppl.kernels.presets import build_kernel

    method = load_method("mh", steps=3)
    assert method.config() == {
        "name": "mh",
        "alpha": 4.0,
        "steps": 3,
        "num_chains": 1,
        "block_size": None,
        "steps_per_block": None,
        "adaptive": False,
        "select": "best",
    }
    result = method.run(lm, [], T, 21)
    target = PowerDistribution(lm, [], 4.0, T)
    kernel = build_kernel("mh", target)
    state, cost, streams = _streamed(target, 1, 21, target.default_policy())
    start = state
    for _ in range(3):  # the runner's chain, step by step, from the same streams
        state, info = kernel.step(state, streams)
        cost = cost + info.cost
    assert result.completion_ids == state.row_tokens(0)
    assert result.decode_tokens == int(cost.decode_tokens.sum())
    assert set(result.extra) == {"log_p", "chosen_chain", "final_acceptance_rate", "acceptance_rate",
                                 "start_completion_ids"}  # fmt: skip
    assert result.extra["start_completion_ids"] == start.row_tokens(0)
    # The library's MCMC runner (one shared generator) draws other chains but costs the same kind of work.
    mcmc = MCMC(kernel, num_samples=1, warmup_steps=2, num_chains=1, seed=21).run()
    assert mcmc.state.num_rows == 1


def test_mcmc_sampler_takes_the_generator_state():
    """A used generator gives another run than a fresh one of the same seed, and the same state the same run."""
    lm = random_markov(6, seed=4, eos_token_id=0, concentration=0.5)
    target = PowerDistribution(lm, [], 4.0, T)
    sampler = MCMCSampler("mh", steps=2, num_chains=8)
    fresh = sampler.run(target, torch.Generator().manual_seed(3))
    used = torch.Generator().manual_seed(3)
    torch.rand(1, generator=used)
    state = used.get_state()
    a = sampler.run(target, used)
    b = sampler.run(target, torch.Generator().set_state(state))
    assert torch.equal(a.samples.tokens, b.samples.tokens)
    assert not torch.equal(a.samples.tokens, fresh.samples.tokens)


def test_registered_samplers_are_methods(lm):
    from egps_ppl.infer.samplers import SAMPLERS, BestOfNSampler, register_sampler

    register_sampler("best-of-3", lambda n=3: BestOfNSampler(n), "three samples, highest log p")
    try:
        assert "best-of-3" in available_methods()
        method = load_method("best-of-3", steps=5)  # settings it does not take are left out
        assert method.config() == {"name": "best-of-n", "n": 3, "alpha": 4.0}
        assert load_method("best-of-3", n=2).sampler.n == 2
        assert len(method.run(lm, [], T, 0).extra["log_p_all"]) == 3
    finally:
        del SAMPLERS["best-of-3"]
