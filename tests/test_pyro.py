"""The Pyro form of the target and the adapter that runs our kernels under ``pyro.infer.MCMC``.

Everything is checked against exact quantities of small Markov models: the support is enumerated with
``ExactPower.enumerate()``, so the potential, the base distribution's density and sampler, and a Pyro MCMC run
are compared with the exact ``p`` and ``π`` on every completion.
"""

from __future__ import annotations

import math
import warnings

import arviz as az
import pyro
import pyro.poutine as poutine
import pytest
import torch
from pyro.infer import MCMC

from egps_ppl.kernels import MetropolisHastings
from egps_ppl.kernels.base import Kernel, StepInfo
from egps_ppl.models.exact import ExactPower, enumerate_completions
from egps_ppl.models.markov import MarkovLM
from egps_ppl.models.testbeds import random_markov
from egps_ppl.pyro import PyroKernel, SequenceDistribution, potential_fn, power_model
from egps_ppl.state import PAD, Sequences
from egps_ppl.target import PowerDistribution
from egps_ppl.testing import distance_to_target


def _padded(completions: list[tuple[int, ...]], width: int) -> torch.Tensor:
    out = torch.full((len(completions), width), PAD, dtype=torch.long)
    for row, seq in enumerate(completions):
        out[row, : len(seq)] = torch.tensor(seq)
    return out


def _tilt(seqs: Sequences) -> torch.Tensor:
    """A reward tilt that depends on the tokens, plus a hard constraint (-inf) on length-2 completions."""
    reward = 0.7 * seqs.length.double() - 0.3 * (seqs.tokens == 1).sum(1).double()
    return torch.where(seqs.length == 2, torch.full_like(reward, -math.inf), reward)


CASES = [
    # (vocab, seed, alpha, T, prompt)
    (3, 1, 2.5, 4, []),
    (4, 2, 4.0, 3, [2]),
    (3, 5, 0.5, 3, []),  # alpha < 1: the factor (alpha - 1) log p is positive
]


# ---------------------------------------------------------------------- potential through poutine
@pytest.mark.parametrize("vocab, seed, alpha, T, prompt", CASES)
@pytest.mark.parametrize("tilted", [False, True])
def test_poutine_potential_equals_minus_target_log_prob(
    vocab: int, seed: int, alpha: float, T: int, prompt: list[int], tilted: bool
) -> None:
    model = random_markov(vocab, seed=seed)
    target = PowerDistribution(model, prompt, alpha, T, log_factor=_tilt if tilted else None)
    support, log_pi = ExactPower(model, alpha, T, prompt).enumerate()
    seqs, _ = target.from_completions(support)
    expected = -target.log_prob(seqs)
    x = _padded(support, T)
    potential = potential_fn(target)

    one_by_one = torch.stack([potential({"x": row}) for row in x])  # Pyro's scalar path: -trace.log_prob_sum()
    torch.testing.assert_close(one_by_one, expected, rtol=0, atol=1e-10)
    torch.testing.assert_close(potential({"x": x}), expected, rtol=0, atol=1e-10)  # batched path
    if tilted:
        assert torch.isposinf(one_by_one).sum() == sum(len(s) == 2 for s in support) > 0
    else:
        # Independent of target.log_prob: exp(-U) normalised over the support is the exact π of the DP/brute force.
        torch.testing.assert_close(-one_by_one - torch.logsumexp(-one_by_one, 0), log_pi, rtol=0, atol=1e-10)


def test_power_model_sites_add_up_to_alpha_log_p() -> None:
    model = random_markov(3, seed=1)
    alpha, T = 3.0, 4
    target = PowerDistribution(model, [], alpha, T)
    support, log_p = enumerate_completions(model, T)
    x = _padded(support, T)
    trace = poutine.trace(poutine.condition(power_model(target), data={"x": x})).get_trace()
    trace.compute_log_prob()
    assert set(trace.stochastic_nodes) == set() and set(trace.observation_nodes) == {"x", "power"}
    torch.testing.assert_close(trace.nodes["x"]["log_prob"], log_p, rtol=0, atol=1e-12)
    torch.testing.assert_close(trace.nodes["power"]["log_prob"], (alpha - 1) * log_p, rtol=0, atol=1e-12)
    # Unconditioned, the model draws x from p (a valid completion) and still adds the factor.
    pyro.set_rng_seed(0)
    free = poutine.trace(power_model(target)).get_trace()
    assert free.nodes["x"]["value"].shape == (T,)
    assert math.isfinite(float(free.log_prob_sum()))


