"""Small helpers shared by the benchmarks: threads, timing, environment metadata and result files.

Every benchmark writes ``<out>/<name>.json`` (and optionally ``<out>/<name>.png``) through :func:`write_results`,
with :func:`environment` recorded in the payload, so a number in the docs can always be traced to its run.
"""

from __future__ import annotations

import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
"""Default output folder: ``benchmarks/results`` next to this file."""

REPO_ROOT = Path(__file__).resolve().parent.parent


def copy_plots(docs: str | Path | None, *paths: Path | None) -> None:
    """Copy each written plot (``None``: none was written) into the ``--docs`` folder, if one was given."""
    if not docs:
        return
    Path(docs).mkdir(parents=True, exist_ok=True)
    for path in paths:
        if path is not None:
            shutil.copy(path, Path(docs) / path.name)


def grouped_bars(ax: Any, groups: Sequence[str], series: Mapping[str, Sequence[float]]) -> None:
    """One bar per series side by side within each group (series in the legend, groups on the x axis)."""
    width = 0.76 / len(series)
    for i, (label, values) in enumerate(series.items()):
        ax.bar([j + width * i for j in range(len(groups))], values, width=width, label=label)
    ax.set_xticks([j + width * (len(series) - 1) / 2 for j in range(len(groups))], list(groups))
    ax.legend()


def run_cli(main: Callable[[], Any], name: str) -> None:
    """Run a benchmark's ``main`` from the command line: an :class:`~egps_ppl.errors.EGPSError` (bad input, a run
    directory written with other settings) ends it with one line naming the benchmark, not a traceback."""
    from egps_ppl.errors import EGPSError

    try:
        main()
    except EGPSError as exc:
        raise SystemExit(f"{name}: {exc}") from None


def set_threads(threads: int | None) -> int:
    """Set ``torch.set_num_threads`` (``None``: leave it) and return the number in effect."""
    if threads is not None:
        if threads < 1:
            raise ValueError(f"threads must be >= 1, got {threads}")
        torch.set_num_threads(int(threads))
    return torch.get_num_threads()


class Timer:
    """Wall-clock timer (``time.perf_counter``) usable as a context manager.

    Examples
    --------
    >>> with Timer() as t:
    ...     pass
    >>> t.seconds >= 0.0
    True
    """

    def __init__(self) -> None:
        self.start = 0.0
        self.seconds = 0.0

    def __enter__(self) -> Timer:
        self.start = time.perf_counter()
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.seconds = time.perf_counter() - self.start


def git_commit(root: Path = REPO_ROOT) -> dict[str, Any]:
    """``{"commit": sha or None, "dirty": bool or None}`` of the repository at ``root`` (read-only git calls)."""

    def run(*args: str) -> str | None:
        try:
            done = subprocess.run(
                ["git", "--no-optional-locks", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    sha = run("rev-parse", "HEAD")
    status = run("status", "--porcelain", "--untracked-files=no")
    return {"commit": sha, "dirty": None if status is None else bool(status)}


def cpu_count() -> dict[str, int | None]:
    """Logical CPUs of the machine and those this process may run on."""
    try:
        usable: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        usable = None
    return {"logical": os.cpu_count(), "usable": usable}


def environment() -> dict[str, Any]:
    """Versions, threads, CPUs, load and git commit: what a timing depends on."""
    info: dict[str, Any] = {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "torch_interop_threads": torch.get_num_interop_threads(),
        "cpus": cpu_count(),
        "cuda": torch.cuda.is_available(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        **git_commit(),
    }
    try:
        import transformers

        info["transformers"] = transformers.__version__
    except ImportError:
        info["transformers"] = None
    try:
        info["load_average"] = [round(x, 2) for x in os.getloadavg()]
    except OSError:
        info["load_average"] = None
    return info


def median(values: Sequence[float]) -> float:
    """Median of a non-empty sequence."""
    ordered = sorted(values)
    n = len(ordered)
    if n == 0:
        raise ValueError("median of an empty sequence")
    mid = n // 2
    return ordered[mid] if n % 2 else 0.5 * (ordered[mid - 1] + ordered[mid])


def jsonable(value: Any) -> Any:
    """``value`` with tensors, NumPy values, paths and tuples turned into JSON types (NaN/inf become ``None``)."""
    if isinstance(value, torch.Tensor):
        return jsonable(value.tolist())
    if hasattr(value, "tolist") and not isinstance(value, (str, bytes)):  # NumPy arrays and scalars
        return jsonable(value.tolist())
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


def write_results(
    name: str, payload: Mapping[str, Any], out_dir: str | Path | None = None, figure: Any = None
) -> tuple[Path, Path | None]:
    """Write ``<out_dir>/<name>.json`` (and ``<name>.png`` from a matplotlib ``figure``); return both paths.

    ``out_dir`` defaults to :data:`RESULTS_DIR`. The JSON is written to a temporary file first and renamed, so
    an interrupted run never leaves half a file.
    """
    out = Path(out_dir) if out_dir is not None else RESULTS_DIR
    out.mkdir(parents=True, exist_ok=True)
    json_path = out / f"{name}.json"
    tmp = out / f"{name}.json.tmp"
    tmp.write_text(json.dumps(jsonable(payload), indent=2) + "\n")
    tmp.replace(json_path)
    png_path = None
    if figure is not None:
        png_path = out / f"{name}.png"
        figure.savefig(png_path, dpi=120, bbox_inches="tight")
    return json_path, png_path


def new_figure(nrows: int, ncols: int, size: tuple[float, float] = (4.5, 3.4)) -> tuple[Any, Any]:
    """A matplotlib figure on the non-interactive Agg backend with a 2-D array of axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(nrows, ncols, figsize=(size[0] * ncols, size[1] * nrows), squeeze=False)
    return fig, axes


__all__ = [
    "RESULTS_DIR",
    "Timer",
    "copy_plots",
    "cpu_count",
    "environment",
    "git_commit",
    "grouped_bars",
    "jsonable",
    "median",
    "new_figure",
    "run_cli",
    "set_threads",
    "write_results",
]
