"""The sandbox: HumanEval reference solutions pass, wrong ones fail, runaway programs are stopped and reaped.

Hostile programs (faked passes, escapes) are in test_sandbox_hostile.py.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest

from egps_ppl.errors import EGPSError
from egps_ppl.evals.sandbox import run_humaneval, run_python
from egps_ppl.evals.tasks import HumanEvalTask, load_task


def _alive(pid: int) -> bool:
    """Whether ``pid`` is a live process (a zombie waiting for a reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid and _alive(int(entry)):
                    return False
            except ProcessLookupError:
                continue
    return True


@pytest.fixture(scope="module")
def records() -> list[dict]:
    return HumanEvalTask.records()


def test_all_reference_solutions_pass(records: list[dict]) -> None:
    assert len(records) == 164
    start = time.monotonic()
    with ThreadPoolExecutor(max_workers=max(2, min(8, os.cpu_count() or 2))) as pool:
        results = list(pool.map(lambda r: run_humaneval(r, r["canonical_solution"], timeout_s=10.0), records))
    pairs = zip(records, results, strict=True)
    failures = [(r["task_id"], res.status, res.message) for r, res in pairs if not res.passed]
    assert not failures, failures
    assert time.monotonic() - start < 60


def test_wrong_completions_fail(records: list[dict]) -> None:
    problem = records[0]
    assert not run_humaneval(problem, "    return None\n").passed
    syntax = run_humaneval(problem, "    return (\n")
    assert syntax.status == "failed" and "SyntaxError" in syntax.message
    # a body that exits before the tests run must not count as passing
    assert run_humaneval(problem, "    pass\nimport sys\nsys.exit(0)\n").status == "failed"


def test_task_grade_goes_through_the_sandbox() -> None:
    task = load_task("humaneval")
    problem = task.problems(1)[0]
    good = task.grade(problem, "```python\n" + problem.prompt + problem.metadata["canonical_solution"] + "```")
    assert good.correct, good.detail
    assert task.grade(problem, problem.metadata["canonical_solution"] + "\ndef unrelated():\n    pass\n").correct
    bad = task.grade(problem, "    return True\n")
    assert not bad.correct and bad.detail.startswith("failed")


def test_infinite_loop_times_out_quickly() -> None:
    start = time.monotonic()
    result = run_python("while True:\n    pass\n", timeout_s=1.0)
    assert result.status == "timeout" and not result.passed
    assert time.monotonic() - start < 3.0
    assert _group_gone(result.pgid)


def test_cpu_limit_stops_a_spinning_program_even_with_a_long_wall_clock() -> None:
    result = run_python("while True:\n    pass\n", timeout_s=30.0, cpu_s=1.0)
    assert result.status == "timeout" and "CPU" in result.message
    assert result.wall_s < 10


def test_memory_bomb_fails() -> None:
    result = run_python("blocks = []\nwhile True:\n    blocks.append(bytearray(50 * 1024 * 1024))\n", memory_mb=512)
    assert result.status == "failed" and "Memory" in result.message


def test_fork_attempts_fail() -> None:
    for code in (
        "import os\nos.fork()\n",
        "import subprocess\nsubprocess.run(['true'])\n",
        "import os\nos.system('true')\n",
        "import multiprocessing as mp\np = mp.Process(target=print)\np.start()\np.join()\n",
    ):
        result = run_python(code, timeout_s=5.0)
        assert result.status == "failed", (code, result)


def test_huge_file_fails() -> None:
    result = run_python("with open('big', 'wb') as fh:\n    fh.write(b'x' * (64 * 1024 * 1024))\n", file_size_mb=8)
    assert result.status == "failed"
    assert "too large" in result.message.lower() or "file-size" in result.message


def _processes_with(token: str) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/cmdline", "rb") as fh:
                    if token.encode() in fh.read():
                        found.append(int(entry))
            except OSError:
                continue
    return found


def test_every_process_is_killed_afterwards() -> None:
    """Without the guards a grandchild can start (even in a new session); it dies with the sandbox."""
    token = "egpsgrandchild" + uuid.uuid4().hex
    code = (
        "import subprocess, sys\n"
        f"p = subprocess.Popen([sys.executable, '-c', 'import os, time; os.setsid(); time.sleep(60)', '{token}'])\n"
        "print('started', flush=True)\n"
    )
    result = run_python(code, timeout_s=5.0, guard=False, max_processes=8)
    assert result.passed and "started" in result.stdout, result
    deadline = time.monotonic() + 2.0
    while _processes_with(token) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _processes_with(token)
    assert _group_gone(result.pgid)


def test_the_program_runs_as_nobody_in_its_own_namespaces() -> None:
    code = (
        "import json, os, socket\n"
        "pids = [int(p) for p in os.listdir('/proc') if p.isdigit()]\n"
        "try:\n    open('/usr/egps_x', 'w')\n    ro = False\nexcept OSError:\n    ro = True\n"
        "open('scratch', 'w').write('ok')\n"
        "print(json.dumps({'uid': os.getuid(), 'gid': os.getgid(), 'pids': pids, 'env': sorted(os.environ),\n"
        "                  'cwd': os.getcwd(), 'root': sorted(os.listdir('/')), 'ro': ro}))\n"
    )
    result = run_python(code, timeout_s=5.0, guard=False)
    assert result.passed and result.isolation == "bwrap", result
    info = json.loads(result.stdout)
    assert info["uid"] == info["gid"] == 65534
    assert max(info["pids"]) < 10  # a PID namespace of its own: bwrap's init, the harness, the program
    assert "EGPS_SANDBOX" not in info["env"] and set(info["env"]) <= {
        "PATH",
        "HOME",
        "LANG",
        "PYTHONHASHSEED",
        "PYTHONDONTWRITEBYTECODE",
        "OMP_NUM_THREADS",
        "OPENBLAS_NUM_THREADS",
        "MKL_NUM_THREADS",
        "PWD",
        "LC_CTYPE",
    }
    assert info["cwd"] == "/tmp" and info["ro"]
    assert "home" not in info["root"] and "etc" in info["root"]  # only ld.so.cache in /etc


def test_values_cross_between_check_and_the_program_as_plain_data() -> None:
    problem = {
        "prompt": "def echo(*args, **kwargs):\n",
        "test": (
            "def check(candidate):\n"
            "    values = [None, True, 0, -7, 2**4000, 1.5, float('inf'), 1j, 'h\\u00e9\\ud800', b'\\x00',\n"
            "              [1, (2, 3)], {'a': {1, 2}}, frozenset({4}), {(1, 2): [None]}]\n"
            "    for value in values:\n"
            "        out = candidate(value)\n"
            "        assert out == value and type(out) is type(value), (value, out)\n"
            "    assert candidate(1, key='x') == ((1,), {'key': 'x'})\n"
            "    try:\n        candidate('raise')\n    except ValueError as exc:\n        assert str(exc) == 'no'\n"
            "    else:\n        raise AssertionError('no exception')\n"
        ),
        "entry_point": "echo",
    }
    body = "    if args == ('raise',):\n        raise ValueError('no')\n"
    body += "    return args[0] if not kwargs else (args, kwargs)\n"
    result = run_humaneval(problem, body, timeout_s=5.0)
    assert result.passed, result
    rigged = run_humaneval(problem, "    return type('X', (), {'__eq__': lambda s, o: True})()\n", timeout_s=5.0)
    assert rigged.status == "failed" and "TypeError" in rigged.message, rigged


def test_missing_bwrap_is_a_clear_error(monkeypatch: pytest.MonkeyPatch, tmp_path) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.delenv("EGPS_SANDBOX", raising=False)
    with pytest.raises(EGPSError, match="apt-get install -y bubblewrap"):
        run_python("pass")


def test_process_fallback_is_explicit_and_loud(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("EGPS_SANDBOX", "process")
    with pytest.warns(RuntimeWarning, match="NOT a security boundary"):
        result = run_humaneval(
            {"prompt": "def f():\n", "test": "def check(c):\n    assert c() == 1\n", "entry_point": "f"},
            "    return 2\nimport posix\nposix._exit(0)\n",
        )
    assert result.status == "failed" and result.isolation == "process"
    monkeypatch.setenv("EGPS_SANDBOX", "container")
    with pytest.raises(EGPSError, match="EGPS_SANDBOX"):
        run_python("pass")


def test_output_and_bad_arguments() -> None:
    result = run_python("print('hello')\n")
    assert result.passed and result.stdout.strip() == "hello"
    with pytest.raises(EGPSError):
        run_python("pass", timeout_s=0)
    with pytest.raises(EGPSError, match="memory_mb"):
        run_python("pass", memory_mb=-1)
    with pytest.raises(EGPSError, match="entry_point"):
        run_humaneval({"prompt": "", "test": ""}, "pass")
    with pytest.raises(EGPSError, match="unknown sandbox limit"):
        run_humaneval({"prompt": "", "test": "", "entry_point": "f"}, "pass", memroy_mb=5)
