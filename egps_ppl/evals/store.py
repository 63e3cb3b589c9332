"""The run directory of an evaluation: its files, the plan of a run, appending results, and the summary.

Files in the run directory
--------------------------
``config.json``
    Task, model, method settings, ``max_new_tokens``, dtype, chat and a hash of the task's problems (the
    :data:`RESUME_KEYS`, checked on ``--resume``: a run cannot silently mix methods or inputs), plus the seeds,
    limit and selected problem ids of the latest invocation.
``results.jsonl``
    One JSON object per finished (problem, seed), appended and fsync'ed as soon as it finishes
    (see :data:`RECORD_FIELDS`; every line is type-checked when read). A killed run leaves at most one truncated
    last line, which ``resume=True`` removes before appending.
``summary.json``
    :func:`summarize_results` of the selected (problem, seed) units.
``accuracy_vs_compute.png``
    Accuracy (± standard error over seeds) against mean decode tokens per problem.
``.egps.lock``
    Locked (``fcntl.flock``) by the one process writing the directory (:func:`lock_run_dir`); the kernel
    releases it when that process ends, however it ends.

``config.json``, ``summary.json`` and the plot are replaced atomically (a unique temporary file in the same
folder, fsync'ed, then :func:`os.replace`), so a reader sees the old file or the new one, never half of one.

The steps of a run, shared by the local loop (:func:`egps_ppl.evals.runner.evaluate`) and the Ray runner
(:func:`egps_ppl.evals.ray_runner.evaluate_ray`), which compute the units differently but store them with the same
code: :func:`check_out_dir`, :func:`plan_run`, :class:`ResultWriter`, :func:`finish_run`. Nothing here runs a
model (this module does not import torch), so ``egps report`` and scripts that read results stay light.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import math
import os
import tempfile
import threading
import time
import weakref
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from egps_ppl.errors import EGPSError
from egps_ppl.evals.graders import pass_at_k
from egps_ppl.evals.tasks import Problem

if TYPE_CHECKING:
    from egps_ppl.evals.methods import Method
    from egps_ppl.evals.tasks import Task

__all__ = [
    "CONFIG_FILE",
    "COST_FIELDS",
    "LOCK_FILE",
    "PLOT_FILE",
    "RECORD_FIELDS",
    "RECORD_TYPES",
    "RESULTS_FILE",
    "RESUME_KEYS",
    "SUMMARY_FILE",
    "ResultWriter",
    "RunLock",
    "RunPlan",
    "check_out_dir",
    "check_resume",
    "check_seeds",
    "finish_run",
    "lock_run_dir",
    "plan_run",
    "plot_accuracy_vs_compute",
    "problems_sha256",
    "read_results",
    "run_label",
    "summarize_results",
]

RESULTS_FILE = "results.jsonl"
SUMMARY_FILE = "summary.json"
CONFIG_FILE = "config.json"
PLOT_FILE = "accuracy_vs_compute.png"
LOCK_FILE = ".egps.lock"
RECORD_FIELDS = (
    "problem_id",
    "seed",
    "method",
    "completion",
    "answer",
    "correct",
    "decode_tokens",
    "scored_tokens",
    "forward_calls",
    "wall_s",
)
"""Fields every line of ``results.jsonl`` has (more are written: see :func:`egps_ppl.evals.runner.evaluate_unit`)."""
COST_FIELDS = ("decode_tokens", "scored_tokens", "forward_calls", "wall_s")
"""The cost fields of a record, averaged per unit in the summary (``mean_decode_tokens``, ...)."""
RESUME_KEYS = ("task", "model", "method", "max_new_tokens", "dtype", "chat", "problems_sha256")
"""Settings in ``config.json`` that must match for ``--resume`` to continue a run (a key missing on either
side, as in a run directory written before it was recorded, is not compared). ``problems_sha256`` hashes every
problem's id, prompt and answer, so an edited task file cannot mix with the results of the old one."""
RECORD_TYPES: dict[str, tuple[type, ...]] = {
    "problem_id": (str,),
    "seed": (int,),
    "method": (str,),
    "completion": (str,),
    "correct": (bool,),
    "decode_tokens": (int, float),
    "scored_tokens": (int, float),
    "forward_calls": (int, float),
    "wall_s": (int, float),
}
"""The JSON types a record's fields must have (``answer`` may be anything); ``true``/``false`` only for
``correct``: the string ``"false"`` would count as correct."""


