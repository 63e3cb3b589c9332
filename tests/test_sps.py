"""Scalable Power Sampling against exact next-token conditionals and exact π on small Markov models.

The truth: for a Markov model the future factor ζ(h v) = Σ_y p(y | h v)^α depends only on v and the number of
tokens left, so the exact next-token conditional π(v | h) ∝ p(v | h)^α ζ(h v) follows from enumerating the
futures (checked once against :class:`ExactPower`'s brute-force π).
"""

from __future__ import annotations

import functools
import itertools
import math

import pytest
import torch

from egps_ppl.errors import EGPSError
from egps_ppl.infer import ScalablePowerSampler, power_conditional, rollout_log_weights
from egps_ppl.infer.samplers import Sampler
from egps_ppl.infer.sps import next_token_logprobs
from egps_ppl.models.base import LanguageModel
from egps_ppl.models.exact import ExactPower, enumerate_completions
from egps_ppl.models.markov import MarkovLM
from egps_ppl.models.testbeds import random_markov
from egps_ppl.target import PowerDistribution
from egps_ppl.testing import distance_to_target, pearson_test


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ---------------------------------------------------------------------------------------------- exact truth
def log_zeta(lm: MarkovLM, alpha: float, token: int, remaining: int, horizon: int | None = None) -> float:
    """log Σ_y p(y | token)^α over the futures after ``token`` with ``remaining`` tokens allowed, each cut at
    ``horizon`` tokens (the truncated future a rollout of that horizon sees); 0 after EOS or with no room."""
    if token == lm.eos_token_id or remaining == 0:
        return 0.0
    steps = remaining if horizon is None else min(horizon, remaining)
    _, log_p = enumerate_completions(lm, steps, prompt=(token,))
    return float(torch.logsumexp(alpha * log_p, 0))


def exact_conditional(
    lm: MarkovLM, alpha: float, max_new_tokens: int, prompt: tuple[int, ...], prefix: tuple[int, ...], horizon=None
) -> torch.Tensor:
    """``float64[V]``: π(v | prompt, prefix) ∝ p(v | h)^α ζ(h v) (with ζ truncated at ``horizon`` if given)."""
    history = prompt + prefix
    state = history[-1] if history else lm.vocab_size
    log_p = lm.log_table[state].to(torch.float64)
    remaining = max_new_tokens - len(prefix) - 1
    zeta = torch.tensor([log_zeta(lm, alpha, v, remaining, horizon) for v in range(lm.vocab_size)], dtype=torch.float64)
    return torch.softmax(alpha * log_p + zeta, 0)


def restricted_pi(lm: MarkovLM, alpha: float, max_new_tokens: int, top_k: int) -> tuple[list, torch.Tensor]:
    """The law of the token-level sampler with exact ζ and only the top-``top_k`` tokens of p(· | h) as
    candidates: at every step π(· | h) restricted to those tokens and renormalised. Returns the completions of
    ExactPower's support and their probabilities under it."""
    support, _ = ExactPower(lm, alpha, max_new_tokens).enumerate()

    @functools.cache
    def step(prefix: tuple[int, ...]) -> torch.Tensor:
        cond = exact_conditional(lm, alpha, max_new_tokens, (), prefix)
        state = prefix[-1] if prefix else lm.vocab_size
        keep = torch.zeros_like(cond, dtype=torch.bool)
        keep[lm.log_table[state].topk(top_k).indices] = True
        cond = torch.where(keep, cond, torch.zeros_like(cond))
        return cond / cond.sum()

    probs = [math.prod(float(step(x[:t])[x[t]]) for t in range(len(x))) for x in support]
    return support, torch.tensor(probs, dtype=torch.float64)


def tv(a: torch.Tensor, b: torch.Tensor) -> float:
    return 0.5 * float((a - b).abs().sum())


@pytest.fixture(scope="module")
def model() -> MarkovLM:
    return random_markov(4, 3, eos_token_id=0)


