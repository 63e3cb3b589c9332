"""Certified best-first enumeration of π (egps_ppl.analysis.enumeration) against exact answers."""

from __future__ import annotations

import math

import pytest
import torch

from egps_ppl.analysis.enumeration import enumerate_power
from egps_ppl.errors import EGPSError
from egps_ppl.models.exact import ExactPower
from egps_ppl.models.markov import MarkovLM
from egps_ppl.models.testbeds import random_markov, sparse_decision
from egps_ppl.target import PowerDistribution


def _exact_marginal(model, alpha: float, T: int, answer) -> dict:
    completions, log_pi = ExactPower(model, alpha, T).enumerate()
    out: dict = {}
    for c, p in zip(completions, log_pi.exp().tolist(), strict=True):
        out[answer(list(c))] = out.get(answer(list(c)), 0.0) + p
    return out


def _tv(p: dict, q: dict) -> float:
    return 0.5 * sum(abs(p.get(k, 0.0) - q.get(k, 0.0)) for k in set(p) | set(q))


def _last(ids: list[int]) -> int:
    return ids[-1]


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("answer", [_last, len], ids=["last-token", "length"])
def test_exhaustive_search_is_exact(seed: int, answer) -> None:
    model = random_markov(4, seed=seed)
    target = PowerDistribution(model, prompt=[], alpha=4.0, max_new_tokens=5)
    found = enumerate_power(target, answer, tol=0.0, top_children=4)
    exact = _exact_marginal(model, 4.0, 5, answer)
    assert len(found.completions) == len(ExactPower(model, 4.0, 5).enumerate()[0])
    assert found.tv_bound < 1e-12 and found.exhausted
    assert _tv(found.marginal(), exact) < 1e-9
    # log p of each completion is the model's.
    for ids, lp in zip(found.completions[:20], found.log_p[:20], strict=False):
        seqs, _ = target.from_completions([list(ids)])
        assert abs(float(seqs.log_p()[0]) - lp) < 1e-9


BED = sparse_decision(2, 3, seed=0)


@pytest.mark.parametrize(
    "model, alpha, T, answer",
    [(random_markov(5, seed=3), 4.0, 6, _last), (random_markov(5, seed=4, concentration=0.3), 2.0, 6, _last),
     (BED.model, 4.0, BED.max_new_tokens, tuple)],
    ids=["random-a4", "peaked-a2", "sparse-decision"],
)  # fmt: skip
@pytest.mark.parametrize("tol, top_children, batch", [(0.3, 2, 1), (0.05, 3, 4), (0.01, 64, 7), (0.001, 64, 2)])
def test_certificate_bounds_the_true_distance(
    model, alpha: float, T: int, answer, tol: float, top_children: int, batch: int
) -> None:
    target = PowerDistribution(model, prompt=[], alpha=alpha, max_new_tokens=T)
    found = enumerate_power(target, answer, tol=tol, top_children=top_children, batch=batch, max_expansions=5000)
    exact = _exact_marginal(model, alpha, T, answer)
    assert _tv(found.marginal(), exact) <= found.tv_bound + 1e-12
    # It stops at the tolerance unless the children it may generate ran out first.
    assert found.tv_bound <= tol or top_children < model.vocab_size
    # The found mass and the bound add up to at least the normaliser.
    log_z = ExactPower(model, alpha, T).log_normalizer
    assert math.log(math.exp(found.log_found) + math.exp(found.log_rest_bound)) >= log_z - 1e-9


def test_best_first_order_and_budget() -> None:
    target = PowerDistribution(random_markov(4, seed=5), prompt=[], alpha=4.0, max_new_tokens=6)
    found = enumerate_power(target, tol=0.0, batch=1)
    assert all(a >= b - 1e-12 for a, b in zip(found.log_p, found.log_p[1:], strict=False))
    assert found.answers[0] == found.completions[0]  # no answer function: the completion itself
    capped = enumerate_power(target, tol=0.0, batch=3, max_expansions=7)
    assert 7 <= capped.expansions < 7 + 3 and capped.tv_bound > 0 and not capped.exhausted


def test_hf_first_token_against_softmax() -> None:
    from egps_ppl.models.registry import tiny_gpt2

    lm = tiny_gpt2()
    prompt = lm.encode("Hello there")
    target = PowerDistribution(lm, prompt=prompt, alpha=4.0, max_new_tokens=1)
    found = enumerate_power(target, _last, tol=0.0, top_children=100)
    seqs = lm.start(torch.tensor(prompt), 1, 1, target.default_policy())
    logp, _, _ = lm.next_token_logprobs(seqs)
    exact = dict(enumerate(torch.softmax(4.0 * logp[0], dim=0).tolist()))
    assert len(found.completions) == 100 and found.expansions == 1
    assert 0 < found.tv_bound < 1
    assert _tv(found.marginal(), exact) <= found.tv_bound + 1e-9
    # The 100 best first tokens, best first.
    assert [c[0] for c in found.completions] == torch.topk(logp[0], 100).indices.tolist()


def test_bad_input() -> None:
    model = random_markov(3, seed=0)
    with pytest.raises(EGPSError, match="alpha >= 1"):
        enumerate_power(PowerDistribution(model, prompt=[], alpha=0.5, max_new_tokens=3))
    with pytest.raises(EGPSError, match="log_factor"):
        enumerate_power(PowerDistribution(model, prompt=[], alpha=2.0, max_new_tokens=3, log_factor=lambda s: 0.0))
    with pytest.raises(EGPSError, match="single-prompt"):
        enumerate_power(PowerDistribution(model, prompt=[[1], [2]], alpha=2.0, max_new_tokens=3))
    target = PowerDistribution(model, prompt=[], alpha=2.0, max_new_tokens=3)
    for kwargs, match in [({"tol": 1.0}, "tol"), ({"batch": 0}, "batch"), ({"max_expansions": 0}, "max_expansions"),
                          ({"top_children": 0}, "top_children")]:  # fmt: skip
        with pytest.raises(EGPSError, match=match):
            enumerate_power(target, **kwargs)
    with pytest.raises(EGPSError, match="no completion"):
        enumerate_power(target, tol=0.0, max_expansions=1).marginal()


def test_certifies_when_pi_mass_is_below_1e_12() -> None:
    # A long, peaked completion at α = 8: the mode's p^α is e^-28.6, below 1e-12. The unexplored mass beyond each
    # prefix's generated children must be bounded relative to itself: a slack scaled to the prefix's whole mass
    # (what the bound once added) outweighs π's mass here and stalled the bound at 0.32 after 5,000 expansions.
    row = torch.tensor([1e-9, 0.8, 0.2 - 2e-9, 1e-9], dtype=torch.float64)
    trans = row.repeat(4, 1)
    trans[0] = torch.tensor([1.0, 0.0, 0.0, 0.0], dtype=torch.float64)
    model = MarkovLM(row, trans, eos_token_id=0)
    target = PowerDistribution(model, prompt=[], alpha=8.0, max_new_tokens=16)
    found = enumerate_power(target, lambda ids: ids.count(2), tol=0.05, top_children=2, batch=8, max_expansions=2000)
    assert 8.0 * found.log_p[0] < math.log(1e-12)
    assert found.tv_bound <= 0.05 and found.expansions < 2000
    # The certificate is true: π restricted to what was found is within 1 - F/Z of π.
    log_z = ExactPower(model, 8.0, 16).log_normalizer
    assert 1.0 - math.exp(found.log_found - log_z) <= found.tv_bound + 1e-12
    assert math.log(math.exp(found.log_found) + math.exp(found.log_rest_bound)) >= log_z - 1e-9
