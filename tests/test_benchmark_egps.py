"""The EGPS speed-up benchmark in quick mode: JSON structure, and EGPS beats MH on an exact test bed.

The assertions are properties of the algorithms on an exact Markov model with fixed seeds (decode-token counts
and TV to the exact power distribution), never timings.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `pytest` (unlike `python -m pytest`) does not put the repository root on the path
    sys.path.insert(0, str(ROOT))

egps_speedup = importlib.import_module("benchmarks.egps_speedup")

KERNEL_KEYS = {
    "kernel",
    "seed",
    "converged",
    "steps",
    "decode_tokens",
    "scored_tokens",
    "wall_seconds",
    "spent",
    "final_tv",
    "start_tv",
    "acceptance_rate_mean",
    "lower_bound",
    "extrapolation",
    "curve",
}


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("egps_speedup")
    payload = egps_speedup.main(["--quick", "--out", str(out)])
    return payload, out


def test_quick_run_writes_json_and_plots(quick_run: tuple[dict, Path]) -> None:
    payload, out = quick_run
    written = json.loads((out / "egps_speedup.json").read_text())
    assert written["name"] == "egps_speedup"
    assert written["quick"] is True
    assert written["torch_threads"] >= 1
    assert written["tv_threshold"] == egps_speedup.TV_THRESHOLD
    assert written["smollm2"] == {"skipped": "--quick"}
    for name in written["plots"]:
        assert (out / name).stat().st_size > 0
    assert {"egps_speedup_tv.png", "egps_speedup_cost.png"} <= set(written["plots"])
    assert len(written["testbeds"]) == len(payload["testbeds"]) == 1


def test_quick_run_structure(quick_run: tuple[dict, Path]) -> None:
    payload, _ = quick_run
    bed = payload["testbeds"][0]
    assert (bed["num_decisions"], bed["run_length"], bed["chains"]) == (2, 4, 300)
    assert set(bed["kernels"]) == set(egps_speedup.KERNELS)
    exact = bed["exact"]
    assert len(exact["unlikely_marginals"]) == 2
    assert sum(exact["joint"]) == pytest.approx(1.0)
    # The DP marginal agrees with the closed form of the test bed.
    assert exact["unlikely_marginals"][0] == pytest.approx(exact["closed_form"]["power"], abs=1e-9)
    assert 0.0 < bed["noise_floor_tv"]["mean"] < egps_speedup.TV_THRESHOLD
    for name, res in bed["kernels"].items():
        assert set(res) >= KERNEL_KEYS, name
        curve = res["curve"]
        assert len(curve["tv"]) == len(curve["decode_tokens"]) == len(curve["step"]) == len(curve["wall_seconds"])
        assert all(b >= a for a, b in zip(curve["decode_tokens"], curve["decode_tokens"][1:], strict=False))
        assert res["start_tv"] > 0.5  # the low-temperature start is far from π
        if res["converged"]:
            assert res["decode_tokens"] <= res["spent"]["decode_tokens"]
            assert res["tv_at_threshold"] <= egps_speedup.TV_THRESHOLD
            assert res["lower_bound"] is None
        else:
            assert res["decode_tokens"] is None
            assert res["lower_bound"]["decode_tokens"] >= egps_speedup.QUICK.budget_decode_tokens
    assert set(bed["ratios_vs_candidate"]) == set(egps_speedup.KERNELS) - {egps_speedup.CANDIDATE}
    assert len(bed["candidate_seeds"]) == len(egps_speedup.QUICK.candidate_seeds)
    assert "D=2, L=4" in payload["headline"]["testbeds"]


def test_egps_reaches_target_with_fewer_decode_tokens_than_mh(quick_run: tuple[dict, Path]) -> None:
    payload, _ = quick_run
    kernels = payload["testbeds"][0]["kernels"]
    egps, mh = kernels["egps"], kernels["mh"]
    assert egps["converged"], f"egps did not reach TV <= 0.05 (final TV {egps['final_tv']:.3f})"
    mh_cost = mh["decode_tokens"] if mh["converged"] else mh["spent"]["decode_tokens"]
    assert egps["decode_tokens"] < mh_cost
    ratio = payload["headline"]["testbeds"]["D=2, L=4"]["decode_tokens_ratio"]
    assert (ratio["value"] or ratio["lower_bound"]) > 1.0


def test_markdown_tables_render(quick_run: tuple[dict, Path]) -> None:
    payload, _ = quick_run
    text = egps_speedup.markdown_tables(payload)
    assert "| egps |" in text and "| mh |" in text


egps_design = importlib.import_module("benchmarks.egps_design")


@pytest.fixture(scope="module")
def design_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("egps_design")
    return egps_design.main(["--quick", "--out", str(out)]), out


def test_design_quick_run_writes_json_plot_and_table(design_run: tuple[dict, Path]) -> None:
    payload, out = design_run
    written = json.loads((out / "egps_design.json").read_text())
    assert written["name"] == "egps_design" and written["quick"] is True
    assert (out / "egps_design.png").stat().st_size > 0
    bed = written["beds"][0]
    assert set(bed["variants"]) == set(egps_design.QUICK_VARIANTS)
    for entry in bed["variants"].values():
        assert len(entry["runs"]) == len(written["seeds"])
        assert entry["decode_min"] <= entry["decode_median"] <= entry["decode_max"]
    assert "| egps |" in egps_design.markdown(payload)


def test_design_egps_keeps_its_lead_over_suffix_moves_alone(design_run: tuple[dict, Path]) -> None:
    """On the exact test bed the mixture reaches π with fewer decode tokens than its suffix moves alone, and
    every seed of it reaches the threshold (properties of fixed seeds on an exact model, not timings)."""
    variants = design_run[0]["beds"][0]["variants"]
    assert variants["egps"]["reached"] == len(variants["egps"]["runs"])
    assert variants["egps"]["decode_max"] < variants["w=1 (suffix only)"]["decode_min"]
