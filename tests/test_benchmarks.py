"""The benchmarks run and record what they claim (cost counters only: wall-clock times are never asserted)."""

from __future__ import annotations

import itertools
import json
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `benchmarks` is a top-level folder, not part of the installed package
    sys.path.insert(0, str(ROOT))


def test_prefix_reuse_quick(tmp_path: Path) -> None:
    from benchmarks import prefix_reuse

    prefix_reuse.main(["--quick", "--out", str(tmp_path)])
    data = json.loads((tmp_path / "prefix_reuse.json").read_text())
    assert (tmp_path / "prefix_reuse.png").stat().st_size > 0
    assert data["benchmark"] == "prefix_reuse"
    assert data["config"]["quick"] is True
    assert data["config"]["threads"] >= 1
    env = data["environment"]
    for key in ("torch", "torch_threads", "cpus", "commit", "python"):
        assert key in env
    assert list(data["models"]) == ["tiny-gpt2"]
    model = data["models"]["tiny-gpt2"]

    part1 = model["prefix_reuse"]
    n, prompt = part1["completion_tokens"], part1["prompt_tokens"]
    assert n == prefix_reuse.COMPLETION_TOKENS
    assert [row["cut"] for row in part1["rows"]] == list(prefix_reuse.QUICK_CUTS)
    for row in part1["rows"]:
        cut, reuse, recompute = row["cut"], row["reuse"], row["recompute"]
        assert row["resampled_tokens"] == n - cut
        for variant in (reuse, recompute):
            assert variant["decode_tokens"] == n - cut  # EOS masked: the whole suffix is resampled
            assert len(variant["seconds"]) == row["repeats"] == 1
            assert variant["seconds_median"] > 0
        # Reuse re-feeds only x_{i-1}; recomputation prefills the prompt and the kept prefix.
        assert reuse["scored_tokens"] <= 2
        assert recompute["scored_tokens"] >= prompt + cut
        assert reuse["forward_calls"] <= n - cut + 1
        assert reuse["fed_tokens"] == reuse["scored_tokens"] + n - cut - 1
        assert row["fed_tokens_ratio"] > 1
        assert row["speedup"] > 0 and row["prefill_bound"] >= 1
    for variant in ("reuse", "recompute"):
        assert set(part1["fit"][variant]) >= {"slope_seconds_per_token", "intercept_seconds", "r2"}
    assert isinstance(part1["target"]["met"], bool)

    part2 = model["batching"]
    chains = prefix_reuse.CHAINS
    assert part2["chains"] == chains
    assert len(part2["separate"]["per_chain_seconds"]) == chains
    for variant in ("batched", "separate"):
        assert part2[variant]["decode_tokens"] > 0
        assert part2[variant]["tokens_per_second"] > 0
    # One batched decode call serves all chains; separate runs pay one call per sampled token.
    assert part2["batched"]["forward_calls"] < part2["separate"]["forward_calls"]
    assert part2["separate"]["forward_calls"] >= part2["separate"]["decode_tokens"]
    assert [s["chains"] for s in part2["scaling"]] == list(prefix_reuse.CHAIN_COUNTS)
    assert part2["speedup_throughput"] > 0

    part3 = model["long_run"]
    default, kept = part3["variants"]["default"], part3["variants"]["no_compaction"]
    assert len(default["pool_slots"]) == part3["steps"] == data["config"]["long_run_steps"]
    # The default pool stays bounded (live slots are at most prompt + max_new_tokens; it holds at most twice
    # that) and never holds more than the pool that keeps its stale slots.
    assert default["max_pool_slots"] <= 2 * (prompt + part3["max_new_tokens"])
    assert default["max_pool_slots"] <= kept["max_pool_slots"]
    assert default["max_live_slots"] <= default["max_pool_slots"]
    memory = model["memory"]
    if memory["reset_supported"]:
        assert memory["part1_peak_rss_bytes"] > 0 and default["peak_rss_bytes"] > 0


