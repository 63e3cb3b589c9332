"""Tests for the ArviZ export (RUN.nc contract), NetCDF I/O, summaries and plots."""

from __future__ import annotations

import json
import math
import re
import sys
import tomllib
import types
import warnings
from pathlib import Path

import numpy as np
import pytest
import xarray as xr

from egps_ppl.diagnostics import (
    arviz_export,
    format_summary,
    group_dataset,
    load_netcdf,
    plot_entropy_profile,
    plot_trace,
    save_netcdf,
    summarize,
    to_arviz,
)
from egps_ppl.diagnostics import summary as summary_module
from egps_ppl.diagnostics.arviz_export import az
from egps_ppl.errors import EGPSError
from egps_ppl.infer import MCMC
from egps_ppl.kernels import MetropolisHastings
from egps_ppl.models.testbeds import random_markov
from egps_ppl.target import PowerDistribution

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAT_DTYPES = {
    "lp": np.float64,
    "acceptance_rate": np.float64,
    "is_accepted": np.bool_,
    "cut_position": np.int64,
    "decode_tokens": np.int64,
    "scored_tokens": np.int64,
}


def make_run(n_chain: int = 3, n_draw: int = 6, n_pos: int = 5, seed: int = 0) -> tuple[dict, dict, dict]:
    """Random arrays in the runner's format: tokens padded with -1 past each length."""
    rng = np.random.default_rng(seed)
    length = rng.integers(0, n_pos + 1, size=(n_chain, n_draw))
    tokens = rng.integers(0, 50, size=(n_chain, n_draw, n_pos))
    tokens[np.arange(n_pos) >= length[..., None]] = -1
    log_p = rng.normal(-10, 2, size=(n_chain, n_draw))
    token_logp = np.where(tokens >= 0, rng.normal(-2, 1, size=tokens.shape), 0.0)  # zero past the end, as a state
    posterior = {"tokens": tokens, "length": length, "log_p": log_p}
    sample_stats = {
        "lp": 4.0 * log_p,
        "acceptance_rate": rng.random((n_chain, n_draw)),
        "is_accepted": rng.random((n_chain, n_draw)) < 0.4,
        "cut_position": rng.integers(-1, n_pos, size=(n_chain, n_draw)),
        "decode_tokens": rng.integers(0, 9, size=(n_chain, n_draw)),
        "scored_tokens": rng.integers(0, 9, size=(n_chain, n_draw)),
        "num_tries": rng.integers(1, 4, size=(n_chain, n_draw)).astype(np.int32),  # an extra stat: passes through
        "token_logp": token_logp,
        "entropy": np.where(tokens >= 0, rng.random(tokens.shape), 0.0).astype(np.float32),
    }
    attrs = {"alpha": 4.0, "kernel": "mh", "model": "markov:m.json", "seed": 7, "max_new_tokens": n_pos}
    return posterior, sample_stats, attrs


class MigrationWarning(UserWarning, FutureWarning):
    """ArviZ 1.x's warning class (``arviz.MigrationWarning``)."""


class FakeArviz1(types.ModuleType):
    """Stands in for ArviZ >= 1.1 where it matters to us: ``az.InferenceData`` is ``xarray.DataTree`` itself,
    handed out with a MigrationWarning (the real module's ``__getattr__`` does exactly this).

    ``rhat``/``ess`` delegate to the installed ArviZ, whose Dataset-in/Dataset-out behaviour matches 1.x. The
    real ArviZ 1.x runs these tests too: ``make test-arviz1``.
    """

    def __init__(self) -> None:
        super().__init__("arviz")
        self.__version__ = "1.3.0"
        self.rhat, self.ess = az.rhat, az.ess

    def __getattr__(self, name: str):
        if name == "InferenceData":
            warnings.warn("arviz.InferenceData is no longer available on the arviz package", MigrationWarning, 2)
            return xr.DataTree
        raise AttributeError(name)


