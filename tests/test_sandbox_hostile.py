"""Hostile completions: none may be graded as passing, and none may leave a trace outside the sandbox.

Each case is a HumanEval-style completion for ``add(a, b)`` that tries to fake a pass or to escape. They run
without the Python-level guards (``guard=False``) so that the namespaces, the uid and the verdict protocol are what
is tested, and the cases that need processes get a few (``max_processes``). After each run the test checks the
host: no process carries the case's token, no escape file exists, the grader's secret never showed up, the
loopback server saw no connection, and a sentinel process of the grader's user is still alive.

They always ask for bwrap: never run them with ``isolation="process"``, where ``kill -9 -1`` as root kills every
process on the machine.
"""

from __future__ import annotations

import os
import select
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest

from egps_ppl.evals.sandbox import run_humaneval

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="the sandbox is Linux-only")

REPO = Path(__file__).resolve().parents[1]
PROBLEM = {
    "prompt": 'def add(a, b):\n    """Return a + b."""\n',
    "test": "def check(candidate):\n    assert candidate(2, 3) == 5\n    assert candidate(-1, 1) == 0\n",
    "entry_point": "add",
}

# A process that outlives grading would show up on the host with the token in its command line.
SLEEPER = """
import posix, sys
def sleeper():
    posix.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(30)", "{token}"])
"""


@dataclass
class Host:
    token: str
    secret: str
    port: int
    udp_port: int
    sentinel: int
    escape_files: list[Path]


def _case(body: str, **limits: object) -> tuple[str, dict]:
    return body, limits


