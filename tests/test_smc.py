"""Power-SMC against exact answers: resampling schemes, weights, convergence, evidence, the KV cache under take."""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch

from egps_ppl.errors import EGPSError
from egps_ppl.infer.samplers import Sampler
from egps_ppl.infer.smc import RESAMPLING_SCHEMES, PowerSMC, effective_sample_size, resample
from egps_ppl.models.exact import ExactPower
from egps_ppl.models.markov import MarkovLM
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.target import PowerDistribution
from egps_ppl.testing import distance_to_target, pearson_test

ALPHA, T = 2.0, 5


def limit_heavy_model() -> MarkovLM:
    """V = 4, EOS = 0 and rare: under p^2 with T = 5 about 27% of the mass ends at the limit without EOS, and
    the final-token marginal is spread over all tokens (0.74, 0.19, 0.06, 0.015): a hard, informative case."""
    initial = [0.1, 0.5, 0.25, 0.15]
    transition = [[0.25] * 4, [0.1, 0.6, 0.2, 0.1], [0.15, 0.15, 0.5, 0.2], [0.3, 0.3, 0.1, 0.3]]
    return MarkovLM(initial, transition, eos_token_id=0)


@pytest.fixture(scope="module")
def target() -> PowerDistribution:
    return PowerDistribution(limit_heavy_model(), prompt=[], alpha=ALPHA, max_new_tokens=T)


@pytest.fixture(scope="module")
def exact() -> ExactPower:
    return ExactPower(limit_heavy_model(), ALPHA, T)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_close(actual: torch.Tensor, expected: torch.Tensor, atol: float = 1e-12) -> None:
    """Equal ``-inf`` entries and finite entries within ``atol`` (a first assert_close call from torch costs
    seconds of imports)."""
    assert torch.equal(torch.isneginf(actual), torch.isneginf(expected))
    finite = ~torch.isneginf(expected)
    diff = (actual[finite] - expected[finite]).abs().max().item()
    assert diff <= atol, f"differs by {diff}"


def last_tokens(result) -> torch.Tensor:
    s = result.samples
    return s.tokens.gather(1, (s.length - 1).unsqueeze(1)).squeeze(1)


def weighted_final_marginal(result, vocab: int) -> torch.Tensor:
    return torch.zeros(vocab, dtype=torch.float64).index_add(0, last_tokens(result), result.weights())


# ------------------------------------------------------------------------------------------------ resample
WEIGHTS = torch.tensor([0.31, 0.0, 0.07, 0.12, 0.005, 0.245, 0.25, 0.0])


def offspring_counts(scheme: str, reps: int, seed: int) -> torch.Tensor:
    """``[reps, N]`` number of copies of each particle in ``reps`` independent resamplings."""
    g = gen(seed)
    log_w = WEIGHTS.double().log() + 3.0  # unnormalised, with zero weights
    n = WEIGHTS.numel()
    rows = [torch.bincount(resample(log_w, g, scheme), minlength=n) for _ in range(reps)]
    return torch.stack(rows).double()


@pytest.mark.parametrize("scheme", RESAMPLING_SCHEMES)
def test_resample_is_unbiased(scheme: str) -> None:
    reps = 2000
    counts = offspring_counts(scheme, reps, seed=11)
    n = WEIGHTS.numel()
    assert (counts.sum(1) == n).all()
    expected = n * WEIGHTS.double()
    assert (counts[:, WEIGHTS == 0] == 0).all(), "a zero-weight particle was drawn"
    # E[copies_i] = N w_i: a z-test per particle with the multinomial variance N w (1 - w), an upper bound for
    # all three schemes.
    se = torch.sqrt(n * WEIGHTS.double() * (1 - WEIGHTS.double()) / reps)
    positive = WEIGHTS > 0
    z = ((counts.mean(0) - expected) / se)[positive]
    assert z.abs().max() < 4.5, f"{scheme}: offspring means {counts.mean(0)} vs {expected}"


