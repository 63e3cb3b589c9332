"""MarkovLM: loading model files, and the extend/score protocol against exact probabilities."""

from __future__ import annotations

import json
import math

import pytest
import torch

from egps_ppl.errors import EGPSError, ModelFileError
from egps_ppl.models.exact import enumerate_completions
from egps_ppl.models.markov import MarkovLM
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.models.testbeds import random_markov
from egps_ppl.state import PAD
from egps_ppl.testing import pearson_test

GOOD = {
    "initial": [0.2, 0.5, 0.3],
    "transition": [[1.0, 0.0, 0.0], [0.3, 0.3, 0.4], [0.5, 0.25, 0.25]],
    "eos": 0,
}


def write(tmp_path, content, name="model.json"):
    path = tmp_path / name
    path.write_text(content if isinstance(content, str) else json.dumps(content))
    return path


def chi_square_pvalue(observed: torch.Tensor, expected_prob: torch.Tensor) -> float:
    """Pearson chi-square p-value, pooling cells with expected count < 5."""
    return pearson_test(observed, expected_prob)[2]


# ---------------------------------------------------------------------------------------------- from_json
def test_good_file_loads(tmp_path):
    path = write(tmp_path, GOOD)
    model = MarkovLM.from_json(path)
    assert model.vocab_size == 3 and model.eos_token_id == 0
    torch.testing.assert_close(model.initial, torch.tensor(GOOD["initial"], dtype=torch.float64))
    torch.testing.assert_close(model.transition, torch.tensor(GOOD["transition"], dtype=torch.float64))
    assert str(path) in model.name


def test_to_json_round_trip(tmp_path):
    model = random_markov(4, 9, eos_token_id=2)
    model.to_json(tmp_path / "m.json")
    back = MarkovLM.from_json(tmp_path / "m.json")
    assert back.eos_token_id == 2
    torch.testing.assert_close(back.transition, model.transition, atol=0, rtol=0)
    torch.testing.assert_close(back.initial, model.initial, atol=0, rtol=0)


def with_(**changes):
    data = json.loads(json.dumps(GOOD))
    data.update(changes)
    return data


@pytest.mark.parametrize(
    ("content", "match"),
    [
        (
            with_(transition=[[1.0, 0.0, 0.0], [0.3, 0.3, 0.4], [0.5, 0.25, 0.15]]),
            r"'transition' rows.*row 2 sums to 0\.9",
        ),
        (with_(transition=[[1.0, 0.0, 0.0], [0.3, 0.3, 0.5], [0.5, 0.25, 0.25]]), r"row 1 sums to 1\.1"),
        (with_(initial=[0.2, 0.5, 0.2]), r"'initial' rows must sum to 1"),
        (with_(transition=[[1.0, 0.0, 0.0], [0.7, -0.1, 0.4], [0.5, 0.25, 0.25]]), "negative"),
        (with_(initial=[1.2, -0.2, 0.0]), "negative"),
        (json.dumps(with_(initial=[float("nan"), 0.5, 0.5])), "NaN"),
        (json.dumps(with_(transition=[[1.0, 0.0, 0.0], [float("inf"), 0.0, 0.0], [0.5, 0.25, 0.25]])), "infinite"),
        (with_(transition=[[1.0, 0.0, 0.0], [0.3, 0.7, 0.0]]), r"3x3 matrix.*\(2, 3\)"),
        (with_(transition=[[1.0, 0.0], [0.3, 0.7], [0.5, 0.5]]), "3x3 matrix"),
        (with_(transition=[[1.0, 0.0, 0.0], [0.3, 0.7], [0.5, 0.25, 0.25]]), "'transition' must be numbers"),
        (with_(initial=[[0.2, 0.5, 0.3]]), "'initial' must be a list"),
        (with_(initial=[1.0]), "at least 2"),
        (with_(initial=["a", "b", "c"]), "must be numbers"),
        (with_(eos=3), r"'eos' must be a token id in \[0, 3\)"),
        (with_(eos=-1), "'eos' must be a token id"),
        (with_(eos=0.0), "'eos' must be a token id"),
        (with_(eos=True), "'eos' must be a token id"),
        (
            {"initial": GOOD["initial"], "transition": GOOD["transition"]},
            "needs the keys 'initial', 'transition' and 'eos'",
        ),
        ({"init": GOOD["initial"], "transition": GOOD["transition"], "eos": 0}, "needs the keys"),
        ([GOOD["initial"]], "needs the keys"),
        ('{"initial": [0.5, 0.5], "transition": ', "not valid JSON"),
        ("", "not valid JSON"),
    ],
)
def test_bad_file_raises_model_file_error(tmp_path, content, match):
    path = write(tmp_path, content)
    with pytest.raises(ModelFileError, match=match) as info:
        MarkovLM.from_json(path)
    assert str(path) in str(info.value)  # the message says which file


