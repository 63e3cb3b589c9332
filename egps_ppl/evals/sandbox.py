"""Run untrusted, model-generated Python inside a Linux sandbox and grade it without trusting it.

**Isolation** (``isolation="bwrap"``, the default). Every run starts bubblewrap (``bwrap``,
https://github.com/containers/bubblewrap) with new PID, network, mount, IPC and UTS namespaces. Inside, the file
system is an empty root with read-only binds of ``/usr`` (and the ``/bin``, ``/lib*`` links), ``/etc/ld.so.cache``,
the Python installation and the virtualenv; a fresh ``/proc`` that shows only the sandbox's own processes; a
minimal ``/dev``; and one writable place, a private ``tmpfs`` at ``/tmp`` (the working directory, ``scratch_mb``
MiB, gone when the run ends). The environment is empty but for a few fixed variables. The network namespace has
only its own loopback, so nothing on the host (127.0.0.1 included) and nothing outside can be reached. The program
runs as uid/gid 65534 (``nobody``) with no capabilities and ``no_new_privs``: when the grader is root, bwrap runs
without a user namespace and the harness drops to the real uid 65534 before anything else runs; otherwise bwrap
maps the grader's uid to 65534 in a new user namespace (outside it the program is then the grader's uid, but it
sees no host process and no host file except the read-only binds). No host process is visible in its PID
namespace, so it can signal none. When grading ends (verdict, exit or wall clock) the grader kills bwrap with
``SIGKILL``; ``--die-with-parent`` takes the namespace's init, and the kernel then kills every process in the
namespace, ``setsid`` or not. The program is also held by rlimits (CPU seconds, address space, file size, no core
dumps, processes: ``RLIMIT_NPROC`` is 0 by default, so no fork and no thread, and it binds because the program is
not root) and, as a convenience only, by Python-level guards that make fork/exec/kill/... raise.

If ``bwrap`` is missing or namespaces are not permitted, every call raises :class:`~egps_ppl.errors.EGPSError`
saying how to install it. The old process-group sandbox is kept only as an explicit opt-in, ``isolation="process"``
or ``EGPS_SANDBOX=process``: same rlimits, guards, verdict protocol and wall clock, but as the grader's user on the
host's file system and network; it warns on every call that it is not a boundary.

**The verdict** never comes from the exit status or the program's output. Inside the sandbox a harness process P
(trusted code of this module) reads its job, with a per-run nonce (``secrets.token_hex``), from a pipe; drops
privileges and makes itself non-dumpable (so a process of the same uid can neither ``ptrace`` it nor open its
``/proc/PID/mem`` or ``/proc/PID/fd``); then starts a fresh interpreter C (fork + exec, so C's memory holds no copy
of the nonce) that alone runs the untrusted code. For HumanEval, C runs prompt + completion and then serves calls
of the entry point over two pipes; P runs the test code and calls ``check(candidate)`` with a proxy that sends the
arguments to C and decodes the results as plain data only (``None``, bools, ints, floats, complex, str, bytes, and
lists, tuples, dicts, sets and frozensets of them), so C can hand P neither code nor an object with a rigged
``__eq__``, and never sees the expected outputs. Only when ``check`` has returned, and C did not die during it,
does P write the nonce and ``passed`` to a verdict pipe that only P holds; the grader counts a run as passed iff it
reads that with the right nonce. ``os._exit(0)``, ``posix._exit(0)``, ``sys.exit(0)``, killing itself or P, and
anything printed are never a pass.

**What this guarantees.** A HumanEval completion is graded as passing only if the dataset's ``check`` ran in P and
returned, and every value it compared came from the completion as plain data. The program cannot read the
grader's environment, files outside the read-only binds or the host's ``/proc``; cannot write outside its
``tmpfs`` (and its stdout/stderr pipes, of which the grader keeps the last 4 kB); cannot reach any network; cannot
signal or ``ptrace`` host processes or P; and leaves no process and no file behind.

**What it does not guarantee.** The problem record (prompt, test, entry point) is trusted: P executes the prompt
(for helper functions some tests call, e.g. ``poly``, ``encode_cyclic``) and the test code. Arguments reach the
completion as copies, so a test that relied on the completion mutating its arguments would see the original
values, and helpers the completion redefines are not used by the test (the prompt's are). A completion may still
game a weak test (returning what the visible examples expect). :func:`run_python` on its own has no ``check``: its
``passed`` means the program's top-level code ran to the end, which C reports over a pipe the program can also
write to, so a program that deliberately speaks that protocol can claim it; use it for accidents, not to grade
hostile code. The boundary is the Linux kernel's namespaces and uid checks: kernel exploits, information that
``/proc`` and ``/sys`` show every process (kernel version, CPU, memory), timing side channels and CPU/memory
pressure on the host (bounded by the rlimits and the ``tmpfs`` size) are out of scope. In the ``process`` fallback
none of the isolation holds, and a program running as root can ``ptrace`` P, so not even the verdict is then
trustworthy.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import secrets
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Literal

from egps_ppl.errors import EGPSError

__all__ = ["SandboxResult", "humaneval_program", "run_humaneval", "run_python"]

Status = Literal["passed", "failed", "timeout", "error"]
Isolation = Literal["bwrap", "process"]

SANDBOX_ENV = "EGPS_SANDBOX"
"""Environment variable choosing the isolation when the caller does not: ``bwrap`` (default) or ``process``."""

SANDBOX_UID = 65534
"""The unprivileged uid/gid the program runs as (``nobody``)."""

_TAIL_BYTES = 4000
_VERDICT_MAX = 64 * 1024
_INSTALL_HINT = (
    "install bubblewrap (Debian/Ubuntu: apt-get install -y bubblewrap; Fedora: dnf install bubblewrap), "
    f"or set {SANDBOX_ENV}=process to run model code WITHOUT isolation (not a security boundary)"
)

# ------------------------------------------------------------------------------------------- code run inside
# Shared by P and C: length-prefixed JSON messages and the plain-data value codec.
_CODEC = r"""
import json as _json, os as _os, numbers as _numbers
_MAX_MESSAGE = 64 * 1024 * 1024