def test_exact_conditional_helper_matches_exact_power(model):
    """The helper's π(v | h) equals the ratio of brute-force π masses of the completions extending h v and h."""
    alpha, T = 3.0, 4
    support, log_pi = ExactPower(model, alpha, T).enumerate()
    pi = log_pi.exp()
    for prefix in [(), (1,), (2, 3), (3, 3, 1)]:
        mass = torch.zeros(model.vocab_size, dtype=torch.float64)
        for x, p in zip(support, pi, strict=True):
            if len(x) > len(prefix) and x[: len(prefix)] == prefix:
                mass[x[len(prefix)]] += p
        torch.testing.assert_close(exact_conditional(model, alpha, T, (), prefix), mass / mass.sum())


# ---------------------------------------------------------------------------------------------- the estimator
@pytest.mark.parametrize("jackknife", [False, True])
def test_power_conditional_matches_exact_conditional(model, jackknife):
    """K = V, full horizon, M = 4000: π̂ is within 0.02 TV of the exact next-token conditional of p^α."""
    alpha, T, prompt = 3.0, 5, (2,)
    target = PowerDistribution(model, list(prompt), alpha, T)
    prefixes = [(), (1,), (3, 1)]
    seqs, _ = target.from_completions([[1, 1], [1, 1], [3, 1]])
    seqs = seqs.truncated(torch.tensor([len(p) for p in prefixes]))  # row 0: the empty prefix
    V = model.vocab_size
    candidates = torch.arange(V).expand(len(prefixes), V)
    log_w, cost = rollout_log_weights(target, seqs, candidates, 4000, None, gen(0))
    assert log_w.shape == (3, V, 4000) and log_w.dtype == torch.float64
    assert cost.decode_tokens.shape == (3,) and int(cost.decode_tokens.min()) > 0
    logp, _, _ = next_token_logprobs(model, seqs)
    estimate = power_conditional(logp, log_w, alpha, jackknife).exp()
    torch.testing.assert_close(estimate.sum(1), torch.ones(3, dtype=torch.float64))
    for row, prefix in enumerate(prefixes):
        truth = exact_conditional(model, alpha, T, prompt, prefix)
        assert tv(estimate[row], truth) < 0.02, (prefix, estimate[row], truth)


def test_short_horizon_estimates_the_truncated_future(model):
    """Horizon H: π̂ converges to p^α·ζ_H (futures cut at H tokens), which differs from the exact conditional."""
    alpha, T, H = 3.0, 5, 1
    target = PowerDistribution(model, [], alpha, T)
    V = model.vocab_size
    log_w, _ = rollout_log_weights(target, target.empty(1), torch.arange(V).unsqueeze(0), 4000, H, gen(1))
    estimate = power_conditional(model.log_table[V].unsqueeze(0), log_w, alpha).exp()[0]
    truncated = exact_conditional(model, alpha, T, (), (), horizon=H)
    exact = exact_conditional(model, alpha, T, (), ())
    assert tv(estimate, truncated) < 0.02
    assert tv(truncated, exact) > 0.1  # the truncation is a real approximation here


@pytest.mark.parametrize(
    ("seed", "alpha", "concentration", "rollouts"),
    [(5, 2.0, 3.0, 2), (5, 2.0, 3.0, 3), (5, 2.0, 3.0, 4), (2, 4.0, 2.0, 2), (1, 2.0, 1.0, 16)],
)
def test_jackknife_reduces_the_bias(seed, alpha, concentration, rollouts):
    """Averaged over 20 000 replicates, |E[π̂_jk] − π| is well below |E[π̂] − π| (the 1/M term is removed).

    The last case has heavy-tailed weights: there the expansion in 1/M only holds from M ≈ 8 on (at M = 2–4
    the correction overshoots, measured), so it is checked at M = 16."""
    lm = random_markov(4, seed, eos_token_id=0, concentration=concentration)
    T, R, V = 4, 20_000, 4
    target = PowerDistribution(lm, [], alpha, T)
    truth = exact_conditional(lm, alpha, T, (), ())
    candidates = torch.arange(V).expand(R, V)
    log_w, _ = rollout_log_weights(target, target.empty(R), candidates, rollouts, None, gen(seed))
    log_p = lm.log_table[V].expand(R, V)
    plain = power_conditional(log_p, log_w, alpha, jackknife=False).exp()
    jack = power_conditional(log_p, log_w, alpha, jackknife=True).exp()
    bias_plain = float((plain.mean(0) - truth).abs().sum())
    bias_jack = float((jack.mean(0) - truth).abs().sum())
    noise = float((jack.std(0) / math.sqrt(R)).sum())
    assert bias_plain > 5 * noise  # the plain bias is resolved by this many replicates
    assert bias_jack < 0.35 * bias_plain, (bias_jack, bias_plain, noise)


