"""Token policies: how a proposal turns the base conditional p(. | h) into q(. | h)."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from egps_ppl.errors import EGPSError, check_alpha


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
        logz = torch.logsumexp(scaled, dim=-1)
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