def _send(fd, obj):
    data = _json.dumps(obj, separators=(",", ":")).encode("ascii")
    view = memoryview(len(data).to_bytes(4, "big") + data)
    while view:
        view = view[_os.write(fd, view):]

def _read_exact(fd, n):
    chunks = []
    while n:
        chunk = _os.read(fd, min(n, 1 << 20))
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)

def _recv(fd):
    head = _read_exact(fd, 4)
    if head is None:
        return None
    size = int.from_bytes(head, "big")
    if size > _MAX_MESSAGE:
        raise ValueError("message too large")
    body = _read_exact(fd, size)
    return None if body is None else _json.loads(body)

def _enc(v):
    t = type(v)
    if v is None or t is bool or t is str:
        return v
    if t is int:
        return v if v.bit_length() <= 1000 else {"i": format(v, "x")}
    if t is float:
        return v
    if t is list:
        return [_enc(x) for x in v]
    if t is tuple:
        return {"t": [_enc(x) for x in v]}
    if t is dict:
        return {"d": [[_enc(k), _enc(x)] for k, x in v.items()]}
    if t is set:
        return {"s": [_enc(x) for x in v]}
    if t is frozenset:
        return {"f": [_enc(x) for x in v]}
    if t is bytes:
        return {"b": v.hex()}
    if t is complex:
        return {"c": [v.real, v.imag]}
    if isinstance(v, bool) or type(v).__name__ == "bool_":
        return bool(v)
    if isinstance(v, _numbers.Integral):
        return _enc(int(v))
    if isinstance(v, _numbers.Real):
        return float(v)
    if isinstance(v, str):
        return str.__str__(v)
    for base in (list, tuple, dict, set, frozenset, bytes, complex):
        if isinstance(v, base):
            return _enc(base(v))
    raise TypeError("the sandbox passes only plain data, not a value of type " + type(v).__name__)

def _dec(v):
    t = type(v)
    if v is None or t is bool or t is int or t is float or t is str:
        return v
    if t is list:
        return [_dec(x) for x in v]
    if t is dict and len(v) == 1:
        (k, x), = v.items()
        if k == "i" and type(x) is str:
            return int(x, 16)
        if k == "b" and type(x) is str:
            return bytes.fromhex(x)
        if k == "c" and type(x) is list and len(x) == 2 and all(type(p) in (int, float) for p in x):
            return complex(x[0], x[1])
        if type(x) is list:
            if k == "t":
                return tuple(_dec(y) for y in x)
            if k == "s":
                return {_dec(y) for y in x}
            if k == "f":
                return frozenset(_dec(y) for y in x)
            if k == "d" and all(type(p) is list and len(p) == 2 for p in x):
                return {_dec(a): _dec(b) for a, b in x}
    raise ValueError("malformed value")
"""

# C: the only process that runs untrusted code. fds 3 (requests from P) and 4 (replies to P).
_CHILD = (
    _CODEC
    + r"""
import builtins, resource, sys
_exit, _IN, _OUT = _os._exit, 3, 4

def _flush():
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:
            pass

_job = _recv(_IN)