def test_power_conditional_edge_cases():
    log_p = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    log_w = torch.randn(1, 3, 1, dtype=torch.float64, generator=gen(0))
    # M = 1: nothing to leave out, the jackknife is the plain estimate; zero-probability candidates get 0.
    torch.testing.assert_close(power_conditional(log_p, log_w, 2.0, True), power_conditional(log_p, log_w, 2.0, False))
    assert power_conditional(log_p, log_w, 2.0).exp()[0, 2] == 0
    # Equal weights: the estimate is the token-level power p^α normalised, jackknife or not.
    flat = torch.zeros(1, 3, 5, dtype=torch.float64)
    expected = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(power_conditional(log_p, flat, 3.0), expected)
    # A huge dynamic range in the weights: the plain estimate stays exact in log space; the jackknife (computed
    # on probabilities) underflows to 0 for a negligible candidate but never gives NaN.
    wild = torch.tensor([[[0.0, -800.0], [-900.0, -1e4], [0.0, 0.0]]], dtype=torch.float64)
    plain = power_conditional(log_p, wild, 4.0, jackknife=False)
    assert float(plain[0, 1] - plain[0, 0]) == pytest.approx(-900.0)
    jack = power_conditional(log_p, wild, 4.0)
    assert not torch.isnan(jack).any() and float(jack.exp().sum()) == pytest.approx(1.0)


def test_rollout_weights_are_zero_without_a_future(model):
    alpha, T = 2.0, 3
    target = PowerDistribution(model, [], alpha, T)
    seqs, _ = target.from_completions([[1, 2], [3]])  # row 0 has one slot left, row 1 two
    candidates = torch.tensor([[0, 1], [0, 2]])  # EOS first
    log_w, cost = rollout_log_weights(target, seqs, candidates, 5, None, gen(0))
    assert (log_w[0] == 0).all()  # the candidate fills the last allowed position
    assert (log_w[1, 0] == 0).all() and (log_w[1, 1] < 0).all()  # EOS: empty future; token 2: one more token
    assert cost.decode_tokens.tolist() == [0, 5]


# ---------------------------------------------------------------------------------------------- the sampler
def test_sampler_with_all_candidates_draws_from_pi(model):
    """K = V, full horizon, M = 32 with the jackknife: 4000 complete draws pass a chi-square test against π."""
    target = PowerDistribution(model, [], 3.0, 4)
    sampler = ScalablePowerSampler(top_k=4, rollouts=32, horizon=None, n=4000)
    result = sampler.run(target, gen(0))
    report = distance_to_target(target, result.samples)
    assert report.p_value > 1e-3, report
    assert report.tv < 3 * report.tv_noise, report
    assert result.extra["mean_candidate_mass"] == pytest.approx(1.0)


