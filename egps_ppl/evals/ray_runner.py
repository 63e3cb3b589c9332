"""``egps eval --ray``: the evaluation loop of :mod:`egps_ppl.evals.runner`, sharded over Ray actors.

How it works
------------
The driver (this process) plans the run exactly like :func:`~egps_ppl.evals.runner.evaluate`, with the same run
store (:mod:`egps_ppl.evals.store`: same checks, same ``config.json``, same resume logic), then starts
``num_workers`` actors. Each actor loads **one** model, once, and computes a batch of up to ``batch``
(problem, seed) units per call, sharing forward passes (:func:`~egps_ppl.evals.runner.evaluate_batched`, the
batched loop the local runner uses too; one unit per call for methods that do not batch). Each actor holds one
batch at a time; as soon as it finishes, the driver appends its records to the same ``results.jsonl`` (one
fsync'ed line per record, the same records) and hands that actor the next batch. The summary, ``summary.json``
and the plot are written by the same code as the local runner's.

Because the generator of a unit is seeded by :func:`~egps_ppl.evals.runner.unit_seed` ``(seed, problem.id)``,
the records are the local runner's records (same completions); only their order in the file and the timings
differ.

Guarantees
----------
* **No unit lost, none duplicated.** A unit is written only when its record reaches the driver, and the writer
  skips a (problem, seed) already in the file. When an actor dies (``RayActorError``: the process crashed, was
  killed, ran out of memory, or its node went away) the unit it held goes back to the front of the queue and a
  fresh actor takes the dead one's place.
* **Bounded retries.** A unit whose actor died ``max_retries + 1`` times is given up: it is *not* written (an
  error line would count as a wrong answer, and ``--resume`` would then skip it). The other units finish, the
  summary is written (``complete: false``) and the run ends with an :class:`~egps_ppl.errors.EGPSError` naming the
  lost units; ``--resume`` retries exactly those. If actors keep dying with no unit finishing in between, the run
  stops early with the same kind of error.
* **Errors in the method or grader are not retried**: an exception raised by ``evaluate_unit`` is a bug or bad
  input, not a lost worker, so it stops the run (as it would locally); what finished is kept for ``--resume``.
* **Resume** works as locally: finished units are skipped, a truncated last line is removed, and the settings must
  match ``config.json``.
* **One writer.** The driver locks the run directory (:func:`~egps_ppl.evals.store.lock_run_dir`) for the whole
  run; a second ``egps eval`` on it, with or without ``--ray``, is refused (or waits, with ``--wait``).

Ray is optional: importing this module does not import it; :func:`evaluate_ray` imports it and says
``pip install ray`` when it is missing.
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from egps_ppl.errors import EGPSError
from egps_ppl.evals.methods import Method
from egps_ppl.evals.runner import DEFAULT_BATCH, batchable, evaluate_batched, evaluate_unit, model_name
from egps_ppl.evals.store import (
    RESULTS_FILE,
    ResultWriter,
    check_out_dir,
    check_seeds,
    finish_run,
    lock_run_dir,
    plan_run,
    read_results,
)
from egps_ppl.evals.tasks import Problem, Task
from egps_ppl.models.base import LanguageModel

__all__ = ["RAY_INSTALL", "UnitWorker", "evaluate_ray", "import_ray"]

RAY_INSTALL = "pip install ray (or pip install 'egps_ppl[ray]')"
ModelSpec = str | Callable[[], LanguageModel]
"""A model for the actors: a :func:`~egps_ppl.models.registry.load_model` spec, or a picklable function that
builds the model (called once in each actor)."""


def import_ray() -> Any:
    """The ``ray`` module, or an :class:`EGPSError` saying how to install it."""
    try:
        import ray
    except ImportError:
        raise EGPSError(f"--ray needs the package ray, which is not installed: {RAY_INSTALL}") from None
    return ray


class UnitWorker:
    """The body of one Ray actor: one model, loaded once, computing one (problem, seed) unit per call.

    A model that fails to load does not kill the actor (Ray would then report a bare ``ActorDiedError``): the
    error is kept and raised by every call, so the driver can show it as it is.

    Parameters
    ----------
    task, method
        What to evaluate (pickled to the actor).
    model : str or callable
        A ``load_model`` spec, or a function returning the model.
    device, dtype : str
        For ``load_model`` (a GPU actor sees only its own GPU, so ``"cuda"`` is the one Ray gave it).
    threads : int
        torch intra-op threads (the actor's CPU share: more threads than CPUs only slow every actor down).
    max_new_tokens : int
        Completion length limit.
    """

    def __init__(
        self,
        task: Task,
        method: Method,
        model: ModelSpec,
        device: str,
        dtype: str,
        threads: int,
        max_new_tokens: int,
    ) -> None:
        import torch

        torch.set_num_threads(max(1, int(threads)))
        self.task, self.method, self.max_new_tokens = task, method, max_new_tokens
        self.lm: LanguageModel | None = None
        self.error: Exception | None = None
        try:
            if callable(model):
                self.lm = model()
            else:
                from egps_ppl.models.registry import load_model

                self.lm = load_model(model, device=device, dtype=dtype)
        except Exception as exc:
            self.error = exc

    def _model(self) -> LanguageModel:
        if self.lm is None:
            raise self.error if self.error is not None else EGPSError("the worker has no model")
        return self.lm

    def info(self) -> dict[str, Any]:
        """The model's name and this process's id (raises the model's load error, if any)."""
        return {"model": model_name(self._model()), "pid": os.getpid()}

    def run_batch(self, units: list[tuple[int, Problem, int]], batch: int) -> list[dict[str, Any]]:
        """The records of several units, sharing forward passes (:func:`~egps_ppl.evals.runner.evaluate_batched`)
        when the method batches, else one after another."""
        if batchable(self.method):
            return list(
                evaluate_batched(
                    self.task, self.method, self._model(), units, batch=batch, max_new_tokens=self.max_new_tokens
                )
            )
        return [self.run(*unit) for unit in units]

    def run(self, index: int, problem: Problem, seed: int) -> dict[str, Any]:
        """The record of one unit (:func:`~egps_ppl.evals.runner.evaluate_unit`)."""
        return evaluate_unit(
            self.task,
            self.method,
            self._model(),
            problem,
            seed,
            max_new_tokens=self.max_new_tokens,
            problem_index=index,
        )


def _lost_worker_errors(ray: Any) -> tuple[type[BaseException], ...]:
    """The exceptions that mean "the worker is gone", not "the unit failed" (names vary across Ray versions)."""
    names = ("RayActorError", "WorkerCrashedError", "ObjectLostError", "NodeDiedError", "LocalRayletDiedError")
    return tuple(getattr(ray.exceptions, n) for n in names if hasattr(ray.exceptions, n))


def _unit_failure(ray: Any, exc: BaseException, what: str) -> BaseException:
    """An exception raised inside an actor, as the driver re-raises it: bad input stays a one-line EGPSError."""
    cause = getattr(exc, "cause", None)
    if isinstance(exc, ray.exceptions.RayTaskError) and isinstance(cause, EGPSError):
        return EGPSError(f"{what}: {cause}")
    return exc


def _check_count(name: str, value: float | None, minimum: float) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int | float) or value < minimum:
        raise EGPSError(f"{name} must be a number >= {minimum:g}, got {value!r}")


def evaluate_ray(
    task: Task,
    method: Method,
    model: ModelSpec,
    seeds: Sequence[int],
    limit: int | None,
    out_dir: str | Path,
    resume: bool = False,
    progress: bool = True,
    *,
    max_new_tokens: int = 256,
    config: dict[str, Any] | None = None,
    address: str | None = None,
    num_workers: int | None = None,
    cpus_per_worker: float = 1.0,
    gpus_per_worker: float = 0.0,
    device: str = "cpu",
    dtype: str = "float32",
    threads: int | None = None,
    max_retries: int = 2,
    batch: int = DEFAULT_BATCH,
) -> dict[str, Any]:
    """:func:`~egps_ppl.evals.runner.evaluate` with the units computed by Ray actors; same files, same records.

    Parameters
    ----------
    task, method
        What to evaluate; both are pickled to every actor.
    model : str or callable
        A :func:`~egps_ppl.models.registry.load_model` spec (with ``device`` and ``dtype``), or a picklable
        function returning the model. Each actor builds its own copy once; the driver never loads it.
    seeds, limit, out_dir, resume, progress, max_new_tokens, config
        As in :func:`~egps_ppl.evals.runner.evaluate`.
    address : str or None
        ``None`` or ``"local"``: start a local Ray instance for this run (``num_cpus`` = ``num_workers ×
        cpus_per_worker``, else every core) and stop it at the end. Anything else (``"auto"``, ``"HOST:6379"``,
        ``"ray://HOST:10001"``) joins that cluster. When Ray is already initialised in this process (a notebook,
        the tests) that instance is used as it is.
    num_workers : int or None
        Actors to start (never more than the units to compute); default: as many as the cluster's CPUs (and GPUs,
        with ``gpus_per_worker``) allow.
    cpus_per_worker, gpus_per_worker : float
        Ray resources of one actor (``gpus_per_worker=1``: one model per GPU).
    device, dtype : str
        Passed to ``load_model`` in each actor (use ``device="cuda"`` with ``gpus_per_worker``).
    threads : int or None
        torch threads per actor (default: ``cpus_per_worker``, at least 1).
    max_retries : int
        How many times a unit whose actor died is retried on a fresh actor before it is given up.
    batch : int
        Units an actor computes per call, sharing forward passes when the method batches
        (:func:`~egps_ppl.evals.runner.batchable`; otherwise one unit per call). An actor's death retries its
        whole batch.

    Returns
    -------
    dict
        The summary (also in ``summary.json``), with ``ray``: workers started, units retried, actors lost.

    Raises
    ------
    EGPSError
        For bad settings, Ray missing, a model that does not load, or units given up after ``max_retries``
        (after every other unit was written and the summary saved: ``--resume`` retries them).
    """
    seeds = check_seeds(seeds)
    _check_count("--ray-workers", num_workers, 1)
    if num_workers is not None and not isinstance(num_workers, int):
        raise EGPSError(f"--ray-workers must be an integer, got {num_workers!r}")
    _check_count("--ray-cpus-per-worker", cpus_per_worker, 0)
    _check_count("--ray-gpus-per-worker", gpus_per_worker, 0)
    if isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0:
        raise EGPSError(f"max_retries must be an integer >= 0, got {max_retries!r}")
    check_out_dir(out_dir, resume)  # fail on a bad --out before a cluster starts
    ray = import_ray()

    started_here = False
    if not ray.is_initialized():
        if address in (None, "", "local"):
            num_cpus = math.ceil(num_workers * cpus_per_worker) if num_workers else os.cpu_count() or 1
            # The dashboard is an extra process and a port: not needed to run an eval.
            ray.init(num_cpus=max(1, num_cpus), include_dashboard=False)
        else:
            try:
                ray.init(address=address)
            except (ConnectionError, RuntimeError, ValueError) as exc:
                raise EGPSError(
                    f"could not join the Ray cluster at {address!r}: {str(exc).strip()} (a cluster with token "
                    f"authentication also needs RAY_AUTH_MODE=token here, and its token in RAY_AUTH_TOKEN or "
                    f"~/.ray/auth_token)"
                ) from None
        started_here = True
    try:
        # The driver is the one writer of out_dir from before the actors start to the summary (nested in the
        # hold of `egps eval`, which takes it before anything else).
        with lock_run_dir(out_dir):
            return _drive(
                ray,
                task,
                method,
                model,
                seeds,
                limit,
                out_dir,
                resume,
                progress,
                max_new_tokens=max_new_tokens,
                config=config,
                num_workers=num_workers,
                cpus_per_worker=cpus_per_worker,
                gpus_per_worker=gpus_per_worker,
                device=device,
                dtype=dtype,
                threads=threads,
                max_retries=max_retries,
                batch=batch,
            )
    finally:
        if started_here:
            ray.shutdown()


def _default_workers(ray: Any, cpus_per_worker: float, gpus_per_worker: float) -> int:
    resources = ray.cluster_resources()
    cpus, gpus = float(resources.get("CPU", 0)), float(resources.get("GPU", 0))
    counts = []
    if cpus_per_worker > 0:
        counts.append(int(cpus // cpus_per_worker))
    if gpus_per_worker > 0:
        counts.append(int(gpus // gpus_per_worker))
    n = min(counts) if counts else max(1, int(cpus))
    if n < 1:
        raise EGPSError(
            f"the Ray cluster has {cpus:g} CPUs and {gpus:g} GPUs: not enough for one worker needing "
            f"{cpus_per_worker:g} CPUs and {gpus_per_worker:g} GPUs"
        )
    return n


def _pending_units(task: Task, seeds: list[int], limit: int | None, out_dir: str | Path, resume: bool) -> int:
    """How many units :func:`~egps_ppl.evals.store.plan_run` will find left (the file is only read here)."""
    problems = task.problems(limit)
    records = read_results(Path(out_dir) / RESULTS_FILE) if resume else []
    finished = {(r["problem_id"], int(r["seed"])) for r in records}
    return sum((p.id, s) not in finished for p in problems for s in seeds)


def _drive(
    ray: Any,
    task: Task,
    method: Method,
    model: ModelSpec,
    seeds: list[int],
    limit: int | None,
    out_dir: str | Path,
    resume: bool,
    progress: bool,
    *,
    max_new_tokens: int,
    config: dict[str, Any] | None,
    num_workers: int | None,
    cpus_per_worker: float,
    gpus_per_worker: float,
    device: str,
    dtype: str,
    threads: int | None,
    max_retries: int,
    batch: int,
) -> dict[str, Any]:
    lost_errors = _lost_worker_errors(ray)
    # No more actors than units left (at least one: the model's name is needed for the resume check).
    pending = _pending_units(task, seeds, limit, out_dir, resume)
    n_workers = min(num_workers or _default_workers(ray, cpus_per_worker, gpus_per_worker), max(1, pending))
    # max_restarts=0: a dead actor stays dead and we start a fresh one ourselves, so a unit is never silently
    # re-run behind our back (Ray's own task retries would make retries unbounded and invisible).
    actor_class = ray.remote(num_cpus=cpus_per_worker, num_gpus=gpus_per_worker, max_restarts=0, max_task_retries=0)(
        UnitWorker
    )
    worker_args = (task, method, model, device, dtype, threads or max(1, int(cpus_per_worker)), max_new_tokens)
    actors: list[Any] = []

    def start_actor() -> Any:
        actor = actor_class.remote(*worker_args)
        actors.append(actor)
        return actor

    def kill(actor: Any) -> None:
        with contextlib.suppress(Exception):  # already gone
            ray.kill(actor, no_restart=True)

    try:
        # All actors load their model at once; the model's name (needed for config.json and the resume check)
        # comes from the first that is ready, so the driver never loads the model itself.
        infos = {start_actor().info.remote(): i for i in range(n_workers)}
        live: list[Any] = []
        model_name = None
        load_errors: list[str] = []
        for ref, i in infos.items():
            try:
                info = ray.get(ref)
            except lost_errors as exc:
                load_errors.append(f"{type(exc).__name__}")
                kill(actors[i])
                continue
            except ray.exceptions.RayTaskError as exc:
                raise _unit_failure(ray, exc, "a Ray worker could not load the model") from None
            live.append(actors[i])
            model_name = model_name or info["model"]
        if model_name is None:
            raise EGPSError(f"no Ray worker started ({', '.join(load_errors)}); see the Ray logs")

        plan = plan_run(
            task, method, model_name, seeds, limit, out_dir, resume, max_new_tokens=max_new_tokens, config=config
        )
        for actor in live[len(plan.todo) :]:  # fewer units than workers
            kill(actor)
        size = batch if batchable(method) else 1
        chunks = [tuple(plan.todo[i : i + size]) for i in range(0, len(plan.todo), size)]
        for actor in live[len(chunks) : len(plan.todo)]:  # fewer batches than workers
            kill(actor)
        idle = deque(live[: len(chunks)])
        queue = deque(chunks)
        attempts: dict[tuple[str, int], int] = {}
        given_up: list[tuple[tuple[str, int], str]] = []
        inflight: dict[Any, tuple[Any, tuple[tuple[int, Problem, int], ...]]] = {}
        died, retried, deaths_in_a_row = 0, 0, 0
        # Actors dying one after another with no unit finishing (a model too big for the worker, a broken node):
        # stop instead of burning through every unit's retries. One bad unit on every worker stays under it.
        death_limit = (max_retries + 1) * max(1, len(idle)) + 1
        started = time.perf_counter()
        with ResultWriter(plan, method.name, progress) as writer:
            while queue or inflight:
                while queue and idle:
                    actor = idle.popleft()
                    chunk = queue.popleft()
                    inflight[actor.run_batch.remote(list(chunk), size)] = (actor, chunk)
                if not inflight:  # cannot happen (a dead actor is replaced while work is left); never hang
                    raise EGPSError(f"{len(queue)} unit(s) left but no Ray worker to run them; rerun with --resume")
                ready, _ = ray.wait(list(inflight), num_returns=1)
                ref = ready[0]
                actor, chunk = inflight.pop(ref)
                keys = [(problem.id, seed) for _, problem, seed in chunk]
                key = keys[0]
                try:
                    records = ray.get(ref)
                except lost_errors as exc:
                    died += 1
                    deaths_in_a_row += 1
                    kill(actor)
                    attempts[key] = attempts.get(key, 0) + 1
                    if attempts[key] > max_retries:
                        given_up.extend((k, f"{type(exc).__name__}") for k in keys)
                    else:
                        retried += len(chunk)
                        queue.appendleft(chunk)
                    if deaths_in_a_row >= death_limit:
                        raise EGPSError(
                            f"{deaths_in_a_row} Ray workers died in a row with no unit finishing (last: "
                            f"{type(exc).__name__}); the finished units are in {plan.results_path}; fix the workers "
                            f"(memory? the model?) and rerun with --resume"
                        ) from None
                    if queue:
                        idle.append(start_actor())
                    continue
                except ray.exceptions.RayTaskError as exc:
                    what = ", ".join(f"({pid}, seed {s})" for pid, s in keys[:3]) + (" ..." if len(keys) > 3 else "")
                    raise _unit_failure(ray, exc, f"unit {what}") from None
                deaths_in_a_row = 0
                for record in records:
                    writer.write(record)
                idle.append(actor)
        summary = finish_run(
            plan,
            task,
            method,
            started,
            ray={"workers": len(live[: len(plan.todo)]), "actors_lost": died, "units_retried": retried},
        )
    finally:
        for actor in actors:
            kill(actor)
    if given_up:
        units = ", ".join(f"({pid}, seed {s})" for (pid, s), _ in given_up[:10])
        more = f" and {len(given_up) - 10} more" if len(given_up) > 10 else ""
        raise EGPSError(
            f"{len(given_up)} unit(s) lost their Ray worker on each of {max_retries + 1} attempt(s) and were not "
            f"recorded: {units}{more}; every other unit is in {plan.results_path}; rerun with --resume to retry them"
        )
    return summary