def _limit(which, soft, hard=None):
    if soft is None:
        return
    hard = soft if hard is None else hard
    current_hard = resource.getrlimit(which)[1]
    if current_hard != resource.RLIM_INFINITY:
        soft, hard = min(soft, current_hard), min(hard, current_hard)
    resource.setrlimit(which, (soft, hard))

_limit(resource.RLIMIT_CPU, _job["cpu"], _job["cpu"] + 1)
_limit(resource.RLIMIT_AS, _job["mem"])
_limit(resource.RLIMIT_DATA, _job["mem"])
_limit(resource.RLIMIT_FSIZE, _job["fsize"])
_limit(resource.RLIMIT_CORE, 0)
_limit(resource.RLIMIT_NPROC, _job["nproc"])
if _job["guard"]:
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
        if hasattr(_os, _name):
            setattr(_os, _name, _blocked("os." + _name))
    for _name in ("rmtree", "move", "chown"):
        setattr(shutil, _name, _blocked("shutil." + _name))
    subprocess.Popen = _blocked("subprocess.Popen")
    try:
        import _posixsubprocess
        _posixsubprocess.fork_exec = _blocked("fork_exec")
    except ImportError:
        pass
_globals = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(_job["code"], "program.py", "exec"), _globals)
except SystemExit as exc:
    sys.stderr.write("SystemExit: the program called exit(%r) before finishing\n" % (exc.code,))
    _flush()
    _exit(71)
_flush()
if _job["mode"] == "program":
    _send(_OUT, {"done": True})
    _exit(0)
_fn = _globals.get(_job["entry_point"])
if not callable(_fn):
    sys.stderr.write("NameError: the program defines no function %r\n" % (_job["entry_point"],))
    _flush()
    _exit(1)
_send(_OUT, {"ready": True})
while True:
    _req = _recv(_IN)
    if _req is None:
        _exit(0)
    try:
        _reply = {"r": _enc(_fn(*_dec(_req["a"]), **_dec(_req["k"])))}
    except SystemExit as exc:
        _reply = {"e": "SystemExit", "m": "exit(%r) called" % (exc.code,)}
    except BaseException as exc:
        try:
            _message = str(exc)[:1000]
        except BaseException:
            _message = ""
        _reply = {"e": type(exc).__name__, "m": _message}
    _flush()
    _send(_OUT, _reply)
"""
)

# P: the trusted harness. argv: job fd, verdict fd. Writes exactly one verdict, then exits (killing C).
_HARNESS = (
    _CODEC
    + r"""
import builtins, signal, sys
_JOB_FD, _VERDICT_FD = int(sys.argv[1]), int(sys.argv[2])
_job = _recv(_JOB_FD)
_os.close(_JOB_FD)
_nonce = _job.pop("nonce")
_child = None

def _finish(status, message="", returncode=None):
    data = _json.dumps({"nonce": _nonce, "status": status, "message": str(message)[:2000],
                        "returncode": returncode}).encode("ascii")
    view = memoryview(data)
    while view:
        view = view[_os.write(_VERDICT_FD, view):]
    _os.close(_VERDICT_FD)
    if _child is not None:
        try:
            _os.kill(_child, signal.SIGKILL)
        except OSError:
            pass
    _os._exit(0)

try:
    if _job["uid"] is not None and _os.getuid() == 0:
        _os.chmod(".", 0o1777)
        _os.setgroups([])
        _os.setresgid(_job["uid"], _job["uid"], _job["uid"])
        _os.setresuid(_job["uid"], _job["uid"], _job["uid"])
        if _os.getresuid() != (_job["uid"],) * 3 or _os.getresgid() != (_job["uid"],) * 3:
            raise OSError("uid change did not take")
    import ctypes
    if ctypes.CDLL(None, use_errno=True).prctl(4, 0, 0, 0, 0) != 0:  # PR_SET_DUMPABLE 0
        raise OSError("prctl(PR_SET_DUMPABLE) failed")
except Exception as exc:
    _finish("error", "harness setup failed: %s: %s" % (type(exc).__name__, exc))

_req_r, _req_w = _os.pipe()
_resp_r, _resp_w = _os.pipe()
_child = _os.fork()
if _child == 0:
    try:
        _a, _b = _os.dup(_req_r), _os.dup(_resp_w)
        _os.dup2(_a, 3)
        _os.dup2(_b, 4)
        _os.closerange(5, max(1 << 16, _os.sysconf("SC_OPEN_MAX")))
        _os.execv(sys.executable, [sys.executable, "-I", "-c", _job["child"]])
    finally:
        _os._exit(127)
_os.close(_req_r)
_os.close(_resp_w)