def test_top_k_restriction_is_the_documented_approximation():
    """With K < V the sampler draws from π restricted at every step to the top-K tokens of p (renormalised):
    chi-square against that law passes, against π it fails, and the exact TV to π grows as K drops."""
    model = random_markov(4, 2, eos_token_id=0)
    alpha, T = 2.0, 4
    target = PowerDistribution(model, [], alpha, T)
    support, log_pi = ExactPower(model, alpha, T).enumerate()
    pi = log_pi.exp()
    gaps = []
    for k in range(1, 5):
        _, restricted = restricted_pi(model, alpha, T, k)
        gaps.append(tv(restricted, pi))
    assert gaps[-1] == pytest.approx(0.0, abs=1e-12)
    assert all(a > b for a, b in itertools.pairwise(gaps)), gaps
    assert gaps[1] > 0.2  # measured: TV(π_K, π) = 0.88, 0.28, 0.14, 0 for K = 1..4

    result = ScalablePowerSampler(top_k=2, rollouts=32, horizon=None, n=3000).run(target, gen(1))
    index = {x: i for i, x in enumerate(support)}
    counts = torch.zeros(len(support), dtype=torch.float64)
    for row in range(result.samples.num_rows):
        counts[index[tuple(result.samples.row_tokens(row))]] += 1
    _, restricted = restricted_pi(model, alpha, T, 2)
    assert pearson_test(counts, restricted)[2] > 1e-3
    assert pearson_test(counts, pi)[2] < 1e-6
    assert result.extra["mean_candidate_mass"] < 0.9


def test_block_variant_draws_from_pi_when_candidates_cover_all_blocks():
    """B = 2, L = 64 draws at temperature 1/α from a flat model: every block is found, so the output is π; with
    K = 2 kept blocks it is not."""
    lm = random_markov(3, 3, eos_token_id=0, concentration=5.0)
    target = PowerDistribution(lm, [], 2.0, 4)
    full = ScalablePowerSampler(top_k=16, rollouts=16, horizon=None, block_size=2, num_candidates=64, n=3000)
    report = distance_to_target(target, full.run(target, gen(0)).samples)
    assert report.p_value > 1e-3 and report.tv < 3 * report.tv_noise, report
    few = ScalablePowerSampler(top_k=2, rollouts=16, horizon=None, block_size=2, num_candidates=64, n=3000)
    assert distance_to_target(target, few.run(target, gen(0)).samples).p_value < 1e-6


@pytest.mark.parametrize("block_size", [None, 2])
def test_result_statistics_cost_and_reproducibility(model, block_size):
    target = PowerDistribution(model, [1], 4.0, 6)
    sampler = ScalablePowerSampler(top_k=3, rollouts=4, horizon=3, block_size=block_size)
    assert isinstance(sampler, Sampler) and sampler.name == "sps"
    result = sampler.run(target, gen(5))
    seqs = result.samples
    assert seqs.num_rows == 1 and result.chosen == 0 and bool(seqs.complete()[0])
    assert seqs.policy == target.default_policy()
    rescored, _ = model.score(seqs, torch.zeros_like(seqs.length))
    for name in ("logp", "logq", "entropy", "logz"):
        torch.testing.assert_close(getattr(seqs, name), getattr(rescored, name))
    assert int(result.cost.decode_tokens[0]) == result.extra["rollout_decode_tokens"] > 0
    assert result.extra["variant"] == ("token" if block_size is None else "block")
    again = sampler.run(target, gen(5))
    assert torch.equal(again.samples.tokens, seqs.tokens)
    assert sampler.config()["block_size"] == block_size


class _OpaqueBackend(LanguageModel):
    """A backend that only samples and scores (no access to full next-token distributions)."""

    def __init__(self, inner: MarkovLM) -> None:
        self.inner, self.vocab_size, self.eos_token_id = inner, inner.vocab_size, inner.eos_token_id

    def extend(self, seqs, start, stop=None, generator=None):
        return self.inner.extend(seqs, start, stop, generator)

    def score(self, seqs, start):
        return self.inner.score(seqs, start)


def test_block_variant_needs_only_the_protocol(model):
    target = PowerDistribution(_OpaqueBackend(model), [], 2.0, 4)
    result = ScalablePowerSampler(top_k=2, rollouts=2, block_size=2, n=3).run(target, gen(0))
    assert bool(result.samples.complete().all())
    with pytest.raises(EGPSError, match="next-token distributions"):
        ScalablePowerSampler(top_k=2, rollouts=2).run(target, gen(0))