def simulate_arviz_1(patch: pytest.MonkeyPatch) -> None:
    """Swap the ArviZ seen by the export and the summary for :class:`FakeArviz1`."""
    fake = FakeArviz1()
    patch.setattr(arviz_export, "az", fake)
    patch.setattr(summary_module, "az", fake)


@pytest.fixture(params=["installed", "arviz1"])
def container(request, monkeypatch) -> str:
    """Run each test with the installed ArviZ and with a simulated ArviZ 1.x (xarray.DataTree container).

    Under the real ArviZ 1.x (``make test-arviz1``) both runs use a DataTree."""
    if request.param == "arviz1":
        simulate_arviz_1(monkeypatch)
    return request.param


def expected_type(container: str) -> type:
    return xr.DataTree if container == "arviz1" or arviz_export.uses_datatree() else az.InferenceData


# --------------------------------------------------------------------------- export contract
def test_export_matches_run_nc_contract(container):
    posterior, stats, attrs = make_run()
    data = to_arviz(posterior, stats, {**attrs, "flag": True, "note": None, "prompt": [1, 2]})
    assert isinstance(data, expected_type(container))
    post, ss = group_dataset(data, "posterior"), group_dataset(data, "sample_stats")

    assert post["tokens"].dims == ("chain", "draw", "position")
    assert post["tokens"].dtype == np.int64
    assert post["length"].dims == ("chain", "draw") and post["length"].dtype == np.int64
    assert post["log_p"].dims == ("chain", "draw") and post["log_p"].dtype == np.float64
    for name, dtype in STAT_DTYPES.items():
        assert ss[name].dims == ("chain", "draw"), name
        assert ss[name].dtype == dtype, name
    assert ss["num_tries"].dtype == np.int32
    valid = np.arange(5) < posterior["length"][..., None]
    for name in ("token_logp", "entropy"):
        assert ss[name].dims == ("chain", "draw", "position") and ss[name].dtype == np.float64, name
        values = ss[name].values
        assert np.isnan(values[~valid]).all() and not np.isnan(values[valid]).any(), name  # NaN exactly past length
        np.testing.assert_allclose(values[valid], np.asarray(stats[name], dtype=np.float64)[valid])
    np.testing.assert_array_equal(ss["position"].values, np.arange(5))
    np.testing.assert_array_equal(post["chain"].values, [0, 1, 2])
    np.testing.assert_array_equal(post["draw"].values, np.arange(6))
    np.testing.assert_array_equal(post["position"].values, np.arange(5))
    for group in (post, ss):
        assert group.attrs["alpha"] == 4.0
        assert group.attrs["kernel"] == "mh" and group.attrs["model"] == "markov:m.json"
        assert group.attrs["seed"] == 7
        assert group.attrs["flag"] == "true" and group.attrs["note"] == "null"
        assert json.loads(group.attrs["prompt"]) == [1, 2]


def test_export_observed_group(container):
    posterior, stats, attrs = make_run()
    data = to_arviz(posterior, stats, attrs, observed={"prompt_ids": np.array([5, 6, 7])})
    observed = group_dataset(data, "observed_data")
    np.testing.assert_array_equal(observed["prompt_ids"].values, [5, 6, 7])
    assert "chain" not in observed.dims


@pytest.mark.parametrize(
    ("group", "name", "value", "message"),
    [
        ("posterior", "log_p", None, "missing log_p"),
        ("sample_stats", "scored_tokens", None, "missing scored_tokens"),
        ("sample_stats", "lp", np.zeros((3, 5)), "shape"),
        ("posterior", "length", np.full((3, 6), 0.5), "integers"),
        ("posterior", "length", np.full((3, 6), 9), "length must lie"),
        ("sample_stats", "is_accepted", np.full((3, 6), 2), "boolean"),
        ("sample_stats", "entropy", np.zeros((3, 6, 4)), "expected \\[chain, draw, position\\]"),
        ("sample_stats", "token_logp", np.zeros((3, 6)), "expected \\[chain, draw, position\\]"),
    ],
)
def test_export_rejects_bad_input(group, name, value, message):
    posterior, stats, attrs = make_run()
    target = posterior if group == "posterior" else stats
    if value is None:
        del target[name]
    else:
        target[name] = value
    with pytest.raises(EGPSError, match=message):
        to_arviz(posterior, stats, attrs)


