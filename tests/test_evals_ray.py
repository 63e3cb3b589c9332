"""``egps eval --ray`` on a local 2-CPU Ray cluster: the local runner's records, resume, crashed workers, the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import eval_fixtures
import pytest
from eval_fixtures import FirstTokenTask

from egps_ppl.cli import main
from egps_ppl.errors import EGPSError
from egps_ppl.evals.methods import load_method
from egps_ppl.evals.runner import evaluate, unit_seed
from egps_ppl.evals.store import RECORD_FIELDS, read_results
from egps_ppl.models.testbeds import random_markov

REPO = Path(__file__).resolve().parents[1]
SEEDS = [0, 1]
LIMIT = 3
UNITS = {(f"p{i}", s) for i in range(LIMIT) for s in SEEDS}
# Fields that depend on the run, not on the unit (timings).
TIMING = ("wall_s", "grade_s", "forward_calls")
"""Fields that depend on the machine or on what shared a batch (a batched forward call serves many units)."""


class KillingMethod:
    """A method that kills its own worker process (as a segfault or the OOM killer would) on one unit.

    ``times`` is how many attempts of that unit die; the count lives in a file, since each attempt runs in a
    fresh process.
    """

    def __init__(self, inner, unit: tuple[str, int], counter: Path, times: int = 1) -> None:
        self.inner, self.name = inner, inner.name
        self.target_seed, self.counter, self.times = unit_seed(unit[1], unit[0]), str(counter), times

    def config(self):
        return self.inner.config()

    def run(self, lm, prompt_ids, max_new_tokens, seed):
        if seed == self.target_seed:
            deaths = int(Path(self.counter).read_text()) if os.path.exists(self.counter) else 0
            if deaths < self.times:
                Path(self.counter).write_text(str(deaths + 1))
                os._exit(1)
        return self.inner.run(lm, prompt_ids, max_new_tokens, seed)


class FailingMethod:
    """A method with a bug on one unit: an ordinary exception, not a lost worker."""

    name = "plain"

    def config(self):
        return load_method("plain").config()

    def run(self, lm, prompt_ids, max_new_tokens, seed):
        if seed == unit_seed(1, "p2"):
            raise EGPSError("bad input in the method")
        return load_method("plain").run(lm, prompt_ids, max_new_tokens, seed)


def markov_model():
    return random_markov(5, seed=2, eos_token_id=0, concentration=0.7)


def broken_model():
    raise EGPSError("no such model 'nope'")


@pytest.fixture(scope="module")
def ray():
    ray = pytest.importorskip("ray")
    from ray import cloudpickle

    # The workers cannot import the test modules: ship their classes and functions by value.
    shipped = [sys.modules[__name__], eval_fixtures]
    for module in shipped:
        cloudpickle.register_pickle_by_value(module)
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()
    for module in shipped:
        cloudpickle.unregister_pickle_by_value(module)


@pytest.fixture(scope="module")
def local_run(tmp_path_factory):
    """The reference: the same units with the local runner."""
    out = tmp_path_factory.mktemp("local") / "run"
    summary = evaluate(FirstTokenTask(), _mh(), markov_model(), SEEDS, LIMIT, out, progress=False, max_new_tokens=6)
    return out, summary


def _mh():
    return load_method("mh", steps=2)


def _by_key(run_dir):
    return {(r["problem_id"], r["seed"]): r for r in read_results(Path(run_dir) / "results.jsonl")}


def _without_timing(record):
    kept = {k: v for k, v in record.items() if k not in TIMING}
    kept["extra"] = {k: v for k, v in record.get("extra", {}).items() if k != "batch"}
    return kept


def _run_ray(out, method=None, **kwargs):
    from egps_ppl.evals.ray_runner import evaluate_ray

    kwargs.setdefault("num_workers", 2)
    return evaluate_ray(
        FirstTokenTask(), method or _mh(), markov_model, SEEDS, LIMIT, out, progress=False, max_new_tokens=6, **kwargs
    )


def _assert_each_unit_once(run_dir):
    keys = [(r["problem_id"], r["seed"]) for r in read_results(Path(run_dir) / "results.jsonl")]
    assert len(keys) == len(set(keys)) == len(UNITS) and set(keys) == UNITS


def test_a_crashed_worker_is_replaced_and_the_records_equal_the_local_runners(ray, local_run, tmp_path):
    local_dir, local_summary = local_run
    out = tmp_path / "ray"
    method = KillingMethod(_mh(), ("p1", 1), tmp_path / "deaths")
    summary = _run_ray(out, method)
    assert (tmp_path / "deaths").read_text() == "1"  # the worker really died once
    assert summary["ray"] == {"workers": 2, "actors_lost": 1, "units_retried": 1}
    _assert_each_unit_once(out)
    local, remote = _by_key(local_dir), _by_key(out)
    for key in UNITS:  # the same record (same completion, grade and cost) whichever process computed it
        assert set(RECORD_FIELDS) <= set(remote[key])
        assert _without_timing(remote[key]) == _without_timing(local[key])
    assert summary["complete"] and summary["computed_this_run"] == len(UNITS)
    for field in ("accuracy", "accuracy_per_problem", "pass_at_k", "mean_decode_tokens", "n_results"):
        assert summary[field] == local_summary[field]
    on_disk = json.loads((out / "summary.json").read_text())
    assert on_disk["ray"]["actors_lost"] == 1 and on_disk["method"] == "mh"
    config, local_config = (json.loads((d / "config.json").read_text()) for d in (out, local_dir))
    assert config == local_config  # same settings, same model name: the two runs could resume each other


def test_resume_after_a_partial_file_computes_only_the_rest(ray, local_run, tmp_path):
    local_dir, _ = local_run
    lines = (local_dir / "results.jsonl").read_text().splitlines(keepends=True)
    out = tmp_path / "part"
    out.mkdir()
    (out / "config.json").write_text((local_dir / "config.json").read_text())
    (out / "results.jsonl").write_text("".join(lines[:2]) + lines[2][:40])  # killed in the middle of line 3
    with pytest.raises(EGPSError, match="--resume"):
        _run_ray(out)
    summary = _run_ray(out, resume=True)
    assert summary["computed_this_run"] == len(UNITS) - 2
    after = (out / "results.jsonl").read_text().splitlines(keepends=True)
    assert after[:2] == lines[:2]
    _assert_each_unit_once(out)
    local = _by_key(local_dir)
    assert {k: r["completion_ids"] for k, r in _by_key(out).items()} == {k: local[k]["completion_ids"] for k in local}


def test_a_unit_that_keeps_killing_its_worker_is_given_up_not_written(ray, tmp_path):
    out = tmp_path / "run"
    method = KillingMethod(_mh(), ("p0", 0), tmp_path / "deaths", times=99)
    with pytest.raises(EGPSError, match=r"1 unit\(s\) lost their Ray worker on each of 2 attempt\(s\).*\(p0, seed 0\)"):
        _run_ray(out, method, max_retries=1, num_workers=1)
    assert (tmp_path / "deaths").read_text() == "2"
    keys = set(_by_key(out))
    assert keys == UNITS - {("p0", 0)}  # every other unit, once
    summary = json.loads((out / "summary.json").read_text())
    assert not summary["complete"] and summary["n_results"] == len(UNITS) - 1
    # --resume retries exactly the lost unit (it no longer kills its worker).
    resumed = _run_ray(out, KillingMethod(_mh(), ("p0", 0), tmp_path / "deaths", times=2), resume=True, num_workers=1)
    assert resumed["computed_this_run"] == 1 and resumed["complete"]
    _assert_each_unit_once(out)


def test_errors_in_a_unit_or_the_model_are_not_retried(ray, tmp_path):
    with pytest.raises(EGPSError, match=r"unit \(p2, seed 1\): bad input in the method"):
        _run_ray(tmp_path / "bug", FailingMethod(), num_workers=1)
    assert ("p2", 1) not in _by_key(tmp_path / "bug")
    from egps_ppl.evals.ray_runner import evaluate_ray

    with pytest.raises(EGPSError, match="could not load the model: no such model 'nope'"):
        evaluate_ray(FirstTokenTask(), _mh(), broken_model, SEEDS, 1, tmp_path / "m", progress=False, num_workers=1)
    assert not (tmp_path / "m" / "results.jsonl").exists()


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_the_command_line_with_ray_matches_without(ray, tmp_path, problems_file, capsys):
    args = ["eval", "--task", f"jsonl:{problems_file}", "--model", "tiny-gpt2", "--method", "plain"]
    args += ["--max-new-tokens", "8", "--seeds", "0,1", "--no-progress", "--threads", "1"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", str(tmp_path / "ray"), "--ray", "--ray-workers", "1", "--ray-retries", "1"]) == 0
    out = capsys.readouterr().out
    assert "plain on jsonl:" in out and "results in" in out
    local, remote = _by_key(tmp_path / "local"), _by_key(tmp_path / "ray")
    assert len(remote) == 6 and {k: _without_timing(r) for k, r in remote.items()} == {
        k: _without_timing(r) for k, r in local.items()
    }
    config, local_config = (json.loads((tmp_path / d / "config.json").read_text()) for d in ("ray", "local"))
    assert config["model"] == local_config["model"] == "tiny-gpt2" and config["method"] == local_config["method"]


def test_ray_missing_is_a_one_line_error(tmp_path, problems_file, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now raises ImportError
    args = ["eval", "--task", f"jsonl:{problems_file}", "--model", "tiny-gpt2", "--method", "plain"]
    assert main([*args, "--out", str(tmp_path / "run"), "--ray"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("egps: error:") and "pip install ray" in err and "\n" not in err
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_importing_the_package_does_not_import_ray():
    code = (
        "import sys, egps_ppl, egps_ppl.evals, egps_ppl.evals.runner, egps_ppl.evals.ray_runner, egps_ppl.cli, "
        "egps_ppl.cli.eval; "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)