def test_missing_file_raises(tmp_path):
    with pytest.raises(ModelFileError, match="not found"):
        MarkovLM.from_json(tmp_path / "nope.json")


def test_binary_file_raises_model_file_error(tmp_path):
    path = tmp_path / "model.json"
    path.write_bytes(b"\xff\xfe\x00\x81 not json")
    with pytest.raises(ModelFileError):
        MarkovLM.from_json(path)


def test_model_file_error_is_an_egps_error():
    assert issubclass(ModelFileError, EGPSError)


# ---------------------------------------------------------------------------------------------- extend / score
def exact_first_token(model: MarkovLM, policy: PowerPolicy, prompt: tuple[int, ...]) -> torch.Tensor:
    row = model.transition[prompt[-1]] if prompt else model.initial
    weights = row.double() ** policy.alpha
    return weights / weights.sum()


@pytest.mark.parametrize(("alpha", "prompt"), [(1.0, ()), (3.0, ()), (2.0, (1, 3)), (0.5, (2,))])
def test_extend_first_token_follows_the_policy(alpha, prompt):
    model = random_markov(5, 1, eos_token_id=0)
    policy = PowerPolicy(alpha=alpha)
    n = 40_000
    seqs = model.start(prompt, n, 4, policy)
    out, cost = model.extend(seqs, torch.zeros(n, dtype=torch.long), stop=1, generator=torch.Generator().manual_seed(0))
    assert (out.length == 1).all()
    assert (out.tokens[:, 1:] == PAD).all()
    assert (cost.decode_tokens == 1).all()
    counts = torch.bincount(out.tokens[:, 0], minlength=5)
    want = exact_first_token(model, policy, prompt)
    assert chi_square_pvalue(counts, want) > 1e-4
    # A sampler that ignored the prompt or the power would be far off.
    assert 0.5 * (counts / n - want).abs().sum().item() < 0.02


@pytest.mark.parametrize("prompt", [(), (2,)])
def test_extend_whole_sequences_match_enumeration(prompt):
    # At alpha = 1 extend samples from p itself: whole completions (with EOS stops) against brute force.
    model = random_markov(3, 4, eos_token_id=1)
    T, n = 4, 30_000
    completions, log_p = enumerate_completions(model, T, prompt)
    out, cost = model.extend(
        model.start(prompt, n, T, PowerPolicy()),
        torch.zeros(n, dtype=torch.long),
        generator=torch.Generator().manual_seed(1),
    )
    index = {seq: i for i, seq in enumerate(completions)}
    counts = torch.zeros(len(completions), dtype=torch.long)
    for row, length in zip(out.tokens.tolist(), out.length.tolist(), strict=True):
        counts[index[tuple(row[:length])]] += 1  # KeyError: a completion outside the support
    assert chi_square_pvalue(counts, log_p.exp()) > 1e-4
    torch.testing.assert_close(cost.decode_tokens, out.length)
    # The stored log p is that of the sequence.
    want = torch.tensor(
        [
            log_p[index[tuple(r[:k])]].item()
            for r, k in zip(out.tokens.tolist()[:200], out.length.tolist()[:200], strict=True)
        ]
    )
    torch.testing.assert_close(out.log_p()[:200], want.double())