def test_datatree_is_never_taken_for_inference_data(monkeypatch):
    """ArviZ >= 1.1 answers ``az.InferenceData`` with ``xarray.DataTree``: the export must test for a DataTree
    first (taking a DataTree for InferenceData calls ``.groups()``, a tuple there: TypeError) and never touch the
    deprecated name on 1.x (one MigrationWarning per call otherwise)."""
    simulate_arviz_1(monkeypatch)
    with pytest.warns(MigrationWarning):
        assert arviz_export.az.InferenceData is xr.DataTree  # the stand-in behaves like the real 1.x
    posterior, stats, attrs = make_run()
    with warnings.catch_warnings():
        warnings.simplefilter("error", MigrationWarning)
        data = to_arviz(posterior, stats, attrs)
        assert isinstance(data, xr.DataTree)
        assert not arviz_export._is_inference_data(data)
        assert arviz_export.group_names(data) == ["posterior", "sample_stats"]
        summarize(data)


def test_uses_datatree_follows_arviz_major_version(monkeypatch):
    for version, expected in [("0.23.4", False), ("1.0.0.dev0", True), ("1.0.0", True), ("1.2.3rc1", True)]:
        monkeypatch.setattr(arviz_export.az, "__version__", version)
        assert arviz_export.uses_datatree() is expected, version


# --------------------------------------------------------------------------- NetCDF I/O
def assert_same_groups(a, b, ignore_attrs: tuple[str, ...] = ()) -> None:
    for group in ("posterior", "sample_stats"):
        left, right = group_dataset(a, group), group_dataset(b, group)
        assert set(left.data_vars) == set(right.data_vars)
        for name in left.data_vars:
            assert left[name].dtype == right[name].dtype, name
            assert left[name].dims == right[name].dims, name
            np.testing.assert_array_equal(left[name].values, right[name].values, err_msg=name)
        assert {k: v for k, v in left.attrs.items() if k not in ignore_attrs} == {
            k: v for k, v in right.attrs.items() if k not in ignore_attrs
        }


def test_netcdf_round_trip_is_exact(container, tmp_path):
    posterior, stats, attrs = make_run()
    data = to_arviz(posterior, stats, attrs)
    path = save_netcdf(data, tmp_path / "run.nc")
    loaded = load_netcdf(path)
    assert isinstance(loaded, expected_type(container))
    assert_same_groups(data, loaded)
    tokens = group_dataset(loaded, "posterior")["tokens"].values
    np.testing.assert_array_equal(tokens, posterior["tokens"])
    assert (tokens == -1).any()  # the padding survived as -1, not as a fill value or NaN


def test_files_from_either_container_load_in_the_other(tmp_path, monkeypatch):
    posterior, stats, attrs = make_run()
    save_netcdf(to_arviz(posterior, stats, attrs), tmp_path / "native.nc")
    with monkeypatch.context() as patch:
        simulate_arviz_1(patch)
        save_netcdf(to_arviz(posterior, stats, attrs), tmp_path / "tree.nc")
        from_native = load_netcdf(tmp_path / "native.nc")
    from_tree = load_netcdf(tmp_path / "tree.nc")
    assert_same_groups(from_native, from_tree, ignore_attrs=("created_at", "arviz_version"))


def test_save_leaves_only_the_target_file(container, tmp_path):
    posterior, stats, attrs = make_run()
    target = tmp_path / "sub" / "run.nc"
    save_netcdf(to_arviz(posterior, stats, attrs), target)
    save_netcdf(to_arviz(posterior, stats, {**attrs, "seed": 8}), target)  # overwrite in place
    assert [p.name for p in target.parent.iterdir()] == ["run.nc"]
    assert group_dataset(load_netcdf(target), "posterior").attrs["seed"] == 8