def _ended(before):
    _, status = _os.waitpid(_child, 0)
    rc = _os.waitstatus_to_exitcode(status)
    if rc == -signal.SIGXCPU:
        _finish("timeout", "CPU-time limit of %d s" % _job["cpu"], rc)
    if rc == -signal.SIGXFSZ:
        _finish("failed", "file-size limit exceeded", rc)
    if rc < 0:
        _finish("failed", "killed by " + signal.Signals(-rc).name, rc)
    if rc == 0:
        _finish("failed", "the program exited with status 0 before " + before, rc)
    _finish("failed", "", rc)

def _reply():
    try:
        return _recv(_resp_r)
    except Exception:
        return False

class _ProgramEnded(BaseException):
    pass

class _ProtocolError(BaseException):
    pass

_dead = []
_send(_req_w, {"mode": _job["mode"], "code": _job["code"], "entry_point": _job["entry_point"],
               "cpu": _job["cpu"], "mem": _job["mem"], "fsize": _job["fsize"], "nproc": _job["nproc"],
               "guard": _job["guard"]})
_first = _reply()
if _job["mode"] == "program":
    if _first is None:
        _ended("finishing")
    if _first != {"done": True}:
        _finish("failed", "the program broke the harness protocol")
    _finish("passed", "passed", 0)
if _first is None:
    _ended("check was called")
if _first != {"ready": True}:
    _finish("failed", "the program broke the harness protocol")

def _raise_from(name, message):
    cls = getattr(builtins, name, None) if type(name) is str else None
    if isinstance(cls, type) and issubclass(cls, Exception):
        try:
            exc = cls(message)
        except Exception:
            exc = None
        if exc is not None:
            raise exc
    raise RuntimeError("%s: %s" % (name, message))

def candidate(*args, **kwargs):
    if _dead:
        raise _dead[0]
    try:
        _send(_req_w, {"a": _enc(list(args)), "k": _enc(dict(kwargs))})
    except BrokenPipeError:
        _dead.append(_ProgramEnded())
        raise _dead[0]
    reply = _reply()
    if reply is None:
        _dead.append(_ProgramEnded())
        raise _dead[0]
    if type(reply) is dict and len(reply) == 1 and "r" in reply:
        try:
            return _dec(reply["r"])
        except Exception:
            pass
    elif type(reply) is dict and len(reply) == 2 and type(reply.get("m")) is str:
        _raise_from(reply.get("e"), reply["m"])
    _dead.append(_ProtocolError())
    raise _dead[0]

candidate.__name__ = candidate.__qualname__ = _job["entry_point"]
_ns = {"__name__": "__main__", "__builtins__": builtins}
try:
    exec(compile(_job["prompt"], "prompt.py", "exec"), _ns)
except BaseException:
    _ns = {"__name__": "__main__", "__builtins__": builtins}
_ns[_job["entry_point"]] = candidate
try:
    exec(compile(_job["test"], "test.py", "exec"), _ns)
    _ns["check"](candidate)
except BaseException as exc:
    if not _dead:
        _text = str(exc)
        _finish("failed", type(exc).__name__ + (": " + _text if _text else ""))
if _dead:
    if isinstance(_dead[0], _ProtocolError):
        _finish("failed", "the program broke the harness protocol")
    _ended("check returned")
