"""The token statistics without subnormal floats: the flushed exp and logsumexp against torch's, and the next-token
statistics and draws built on them against exact probabilities."""

from __future__ import annotations

import math

import pytest
import torch

from egps_ppl.models.base import next_token_stats, sample_tokens
from egps_ppl.models.policy import PowerPolicy, exp_flushed, logsumexp_flushed
from egps_ppl.testing import pearson_test


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_exp_flushed_is_exp_in_the_normal_range_and_zero_below(dtype):
    tiny = torch.finfo(dtype).tiny
    x = torch.cat([torch.linspace(-2 * abs(math.log(tiny)), 5.0, 20_001, dtype=dtype), torch.tensor([-math.inf])])
    got, want = exp_flushed(x), torch.exp(x)
    normal = want >= tiny * math.exp(0.01)
    assert torch.equal(got[normal], want[normal])  # bit for bit where exp is normal
    assert (got[~normal] == 0).all() and (want[~normal] < tiny * math.exp(0.01)).all()
    assert got[-1] == 0  # exp(-inf)
    assert torch.isnan(exp_flushed(torch.tensor([math.nan], dtype=dtype))).all()  # NaN is not hidden


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_logsumexp_flushed_equals_torch_on_rows_with_huge_spread(dtype):
    g = torch.Generator().manual_seed(0)
    # log p of a peaked 5,000-token vocabulary at α = 4: many terms hundreds of nats below the top.
    logp = torch.log_softmax(8 * torch.randn(64, 5000, generator=g, dtype=dtype), -1)
    scaled = 4 * logp
    scaled[0, :4000] = -math.inf  # a truncated row
    scaled[1] = -math.inf  # nothing kept
    got, want = logsumexp_flushed(scaled), torch.logsumexp(scaled, -1)
    assert got[1] == -math.inf
    assert torch.equal(got[2:], want[2:]) and torch.allclose(got[:1], want[:1], rtol=0, atol=1e-6)
    # And on a 3-D batch along another dimension.
    assert torch.equal(
        logsumexp_flushed(scaled[2:].view(2, 31, 5000), dim=1), torch.logsumexp(scaled[2:].view(2, 31, 5000), 1)
    )


def test_next_token_stats_match_float64_reference_on_a_peaked_row():
    g = torch.Generator().manual_seed(1)
    logits = 12 * torch.randn(8, 3000, generator=g)
    logits[0, 5:] = -math.inf  # only five tokens possible
    policy = PowerPolicy(4.0)
    stats = next_token_stats(logits, policy)
    ref = torch.log_softmax(logits.double(), -1)
    p = ref.exp()
    entropy = -(p * torch.where(p > 0, ref, torch.zeros_like(ref))).sum(-1)
    logz = torch.logsumexp(4 * ref, -1)
    torch.testing.assert_close(stats.entropy.double(), entropy, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(stats.logz.double(), logz, rtol=1e-5, atol=1e-5)
    kept = torch.isfinite(ref)
    torch.testing.assert_close(stats.logq.double()[kept], (4 * ref - logz.unsqueeze(1))[kept], rtol=1e-5, atol=1e-4)
    assert (stats.logq[~kept] == -math.inf).all()


def test_sample_tokens_follow_q_when_most_of_the_row_is_subnormal():
    # Three tokens carry the mass; 9,997 others have q between 1e-60 and 1e-40 (subnormal or zero in float32).
    logq = torch.full((1, 10_000), -100.0)
    logq[0, 1:9_999] = torch.linspace(-140.0, -92.0, 9_998)
    logq[0, [0, 4_000, 9_999]] = torch.log(torch.tensor([0.5, 0.3, 0.2]))
    n = 20_000
    draws = sample_tokens(logq.expand(n, -1).contiguous(), torch.Generator().manual_seed(2))
    assert set(draws.tolist()) <= {0, 4_000, 9_999}  # a token of q < 1.2e-38 never comes out
    counts = torch.stack([(draws == t).sum() for t in (0, 4_000, 9_999)])
    assert pearson_test(counts, torch.tensor([0.5, 0.3, 0.2], dtype=torch.float64))[2] > 1e-4


@pytest.mark.parametrize(
    ("bad", "message"),
    [(math.nan, "NaN or \\+inf logits"), (math.inf, "NaN or \\+inf logits"), (None, "all -inf")],
)
def test_next_token_stats_names_bad_logits(bad, message):
    from egps_ppl.errors import NumericalError

    logits = torch.randn(4, 50)
    logits[1, :10] = -math.inf  # some -inf is fine
    if bad is None:
        logits[2] = -math.inf
    else:
        logits[2, 7] = bad
    with pytest.raises(NumericalError, match=message):
        next_token_stats(logits, PowerPolicy(4.0))
    logits[2] = 0.0
    assert torch.isfinite(next_token_stats(logits, PowerPolicy(4.0)).entropy).all()


def test_half_types_are_not_flushed_at_their_own_tiny():
    # float16's smallest normal is 6e-5: flushing there would drop real probabilities.
    x = torch.tensor([-10.0, -12.0], dtype=torch.float16)
    assert (exp_flushed(x) > 0).all()
    assert torch.equal(logsumexp_flushed(x.view(1, 2)), torch.logsumexp(x.view(1, 2), -1))