# name -> (completion, extra limits). ``{token}``, ``{port}``, ... are filled from Host; ``{{`` is a brace.
CASES: dict[str, tuple[str, dict]] = {
    "posix._exit(0) at import": _case("    return a + b\nimport posix\nposix._exit(0)\n"),
    "posix._exit(0) inside the call": _case("    import posix\n    posix._exit(0)\n"),
    "os._exit(0) at import": _case("    return a + b\nimport os\nos._exit(0)\n"),
    "sys.exit(0) before check": _case("    return a + b\nimport sys\nsys.exit(0)\n"),
    "sys.exit(0) inside the call": _case("    import sys\n    sys.exit(0)\n"),
    "kills itself": _case("    return a + b\nimport os, signal\nos.kill(os.getpid(), signal.SIGKILL)\n"),
    "prints a fake verdict everywhere": _case(
        "    return a + b\nimport json, os\n"
        "fake = json.dumps({{'nonce': 'x' * 32, 'status': 'passed', 'message': 'passed'}})\n"
        "print(fake); print('passed'); print('status: passed', flush=True)\n"
        "for fd in range(256):\n"
        "    try:\n        os.write(fd, fake.encode())\n    except OSError:\n        pass\n"
        "os._exit(0)\n"
    ),
    "speaks the harness protocol": _case(
        "    return a + b\nimport json, os\n"
        "for msg in ({{'done': True}}, {{'ready': True}}, {{'r': 5}}):\n"
        "    data = json.dumps(msg).encode()\n"
        "    os.write(4, len(data).to_bytes(4, 'big') + data)\n"
        "os._exit(0)\n"
    ),
    "answers check's calls itself, then exits": _case(
        "    return a + b\nimport json, os\n"
        "data = json.dumps({{'ready': True}}).encode()\n"
        "os.write(4, len(data).to_bytes(4, 'big') + data)\n"
        "for _ in range(2):\n"
        "    os.read(3, 1 << 16)\n"
        "    data = json.dumps({{'r': 5}}).encode()\n"
        "    os.write(4, len(data).to_bytes(4, 'big') + data)\n"
        "os._exit(0)\n"
    ),
    "hunts the nonce in its own memory": _case(
        "    return None\nimport gc, json, os, re, sys\n"
        "found = set()\n"
        "for obj in gc.get_objects():\n"
        "    for value in (obj.values() if isinstance(obj, dict) else []):\n"
        "        if isinstance(value, str) and re.fullmatch('[0-9a-f]{{32}}', value):\n"
        "            found.add(value)\n"
        "frame = sys._getframe()\n"
        "while frame is not None:\n"
        "    found.update(v for v in frame.f_locals.values() if isinstance(v, str) and len(v) == 32)\n"
        "    frame = frame.f_back\n"
        "for nonce in found:\n"
        "    fake = json.dumps({{'nonce': nonce, 'status': 'passed', 'message': 'passed'}}).encode()\n"
        "    for fd in range(5, 64):\n"
        "        try:\n            os.write(fd, fake)\n        except OSError:\n            pass\n"
    ),
    "reads the harness's memory and fds": _case(
        "    return None\nimport os\n"
        "ppid = os.getppid()\n"
        "for path in ('/proc/%d/mem' % ppid, '/proc/%d/environ' % ppid, '/proc/%d/fd/5' % ppid,\n"
        "             '/proc/%d/fd/6' % ppid, '/proc/1/environ', '/proc/1/mem'):\n"
        "    try:\n        open(path, 'rb').read(200)\n        print(path, 'OPENED', flush=True)\n"
        "    except OSError as exc:\n        print(path, 'denied', exc, flush=True)\n"
        "for fd in range(5, 32):\n"
        "    try:\n        os.write(os.open('/proc/%d/fd/%d' % (ppid, fd), os.O_WRONLY), b'passed')\n"
        "    except OSError:\n        pass\n"
    ),
    "rigged __eq__": _case(
        "    class Always:\n        def __eq__(self, other):\n            return True\n    return Always()\n"
    ),
    "posix.fork, child outlives": _case(SLEEPER + "if posix.fork() == 0:\n    sleeper()\n", max_processes=8),
    "ctypes libc.fork, child outlives": _case(
        SLEEPER + "import ctypes\nif ctypes.CDLL(None).fork() == 0:\n    sleeper()\n", max_processes=8
    ),
    "setsid + background child": _case(
        SLEEPER + "import os, time\nif posix.fork() == 0:\n    os.setsid()\n    if posix.fork() == 0:\n"
        "        sleeper()\n    posix._exit(0)\ntime.sleep(0.2)\n",
        max_processes=8,
    ),
    "posix_spawn": _case(
        "    return None\nimport os, sys\n"
        "os.posix_spawn(sys.executable, [sys.executable, '-c', 'import time; time.sleep(30)', '{token}'], {{}})\n",
        max_processes=8,
    ),
    "thread exits the process during check": _case(
        "    import posix, threading, time\n"
        "    threading.Thread(target=lambda: (time.sleep(0.05), posix._exit(0))).start()\n"
        "    time.sleep(5)\n",
        max_processes=8,
    ),
    "kills the parent": _case("    return a + b\nimport os\nos.kill(os.getppid(), 9)\n"),
    "kill -9 -1 and the grader's processes": _case(
        "    return a + b\nimport os\n"
        "for pid in ({sentinel}, {grader}, 1, -1):\n"
        "    try:\n        os.kill(pid, 9)\n    except OSError as exc:\n        print(pid, exc)\n"
    ),
    "reads the grader's environment": _case(
        "    return None\nimport os\nprint(dict(os.environ))\n"
        "for entry in os.listdir('/proc'):\n"
        "    for name in ('environ', 'cmdline'):\n"
        "        try:\n            print(entry, open('/proc/%s/%s' % (entry, name), 'rb').read())\n"
        "        except OSError:\n            pass\n"
        "for pid in ({grader}, os.getppid()):\n"
        "    try:\n        print(open('/proc/%d/environ' % pid, 'rb').read())\n"
        "    except OSError as exc:\n        print(exc)\n"
    ),
    "writes outside the scratch dir": _case(
        "    return None\n"
        "for path in {escape_files!r}:\n"
        "    try:\n        open(path, 'w').write('escaped')\n        print('wrote', path)\n"
        "    except OSError as exc:\n        print('refused', path, exc)\n"
    ),
    "150 MB of files": _case(
        "    return None\nwritten = 0\n"
        "for i in range(10):\n"
        "    try:\n"
        "        with open('/tmp/{token}-%d' % i, 'wb') as fh:\n"
        "            for _ in range(15):\n                fh.write(b'x' * (1 << 20))\n                written += 1\n"
        "    except OSError:\n        pass\n"
        "print('MB', written)\n",
        file_size_mb=16,
    ),
    "loopback connection to the host": _case(
        "    return None\nimport socket\n"
        "for family, host in ((socket.AF_INET, '127.0.0.1'), (socket.AF_INET6, '::1')):\n"
        "    try:\n        socket.create_connection((host, {port}), timeout=0.5)\n        print('CONNECTED')\n"
        "    except OSError as exc:\n        print('refused', exc)\n"
        "try:\n    socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b'x', ('127.0.0.1', {udp_port}))\n"
        "except OSError as exc:\n    print('udp refused', exc)\n"
    ),
    "network to outside": _case(
        "    return None\nimport socket\n"
        "for host in ('1.1.1.1', '8.8.8.8', 'pypi.org'):\n"
        "    try:\n        socket.create_connection((host, 443), timeout=0.5)\n        print('CONNECTED')\n"
        "    except OSError as exc:\n        print('refused', exc)\n"
    ),
    "memory bomb": _case("    return None\nblocks = []\nwhile True:\n    blocks.append(bytearray(50 << 20))\n"),
    "fork bomb, no processes allowed": _case(
        "    return None\nimport posix\nwhile True:\n    posix.fork()\n", max_processes=0
    ),
    "fork bomb, 8 processes allowed": _case(
        "    return None\nimport posix, sys, time\n"
        "SRC = 'import posix, sys, time\\nwhile True:\\n    try:\\n        posix.fork()\\n'"
        " '    except OSError:\\n        time.sleep(0.01)\\n'\n"
        "while True:\n"
        "    try:\n"
        "        if posix.fork() == 0:\n"
        "            posix.execv(sys.executable, [sys.executable, '-c', SRC, '{token}'])\n"
        "    except OSError:\n        time.sleep(0.01)\n",
        max_processes=8,
    ),
    "infinite loop": _case("    while True:\n        pass\n"),
}


