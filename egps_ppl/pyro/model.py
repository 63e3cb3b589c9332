"""The power distribution written as a Pyro model, and its potential read through Pyro's poutine.

``π(x) ∝ p(x | prompt)^α · exp(log_factor(x))`` is the base model's sequence distribution ``p`` tilted by one
factor, so as a Pyro program it is two statements::

    x = pyro.sample("x", SequenceDistribution(target))                  # log p(x)
    pyro.factor("power", (α - 1) * log p(x) + log_factor(x))             # the tilt

and the model's joint log density is exactly :meth:`PowerDistribution.log_prob`. :func:`potential_fn` traces
that model conditioned on ``x`` and returns ``-log_prob_sum()``, the quantity ``pyro.infer.mcmc.util`` computes
for HMC/NUTS ("the Pyro-style unnormalised target"). The tests check it against ``target.log_prob`` on every
completion of small Markov models.

Examples
--------
>>> import torch
>>> from egps_ppl.models.testbeds import random_markov
>>> from egps_ppl.target import PowerDistribution
>>> target = PowerDistribution(random_markov(3, seed=0), [], alpha=2.0, max_new_tokens=3)
>>> x = torch.tensor([1, 2, 0])
>>> seqs, _ = target.from_completions([[1, 2, 0]])
>>> bool(torch.isclose(potential_fn(target)({"x": x}), -target.log_prob(seqs)[0]))
True
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import pyro
import pyro.poutine as poutine
import torch
from pyro.distributions import TorchDistribution, constraints
from pyro.distributions.torch_distribution import TorchDistributionMixin

from egps_ppl.errors import EGPSError
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import PAD, Sequences
from egps_ppl.target import PowerDistribution

SITE = "x"
"""Name of the completion's sample site in :func:`power_model` (and of the parameter in :func:`potential_fn`)."""

FACTOR_SITE = "power"
"""Name of the tilt's factor site in :func:`power_model`."""

BASE_POLICY = PowerPolicy(1.0)
"""Temperature-1 sampling: the policy under which :class:`SequenceDistribution` samples and scores."""


