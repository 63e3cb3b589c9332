"""Kernels by name, for the CLI and configuration files: ``mh``, ``cycle(K1,K2)``, ``mixture(K1:w1,K2:w2)``."""

from __future__ import annotations

from collections.abc import Callable

from egps_ppl.errors import EGPSError
from egps_ppl.kernels.base import Kernel
from egps_ppl.kernels.combinators import Cycle, Mixture
from egps_ppl.kernels.mh import MetropolisHastings
from egps_ppl.kernels.proposals import SuffixProposal
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.target import PowerDistribution

PresetFactory = Callable[[PowerDistribution, PowerPolicy], Kernel]

PRESETS: dict[str, tuple[PresetFactory, str]] = {
    "mh": (
        lambda target, policy: MetropolisHastings(target, proposal=SuffixProposal(policy), name="mh"),
        "uniform cut, suffix resampled at temperature 1/alpha (Karan & Du), complete Hastings ratio",
    ),
}


def register_preset(name: str, factory: PresetFactory, description: str) -> None:
    """Make ``name`` usable in ``--kernel`` (and inside ``cycle(...)``/``mixture(...)``)."""
    PRESETS[name] = (factory, description)


def build_kernel(spec: str, target: PowerDistribution, policy: PowerPolicy | None = None) -> Kernel:
    """Build a kernel from a spec such as ``"mh"`` or ``"mixture(mh:0.7,cycle(mh,mh):0.3)"``."""
    policy = policy or target.default_policy()
    spec = spec.replace(" ", "")
    if not spec:
        raise EGPSError("empty kernel spec")
    for combinator in ("cycle", "mixture"):
        if spec.startswith(combinator + "(") and spec.endswith(")"):
            parts = _split_top_level(spec[len(combinator) + 1 : -1])
            if not parts or any(not p for p in parts):
                raise EGPSError(f"{combinator}(...) needs a comma-separated list of kernels, got {spec!r}")
            if combinator == "cycle":
                return Cycle([build_kernel(p, target, policy) for p in parts])
            kernels, weights = [], []
            for part in parts:
                name, _, weight = part.rpartition(":") if _weight_suffix(part) else (part, "", "1")
                kernels.append(build_kernel(name, target, policy))
                weights.append(float(weight))
            return Mixture(kernels, weights)
    if spec not in PRESETS:
        known = ", ".join(sorted(PRESETS))
        raise EGPSError(f"unknown kernel {spec!r}; choose one of: {known}, cycle(K1,K2,...), mixture(K1:w1,...)")
    return PRESETS[spec][0](target, policy)


def _weight_suffix(part: str) -> bool:
    head, sep, tail = part.rpartition(":")
    if not sep or tail.count("(") or tail.count(")"):
        return False
    try:
        float(tail)
    except ValueError:
        raise EGPSError(f"mixture weight must be a number, got {tail!r} in {part!r}") from None
    return bool(head)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth < 0:
                raise EGPSError(f"unbalanced parentheses in kernel spec {text!r}")
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    if depth != 0:
        raise EGPSError(f"unbalanced parentheses in kernel spec {text!r}")
    parts.append("".join(current))
    return parts