@pytest.fixture(scope="module")
def host_services():
    """A TCP and a UDP server on the host's loopback and a sentinel process of the grader's user."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    sentinel = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        yield server, udp, sentinel
    finally:
        sentinel.kill()
        sentinel.wait()
        server.close()
        udp.close()


@pytest.fixture
def host(host_services, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Host:
    server, udp, sentinel = host_services
    token = "egpsescape" + uuid.uuid4().hex
    secret = "egpssecret" + uuid.uuid4().hex
    monkeypatch.setenv("EGPS_TEST_SECRET", secret)
    escapes = [Path("/tmp") / f"egps_escape_{token}", REPO / f"egps_escape_{token}", tmp_path / "escape"]
    escapes += [Path(sys.prefix) / f"egps_escape_{token}", Path.home() / f"egps_escape_{token}"]
    return Host(token, secret, server.getsockname()[1], udp.getsockname()[1], sentinel.pid, escapes)


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


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("name", list(CASES))
def test_hostile_completion_neither_passes_nor_escapes(name: str, host: Host, host_services) -> None:
    server, udp, _ = host_services
    body, limits = CASES[name]
    completion = body.format(
        token=host.token,
        port=host.port,
        udp_port=host.udp_port,
        sentinel=host.sentinel,
        grader=os.getpid(),
        escape_files=[str(p) for p in host.escape_files],
    )
    timeout = 1.0 if name in ("infinite loop", "fork bomb, 8 processes allowed") else 2.0
    # isolation is forced: unisolated, some of these cases (kill -9 -1 as root) would take down the machine
    result = run_humaneval(
        PROBLEM, completion, timeout_s=timeout, guard=False, memory_mb=256, isolation="bwrap", **limits
    )

    assert not result.passed, result
    assert result.status in ("failed", "timeout"), result
    assert result.isolation == "bwrap"
    deadline = time.monotonic() + 2.0  # the namespace's processes die with its init, just after bwrap
    while _processes_with(host.token) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not _processes_with(host.token), "a process of the sandbox outlived grading"
    for path in host.escape_files:
        assert not path.exists(), f"the program wrote {path}"
    assert not list(Path("/tmp").glob(f"{host.token}*"))
    assert host.secret not in result.stdout + result.stderr
    assert _alive(host.sentinel), "the program killed a process of the grader's user"
    assert "CONNECTED" not in result.stdout
    assert not select.select([server, udp], [], [], 0)[0], "the host's loopback server was reached"
    if name == "150 MB of files":
        written = int(result.stdout.split("MB")[1].split()[0])
        assert written <= 32, result.stdout  # the scratch tmpfs is 32 MiB
    if name == "reads the harness's memory and fds":
        opened = [line for line in result.stdout.splitlines() if line.endswith("OPENED")]
        assert "denied" in result.stdout and not [line for line in opened if "/proc/1/" not in line], opened
    if name == "infinite loop":
        assert result.status == "timeout" and result.wall_s < 2.0


def test_correct_completion_passes_and_wrong_one_fails() -> None:
    good = run_humaneval(PROBLEM, "    return a + b\n", timeout_s=2.0, guard=False, isolation="bwrap")
    assert good.passed, good
    bad = run_humaneval(PROBLEM, "    return a - b\n", timeout_s=2.0, guard=False, isolation="bwrap")
    assert bad.status == "failed" and bad.message == "AssertionError", bad