def test_systematic_has_lower_variance_than_multinomial() -> None:
    systematic = offspring_counts("systematic", 1000, seed=3)
    residual = offspring_counts("residual", 1000, seed=4)
    multinomial = offspring_counts("multinomial", 1000, seed=5)
    expected = WEIGHTS.numel() * WEIGHTS.double()
    # Systematic: floor(N w) or floor(N w) + 1 copies, never anything else.
    assert ((systematic >= expected.floor()) & (systematic <= expected.floor() + 1)).all()
    var_sys, var_res, var_mult = (c.var(0).sum().item() for c in (systematic, residual, multinomial))
    assert var_sys < 0.5 * var_mult
    assert var_res < var_mult


def test_resample_edge_cases() -> None:
    # One particle with all the weight: every scheme returns only it.
    log_w = torch.tensor([-math.inf, 0.0, -math.inf])
    for scheme in RESAMPLING_SCHEMES:
        assert resample(log_w, gen(0), scheme).tolist() == [1, 1, 1]
    # Huge log-weights are fine (normalised in log space); num chooses the output size.
    index = resample(torch.tensor([1000.0, 1000.0]), gen(0), "multinomial", num=5)
    assert index.shape == (5,) and index.dtype == torch.long
    # Equal weights: systematic keeps every particle once.
    assert resample(torch.zeros(6), gen(1), "systematic").tolist() == list(range(6))
    assert effective_sample_size(torch.zeros(6)) == pytest.approx(6.0)
    assert effective_sample_size(torch.tensor([0.0, -math.inf])) == pytest.approx(1.0)


@pytest.mark.parametrize(
    ("log_w", "scheme", "message"),
    [
        (torch.zeros(3), "stratified", "unknown resampling scheme"),
        (torch.full((3,), -math.inf), "systematic", "all log_weights are -inf"),
        (torch.tensor([0.0, math.nan]), "systematic", "NaN"),
        (torch.tensor([0.0, math.inf]), "residual", r"\+inf"),
        (torch.zeros(0), "multinomial", "non-empty"),
        (torch.zeros(2, 2), "multinomial", "1-D"),
    ],
)
def test_resample_errors(log_w: torch.Tensor, scheme: str, message: str) -> None:
    with pytest.raises(EGPSError, match=message):
        resample(log_w, gen(0), scheme)


# ------------------------------------------------------------------------------------------------ weights
@pytest.mark.parametrize("bridge", [0, 2, 400])
def test_weights_without_resampling_are_exact_importance_weights(target: PowerDistribution, bridge: int) -> None:
    """With no resampling, the telescoped weight of every particle is α log p(x) − log q(x), whether it ends
    before, inside or after the bridge (the finishing catch-up), and the evidence is their log-mean."""
    smc = PowerSMC(num_particles=200, bridge_tokens=bridge, ess_threshold=1e-9, check_every=1)
    result = smc.run(target, gen(7))
    s = result.samples
    assert result.extra["resample_count"] == 0
    assert bool(s.complete().all())
    log_w = ALPHA * s.log_p() - s.total("logq")
    assert_close(result.log_weights, log_w - torch.logsumexp(log_w, 0))
    assert result.log_evidence == pytest.approx(float(torch.logsumexp(log_w, 0)) - math.log(200), abs=1e-12)
    # Lengths vary (some hit the limit without EOS), and each slot's cost is its own particle's tokens.
    assert s.length.min() < T and (s.length == T).any()
    assert torch.equal(result.cost.decode_tokens, s.length)
    assert result.cost.forward_calls == result.extra["steps"] == int(s.length.max())


