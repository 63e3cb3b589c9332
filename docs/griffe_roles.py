"""Griffe extension for the API reference: Sphinx roles in docstrings become links.

The docstrings use Sphinx-style roles (``:class:`Kernel```, ``:func:`~egps_ppl.testing.assert_invariant```), which
mkdocstrings would print literally. This extension rewrites each role, after the whole package is loaded, into
an autorefs link ``[`Kernel`][egps_ppl.kernels.base.Kernel]`` when the name resolves to a public object of
``egps_ppl`` (which the API pages render), and into inline code otherwise, so ``mkdocs build --strict`` never
meets an unresolvable cross-reference. Loaded by mkdocs.yml (``extensions: [docs/griffe_roles.py]``).
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:class|func|meth|mod|attr|data|obj|exc|const):`(~?)([^`]+)`")
PACKAGE = "egps_ppl"


class SphinxRoles(griffe.Extension):
    """Rewrite Sphinx roles in every docstring of the package into autorefs links or inline code."""

    def on_package(self, *, pkg: griffe.Module, **kwargs: Any) -> None:
        if pkg.name == PACKAGE:
            self._walk(pkg, pkg, set())

    def _walk(self, obj: griffe.Object, pkg: griffe.Module, seen: set[str]) -> None:
        if obj.path in seen:
            return
        seen.add(obj.path)
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(lambda m: self._replace(m, obj, pkg), obj.docstring.value)
        for member in obj.members.values():
            if not member.is_alias:
                self._walk(member, pkg, seen)

    def _replace(self, match: re.Match[str], scope: griffe.Object, pkg: griffe.Module) -> str:
        short, name = match.group(1) == "~", match.group(2).strip()
        name = name.removesuffix("()")
        label = name.rsplit(".", 1)[-1] if short else name
        target = self._resolve(name, scope, pkg)
        if target is None:
            return f"`{label}`"
        return f"[`{label}`][{target}]"

    def _resolve(self, name: str, scope: griffe.Object, pkg: griffe.Module) -> str | None:
        """The canonical path of ``name`` seen from ``scope``, if it is a rendered (public) package object."""
        candidates = [name]
        try:
            head, _, rest = name.partition(".")
            resolved = scope.resolve(head)
            candidates.insert(0, resolved + ("." + rest if rest else ""))
        except Exception:
            pass
        for candidate in candidates:
            if not candidate.startswith(PACKAGE + ".") and candidate != PACKAGE:
                continue
            try:
                obj = pkg[candidate[len(PACKAGE) + 1 :]] if candidate != PACKAGE else pkg
                if obj.is_alias:
                    obj = obj.final_target
            except Exception:
                continue
            return obj.path if _rendered(obj) else None
        return None


def _rendered(obj: griffe.Object) -> bool:
    """Whether the API pages show ``obj``: public, and documented (itself and its enclosing classes)."""
    while obj is not None and not obj.is_module:
        if obj.name.startswith("_") or not obj.docstring:
            return False
        obj = obj.parent
    return obj is not None and not any(part.startswith("_") for part in obj.path.split("."))
