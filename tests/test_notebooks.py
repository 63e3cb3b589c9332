"""The notebooks in notebooks/ run top to bottom without an error, and their committed outputs are present.

Each notebook is executed with nbclient (through ``tools/execute_notebooks.py``, the script behind
``make notebooks``) on a copy in a temporary folder, in a fresh kernel with one thread and the Hugging Face hub
offline; the committed files are never modified. All five together take about a minute of CPU time.
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import time
from pathlib import Path

import pytest

pytest.importorskip("nbclient", reason="the notebook tests need the dev extra (nbclient, nbformat, ipykernel)")
pytest.importorskip("nbformat")
pytest.importorskip("ipykernel")

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))
EXPECTED = [
    "01_quickstart.ipynb",
    "02_composing_kernels.ipynb",
    "03_diagnostics.ipynb",
    "04_new_proposal.ipynb",
    "05_benchmarks.ipynb",
]
CELL_TIMEOUT = 240
"""Seconds per cell; the slowest cell (02's runs) takes about 20 s of CPU time."""
MAX_NOTEBOOK_BYTES = 600_000
"""Committed notebooks stay small enough to read on GitHub (no widget state, small figures)."""


def _executor():
    spec = importlib.util.spec_from_file_location("execute_notebooks", ROOT / "tools" / "execute_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_five_notebooks_are_there():
    assert [path.name for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_committed_notebook_has_its_outputs(path):
    """Every code cell was executed in order, none failed, and no progress bars or widget state were saved."""
    notebook = json.loads(path.read_text(encoding="utf-8"))
    code = [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]
    assert code, f"{path.name} has no code cells"
    assert [cell["execution_count"] for cell in code] == list(range(1, len(code) + 1)), (
        f"{path.name} is not executed top to bottom; run `make notebooks`"
    )
    for cell in code:
        for output in cell["outputs"]:
            assert output["output_type"] != "error", f"{path.name} has a saved error"
            if output["output_type"] == "stream" and output["name"] == "stderr":
                text = "".join(output["text"])
                assert "Traceback" not in text and "it/s]" not in text, f"{path.name}: noisy stderr {text[:200]!r}"
    assert "widgets" not in notebook["metadata"], f"{path.name} stores widget state"
    assert path.stat().st_size < MAX_NOTEBOOK_BYTES, f"{path.name} is {path.stat().st_size} bytes"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=[path.stem for path in NOTEBOOKS])
def test_notebook_executes(path, tmp_path):
    executor = _executor()
    committed = path.read_bytes()
    copy = tmp_path / path.name
    shutil.copy(path, copy)
    started = time.perf_counter()
    executor.execute_notebook(copy, copy, timeout=CELL_TIMEOUT)  # raises CellExecutionError on any error
    print(f"{path.name}: {time.perf_counter() - started:.1f} s")
    assert path.read_bytes() == committed, "executing a copy must leave the committed notebook as it was"