def test_common_helpers(tmp_path: Path) -> None:
    from benchmarks.common import Timer, jsonable, median, write_results

    torch = pytest.importorskip("torch")
    with Timer() as timer:
        pass
    assert timer.seconds >= 0
    assert median([3.0, 1.0, 2.0]) == 2.0 and median([1.0, 2.0]) == 1.5
    assert jsonable({"a": torch.tensor([1, 2]), "b": float("nan"), "c": (1, 2.5)}) == {
        "a": [1, 2],
        "b": None,
        "c": [1, 2.5],
    }
    json_path, png_path = write_results("demo", {"x": 1}, tmp_path)
    assert png_path is None and json.loads(json_path.read_text()) == {"x": 1}


def test_frontier_quick(tmp_path: Path) -> None:
    from benchmarks import frontier

    payload = frontier.main(["--quick", "--out", str(tmp_path)])
    points = payload["points"]
    assert set(points) == {p.label for p in frontier.quick_points()}
    assert payload["reference"] == "mh-steps2"
    for label, entry in points.items():
        assert entry["units"] == 6 and entry["seeds"] == [0, 1]  # 3 problems x 2 seeds each
        assert entry["decode_tokens_per_unit"] > 0 and entry["wall_s_per_unit"] > 0
        assert set(entry["wall_s_per_unit_by_device"]) == {"cpu"}
        if label != "mh-steps2":
            assert entry["vs_reference"]["units"] == 6 and entry["vs_reference"]["problems"] == 3
    # More MCMC steps cost more decode tokens; MCMC records say whether the start's answer changed.
    assert points["mh-steps2"]["decode_tokens_per_unit"] > points["mh-steps1"]["decode_tokens_per_unit"]
    assert points["mh-steps1"]["answer_changed_share"] is not None
    assert (tmp_path / "arithmetic" / "frontier_arithmetic.png").stat().st_size > 0
    # Rerunning resumes: nothing is recomputed.
    again = frontier.main(["--quick", "--out", str(tmp_path)])
    assert {k: v["units"] for k, v in again["points"].items()} == {k: v["units"] for k, v in points.items()}


