"""Exact power-distribution quantities (DP) against brute force, and the Markov testbed generators."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from egps_ppl.errors import EGPSError
from egps_ppl.models.exact import ExactPower, enumerate_completions
from egps_ppl.models.markov import MarkovLM
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.models.testbeds import (
    SparseDecisionModel,
    branch_probabilities,
    noisy_profile,
    random_markov,
    sparse_decision,
)
from egps_ppl.testing import pearson_test

# (vocab_size, seed, eos, max_new_tokens, prompt)
CASES = [
    (3, 0, 0, 4, ()),
    (3, 1, 2, 5, (1,)),
    (4, 2, 0, 4, ()),
    (4, 3, 1, 3, (0, 2)),
    (5, 4, 0, 3, ()),
    (5, 5, 4, 4, (3,)),
]
ALPHAS = [1.0, 2.0, 4.0]


def padded(completions: list[tuple[int, ...]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
    tokens = torch.full((len(completions), width), -1, dtype=torch.long)
    for i, seq in enumerate(completions):
        tokens[i, : len(seq)] = torch.tensor(seq)
    return tokens, torch.tensor([len(s) for s in completions])


def encode(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """One integer per row (PAD -> digit 0), to count sequences quickly."""
    base = vocab_size + 1
    weights = base ** torch.arange(tokens.shape[1], dtype=torch.long)
    return ((tokens + 1) * weights).sum(1)


def chi_square_pvalue(observed: torch.Tensor, expected_prob: torch.Tensor) -> float:
    """Pearson chi-square p-value, pooling cells with expected count < 5."""
    return pearson_test(observed, expected_prob)[2]


def tv_tolerance(prob: torch.Tensor, n: int, delta: float = 1e-6) -> float:
    """E[TV] <= ½ Σ sqrt(p(1-p)/n); TV has bounded differences 1/n, so McDiarmid adds sqrt(log(1/δ)/(2n))."""
    mean_bound = 0.5 * float(torch.sqrt(prob * (1 - prob) / n).sum())
    return mean_bound + math.sqrt(math.log(1 / delta) / (2 * n))


# ---------------------------------------------------------------------------------------------- brute force
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("vocab", "seed", "eos", "T", "prompt"), CASES)
def test_normalizer_and_log_prob_match_enumeration(vocab, seed, eos, T, prompt, alpha):
    model = random_markov(vocab, seed, eos_token_id=eos)
    exact = ExactPower(model, alpha, T, prompt)
    completions, log_p = enumerate_completions(model, T, prompt)
    # p is a distribution on the completion set.
    assert torch.logsumexp(log_p, 0).item() == pytest.approx(0.0, abs=1e-12)
    assert exact.log_normalizer == pytest.approx(torch.logsumexp(alpha * log_p, 0).item(), abs=1e-12)
    same, log_pi = exact.enumerate()
    assert same == completions
    tokens, length = padded(completions, T)
    torch.testing.assert_close(exact.log_prob(tokens, length), log_pi, atol=1e-12, rtol=0)
    # Wider padding changes nothing.
    wide = torch.cat([tokens, torch.full((len(completions), 2), -1)], 1)
    torch.testing.assert_close(exact.log_prob(wide, length), log_pi, atol=1e-12, rtol=0)


def test_enumeration_is_complete_and_valid():
    model = random_markov(3, 7, eos_token_id=1)
    completions, log_p = enumerate_completions(model, 3)
    assert len(set(completions)) == len(completions)
    for seq in completions:
        assert 1 <= len(seq) <= 3
        assert 1 not in seq[:-1]
        assert seq[-1] == 1 or len(seq) == 3
    # Dense rows: every such sequence has p > 0: 1 + 2 + 4 ending in EOS, plus 2^3 of length 3 without EOS.
    assert len(completions) == 1 + 2 + 4 + 8
    assert torch.isfinite(log_p).all()


def test_enumeration_skips_zero_probability_sequences():
    model = MarkovLM([0.0, 1.0, 0.0], [[1, 0, 0], [0.5, 0, 0.5], [0.5, 0.5, 0]], eos_token_id=0)
    completions, log_p = enumerate_completions(model, 3)
    assert sorted(completions) == sorted([(1, 0), (1, 2, 0), (1, 2, 1)])
    torch.testing.assert_close(log_p.exp().sum(), torch.tensor(1.0, dtype=torch.float64))


def test_enumerate_max_count_raises():
    model = random_markov(5, 0)
    with pytest.raises(EGPSError, match="more than 100 completions"):
        ExactPower(model, 2.0, 6).enumerate(max_count=100)


def test_log_prob_outside_support_is_minus_inf():
    model = random_markov(4, 11, eos_token_id=0)
    exact = ExactPower(model, 4.0, 3)
    rows = [
        ([1, 0, 2], 3),  # EOS in the middle
        ([1, 2, 3, 0], 4),  # longer than T
        ([1, 2, -1, -1], 2),  # no EOS but shorter than T
        ([-1, -1, -1, -1], 0),  # empty
        ([1, 2, 0, -1], 3),  # fine
        ([3, 0, -1, -1], 2),  # fine
        ([1, 2, 3, -1], 3),  # fine: length T without EOS
    ]
    tokens = torch.tensor([r + [-1] * (4 - len(r)) for r, _ in rows])
    length = torch.tensor([n for _, n in rows])
    out = exact.log_prob(tokens, length)
    assert out.dtype == torch.float64
    assert torch.isneginf(out[:4]).all()
    assert torch.isfinite(out[4:]).all()


def test_log_prob_zero_probability_transition_is_minus_inf():
    model = MarkovLM([0.0, 1.0, 0.0], [[1, 0, 0], [0.5, 0, 0.5], [0.5, 0.5, 0]], eos_token_id=0)
    exact = ExactPower(model, 2.0, 3)
    tokens = torch.tensor([[2, 0, -1], [1, 1, 0], [1, 2, 0]])
    out = exact.log_prob(tokens, torch.tensor([2, 3, 3]))
    assert torch.isneginf(out[:2]).all()
    assert torch.isfinite(out[2])


def test_log_prob_rejects_bad_ids_and_shapes():
    exact = ExactPower(random_markov(3, 0), 2.0, 3)
    with pytest.raises(EGPSError, match="token ids"):
        exact.log_prob(torch.tensor([[1, 5, 0]]), torch.tensor([3]))
    with pytest.raises(EGPSError, match="token ids"):
        exact.log_prob(torch.tensor([[1, -1, 0]]), torch.tensor([3]))
    with pytest.raises(EGPSError, match="tokens"):
        exact.log_prob(torch.tensor([1, 2, 0]), torch.tensor([3]))
    with pytest.raises(EGPSError, match="width"):
        exact.log_prob(torch.tensor([[1, 0]]), torch.tensor([3]))


# ---------------------------------------------------------------------------------------------- sampler
@pytest.mark.parametrize(
    ("vocab", "seed", "eos", "T", "prompt", "alpha"), [(3, 0, 0, 5, (), 4.0), (4, 3, 1, 4, (2,), 2.0)]
)
def test_sampler_matches_enumeration(vocab, seed, eos, T, prompt, alpha):
    model = random_markov(vocab, seed, eos_token_id=eos)
    exact = ExactPower(model, alpha, T, prompt)
    completions, log_pi = exact.enumerate()
    n = 200_000
    tokens, length = exact.sample(n, torch.Generator().manual_seed(seed))
    assert tokens.shape == (n, T) and length.shape == (n,)
    # Padding and support: every draw is a valid completion.
    pos = torch.arange(T).unsqueeze(0)
    assert ((tokens == -1) == (pos >= length.unsqueeze(1))).all()
    assert torch.isfinite(exact.log_prob(tokens, length)).all()

    codes = encode(tokens, vocab)
    ref_codes = encode(padded(completions, T)[0], vocab)
    index = {c: i for i, c in enumerate(ref_codes.tolist())}
    counts = torch.zeros(len(completions), dtype=torch.long)
    uniq, cnt = torch.unique(codes, return_counts=True)
    for c, k in zip(uniq.tolist(), cnt.tolist(), strict=True):
        counts[index[c]] += k  # KeyError would mean a draw outside the enumerated support
    prob = log_pi.exp()
    assert chi_square_pvalue(counts, prob) > 1e-4
    tv = 0.5 * (counts.double() / n - prob).abs().sum().item()
    assert tv < tv_tolerance(prob, n)


def test_sampler_is_reproducible_and_fast():
    import time

    exact = ExactPower(random_markov(4, 0), 4.0, 5)
    start = time.perf_counter()
    a = exact.sample(200_000, torch.Generator().manual_seed(3))
    assert time.perf_counter() - start < 2.0
    b = exact.sample(200_000, torch.Generator().manual_seed(3))
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_sampler_prefers_high_power_sequences():
    # Two continuations: p = 0.6 and 0.4; under α = 4, π = 0.6^4 / (0.6^4 + 0.4^4) ≈ 0.835.
    model = MarkovLM([0.0, 0.6, 0.4], [[1, 0, 0], [1, 0, 0], [1, 0, 0]], eos_token_id=0)
    exact = ExactPower(model, 4.0, 2)
    tokens, _ = exact.sample(50_000, torch.Generator().manual_seed(0))
    frac = (tokens[:, 0] == 1).double().mean().item()
    want = 0.6**4 / (0.6**4 + 0.4**4)
    assert abs(frac - want) < 0.01
    assert exact.expected_visits(1) == pytest.approx(want, abs=1e-12)


# ---------------------------------------------------------------------------------------------- marginals
@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize(("vocab", "seed", "eos", "T", "prompt"), CASES)
def test_marginals_match_enumeration(vocab, seed, eos, T, prompt, alpha):
    model = random_markov(vocab, seed, eos_token_id=eos, concentration=0.7)
    exact = ExactPower(model, alpha, T, prompt)
    completions, log_pi = exact.enumerate()
    prob = log_pi.exp()
    want_len = torch.zeros(T + 1, dtype=torch.float64)
    want_final = torch.zeros(vocab, dtype=torch.float64)
    want_pos = torch.zeros(T, vocab, dtype=torch.float64)
    for seq, pr in zip(completions, prob.tolist(), strict=True):
        want_len[len(seq)] += pr
        want_final[seq[-1]] += pr
        for t, v in enumerate(seq):
            want_pos[t, v] += pr
    length = exact.length_marginal()
    assert length.shape == (T + 1,) and length[0] == 0
    torch.testing.assert_close(length, want_len, atol=1e-12, rtol=0)
    torch.testing.assert_close(exact.final_token_marginal(), want_final, atol=1e-12, rtol=0)
    pos = exact.position_marginals()
    assert pos.shape == (T, vocab)
    torch.testing.assert_close(pos, want_pos, atol=1e-12, rtol=0)
    survival = 1 - torch.cumsum(want_len, 0)[:-1]  # P(length > t), t = 0..T-1
    torch.testing.assert_close(pos.sum(1), survival, atol=1e-12, rtol=0)
    for v in range(vocab):
        assert exact.expected_visits(v) == pytest.approx(want_pos[:, v].sum().item(), abs=1e-12)


def test_expected_visits_rejects_bad_token():
    exact = ExactPower(random_markov(3, 0), 2.0, 3)
    with pytest.raises(EGPSError, match="token"):
        exact.expected_visits(3)


# ---------------------------------------------------------------------------------------------- validation
@pytest.mark.parametrize("T", [1, 7, 300])
def test_alpha_one_normalizer_is_zero(T):
    exact = ExactPower(random_markov(5, 2, concentration=0.5), 1.0, T)
    assert exact.log_normalizer == pytest.approx(0.0, abs=1e-12)
    assert exact.length_marginal().sum().item() == pytest.approx(1.0, abs=1e-12)


@pytest.mark.parametrize("alpha", [0, -1.0, float("nan"), float("inf"), "four", None])
def test_bad_alpha_raises(alpha):
    with pytest.raises(EGPSError, match="alpha"):
        ExactPower(random_markov(3, 0), alpha, 3)


@pytest.mark.parametrize("T", [0, -2, 2.5, True, "3"])
def test_bad_max_new_tokens_raises(T):
    with pytest.raises(EGPSError, match="max_new_tokens"):
        ExactPower(random_markov(3, 0), 2.0, T)
    with pytest.raises(EGPSError, match="max_new_tokens"):
        enumerate_completions(random_markov(3, 0), T)


def test_bad_model_and_prompt_raise():
    with pytest.raises(EGPSError, match="MarkovLM"):
        ExactPower("not a model", 2.0, 3)  # type: ignore[arg-type]
    with pytest.raises(EGPSError, match="prompt"):
        ExactPower(random_markov(3, 0), 2.0, 3, prompt=[3])


@pytest.mark.parametrize("eos_prob", [0.0, 1e-90, 0.01])
def test_large_horizon_has_no_underflow(eos_prob):
    # Uniform non-EOS tokens: every p(x)^α is below 1e-308 when EOS is (nearly) impossible, and for 0.01 the
    # length-300 sequences carry weights around e^-1250.
    V, T, alpha = 5, 300, 4.0
    rest = (1 - eos_prob) / (V - 1)
    trans = [[eos_prob] + [rest] * (V - 1) for _ in range(V)]
    model = MarkovLM(trans[0], trans, eos_token_id=0)
    exact = ExactPower(model, alpha, T)
    assert math.isfinite(exact.log_normalizer)
    # Closed form: Z = Σ_{n<T} a^(n-1) e + a^(T-1) (a + e), with a = (V-1) rest^α and e = eos_prob^α.
    log_a = math.log(V - 1) + alpha * math.log(rest)
    log_e = alpha * math.log(eos_prob) if eos_prob > 0 else -math.inf
    terms = [(n - 1) * log_a + log_e for n in range(1, T)] + [(T - 1) * log_a + float(np.logaddexp(log_a, log_e))]
    want = float(torch.logsumexp(torch.tensor(terms, dtype=torch.float64), 0))
    assert exact.log_normalizer == pytest.approx(want, rel=1e-10)
    if eos_prob < 1e-80:
        assert exact.log_normalizer < math.log(1e-308)  # a linear-space DP would return log 0 here
    assert exact.length_marginal().sum().item() == pytest.approx(1.0, abs=1e-9)
    assert torch.isfinite(exact.position_marginals()).all()
    tokens, length = exact.sample(1000, torch.Generator().manual_seed(0))
    assert tokens.shape == (1000, T)
    assert torch.isfinite(exact.log_prob(tokens, length)).all()
    # The exact probability of a full-length completion against the sampled frequency.
    p_full = exact.length_marginal()[-1].item()
    freq = (length == T).double().mean().item()
    assert abs(freq - p_full) < 5 * math.sqrt(p_full * (1 - p_full) / 1000) + 1e-3


# ---------------------------------------------------------------------------------------------- testbeds
def test_random_markov_is_reproducible_and_valid():
    a, b, c = random_markov(6, 42, eos_token_id=3), random_markov(6, 42, eos_token_id=3), random_markov(6, 43)
    assert torch.equal(a.transition, b.transition) and torch.equal(a.initial, b.initial)
    assert not torch.equal(a.transition, c.transition)
    assert a.eos_token_id == 3 and a.vocab_size == 6
    torch.testing.assert_close(a.transition.sum(1), torch.ones(6, dtype=torch.float64))
    # Low concentration gives peaked rows, high concentration nearly uniform ones.
    peaked = random_markov(6, 0, concentration=0.05).transition.max(1).values.mean()
    flat = random_markov(6, 0, concentration=100.0).transition.max(1).values.mean()
    assert peaked > 0.6 > 0.3 > flat


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"vocab_size": 1, "seed": 0}, "vocab_size"),
        ({"vocab_size": 3, "seed": 0, "eos_token_id": 3}, "eos_token_id"),
        ({"vocab_size": 3, "seed": 0, "concentration": 0.0}, "concentration"),
    ],
)
def test_random_markov_bad_arguments(kwargs, match):
    with pytest.raises(EGPSError, match=match):
        random_markov(**kwargs)


def test_sparse_decision_structure():
    sd = sparse_decision(3, 5, seed=1)
    assert isinstance(sd, SparseDecisionModel)
    model, T = sd.model, sd.max_new_tokens
    assert T == 4 * 5 + 3 * (1 + 2) + 1
    assert len(sd.decision_tokens) == len(sd.likely_tokens) == len(sd.unlikely_tokens) == 3
    exact = ExactPower(model, 4.0, T)
    # Every completion has exactly T tokens and ends in EOS, on both branches.
    torch.testing.assert_close(exact.length_marginal()[-1], torch.tensor(1.0, dtype=torch.float64))
    assert exact.final_token_marginal()[model.eos_token_id].item() == pytest.approx(1.0, abs=1e-12)
    for d, (dec, lik, unl) in enumerate(zip(sd.decision_tokens, sd.likely_tokens, sd.unlikely_tokens, strict=True)):
        row = model.transition[dec]
        assert row[lik].item() == pytest.approx(0.7) and row[unl].item() == pytest.approx(0.3)
        assert (row > 0).sum() == 2
        # Each marker token occurs at most once: its visits are a probability, decision tokens exactly once.
        assert exact.expected_visits(dec) == pytest.approx(1.0, abs=1e-12), d
        assert exact.expected_visits(lik) + exact.expected_visits(unl) == pytest.approx(1.0, abs=1e-12)
    # The noisy segment really is high-entropy, the rest deterministic.
    entropy = model.state_stats(PowerPolicy()).entropy[: model.vocab_size]
    noisy_entropy = -sum(p * math.log(p) for p in noisy_profile(4))
    assert (entropy > 1e-12).sum() == 3 * (1 + 1 + 4)  # decision + likely-branch token + 4 first-step tokens
    assert entropy.max().item() == pytest.approx(noisy_entropy)
    # The seed reshuffles ids but not the probabilities that matter.
    other = sparse_decision(3, 5, seed=2)
    assert other.unlikely_tokens != sd.unlikely_tokens
    assert ExactPower(other.model, 4.0, T).log_normalizer == pytest.approx(exact.log_normalizer, abs=1e-12)


def test_sparse_decision_power_prefers_the_unlikely_branch():
    sd = sparse_decision(3, 6)
    T = sd.max_new_tokens
    power = ExactPower(sd.model, 4.0, T)
    base = ExactPower(sd.model, 1.0, T)
    tempered_logq = sd.model.state_stats(PowerPolicy(alpha=4.0)).logq
    want = branch_probabilities(0.7, 4, 2, 4.0)
    assert want.power > 0.95 and want.tempered < 0.05 and want.base == pytest.approx(0.3)
    for dec, lik, unl in zip(sd.decision_tokens, sd.likely_tokens, sd.unlikely_tokens, strict=True):
        p_power = power.expected_visits(unl)
        assert p_power > 0.5  # p^α prefers the unlikely, deterministic branch ...
        assert p_power == pytest.approx(want.power, abs=1e-12)
        assert base.expected_visits(unl) == pytest.approx(0.3, abs=1e-12)
        q_unl, q_lik = tempered_logq[dec, unl].exp().item(), tempered_logq[dec, lik].exp().item()
        assert q_lik > 0.5 > q_unl  # ... while token-level low temperature prefers the likely one
        assert q_unl == pytest.approx(want.tempered, abs=1e-12)
    # Sampling from π agrees (and decisions are independent: all three unlikely about 0.964^3 of the time).
    tokens, _ = power.sample(4000, torch.Generator().manual_seed(0))
    took = torch.stack([(tokens == u).any(1) for u in sd.unlikely_tokens], 1)
    assert abs(took.double().mean().item() - want.power) < 0.02
    assert abs(took.all(1).double().mean().item() - want.power**3) < 0.03


def test_sparse_decision_too_short_noise_does_not_flip_the_preference():
    # One noisy step is not enough noise: π then slightly prefers the likely branch (the docstring's condition).
    sd = sparse_decision(2, 3, noisy_length=1)
    power = ExactPower(sd.model, 4.0, sd.max_new_tokens)
    value = power.expected_visits(sd.unlikely_tokens[0])
    assert value < 0.5
    assert value == pytest.approx(branch_probabilities(0.7, 4, 1, 4.0).power, abs=1e-12)


def test_sparse_decision_length_scales_with_run_length():
    short, long = sparse_decision(3, 8), sparse_decision(3, 32)
    assert long.max_new_tokens - short.max_new_tokens == 4 * (32 - 8)
    assert long.model.vocab_size - short.model.vocab_size == 4 * (32 - 8)
    a = ExactPower(short.model, 4.0, short.max_new_tokens)
    b = ExactPower(long.model, 4.0, long.max_new_tokens)
    # Deterministic runs add length but no entropy: the normaliser and the branch probabilities are unchanged.
    assert b.log_normalizer == pytest.approx(a.log_normalizer, abs=1e-12)
    for u_short, u_long in zip(short.unlikely_tokens, long.unlikely_tokens, strict=True):
        assert b.expected_visits(u_long) == pytest.approx(a.expected_visits(u_short), abs=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_decisions": 0, "run_length": 3}, "num_decisions"),
        ({"num_decisions": 2, "run_length": 0}, "run_length"),
        ({"num_decisions": 2, "run_length": 3, "likely_prob": 1.0}, "likely_prob"),
        ({"num_decisions": 2, "run_length": 3, "noisy_width": 1}, "noisy_width"),
        ({"num_decisions": 2, "run_length": 3, "noisy_length": 0}, "noisy_length"),
    ],
)
def test_sparse_decision_bad_arguments(kwargs, match):
    with pytest.raises(EGPSError, match=match):
        sparse_decision(**kwargs)
