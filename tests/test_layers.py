"""The package's layers: a module imports only layers below its own (or its own), and every subpackage imports
on its own in a fresh interpreter."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "egps_ppl"

LAYERS = (
    "errors",
    "rng",
    "state",
    "models",
    "target",
    "diagnostics",
    "kernels",
    "infer",
    "testing",
    "pyro",
    "analysis",
    "evals",
    "cli",
)
"""Low to high. ``diagnostics`` reads arrays and ArviZ files only, so the runner (``infer``) may use it."""


def _layer(module: str) -> int:
    parts = module.split(".")
    if parts[0] != "egps_ppl" or len(parts) == 1:
        raise KeyError(module)
    return LAYERS.index(parts[1])


def _modules() -> list[tuple[str, Path]]:
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts.pop()
        if len(parts) > 1:
            found.append((".".join(parts), path))
    return found


def _imports(path: Path, module: str) -> set[str]:
    """Every ``egps_ppl`` module imported anywhere in the file, function-level (lazy) imports included; imports
    for type hints only (under ``if TYPE_CHECKING:``) are not dependencies at run time and are left out."""
    names = set()
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and ast.unparse(node.test) in ("TYPE_CHECKING", "typing.TYPE_CHECKING"):
            node.body = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, base] if base else anchor)
            names.add(base)
    return {name for name in names if name.startswith("egps_ppl.")}


def test_every_module_has_a_layer():
    unknown = sorted({module.split(".")[1] for module, _ in _modules()} - set(LAYERS))
    assert not unknown, f"add these to LAYERS: {unknown}"


@pytest.mark.parametrize(("module", "path"), _modules(), ids=[m for m, _ in _modules()])
def test_no_module_imports_a_layer_above_it(module, path):
    own = _layer(module)
    upward = sorted(name for name in _imports(path, module) if _layer(name) > own)
    assert not upward, f"{module} (layer {LAYERS[own]}) imports higher layers: {upward}"


SUBPACKAGES = sorted({".".join(m.split(".")[:2]) for m, _ in _modules()})


@pytest.mark.parametrize("name", SUBPACKAGES)
def test_subpackage_imports_in_isolation(name):
    result = subprocess.run([sys.executable, "-c", f"import {name}"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