# ------------------------------------------------------------------------------------------------ the file


def read_results(path: str | Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of a ``results.jsonl`` file (an empty list when it does not exist).

    A last line without its newline (a run killed mid-write), or a last line that is not valid JSON, is dropped;
    with ``repair=True`` the file is also truncated to its last complete line so appending can resume.

    Raises
    ------
    EGPSError
        For an invalid line before the last one, or a record missing :data:`RECORD_FIELDS` or with a field of the
        wrong type (:data:`RECORD_TYPES`); the message names the file and the line.
    """
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    records: list[dict[str, Any]] = []
    good_end = 0
    position = 0
    lines = data.split(b"\n")
    for number, raw in enumerate(lines, start=1):
        last = number == len(lines)
        end = position + len(raw) + (0 if last else 1)
        if last:  # the bytes after the final newline: empty, or a truncated record
            break
        if raw.strip():
            try:
                record = json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError):
                if number == len(lines) - 1:  # the last line, newline written but record damaged
                    break
                raise EGPSError(
                    f"{path}:{number}: not valid JSON; the results file is damaged (remove that line, or start "
                    f"again with another --out)"
                ) from None
            missing = [f for f in RECORD_FIELDS if not isinstance(record, dict) or f not in record]
            if missing:
                raise EGPSError(f"{path}:{number}: a result line without {', '.join(missing)}")
            _check_record(record, path, number)
            records.append(record)
        good_end = end
        position = end
    if repair and good_end != len(data):
        with path.open("r+b") as fh:
            fh.truncate(good_end)
            fh.flush()
            os.fsync(fh.fileno())
    return records


def _check_record(record: dict[str, Any], path: Path, number: int) -> None:
    """Raise naming ``path:number`` when a field of ``record`` has the wrong JSON type (:data:`RECORD_TYPES`)."""
    for name, types in RECORD_TYPES.items():
        value = record[name]
        ok = isinstance(value, types) and (bool in types or not isinstance(value, bool))
        if ok and name in COST_FIELDS:
            ok = math.isfinite(value) and value >= 0
        if not ok:
            kind = {"correct": "true or false", "seed": "an integer"}.get(name, "a string")
            kind = "a number >= 0" if name in COST_FIELDS else kind
            raise EGPSError(
                f"{path}:{number}: {name!r} must be {kind}, got {json.dumps(value)}; the results file is damaged "
                f"(fix or remove that line)"
            )


def _append(fh: Any, record: dict[str, Any]) -> None:
    fh.write(json.dumps(record, ensure_ascii=False) + "\n")
    fh.flush()
    os.fsync(fh.fileno())


@contextlib.contextmanager
def _atomic_path(path: Path) -> Any:
    """A unique temporary path next to ``path`` to write; on success it is fsync'ed and moved over ``path``
    (:func:`os.replace`), on failure removed, so ``path`` is always the old file or the complete new one."""
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp" + path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        os.chmod(tmp, path.stat().st_mode & 0o777 if path.exists() else 0o644)  # mkstemp's file is 0600
        yield tmp
        with tmp.open("rb+") as fh:
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):  # a failing clean-up must not hide why the write failed
            tmp.unlink()
        raise
    with contextlib.suppress(OSError):  # the rename itself, on disk (not every file system can sync a folder)
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)


def _write_json(path: Path, value: Any) -> None:
    text = json.dumps(value, indent=2, ensure_ascii=False) + "\n"
    try:
        with _atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise EGPSError(f"cannot write {path}: {exc.strerror or exc}") from None


def _check_resume_config(path: Path, config: dict[str, Any]) -> None:
    if not path.exists():
        return
    try:
        old = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        old = None
    if not isinstance(old, dict):
        raise EGPSError(f"{path} is damaged; remove it to resume, or start again with another --out")
    differ = [k for k in RESUME_KEYS if k in old and k in config and old[k] != config[k]]
    if differ:
        detail = "; ".join(
            f"{k}: the task's problems (ids, prompts or answers) changed"
            if k == "problems_sha256"
            else f"{k}: was {old[k]!r}, now {config[k]!r}"
            for k in differ
        )
        raise EGPSError(f"cannot resume {path.parent}: the run used different settings ({detail}); use another --out")


# ------------------------------------------------------------------------------------------------ the lock

_HELD: weakref.WeakValueDictionary[tuple[str, int], RunLock] = weakref.WeakValueDictionary()
"""Run directories locked by this process: (resolved path, thread id) -> the owning lock (a lock nobody refers
to any more is released by the garbage collector)."""


class RunLock:
    """The exclusive ``fcntl.flock`` on a run directory's :data:`LOCK_FILE` (see :func:`lock_run_dir`).

    :meth:`release` (or leaving the ``with`` block) unlocks it. A lock taken while the same thread already holds
    the directory is *nested*: it does not lock again and its release does nothing; the outermost holder
    releases. The operating system releases the lock when the process ends, even when it is killed.
    """

    def __init__(self, out: Path, key: tuple[str, int], fd: int | None) -> None:
        self.out, self._key, self._fd = out, key, fd

    @property
    def nested(self) -> bool:
        """Whether this is a nested hold (the directory was already locked by this thread)."""
        return self._fd is None

    def release(self) -> None:
        """Unlock (once; a nested hold does nothing)."""
        fd, self._fd = self._fd, None
        if fd is None:
            return
        _HELD.pop(self._key, None)
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    def __enter__(self) -> RunLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def __del__(self) -> None:
        with contextlib.suppress(Exception):  # also at interpreter exit, when the os module may be gone
            self.release()


def lock_run_dir(out_dir: str | Path, wait: bool = False, on_wait: Any = None) -> RunLock:
    """Create ``out_dir`` if needed and become its one writer: an exclusive ``flock`` on its :data:`LOCK_FILE`.

    Parameters
    ----------
    out_dir : str or Path
        The run directory.
    wait : bool
        When another process holds the lock: wait for it (``True``) or raise at once (``False``).
    on_wait : callable or None
        Called with a description of the holder (its pid) before waiting.

    Returns
    -------
    RunLock
        Hold it for the whole run (a context manager); a nested hold when this thread holds it already.

    Raises
    ------
    EGPSError
        When the directory cannot be created or written, or another process holds the lock and ``wait`` is false.
    """
    out = Path(out_dir)
    key = (os.path.realpath(out), threading.get_ident())
    if key in _HELD:
        return RunLock(out, key, None)
    path = out / LOCK_FILE
    try:
        out.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except FileExistsError:
        raise EGPSError(f"--out {out} is a file; pass a directory") from None
    except OSError as exc:
        raise EGPSError(f"cannot write to --out {out}: {exc.strerror or exc}") from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode("utf-8", "replace").strip() or "another process"
            if not wait:
                raise EGPSError(
                    f"{out} is being written by another egps eval ({holder}); wait for it to finish, pass --wait "
                    f"to queue behind it, or use another --out"
                ) from None
            if on_wait is not None:
                on_wait(holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        with contextlib.suppress(OSError):  # who holds it, for the message of the next one (best effort)
            os.ftruncate(fd, 0)
            since = time.strftime("%Y-%m-%d %H:%M:%S")
            os.pwrite(fd, f"pid {os.getpid()} on {os.uname().nodename}, since {since}\n".encode(), 0)
    except BaseException:
        os.close(fd)
        raise
    lock = RunLock(out, key, fd)
    _HELD[key] = lock
    return lock


# ------------------------------------------------------------------------------------------------ a run


@dataclass
class RunPlan:
    """What :func:`plan_run` decided: the run directory, its config and the units still to compute.

    Attributes
    ----------
    out : Path
        The run directory.
    results_path : Path
        ``out / results.jsonl``.
    config : dict
        What ``config.json`` holds.
    problems : list of Problem
        The selected problems (the first ``limit``).
    seeds : list of int
        The run seeds.
    todo : list of (int, Problem, int)
        ``(problem_index, problem, seed)`` of every selected unit not yet in ``results.jsonl``, in problem order.
    finished : set of (str, int)
        ``(problem_id, seed)`` of every unit already in ``results.jsonl`` (selected or not).
    correct, counted : int
        Correct and total finished units among the selected ones (the progress bar's running accuracy).
    lock : RunLock or None
        This run's hold on the directory (:func:`lock_run_dir`), released by :func:`finish_run`, or by
        :class:`ResultWriter` when the run fails.
    """

    out: Path
    results_path: Path
    config: dict[str, Any]
    problems: list[Problem]
    seeds: list[int]
    todo: list[tuple[int, Problem, int]]
    finished: set[tuple[str, int]]
    correct: int = 0
    counted: int = 0
    lock: RunLock | None = None

    def release(self) -> None:
        """Release this run's hold on the directory (nothing when it has none, or when it is nested)."""
        if self.lock is not None:
            self.lock.release()


def problems_sha256(problems: Sequence[Problem]) -> str:
    """A SHA-256 of the problems' ids, prompts and answers, in order (recorded in ``config.json``)."""
    rows = [[p.id, p.prompt, p.answer] for p in problems]
    return hashlib.sha256(json.dumps(rows, ensure_ascii=False).encode("utf-8")).hexdigest()


def _run_config(
    task: Task, method: Method, model_name: str | None, max_new_tokens: int, config: dict[str, Any] | None
) -> dict[str, Any]:
    """The :data:`RESUME_KEYS` of a run (without ``model`` when ``model_name`` is None)."""
    run_config = {
        "task": task.name,
        "model": model_name,
        "method": method.config(),
        "max_new_tokens": int(max_new_tokens),
        "chat": getattr(task, "chat", None),
        "problems_sha256": problems_sha256(task.problems(None)),
        **{k: v for k, v in (config or {}).items() if k in RESUME_KEYS},
    }
    if model_name is None:
        del run_config["model"]
    return run_config


def check_resume(
    out_dir: str | Path, task: Task, method: Method, *, max_new_tokens: int, config: dict[str, Any] | None = None
) -> None:
    """Compare the settings known before the model loads (every :data:`RESUME_KEYS` but ``model``) with the
    ``config.json`` of ``out_dir``, and read ``results.jsonl``, so ``--resume`` with another dtype, chat setting
    or task file, or over a damaged results line, fails at once; :func:`plan_run` checks again, the model's name
    included.

    Raises
    ------
    EGPSError
        Naming the settings that differ, a damaged ``config.json``, or the file and line of a bad result.
    """
    _check_resume_config(Path(out_dir) / CONFIG_FILE, _run_config(task, method, None, max_new_tokens, config))
    read_results(Path(out_dir) / RESULTS_FILE)  # a damaged line fails now too


def check_out_dir(out_dir: str | Path, resume: bool) -> Path:
    """``out_dir`` as a Path after the checks that need no model: not a file, writable, no results unless
    ``resume``.

    Raises
    ------
    EGPSError
        When ``out_dir`` is a file or cannot be written, or holds results and ``resume`` is false.
    """
    from egps_ppl.errors import check_writable

    out = check_writable(out_dir, "--out", directory=True)
    results_path = out / RESULTS_FILE
    if not resume and results_path.exists() and results_path.stat().st_size > 0:
        raise EGPSError(f"{results_path} already has results; pass --resume to continue that run, or another --out")
    return out


def plan_run(
    task: Task,
    method: Method,
    model_name: str,
    seeds: Sequence[int],
    limit: int | None,
    out_dir: str | Path,
    resume: bool,
    *,
    max_new_tokens: int,
    config: dict[str, Any] | None = None,
) -> RunPlan:
    """Check and create the run directory, write ``config.json`` and list the units left to compute.

    With ``resume`` the settings are compared with the existing ``config.json`` and a truncated last line of
    ``results.jsonl`` is removed (see :func:`read_results`).

    The directory is locked first (:func:`lock_run_dir`; nested when the caller holds it already, as ``egps
    eval`` does from before the model loads), so a second run on it fails at once instead of computing every
    unit twice; the plan keeps the lock until :func:`finish_run`.
    """
    seeds = check_seeds(seeds)
    out = check_out_dir(out_dir, resume)
    lock = lock_run_dir(out)
    try:
        # Under the lock: a run that finished while we waited has written results since the first check.
        check_out_dir(out, resume)
        plan = _plan_locked(task, method, model_name, seeds, limit, out, resume, max_new_tokens, config)
    except BaseException:
        lock.release()
        raise
    plan.lock = lock
    return plan


def _plan_locked(
    task: Task,
    method: Method,
    model_name: str,
    seeds: list[int],
    limit: int | None,
    out: Path,
    resume: bool,
    max_new_tokens: int,
    config: dict[str, Any] | None,
) -> RunPlan:
    results_path = out / RESULTS_FILE
    problems = task.problems(limit)
    run_config = _run_config(task, method, model_name, max_new_tokens, config)
    run_config.update(seeds=seeds, limit=limit, problem_ids=[p.id for p in problems])
    run_config.update(config or {})
    if resume:
        _check_resume_config(out / CONFIG_FILE, run_config)
    done = read_results(results_path, repair=True) if resume else []
    _write_json(out / CONFIG_FILE, run_config)

    finished = {(r["problem_id"], int(r["seed"])) for r in done}
    todo = [(i, p, s) for i, p in enumerate(problems) for s in seeds if (p.id, s) not in finished]
    selected = {(p.id, s) for p in problems for s in seeds}
    correct = sum(1 for r in done if (r["problem_id"], int(r["seed"])) in selected and r["correct"])
    return RunPlan(out, results_path, run_config, problems, seeds, todo, finished, correct, len(finished & selected))


class ResultWriter:
    """Appends result records to a run's ``results.jsonl`` (one fsync'ed line each) and drives the progress bar.

    A record whose (problem, seed) is already in the file is not written again (:meth:`write` returns False), so
    a unit delivered twice (a retried Ray unit) cannot make a duplicate line. Use as a context manager.
    """

    def __init__(self, plan: RunPlan, desc: str, progress: bool) -> None:
        self.plan = plan
        self.written: set[tuple[str, int]] = set(plan.finished)
        try:
            self._fh = plan.results_path.open("a", encoding="utf-8")
        except OSError as exc:
            plan.release()
            raise EGPSError(f"cannot write {plan.results_path}: {exc.strerror or exc}") from None
        self._bar = _progress_bar(len(plan.todo), desc, progress)

    def write(self, record: dict[str, Any]) -> bool:
        """Append ``record`` unless its unit is already in the file; returns whether it was written."""
        key = (record["problem_id"], int(record["seed"]))
        if key in self.written:
            return False
        try:
            _append(self._fh, record)
        except OSError as exc:  # a disk that filled up: what was written stays, a torn last line is repaired
            raise EGPSError(
                f"cannot append to {self.plan.results_path}: {exc.strerror or exc}; the finished units are kept, "
                f"rerun with --resume once the problem is fixed"
            ) from None
        self.written.add(key)
        self.plan.counted += 1
        self.plan.correct += bool(record["correct"])
        if self._bar is not None:
            self._bar.update(1)
            self._bar.set_postfix(acc=f"{self.plan.correct / self.plan.counted:.3f}", refresh=False)
        return True

    def close(self) -> None:
        """Close the file and the progress bar."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        self._fh.close()

    def __enter__(self) -> ResultWriter:
        return self

    def __exit__(self, exc_type: object, *exc: object) -> None:
        self.close()
        if exc_type is not None:  # the run failed: no finish_run will release the directory
            self.plan.release()


def finish_run(plan: RunPlan, task: Task, method: Method, started: float, **extra: Any) -> dict[str, Any]:
    """Summarise the selected units from ``results.jsonl``; write ``summary.json`` and the plot.

    ``started`` is the ``time.perf_counter()`` at the start of the computation; ``extra`` goes into the summary.
    Releases the plan's lock on the directory, also when it fails.
    """
    try:
        return _finish_locked(plan, task, method, started, **extra)
    finally:
        plan.release()


def _finish_locked(plan: RunPlan, task: Task, method: Method, started: float, **extra: Any) -> dict[str, Any]:
    records = read_results(plan.results_path)
    summary = summarize_results(records, problems=[p.id for p in plan.problems], seeds=plan.seeds)
    summary.update(
        task=task.name,
        method=method.name,
        model=plan.config["model"],
        method_config=plan.config["method"],
        max_new_tokens=plan.config["max_new_tokens"],
        run_wall_s=round(time.perf_counter() - started, 3),
        computed_this_run=len(plan.todo),
        **extra,
    )
    _write_json(plan.out / SUMMARY_FILE, summary)
    plot_accuracy_vs_compute([summary], plan.out / PLOT_FILE)
    return summary


def check_seeds(seeds: Sequence[int]) -> list[int]:
    """``seeds`` as a list, checked: at least one, integers, distinct.

    Raises
    ------
    EGPSError
        Otherwise, saying what to pass.
    """
    seeds = list(seeds)
    if not seeds:
        raise EGPSError("give at least one seed (--seeds 0,1,...)")
    if any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise EGPSError(f"seeds must be integers, got {seeds!r}")
    if len(set(seeds)) != len(seeds):
        raise EGPSError(f"seeds must be distinct, got {seeds!r}")
    return seeds


def _progress_bar(total: int, desc: str, enabled: bool) -> Any:
    if not enabled:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="run")


# ------------------------------------------------------------------------------------------------ summary


def _mean(values: Iterable[float]) -> float | None:
    values = list(values)
    return sum(values) / len(values) if values else None


def summarize_results(
    records: Sequence[dict[str, Any]],
    problems: Sequence[str] | None = None,
    seeds: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Accuracy and cost of a set of result records.

    Accuracy is computed per seed (the mean of ``correct`` over that seed's problems); ``accuracy`` is the mean of
    the per-seed accuracies and ``accuracy_se`` their standard error (sample standard deviation with ``ddof=1``
    over ``sqrt(number of seeds)``; ``None`` with a single seed). ``accuracy_per_problem`` is the mean over seeds
    for each problem. Costs are means per (problem, seed) unit, i.e. per problem attempt.

    ``pass_at_k`` maps ``k`` (as a string) to the mean over problems of the unbiased pass@k estimator
    (:func:`~egps_ppl.evals.graders.pass_at_k`), treating the ``n`` seeds of a problem as ``n`` samples of which
    ``c`` are correct; ``k`` runs over 1, 2, 4, ... and the number of seeds. A problem enters pass@k only when it
    has at least ``k`` results (an unfinished run); with every result in, pass@1 equals ``accuracy``.

    ``empty_completions`` counts the units whose completion is empty (or only whitespace): the model ended its
    reply at once, and the grader marks the unit wrong. When that is most of them, ``warnings`` (a list of
    sentences, empty otherwise) says so; ``egps eval`` prints it to stderr.

    Parameters
    ----------
    records : sequence of dict
        Result lines (duplicates of a (problem, seed) keep the first).
    problems, seeds : sequences or None
        Restrict to these problem ids and seeds, and report how many of their units are missing.

    Returns
    -------
    dict
    """
    problem_set = None if problems is None else {str(p) for p in problems}
    seed_set = None if seeds is None else {int(s) for s in seeds}
    keep: dict[tuple[str, int], dict[str, Any]] = {}
    for r in records:
        key = (str(r["problem_id"]), int(r["seed"]))
        if (problem_set is None or key[0] in problem_set) and (seed_set is None or key[1] in seed_set):
            keep.setdefault(key, r)
    units = list(keep.values())
    by_seed: dict[int, list[float]] = defaultdict(list)
    by_problem: dict[str, list[float]] = defaultdict(list)
    for (pid, seed), r in keep.items():
        by_seed[seed].append(float(bool(r["correct"])))
        by_problem[pid].append(float(bool(r["correct"])))
    seed_list = sorted(by_seed) if seeds is None else [int(s) for s in seeds]
    problem_list = sorted(by_problem) if problems is None else [str(p) for p in problems]
    per_seed = {str(s): _mean(by_seed[s]) for s in seed_list if s in by_seed}
    per_problem = {pid: _mean(by_problem[pid]) for pid in problem_list if pid in by_problem}
    seed_acc = list(per_seed.values())
    accuracy = _mean(seed_acc)
    se = None
    if len(seed_acc) >= 2:
        var = sum((a - accuracy) ** 2 for a in seed_acc) / (len(seed_acc) - 1)
        se = math.sqrt(var / len(seed_acc))
    expected = len(problem_list) * len(seed_list)
    pass_k = _pass_at_ks(by_problem, len(seed_list))
    summary: dict[str, Any] = {
        "n_problems": len(per_problem),
        "seeds": [int(s) for s in seed_list],
        "n_results": len(units),
        "expected_results": expected,
        "complete": len(units) == expected,
        "accuracy": accuracy,
        "accuracy_se": se,
        "accuracy_per_seed": per_seed,
        "accuracy_per_problem": per_problem,
        "pass_at_k": pass_k,
        "total_wall_s": round(sum(float(r["wall_s"]) for r in units), 3),
        "empty_completions": sum(1 for r in units if not str(r["completion"]).strip()),
    }
    summary["warnings"] = _warnings(summary)
    for name in COST_FIELDS:
        summary[f"mean_{name}"] = _mean(float(r[name]) for r in units)
    return summary


def _warnings(summary: dict[str, Any]) -> list[str]:
    """Sentences about a run that is probably not measuring what was meant (most completions empty)."""
    empty, total = summary["empty_completions"], summary["n_results"]
    if total and 2 * empty > total:
        return [
            f"{empty} of {total} completions are empty (the model ended its reply at once) and were graded wrong; "
            "an instruct model given a raw prompt does this: pass --chat, or check the prompt and --max-new-tokens"
        ]
    return []


def _pass_at_ks(by_problem: dict[str, list[float]], n_seeds: int) -> dict[str, float]:
    """Mean unbiased pass@k over problems for k = 1, 2, 4, ... and ``n_seeds`` (problems with >= k samples)."""
    ks = [1 << i for i in range(max(n_seeds, 1).bit_length()) if 1 << i <= n_seeds]
    if n_seeds >= 1 and n_seeds not in ks:
        ks.append(n_seeds)
    out: dict[str, float] = {}
    for k in ks:
        values = [
            pass_at_k(len(outcomes), int(sum(outcomes)), k) for outcomes in by_problem.values() if len(outcomes) >= k
        ]
        if values:
            out[str(k)] = sum(values) / len(values)
    return out


def plot_accuracy_vs_compute(summaries: Sequence[dict[str, Any]], path: str | Path) -> Path:
    """Accuracy (± SE over seeds) against mean decode tokens per problem, one point per summary; a PNG."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 4), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    plotted = [s for s in summaries if s.get("accuracy") is not None and s.get("mean_decode_tokens") is not None]
    for s in plotted:
        x, y = s["mean_decode_tokens"], s["accuracy"]
        ax.errorbar([x], [y], yerr=[s["accuracy_se"] or 0.0], fmt="o", capsize=4, label=run_label(s))
    ax.set_xlabel("decode tokens per problem (mean)")
    ax.set_ylabel("accuracy (mean ± SE over seeds)")
    ax.set_ylim(-0.02, 1.02)
    if any(s["mean_decode_tokens"] > 0 for s in plotted):
        ax.set_xscale("log")
    title = {s.get("task") for s in plotted} or {"no results yet"}
    ax.set_title(f"accuracy vs compute: {', '.join(sorted(str(t) for t in title))}", fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    with _atomic_path(path) as tmp:
        fig.savefig(tmp, format=path.suffix.lstrip(".") or "png")
    return path


def run_label(summary: dict[str, Any]) -> str:
    """A run's short name for tables and legends: the method, then α, steps and n where they apply (``mh α=4 10
    steps``)."""
    config = summary.get("method_config") or {}
    label = str(summary.get("method", "?"))
    if "alpha" in config and label != "plain":
        label += f" α={config['alpha']:g}"
    if config.get("steps"):
        label += f" {config['steps']} steps"
    if config.get("n"):
        label += f" n={config['n']}"
    return label