def test_missing_netcdf_backend_gives_one_clear_error(tmp_path, monkeypatch):
    """h5py is an extra of h5netcdf and ArviZ 1.x no longer installs it: without it, reading and writing say so
    in the toolkit's own error instead of a bare ImportError."""
    posterior, stats, attrs = make_run()
    data = to_arviz(posterior, stats, attrs)
    path = save_netcdf(data, tmp_path / "run.nc")
    monkeypatch.setitem(sys.modules, "h5py", None)  # `import h5py` now raises ImportError
    with pytest.raises(EGPSError, match=r"cannot read .*run\.nc: the NetCDF backend is missing .*pip install"):
        load_netcdf(path)
    with pytest.raises(EGPSError, match=r"cannot write .*new\.nc: the NetCDF backend is missing"):
        save_netcdf(data, tmp_path / "new.nc")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.nc"]


def test_h5py_is_a_declared_dependency():
    """ArviZ 1.x and recent h5netcdf no longer bring h5py in; egps_ppl must ask for it itself."""
    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text(encoding="utf-8"))
    names = {re.match(r"[A-Za-z0-9_.-]+", req).group().lower() for req in pyproject["project"]["dependencies"]}
    assert {"h5py", "h5netcdf"} <= names


def _half_write_then_fail(data, path):
    path.write_bytes(b"\x89HDF\r\n\x1a\n partial")
    raise OSError("disk full")


def test_failed_write_leaves_no_file(tmp_path, monkeypatch):
    posterior, stats, attrs = make_run()
    monkeypatch.setattr(arviz_export, "_write", _half_write_then_fail)
    with pytest.raises(EGPSError, match="disk full"):
        save_netcdf(to_arviz(posterior, stats, attrs), tmp_path / "run.nc")
    assert list(tmp_path.iterdir()) == []


def test_failed_overwrite_keeps_the_old_file(tmp_path, monkeypatch):
    posterior, stats, attrs = make_run()
    target = save_netcdf(to_arviz(posterior, stats, attrs), tmp_path / "run.nc")
    before = target.read_bytes()
    monkeypatch.setattr(arviz_export, "_write", _half_write_then_fail)
    with pytest.raises(EGPSError):
        save_netcdf(to_arviz(posterior, stats, {**attrs, "seed": 99}), target)
    assert target.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["run.nc"]