def test_frontier_mcmc_step_budgets(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from benchmarks import frontier

    labels = [p.label for p in frontier.default_points((40,))]
    assert "mh-steps40" in labels and "egps-local-steps40" in labels and "mh-steps2" not in labels
    for bad in ("0", "2,x"):
        with pytest.raises(SystemExit):
            frontier.main(["--mcmc-steps", bad, "--report-only", "--out", str(tmp_path)])
        assert "--mcmc-steps must be" in capsys.readouterr().err


def test_frontier_timing_is_kept_per_device(tmp_path: Path) -> None:
    from benchmarks.frontier import TIMING_FILE, device_kind, read_timing

    assert read_timing(tmp_path) == {}
    # The one-device layout of runs written before devices were told apart was the CPU's.
    (tmp_path / TIMING_FILE).write_text(json.dumps({"seconds": 3.0, "units": 2}))
    assert read_timing(tmp_path) == {"cpu": {"seconds": 3.0, "units": 2}}
    both = {"cpu": {"seconds": 3.0, "units": 2}, "cuda-bfloat16": {"seconds": 0.5, "units": 4}}
    (tmp_path / TIMING_FILE).write_text(json.dumps(both))
    assert read_timing(tmp_path) == both
    assert [device_kind(d, t) for d, t in [("cpu", "float32"), ("cuda:1", "float32"), ("cuda", "bfloat16")]] == [
        "cpu",
        "cuda",
        "cuda-bfloat16",
    ]


def test_paired_difference_is_clustered_by_problem() -> None:
    import random

    from benchmarks.frontier import paired

    a = {("p1", 0): {"correct": True}, ("p1", 1): {"correct": True}, ("p2", 0): {"correct": False}}
    b = {("p1", 0): {"correct": False}, ("p1", 1): {"correct": True}, ("p2", 0): {"correct": False}}
    result = paired(a, b, random.Random(0), reps=200)
    # Per problem: p1 (1 + 0) / 2 = 0.5, p2 0 -> mean 0.25 over 2 problems.
    assert result["diff"] == 0.25 and result["problems"] == 2 and result["units"] == 3
    assert result["ci95"][0] <= 0.25 <= result["ci95"][1]


def test_fidelity_quick(tmp_path: Path) -> None:
    from benchmarks import fidelity

    payload = fidelity.main(["--quick", "--out", str(tmp_path)])
    assert len(payload["problems"]) == 2
    for problem in payload["problems"]:
        assert abs(sum(problem["reference"].values()) - 1.0) < 1e-9
        assert 0.0 <= problem["mh_vs_smc_tv"] <= 1.0 and problem["top_answer"] in problem["reference"]
        assert 0.0 <= problem["mh_vs_reference_tv"] <= 1.0 and 0.0 <= problem["smc_vs_reference_tv"] <= 1.0
        # The exact reference's certificate: on a nearly uniform model 48 expansions certify almost nothing.
        assert 0.0 < problem["exact_tv_bound"] <= 1.0 and problem["exact_completions"] >= 1
        assert 0.0 <= problem["pi_accuracy"] <= 1.0
        assert 0.0 <= problem["noise_floor"] <= 1.0  # of the methods' --chains draws
    assert set(payload["curves"]) == {"low-temp", "mh", "egps"}
    assert [p["steps"] for p in payload["curves"]["mh"]] == [1, 2]
    for points in payload["curves"].values():
        assert all(0.0 <= p["tv_mean"] <= 1.0 and p["decode_tokens_per_chain"] > 0 for p in points)
    assert payload["mixing"]["mh"]["problems"][0]["rhat_log_p"] is not None
    assert (tmp_path / "fidelity.png").stat().st_size > 0


def test_total_variation_and_noise_floor() -> None:
    from benchmarks.fidelity import histogram, noise_floor, tv

    assert histogram(["1", "1", "2", None]) == {"1": 0.5, "2": 0.25, "None": 0.25}
    assert tv({"1": 1.0}, {"2": 1.0}) == 1.0
    reference = {"1": 0.5, "2": 0.5}
    # More exact draws, less sampling noise.
    assert noise_floor(reference, 400) < noise_floor(reference, 16) < 0.25


def test_batched_eval_quick(tmp_path: Path) -> None:
    from benchmarks import batched_eval

    payload = batched_eval.main(["--quick", "--out", str(tmp_path), "--methods", "low-temp,mh", "--steps", "2"])
    assert payload["config"]["batches"] == list(batched_eval.QUICK_BATCHES)
    for result in payload["methods"].values():
        # Batching changes the speed, never the records.
        assert result["records_identical_across_batches"]
        rows = result["rows"]
        assert [r["batch"] for r in rows] == list(batched_eval.QUICK_BATCHES)
        assert all(r["units"] == payload["config"]["units"] and r["units_per_cpu_second"] > 0 for r in rows)
        assert len({r["decode_tokens"] for r in rows}) == 1  # the same work, whatever the batch
    assert (tmp_path / "batched_eval.png").stat().st_size > 0


@pytest.fixture
def presets_restored() -> Iterator[None]:
    """The ablations register their kernels as presets: other tests see the registry as it was."""
    from egps_ppl.kernels.presets import PRESETS

    saved = dict(PRESETS)
    yield
    PRESETS.clear()
    PRESETS.update(saved)


@pytest.mark.usefixtures("presets_restored")
def test_ablations_quick(tmp_path: Path) -> None:
    from benchmarks import ablations

    payload = ablations.main(["--quick", "--out", str(tmp_path)])
    points = payload["points"]
    assert set(points) == {p.label for _, p in ablations.quick_points()}
    assert payload["reference"] == "mh-steps2"
    assert {e["axis"] for e in points.values()} == {"reference", "tries", "cut"}
    for label, entry in points.items():
        assert entry["units"] == 3 and entry["decode_tokens_per_unit"] > 0
        if label != "mh-steps2":
            assert entry["vs_reference"]["units"] == 3
    table = (tmp_path / "arithmetic" / "ablations.md").read_text().splitlines()
    assert table[0].startswith("| axis | point |") and len(table) == 2 + len(points)
    assert (tmp_path / "arithmetic" / "ablations_arithmetic.png").stat().st_size > 0


@pytest.mark.usefixtures("presets_restored")
@pytest.mark.parametrize("name", ["abl-k2", "abl-cut-uniform", "abl-cut-entropy", "abl-first-t0.5", "abl-first-cold"])
def test_ablation_kernels_leave_pi_invariant(name: str) -> None:
    from benchmarks.ablations import register
    from egps_ppl.kernels.presets import build_kernel
    from egps_ppl.models.markov import MarkovLM
    from egps_ppl.testing import assert_invariant

    register()
    lm = MarkovLM([0.4, 0.3, 0.3], [[1 / 3] * 3, [0.45, 0.5, 0.05], [0.2, 0.1, 0.7]], 0)
    report = assert_invariant(lambda t: build_kernel(name, t), lm, 4.0, 5, num_chains=40_000, steps=2)
    assert report.num_states > 10


def test_block_entropy_summary_counts_deterministic_blocks() -> None:
    import numpy as np

    from benchmarks.block_entropy import EPSILON, summarize
    from egps_ppl.infer.schedule import EntropyAdaptiveSchedule

    # The benchmark counts what the schedule would skip, with the schedule's own threshold and rate.
    assert EntropyAdaptiveSchedule.epsilon == EPSILON and EntropyAdaptiveSchedule.moves_per_nat == 2.0

    # Two completions: 8 positions with one uncertain token, and 4 deterministic positions.
    a = np.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0])
    b = np.zeros(4)
    s = summarize([a, b], blocks=(4,), epsilon=0.05)
    # Blocks of 4: [0] [1.0] from a, [0] from b -> 2 of 3 under epsilon; the schedule gives ceil(2 * 1.0) = 2 steps.
    assert s["blocks"]["4"] == {
        "blocks": 3, "share_below_epsilon": round(2 / 3, 4), "median_mass": 0.0, "mean_adaptive_steps": round(2 / 3, 3)
    }  # fmt: skip
    assert s["share_positions_below_epsilon"] == round(11 / 12, 4) and s["mean_entropy_mass"] == 0.5
    assert s["top10_share_of_mass"] == 1.0  # b has no mass and is left out; a's top position holds all of it