def test_token_level_on_a_transformers_backend():
    """The HF path reads p(· | h) from one cached forward pass; it agrees with a recompute from the prompt."""
    pytest.importorskip("transformers")
    from egps_ppl.models.registry import tiny_gpt2

    cached, plain = tiny_gpt2(dtype="float64"), tiny_gpt2(dtype="float64", reuse_cache=False)
    target = PowerDistribution(cached, [5, 6, 7], 4.0, 5)
    result = ScalablePowerSampler(top_k=3, rollouts=3, horizon=2, n=2).run(target, gen(0))
    seqs = result.samples
    assert bool(seqs.complete().all())
    rescored, _ = plain.score(seqs, torch.zeros_like(seqs.length))
    for name in ("logp", "logq", "entropy", "logz"):
        torch.testing.assert_close(getattr(seqs, name), getattr(rescored, name), atol=1e-9, rtol=0)
    prefixes = seqs.truncated(torch.tensor([2, 3]))
    a, cost, _ = next_token_logprobs(cached, target.lm.score(prefixes, torch.zeros(2, dtype=torch.long))[0])
    b, _, _ = next_token_logprobs(plain, prefixes)
    torch.testing.assert_close(a, b, atol=1e-9, rtol=0)
    assert a.shape == (2, cached.vocab_size) and cost.scored_tokens.tolist() == [1, 1]


# ---------------------------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"top_k": 0}, "top_k"),
        ({"rollouts": 0}, "rollouts"),
        ({"rollouts": 2.5}, "rollouts"),
        ({"horizon": 0}, "horizon"),
        ({"block_size": 0}, "block_size"),
        ({"num_candidates": 4}, "block variant"),
        ({"block_size": 2, "num_candidates": 0}, "num_candidates"),
        ({"jackknife": "yes"}, "jackknife"),
        ({"n": 0}, "n must"),
    ],
)
def test_bad_sampler_parameters(kwargs, match):
    with pytest.raises(EGPSError, match=match):
        ScalablePowerSampler(**kwargs)


def test_bad_targets_and_inputs(model):
    target = PowerDistribution(model, [], 2.0, 3)
    tilted = PowerDistribution(model, [], 2.0, 3, log_factor=lambda s: torch.zeros(s.num_rows))
    with pytest.raises(EGPSError, match="log_factor"):
        ScalablePowerSampler().run(tilted)
    with pytest.raises(EGPSError, match="PowerDistribution"):
        ScalablePowerSampler().run(model)  # type: ignore[arg-type]
    seqs = target.empty(2)
    good = torch.zeros(2, 3, dtype=torch.long)
    for bad, match in [
        (torch.zeros(3, 3, dtype=torch.long), r"\[R, K\]"),
        (torch.zeros(2, dtype=torch.long), r"\[R, K\]"),
        (torch.zeros(2, 0, dtype=torch.long), "at least one"),
        (torch.full((2, 3), 7), r"\[0, 4\)"),
        (torch.zeros(2, 3), "integer"),
    ]:
        with pytest.raises(EGPSError, match=match):
            rollout_log_weights(target, seqs, bad, 2, None)
    with pytest.raises(EGPSError, match="rollouts"):
        rollout_log_weights(target, seqs, good, 0, None)
    with pytest.raises(EGPSError, match="horizon"):
        rollout_log_weights(target, seqs, good, 2, -1)
    done, _ = target.from_completions([[1, 0], [1, 2, 3]])  # EOS, and at the limit
    with pytest.raises(EGPSError, match="grow"):
        rollout_log_weights(target, done, good, 2, None)
    log_p = torch.zeros(2, 3, dtype=torch.float64)
    with pytest.raises(EGPSError, match="log_weights"):
        power_conditional(log_p, torch.zeros(2, 4, 5), 2.0)
    with pytest.raises(EGPSError, match="NaN"):
        power_conditional(log_p, torch.full((2, 3, 2), math.nan), 2.0)
    with pytest.raises(EGPSError, match="probability 0"):
        power_conditional(torch.full((2, 3), -math.inf), torch.zeros(2, 3, 2), 2.0)
    with pytest.raises(EGPSError, match="alpha"):
        power_conditional(log_p, torch.zeros(2, 3, 2), 0.0)