def test_result_bookkeeping_with_resampling(target: PowerDistribution) -> None:
    result = PowerSMC(num_particles=64, bridge_tokens=3, ess_threshold=1.0, check_every=1).run(target, gen(1))
    assert isinstance(result.log_weights, torch.Tensor) and result.log_weights.shape == (64,)
    assert float(torch.logsumexp(result.log_weights, 0)) == pytest.approx(0.0, abs=1e-12)
    assert 0 <= result.chosen < 64
    assert result.extra["resample_count"] >= 1
    assert result.extra["resample_count"] == len(result.extra["resample_steps"])
    assert len(result.extra["ess_history"]) <= result.extra["steps"] + 1
    json.dumps(result.extra)
    # Costs accumulate per slot: the total is every token ever decoded, at least the surviving tokens.
    assert int(result.cost.decode_tokens.sum()) >= int(result.samples.length.sum())
    assert result.cost.decode_tokens.shape == (64,)
    # Same generator state, same result.
    again = PowerSMC(num_particles=64, bridge_tokens=3, ess_threshold=1.0, check_every=1).run(target, gen(1))
    assert torch.equal(again.samples.tokens, result.samples.tokens)
    assert torch.equal(again.log_weights, result.log_weights) and again.chosen == result.chosen


def test_is_a_sampler_with_json_config() -> None:
    smc = PowerSMC()
    assert isinstance(smc, Sampler) and smc.name == "smc"
    config = smc.config()
    assert config["num_particles"] == 64 and config["bridge_tokens"] == 400 and config["ess_threshold"] == 0.5
    assert config["check_every"] == 64 and config["resampling"] == "systematic" and config["proposal"] is None
    assert json.loads(json.dumps(PowerSMC(proposal=PowerPolicy(1.5, top_k=3)).config()))["proposal"]
    assert PowerSMC(bridge_tokens=4).alpha_at(torch.arange(7), 3.0).tolist() == [1.0, 1.5, 2.0, 2.5, 3.0, 3.0, 3.0]
    assert PowerSMC(bridge_tokens=0).alpha_at(torch.arange(3), 3.0).tolist() == [1.0, 3.0, 3.0]


# ------------------------------------------------------------------------------------------------ convergence
# (bridge_tokens, ess_threshold, resampling, smallest N): every scheme, with resampling inside the bridge
# (threshold 1 resamples at every token), after it, and a bridge longer than T (only the finishing catch-up
# brings particles to p^α; the weights are more variable, so it starts at a larger N).
CONVERGENCE = [
    (0, 0.5, "systematic", 64),
    (3, 1.0, "residual", 64),
    (400, 0.5, "multinomial", 256),
]


@pytest.mark.parametrize(("bridge", "threshold", "scheme", "n0"), CONVERGENCE)
def test_estimates_converge_like_one_over_sqrt_n(
    target: PowerDistribution, exact: ExactPower, bridge: int, threshold: float, scheme: str, n0: int
) -> None:
    """RMSE over replicates of the weighted final-token marginal and of log Ẑ shrinks ~4x from N to 16N."""
    truth, log_z = exact.final_token_marginal(), exact.log_normalizer
    reps = 40
    rmse = {}
    for n in (n0, 16 * n0):
        smc = PowerSMC(n, bridge_tokens=bridge, ess_threshold=threshold, check_every=1, resampling=scheme)
        marg, evid = 0.0, 0.0
        for r in range(reps):
            result = smc.run(target, gen(1_000 * n + r))
            marg += float(((weighted_final_marginal(result, 4) - truth) ** 2).sum())
            evid += (result.log_evidence - log_z) ** 2
        rmse[n] = (math.sqrt(marg / reps), math.sqrt(evid / reps))
    ratio_marg = rmse[n0][0] / rmse[16 * n0][0]
    ratio_evid = rmse[n0][1] / rmse[16 * n0][1]
    assert 2.5 < ratio_marg < 8.0, rmse
    assert 2.5 < ratio_evid < 8.0, rmse
    assert rmse[16 * n0][0] < 0.08 and rmse[16 * n0][1] < 0.2, rmse


SMALL_N_CONFIGS = {
    "no-bridge": (0, 0.5, "systematic"),
    "bridge-3": (3, 1.0, "residual"),
    "bridge-400": (400, 0.5, "multinomial"),
}


