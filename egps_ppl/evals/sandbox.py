"""Run untrusted, model-generated Python in a separate, resource-limited process.

Each program runs in a fresh interpreter (``sys.executable -I``: no user site, no ``PYTHONPATH``, the working
directory not on ``sys.path``) started in its own session (``start_new_session=True``) inside a temporary working
directory, with stdin closed and stdout/stderr going to files there. Before the program runs, the child sets its own
limits with ``resource.setrlimit``: CPU seconds, address space, file size, core dumps (none) and processes
(``RLIMIT_NPROC``, 0 by default: no fork and no thread for an unprivileged user). It then replaces the calls a test
should never need with ones that raise ``PermissionError`` (fork/spawn/exec/system, kill, setsid, file removal,
``chmod``, ``os._exit``) so that a fork attempt fails even as root, where ``RLIMIT_NPROC`` does not apply.

The caller waits at most ``timeout_s`` seconds of wall-clock time; afterwards, however the program ended, the whole
process group is killed with ``os.killpg(SIGKILL)`` so no grandchild survives, and the directory is removed. A run
that is killed (wall clock, CPU, file size) or runs out of memory counts as not passed; nothing here raises for a bad
program, and nothing waits longer than the timeout plus the kill.

This stops accidents of generated code (infinite loops, memory blow-ups, fork bombs, huge files, stray ``exit()``),
which is what evaluation needs; it is not a security boundary against a deliberately hostile program (use a
container or VM for that).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

from egps_ppl.errors import EGPSError

__all__ = ["SandboxResult", "humaneval_program", "run_humaneval", "run_python"]

Status = Literal["passed", "failed", "timeout", "error"]

_EXIT_CALLED = 71  # the bootstrap's exit status when the program called exit()/sys.exit() itself

# The child's first code: limits, then guards, then the program. Formatted with the limits (None = leave as is).
_BOOTSTRAP = r"""
import builtins, os, resource, sys
def _limit(which, soft, hard=None):
    if soft is None:
        return
    hard = soft if hard is None else hard
    current_hard = resource.getrlimit(which)[1]
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))
_limit(resource.RLIMIT_CPU, {cpu}, {cpu} + 1)
_limit(resource.RLIMIT_AS, {mem})
_limit(resource.RLIMIT_DATA, {mem})
_limit(resource.RLIMIT_FSIZE, {fsize})
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NPROC, {nproc})
_code = open("program.py", encoding="utf-8").read()
if {guard}:
    import shutil, subprocess
    def _blocked(name):
        def blocked(*args, **kwargs):
            raise PermissionError(name + " is disabled in the sandbox")
        return blocked
    for _name in ("fork", "forkpty", "posix_spawn", "posix_spawnp", "system", "popen", "kill", "killpg",
                  "setsid", "setpgid", "setpgrp", "_exit", "remove", "unlink", "rmdir", "removedirs", "rename",
                  "renames", "replace", "truncate", "chmod", "fchmod", "chown", "fchown", "lchown", "putenv",
                  "execv", "execve", "execl", "execle", "execlp", "execlpe", "execvp", "execvpe",
                  "spawnl", "spawnle", "spawnlp", "spawnlpe", "spawnv", "spawnve", "spawnvp", "spawnvpe"):
        if hasattr(os, _name):
            setattr(os, _name, _blocked("os." + _name))
    for _name in ("rmtree", "move", "chown"):
        setattr(shutil, _name, _blocked("shutil." + _name))
    subprocess.Popen = _blocked("subprocess.Popen")
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = _blocked("fork_exec")
    except ImportError:
        pass
    del _name
_globals = {{"__name__": "__main__", "__builtins__": builtins}}
try:
    exec(compile(_code, "program.py", "exec"), _globals)
except SystemExit as exc:
    sys.stderr.write("SystemExit: the program called exit(%r) before finishing\n" % (exc.code,))
    sys.stderr.flush()
    sys.exit({exit_called})
"""


@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed program ended.

    Attributes
    ----------
    status : {"passed", "failed", "timeout", "error"}
        ``passed``: ran to the end with exit status 0. ``failed``: an exception (a failed assertion, a syntax
        error, ``MemoryError``), a limit it hit (file size), or a call of ``exit()``. ``timeout``: killed at the
        wall-clock or CPU limit. ``error``: the sandbox itself could not run it.
    message : str
        A short reason: the last line of the traceback, or which limit stopped it.
    returncode : int or None
        The child's exit status (negative: killed by that signal).
    wall_s : float
        Seconds from start to the end of the kill.
    pgid : int or None
        The process group that was killed afterwards (for checks that nothing survived).
    stdout, stderr : str
        The last few kB of the program's output.
    """

    status: Status
    message: str
    returncode: int | None
    wall_s: float
    pgid: int | None = None
    stdout: str = ""
    stderr: str = ""

    @property
    def passed(self) -> bool:
        """Whether the program ran to the end without an error."""
        return self.status == "passed"