# ---------------------------------------------------------------------- SequenceDistribution
@pytest.mark.parametrize("vocab, seed, T, prompt", [(3, 1, 4, []), (4, 2, 3, [2]), (3, 7, 1, [])])
def test_sequence_distribution_log_prob_equals_exact_base(vocab: int, seed: int, T: int, prompt: list[int]) -> None:
    model = random_markov(vocab, seed=seed)
    target = PowerDistribution(model, prompt, 4.0, T)  # alpha is irrelevant to the base distribution
    exact = ExactPower(model, 1.0, T, prompt)
    support, _ = exact.enumerate()
    x = _padded(support, T)
    d = SequenceDistribution(target)
    log_prob = d.log_prob(x)
    assert d.event_shape == (T,) and d.batch_shape == () and not d.has_enumerate_support
    torch.testing.assert_close(log_prob, exact.log_prob(x, (x != PAD).sum(1)), rtol=0, atol=1e-12)
    assert abs(torch.logsumexp(log_prob, 0).item()) < 1e-12  # p sums to 1 over the support
    # Extra batch dimensions are kept.
    assert d.log_prob(x.reshape(1, -1, T)).shape == (1, len(support))


def test_sequence_distribution_samples_follow_p() -> None:
    model = random_markov(3, seed=1)
    T = 4
    target = PowerDistribution(model, [], 3.0, T)
    torch.manual_seed(0)
    draws = SequenceDistribution(target).sample((20_000,))
    assert draws.shape == (20_000, T) and draws.dtype == torch.long
    assert SequenceDistribution(target).support.check(draws).all()
    base = PowerDistribution(model, [], 1.0, T)
    seqs = base.empty(draws.shape[0]).with_(tokens=draws, length=(draws != PAD).sum(1))
    report = distance_to_target(base, seqs)
    # Chi-square goodness of fit, and TV within 3x what sampling noise alone gives at this size.
    assert report.p_value > 1e-4, report
    assert report.tv < 3 * report.tv_noise, report
    # Sanity of the comparison itself: the same draws are far from π ∝ p^3.
    assert distance_to_target(target, seqs).tv > 10 * report.tv_noise
    # A generator makes draws reproducible.
    d1 = SequenceDistribution(target, generator=torch.Generator().manual_seed(3))
    d2 = SequenceDistribution(target, generator=torch.Generator().manual_seed(3))
    assert torch.equal(d1.sample((50,)), d2.sample((50,)))


@pytest.fixture
def small_target() -> PowerDistribution:
    model = MarkovLM([0.4, 0.3, 0.3], [[1 / 3, 1 / 3, 1 / 3], [0.45, 0.5, 0.05], [0.2, 0.1, 0.7]], eos_token_id=0)
    return PowerDistribution(model, [], 0.5, 3)


def test_out_of_support_values_give_minus_inf(small_target: PowerDistribution) -> None:
    d = SequenceDistribution(small_target)
    bad = torch.tensor(
        [
            [0, 1, PAD],  # EOS before the end
            [1, 2, PAD],  # no EOS but shorter than T
            [1, 3, 0],  # id out of range (V = 3)
            [1, -2, 0],  # negative id other than the pad
            [1, PAD, 0],  # a token after the padding
            [PAD, PAD, PAD],  # empty
        ]
    )
    good = torch.tensor([[1, 0, PAD], [1, 2, 2], [0, PAD, PAD]])
    assert torch.isneginf(d.log_prob(bad)).all()
    assert torch.isfinite(d.log_prob(good)).all()
    assert d.support.check(bad).sum() == 0 and d.support.check(good).all()
    # Floats holding whole numbers are accepted; fractional ones are outside the support.
    assert torch.isfinite(d.log_prob(good.double())).all()
    assert torch.isneginf(d.log_prob(torch.tensor([1.5, 0.0, -1.0])))
    # The potential is +inf there (not NaN, even with alpha < 1 where (alpha - 1)·(-inf) = +inf).
    assert torch.isposinf(potential_fn(small_target)({"x": bad})).all()
    assert torch.isposinf(potential_fn(small_target)({"x": bad[0]}))
    # Wrong width is a shape error, not a zero-probability value.
    with pytest.raises(ValueError, match="shape"):
        d.log_prob(torch.tensor([1, 0]))
    # With validation on, torch's convention: out-of-support values raise.
    checked = SequenceDistribution(small_target, validate_args=True)
    with pytest.raises(ValueError, match="support"):
        checked.log_prob(bad[0])
    assert torch.isfinite(checked.log_prob(good[0]))


# ---------------------------------------------------------------------- the adapter under pyro.infer.MCMC
class _StayKernel(Kernel):
    """Never moves: shows exactly which state the adapter steps from."""

    name = "stay"

    def __init__(self, target: PowerDistribution) -> None:
        self.target = target

    def step(self, state: Sequences, generator: torch.Generator | None = None) -> tuple[Sequences, StepInfo]:
        return state, StepInfo.idle(state.num_rows, state.device)


