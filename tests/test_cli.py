"""`egps sample` and `egps models` end to end on exact Markov models (no download, seconds)."""

from __future__ import annotations

import json
import subprocess
import sys
import time

import numpy as np
import pytest

from egps_ppl.cli import main
from egps_ppl.diagnostics import load_netcdf
from egps_ppl.models.testbeds import random_markov


@pytest.fixture
def markov_file(tmp_path):
    path = tmp_path / "chain.json"
    random_markov(4, seed=3, eos_token_id=0).to_json(path)
    return path


def _sample_args(markov_file, out, *extra):
    return [
        "sample", "--model", f"markov:{markov_file}", "--alpha", "4", "--max-new-tokens", "5", "--kernel", "mh",
        "--num-chains", "6", "--num-samples", "4", "--warmup", "2", "--seed", "3", "--out", str(out),
        "--no-progress", *extra,
    ]  # fmt: skip


def _override(args, extra):
    """``args`` with each ``--flag value`` pair of ``extra`` replaced or appended."""
    args = list(args)
    for flag, value in zip(extra[::2], extra[1::2], strict=True):
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    return args


def test_sample_writes_the_contracted_arviz_file(markov_file, tmp_path, capsys):
    out = tmp_path / "run.nc"
    assert main(_sample_args(markov_file, out)) == 0
    printed = capsys.readouterr().out
    assert "acceptance rate" in printed and str(out) in printed and "r_hat" in printed.lower()
    data = load_netcdf(out)
    posterior, stats = data.posterior, data.sample_stats
    assert posterior["tokens"].shape == (6, 4, 5)
    assert posterior["length"].shape == posterior["log_p"].shape == (6, 4)
    for name in ("lp", "acceptance_rate", "is_accepted", "cut_position", "decode_tokens", "scored_tokens"):
        assert stats[name].shape == (6, 4)
    np.testing.assert_allclose(stats["lp"].values, 4 * posterior["log_p"].values)
    assert float(posterior.attrs["alpha"]) == 4.0 and posterior.attrs["kernel"] == "mh"
    assert int(posterior.attrs["seed"]) == 3 and "markov:" in posterior.attrs["model"]


def test_same_seed_reproduces_the_file(markov_file, tmp_path):
    a, b = tmp_path / "a.nc", tmp_path / "b.nc"
    main(_sample_args(markov_file, a))
    main(_sample_args(markov_file, b))
    assert np.array_equal(load_netcdf(a).posterior["tokens"].values, load_netcdf(b).posterior["tokens"].values)


def test_twenty_thousand_chains_take_seconds(markov_file, tmp_path):
    out = tmp_path / "many.nc"
    args = _sample_args(markov_file, out)
    args[args.index("--num-chains") + 1] = "20000"
    args[args.index("--num-samples") + 1] = "1"
    started = time.perf_counter()
    assert main(args) == 0
    assert time.perf_counter() - started < 60  # vectorised chains: seconds, not minutes
    assert load_netcdf(out).posterior["tokens"].shape == (20000, 1, 5)


def test_init_file_starts_the_chains(markov_file, tmp_path):
    init = tmp_path / "init.jsonl"
    init.write_text("\n".join(json.dumps([1, 2, 3, 1, 2]) for _ in range(6)))
    out = tmp_path / "init.nc"
    assert main(_sample_args(markov_file, out, "--init", str(init))) == 0
    assert (load_netcdf(out).posterior["length"].values > 0).all()


def test_kernel_combinators_from_the_command_line(markov_file, tmp_path):
    out = tmp_path / "mix.nc"
    args = _sample_args(markov_file, out)
    args[args.index("--kernel") + 1] = "mixture(mh:0.5,cycle(mh,mh):0.5)"
    assert main(args) == 0
    assert load_netcdf(out).posterior.attrs["kernel"].startswith("mixture(")


BAD_INPUT = [
    (["--alpha", "0"], "alpha must be finite and > 0"),
    (["--alpha", "-1"], "alpha must be finite and > 0"),
    (["--alpha", "nan"], "alpha must be finite and > 0"),
    (["--max-new-tokens", "0"], "max_new_tokens must be an integer >= 1"),
    (["--kernel", "bogus"], "unknown kernel 'bogus'"),
    (["--num-chains", "0"], "num_chains must be an integer >= 1"),
    (["--prompt-ids", "1,x"], "--prompt-ids must be integers"),
    (["--prompt-ids", "99"], "prompt token ids must lie in"),
]


