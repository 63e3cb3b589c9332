"""The evaluation runner and `egps eval` / `egps report`: JSONL bookkeeping, resume, summary, bad input."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from eval_fixtures import FirstTokenTask

from egps_ppl.cli import main
from egps_ppl.errors import EGPSError
from egps_ppl.evals.methods import load_method
from egps_ppl.evals.runner import evaluate, evaluate_unit, unit_seed
from egps_ppl.evals.store import RECORD_FIELDS, read_results, summarize_results
from egps_ppl.models.testbeds import random_markov

REPO = Path(__file__).resolve().parents[1]


class CountingMethod:
    """Wraps a method and counts its runs (to show resumed units are not recomputed)."""

    def __init__(self, inner):
        self.inner, self.name, self.calls = inner, inner.name, 0

    def config(self):
        return self.inner.config()

    def run(self, lm, prompt_ids, max_new_tokens, seed):
        self.calls += 1
        return self.inner.run(lm, prompt_ids, max_new_tokens, seed)


@pytest.fixture(scope="module")
def lm():
    return random_markov(5, seed=2, eos_token_id=0, concentration=0.7)


def _keys(records):
    return [(r["problem_id"], r["seed"]) for r in records]


def _completions(run_dir):
    return {(r["problem_id"], r["seed"]): r["completion_ids"] for r in read_results(run_dir / "results.jsonl")}


def _run(tmp, lm, method="plain", seeds=(0, 1), limit=None, **kwargs):
    return evaluate(
        FirstTokenTask(), load_method(method, steps=2), lm, list(seeds), limit, tmp, progress=False, **kwargs
    )


def test_one_line_per_unit_with_the_fields(tmp_path, lm):
    summary = _run(tmp_path / "run", lm, "mh", seeds=(0, 1, 2), limit=3, max_new_tokens=6)
    records = read_results(tmp_path / "run" / "results.jsonl")
    assert sorted(_keys(records)) == sorted((f"p{i}", s) for i in range(3) for s in (0, 1, 2))
    for r in records:
        assert set(RECORD_FIELDS) <= set(r)
        assert r["method"] == "mh" and r["completion_tokens"] <= 6
        assert r["unit_seed"] == unit_seed(r["seed"], r["problem_id"])
        assert r["correct"] == (r["answer"] == r["reference"])
    assert summary["n_results"] == 9 and summary["complete"] and summary["n_problems"] == 3
    assert summary["mean_decode_tokens"] == pytest.approx(sum(r["decode_tokens"] for r in records) / 9)
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["accuracy"] == summary["accuracy"] and on_disk["method"] == "mh"
    assert (tmp_path / "run" / "accuracy_vs_compute.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((tmp_path / "run" / "config.json").read_text())["max_new_tokens"] == 6


def test_same_seed_same_completions_whatever_the_order(tmp_path, lm):
    _run(tmp_path / "a", lm, "egps", seeds=(0, 1))
    _run(tmp_path / "b", lm, "egps", seeds=(1, 0))
    _run(tmp_path / "c", lm, "egps", seeds=(5,))
    a, b = (_completions(tmp_path / name) for name in ("a", "b"))
    c = [r["completion_ids"] for r in read_results(tmp_path / "c" / "results.jsonl")]
    assert a == b
    assert c != [a[(f"p{i}", 0)] for i in range(4)]  # another seed, other completions


def test_evaluate_unit_is_self_contained(lm):
    task, method = FirstTokenTask(), load_method("best-of-n", n=3)
    problem = task.problems()[1]
    one = evaluate_unit(task, method, lm, problem, 4, max_new_tokens=5)
    two = evaluate_unit(task, method, lm, problem, 4, max_new_tokens=5)
    assert one["completion"] == two["completion"] and one["problem_id"] == "p1" and one["seed"] == 4
    assert json.loads(json.dumps(one)) == one


def test_summary_mean_and_standard_error_by_hand():
    def rec(pid, seed, correct, decode):
        return {
            "problem_id": pid, "seed": seed, "method": "m", "completion": "", "answer": None, "correct": correct,
            "decode_tokens": decode, "scored_tokens": 2 * decode, "forward_calls": 1, "wall_s": 0.5,
        }  # fmt: skip

    records = [
        rec("a", 0, True, 10), rec("b", 0, False, 20), rec("c", 0, True, 30), rec("d", 0, False, 40),
        rec("a", 1, True, 10), rec("b", 1, True, 20), rec("c", 1, True, 30), rec("d", 1, False, 40),
        rec("a", 0, False, 999),  # a duplicate: the first one counts
    ]  # fmt: skip
    s = summarize_results(records)
    assert s["accuracy_per_seed"] == {"0": 0.5, "1": 0.75}
    assert s["accuracy"] == pytest.approx(0.625)
    assert s["accuracy_se"] == pytest.approx(math.sqrt(((0.125**2) * 2) / 1) / math.sqrt(2))  # = 0.125
    assert s["accuracy_se"] == pytest.approx(0.125)
    assert s["accuracy_per_problem"] == {"a": 1.0, "b": 0.5, "c": 1.0, "d": 0.0}
    assert s["mean_decode_tokens"] == pytest.approx(25.0) and s["mean_scored_tokens"] == pytest.approx(50.0)
    assert s["n_results"] == 8 and s["complete"]
    one_seed = summarize_results(records, seeds=[0], problems=["a", "b", "z"])
    assert one_seed["accuracy"] == 0.5 and one_seed["accuracy_se"] is None
    assert one_seed["expected_results"] == 3 and not one_seed["complete"]


def test_pass_at_k_treats_the_seeds_of_a_problem_as_samples():
    def rec(pid, seed, correct):
        return {
            "problem_id": pid, "seed": seed, "method": "m", "completion": "", "answer": None, "correct": correct,
            "decode_tokens": 1, "scored_tokens": 1, "forward_calls": 1, "wall_s": 0.1,
        }  # fmt: skip

    # 4 seeds; problem a: 1 of 4 correct, b: 4 of 4, c: 0 of 4, d: 2 of 4.
    outcomes = {"a": [1, 0, 0, 0], "b": [1, 1, 1, 1], "c": [0, 0, 0, 0], "d": [0, 1, 0, 1]}
    records = [rec(pid, s, bool(ok)) for pid, row in outcomes.items() for s, ok in enumerate(row)]
    s = summarize_results(records)
    assert list(s["pass_at_k"]) == ["1", "2", "4"]
    # By hand: pass@k = 1 - C(n-c, k) / C(n, k) with n = 4.
    assert s["pass_at_k"]["1"] == pytest.approx((1 / 4 + 1 + 0 + 2 / 4) / 4) == pytest.approx(s["accuracy"])
    assert s["pass_at_k"]["2"] == pytest.approx((1 / 2 + 1 + 0 + 5 / 6) / 4)
    assert s["pass_at_k"]["4"] == pytest.approx((1 + 1 + 0 + 1) / 4)
    # 3 seeds: k = 1, 2 and the number of seeds; an unfinished problem enters only the k it has samples for.
    three = summarize_results([r for r in records if r["seed"] < 3 and (r["problem_id"], r["seed"]) != ("c", 2)])
    assert list(three["pass_at_k"]) == ["1", "2", "3"]
    assert three["pass_at_k"]["3"] == pytest.approx((1 + 1 + 1) / 3)  # a, b, d; c has only 2 results
    assert three["pass_at_k"]["2"] == pytest.approx((2 / 3 + 1 + 0 + 2 / 3) / 4)
    assert summarize_results(records[:1])["pass_at_k"] == {"1": 1.0}
    assert summarize_results([])["pass_at_k"] == {}


def test_existing_results_need_resume(tmp_path, lm):
    _run(tmp_path / "run", lm, limit=2)
    with pytest.raises(EGPSError, match="--resume"):
        _run(tmp_path / "run", lm, limit=2)
    with pytest.raises(EGPSError, match="different settings"):
        _run(tmp_path / "run", lm, "mh", limit=2, resume=True)


def test_resume_after_a_truncated_last_line(tmp_path, lm):
    full = tmp_path / "full"
    _run(full, lm, "mh", seeds=(0, 1, 2))
    lines = (full / "results.jsonl").read_text().splitlines(keepends=True)
    assert len(lines) == 12
    # A killed run: 5 finished lines, then half of the 6th without its newline.
    part = tmp_path / "part"
    part.mkdir()
    (part / "results.jsonl").write_text("".join(lines[:5]) + lines[5][: len(lines[5]) // 2])
    method = CountingMethod(load_method("mh", steps=2))
    summary = evaluate(FirstTokenTask(), method, lm, [0, 1, 2], None, part, resume=True, progress=False)
    assert method.calls == 7 and summary["computed_this_run"] == 7  # finished lines were not recomputed
    resumed = (part / "results.jsonl").read_text().splitlines(keepends=True)
    assert resumed[:5] == lines[:5]
    keys = _keys(read_results(part / "results.jsonl"))
    assert len(keys) == len(set(keys)) == 12
    assert set(keys) == set(_keys(read_results(full / "results.jsonl")))
    by_key = {(r["problem_id"], r["seed"]): r["completion_ids"] for r in read_results(full / "results.jsonl")}
    assert all(
        by_key[(r["problem_id"], r["seed"])] == r["completion_ids"] for r in read_results(part / "results.jsonl")
    )
    # Resuming a finished run computes nothing.
    again = CountingMethod(load_method("mh", steps=2))
    evaluate(FirstTokenTask(), again, lm, [0, 1, 2], None, part, resume=True, progress=False)
    assert again.calls == 0 and len(read_results(part / "results.jsonl")) == 12


def test_a_damaged_middle_line_is_an_error(tmp_path, lm):
    _run(tmp_path / "run", lm, limit=2)
    path = tmp_path / "run" / "results.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "{not json\n" + "".join(lines[1:]))
    with pytest.raises(EGPSError, match=":2: not valid JSON"):
        _run(tmp_path / "run", lm, limit=2, resume=True)


def test_report_puts_runs_side_by_side(tmp_path, lm, capsys):
    _run(tmp_path / "plain", lm, "plain")
    _run(tmp_path / "mh", lm, "mh")
    md = tmp_path / "report" / "table.md"
    assert main(["report", str(tmp_path / "plain"), str(tmp_path / "mh"), "--out", str(md)]) == 0
    text = md.read_text()
    rows = [line for line in text.splitlines() if line.startswith("| ")]
    assert len(rows) == 3 and rows[1].startswith("| plain") and rows[2].startswith("| mh α=4")
    assert "first-token" in rows[1] and "accuracy ± SE" in rows[0] and "| pass@k |" in rows[0]
    pass_k = json.loads((tmp_path / "mh" / "summary.json").read_text())["pass_at_k"]
    assert set(pass_k) == {"1", "2"} and f"@1 {pass_k['1']:.3f}, @2 {pass_k['2']:.3f}" in rows[2]
    assert md.with_suffix(".png").read_bytes()[:4] == b"\x89PNG"
    capsys.readouterr()
    assert main(["report", str(tmp_path / "plain"), str(tmp_path / "mh")]) == 0
    assert "| plain" in capsys.readouterr().out
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "egps: error:" in capsys.readouterr().err


@pytest.fixture
def problems_file(tmp_path):
    path = tmp_path / "problems.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(4)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--task", "nope"], "unknown task"),
        (["--method", "greedy"], "unknown method"),
        (["--seeds", "0,x"], "--seeds must be comma-separated integers"),
        (["--task", "jsonl:MISSING"], "no such file"),
        (["--task", "jsonl:BADCOLS"], "missing 'answer'"),
        (["--ray", "--ray-workers", "0"], "--ray-workers must be a number >= 1"),
        (["--limit", "-1"], "--limit"),
    ],
)
def test_bad_input_is_one_line(tmp_path, problems_file, capsys, extra, message):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": 1, "prompt": "x"}\n')
    extra = [e.replace("MISSING", str(tmp_path / "missing.jsonl")).replace("BADCOLS", str(bad)) for e in extra]
    args = ["eval", "--task", f"jsonl:{problems_file}", "--model", "tiny-gpt2", "--method", "plain"]
    args += ["--out", str(tmp_path / "run"), *extra]
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("egps: error:") and message in err and "\n" not in err
    assert not (tmp_path / "run" / "results.jsonl").exists()


def test_kill_and_resume_from_the_command_line(tmp_path, problems_file):
    out = tmp_path / "run"
    args = ["eval", "--task", f"jsonl:{problems_file}", "--model", "tiny-gpt2", "--method", "plain"]
    args += ["--max-new-tokens", "12", "--seeds", "0,1,2", "--out", str(out), "--no-progress"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "egps_ppl.cli", *args], env=env, start_new_session=True)
    results = out / "results.jsonl"
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if results.exists() and results.read_text().count("\n") >= 2:
                break
            time.sleep(0.02)
        killed = proc.poll() is None
        if killed:
            os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    before = results.read_text().splitlines(keepends=True)
    finished = [line for line in before if line.endswith("\n")]
    assert len(finished) >= 2
    assert main(args) == 2  # without --resume an existing results file is refused
    assert main([*args, "--resume"]) == 0
    after = results.read_text().splitlines(keepends=True)
    assert after[: len(finished)] == finished  # finished lines kept, not recomputed
    keys = _keys(read_results(results))
    assert len(keys) == len(set(keys)) == 12
    assert set(keys) == {(f"q{i}", s) for i in range(4) for s in (0, 1, 2)}
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["computed_this_run"] == 12 - len(finished)
    if killed:
        assert len(finished) < 12


# ------------------------------------------------------------------------ the built-in tasks on the fast model


@pytest.mark.parametrize(("task", "limit"), [("arithmetic", 2), ("humaneval", 1)])
def test_builtin_tasks_run_on_the_builtin_fast_model(tmp_path, capsys, task, limit):
    """tiny-gpt2's context holds the arithmetic prompt (541 byte tokens) and HumanEval's, with the default 256 new
    tokens; HumanEval is graded by running its tests."""
    out = tmp_path / task
    args = ["eval", "--task", task, "--model", "tiny-gpt2", "--method", "plain", "--limit", str(limit)]
    assert main([*args, "--out", str(out), "--no-progress", "--threads", "1"]) == 0, capsys.readouterr().err
    records = read_results(out / "results.jsonl")
    assert len(records) == limit and all(r["prompt_tokens"] > 300 for r in records)
    if task == "humaneval":
        assert records[0]["problem_id"] == "HumanEval/0" and records[0]["grade_detail"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["complete"] and summary["n_results"] == limit


# ------------------------------------------------------------------------ chat template and empty completions


class _Templated:
    """A byte tokenizer with a chat template that marks each turn, for a tiny model posing as a chat model."""

    def __init__(self):
        from egps_ppl.models.registry import ByteTokenizer

        self.inner = ByteTokenizer()
        self.chat_template = "{{ messages }}"
        self.vocab_size, self.eos_token_id, self.bos_token_id, self.pad_token_id = 257, 256, 256, None

    def __len__(self):
        return 257

    def encode(self, text, add_special_tokens=False):
        return self.inner.encode(text)

    def decode(self, ids, skip_special_tokens=True):
        return self.inner.decode(ids, skip_special_tokens)

    def apply_chat_template(self, messages, add_generation_prompt=True, tokenize=True):
        return self.encode("".join(f"<|{m['role']}|>{m['content']}" for m in messages) + "<|assistant|>")


@pytest.fixture
def registered():
    """Register models and tasks for one test; remove them afterwards."""
    from egps_ppl.evals.tasks import TASKS
    from egps_ppl.models.registry import CHAT_MODELS, MODELS

    names = []
    yield names
    for kind, name in names:
        (MODELS if kind == "model" else TASKS).pop(name, None)
        CHAT_MODELS.discard(name)


def _templated_tiny(name):
    def factory(device="cpu", dtype="float32", **kwargs):
        from egps_ppl.models.registry import load_model

        lm = load_model("tiny-gpt2", device=device, dtype=dtype, **kwargs)
        lm.tokenizer, lm.name = _Templated(), name
        return lm

    return factory


def test_jsonl_prompts_use_the_chat_template_of_a_chat_model(tmp_path, problems_file, registered):
    """A chat model gets the template by default (an instruct model given the raw text mostly says nothing);
    --no-chat and --chat override; a base model whose tokenizer has a template keeps the raw prompt."""
    from egps_ppl.models.registry import register_model

    register_model("tiny-chat", _templated_tiny("tiny-chat"), "tiny-gpt2 posing as a chat model", chat=True)
    register_model("tiny-base", _templated_tiny("tiny-base"), "tiny-gpt2 with a template, a base model")
    registered += [("model", "tiny-chat"), ("model", "tiny-base")]
    raw = len("0+1=")
    templated = len("<|user|>0+1=<|assistant|>")

    def prompt_tokens(model, *extra):
        out = tmp_path / f"{model}{''.join(extra)}"
        args = ["eval", "--task", f"jsonl:{problems_file}", "--model", model, "--method", "plain", "--limit", "1"]
        assert main([*args, "--max-new-tokens", "4", "--out", str(out), "--no-progress", *extra]) == 0
        return read_results(out / "results.jsonl")[0]["prompt_tokens"]

    assert prompt_tokens("tiny-chat") == templated
    assert prompt_tokens("tiny-chat", "--no-chat") == raw
    assert prompt_tokens("tiny-base") == raw
    assert prompt_tokens("tiny-base", "--chat") == templated
    assert prompt_tokens("tiny-gpt2") == raw  # no template at all


def test_mostly_empty_completions_are_reported(tmp_path, capsys, registered):
    """A model that ends every reply at once: the run says so on stderr and in summary.json."""
    from egps_ppl.evals.tasks import register_task
    from egps_ppl.models.markov import MarkovLM
    from egps_ppl.models.registry import register_model

    class Mute(MarkovLM):
        def decode(self, ids):
            return " ".join(str(i) for i in ids if i != self.eos_token_id)

    register_model("mute", lambda device="cpu", dtype="float32": Mute([1.0, 0.0], [[1.0, 0.0], [1.0, 0.0]], 0), "")
    register_task("first-token", lambda arg, *, seed=0, chat=None: FirstTokenTask(), "first-token")
    registered += [("model", "mute"), ("task", "first-token")]
    args = ["eval", "--task", "first-token", "--method", "plain", "--seeds", "0,1", "--no-progress"]
    assert main([*args, "--model", "mute", "--out", str(tmp_path / "mute")]) == 0
    err = capsys.readouterr().err
    assert "egps: warning: 8 of 8 completions are empty" in err and "--chat" in err
    summary = json.loads((tmp_path / "mute" / "summary.json").read_text())
    assert summary["empty_completions"] == 8 and len(summary["warnings"]) == 1
    assert summary["accuracy"] == 0.0
    register_model("chain", lambda device="cpu", dtype="float32": random_markov(5, seed=2, eos_token_id=0), "")
    registered.append(("model", "chain"))
    assert main([*args, "--model", "chain", "--out", str(tmp_path / "chain")]) == 0
    assert "warning" not in capsys.readouterr().err
    assert json.loads((tmp_path / "chain" / "summary.json").read_text())["warnings"] == []


# ------------------------------------------------------------------------ one writer, atomic files, resume keys


def test_a_second_eval_on_a_busy_directory_refuses_or_waits(tmp_path, problems_file, capsys):
    """A run in progress holds the directory: another ``egps eval`` on it (say ``--resume``) is refused at once,
    before its model loads; with ``--wait`` it queues behind it and computes only what is left."""
    import threading

    out = tmp_path / "run"
    args = ["eval", "--task", f"jsonl:{problems_file}", "--model", "tiny-gpt2", "--method", "plain", "--batch", "1"]
    args += ["--max-new-tokens", "8", "--seeds", "0,1,2", "--out", str(out), "--no-progress", "--threads", "1"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen([sys.executable, "-m", "egps_ppl.cli", *args], env=env)
    results = out / "results.jsonl"
    try:
        deadline = time.monotonic() + 120
        while not (results.exists() and results.read_text().count("\n") >= 1) and time.monotonic() < deadline:
            time.sleep(0.02)
        first.send_signal(signal.SIGSTOP)  # paused mid-run, still holding the lock
        assert first.poll() is None, "the first run finished too soon"
        assert main([*args, "--resume"]) == 2
        err = capsys.readouterr().err
        assert f"is being written by another egps eval (pid {first.pid}" in err and err.count("\n") == 1, err
        threading.Timer(1.0, first.send_signal, [signal.SIGCONT]).start()
        assert main([*args, "--resume", "--wait"]) == 0
        assert "waiting for it" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGCONT)
        first.wait(timeout=120)
    assert first.returncode == 0
    keys = _keys(read_results(results))
    assert len(keys) == len(set(keys)) == 12  # every unit once
    assert json.loads((out / "summary.json").read_text())["computed_this_run"] == 0


def test_the_lock_is_released_when_a_run_fails_and_nests_in_its_holder(tmp_path, lm):
    from egps_ppl.evals.store import lock_run_dir

    class Failing(CountingMethod):
        def run(self, *args):
            if self.calls == 3:
                raise EGPSError("boom")
            return super().run(*args)

    with pytest.raises(EGPSError, match="boom"):
        evaluate(FirstTokenTask(), Failing(load_method("plain")), lm, [0, 1], None, tmp_path, progress=False)
    summary = _run(tmp_path, lm, resume=True)  # the failed run let go of the directory
    assert summary["complete"] and summary["computed_this_run"] == 5
    with lock_run_dir(tmp_path) as held:  # a caller holding the lock: the run's own hold nests in it
        assert not held.nested and lock_run_dir(tmp_path).nested
        _run(tmp_path, lm, resume=True)
    lock_run_dir(tmp_path).release()  # and it was released


def test_json_files_are_replaced_atomically_with_unique_temporary_names(tmp_path):
    """Writers racing on summary.json never collide on a temporary name, and a reader never sees half a file."""
    import threading

    from egps_ppl.evals.store import _write_json

    path = tmp_path / "summary.json"
    _write_json(path, {"writer": -1, "payload": "x" * 100_000})
    errors, stop = [], threading.Event()

    def write(writer):
        try:
            for i in range(30):
                _write_json(path, {"writer": writer, "i": i, "payload": "x" * 100_000})
        except Exception as exc:
            errors.append(exc)

    def read():
        while not stop.is_set():
            try:
                json.loads(path.read_text())
            except Exception as exc:
                errors.append(exc)

    reader = threading.Thread(target=read)
    reader.start()
    writers = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in writers:
        t.start()
    for t in writers:
        t.join()
    stop.set()
    reader.join()
    assert not errors, errors[:3]
    assert [p.name for p in tmp_path.iterdir()] == ["summary.json"]  # no temporary file left behind
    assert oct(path.stat().st_mode & 0o777) == "0o644"


def test_config_records_the_resume_keys_and_old_runs_still_resume(tmp_path, lm):
    from egps_ppl.evals.store import RESUME_KEYS, problems_sha256

    _run(tmp_path, lm, limit=2, config={"dtype": "float32"})
    config = json.loads((tmp_path / "config.json").read_text())
    assert set(RESUME_KEYS) <= set(config) and config["chat"] is None
    assert config["problems_sha256"] == problems_sha256(FirstTokenTask().problems())
    assert config["problem_ids"] == ["p0", "p1"]
    with pytest.raises(EGPSError, match="dtype: was 'float32', now 'bfloat16'"):
        _run(tmp_path, lm, limit=2, resume=True, config={"dtype": "bfloat16"})
    for key in ("dtype", "chat", "problems_sha256"):  # a run directory from before these keys were recorded
        del config[key]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert _run(tmp_path, lm, resume=True, config={"dtype": "bfloat16"})["complete"]


def test_report_recomputes_a_stale_summary(tmp_path, lm, capsys):
    """An interrupted --resume appends results but never rewrites summary.json: the report counts them anyway."""

    class Interrupted(CountingMethod):
        def run(self, *args):
            if self.calls == 2:
                raise KeyboardInterrupt
            return super().run(*args)

    _run(tmp_path, lm, seeds=(0,))
    with pytest.raises(KeyboardInterrupt):
        evaluate(FirstTokenTask(), Interrupted(load_method("plain")), lm, [0, 1], None, tmp_path, True, False)
    assert json.loads((tmp_path / "summary.json").read_text())["n_results"] == 4  # stale
    assert main(["report", str(tmp_path)]) == 0
    captured = capsys.readouterr()
    assert "summary.json is stale" in captured.err and "(6 results)" in captured.err
    assert "(6/8 done)" in captured.out


def test_a_full_disk_while_appending_keeps_what_was_written(tmp_path, lm, monkeypatch):
    import errno

    import egps_ppl.evals.store as store

    real, calls = store._append, []

    def append(fh, record):
        calls.append(record)
        if len(calls) == 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        real(fh, record)

    monkeypatch.setattr(store, "_append", append)
    with pytest.raises(EGPSError, match=r"cannot append to .*results\.jsonl: No space left on device; the finished"):
        _run(tmp_path, lm)
    monkeypatch.setattr(store, "_append", real)
    assert len(read_results(tmp_path / "results.jsonl")) == 2
    assert _run(tmp_path, lm, resume=True)["computed_this_run"] == 6