def test_block_entropy_rescores_a_run(tmp_path: Path) -> None:
    import numpy as np

    from benchmarks import block_entropy
    from egps_ppl.analysis.divergence import next_token_log_probs
    from egps_ppl.evals.methods import load_method
    from egps_ppl.evals.runner import evaluate
    from egps_ppl.evals.tasks import load_task
    from egps_ppl.models.registry import load_model

    run = tmp_path / "run"
    evaluate(load_task("arithmetic"), load_method("low-temp"), load_model("tiny-gpt2"), [0], 3, run,
             progress=False, max_new_tokens=6)  # fmt: skip
    payload = block_entropy.main([str(run), "--quick", "--out", str(tmp_path / "out")])
    summary = payload["runs"][str(run)]
    assert summary["completions"] == 3 and summary["positions"] == 18
    # tiny-gpt2 is a random model: uncertain everywhere, so no block is deterministic.
    assert all(entry["share_below_epsilon"] == 0.0 for entry in summary["blocks"].values())
    # The rescored entropies are the model's: H_t of the full next-token distributions along the completion.
    lm = load_model("tiny-gpt2")
    # Batched: three prompts of their own lengths in one forward pass, each row as if alone.
    task = load_task("arithmetic")
    problems = {p.id: p for p in task.problems(3)}
    got = block_entropy.completion_entropies(run, "tiny-gpt2", batch=3)
    for line, entropy in zip((run / "results.jsonl").read_text().splitlines(), got, strict=True):
        record = json.loads(line)
        prompt = task.build_prompt(problems[record["problem_id"]], lm)
        log_p = next_token_log_probs(lm, prompt, record["completion_ids"])
        assert np.allclose(entropy, -(log_p.exp() * log_p).sum(-1).numpy(), atol=1e-4)
    assert (tmp_path / "out" / "block_entropy.png").stat().st_size > 0