def _tail(path: str, limit: int = 4000) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - limit))
            return fh.read().decode("utf-8", errors="replace")
    except OSError:
        return ""


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def run_python(
    code: str,
    timeout_s: float = 3.0,
    memory_mb: int | None = 1024,
    cpu_s: float | None = None,
    file_size_mb: float | None = 16,
    max_processes: int | None = 0,
    guard: bool = True,
) -> SandboxResult:
    """Run ``code`` in a fresh, resource-limited Python process and report how it ended.

    Parameters
    ----------
    code : str
        The program (source text). It runs as ``__main__`` in an empty temporary directory.
    timeout_s : float
        Wall-clock limit in seconds; the process group is killed when it passes.
    memory_mb : int or None
        Address-space limit (``RLIMIT_AS`` and ``RLIMIT_DATA``) in MiB; ``None`` leaves it as inherited.
    cpu_s : float or None
        CPU-time limit (``RLIMIT_CPU``); by default ``ceil(timeout_s) + 1`` seconds.
    file_size_mb : float or None
        Largest file the program may write (``RLIMIT_FSIZE``), its stdout/stderr included.
    max_processes : int or None
        ``RLIMIT_NPROC`` for the child (0: no fork and no new thread; not enforced for root, where the guards
        and the process-group kill still apply); ``None`` leaves it as inherited.
    guard : bool
        Replace fork/exec/kill/file-removal calls with ones that raise ``PermissionError``.

    Returns
    -------
    SandboxResult
        Never raises for anything the program does; ``status == "error"`` only if the interpreter could not start.
    """
    if not timeout_s > 0:
        raise EGPSError(f"timeout_s must be > 0, got {timeout_s!r}")
    cpu = math.ceil(cpu_s if cpu_s is not None else timeout_s) + 1
    mem = None if memory_mb is None else int(memory_mb) * 1024 * 1024
    fsize = None if file_size_mb is None else int(file_size_mb * 1024 * 1024)
    bootstrap = _BOOTSTRAP.format(
        cpu=cpu, mem=mem, fsize=fsize, nproc=max_processes, guard=bool(guard), exit_called=_EXIT_CALLED
    )
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "LANG": "C.UTF-8",
        "PYTHONHASHSEED": "0",
        "PYTHONDONTWRITEBYTECODE": "1",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
    }
    start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="egps-sandbox-", ignore_cleanup_errors=True) as workdir:
        with open(os.path.join(workdir, "program.py"), "w", encoding="utf-8") as fh:
            fh.write(code)
        out_path, err_path = os.path.join(workdir, ".stdout"), os.path.join(workdir, ".stderr")
        timed_out = False
        pgid: int | None = None
        try:
            with open(out_path, "wb") as out, open(err_path, "wb") as err:
                proc = subprocess.Popen(
                    [sys.executable, "-I", "-c", bootstrap],
                    cwd=workdir,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=err,
                    start_new_session=True,
                    close_fds=True,
                )
        except OSError as exc:
            return SandboxResult("error", f"could not start the sandbox: {exc}", None, time.monotonic() - start)
        pgid = proc.pid  # start_new_session: the child leads its own process group
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
        finally:
            _kill_group(pgid)  # whatever happened, nothing of the program's group survives
            proc.wait()
        wall = time.monotonic() - start
        stdout, stderr = _tail(out_path), _tail(err_path)
    rc = proc.returncode
    if timed_out:
        status, message = "timeout", f"wall-clock limit of {timeout_s:g} s"
    elif rc == 0:
        status, message = "passed", "passed"
    elif rc == -signal.SIGXCPU:
        status, message = "timeout", f"CPU-time limit of {cpu} s"
    elif rc == -signal.SIGXFSZ:
        status, message = "failed", "file-size limit exceeded"
    elif rc is not None and rc < 0:
        status, message = "failed", f"killed by {signal.Signals(-rc).name}"
    elif "MemoryError" in stderr:
        status, message = "failed", "MemoryError (memory limit)"
    else:
        status, message = "failed", _last_line(stderr) or f"exit status {rc}"
    return SandboxResult(status, message, rc, wall, pgid, stdout, stderr)


def humaneval_program(problem: dict, completion: str) -> str:
    """The official HumanEval check program: prompt + completion, the test code, ``check(entry_point)``.

    Parameters
    ----------
    problem : dict
        A HumanEval record with ``prompt``, ``test`` and ``entry_point``.
    completion : str
        The function body that continues the prompt (or a whole definition of the function).
    """
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_humaneval(problem: dict, completion: str, timeout_s: float = 3.0, **limits: object) -> SandboxResult:
    """Run HumanEval's official tests for ``completion`` in the sandbox (3 s by default, as in the papers).

    Parameters
    ----------
    problem : dict
        A HumanEval record (``prompt``, ``test``, ``entry_point``).
    completion : str
        The code continuing the prompt.
    timeout_s : float
        Wall-clock limit.
    **limits
        Passed on to :func:`run_python` (``memory_mb``, ``file_size_mb``, ...).
    """
    return run_python(humaneval_program(problem, completion), timeout_s=timeout_s, **limits)  # type: ignore[arg-type]