def test_load_rejects_missing_and_malformed_files(container, tmp_path):
    with pytest.raises(EGPSError, match="no such run file"):
        load_netcdf(tmp_path / "absent.nc")
    garbage = tmp_path / "garbage.nc"
    garbage.write_bytes(b"not a netcdf file at all")
    with pytest.raises(EGPSError, match="not a readable"):
        load_netcdf(garbage)
    posterior, stats, attrs = make_run()
    whole = save_netcdf(to_arviz(posterior, stats, attrs), tmp_path / "whole.nc").read_bytes()
    truncated = tmp_path / "truncated.nc"
    truncated.write_bytes(whole[: len(whole) // 2])  # what a non-atomic write interrupted midway leaves
    with pytest.raises(EGPSError):
        load_netcdf(truncated)
    no_posterior = tmp_path / "other.nc"
    xr.Dataset({"x": ("i", [1, 2])}).to_netcdf(no_posterior, engine="h5netcdf", group="something_else")
    with pytest.raises(EGPSError, match="posterior"):
        load_netcdf(no_posterior)


# --------------------------------------------------------------------------- summary
def run_from_draws(log_p: np.ndarray, length: np.ndarray | None = None) -> tuple[dict, dict]:
    n_chain, n_draw = log_p.shape
    length = np.ones((n_chain, n_draw), dtype=np.int64) if length is None else length
    completion = np.unique(log_p, return_inverse=True)[1].reshape(log_p.shape)  # one completion per log p value
    tokens = np.where(np.arange(4) < length[..., None], completion[..., None], -1)
    zeros = np.zeros((n_chain, n_draw))
    stats = {
        "lp": log_p,
        "acceptance_rate": zeros + 0.5,
        "is_accepted": zeros > 0,
        "cut_position": zeros.astype(np.int64),
        "decode_tokens": zeros.astype(np.int64),
        "scored_tokens": zeros.astype(np.int64),
    }
    return {"tokens": tokens, "length": length, "log_p": log_p}, stats


def test_summary_of_iid_chains_matches_arviz(container):
    rng = np.random.default_rng(1)
    n_chain, n_draw = 4, 1000
    posterior, stats = run_from_draws(rng.normal(size=(n_chain, n_draw)), rng.integers(0, 5, size=(n_chain, n_draw)))
    data = to_arviz(posterior, stats, {})
    summary = summarize(data)
    post = group_dataset(data, "posterior")[["log_p", "length"]].astype(np.float64)
    direct_rhat = az.rhat(post, method="rank")
    direct_bulk, direct_tail = az.ess(post, method="bulk"), az.ess(post, method="tail")
    for name in ("log_p", "length"):
        row = summary["variables"][name]
        assert row["rhat"] < 1.01, name
        assert 0.7 * n_chain * n_draw < row["ess_bulk"] < 1.3 * n_chain * n_draw, name
        assert row["rhat"] == pytest.approx(float(direct_rhat[name]), rel=1e-12)
        assert row["ess_bulk"] == pytest.approx(float(direct_bulk[name]), rel=1e-12)
        assert row["ess_tail"] == pytest.approx(float(direct_tail[name]), rel=1e-12)
    assert summary["variables"]["log_p"]["mean"] == pytest.approx(posterior["log_p"].mean())
    assert summary["variables"]["log_p"]["sd"] == pytest.approx(posterior["log_p"].std(ddof=1))
    assert summary["notes"] == []


def test_summary_flags_chains_with_shifted_means():
    rng = np.random.default_rng(2)
    log_p = rng.normal(size=(4, 500)) + np.array([0.0, 0.0, 3.0, 3.0])[:, None]
    summary = summarize(to_arviz(*run_from_draws(log_p), {}))
    assert summary["variables"]["log_p"]["rhat"] > 1.1


def test_summary_single_chain_gives_nan_rhat_and_finite_ess(container):
    rng = np.random.default_rng(3)
    summary = summarize(to_arviz(*run_from_draws(rng.normal(size=(1, 200))), {}), var_names=("log_p",))
    row = summary["variables"]["log_p"]
    assert math.isnan(row["rhat"])
    assert 50 < row["ess_bulk"] < 400
    assert any("2 chains" in note for note in summary["notes"])


def test_summary_single_draw_and_constant_do_not_raise(container):
    rng = np.random.default_rng(4)
    one_draw = summarize(to_arviz(*run_from_draws(rng.normal(size=(4, 1))), {}))
    row = one_draw["variables"]["log_p"]
    assert all(math.isnan(row[key]) for key in ("rhat", "ess_bulk", "ess_tail"))
    assert math.isfinite(row["sd"])  # 4 chains x 1 draw still has a spread
    assert any("at least 4 draws" in note for note in one_draw["notes"])
    constant = summarize(to_arviz(*run_from_draws(np.full((4, 50), -3.0)), {}))
    assert math.isnan(constant["variables"]["log_p"]["rhat"])
    assert constant["variables"]["log_p"]["mean"] == -3.0
    assert any("constant" in note for note in constant["notes"])


def test_summary_acceptance_and_token_counts(container):
    posterior, stats = run_from_draws(np.random.default_rng(5).normal(size=(2, 4)))
    stats["acceptance_rate"] = np.array([[0.2, 0.4, 0.6, 0.8], [1.0, 1.0, 1.0, 1.0]])
    stats["is_accepted"] = np.array([[True, False, False, False], [True, True, True, True]])
    stats["decode_tokens"] = np.array([[1, 2, 3, 4], [0, 0, 0, 0]])
    stats["scored_tokens"] = np.array([[10, 10, 10, 10], [20, 20, 20, 20]])
    summary = summarize(to_arviz(posterior, stats, {}))
    assert summary["acceptance_rate"]["per_chain"] == pytest.approx([0.5, 1.0])
    assert summary["acceptance_rate"]["mean"] == pytest.approx(0.75)
    assert summary["accepted_fraction"]["per_chain"] == pytest.approx([0.25, 1.0])
    assert summary["decode_tokens_per_draw"]["mean"] == pytest.approx(1.25)
    assert summary["scored_tokens_per_draw"]["per_chain"] == pytest.approx([10.0, 20.0])
    assert (summary["num_chains"], summary["num_draws"]) == (2, 4)


def test_moved_fraction_counts_draws_that_differ_from_the_previous_one(container):
    posterior, stats = run_from_draws(np.random.default_rng(7).normal(size=(3, 4)))
    tokens = np.zeros((3, 4, 4), dtype=np.int64)
    tokens[0, 1:3, 2] = 5  # chain 0: moves at draws 1 and 3 (there and back), stays at 2
    tokens[1, :, 3] = -1  # chain 1: never moves
    tokens[2] = np.arange(4)[:, None]  # chain 2: moves every draw
    posterior["tokens"], posterior["length"] = tokens, np.where(tokens[..., 3] == -1, 3, 4)
    stats["is_accepted"] = np.ones((3, 4), dtype=bool)  # every proposal accepted, yet chain 1 never moved
    summary = summarize(to_arviz(posterior, stats, {}))
    assert summary["moved_fraction"]["per_chain"] == pytest.approx([2 / 3, 0.0, 1.0])
    assert summary["moved_fraction"]["mean"] == pytest.approx(5 / 9)
    assert summary["accepted_fraction"]["mean"] == 1.0
    assert summary["frozen_chains"] == [1]
    assert "moved fraction" in format_summary(summary) and "0.556" in format_summary(summary)
    one_draw = summarize(to_arviz(*run_from_draws(np.zeros((2, 1))), {}))
    assert math.isnan(one_draw["moved_fraction"]["mean"])
    assert any("moved fraction" in note for note in one_draw["notes"])


def test_frozen_chains_are_reported_without_warnings(container):
    """A chain that never moves has zero within-chain variance: ArviZ divides by zero (numpy RuntimeWarnings on
    every call) and R-hat is inf. summarize keeps ArviZ's values, stays quiet and names the chains instead."""
    rng = np.random.default_rng(8)
    each_frozen = np.repeat(np.array([[-1.0], [-2.0], [-3.0], [-4.0]]), 50, axis=1)
    some_frozen = rng.normal(size=(4, 50))
    some_frozen[[1, 3]] = -2.5
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        every = summarize(to_arviz(*run_from_draws(each_frozen), {}))
        some = summarize(to_arviz(*run_from_draws(some_frozen), {}))
    assert every["frozen_chains"] == [0, 1, 2, 3]
    assert every["variables"]["log_p"]["rhat"] == math.inf  # no variance within chains, some between
    assert "note: 4 of 4 chains never moved (same completion in all 50 draws): chains 0, 1, 2, 3" in (
        format_summary(every)
    )
    assert some["frozen_chains"] == [1, 3]
    assert math.isfinite(some["variables"]["log_p"]["rhat"])
    # A re-proposed completion is rescored: its log p can move in the last digits while the chain stands still.
    posterior, stats = run_from_draws(rng.normal(size=(4, 50)))
    posterior["log_p"][2] = -7.78 + 1e-7 * rng.normal(size=50)
    posterior["tokens"][2] = posterior["tokens"][2, 0]
    assert summarize(to_arviz(posterior, stats, {}))["frozen_chains"] == [2]
    only_log_p = xr.Dataset({"log_p": (("chain", "draw"), some_frozen)})  # no tokens: log p decides
    assert summarize(only_log_p, var_names=("log_p",))["frozen_chains"] == [1, 3]
    moving = summarize(to_arviz(*run_from_draws(rng.normal(size=(4, 50))), {}))
    assert moving["frozen_chains"] == [] and not any("never moved" in note for note in moving["notes"])


def test_mcmc_export_has_per_position_entropy_and_logp(container):
    target = PowerDistribution(random_markov(4, seed=2, eos_token_id=0), [], alpha=3.0, max_new_tokens=6)
    mcmc = MCMC(MetropolisHastings(target), num_samples=8, warmup_steps=2, num_chains=5, seed=1).run()
    data = mcmc.to_arviz()
    posterior, stats = group_dataset(data, "posterior"), group_dataset(data, "sample_stats")
    valid = (posterior["tokens"] >= 0).values
    assert not valid.all(), "the test model should end some completions before max_new_tokens"
    token_logp, entropy = stats["token_logp"].values, stats["entropy"].values
    assert token_logp.shape == entropy.shape == (5, 8, 6)
    assert np.isnan(token_logp[~valid]).all() and np.isnan(entropy[~valid]).all()
    assert (token_logp[valid] <= 0).all() and (entropy[valid] >= 0).all()
    # The per-position terms add up to each draw's log p(x), and the entropies are those of the final state.
    np.testing.assert_allclose(np.nansum(token_logp, axis=2), posterior["log_p"].values, rtol=1e-10)
    final = mcmc.state
    np.testing.assert_allclose(entropy[:, -1][valid[:, -1]], final.entropy.numpy()[valid[:, -1]], rtol=1e-12)
    summary = mcmc.summary()
    tokens = posterior["tokens"].values
    moved = (tokens[:, 1:] != tokens[:, :-1]).any(axis=2)
    assert summary["moved_fraction"]["mean"] == pytest.approx(moved.mean())
    assert stats["is_accepted"].values[:, 1:][moved].all()  # a draw that moved was an accepted proposal


def test_summary_rejects_non_scalar_and_unknown_variables():
    data = to_arviz(*make_run()[:2], {})
    with pytest.raises(EGPSError, match="one number per"):
        summarize(data, var_names=("tokens",))
    with pytest.raises(EGPSError, match="no variable 'nope'"):
        summarize(data, var_names=("nope",))


def test_format_summary_shows_values_and_notes():
    rng = np.random.default_rng(6)
    summary = summarize(to_arviz(*run_from_draws(rng.normal(size=(1, 100))), {}))
    text = format_summary(summary)
    lines = text.splitlines()
    assert lines[0] == "1 chains x 100 draws"
    log_p_row = next(line for line in lines if line.startswith("log_p"))
    assert log_p_row.split()[3] == "nan"  # the R-hat column
    assert f"{summary['variables']['log_p']['ess_bulk']:.1f}" in log_p_row
    assert "acceptance rate" in text and "0.500" in text
    assert "note: log_p: R-hat needs at least 2 chains" in text


# --------------------------------------------------------------------------- plots
def test_plot_trace_writes_png(container, tmp_path):
    data = to_arviz(*make_run(n_chain=2, n_draw=30), {})
    path = plot_trace(data, tmp_path / "plots" / "trace.png")
    content = path.read_bytes()
    assert content.startswith(PNG_MAGIC) and len(content) > 5000


def test_plot_entropy_profile_writes_png(tmp_path):
    entropy = np.array([[0.1, 2.0, 0.0, 1.5, np.nan], [0.2, 1.8, 0.0, np.nan, np.nan]])
    cuts = np.array([[1, 1, 3, -1], [-1, -1, 1, 0]])
    path = plot_entropy_profile(entropy, cuts, tmp_path / "entropy.png")
    content = path.read_bytes()
    assert content.startswith(PNG_MAGIC) and len(content) > 5000
    no_cuts = plot_entropy_profile(np.array([0.5, 0.1]), np.full(3, -1), tmp_path / "none.png")
    assert no_cuts.read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(EGPSError, match="entropy must be"):
        plot_entropy_profile(np.zeros((2, 2, 2)), cuts, tmp_path / "bad.png")