def test_multistep_levels_runs_each_variant(tmp_path: Path) -> None:
    from benchmarks import multistep_levels
    from egps_ppl.evals.tasks import MULTISTEP_LEVELS

    assert multistep_levels.VARIANTS["small"] == MULTISTEP_LEVELS["easy"]  # the level the docs say was chosen
    payload = multistep_levels.main(
        ["--model", "tiny-gpt2", "--problems", "2", "--variants", "default,small", "--out", str(tmp_path)]
    )
    assert [row["variant"] for row in payload["variants"]] == ["default", "small"]
    assert all(row["units"] == 4 and 0 <= row["accuracy"] <= 1 for row in payload["variants"])
    assert (tmp_path / "multistep_levels_seed100.json").exists()


def test_try_sharing_counts_distinct_histories(tmp_path: Path) -> None:
    from benchmarks import try_sharing

    payload = try_sharing.main(["--quick", "--out", str(tmp_path)])
    assert len(payload["kinds"]) == 3
    for row in payload["kinds"].values():
        assert 0 < row["distinct"] <= row["try_tokens"] and 0.0 <= row["shared_share"] < 1.0


def test_exact_pi_quick_resumes_and_pairs(tmp_path: Path) -> None:
    from benchmarks import exact_pi

    payload = exact_pi.main(["--quick", "--out", str(tmp_path)])
    lines = (tmp_path / "arithmetic" / "exact-pi" / "problems.jsonl").read_text().splitlines()
    assert payload["problems"] == 2 and len(lines) == 2
    for row in map(json.loads, lines):
        assert abs(sum(row["marginal"].values()) - 1.0) < 1e-9 and 0.0 < row["tv_bound"] <= 1.0
        assert 0.0 <= row["pi_accuracy"] <= 1.0 and row["completions"] >= 1
        # π's most probable completions, best first, with their share of the mass found.
        top = row["top"]
        assert 1 <= len(top) <= min(exact_pi.TOP, row["completions"]) and top[0]["log_p"] == row["best_log_p"]
        assert all(a["pi"] >= b["pi"] for a, b in itertools.pairwise(top)) and sum(t["pi"] for t in top) <= 1 + 1e-9
        assert all(t["answer"] in row["marginal"] and t["tokens"] >= 1 for t in top)
        best = row["best_correct"]
        assert (best is None) == (row["pi_accuracy"] == 0) and (best is None or best["correct"])
    assert payload["vs_points"] == {}  # no frontier run beside it
    low, high = payload["pi_accuracy_interval"]
    assert low <= payload["pi_accuracy"] <= high and payload["certified"]["problems"] == 0  # tiny-gpt2: no bound
    # A frontier point beside it is paired problem by problem; the second run computes nothing new.
    point = tmp_path / "arithmetic" / "low-temp"
    point.mkdir()
    ids = [json.loads(line)["problem_id"] for line in lines]
    extra = {"method": "low-temp", "completion": "", "answer": "1", "decode_tokens": 1, "scored_tokens": 0,
             "forward_calls": 1, "wall_s": 0.0}  # fmt: skip
    point.joinpath("results.jsonl").write_text(
        "".join(json.dumps({"problem_id": i, "seed": 0, "correct": True, **extra}) + "\n" for i in ids)
    )
    again = exact_pi.main(["--quick", "--out", str(tmp_path)])
    assert len((tmp_path / "arithmetic" / "exact-pi" / "problems.jsonl").read_text().splitlines()) == 2
    assert again["vs_points"]["low-temp"]["diff"] == round(again["pi_accuracy"] - 1.0, 4)
    # The frontier's report and table carry π as a row paired against its reference.
    from benchmarks.frontier import Point, markdown_table, report

    result = report([Point("low-temp")], tmp_path / "arithmetic", "low-temp")
    assert result["exact_pi"]["problems"] == 2 and result["exact_pi"]["vs_reference"]["problems"] == 2
    assert "π itself" in markdown_table(result).splitlines()[-1]
    # --problems picks named problems; a name that is not there is a one-line error.
    only = exact_pi.main(["--quick", "--out", str(tmp_path / "only"), "--problems", ids[1]])
    assert only["problems"] == 1
    with pytest.raises(SystemExit, match="not among the first 2 problems"):
        exact_pi.main(["--quick", "--out", str(tmp_path / "only"), "--problems", "no-such-problem"])


