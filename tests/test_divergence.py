"""The divergence analysis: D_t = KL(π(·|h_t) || p(·|h_t)) along a completion, its statistics, and `egps analyze`."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from egps_ppl.analysis import (
    DivergenceProfile,
    clustering_test,
    correlations,
    divergence_profile,
    high_divergence_mask,
    myopic_divergence,
    plot_divergence_profile,
    pooled_summary,
    run_lengths,
    top_share,
)
from egps_ppl.analysis.divergence import kl_divergence, next_token_log_probs, plot_divergence_vs_entropy
from egps_ppl.cli import main
from egps_ppl.errors import EGPSError
from egps_ppl.models.exact import ExactPower
from egps_ppl.models.markov import MarkovLM
from egps_ppl.models.testbeds import random_markov, sparse_decision
from egps_ppl.target import PowerDistribution

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def brute_force_divergence(lm: MarkovLM, alpha: float, T: int, completion: tuple[int, ...]) -> np.ndarray:
    """D_t from the enumerated π: π(v | x_<t) = Σ_{x' ⊒ x_<t v} π(x') / Σ_{x' ⊒ x_<t} π(x')."""
    completions, log_pi = ExactPower(lm, alpha, T).enumerate()
    pi = log_pi.exp().numpy()
    log_p = next_token_log_probs(lm, [], completion).numpy()
    out = []
    for t in range(len(completion)):
        mass = np.zeros(lm.vocab_size)
        for c, w in zip(completions, pi, strict=True):
            if len(c) > t and c[:t] == completion[:t]:
                mass[c[t]] += w
        cond = mass / mass.sum()
        keep = cond > 0
        out.append(float(np.sum(cond[keep] * (np.log(cond[keep]) - log_p[t][keep]))))
    return np.asarray(out)


# ------------------------------------------------------------------------------------------ exact estimator
@pytest.mark.parametrize("alpha", [0.5, 2.0, 4.0])
def test_exact_divergence_equals_brute_force_enumeration(alpha):
    lm = random_markov(4, seed=5, concentration=0.7)
    T = 5
    completions, _ = ExactPower(lm, alpha, T).enumerate()
    rng = np.random.default_rng(0)
    target = PowerDistribution(lm, [], alpha, T)
    for index in rng.choice(len(completions), size=4, replace=False):
        x = completions[int(index)]
        profile = divergence_profile(target, list(x), "exact")
        np.testing.assert_allclose(profile.divergence, brute_force_divergence(lm, alpha, T, x), atol=1e-10)


def test_exact_conditionals_are_normalised_and_match_enumeration():
    lm = random_markov(3, seed=2)
    exact = ExactPower(lm, 3.0, 4)
    completions, log_pi = exact.enumerate()
    x = max(completions, key=len)
    cond = exact.conditional_log_probs(x).exp()
    np.testing.assert_allclose(cond.sum(1).numpy(), 1.0, atol=1e-12)
    # π(x) is the product of its own conditionals.
    chain = sum(math.log(float(cond[t, v])) for t, v in enumerate(x))
    assert chain == pytest.approx(float(log_pi[completions.index(x)]), abs=1e-10)


def test_exact_conditionals_reject_bad_completions():
    exact = ExactPower(random_markov(3, seed=2), 2.0, 4)
    with pytest.raises(EGPSError, match="EOS before"):
        exact.conditional_log_probs([0, 1])
    with pytest.raises(EGPSError, match=r"1\.\.4"):
        exact.conditional_log_probs([1, 1, 1, 1, 1])
    with pytest.raises(EGPSError, match=r"\[0, 3\)"):
        exact.conditional_log_probs([1, 7])


def test_divergence_is_zero_at_alpha_one_and_where_p_is_deterministic():
    lm = random_markov(4, seed=1)
    x = [3, 3, 1, 3, 0]
    for estimator in ("exact", "myopic"):
        profile = divergence_profile(PowerDistribution(lm, [], 1.0, 5), x, estimator)
        np.testing.assert_allclose(profile.divergence, 0.0, atol=1e-12)
    bed = sparse_decision(2, 4, seed=1)
    target = PowerDistribution(bed.model, [], 4.0, bed.max_new_tokens)
    seqs, _ = target.sample_proposal(1, torch.Generator().manual_seed(0))
    profile = divergence_profile(target, seqs, "exact")
    deterministic = profile.entropy < 1e-12
    assert deterministic.sum() > profile.length // 2
    np.testing.assert_allclose(profile.divergence[deterministic], 0.0, atol=1e-12)
    np.testing.assert_allclose(profile.myopic[deterministic], 0.0, atol=1e-12)
    assert (profile.divergence[~deterministic] > 1e-3).all()


def test_myopic_divergence_closed_form():
    p = torch.tensor([[0.5, 0.5], [0.9, 0.1], [1.0, 0.0]], dtype=torch.float64)
    q = p**3 / (p**3).sum(1, keepdim=True)
    expected = [0.0, float((q[1] * (q[1] / p[1]).log()).sum()), 0.0]
    np.testing.assert_allclose(myopic_divergence(p.log(), 3.0).numpy(), expected, atol=1e-12)
    assert float(kl_divergence(p[1].log(), p[1].log())) == 0.0


def test_divergence_concentrates_at_the_branching_positions():
    bed = sparse_decision(4, 12, seed=3)
    target = PowerDistribution(bed.model, [], 4.0, bed.max_new_tokens)
    seqs, _ = target.sample_proposal(3, torch.Generator().manual_seed(1))
    profiles = [divergence_profile(target, seqs, "exact", row=r) for r in range(3)]
    decisions = set(bed.decision_tokens)
    for profile in profiles:
        s = profile.summary()
        assert s["top_share"] > 0.6  # 10% of the positions carry most of the divergence
        assert s["corr_entropy"]["spearman"] > 0.8 and s["corr_entropy"]["pearson"] > 0.3
        # The largest divergences sit right after a decision token (the branching choice).
        top = np.argsort(-profile.divergence)[: len(decisions)]
        assert all(int(profile.tokens[t - 1]) in decisions for t in top)
        # The future factor matters there: the exact divergence exceeds the myopic one at the branches.
        assert (profile.divergence[top] > 2 * profile.myopic[top]).all()
    pooled = pooled_summary(profiles)
    assert pooled["top_share"] > 0.6 and pooled["completions"] == 3
    assert pooled["corr_myopic"]["spearman"] > 0.5


# ------------------------------------------------------------------------------------------ rollout estimator
def test_rollout_estimator_approaches_the_exact_divergence():
    lm = random_markov(4, seed=1)
    x = [3, 3, 1, 3, 0]
    for alpha in (2.0, 4.0):
        target = PowerDistribution(lm, [], alpha, 5)
        exact = divergence_profile(target, x, "exact").divergence
        errors = []
        for rollouts in (8, 4096):
            generator = torch.Generator().manual_seed(7)
            profile = divergence_profile(target, x, "rollout", top_k=4, rollouts=rollouts, horizon=None,
                                         generator=generator)  # fmt: skip
            errors.append(np.abs(profile.divergence - exact).max())
            assert profile.meta["cost"]["decode_tokens"] > 0
        assert errors[1] < 0.02 * max(1.0, exact.max()) + 0.01
        assert errors[1] < errors[0] or errors[0] < 0.01


def test_rollout_estimator_is_zero_on_deterministic_positions_and_compares_top_k():
    bed = sparse_decision(1, 3, seed=0)
    target = PowerDistribution(bed.model, [], 4.0, bed.max_new_tokens)
    seqs, _ = target.sample_proposal(1, torch.Generator().manual_seed(0))
    profile = divergence_profile(target, seqs, "rollout", top_k=2, rollouts=64, horizon=None,
                                 generator=torch.Generator().manual_seed(0))  # fmt: skip
    deterministic = profile.entropy < 1e-12
    np.testing.assert_allclose(profile.divergence[deterministic], 0.0, atol=1e-12)
    # The decision is binary, so top-2 covers it: the estimate there is close to the exact value.
    exact = divergence_profile(target, seqs, "exact")
    decision = int(np.argmax(exact.divergence))
    assert profile.divergence[decision] == pytest.approx(exact.divergence[decision], rel=0.25)


# ------------------------------------------------------------------------------------------ statistics
def test_top_share_on_hand_made_arrays():
    assert top_share([0, 0, 0, 0, 0, 0, 0, 0, 0, 5.0]) == 1.0
    assert top_share(np.ones(20)) == pytest.approx(0.1)  # ceil(0.1 * 20) = 2 of 20 equal values
    assert top_share(np.ones(15)) == pytest.approx(2 / 15)  # ceil(1.5) = 2
    assert top_share([1.0, 3.0, 0.0, 2.0], fraction=0.5) == pytest.approx(5 / 6)
    assert top_share(np.zeros(5)) is None
    with pytest.raises(EGPSError, match="fraction"):
        top_share([1.0], fraction=0.0)


def test_high_mask_and_run_lengths():
    d = np.array([0, 5, 4, 0, 0, 3, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1.0])
    mask = high_divergence_mask(d)  # ceil(0.1 * 20) = 2 positions: 1 and 2
    assert np.flatnonzero(mask).tolist() == [1, 2]
    assert np.flatnonzero(high_divergence_mask(d, 0.2)).tolist() == [1, 2, 5, 19]
    assert not high_divergence_mask(np.zeros(10)).any()  # zero divergence is never "high"
    assert run_lengths([1, 1, 0, 1, 0, 0, 1, 1, 1]).tolist() == [2, 1, 3]
    assert run_lengths([0, 0]).tolist() == []
    assert run_lengths([1, 1, 1]).tolist() == [3]


def test_clustering_test_detects_clusters_and_not_spread_positions():
    n = 200
    clustered = np.zeros(n, dtype=bool)
    clustered[[*range(10, 20), *range(100, 110)]] = True  # two runs of 10
    result = clustering_test(clustered, num_permutations=500, seed=0)
    assert result["marked"] == 20 and result["runs"] == 2 and result["mean_run_length"] == 10.0
    assert result["shuffled_mean_run_length"] == pytest.approx(1.1, abs=0.1)
    assert result["p_value"] == pytest.approx(1 / 501)  # no shuffle reaches a mean run length of 10
    assert result["clustering_ratio"] > 5
    spread = np.zeros(n, dtype=bool)
    spread[::10] = True  # isolated positions: runs of 1, as short as runs can be
    assert clustering_test(spread, num_permutations=500, seed=0)["p_value"] == 1.0
    # Seeded: the same seed gives the same permutation distribution.
    again = clustering_test(clustered, num_permutations=500, seed=0)
    assert again == result
    # Undefined when nothing is marked.
    assert clustering_test(np.zeros(5, dtype=bool))["p_value"] is None


def test_clustering_test_pools_sequences_and_shuffles_within_each():
    a = np.array([1, 1, 1, 0, 0, 0, 0, 0], dtype=bool)
    b = np.array([0, 0, 0, 0, 1, 0, 0, 0], dtype=bool)
    result = clustering_test([a, b], num_permutations=200, seed=1)
    assert result["marked"] == 4 and result["runs"] == 2 and result["mean_run_length"] == 2.0
    # Each shuffled sequence keeps its count: b always gives one run, a one to three.
    assert 4 / 4 <= result["shuffled_mean_run_length"] <= 4 / 2
    assert 0 < result["p_value"] <= 1


def test_p_value_is_a_valid_permutation_p_value():
    # Under the null (masks that are themselves random), p-values are roughly uniform: P(p <= 0.1) ≈ 0.1.
    rng = np.random.default_rng(3)
    p_values = [clustering_test(rng.random(60) < 0.15, num_permutations=99, seed=int(s))["p_value"] for s in range(200)]
    assert 0.03 < np.mean(np.asarray(p_values) <= 0.1) < 0.2


def test_correlations():
    x = np.arange(10.0)
    assert correlations(x, x**3)["spearman"] == pytest.approx(1.0)
    assert correlations(x, x**3)["pearson"] < 1.0
    assert correlations(x, -x)["pearson"] == pytest.approx(-1.0)
    assert correlations([1, 2, 2, 3], [1, 2, 3, 4])["spearman"] == pytest.approx(0.9486832980505138)  # tied ranks
    assert correlations(x, np.ones(10)) == {"spearman": None, "pearson": None}
    with pytest.raises(EGPSError, match="equal length"):
        correlations([1, 2], [1, 2, 3])


def test_profile_round_trip_summary_and_plots(tmp_path):
    bed = sparse_decision(2, 5, seed=0)
    target = PowerDistribution(bed.model, [], 4.0, bed.max_new_tokens)
    seqs, _ = target.sample_proposal(1, torch.Generator().manual_seed(0))
    profile = divergence_profile(target, seqs, "exact", meta={"problem_id": "x"})
    back = DivergenceProfile.from_record(json.loads(json.dumps(profile.to_record())))
    np.testing.assert_allclose(back.divergence, profile.divergence, atol=1e-6)
    assert back.meta["problem_id"] == "x" and back.estimator == "exact"
    s = profile.summary()
    assert set(s) >= {"top_share", "clustering", "corr_entropy", "total_divergence", "positions"}
    assert s["positions"] == profile.length
    for path in (
        plot_divergence_profile(profile, tmp_path / "p.png"),
        plot_divergence_vs_entropy([profile, back], tmp_path / "s.png"),
    ):
        assert path.read_bytes()[:8] == PNG_MAGIC
    with pytest.raises(EGPSError, match="shape"):
        DivergenceProfile(np.arange(3), np.zeros(3), np.zeros(2), np.zeros(3), np.zeros(3), np.zeros(3), 2.0, "x")


# ------------------------------------------------------------------------------------------ bad input
def test_bad_input_raises_clear_errors():
    lm = random_markov(4, seed=1)
    target = PowerDistribution(lm, [], 2.0, 5)
    with pytest.raises(EGPSError, match="unknown estimator"):
        divergence_profile(target, [1, 0], "magic")
    with pytest.raises(EGPSError, match="empty"):
        divergence_profile(target, [], "myopic")
    with pytest.raises(EGPSError, match="EOS before"):
        divergence_profile(target, [0, 1], "exact")
    with pytest.raises(EGPSError, match="max_new_tokens"):
        divergence_profile(target, [1] * 6, "exact")
    with pytest.raises(EGPSError, match="alpha"):
        PowerDistribution(lm, [], 0.0, 5)
    tilted = PowerDistribution(lm, [], 2.0, 5, log_factor=lambda s: torch.zeros(s.num_rows, dtype=torch.float64))
    with pytest.raises(EGPSError, match="log-factor"):
        divergence_profile(tilted, [1, 0], "exact")


# ------------------------------------------------------------------------------------------ real model backend
@pytest.fixture(scope="module")
def tiny():
    from egps_ppl.models.registry import load_model

    return load_model("tiny-gpt2")


def test_full_distributions_of_a_transformers_model_match_its_scores(tiny):
    prompt = tiny.encode("Hello")
    target = PowerDistribution(tiny, prompt, 3.0, 12)
    seqs, _ = target.sample_proposal(1, torch.Generator().manual_seed(0))
    profile = divergence_profile(target, seqs, "myopic")
    n = profile.length
    np.testing.assert_allclose(profile.logp, seqs.logp[0, :n].numpy(), atol=1e-4)
    np.testing.assert_allclose(profile.entropy, seqs.entropy[0, :n].numpy(), atol=1e-4)
    np.testing.assert_allclose(profile.logz, seqs.logz[0, :n].numpy(), atol=1e-4)
    with pytest.raises(EGPSError, match="Markov"):
        divergence_profile(target, seqs, "exact")
    with pytest.raises(EGPSError, match="non-empty prompt"):
        next_token_log_probs(tiny, [], [1, 2])


# ------------------------------------------------------------------------------------------ CLI
@pytest.fixture
def markov_file(tmp_path):
    bed = sparse_decision(2, 4, seed=0)
    path = tmp_path / "bed.json"
    bed.model.to_json(path)
    return path, bed.max_new_tokens


def _read_outputs(out):
    lines = [json.loads(line) for line in (out / "profiles.jsonl").read_text().splitlines()]
    summary = json.loads((out / "summary.json").read_text())
    return lines, summary


def test_cli_analyze_on_a_markov_file(markov_file, tmp_path, capsys):
    path, T = markov_file
    out = tmp_path / "exact"
    args = ["analyze", "--model", f"markov:{path}", "--estimator", "exact", "--max-new-tokens", str(T),
            "--permutations", "50", "--samples", "2", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    assert "top-10% share" in capsys.readouterr().out
    lines, summary = _read_outputs(out)
    assert len(lines) == 2 and lines[0]["estimator"] == "exact" and len(lines[0]["divergence"]) == T
    assert [line["meta"]["seed"] for line in lines] == [0, 1] and summary["pooled"]["completions"] == 2
    assert summary["pooled"]["top_share"] > 0.5 and summary["config"]["estimator"] == "exact"
    assert (out / "profile_000.png").read_bytes()[:8] == PNG_MAGIC
    assert (out / "divergence_vs_entropy.png").exists()
    # The same completion from a file, scored with the myopic estimator.
    completions = tmp_path / "c.jsonl"
    completions.write_text(json.dumps(lines[0]["tokens"]) + "\n" + json.dumps({"completion_ids": lines[0]["tokens"]}))
    out2 = tmp_path / "myopic"
    args2 = ["analyze", "--model", f"markov:{path}", "--estimator", "myopic", "--max-new-tokens", str(T),
             "--completions", str(completions), "--permutations", "10", "--out", str(out2)]  # fmt: skip
    assert main(args2) == 0
    lines2, _ = _read_outputs(out2)
    assert len(lines2) == 2 and lines2[0]["tokens"] == lines2[1]["tokens"] == lines[0]["tokens"]
    assert lines2[0]["myopic"] == lines[0]["myopic"]


def test_cli_analyze_on_tiny_gpt2(tmp_path):
    out = tmp_path / "tiny"
    args = ["analyze", "--model", "tiny-gpt2", "--prompt", "Hi there", "--max-new-tokens", "10",
            "--estimator", "rollout", "--top-k", "3", "--rollouts", "2", "--horizon", "4", "--sampler", "plain",
            "--permutations", "20", "--threads", "1", "--out", str(out)]  # fmt: skip
    assert main(args) == 0
    lines, summary = _read_outputs(out)
    assert len(lines) == 1 and lines[0]["meta"]["prompt"] == "Hi there"
    assert lines[0]["meta"]["cost"]["decode_tokens"] > 0
    assert summary["config"]["horizon"] == 4 and summary["per_completion"][0]["length"] == lines[0]["length"]
    assert (out / "profile_000.png").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--model", "tiny-gpt2", "--estimator", "exact"], "Markov"),
        (["--model", "tiny-gpt2", "--prompt", "  "], "prompt is empty"),
        (["--model", "tiny-gpt2", "--alpha", "0"], "alpha"),
        (["--model", "tiny-gpt2", "--alpha", "-2"], "alpha"),
        (["--model", "tiny-gpt2", "--fraction", "1.5"], "fraction"),
        (["--model", "tiny-gpt2", "--task", "nonsense"], "unknown task"),
    ],
)
def test_cli_analyze_bad_input(extra, message, tmp_path, capsys):
    assert main(["analyze", "--max-new-tokens", "4", "--out", str(tmp_path / "o"), *extra]) == 2
    err = capsys.readouterr().err
    assert err.startswith("egps: error:") and message in err


def test_cli_analyze_rejects_a_bad_completions_file(markov_file, tmp_path, capsys):
    path, T = markov_file
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "no ids"}\n')
    args = ["analyze", "--model", f"markov:{path}", "--completions", str(bad), "--out", str(tmp_path / "o")]
    assert main(args) == 2
    assert "completion_ids" in capsys.readouterr().err
    bad.write_text("[]\n")
    assert main([*args, "--max-new-tokens", str(T)]) == 2
    assert "empty" in capsys.readouterr().err