_finish("passed", "passed")
"""
)


# ------------------------------------------------------------------------------------------------ the grader
@dataclass(frozen=True)
class SandboxResult:
    """How a sandboxed program ended.

    Attributes
    ----------
    status : {"passed", "failed", "timeout", "error"}
        ``passed``: the harness reported, with this run's nonce, that the program ran to the end
        (:func:`run_python`) or that HumanEval's ``check`` returned (:func:`run_humaneval`); never inferred from
        the exit status. ``failed``: anything else the program did (an exception, a failed assertion, a limit it
        hit, an early exit, a kill). ``timeout``: killed at the wall-clock or CPU limit. ``error``: the sandbox
        itself could not run it.
    message : str
        A short reason: the check's exception, the last line of the traceback, or which limit stopped it.
    returncode : int or None
        The exit status of the process that ran the program (negative: killed by that signal), when known.
    wall_s : float
        Seconds from start to the end of the kill.
    pgid : int or None
        The grader-side process group (bwrap or, for ``process``, the harness) that was killed afterwards.
    stdout, stderr : str
        The last few kB of the program's output.
    isolation : str
        ``"bwrap"`` or ``"process"`` (the latter is not a security boundary).
    """

    status: Status
    message: str
    returncode: int | None
    wall_s: float
    pgid: int | None = None
    stdout: str = ""
    stderr: str = ""
    isolation: str = ""

    @property
    def passed(self) -> bool:
        """Whether the harness vouched for the run (see ``status``)."""
        return self.status == "passed"


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:300] if lines else ""


def _python() -> str:
    if not sys.executable:
        raise EGPSError("the sandbox needs sys.executable (the Python interpreter) to be known")
    return sys.executable


def _isolation(isolation: str | None) -> Isolation:
    value = isolation if isolation is not None else (os.environ.get(SANDBOX_ENV) or "bwrap")
    if value not in ("bwrap", "process"):
        where = "isolation" if isolation is not None else SANDBOX_ENV
        raise EGPSError(f"{where} must be 'bwrap' or 'process', got {value!r}")
    return value  # type: ignore[return-value]


def _inside(path: str, roots: list[str]) -> bool:
    return any(path == root or path.startswith(root.rstrip("/") + "/") for root in roots)


def _bwrap_argv(bwrap: str, python: str, scratch_bytes: int, features: set[str]) -> list[str]:
    """The bwrap command line up to (not including) the command, for this interpreter and caller."""
    root = os.geteuid() == 0
    argv = [bwrap]
    if not root:
        argv += ["--unshare-user", "--uid", str(SANDBOX_UID), "--gid", str(SANDBOX_UID)]
    argv += ["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    argv += ["--die-with-parent", "--new-session", "--ro-bind", "/usr", "/usr"]
    for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(top):
            argv += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            argv += ["--ro-bind", top, top]
    argv += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
    # The scratch tmpfs comes before the interpreter's trees: a venv under /tmp (a CI checkout there) is then bound
    # on top of it instead of being hidden by it.
    argv += ["--proc", "/proc", "--dev", "/dev"]
    if "--size" in features:
        argv += ["--size", str(scratch_bytes)]
    if "--perms" in features:
        argv += ["--perms", "1777"]
    argv += ["--tmpfs", "/tmp"]
    bound = ["/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"]
    trees = [os.path.realpath(p) for p in (sys.base_prefix, sys.prefix, os.path.dirname(os.path.realpath(python)))]
    trees += [os.path.abspath(sys.prefix), os.path.dirname(os.path.abspath(python))]
    made: set[str] = {"/tmp"}  # exists (the scratch tmpfs); never re-create it with other permissions
    for tree in sorted(set(trees), key=len):
        if not os.path.isdir(tree) or _inside(tree, bound):
            continue
        parts = tree.strip("/").split("/")
        for i in range(1, len(parts)):
            parent = "/" + "/".join(parts[:i])
            if parent not in made and not _inside(parent, bound):
                argv += ["--perms", "0755", "--dir", parent] if "--perms" in features else ["--dir", parent]
                made.add(parent)
        argv += ["--ro-bind", tree, tree]
        bound.append(tree)
    argv += ["--chdir", "/tmp", "--clearenv"]
    for key, value in _ENV.items():
        argv += ["--setenv", key, value]
    if root:  # no user namespace: the harness needs exactly these two to drop to SANDBOX_UID, then has none
        argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
    return [*argv, "--"]


_ENV = {
    "PATH": "/usr/bin:/bin",
    "HOME": "/tmp",
    "LANG": "C.UTF-8",
    "PYTHONHASHSEED": "0",
    "PYTHONDONTWRITEBYTECODE": "1",
    "OMP_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
}

_probe_lock = threading.Lock()
_probed: dict[tuple[str, str, bool], set[str]] = {}


def _bwrap_features(python: str) -> tuple[str, set[str]]:
    """Find bwrap, learn its options and check once per process that it can start a sandbox here."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        raise EGPSError(f"the code sandbox needs bubblewrap (bwrap), which is not on PATH: {_INSTALL_HINT}")
    key = (bwrap, python, os.geteuid() == 0)
    with _probe_lock:
        if key in _probed:
            return bwrap, _probed[key]
        try:
            helptext = subprocess.run([bwrap, "--help"], capture_output=True, text=True, timeout=30).stdout
            features = {opt for opt in ("--size", "--perms") if opt in helptext}
            argv = [*_bwrap_argv(bwrap, python, 1 << 20, features), python, "-I", "-S", "-c", "pass"]
            probe = subprocess.run(argv, capture_output=True, text=True, timeout=30, env={})
        except (OSError, subprocess.SubprocessError) as exc:
            raise EGPSError(f"the code sandbox could not run bwrap ({exc}): {_INSTALL_HINT}") from None
        if probe.returncode != 0:
            why = _last_line(probe.stderr) or f"exit status {probe.returncode}"
            raise EGPSError(
                f"bwrap cannot create the sandbox's namespaces here ({why}); run where user namespaces are "
                f"allowed (or as root), or set {SANDBOX_ENV}=process to run model code WITHOUT isolation"
            )
        _probed[key] = features
        return bwrap, features


