"""Kernels by name, for the CLI and configuration files: ``mh``, ``entropy-mh``, ``entropy-cut-mh``, ``mtm``,
``egps``, and the combinators ``cycle(K1,K2)`` and ``mixture(K1:w1,K2:w2)``."""

from __future__ import annotations

from collections.abc import Callable

from egps_ppl.errors import EGPSError
from egps_ppl.kernels.base import Kernel
from egps_ppl.kernels.combinators import Cycle, Mixture
from egps_ppl.kernels.mh import MetropolisHastings
from egps_ppl.kernels.mtm import MultipleTryMetropolis
from egps_ppl.kernels.proposals import SuffixProposal
from egps_ppl.kernels.sites import EntropyJumpSite, EntropySite
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.target import PowerDistribution

PresetFactory = Callable[[PowerDistribution, PowerPolicy], Kernel]

EGPS_DEFAULTS = {"num_tries": 8, "beta": 4.0, "floor": 1e-3, "local_width": 4}
"""Chosen on the sparse-decision test beds (benchmarks/egps_speedup.py); see docs/benchmarks/egps_speedup.md."""


def _egps(target: PowerDistribution, policy: PowerPolicy) -> Kernel:
    """The EGPS kernel: cut at entropy jumps (decision points), then Multiple-Try Metropolis over a local
    window. Tries come from the base model (temperature 1): at a decision the token p^α prefers is often one
    that low temperature almost never proposes, and the MTM weights correct for the proposal exactly."""
    return MultipleTryMetropolis(
        target,
        num_tries=EGPS_DEFAULTS["num_tries"],
        selector=EntropyJumpSite(beta=EGPS_DEFAULTS["beta"], floor=EGPS_DEFAULTS["floor"]),
        policy=PowerPolicy(1.0, top_k=policy.top_k, top_p=policy.top_p),
        local_width=EGPS_DEFAULTS["local_width"],
        name="egps",
    )


PRESETS: dict[str, tuple[PresetFactory, str]] = {
    "mh": (
        lambda target, policy: MetropolisHastings(target, proposal=SuffixProposal(policy), name="mh"),
        "uniform cut, suffix resampled at temperature 1/alpha (Karan & Du), complete Hastings ratio",
    ),
    "entropy-mh": (
        lambda target, policy: MetropolisHastings(
            target, selector=EntropySite(beta=1.0, floor=1e-3), proposal=SuffixProposal(policy), name="entropy-mh"
        ),
        "cut with P(i) ∝ 0.001 + H_i, suffix resampled at temperature 1/alpha",
    ),
    "entropy-cut-mh": (
        lambda target, policy: MetropolisHastings(
            target, selector=EntropyJumpSite(beta=4.0), proposal=SuffixProposal(policy), name="entropy-cut-mh"
        ),
        "Entropy-Cut MH: cut with P(i) ∝ max(0, H_i - H_(i-1))^4, suffix at temperature 1/alpha",
    ),
    "mtm": (
        lambda target, policy: MultipleTryMetropolis(target, num_tries=4, policy=policy, name="mtm"),
        "uniform cut, 4 suffix tries at temperature 1/alpha, Multiple-Try Metropolis",
    ),
    "egps": (
        _egps,
        "EGPS: cut at entropy jumps, 8 local tries (4 tokens, base model, tail rescored), Multiple-Try Metropolis",
    ),
}


def register_preset(name: str, factory: PresetFactory, description: str) -> None:
    """Make ``name`` usable in kernel specs (and inside ``cycle(...)``/``mixture(...)``) in this process.

    Parameters
    ----------
    name : str
        The spec name; an existing preset of that name is replaced.
    factory : callable
        ``(target, policy) -> Kernel``; ``policy`` is the proposal policy of the run (``--top-k``/``--top-p``).
    description : str
        One line for listings.
    """
    PRESETS[name] = (factory, description)


def build_kernel(spec: str, target: PowerDistribution, policy: PowerPolicy | None = None) -> Kernel:
    """Build a kernel from a spec such as ``"mh"`` or ``"mixture(mh:0.7,cycle(mh,mh):0.3)"``.

    Parameters
    ----------
    spec : str
        A preset name (``mh``, ``entropy-mh``, ``entropy-cut-mh``, ``mtm``, ``egps`` or one added with
        :func:`register_preset`), ``cycle(K1,K2,...)`` or ``mixture(K1:w1,K2:w2,...)`` (a missing weight is 1),
        nested freely. Spaces are ignored.
    target : PowerDistribution
        The target every part leaves invariant.
    policy : PowerPolicy, optional
        The proposal policy (default the target's q ∝ p^α); ``egps`` keeps its truncation but samples at
        temperature 1.

    Returns
    -------
    Kernel

    Raises
    ------
    EGPSError
        For an unknown name, unbalanced parentheses, an empty list or a weight that is not a number.

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(random_markov(4, seed=0), [], alpha=4.0, max_new_tokens=5)
    >>> build_kernel("egps", target).name
    'egps'
    >>> build_kernel("mixture(mh:0.7, cycle(entropy-mh,egps):0.3)", target).name
    'mixture(mh:0.7,cycle(entropy-mh,egps):0.3)'
    >>> sorted(PRESETS)
    ['egps', 'entropy-cut-mh', 'entropy-mh', 'mh', 'mtm']
    """
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
