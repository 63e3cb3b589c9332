"""Bad inputs from a hostile probe of the toolkit (issue #14): each is one line on stderr naming the problem, exit
status 2, no traceback, and, where the problem can be known without the model, no model loaded.

Every case runs ``egps`` in-process on the fast built-in models (``markov:PATH.json``, ``tiny-gpt2``).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest

from egps_ppl.cli import main
from egps_ppl.models.testbeds import random_markov

NOT_UTF8 = b'{"id": "q0", "prompt": "caf\xe9 1+1=", "answer": "2"}\n'  # Latin-1, not UTF-8


# ------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory):
    """A finished ``egps eval`` run (tiny-gpt2, 2 problems, 1 seed) and its task file; each case copies it."""
    root = tmp_path_factory.mktemp("finished")
    problems = root / "problems.jsonl"
    rows = [{"id": f"q{i}", "prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(2)]
    problems.write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = root / "run"
    assert main([*_eval_args(problems, run), "--no-progress"]) == 0
    return SimpleNamespace(problems=problems, run=run)


def _eval_args(problems, out, *extra):
    return [
        "eval", "--task", f"jsonl:{problems}", "--model", "tiny-gpt2", "--method", "plain", "--max-new-tokens", "4",
        "--threads", "1", "--out", str(out), *extra,
    ]  # fmt: skip


class Context:
    """What a case builds its command line from: fresh files under ``tmp``, a copy of the finished run."""

    def __init__(self, tmp: Path, finished: SimpleNamespace, monkeypatch: pytest.MonkeyPatch) -> None:
        self.tmp, self.monkeypatch, self.cleanups = tmp, monkeypatch, []
        self.markov = tmp / "chain.json"
        random_markov(4, seed=3, eos_token_id=0).to_json(self.markov)
        self.problems = tmp / "problems.jsonl"
        shutil.copy(finished.problems, self.problems)
        self.run = tmp / "run"
        shutil.copytree(finished.run, self.run)
        # The run was made with the module's own task file: point its config at this copy, as the user would see.
        config = json.loads((self.run / "config.json").read_text())
        config["task"] = f"jsonl:{self.problems}"
        (self.run / "config.json").write_text(json.dumps(config))

    def file(self, name: str, content: str | bytes) -> Path:
        path = self.tmp / name
        path.write_bytes(content.encode() if isinstance(content, str) else content)
        return path

    def sample(self, *extra: str, out: str | Path | None = None) -> list[str]:
        return [
            "sample", "--model", f"markov:{self.markov}", "--alpha", "4", "--max-new-tokens", "5",
            "--num-chains", "4", "--num-samples", "3", "--warmup", "1", "--no-progress",
            "--out", str(out or self.tmp / "out.nc"), *extra,
        ]  # fmt: skip

    def eval(self, *extra: str, out: str | Path | None = None) -> list[str]:
        return _eval_args(self.problems, out or self.tmp / "eval", "--no-progress", *extra)

    def resume(self, *extra: str) -> list[str]:
        return self.eval("--resume", *extra, out=self.run)

    def report(self, *extra: str) -> list[str]:
        return ["report", str(self.run), *extra]

    def analyze(self, *extra: str) -> list[str]:
        return [
            "analyze", "--model", f"markov:{self.markov}", "--max-new-tokens", "5", "--permutations", "10",
            "--out", str(self.tmp / "analysis"), *extra,
        ]  # fmt: skip

    def unwritable(self) -> Path:
        """A folder nothing can be created in: no write permission, or (as root, who ignores that) immutable."""
        path = self.tmp / "readonly"
        path.mkdir()
        path.chmod(0o555)
        self.cleanups.append(lambda: path.chmod(0o755))
        chattr = shutil.which("chattr")
        if (
            _writable(path)
            and chattr
            and subprocess.run([chattr, "+i", str(path)], capture_output=True).returncode == 0
        ):
            self.cleanups.append(lambda: subprocess.run([chattr, "-i", str(path)], capture_output=True))
        if _writable(path):
            pytest.skip("cannot make a read-only folder here (root without chattr)")
        return path

    def full_disk(self) -> Path:
        """A folder whose file system reports no free space."""
        path = self.tmp / "full"
        path.mkdir()
        real = shutil.disk_usage

        def disk_usage(where):
            usage = real(where)
            return usage._replace(free=0) if Path(where).resolve() == path.resolve() else usage

        self.monkeypatch.setattr(shutil, "disk_usage", disk_usage)
        return path

    def hold_lock(self, run: Path) -> None:
        """Lock ``run`` as another ``egps eval`` would (its own open file description)."""
        fd = os.open(run / ".egps.lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        os.write(fd, b"pid 4242 on elsewhere, since 2026-01-01 00:00:00\n")
        self.cleanups.append(lambda: os.close(fd))

    def edit_results(self, field: str, value: object) -> None:
        path = self.run / "results.jsonl"
        lines = path.read_text().splitlines(keepends=True)
        record = json.loads(lines[0])
        record[field] = value
        path.write_text(json.dumps(record) + "\n" + "".join(lines[1:]))


def _writable(path: Path) -> bool:
    try:
        (path / ".probe").touch()
    except OSError:
        return False
    (path / ".probe").unlink()
    return True


def _duplicate_results(c: Context) -> Path:
    lines = (c.run / "results.jsonl").read_text().splitlines(keepends=True)
    return c.file("dup.jsonl", lines[0] + lines[1] + lines[0])


# ------------------------------------------------------------------------------------------------ the cases

CASES = [
    # --- egps sample: settings that used to give silent wrong results or deep tracebacks
    ("sample alpha 1e308", lambda c: c.sample("--alpha", "1e308"), "alpha must be at most 1e+06"),
    ("sample alpha 1e39", lambda c: c.sample("--alpha", "1e39"), "alpha must be at most 1e+06"),
    ("sample alpha inf", lambda c: c.sample("--alpha", "inf"), "alpha must be finite and > 0"),
    ("mixture weight inf", lambda c: c.sample("--kernel", "mixture(mh:inf)"), "mixture weight must be a finite"),
    ("mixture weight nan", lambda c: c.sample("--kernel", "mixture(mh:nan,mtm:1)"), "mixture weight must be a finite"),
    ("mixture weight < 0", lambda c: c.sample("--kernel", "mixture(mh:-1,mtm:2)"), "mixture weight must be a finite"),
    ("mixture weights all 0", lambda c: c.sample("--kernel", "mixture(mh:0,mtm:0)"), "not all 0"),
    ("kernel 5000 deep", lambda c: c.sample("--kernel", "cycle(" * 5000 + "mh" + ")" * 5000), "nested more than 32"),
    ("kernel 33 deep", lambda c: c.sample("--kernel", "cycle(" * 33 + "mh" + ")" * 33), "nested more than 32"),
    ("chains beyond memory", lambda c: c.sample("--num-chains", str(10**10)), "of memory"),
    (
        "chains x samples beyond memory",
        lambda c: c.sample("--num-chains", str(10**7), "--num-samples", str(10**5)),
        "of memory",
    ),
    (
        "init not UTF-8",
        lambda c: c.sample("--init", str(c.file("init.jsonl", b"[1, 2, 0]\n" * 3 + b"[1\xff]\n"))),
        "is not UTF-8 text",
    ),
    (
        "init outside the support",
        lambda c: c.sample("--init", str(c.file("init.jsonl", "[1, 2]\n" * 4))),
        "outside the support of pi",
    ),
    ("out is a directory", lambda c: c.sample(out=c.file("x", "").parent), "--out must end in .nc"),
    ("out .nc is a directory", lambda c: c.sample(out=_mkdir(c.tmp / "dir.nc")), "is a directory; pass a file"),
    ("out under a file", lambda c: c.sample(out=c.file("plain", "") / "run.nc"), "is a file, not a directory"),
    ("out read-only", lambda c: c.sample(out=c.unwritable() / "run.nc"), "cannot write --out"),
    (
        "out read-only, missing folders",
        lambda c: c.sample(out=c.unwritable() / "a" / "b" / "run.nc"),
        "cannot write --out",
    ),
    ("out disk full", lambda c: c.sample(out=c.full_disk() / "run.nc"), "on disk"),
    # --- egps eval: two writers, resume keys, damaged results, bad files
    (
        "eval while another writes",
        lambda c: (c.hold_lock(c.run), c.resume())[1],
        "is being written by another egps eval (pid 4242",
    ),
    ("resume with another dtype", lambda c: c.resume("--dtype", "bfloat16"), "dtype: was 'float32', now 'bfloat16'"),
    ("resume with --chat", lambda c: c.resume("--chat"), "chat: was None, now True"),
    (
        "resume after the task file changed",
        lambda c: (c.problems.write_text(c.problems.read_text().replace('"2"', '"3"')), c.resume())[1],
        "the task's problems (ids, prompts or answers) changed",
    ),
    ("resume with another method", lambda c: c.resume("--method", "low-temp"), "method: was"),
    (
        'results "correct": "false"',
        lambda c: (c.edit_results("correct", "false"), c.resume())[1],
        "'correct' must be true or false, got \"false\"",
    ),
    ("results seed as text", lambda c: (c.edit_results("seed", "0"), c.resume())[1], "'seed' must be an integer"),
    (
        "results negative cost",
        lambda c: (c.edit_results("decode_tokens", -1), c.resume())[1],
        "'decode_tokens' must be a number >= 0",
    ),
    (
        "eval task not UTF-8",
        lambda c: c.eval("--task", f"jsonl:{c.file('latin1.jsonl', NOT_UTF8)}"),
        "is not UTF-8 text",
    ),
    ("eval out is a file", lambda c: c.eval(out=c.file("results.txt", "x")), "is a file; pass a directory"),
    ("eval out read-only", lambda c: c.eval(out=c.unwritable() / "run"), "cannot write --out"),
    ("eval chains beyond memory", lambda c: c.eval("--method", "mh", "--num-chains", str(10**11)), "of memory"),
    ("eval alpha 1e308", lambda c: c.eval("--alpha", "1e308"), "alpha must be at most"),
    ("eval mixture(mh:inf)", lambda c: c.eval("--method", "mixture(mh:inf)"), "mixture weight must be a finite"),
    # --- egps report: malformed run files
    (
        "report summary not JSON",
        lambda c: (c.file("run/summary.json", '{"accuracy": 0.5'), c.report())[1],
        "summary.json is not valid JSON (line 1",
    ),
    (
        "report config not JSON",
        lambda c: (c.file("run/config.json", "{"), c.report())[1],
        "config.json is not valid JSON",
    ),
    (
        "report summary not UTF-8",
        lambda c: (c.file("run/summary.json", b'{"a": "\xff"}'), c.report())[1],
        "summary.json is not UTF-8 text",
    ),
    ("report summary a list", lambda c: (c.file("run/summary.json", "[]"), c.report())[1], "must hold a JSON object"),
    (
        "report summary alone, wrong types",
        lambda c: ((c.run / "results.jsonl").unlink(), c.file("run/summary.json", '{"accuracy": "high"}'), c.report())[
            2
        ],
        "'accuracy' has the wrong type",
    ),
    (
        'report "correct": "false"',
        lambda c: (c.edit_results("correct", "false"), c.report())[1],
        "'correct' must be true or false",
    ),
    (
        "report results not UTF-8",
        lambda c: (
            c.file("run/results.jsonl", b'{"a": "\xff"}\n' + (c.run / "results.jsonl").read_bytes()),
            c.report(),
        )[1],
        "results.jsonl:1: not valid JSON",
    ),
    ("report --out a directory", lambda c: c.report("--out", str(_mkdir(c.tmp / "table.md"))), "is a directory"),
    # --- egps analyze: duplicate and undecodable completions
    (
        "analyze duplicate results lines",
        lambda c: c.analyze("--completions", str(_duplicate_results(c))),
        "repeats problem 'q0' seed 0 of line 1",
    ),
    (
        "analyze completions not UTF-8",
        lambda c: c.analyze("--completions", str(c.file("c.jsonl", b"[1, 2\xff]\n"))),
        "is not UTF-8 text",
    ),
    ("analyze alpha 1e39", lambda c: c.analyze("--alpha", "1e39"), "alpha must be at most"),
    ("analyze out is a file", lambda c: c.analyze("--out", str(c.file("analysis.txt", "x"))), "is a file"),
]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True)
    return path


@pytest.fixture
def model_loads(monkeypatch):
    """Counts calls of ``load_model`` (the CLI imports it at run time, from the registry)."""
    import egps_ppl.models.registry as registry

    calls = []
    real = registry.load_model

    def counted(*args, **kwargs):
        calls.append(args)
        return real(*args, **kwargs)

    monkeypatch.setattr(registry, "load_model", counted)
    return calls


# Cases found only once the model is there: the support of --init needs its EOS token.
AFTER_THE_MODEL = {"init outside the support"}


@pytest.mark.parametrize(("name", "build", "message"), CASES, ids=[case[0] for case in CASES])
def test_bad_input_is_one_clear_line(name, build, message, tmp_path, finished_run, monkeypatch, capsys, model_loads):
    context = Context(tmp_path, finished_run, monkeypatch)
    try:
        args = build(context)
        capsys.readouterr()
        status = main(args)
        err = capsys.readouterr().err
    finally:
        for cleanup in reversed(context.cleanups):
            with contextlib.suppress(OSError):
                cleanup()
    assert status == 2, err
    assert err.startswith("egps: error: ") and err.count("\n") == 1, err
    assert message in err, err
    assert "Traceback" not in err
    assert bool(model_loads) == (name in AFTER_THE_MODEL), f"model loaded: {model_loads}"


def test_the_table_covers_every_command():
    commands = {build.__code__.co_names for _, build, _ in CASES}
    names = set().union(*commands)
    assert {"sample", "eval", "resume", "report", "analyze"} <= names
    assert len(CASES) >= 40


def test_a_storage_error_is_one_line(tmp_path, capsys, monkeypatch):
    """An OSError of the file system (full, read-only, no permission) escaping a command is one line too; any
    other OSError is a bug and keeps its traceback."""
    from egps_ppl import cli

    def raising(exc):
        def handler(args):
            raise exc

        parsed = SimpleNamespace(handler=handler)
        monkeypatch.setattr(cli, "build_parser", lambda: SimpleNamespace(parse_args=lambda argv: parsed))

    raising(OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x")))
    assert main([]) == 2
    assert capsys.readouterr().err == f"egps: error: No space left on device: {tmp_path / 'x'}\n"
    raising(OSError(errno.EROFS, "Read-only file system"))
    assert main([]) == 2
    assert capsys.readouterr().err == "egps: error: Read-only file system\n"
    raising(FileNotFoundError(errno.ENOENT, "No such file or directory", "gone"))
    with pytest.raises(FileNotFoundError):
        main([])