def completion_mask(
    tokens: torch.Tensor, vocab_size: int, max_new_tokens: int, eos_token_id: int | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lengths and support membership of padded completions.

    Parameters
    ----------
    tokens:
        ``LongTensor[N, T]``: token ids, padded with ``-1`` after the completion.
    vocab_size:
        ``V``; real tokens must lie in ``[0, V)``.
    max_new_tokens:
        ``T``, the width of ``tokens``.
    eos_token_id:
        The EOS id, or ``None`` for a model without one (then every completion has exactly ``T`` tokens).

    Returns
    -------
    length:
        ``LongTensor[N]``: the number of tokens before the first ``-1`` (``T`` if there is none).
    in_support:
        ``bool[N]``: at least one token, all ids in range, padding only after the completion, EOS (if any) only
        as the last token, and a completion without EOS has exactly ``T`` tokens.
    """
    num, width = tokens.shape
    pos = torch.arange(width, device=tokens.device).unsqueeze(0)
    is_pad = tokens == PAD
    length = torch.where(
        is_pad.any(1), is_pad.to(torch.int8).argmax(1), torch.full((num,), width, device=tokens.device)
    ).long()
    inside = pos < length.unsqueeze(1)
    ok = (length >= 1) & (width == max_new_tokens)
    ok &= (is_pad == ~inside).all(1)  # no real token after the first pad
    ok &= (((tokens >= 0) & (tokens < vocab_size)) | ~inside).all(1)
    if eos_token_id is None:
        ok &= length == max_new_tokens
    else:
        is_eos = tokens == eos_token_id
        ok &= ~(is_eos & (pos < (length - 1).unsqueeze(1))).any(1)
        last = tokens.gather(1, (length - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        ok &= (last == eos_token_id) | (length == max_new_tokens)
    return length, ok


class CompletionSupport(constraints.Constraint):
    """The completions of a :class:`PowerDistribution`: a discrete constraint with ``event_dim = 1``.

    ``check(value)`` returns ``bool[...]`` for values ``[..., T]`` (see :func:`completion_mask`).
    """

    is_discrete = True
    event_dim = 1

    def __init__(self, vocab_size: int, max_new_tokens: int, eos_token_id: int | None) -> None:
        self.vocab_size = vocab_size
        self.max_new_tokens = max_new_tokens
        self.eos_token_id = eos_token_id
        super().__init__()

    def check(self, value: torch.Tensor) -> torch.Tensor:
        tokens, integral = _as_token_ids(value)
        if tokens.dim() == 0 or tokens.shape[-1] != self.max_new_tokens:
            return torch.zeros(tokens.shape[:-1] if tokens.dim() else (), dtype=torch.bool)
        flat = tokens.reshape(-1, self.max_new_tokens)
        _, ok = completion_mask(flat, self.vocab_size, self.max_new_tokens, self.eos_token_id)
        return (ok & integral.reshape(-1)).reshape(tokens.shape[:-1])

    def __repr__(self) -> str:
        return (
            f"CompletionSupport(vocab_size={self.vocab_size}, max_new_tokens={self.max_new_tokens}, "
            f"eos_token_id={self.eos_token_id})"
        )


@dataclass(frozen=True)
class ScoredValue:
    """A value of :class:`SequenceDistribution` scored by the backend.

    Attributes
    ----------
    log_p:
        ``float64[...]``: ``log p(x | prompt)``, ``-inf`` outside the support.
    rows:
        ``LongTensor[K]``: flat indices (into ``value.reshape(-1, T)``) of the values in the support.
    seqs:
        The ``K`` in-support values as a scored :class:`Sequences` (policy ``PowerPolicy(1.0)``), or ``None``
        when ``K = 0``.
    """

    log_p: torch.Tensor
    rows: torch.Tensor
    seqs: Sequences | None


class SequenceDistribution(TorchDistribution):
    """The base model's distribution over completions of a fixed prompt, ``p(x | prompt)`` at temperature 1.

    A value is a ``LongTensor[..., T]`` (``T = max_new_tokens``) padded with ``-1`` after the completion; EOS,
    when present, is the last real token. The support is every completion ending in EOS within ``T`` tokens plus
    every ``T``-token completion without EOS, as for :class:`PowerDistribution`.

    Parameters
    ----------
    target:
        The power distribution whose ``lm``, ``prompt`` and ``max_new_tokens`` define ``p`` (its ``alpha`` and
        ``log_factor`` are not used here; :func:`power_model` adds them).
    generator:
        Optional random generator for :meth:`sample` (default: torch's global generator, which
        ``pyro.set_rng_seed`` seeds).
    validate_args:
        ``False`` (the default): :meth:`log_prob` returns ``-inf`` for values outside the support, which is what
        an MCMC potential needs (an impossible proposal is simply rejected). ``True``: such values raise
        ``ValueError`` (torch's convention for validated distributions). ``None``: follow torch's global default
        (which ``pyro.enable_validation`` sets).

    Notes
    -----
    ``log_prob`` runs the backend's batched ``score`` (one teacher-forced pass for all values in the support);
    ``sample`` runs ``lm.extend`` with ``PowerPolicy(1.0)`` (ancestral sampling, all draws in one batch). The
    support is finite but astronomically large for a real vocabulary, so ``has_enumerate_support`` is ``False``.
    The batch shape is always ``()``; ``expand`` gives Pyro's ``ExpandedDistribution`` (for plates).

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> target = PowerDistribution(random_markov(3, seed=0), [], alpha=4.0, max_new_tokens=3)
    >>> d = SequenceDistribution(target)
    >>> d.sample((5,)).shape
    torch.Size([5, 3])
    >>> d.log_prob(torch.tensor([0, 1, -1])).item()  # EOS before the end: outside the support
    -inf
    """

    arg_constraints: dict[str, constraints.Constraint] = {}  # noqa: RUF012 (torch's class-level convention)
    has_enumerate_support = False
    has_rsample = False

    def __init__(
        self,
        target: PowerDistribution,
        generator: torch.Generator | None = None,
        validate_args: bool | None = False,
    ) -> None:
        self.target = target
        self.generator = generator
        self.max_new_tokens = target.max_new_tokens
        self.vocab_size = target.lm.vocab_size
        self.eos_token_id = target.lm.eos_token_id
        self._support = CompletionSupport(self.vocab_size, self.max_new_tokens, self.eos_token_id)
        self._last: tuple[torch.Tensor, int, ScoredValue] | None = None
        super().__init__(torch.Size(), torch.Size((self.max_new_tokens,)), validate_args=validate_args)

    @property
    def support(self) -> constraints.Constraint:
        return self._support

    def expand(self, batch_shape: torch.Size, _instance: object = None) -> TorchDistribution:
        """Pyro's ``ExpandedDistribution`` over this one (torch's ``Distribution.expand`` would raise)."""
        return TorchDistributionMixin.expand(self, batch_shape)

    # ------------------------------------------------------------------ sampling
    def sample(self, sample_shape: torch.Size | tuple[int, ...] = ()) -> torch.Tensor:
        """Ancestral draws from ``p(x | prompt)``: ``LongTensor[*sample_shape, T]`` padded with ``-1``."""
        shape = torch.Size(sample_shape) + self.batch_shape
        num = math.prod(shape)
        if num == 0:
            return torch.full((*shape, self.max_new_tokens), PAD, dtype=torch.long)
        with torch.no_grad():
            empty = self.target.empty(num, policy=BASE_POLICY)
            seqs, _ = self.target.lm.extend(
                empty, torch.zeros(num, dtype=torch.long, device=empty.device), generator=self.generator
            )
        return seqs.tokens.reshape(*shape, self.max_new_tokens)

    # ------------------------------------------------------------------ densities
    def score(self, value: torch.Tensor) -> ScoredValue:
        """Score ``value[..., T]`` with the backend: ``log p`` (``-inf`` outside the support) and the
        in-support values as :class:`Sequences` (what a ``log_factor`` takes).

        The last result is memoised on the value's identity and version, so :func:`power_model`'s factor and
        the trace's ``log_prob`` of the same ``x`` share one backend call.
        """
        if self._last is not None and self._last[0] is value and self._last[1] == value._version:
            return self._last[2]
        tokens, integral = _as_token_ids(value)
        if tokens.dim() == 0 or tokens.shape[-1] != self.max_new_tokens:
            raise ValueError(
                f"a value must have shape [..., {self.max_new_tokens}] (max_new_tokens), got {tuple(tokens.shape)}"
            )
        batch = tokens.shape[:-1]
        flat = tokens.reshape(-1, self.max_new_tokens)
        length, ok = completion_mask(flat, self.vocab_size, self.max_new_tokens, self.eos_token_id)
        ok &= integral.reshape(-1)
        log_p = torch.full((flat.shape[0],), -math.inf, dtype=torch.float64)
        rows = ok.nonzero().flatten()
        seqs: Sequences | None = None
        if rows.numel():
            with torch.no_grad():
                empty = self.target.empty(rows.numel(), policy=BASE_POLICY)
                seqs = empty.with_(tokens=flat[rows].to(empty.device), length=length[rows].to(empty.device))
                seqs, _ = self.target.lm.score(seqs, torch.zeros_like(seqs.length))
            log_p[rows] = seqs.log_p().to(log_p.device, torch.float64)
        result = ScoredValue(log_p.reshape(batch), rows, seqs)
        if torch.is_tensor(value):
            self._last = (value, value._version, result)
        return result

    def log_prob(self, value: torch.Tensor) -> torch.Tensor:
        """``log p(x | prompt)`` of ``value[..., T]`` as ``float64[...]``; ``-inf`` outside the support (or
        ``ValueError`` there when ``validate_args`` is on)."""
        if self._validate_args:
            self._validate_sample(torch.as_tensor(value))
        return self.score(value).log_p

    def enumerate_support(self, expand: bool = True) -> torch.Tensor:
        raise NotImplementedError("the completion space is too large to enumerate; use ExactPower.enumerate()")

    def __repr__(self) -> str:
        return (
            f"SequenceDistribution(model={self.target.lm.name}, prompt_len={self.target.prompt.numel()}, "
            f"max_new_tokens={self.max_new_tokens})"
        )


def _as_token_ids(value: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``value`` as a LongTensor, with ``bool[...]`` saying which values were integral (floats are allowed when
    they hold whole numbers; others are outside the support)."""
    value = torch.as_tensor(value)
    if value.is_floating_point() or value.is_complex():
        real = value.real if value.is_complex() else value
        whole = torch.isfinite(real) & (real == real.floor())
        if value.is_complex():
            whole &= value.imag == 0
        tokens = torch.where(whole, real, torch.full_like(real, -2)).long()
        integral = whole.all(-1) if value.dim() else whole
        return tokens, integral
    tokens = value.long()
    return tokens, torch.ones(tokens.shape[:-1] if tokens.dim() else (), dtype=torch.bool)


# ---------------------------------------------------------------------- the model and its potential
class PowerModel:
    """The Pyro model of ``target`` (see :func:`power_model`); a picklable callable."""

    def __init__(self, target: PowerDistribution) -> None:
        self.target = target
        self.base = SequenceDistribution(target)

    def __call__(self) -> torch.Tensor:
        x = pyro.sample(SITE, self.base)
        pyro.factor(FACTOR_SITE, self.log_tilt(x))
        return x

    def log_tilt(self, x: torch.Tensor) -> torch.Tensor:
        """``(α − 1)·log p(x) + log_factor(x)`` (``float64[...]``); 0 where ``x`` is outside the support (the
        sample site already contributes ``-inf`` there, and ``(α − 1)·(−∞)`` would turn the sum into NaN)."""
        scored = self.base.score(x)
        log_p = scored.log_p
        finite = torch.isfinite(log_p)
        tilt = torch.where(finite, (self.target.alpha - 1.0) * log_p, torch.zeros_like(log_p))
        if self.target.log_factor is not None and scored.seqs is not None:
            extra = torch.as_tensor(self.target.log_factor(scored.seqs), dtype=torch.float64).to(log_p.device)
            flat = torch.zeros(log_p.numel(), dtype=torch.float64, device=log_p.device)
            flat[scored.rows.to(log_p.device)] = extra.reshape(-1)
            tilt = tilt + torch.where(finite, flat.reshape(log_p.shape), torch.zeros_like(log_p))
        return tilt

    def __repr__(self) -> str:
        return f"power_model({self.target.describe()})"


def power_model(target: PowerDistribution) -> Callable[[], torch.Tensor]:
    """``target`` as a Pyro model whose joint log density is exactly ``target.log_prob(x)``.

    The model is ``x = pyro.sample("x", SequenceDistribution(target))`` followed by
    ``pyro.factor("power", (α − 1)·log p(x) + log_factor(x))``, so ``log p(x) + (α − 1)·log p(x) + log_factor(x)
    = α·log p(x) + log_factor(x)``. Run unconditioned it draws ``x`` from ``p`` (the factor only weights it);
    condition it on ``x`` to evaluate the target.

    Parameters
    ----------
    target:
        The power distribution.

    Returns
    -------
    A callable taking no arguments and returning ``x`` (a :class:`PowerModel`, picklable when the target is).

    Examples
    --------
    >>> import pyro.poutine as poutine
    >>> from egps_ppl.models.testbeds import random_markov
    >>> target = PowerDistribution(random_markov(3, seed=0), [], alpha=4.0, max_new_tokens=3)
    >>> trace = poutine.trace(power_model(target)).get_trace()
    >>> sorted(trace.stochastic_nodes), list(trace.observation_nodes)
    (['x'], ['power'])
    """
    return PowerModel(target)


class PowerPotential:
    """The potential energy of ``target`` read through Pyro's poutine (see :func:`potential_fn`)."""

    def __init__(self, target: PowerDistribution) -> None:
        self.target = target
        self.model = PowerModel(target)

    def __call__(self, params: Mapping[str, torch.Tensor]) -> torch.Tensor:
        if SITE not in params:
            raise EGPSError(f"potential_fn needs the parameter {SITE!r}; got {sorted(params)}")
        x = torch.as_tensor(params[SITE])
        trace = poutine.trace(poutine.condition(self.model, data={SITE: x})).get_trace()
        if x.dim() <= 1:
            return -trace.log_prob_sum()
        # A batch of values [..., T]: the same per-site log densities, summed over sites but not over the batch.
        trace.compute_log_prob()
        total = torch.zeros(x.shape[:-1], dtype=torch.float64)
        for site in trace.nodes.values():
            if site["type"] == "sample":
                total = total + site["log_prob"].to(torch.float64)
        return -total

    def __repr__(self) -> str:
        return f"potential_fn({self.target.describe()})"


def potential_fn(target: PowerDistribution) -> Callable[[Mapping[str, torch.Tensor]], torch.Tensor]:
    """The potential energy ``U(x) = −log π(x)`` (unnormalised) computed through Pyro's poutine.

    For ``params = {"x": tokens[T]}`` this traces :func:`power_model` conditioned on ``x`` and returns
    ``-trace.log_prob_sum()``, the computation ``pyro.infer.mcmc.util`` performs for its kernels (there are no
    transforms: the site is discrete). ``tokens[..., T]`` (a batch) gives ``float64[...]``, one potential per
    value. Values outside the support give ``+inf``.

    Parameters
    ----------
    target:
        The power distribution.

    Returns
    -------
    A callable ``params -> potential`` (a :class:`PowerPotential`).
    """
    return PowerPotential(target)


__all__ = [
    "BASE_POLICY",
    "FACTOR_SITE",
    "SITE",
    "CompletionSupport",
    "PowerModel",
    "PowerPotential",
    "ScoredValue",
    "SequenceDistribution",
    "completion_mask",
    "potential_fn",
    "power_model",
]
