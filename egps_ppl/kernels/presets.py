"""Kernels by name, for the CLI and configuration files: ``mh``, ``entropy-mh``, ``entropy-cut-mh``, ``mtm``,
``egps``, ``egps-local``, ``egps-suffix``, and the combinators ``cycle(K1,K2)`` and ``mixture(K1:w1,K2:w2)``."""

from __future__ import annotations

from collections.abc import Callable

from egps_ppl.errors import EGPSError
from egps_ppl.kernels.base import Kernel
from egps_ppl.kernels.combinators import Cycle, Mixture
from egps_ppl.kernels.decision import DecisionSuffixProposal, HotWindowProposal
from egps_ppl.kernels.mh import MetropolisHastings
from egps_ppl.kernels.mtm import MultipleTryMetropolis
from egps_ppl.kernels.proposals import SuffixProposal, WindowProposal
from egps_ppl.kernels.sites import CostAwareJumpSite, EntropyJumpSite, EntropySite
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.target import PowerDistribution

PresetFactory = Callable[[PowerDistribution, PowerPolicy], Kernel]
MAX_SPEC_DEPTH = 32
"""The deepest nesting of ``cycle(...)``/``mixture(...)`` a spec may have (deeper ones would exhaust Python's
recursion limit instead of failing with a message)."""

EGPS_LOCAL_DEFAULTS = {"num_tries": 8, "beta": 4.0, "floor": 1e-3, "local_width": 4}
"""``egps-local``: chosen on the sparse-decision test beds (benchmarks/egps_speedup.py)."""

EGPS_DEFAULTS = {
    "suffix_weight": 0.5,
    "suffix_tries": 4,
    "first_alpha": 1.0,
    "gamma": 0.0,
    "local_tries": 8,
    "beta": 4.0,
    "floor": 1e-3,
    "local_width": 4,
}
"""``egps``: a mixture of decision-suffix moves and ``egps-local`` moves; chosen by the ablation of
``benchmarks/egps_design.py`` (test beds and a SmolLM2 arithmetic pilot, see docs/benchmarks/egps_design.md)."""


def egps_local(
    target: PowerDistribution,
    policy: PowerPolicy,
    num_tries: int = 8,
    beta: float = 4.0,
    floor: float = 1e-3,
    local_width: int = 4,
    name: str | None = "egps-local",
) -> Kernel:
    """Local EGPS moves: cut at entropy jumps, ``num_tries`` rewrites of a ``local_width``-token window from the
    base model (temperature 1, the run's truncation), tail kept and rescored, Multiple-Try Metropolis."""
    return MultipleTryMetropolis(
        target,
        num_tries=num_tries,
        selector=EntropyJumpSite(beta=beta, floor=floor),
        proposal=WindowProposal(PowerPolicy(1.0, top_k=policy.top_k, top_p=policy.top_p), local_width),
        name=name,
    )


def egps_suffix(
    target: PowerDistribution,
    policy: PowerPolicy,
    num_tries: int = 4,
    first_alpha: float = 1.0,
    beta: float = 4.0,
    floor: float = 1e-3,
    gamma: float = 0.0,
    name: str | None = "egps-suffix",
) -> Kernel:
    """Decision moves: cut at entropy jumps (discounted by the remaining length when ``gamma > 0``), then
    ``num_tries`` suffix tries whose first token comes from temperature ``1/first_alpha`` and the rest from
    ``policy`` (q ∝ p^α by default), Multiple-Try Metropolis."""
    first = PowerPolicy(first_alpha, top_k=policy.top_k, top_p=policy.top_p)
    selector = EntropyJumpSite(beta=beta, floor=floor) if gamma == 0 else CostAwareJumpSite(beta, floor, gamma)
    return MultipleTryMetropolis(
        target, num_tries=num_tries, selector=selector, proposal=DecisionSuffixProposal(policy, first), name=name
    )