class _Tail:
    """The last bytes written to a pipe, bounded."""

    def __init__(self, limit: int) -> None:
        self.limit, self.data = limit, bytearray()

    def add(self, chunk: bytes) -> None:
        self.data += chunk
        if len(self.data) > 16 * self.limit:
            del self.data[: -self.limit]

    def text(self) -> str:
        return bytes(self.data[-self.limit :]).decode("utf-8", errors="replace")


def _kill_group(pgid: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)


def _run(job: dict, timeout_s: float, isolation: Isolation, scratch_mb: float) -> SandboxResult:
    """Start the harness under ``isolation``, feed it ``job``, collect output and verdict, kill everything."""
    python = _python()
    nonce = secrets.token_hex(16)
    job = dict(job, nonce=nonce, child=_CHILD)
    start = time.monotonic()
    workdir = None
    if isolation == "bwrap":
        bwrap, features = _bwrap_features(python)
        job["uid"] = SANDBOX_UID
        prefix = _bwrap_argv(bwrap, python, max(1, int(scratch_mb * 1024 * 1024)), features)
        env: dict[str, str] = {}
    else:
        warnings.warn(
            "EGPS sandbox: isolation='process' is NOT a security boundary: model code runs as this user, "
            "with this machine's files and network",
            RuntimeWarning,
            stacklevel=3,
        )
        job["uid"] = None
        prefix = []
        env = dict(_ENV, PATH=os.environ.get("PATH", "/usr/bin:/bin"))
        workdir = tempfile.TemporaryDirectory(prefix="egps-sandbox-", ignore_cleanup_errors=True)
    payload = json.dumps(job).encode("ascii")
    payload = len(payload).to_bytes(4, "big") + payload
    job_r, job_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    argv = [*prefix, python, "-I", "-c", _HARNESS, str(job_r), str(verdict_w)]
    try:
        proc = subprocess.Popen(
            argv,
            cwd=workdir.name if workdir is not None else None,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out_w,
            stderr=err_w,
            pass_fds=(job_r, verdict_w),
            start_new_session=True,
            close_fds=True,
        )
    except OSError as exc:
        for fd in (job_r, job_w, verdict_r, verdict_w, out_r, out_w, err_r, err_w):
            os.close(fd)
        if workdir is not None:
            workdir.cleanup()
        return SandboxResult("error", f"could not start the sandbox: {exc}", None, time.monotonic() - start)
    for fd in (job_r, verdict_w, out_w, err_w):
        os.close(fd)
    pgid = proc.pid  # start_new_session: it leads its own process group
    out, err, verdict = _Tail(_TAIL_BYTES), _Tail(_TAIL_BYTES), bytearray()
    sinks = {out_r: out.add, err_r: err.add, verdict_r: verdict.extend}
    timed_out = False
    try:
        pidfd = os.pidfd_open(proc.pid)
    except (AttributeError, OSError):
        pidfd = None
    sel = selectors.DefaultSelector()
    try:
        for fd in sinks:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        os.set_blocking(job_w, False)
        sel.register(job_w, selectors.EVENT_WRITE)
        if pidfd is not None:
            sel.register(pidfd, selectors.EVENT_READ)
        deadline = start + timeout_s
        pending = memoryview(payload)
        exited = False
        while not exited:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = proc.poll() is None
                break
            events = sel.select(remaining if pidfd is not None else min(remaining, 0.01))
            if pidfd is None and proc.poll() is not None:
                exited = True
            for key, _ in events:
                fd = key.fd
                if fd == pidfd:
                    exited = True
                elif fd == job_w:
                    try:
                        pending = pending[os.write(job_w, pending) :]
                    except BlockingIOError:
                        continue
                    except OSError:  # the harness is gone
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(job_w)
                        os.close(job_w)
                        job_w = -1
                else:
                    chunk = _read_some(fd)
                    if chunk:
                        if fd != verdict_r or len(verdict) < _VERDICT_MAX:
                            sinks[fd](chunk)
                    else:
                        sel.unregister(fd)
    finally:
        _kill_group(pgid)  # bwrap dies, --die-with-parent takes the namespace's init and with it every process
        proc.wait()
        sel.close()
        for fd in (out_r, err_r, verdict_r):
            for _ in range(64):  # what is left in the pipes; bounded, in case an escaped process (process mode) writes
                chunk = _read_some(fd)
                if not chunk:
                    break
                if fd != verdict_r or len(verdict) < _VERDICT_MAX:
                    sinks[fd](chunk)
            os.close(fd)
        for fd in (job_w, pidfd):
            if fd is not None and fd >= 0:
                os.close(fd)
        if workdir is not None:
            workdir.cleanup()
    wall = time.monotonic() - start
    stdout, stderr = out.text(), err.text()
    return _result(bytes(verdict), nonce, proc.returncode, timed_out, timeout_s, wall, pgid, stdout, stderr, isolation)


