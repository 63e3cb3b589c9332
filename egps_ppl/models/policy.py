"""Token policies: how a proposal turns the base conditional p(. | h) into q(. | h)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from egps_ppl.errors import EGPSError, check_alpha

__all__ = ["PowerPolicy", "exp_flushed", "logsumexp_flushed"]


def _floor(dtype: torch.dtype) -> float:
    """Just above ``log`` of the dtype's smallest normal number: ``exp`` of anything at or above it is normal."""
    return math.log(torch.finfo(dtype).tiny) + 0.01


def exp_flushed(x: torch.Tensor) -> torch.Tensor:
    """``exp(x)``, with results below the dtype's smallest normal number (float32: 1.2e-38) flushed to 0.

    On CPUs, ``exp`` is 50-60x slower on arguments whose result is subnormal, and ``α · log p`` over a 49k-token
    vocabulary has thousands of them per row (about 30% of SmolLM2's at α = 4). A token dropped here had
    probability below 1.2e-38, far below what the float32 CDF it is sampled from can resolve.

    Examples
    --------
    >>> exp_flushed(torch.tensor([0.0, -1.0, -100.0, -math.inf])).tolist()
    [1.0, 0.3678794503211975, 0.0, 0.0]
    """
    if x.dtype not in (torch.float32, torch.float64):  # half types: their range is not the problem here
        return x.exp()
    floor = _floor(x.dtype)
    return x.clamp(min=floor).exp_().masked_fill_(x < floor, 0.0)


def logsumexp_flushed(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """``torch.logsumexp(x, dim)`` without subnormal intermediates (see :func:`exp_flushed`).

    Terms more than ``-log(tiny)`` (float32: 87) below the row's largest are raised to that distance before the
    sum: together they add at most ``V * 1.2e-38`` to a sum of at least 1, which rounds away.

    Examples
    --------
    >>> x = torch.tensor([[0.0, -200.0, -math.inf], [-math.inf, -math.inf, -math.inf]])
    >>> logsumexp_flushed(x).tolist() == torch.logsumexp(x, -1).tolist()
    True
    """
    if x.dtype not in (torch.float32, torch.float64):
        return torch.logsumexp(x, dim)
    top = x.amax(dim, keepdim=True)
    return torch.logsumexp(torch.maximum(x, top + _floor(x.dtype)), dim)


@dataclass(frozen=True)
class PowerPolicy:
    """q(v | h) ∝ p(v | h)^alpha on the kept set (temperature 1/alpha, then optional top-k and top-p).

    ``alpha = 1`` is plain sampling. With truncation, tokens outside the kept set get log q = -inf and
    ``logz`` is the truncated sum ``log Σ_{v kept} p(v|h)^alpha``, so ``α·log p(v) - log q(v) = logz`` still
    holds for every token the policy can propose.

    Parameters
    ----------
    alpha : float
        Inverse temperature, ``> 0``.
    top_k : int, optional
        Keep only the ``top_k`` most likely tokens.
    top_p : float, optional
        Keep the smallest set of most likely tokens whose mass reaches ``top_p`` (in ``(0, 1]``).

    Raises
    ------
    EGPSError
        For ``alpha <= 0``, ``top_k < 1`` or ``top_p`` outside ``(0, 1]``.

    Examples
    --------
    >>> logp = torch.log(torch.tensor([0.6, 0.3, 0.1]))
    >>> logq, logz = PowerPolicy(2.0).apply(logp)
    >>> [round(v, 3) for v in logq.exp().tolist()]
    [0.783, 0.196, 0.022]
    >>> logq, _ = PowerPolicy(1.0, top_k=2).apply(logp)
    >>> [round(v, 3) for v in logq.exp().tolist()]
    [0.667, 0.333, 0.0]
    """

    alpha: float = 1.0
    top_k: int | None = None
    top_p: float | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "alpha", check_alpha(self.alpha))
        if self.top_k is not None and (isinstance(self.top_k, bool) or int(self.top_k) < 1):
            raise EGPSError(f"top_k must be >= 1, got {self.top_k!r}")
        if self.top_p is not None and not (0.0 < float(self.top_p) <= 1.0):
            raise EGPSError(f"top_p must be in (0, 1], got {self.top_p!r}")

    @property
    def truncated(self) -> bool:
        """Whether top-k or top-p removes any token."""
        return self.top_k is not None or (self.top_p is not None and self.top_p < 1.0)

    def apply(self, logp: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return ``(logq[..., V], logz[...])`` for base log-probabilities ``logp[..., V]``."""
        scaled = self.alpha * logp
        if self.truncated:
            scaled = self._truncate(scaled)
        logz = logsumexp_flushed(scaled)
        return scaled - logz.unsqueeze(-1), logz

    def _truncate(self, scaled: torch.Tensor) -> torch.Tensor:
        neg_inf = torch.tensor(-math.inf, dtype=scaled.dtype, device=scaled.device)
        if self.top_k is not None and self.top_k < scaled.shape[-1]:
            kth = torch.topk(scaled, self.top_k, dim=-1).values[..., -1:]
            scaled = torch.where(scaled < kth, neg_inf, scaled)
        if self.top_p is not None and self.top_p < 1.0:
            sorted_vals, order = torch.sort(scaled, dim=-1, descending=True)
            probs = torch.softmax(sorted_vals, dim=-1)
            # Keep a token if the mass strictly before it is below top_p (the first token is always kept).
            before = torch.cumsum(probs, dim=-1) - probs
            drop_sorted = before >= self.top_p
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            scaled = torch.where(drop, neg_inf, scaled)
        return scaled

    def describe(self) -> str:
        """A short description such as ``PowerPolicy(alpha=4, top_k=50)``."""
        parts = [f"alpha={self.alpha:g}"]
        if self.top_k is not None:
            parts.append(f"top_k={self.top_k}")
        if self.top_p is not None:
            parts.append(f"top_p={self.top_p:g}")
        return "PowerPolicy(" + ", ".join(parts) + ")"