@functools.cache
def small_n_runs(config: str, runs: int = 200) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``runs`` independent 16-particle runs: (log Ẑ [R], weighted final-token marginals [R, V], the chosen
    particle's final token [R])."""
    bridge, threshold, scheme = SMALL_N_CONFIGS[config]
    target = PowerDistribution(limit_heavy_model(), prompt=[], alpha=ALPHA, max_new_tokens=T)
    smc = PowerSMC(16, bridge_tokens=bridge, ess_threshold=threshold, check_every=1, resampling=scheme)
    log_z, marginals, chosen = [], [], []
    for r in range(runs):
        result = smc.run(target, gen(50_000 + r))
        log_z.append(result.log_evidence)
        marginals.append(weighted_final_marginal(result, 4))
        chosen.append(last_tokens(result)[result.chosen])
    return torch.tensor(log_z, dtype=torch.float64), torch.stack(marginals), torch.stack(chosen)


@pytest.mark.parametrize("config", sorted(SMALL_N_CONFIGS))
def test_evidence_is_unbiased(exact: ExactPower, config: str) -> None:
    """E[Ẑ] = Z at any N (with or without the bridge): the mean of Ẑ / Z over 200 runs of 16 particles is 1
    within 4.5 standard errors (log Ẑ itself is biased low by about Var(log Ẑ) / 2, so compare in exp space)."""
    log_z, _, _ = small_n_runs(config)
    ratios = torch.exp(log_z - exact.log_normalizer)
    mean, se = ratios.mean().item(), ratios.std().item() / math.sqrt(ratios.numel())
    assert abs(mean - 1.0) < 4.5 * se + 1e-3, (mean, se)
    assert se < 0.1  # the test has power: a 30% bias would fail it


@pytest.mark.parametrize("config", sorted(SMALL_N_CONFIGS))
def test_chosen_particle_is_drawn_in_proportion_to_weight(config: str) -> None:
    """Given the population, the output particle is drawn ∝ weight: the count of runs whose chosen particle ends
    in ``v`` minus the sum of the runs' weighted marginals of ``v`` is a martingale with variance
    Σ_r W_r(v) (1 − W_r(v)); a z-test per token, exact at any N (no finite-N SMC bias enters)."""
    _, marginals, chosen = small_n_runs(config)
    observed = torch.nn.functional.one_hot(chosen, 4).double().sum(0)
    expected = marginals.sum(0)
    sd = (marginals * (1 - marginals)).sum(0).sqrt()
    z = (observed - expected) / sd.clamp(min=1e-12)
    assert z.abs().max() < 4.5, (observed, expected)


def test_chosen_draws_follow_pi(target: PowerDistribution, exact: ExactPower) -> None:
    """End to end: the chosen completions of 300 runs with 256 particles pass a chi-square test against the
    exact π, on the final token and on whole sequences. (A single SMC draw is biased by O(1/N): measured here
    P(final = EOS) = 0.624 / 0.710 / 0.732 at N = 16 / 64 / 256 against the exact 0.739, so N must be large
    compared with the 300-draw noise of about 0.025.)"""
    smc = PowerSMC(256, bridge_tokens=3, check_every=1)
    results = [smc.run(target, gen(90_000 + r)) for r in range(300)]
    tokens = torch.stack([r.samples.tokens[r.chosen] for r in results])
    length = torch.stack([r.samples.length[r.chosen] for r in results])
    seqs = target.empty(len(results)).with_(tokens=tokens, length=length)
    last = tokens.gather(1, (length - 1).unsqueeze(1)).squeeze(1)
    _, _, p_value = pearson_test(torch.bincount(last, minlength=4), exact.final_token_marginal())
    assert p_value > 1e-3
    report = distance_to_target(target, seqs)
    assert report.p_value > 1e-3, report


# ------------------------------------------------------------------------------------------------ log_factor
def last_token_factor(seqs) -> torch.Tensor:
    """Forbid completions ending in token 3; favour longer ones by 0.3 nats a token."""
    last = seqs.tokens.gather(1, (seqs.length - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
    return torch.where(last == 3, -math.inf, 0.3 * seqs.length.double())


def test_log_factor_is_applied_when_a_particle_finishes(exact: ExactPower) -> None:
    target = PowerDistribution(limit_heavy_model(), [], ALPHA, T, log_factor=last_token_factor)
    completions, log_pi = exact.enumerate()
    tokens = torch.full((len(completions), T), -1, dtype=torch.long)
    for i, c in enumerate(completions):
        tokens[i, : len(c)] = torch.tensor(c)
    length = torch.tensor([len(c) for c in completions])
    support = target.empty(len(completions)).with_(tokens=tokens, length=length)
    # Exact tilted normaliser: Σ_x p(x)^α exp(f(x)) = Z · Σ_x π(x) exp(f(x)).
    log_z = exact.log_normalizer + float(torch.logsumexp(log_pi + last_token_factor(support), 0))
    # No resampling: every weight is α log p + f − log q exactly.
    result = PowerSMC(300, bridge_tokens=2, ess_threshold=1e-9, check_every=1).run(target, gen(3))
    s = result.samples
    log_w = ALPHA * s.log_p() + last_token_factor(s) - s.total("logq")
    assert torch.isneginf(log_w).any() and not torch.isneginf(log_w).all()
    assert_close(result.log_weights, log_w - torch.logsumexp(log_w, 0))
    assert result.weights()[last_tokens(result) == 3].sum() == 0
    # With resampling, the evidence estimate approaches the tilted normaliser.
    big = PowerSMC(4096, bridge_tokens=2, ess_threshold=0.5, check_every=1).run(target, gen(4))
    assert big.log_evidence == pytest.approx(log_z, abs=0.1)


def test_all_particles_forbidden_is_a_clear_error() -> None:
    target = PowerDistribution(
        limit_heavy_model(), [], ALPHA, T, log_factor=lambda s: torch.full((s.num_rows,), -math.inf)
    )
    with pytest.raises(EGPSError, match="every particle has zero weight"):
        PowerSMC(8).run(target, gen(0))


# ------------------------------------------------------------------------------------------------ errors
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_particles": 0}, "num_particles"),
        ({"num_particles": -3}, "num_particles"),
        ({"num_particles": 2.5}, "num_particles"),
        ({"num_particles": True}, "num_particles"),
        ({"bridge_tokens": -1}, "bridge_tokens"),
        ({"bridge_tokens": 1.5}, "bridge_tokens"),
        ({"ess_threshold": 0.0}, "ess_threshold"),
        ({"ess_threshold": 1.5}, "ess_threshold"),
        ({"ess_threshold": -0.2}, "ess_threshold"),
        ({"ess_threshold": math.nan}, "ess_threshold"),
        ({"ess_threshold": "half"}, "ess_threshold"),
        ({"check_every": 0}, "check_every"),
        ({"resampling": "stratified"}, "unknown resampling scheme"),
        ({"proposal": 4.0}, "proposal must be a PowerPolicy"),
    ],
)
def test_bad_parameters_raise(kwargs: dict, message: str) -> None:
    with pytest.raises(EGPSError, match=message):
        PowerSMC(**kwargs)


# ------------------------------------------------------------------------------------------------ HF backend
def test_kv_cache_follows_resampled_particles_on_tiny_gpt2() -> None:
    """With resampling at every check (threshold 1), every particle's stored statistics equal a from-scratch
    rescoring, and each step fed exactly one token per particle (scored == decoded): the KV cache rows moved
    with the resampled particles, so nothing was recomputed."""
    pytest.importorskip("transformers")
    from egps_ppl.models.registry import load_model

    lm = load_model("tiny-gpt2", dtype="float64")
    target = PowerDistribution(lm, "The cat", alpha=2.0, max_new_tokens=24)
    result = PowerSMC(8, bridge_tokens=8, ess_threshold=1.0, check_every=2).run(target, gen(0))
    assert result.extra["resample_count"] >= 5
    s = result.samples
    fresh, _ = lm.score(s.with_(cache=None), torch.zeros_like(s.length))
    assert torch.equal(fresh.tokens, s.tokens)
    for stat in ("logp", "logq", "entropy", "logz"):
        diff = (getattr(fresh, stat) - getattr(s, stat)).abs().max().item()
        assert diff < 1e-6, f"{stat} differs by {diff}"
    assert torch.equal(result.cost.scored_tokens, result.cost.decode_tokens)
    assert result.cost.forward_calls == result.extra["steps"]