def _read_some(fd: int) -> bytes:
    try:
        return os.read(fd, 1 << 16)
    except (BlockingIOError, InterruptedError):
        return b""
    except OSError:
        return b""


def _result(
    verdict: bytes,
    nonce: str,
    launcher_rc: int | None,
    timed_out: bool,
    timeout_s: float,
    wall: float,
    pgid: int,
    stdout: str,
    stderr: str,
    isolation: str,
) -> SandboxResult:
    """Turn what came back into a result: only a verdict carrying this run's nonce can say ``passed``."""
    try:
        data = json.loads(verdict.decode("ascii")) if verdict else None
    except (UnicodeDecodeError, ValueError):
        data = None
    valid = (
        isinstance(data, dict)
        and isinstance(data.get("nonce"), str)
        and secrets.compare_digest(data["nonce"], nonce)
        and data.get("status") in ("passed", "failed", "timeout", "error")
    )
    if valid:
        status: Status = data["status"]
        message = str(data.get("message") or "")
        rc = data.get("returncode")
        rc = rc if isinstance(rc, int) else launcher_rc
    elif timed_out:
        status, message, rc = "timeout", f"wall-clock limit of {timeout_s:g} s", launcher_rc
    else:
        status, rc = "failed", launcher_rc
        message = "no verdict from the harness: " + (_last_line(stderr) or f"exit status {launcher_rc}")
        if stderr.lstrip().startswith("bwrap:"):
            status = "error"
    if status == "failed" and not message:
        memory = "MemoryError" in stderr
        message = "MemoryError (memory limit)" if memory else (_last_line(stderr) or f"exit status {rc}")
    return SandboxResult(status, message, rc, wall, pgid, stdout, stderr, isolation)


def _limits(
    timeout_s: float,
    memory_mb: int | None,
    cpu_s: float | None,
    file_size_mb: float | None,
    max_processes: int | None,
    guard: bool,
    scratch_mb: float,
) -> dict:
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise EGPSError(f"timeout_s must be > 0, got {timeout_s!r}")
    for name, value in (("memory_mb", memory_mb), ("cpu_s", cpu_s), ("file_size_mb", file_size_mb)):
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
            raise EGPSError(f"{name} must be a number > 0 or None, got {value!r}")
    if max_processes is not None and (
        isinstance(max_processes, bool) or not isinstance(max_processes, int) or max_processes < 0
    ):
        raise EGPSError(f"max_processes must be an integer >= 0 or None, got {max_processes!r}")
    if isinstance(scratch_mb, bool) or not isinstance(scratch_mb, (int, float)) or not scratch_mb > 0:
        raise EGPSError(f"scratch_mb must be a number > 0, got {scratch_mb!r}")
    return {
        "cpu": math.ceil(cpu_s if cpu_s is not None else timeout_s) + 1,
        "mem": None if memory_mb is None else int(memory_mb * 1024 * 1024),
        "fsize": None if file_size_mb is None else int(file_size_mb * 1024 * 1024),
        "nproc": max_processes,
        "guard": bool(guard),
    }