def test_fidelity_takes_the_exact_reference_from_an_exact_pi_run(tmp_path: Path) -> None:
    from benchmarks import exact_pi, fidelity

    exact_pi.main(["--quick", "--out", str(tmp_path / "frontier")])
    lines = tmp_path / "frontier" / "arithmetic" / "exact-pi" / "problems.jsonl"
    rows = {r["problem_id"]: r for r in map(json.loads, lines.read_text().splitlines())}
    # Mark the lines so that a recomputation could not produce them: fidelity must reuse them as they are.
    lines.write_text("".join(json.dumps({**r, "pi_accuracy": 0.25}) + "\n" for r in rows.values()))
    payload = fidelity.main(["--quick", "--out", str(tmp_path / "fid"), "--exact-from", str(lines)])
    assert [p["problem_id"] for p in payload["problems"]] == list(rows)
    assert all(p["pi_accuracy"] == 0.25 for p in payload["problems"])
    # Other settings (another tolerance) are not reused.
    other = ["--exact-from", str(lines), "--exact-tol", "0.2"]
    again = fidelity.main(["--quick", "--out", str(tmp_path / "fid2"), *other])
    assert all(p["pi_accuracy"] != 0.25 for p in again["problems"])


def test_subnormal_quick(tmp_path: Path) -> None:
    from benchmarks import subnormal

    result = subnormal.main(["--quick", "--out", str(tmp_path)])
    assert 0.0 <= result["per_step"]["subnormal_share_q"] <= 1.0
    for mode in subnormal.MODES:
        assert result["per_step"][mode]["next_token_stats_ms"] > 0
    for entry in result["end_to_end"].values():
        # Flushing changes only tokens of probability below 1.2e-38: the same units give the same records.
        assert entry["identical_records"] == "4/4" and entry["flushed_cpu_s"] > 0 and entry["decode_tokens"] > 0
    assert (tmp_path / "subnormal.png").stat().st_size > 0
    # The plain functions are put back afterwards.
    from egps_ppl.models import base, policy

    assert base.exp_flushed is policy.exp_flushed and policy.logsumexp_flushed.__module__ == policy.__name__


def test_precision_quick(tmp_path: Path) -> None:
    from benchmarks import precision

    result = precision.main(["--quick", "--out", str(tmp_path)])
    num = result["numerics"]
    assert num["sequences"] == 4 * 4 and num["mean_tokens"] > 0
    # float32 records the same log p while decoding as when teacher forcing; bf16 moves log p at all.
    assert num["decode_vs_forced"]["float32"]["max"] < 1e-3
    assert num["abs_dlogp_per_sequence"]["mean"] > 0
    flips, pairs = map(int, num["order_flips"].split("/"))
    assert 0 <= flips <= pairs == num["pairs"]
    for entry in result["speed"].values():
        for dtype in precision.DTYPES:
            assert entry[dtype]["seconds"] > 0 and 0.0 <= entry[dtype]["accuracy"] <= 1.0
    assert (tmp_path / "precision.png").stat().st_size > 0


def test_run_cli_one_line_error() -> None:
    from benchmarks.common import run_cli
    from egps_ppl.errors import EGPSError

    def bad() -> None:
        raise EGPSError("cannot resume x: the run used different settings (dtype: was 'float32', now 'bfloat16')")

    with pytest.raises(SystemExit) as info:
        run_cli(bad, "frontier")
    assert str(info.value.code) == (
        "frontier: cannot resume x: the run used different settings (dtype: was 'float32', now 'bfloat16')"
    )
    run_cli(lambda: None, "frontier")  # a normal return passes through


def test_copy_plots(tmp_path: Path) -> None:
    from benchmarks.common import copy_plots

    png = tmp_path / "a.png"
    png.write_bytes(b"png")
    copy_plots(None, png)  # no --docs: nothing to do
    copy_plots(tmp_path / "docs", png, None)  # a plot that was not written is skipped
    assert (tmp_path / "docs" / "a.png").read_bytes() == b"png"
    assert [p.name for p in (tmp_path / "docs").iterdir()] == ["a.png"]