def make_egps(
    target: PowerDistribution,
    policy: PowerPolicy,
    suffix_weight: float = EGPS_DEFAULTS["suffix_weight"],
    suffix_tries: int = EGPS_DEFAULTS["suffix_tries"],
    first_alpha: float = EGPS_DEFAULTS["first_alpha"],
    gamma: float = EGPS_DEFAULTS["gamma"],
    local_tries: int = EGPS_DEFAULTS["local_tries"],
    beta: float = EGPS_DEFAULTS["beta"],
    floor: float = EGPS_DEFAULTS["floor"],
    local_width: int = EGPS_DEFAULTS["local_width"],
    name: str | None = "egps",
) -> Kernel:
    """The EGPS kernel: each chain and step makes a decision-suffix move (:func:`egps_suffix`) with probability
    ``suffix_weight``, else a local move (:func:`egps_local`). ``suffix_weight`` 1 or 0 gives one part alone.

    Raises
    ------
    EGPSError
        For ``suffix_weight`` outside [0, 1] or a bad part setting (tries, width, alpha, beta, floor, gamma).
    """
    if isinstance(suffix_weight, bool) or not isinstance(suffix_weight, int | float) or not 0 <= suffix_weight <= 1:
        raise EGPSError(f"egps: suffix_weight must be a number in [0, 1], got {suffix_weight!r}")
    if isinstance(first_alpha, bool) or not isinstance(first_alpha, int | float) or not 0 < first_alpha < 1e9:
        raise EGPSError(f"egps: first_alpha must be a finite number > 0, got {first_alpha!r}")
    suffix = egps_suffix(target, policy, suffix_tries, first_alpha, beta, floor, gamma, name=None)
    # The local part draws its windows at temperature 1 but keeps the state under `policy`, like the suffix
    # part, so a chain switching parts is never rescored whole (and Mixture merges rows of one policy).
    window = HotWindowProposal(policy, PowerPolicy(1.0, top_k=policy.top_k, top_p=policy.top_p), local_width)
    local = MultipleTryMetropolis(
        target, num_tries=local_tries, selector=EntropyJumpSite(beta=beta, floor=floor), proposal=window
    )
    if suffix_weight == 1:
        kernel: Kernel = suffix
    elif suffix_weight == 0:
        kernel = local
    else:
        kernel = Mixture([suffix, local], [suffix_weight, 1 - suffix_weight])
    if name is not None:
        kernel.name = name
    return kernel


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
        lambda target, policy: make_egps(target, policy),
        "EGPS: at entropy jumps, a mixture of decision-suffix MTM (first token at temperature 1, rest at 1/alpha) "
        "and local-window MTM",
    ),
    "egps-local": (
        lambda target, policy: egps_local(target, policy, **EGPS_LOCAL_DEFAULTS),
        "EGPS's local moves alone: cut at entropy jumps, 8 window tries (4 tokens, base model, tail rescored), MTM",
    ),
    "egps-suffix": (
        lambda target, policy: egps_suffix(target, policy, num_tries=EGPS_DEFAULTS["suffix_tries"]),
        "EGPS's decision moves alone: cut at entropy jumps, suffix tries with the first token at temperature 1",
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
        A preset name (``mh``, ``entropy-mh``, ``entropy-cut-mh``, ``mtm``, ``egps``, ``egps-local``,
        ``egps-suffix`` or one added with
        :func:`register_preset`), ``cycle(K1,K2,...)`` or ``mixture(K1:w1,K2:w2,...)`` (a missing weight is 1),
        nested freely. Spaces are ignored.
    target : PowerDistribution
        The target every part leaves invariant.
    policy : PowerPolicy, optional
        The proposal policy (default the target's q ∝ p^α); ``egps``'s local windows and decision tokens keep
        its truncation but sample at temperature 1.

    Returns
    -------
    Kernel

    Raises
    ------
    EGPSError
        For an unknown name, unbalanced parentheses, an empty list, a weight that is not a finite number >= 0
        (or all weights 0), or nesting deeper than :data:`MAX_SPEC_DEPTH`.

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
    ['egps', 'egps-local', 'egps-suffix', 'entropy-cut-mh', 'entropy-mh', 'mh', 'mtm']
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
        weight = float(tail)
    except ValueError:
        raise EGPSError(f"mixture weight must be a number, got {tail!r} in {part!r}") from None
    if not 0 <= weight < float("inf"):  # also NaN
        raise EGPSError(f"mixture weight must be a finite number >= 0, got {tail!r} in {part!r}")
    return bool(head)


def _split_top_level(text: str) -> list[str]:
    parts, depth, current = [], 0, []
    for char in text:
        if char == "(":
            depth += 1
            if depth >= MAX_SPEC_DEPTH:  # inside one combinator already: the whole spec is nested deeper
                raise EGPSError(f"kernel spec nested more than {MAX_SPEC_DEPTH} levels deep; flatten it")
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