def run_python(
    code: str,
    timeout_s: float = 3.0,
    memory_mb: int | None = 1024,
    cpu_s: float | None = None,
    file_size_mb: float | None = 16,
    max_processes: int | None = 0,
    guard: bool = True,
    *,
    scratch_mb: float = 32,
    isolation: Isolation | None = None,
) -> SandboxResult:
    """Run ``code`` in the sandbox and report how it ended (see the module docstring for the boundary).

    Parameters
    ----------
    code : str
        The program (source text). It runs as ``__main__`` with its private scratch directory as working dir.
    timeout_s : float
        Wall-clock limit in seconds, sandbox start included; everything is killed when it passes.
    memory_mb : int or None
        Address-space limit (``RLIMIT_AS`` and ``RLIMIT_DATA``) in MiB; ``None`` leaves it as inherited.
    cpu_s : float or None
        CPU-time limit (``RLIMIT_CPU``); by default ``ceil(timeout_s) + 1`` seconds.
    file_size_mb : float or None
        Largest file the program may write (``RLIMIT_FSIZE``).
    max_processes : int or None
        ``RLIMIT_NPROC`` for the program (0: no fork and no new thread). Under bwrap as root it counts every
        process of uid 65534 on the machine, so a value > 0 is shared by sandboxes running at the same time.
        ``None`` leaves it as inherited.
    guard : bool
        Also replace fork/exec/kill/file-removal calls with ones that raise ``PermissionError`` (a convenience,
        not a boundary).
    scratch_mb : float
        Size of the private ``tmpfs`` that is the only writable place (bwrap only).
    isolation : {"bwrap", "process"} or None
        ``None``: the environment variable ``EGPS_SANDBOX``, else ``"bwrap"``. ``"process"`` is the old,
        unisolated process-group sandbox and warns on every call.

    Returns
    -------
    SandboxResult
        ``passed`` iff the harness reported that the top-level code ran to the end. Never raises for anything
        the program does.

    Raises
    ------
    EGPSError
        Bad limits, or bwrap missing or unable to create namespaces here (with how to fix it).
    """
    if not isinstance(code, str):
        raise EGPSError(f"code must be a str, got {type(code).__name__}")
    limits = _limits(timeout_s, memory_mb, cpu_s, file_size_mb, max_processes, guard, scratch_mb)
    job = dict(limits, mode="program", code=code, entry_point=None, prompt=None, test=None)
    return _run(job, float(timeout_s), _isolation(isolation), scratch_mb)


def humaneval_program(problem: dict, completion: str) -> str:
    """The official HumanEval check program: prompt + completion, the test code, ``check(entry_point)``.

    Parameters
    ----------
    problem : dict
        A HumanEval record with ``prompt``, ``test`` and ``entry_point``.
    completion : str
        The function body that continues the prompt (or a whole definition of the function).

    Returns
    -------
    str
        The program as the official harness runs it (:func:`run_humaneval` splits it between two processes).
    """
    return f"{problem['prompt']}{completion}\n\n{problem['test']}\n\ncheck({problem['entry_point']})\n"


def run_humaneval(problem: dict, completion: str, timeout_s: float = 3.0, **limits: object) -> SandboxResult:
    """Grade ``completion`` with HumanEval's official ``check`` (3 s by default, as in the papers).

    The completion (after the prompt) runs in the sandbox's untrusted process; the test code and ``check`` run in
    the trusted harness process and call the entry point through a proxy (see the module docstring).

    Parameters
    ----------
    problem : dict
        A HumanEval record (``prompt``, ``test``, ``entry_point``); trusted.
    completion : str
        The code continuing the prompt; untrusted.
    timeout_s : float
        Wall-clock limit.
    **limits
        Passed on as in :func:`run_python` (``memory_mb``, ``cpu_s``, ``file_size_mb``, ``max_processes``,
        ``guard``, ``scratch_mb``, ``isolation``).

    Returns
    -------
    SandboxResult
        ``passed`` iff ``check`` returned.

    Raises
    ------
    EGPSError
        A malformed problem record, bad limits, or no usable bwrap.
    """
    if not isinstance(problem, dict):
        raise EGPSError(f"problem must be a dict, got {type(problem).__name__}")
    for key in ("prompt", "test", "entry_point"):
        if not isinstance(problem.get(key), str):
            raise EGPSError(f"problem[{key!r}] must be a str, got {type(problem.get(key)).__name__}")
    if not problem["entry_point"].isidentifier():
        raise EGPSError(f"problem['entry_point'] must be a Python name, got {problem['entry_point']!r}")
    if not isinstance(completion, str):
        raise EGPSError(f"completion must be a str, got {type(completion).__name__}")
    known = {"memory_mb", "cpu_s", "file_size_mb", "max_processes", "guard", "scratch_mb", "isolation"}
    unknown = sorted(set(limits) - known)
    if unknown:
        raise EGPSError(f"unknown sandbox limit(s) {unknown}; known: {sorted(known)}")
    options = {"memory_mb": 1024, "cpu_s": None, "file_size_mb": 16, "max_processes": 0, "guard": True}
    options.update({k: v for k, v in limits.items() if k not in ("scratch_mb", "isolation")})
    scratch_mb = limits.get("scratch_mb", 32)
    job = dict(
        _limits(timeout_s, scratch_mb=scratch_mb, **options),  # type: ignore[arg-type]
        mode="humaneval",
        code=f"{problem['prompt']}{completion}\n",
        entry_point=problem["entry_point"],
        prompt=problem["prompt"],
        test=problem["test"],
    )
    return _run(job, float(timeout_s), _isolation(limits.get("isolation")), float(scratch_mb))  # type: ignore[arg-type]