@pytest.mark.parametrize(("extra", "message"), BAD_INPUT)
def test_bad_input_gives_one_clear_line_and_no_file(markov_file, tmp_path, capsys, extra, message):
    out = tmp_path / "bad.nc"
    assert main(_sample_args(markov_file, out, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("egps: error:") and message in err and "\n" not in err
    assert not out.exists()


def test_bad_model_and_init_files(tmp_path, markov_file, capsys):
    bad_rows = tmp_path / "rows.json"
    bad_rows.write_text(json.dumps({"initial": [0.5, 0.6], "transition": [[0.5, 0.5], [0.5, 0.5]], "eos": 0}))
    bad_eos = tmp_path / "eos.json"
    bad_eos.write_text(json.dumps({"initial": [0.5, 0.5], "transition": [[0.5, 0.5], [0.5, 0.5]], "eos": 2}))
    unknown_ids = tmp_path / "unknown.jsonl"
    unknown_ids.write_text("[1, 7]\n" * 6)
    too_long = tmp_path / "long.jsonl"
    too_long.write_text("[1, 1, 1, 1, 1, 1]\n" * 6)
    cases = [
        (["--model", f"markov:{bad_rows}"], "sum to 1"),
        (["--model", f"markov:{bad_eos}"], "'eos' must be a token id"),
        (["--model", f"markov:{tmp_path / 'missing.json'}"], "not found"),
        (["--init", str(unknown_ids)], "unknown token ids"),
        (["--init", str(too_long)], "max_new_tokens"),
    ]
    for extra, message in cases:
        out = tmp_path / "bad.nc"
        args = _override(_sample_args(markov_file, out), extra)
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
        assert not out.exists()


def test_models_lists_the_offline_registry(capsys):
    assert main(["models"]) == 0
    listed = capsys.readouterr().out
    for name in ("smollm2-135m", "tiny-gpt2", "markov:PATH.json"):
        assert name in listed


def test_console_script_runs(markov_file, tmp_path):
    out = tmp_path / "script.nc"
    result = subprocess.run(
        [sys.executable, "-m", "egps_ppl.cli", *_sample_args(markov_file, out)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    assert out.exists()


def test_block_schedules_from_the_command_line(markov_file, tmp_path, capsys):
    for extra in (["--block-size", "2"], ["--block-size", "2", "--adaptive"]):
        out = tmp_path / "blocks.nc"
        assert main(_sample_args(markov_file, out, *extra, "--steps-per-block", "2")) == 0
        assert "EntropyAdaptive" in load_netcdf(out).posterior.attrs["schedule"] or "--adaptive" not in extra
    assert main(_sample_args(markov_file, tmp_path / "x.nc", "--adaptive")) == 2
    assert "adaptive schedule needs a block size (--block-size)" in capsys.readouterr().err


def test_hf_prompt_errors(tmp_path, capsys):
    out = tmp_path / "hf.nc"
    base = ["sample", "--model", "tiny-gpt2", "--num-chains", "2", "--num-samples", "1", "--warmup", "0",
            "--max-new-tokens", "8", "--out", str(out), "--no-progress"]  # fmt: skip
    cases = [
        (["--prompt", "   "], "the prompt is empty"),
        (["--prompt", "x" * 5000], "exceeds the context window"),
        (["--prompt", "hi", "--max-new-tokens", "5000"], "exceeds the context window"),
        (["--prompt", "hi", "--out", str(tmp_path / "run.txt")], "--out must end in .nc"),
    ]
    for extra, message in cases:
        args = _override(base, extra)
        assert main(args) == 2, extra
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main([*base, "--prompt", "hi", "--chat"]) == 2  # an explicit --chat needs a chat template
    err = capsys.readouterr().err
    assert "'tiny-gpt2' has no chat template" in err and err.count("\n") == 1, err
    assert not out.exists()
    assert main([*base, "--prompt", "Once upon a time"]) == 0
    assert "Once upon" not in capsys.readouterr().err
    assert load_netcdf(out).posterior["tokens"].shape == (2, 1, 8)


# ------------------------------------------------------------------------ Ctrl-C keeps the draws so far


def _interrupt_after(monkeypatch, draws):
    """Every MCMC gets a hook that raises KeyboardInterrupt (what Python's SIGINT handler raises) once ``draws``
    draws are recorded; ``None`` interrupts the first warmup step."""
    from egps_ppl.infer import MCMC

    real_init = MCMC.__init__

    def init(self, *args, **kwargs):
        real_init(self, *args, **kwargs)

        def hook(phase, step, state, info):
            if draws is None or (phase == "sample" and step - self.warmup_steps == draws * self.thin):
                raise KeyboardInterrupt

        self.hooks.append(hook)

    monkeypatch.setattr(MCMC, "__init__", init)


def test_ctrl_c_saves_the_draws_so_far(markov_file, tmp_path, capsys, monkeypatch):
    full, part = tmp_path / "full.nc", tmp_path / "part.nc"
    args = _override(_sample_args(markov_file, full), ["--num-samples", "6"])
    assert main(args) == 0
    _interrupt_after(monkeypatch, 2)
    assert main(_override(args, ["--out", str(part)])) == 130
    err = capsys.readouterr().err
    assert f"interrupted after 2 of 6 draws per chain; saved them to {part}" in err and err.count("\n") == 1, err
    data = load_netcdf(part)
    assert data.posterior["tokens"].shape == (6, 2, 5)
    assert int(data.posterior.attrs["partial"]) == 1 and int(data.posterior.attrs["draws_completed"]) == 2
    assert "partial" not in load_netcdf(full).posterior.attrs
    # The draws kept are the uninterrupted run's first two (same seed).
    np.testing.assert_array_equal(data.posterior["tokens"].values, load_netcdf(full).posterior["tokens"].values[:, :2])
    # Interrupted before any draw: nothing is written, still 130 and one line.
    _interrupt_after(monkeypatch, None)
    assert main(_override(args, ["--out", str(tmp_path / "none.nc")])) == 130
    err = capsys.readouterr().err
    assert "interrupted before the first draw" in err and err.count("\n") == 1
    assert not (tmp_path / "none.nc").exists()


def test_an_interrupted_mcmc_keeps_its_complete_draws(markov_file):
    from egps_ppl.infer import MCMC
    from egps_ppl.kernels import MetropolisHastings
    from egps_ppl.models.registry import load_model
    from egps_ppl.target import PowerDistribution

    target = PowerDistribution(load_model(f"markov:{markov_file}"), [], 4.0, 5)

    def stop(phase, step, state, info):
        if phase == "sample" and step == 3 + 4:
            raise KeyboardInterrupt

    mcmc = MCMC(MetropolisHastings(target), num_samples=10, warmup_steps=3, num_chains=5, seed=1, hooks=[stop])
    with pytest.raises(KeyboardInterrupt):
        mcmc.run()
    assert mcmc.interrupted and mcmc.draws_completed == 4
    assert mcmc.get_samples()["tokens"].shape == (5, 4, 5)
    assert mcmc.attrs()["partial"] == 1 and mcmc.attrs()["draws_completed"] == 4
    assert mcmc.to_arviz() is not None
    mcmc.hooks.clear()
    assert not mcmc.run().interrupted and mcmc.draws_completed == 10 and "partial" not in mcmc.attrs()


def test_a_real_sigint_saves_the_draws_so_far(markov_file, tmp_path):
    """SIGINT to a running ``egps sample`` (Ctrl-C in a terminal): exit status 130 and a partial file."""
    import os
    import signal

    out = tmp_path / "sigint.nc"
    args = _override(_sample_args(markov_file, out), ["--num-samples", "100000"])
    args = [a for a in args if a != "--no-progress"]  # the progress bar says when sampling has started
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # A shell's background job (CI scripts, nohup) inherits SIGINT ignored, and Python then installs no Ctrl-C
    # handler: give the child the default disposition, as a terminal's foreground process has.
    proc = subprocess.Popen(
        [sys.executable, "-m", "egps_ppl.cli", *args],
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    seen, deadline = "", time.monotonic() + 120
    while seen.count("it/s") < 2 and time.monotonic() < deadline:
        char = proc.stderr.read(1)
        if not char:
            break
        seen += char
    assert seen.count("it/s") >= 2, seen
    proc.send_signal(signal.SIGINT)
    err = seen + proc.communicate(timeout=240)[1]  # a loaded machine can take long to save the draws
    assert proc.returncode == 130, err
    assert "egps: interrupted after" in err and "Traceback" not in err
    attrs = load_netcdf(out).posterior.attrs
    assert int(attrs["partial"]) == 1 and 0 < int(attrs["draws_completed"]) < 100000


def test_eval_batch_default_is_the_runners():
    from egps_ppl.cli import build_parser
    from egps_ppl.evals.runner import DEFAULT_BATCH

    args = build_parser().parse_args(["eval", "--task", "arithmetic", "--method", "mh", "--out", "unused"])
    assert args.batch == DEFAULT_BATCH
