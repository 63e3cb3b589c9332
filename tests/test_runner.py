"""The batched MCMC runner: recording, thinning, seeds, block-wise growth, hooks and bad input."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from egps_ppl.errors import EGPSError
from egps_ppl.infer import MCMC, BlockSchedule
from egps_ppl.kernels import MetropolisHastings
from egps_ppl.models.exact import ExactPower
from egps_ppl.models.testbeds import random_markov
from egps_ppl.target import PowerDistribution
from egps_ppl.testing import distance_to_target


@pytest.fixture
def target() -> PowerDistribution:
    return PowerDistribution(random_markov(4, seed=2, eos_token_id=0), [], alpha=3.0, max_new_tokens=6)


def test_shapes_and_contract(target):
    mcmc = MCMC(MetropolisHastings(target), num_samples=7, warmup_steps=3, num_chains=5, thin=2, seed=1).run()
    samples, stats = mcmc.get_samples(), mcmc.get_sample_stats()
    assert samples["tokens"].shape == (5, 7, 6) and samples["tokens"].dtype == np.int64
    assert samples["length"].shape == samples["log_p"].shape == (5, 7)
    for name in ("lp", "acceptance_rate", "is_accepted", "cut_position", "decode_tokens", "scored_tokens"):
        assert stats[name].shape == (5, 7), name
    # Padding is -1 exactly past each length, and lp = alpha * log_p.
    positions = np.arange(6)[None, None, :]
    assert ((samples["tokens"] == -1) == (positions >= samples["length"][..., None])).all()
    np.testing.assert_allclose(stats["lp"], 3.0 * samples["log_p"])
    # Thinned draws carry the cost of both steps they cover; totals add up.
    total = mcmc.total_cost()
    assert int(total.decode_tokens.sum()) == int(stats["decode_tokens"].sum()) + int(
        mcmc.warmup_cost.decode_tokens.sum()
    )


def test_recorded_log_p_matches_exact(target):
    mcmc = MCMC(MetropolisHastings(target), num_samples=3, num_chains=50, seed=0).run()
    samples = mcmc.get_samples()
    exact = ExactPower(target.lm, 1.0, target.max_new_tokens)  # alpha = 1: log pi = log p
    flat_tokens = torch.as_tensor(samples["tokens"].reshape(-1, 6))
    flat_length = torch.as_tensor(samples["length"].reshape(-1))
    np.testing.assert_allclose(exact.log_prob(flat_tokens, flat_length).numpy(), samples["log_p"].reshape(-1))


def test_same_seed_same_draws_different_seed_different(target):
    def draws(seed):
        return MCMC(MetropolisHastings(target), num_samples=5, num_chains=8, seed=seed).run().get_samples()["tokens"]

    assert np.array_equal(draws(3), draws(3))
    assert not np.array_equal(draws(3), draws(4))


def test_long_run_matches_exact_distribution(target):
    """After warmup from low-temperature samples (TV ~0.8 at the start) the chains are close to pi."""
    mcmc = MCMC(MetropolisHastings(target), num_samples=1, warmup_steps=150, num_chains=10_000, seed=5).run()
    assert distance_to_target(target, mcmc.state).tv < 0.03


def test_initial_completions_and_errors(target):
    mcmc = MCMC(MetropolisHastings(target), num_samples=1, num_chains=2, seed=0)
    mcmc.run([[1, 2, 0], [3, 3, 3, 3, 3, 3]])
    assert mcmc.state.num_rows == 2
    with pytest.raises(EGPSError, match="initial completions"):
        MCMC(MetropolisHastings(target), num_samples=1, num_chains=3).run([[1, 0]])
    with pytest.raises(EGPSError, match="unknown token ids"):
        MCMC(MetropolisHastings(target), num_samples=1, num_chains=1).run([[1, 9]])
    with pytest.raises(EGPSError, match="max_new_tokens"):
        MCMC(MetropolisHastings(target), num_samples=1, num_chains=1).run([[1] * 7])
    with pytest.raises(EGPSError, match="EOS before"):
        MCMC(MetropolisHastings(target), num_samples=1, num_chains=1).run([[1, 0, 2]])
    for bad in ({"num_samples": 0}, {"num_samples": 1, "num_chains": 0}, {"num_samples": 1, "warmup_steps": -1}):
        with pytest.raises(EGPSError):
            MCMC(MetropolisHastings(target), **bad)
    with pytest.raises(EGPSError, match="run"):
        MCMC(MetropolisHastings(target), num_samples=1).get_samples()


def test_block_schedule_grows_and_reaches_target():
    lm = random_markov(4, seed=7, eos_token_id=0, concentration=3.0)
    target = PowerDistribution(lm, [], alpha=2.0, max_new_tokens=6)
    seen_limits = []
    hook = lambda phase, step, state, info: seen_limits.append((phase, state.limit))  # noqa: E731
    mcmc = MCMC(
        MetropolisHastings(target),
        num_samples=1,
        warmup_steps=20,
        num_chains=20_000,
        seed=2,
        schedule=BlockSchedule(block_size=2, steps_per_block=3),
        hooks=[hook],
    ).run()
    block_limits = [limit for phase, limit in seen_limits if phase == "block"]
    assert block_limits[:3] == [2, 2, 2] and block_limits[3:6] == [4, 4, 4]
    assert mcmc.state.limit == 6
    assert distance_to_target(target, mcmc.state).tv < 0.03


def test_block_schedule_stops_early_when_all_chains_end():
    lm = random_markov(3, seed=1, eos_token_id=0)
    always_eos = lm.transition.clone()
    always_eos[:, 0] = 1.0
    always_eos[:, 1:] = 0.0
    from egps_ppl.models.markov import MarkovLM

    ending = MarkovLM(lm.initial.tolist(), always_eos.tolist(), eos_token_id=0)
    target = PowerDistribution(ending, [], alpha=2.0, max_new_tokens=50)
    calls = []
    mcmc = MCMC(
        MetropolisHastings(target),
        num_samples=1,
        num_chains=4,
        seed=0,
        schedule=BlockSchedule(block_size=5, steps_per_block=2),
        hooks=[lambda *a: calls.append(a[0])],
    ).run()
    assert calls.count("block") == 2  # one block only: every chain ended inside it
    assert mcmc.state.limit == 50


def test_adaptive_schedule_spends_moves_where_entropy_is():
    from collections import Counter

    from egps_ppl.infer import EntropyAdaptiveSchedule
    from egps_ppl.kernels.presets import build_kernel
    from egps_ppl.models.testbeds import sparse_decision

    testbed = sparse_decision(num_decisions=2, run_length=6, seed=0)
    target = PowerDistribution(testbed.model, [], alpha=4.0, max_new_tokens=testbed.max_new_tokens)
    schedule = EntropyAdaptiveSchedule(block_size=3, steps_per_block=2, epsilon=0.05, moves_per_nat=2.0, max_steps=8)
    per_block: Counter[int] = Counter()
    masses = {}

    def hook(phase, step, state, info):
        if phase == "block":
            per_block[state.limit] += 1

    mcmc = MCMC(build_kernel("egps", target), num_samples=1, num_chains=200, seed=0, schedule=schedule, hooks=[hook])
    mcmc.run()
    # Recompute each block's entropy mass on the final chains: deterministic blocks got no steps.
    state = mcmc.state
    for limit in range(3, testbed.max_new_tokens + 3, 3):
        block = (state.positions() >= limit - 3) & (state.positions() < limit) & state.valid_mask()
        masses[min(limit, testbed.max_new_tokens)] = (state.entropy * block).sum(1).mean().item()
    zero_blocks = [limit for limit, mass in masses.items() if mass < 1e-9]
    busy_blocks = [limit for limit, mass in masses.items() if mass > 0.5]
    assert zero_blocks and busy_blocks
    assert all(per_block[limit] == 0 for limit in zero_blocks)
    assert all(per_block[limit] > 0 for limit in busy_blocks)
    assert sum(per_block.values()) < 2 * len(masses)  # fewer moves than the constant schedule


def test_every_kernel_starts_from_the_same_low_temperature_sample():
    """Without ``initial``, chains start from q ∝ p^α whatever the kernel proposes with, so kernels compare
    from one start; ``init_policy`` overrides it."""
    from egps_ppl.kernels.presets import build_kernel
    from egps_ppl.models.policy import PowerPolicy

    target = PowerDistribution(random_markov(5, seed=3), [], alpha=4.0, max_new_tokens=8)
    starts = {}
    for name in ("mh", "egps"):
        mcmc = MCMC(build_kernel(name, target), num_samples=1, num_chains=16, seed=4)
        starts[name] = mcmc._initial_state(None, torch.Generator().manual_seed(4))[0].tokens
    expected, _ = target.sample_proposal(16, torch.Generator().manual_seed(4))
    assert torch.equal(starts["mh"], expected.tokens) and torch.equal(starts["egps"], expected.tokens)
    plain = MCMC(build_kernel("egps", target), num_samples=1, num_chains=16, seed=4, init_policy=PowerPolicy(1.0))
    tokens = plain._initial_state(None, torch.Generator().manual_seed(4))[0].tokens
    expected_plain, _ = target.sample_proposal(16, torch.Generator().manual_seed(4), PowerPolicy(1.0))
    assert torch.equal(tokens, expected_plain.tokens)