def test_extend_then_score_reproduces_stats():
    model = random_markov(6, 2, eos_token_id=0)
    policy = PowerPolicy(alpha=2.5)
    n, T = 300, 7
    out, _ = model.extend(
        model.start((4,), n, T, policy), torch.zeros(n, dtype=torch.long), generator=torch.Generator().manual_seed(2)
    )
    blank = out.with_(
        logp=torch.zeros_like(out.logp),
        logq=torch.zeros_like(out.logq),
        entropy=torch.zeros_like(out.entropy),
        logz=torch.zeros_like(out.logz),
    )
    scored, cost = model.score(blank, torch.zeros(n, dtype=torch.long))
    for name in ("logp", "logq", "entropy", "logz"):
        torch.testing.assert_close(getattr(scored, name), getattr(out, name), msg=name)
    torch.testing.assert_close(cost.scored_tokens, out.length)
    # Scoring from a middle position keeps the prefix stats as they are and recomputes the rest.
    start = (out.length // 2).clamp(min=0)
    half, _ = model.score(blank, start)
    mask = out.valid_mask() & (out.positions() >= start.unsqueeze(1))
    torch.testing.assert_close(half.logp[mask], out.logp[mask])
    assert (half.logp[~mask] == 0).all()
    # And the stats are the model's: log p from the table, entropy of the row.
    prev = torch.cat([torch.full((n, 1), 4), out.tokens[:, :-1]], 1)
    valid = out.valid_mask()
    table = model.transition.double()
    want_logp = table[prev[valid], out.tokens[valid]].log()
    torch.testing.assert_close(out.logp[valid], want_logp)
    rows = table[prev[valid]]
    want_entropy = -(rows * torch.where(rows > 0, rows.log(), torch.zeros_like(rows))).sum(1)
    torch.testing.assert_close(out.entropy[valid], want_entropy)


@pytest.mark.parametrize("alpha", [1.0, 2.0, 4.0])
def test_logq_and_logz_satisfy_the_power_identity(alpha):
    model = random_markov(5, 3, eos_token_id=0, concentration=0.5)
    policy = PowerPolicy(alpha=alpha)
    n = 200
    out, _ = model.extend(
        model.start((), n, 6, policy), torch.zeros(n, dtype=torch.long), generator=torch.Generator().manual_seed(3)
    )
    valid = out.valid_mask()
    torch.testing.assert_close(alpha * out.logp[valid] - out.logq[valid], out.logz[valid])
    # logz is log Σ_v p(v|h)^α of the actual history.
    prev = torch.cat([torch.full((n, 1), 5), out.tokens[:, :-1]], 1)
    table = torch.cat([model.transition, model.initial.unsqueeze(0)]).double()
    want = (table[prev[valid]] ** alpha).sum(1).log()
    torch.testing.assert_close(out.logz[valid], want)
    if alpha == 1.0:
        torch.testing.assert_close(out.logz[valid], torch.zeros_like(want), atol=1e-12, rtol=0)


def test_extend_respects_start_stop_and_eos():
    model = random_markov(4, 5, eos_token_id=0, concentration=2.0)
    policy = PowerPolicy(alpha=1.5)
    n, T = 2000, 6
    gen = torch.Generator().manual_seed(4)
    first, _ = model.extend(model.start((), n, T, policy), torch.zeros(n, dtype=torch.long), generator=gen)
    # EOS only last; rows stop at EOS or at the limit; padding after the end.
    valid = first.valid_mask()
    eos_pos = (first.tokens == 0) & valid
    assert not (eos_pos & (first.positions() < first.length.unsqueeze(1) - 1)).any()
    assert (first.finished() | (first.length == T)).all()
    assert (first.tokens[~valid] == PAD).all()
    assert (first.logp[~valid] == 0).all()

    # Re-extend from per-row start positions with a per-row stop.
    start = torch.randint(0, T + 1, (n,), generator=gen).clamp(max=first.length)
    stop = torch.randint(1, T + 1, (n,), generator=gen)
    second, cost = model.extend(first, start, stop=stop, generator=gen)
    keep = first.positions() < start.unsqueeze(1)
    assert torch.equal(second.tokens[keep], first.tokens[keep])
    assert torch.equal(second.logp[keep], first.logp[keep])
    # Kept prefixes that end in EOS are left alone; the others grow to stop (or EOS) but never past stop.
    prefix_done = first.truncated(start).finished()
    assert torch.equal(second.length[prefix_done], start[prefix_done])
    grow = ~prefix_done
    assert (second.length[grow] <= torch.maximum(stop, start)[grow]).all()
    reached = second.length == torch.maximum(stop, start)
    assert (reached | second.finished())[grow].all()
    torch.testing.assert_close(cost.decode_tokens, second.length - start)
    # Something was actually resampled.
    changed = (second.tokens != first.tokens) & ~keep
    assert changed.any()


def test_extend_stop_as_int_limits_length():
    model = random_markov(4, 6, eos_token_id=0, concentration=5.0)
    n = 500
    out, _ = model.extend(
        model.start((), n, 8, PowerPolicy()),
        torch.zeros(n, dtype=torch.long),
        stop=3,
        generator=torch.Generator().manual_seed(5),
    )
    assert (out.length <= 3).all()
    assert ((out.length == 3) | out.finished()).all()
    assert (out.length == 3).any() and (out.length < 3).any()


def test_prompt_handling():
    model = random_markov(4, 7, eos_token_id=0)
    policy = PowerPolicy()
    # Only the last prompt token matters for a Markov model.
    tokens = torch.tensor([[1, 2, 0]])
    a, _ = model.score(
        model.start((3, 1), 1, 3, policy).with_(tokens=tokens, length=torch.tensor([3])),
        torch.zeros(1, dtype=torch.long),
    )
    b, _ = model.score(
        model.start((1,), 1, 3, policy).with_(tokens=tokens, length=torch.tensor([3])), torch.zeros(1, dtype=torch.long)
    )
    c, _ = model.score(
        model.start((), 1, 3, policy).with_(tokens=tokens, length=torch.tensor([3])), torch.zeros(1, dtype=torch.long)
    )
    torch.testing.assert_close(a.logp, b.logp)
    assert a.logp[0, 0].item() == pytest.approx(math.log(model.transition[1, 1].item()))
    assert c.logp[0, 0].item() == pytest.approx(math.log(model.initial[1].item()))
    torch.testing.assert_close(a.logp[0, 1:], c.logp[0, 1:])
    with pytest.raises(EGPSError, match="prompt token ids"):
        model.start((4,), 1, 3, policy)
    with pytest.raises(EGPSError, match="flat list"):
        model.start([[[1]]], 1, 3, policy)
    with pytest.raises(EGPSError, match="one per row"):
        model.start([[1], [2]], 3, 3, policy)
    # One prompt per row: each row is scored as if it were alone.
    table, _ = model.score(
        model.start([[3, 1], [], [2]], 3, 3, policy).with_(tokens=tokens.repeat(3, 1), length=torch.full((3,), 3)),
        torch.zeros(3, dtype=torch.long),
    )
    torch.testing.assert_close(table.logp[0], a.logp[0])
    torch.testing.assert_close(table.logp[1], c.logp[0])
    assert table.logp[2, 0].item() == pytest.approx(math.log(model.transition[2, 1].item()))


def test_from_tokens_scores_and_validates():
    model = random_markov(4, 8, eos_token_id=0)
    policy = PowerPolicy(alpha=2.0)
    seqs, cost = model.from_tokens((), [[1, 2, 0], [3, 3, 3, 3]], 4, policy)
    want = math.log(model.initial[1]) + math.log(model.transition[1, 2]) + math.log(model.transition[2, 0])
    assert seqs.log_p()[0].item() == pytest.approx(want)
    assert seqs.length.tolist() == [3, 4]
    assert cost.scored_tokens.tolist() == [3, 4]
    with pytest.raises(EGPSError, match="EOS before its last token"):
        model.from_tokens((), [[1, 0, 2]], 4, policy)
    with pytest.raises(EGPSError, match="unknown token ids"):
        model.from_tokens((), [[1, 7]], 4, policy)
    with pytest.raises(EGPSError, match="max_new_tokens"):
        model.from_tokens((), [[1, 2, 3, 1, 2]], 4, policy)