def test_adapter_initial_params_and_rescoring(small_target: PowerDistribution) -> None:
    kernel = PyroKernel(_StayKernel(small_target))
    kernel.initial_params = {"x": torch.tensor([1, 0, PAD])}
    kernel.setup(warmup_steps=0)
    assert kernel.initial_params["x"].tolist() == [1, 0, PAD]
    # Params that differ from the kept state are rescored and stepped from.
    out = kernel.sample({"x": torch.tensor([2, 2, 1])})
    assert out["x"].tolist() == [2, 2, 1]
    assert kernel.state is not None and int(kernel.state.length[0]) == 3
    torch.testing.assert_close(kernel.state.log_p(), torch.tensor([math.log(0.3 * 0.7 * 0.1)], dtype=torch.float64))
    assert kernel.diagnostics()["acceptance rate"] == 0.0
    # Through Pyro's runner, with initial_params given to MCMC.
    mcmc = MCMC(
        kernel,
        num_samples=3,
        warmup_steps=0,
        initial_params={"x": torch.tensor([2, 0, PAD])},
        disable_progbar=True,
    )
    mcmc.run()
    assert mcmc.get_samples()["x"].tolist() == [[2, 0, PAD]] * 3


def test_pyro_mcmc_with_adapter_matches_exact_pi(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pyro's runner + PyroKernel(MetropolisHastings) on V = 3, T = 3 (15 completions).

    Tolerance: each empirical frequency p̂_i of an MCMC chain has standard deviation about
    sqrt(π_i (1 − π_i) / ESS_i), with ESS_i the effective sample size of the chain of indicators 1[x = s_i]
    (from ArviZ), so the expected TV from sampling noise is 0.5 Σ_i sqrt(2 π_i (1 − π_i) / (π ESS_i)). We allow 3
    times that (about 0.08 here: ESS is down to ~200 for the stickiest state, [EOS]). Sampling from p or from
    token-level tempering instead of π would give TV > 0.2, which the test checks is well above the tolerance.
    """
    model = random_markov(3, seed=0)
    alpha, T, num_samples = 2.0, 3, 3000
    target = PowerDistribution(model, [], alpha, T)
    support, log_pi = ExactPower(model, alpha, T).enumerate()
    pi = log_pi.exp()
    index = {seq: k for k, seq in enumerate(support)}

    calls = {"score": 0}
    score = model.score

    def counting_score(*args: object, **kwargs: object) -> object:
        calls["score"] += 1
        return score(*args, **kwargs)

    monkeypatch.setattr(model, "score", counting_score)
    logged: list[dict[str, str]] = []
    pyro.set_rng_seed(0)
    kernel = PyroKernel(MetropolisHastings(target))
    mcmc = MCMC(
        kernel,
        num_samples=num_samples,
        warmup_steps=50,
        disable_progbar=True,
        hook_fn=lambda k, params, stage, i: logged.append(k.logging()) if i % 1000 == 0 else None,
    )
    mcmc.run()
    rescored = calls["score"]
    draws = mcmc.get_samples()["x"]
    assert draws.shape == (num_samples, T) and draws.dtype == torch.long

    ids = torch.tensor([index[tuple(row[row != PAD].tolist())] for row in draws])
    indicators = torch.nn.functional.one_hot(ids, len(support)).double()
    empirical = indicators.mean(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # ArviZ warns about never-visited (constant) indicators
        ess = torch.tensor([float(az.ess(indicators[:, k].numpy()[None])) for k in range(len(support))])
    ess = torch.nan_to_num(ess, nan=float(num_samples)).clamp(1.0, float(num_samples))
    noise = 0.5 * torch.sqrt(2 * pi * (1 - pi) / (math.pi * ess)).sum().item()
    tolerance = 3 * noise
    tv = 0.5 * (empirical - pi).abs().sum().item()
    assert tv < tolerance, (tv, tolerance, ess)

    # The tolerance separates π from the distributions a broken adapter would produce.
    seqs, _ = target.from_completions(support)
    tv_base = 0.5 * (seqs.log_p().exp() - pi).abs().sum().item()
    tv_tempered = 0.5 * (seqs.total("logq").exp() - pi).abs().sum().item()
    assert min(tv_base, tv_tempered) > 2 * tolerance, (tv_base, tv_tempered, tolerance)

    diagnostics = kernel.diagnostics()
    assert 0.0 < diagnostics["acceptance rate"] <= 1.0
    # Every change of state is an accepted proposal (an accepted proposal may equal the current state).
    changes = int((ids[1:] != ids[:-1]).sum())
    assert 0 < changes <= round(diagnostics["acceptance rate"] * num_samples)
    assert logged and all("acc. rate" in entry for entry in logged)
    # The chain state (statistics included) was kept between steps: nothing was ever rescored.
    assert rescored == 0


def test_package_forms_give_the_exact_target():
    from egps_ppl.pyro.kernel import PyroKernel as Defined
    from egps_ppl.target import PowerDistribution

    target = PowerDistribution(random_markov(3, seed=0, eos_token_id=0), [], alpha=2.0, max_new_tokens=3)
    support, log_pi = ExactPower(target.lm, 2.0, 3).enumerate()
    potential = potential_fn(target)
    tokens = torch.tensor([list(s) + [-1] * (3 - len(s)) for s in support])
    energies = torch.stack([potential({"x": row}) for row in tokens])
    # exp(-U) normalised equals the exact π.
    torch.testing.assert_close(torch.log_softmax(-energies, 0), log_pi, atol=1e-9, rtol=0)
    assert Defined is PyroKernel and callable(power_model(target))
