"""The sandbox: HumanEval reference solutions pass, wrong ones fail, runaway programs are stopped and reaped."""

from __future__ import annotations

import os
import time
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


def test_process_group_is_killed_afterwards() -> None:
    """Without the guards a grandchild can start; the group kill still removes it when the program ends."""
    code = "import subprocess\np = subprocess.Popen(['sleep', '60'])\nprint(p.pid, flush=True)\n"
    result = run_python(code, timeout_s=5.0, guard=False, max_processes=None)
    assert result.passed, result
    grandchild = int(result.stdout.split()[0])
    deadline = time.monotonic() + 2.0
    while _alive(grandchild) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(grandchild)
    assert _group_gone(result.pgid)


def test_output_and_bad_arguments() -> None:
    result = run_python("print('hello')\n")
    assert result.passed and result.stdout.strip() == "hello"
    with pytest.raises(EGPSError):
        run_python("pass", timeout_s=0)
