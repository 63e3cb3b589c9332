"""Random streams: every chain draws from its own generator, so its trajectory does not depend on the batch.

A batch of chains normally shares one ``torch.Generator``: what chain ``c`` draws then depends on how many other
rows drew before it, so the same unit run in a different batch (another batch size, other problems beside it,
a refill at another time) gives a different chain. Passing a :class:`Streams` object wherever the toolkit takes
``generator`` makes every draw of a row come from the stream named by that row's ``Sequences.stream`` instead,
in the row's own order. Rows made from a row (the tries of MTM, a proposal) keep its stream, and draw from it
one after another in row order, which is fixed by the chain itself. This is what keeps an evaluation record
reproducible whatever the batch (up to floating-point differences between batch shapes, none in float64).

Examples
--------
>>> streams = Streams([11, 12])
>>> a = uniform(streams, 2, torch.tensor([0, 1]))
>>> b = uniform(Streams([11, 12]), 1, torch.tensor([1]))
>>> bool(a[1] == b[0])
True
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeAlias

import torch

from egps_ppl.errors import EGPSError

__all__ = ["Generator", "Streams", "categorical", "uniform"]


class Streams:
    """One ``torch.Generator`` (on the CPU) per stream; a batch's rows name theirs in ``Sequences.stream``.

    Parameters
    ----------
    seeds : iterable of int
        One seed per stream; more streams can be added with :meth:`add`.
    """

    def __init__(self, seeds: Iterable[int] = ()) -> None:
        self._generators: list[torch.Generator] = []
        for seed in seeds:
            self.add(seed)

    def add(self, seed: int) -> int:
        """Open a stream seeded with ``seed``; returns its index."""
        self._generators.append(torch.Generator().manual_seed(int(seed)))
        return len(self._generators) - 1

    def __len__(self) -> int:
        return len(self._generators)

    def uniform(self, streams: torch.Tensor) -> torch.Tensor:
        """``float64[N]``: one uniform draw from each named stream, in order (a stream named twice draws twice)."""
        out = torch.empty(streams.numel(), dtype=torch.float64)
        for i, s in enumerate(streams.tolist()):
            if not 0 <= s < len(self._generators):
                raise EGPSError(f"stream {s} does not exist (there are {len(self._generators)})")
            out[i] = torch.rand((), dtype=torch.float64, generator=self._generators[s])
        return out

    def __repr__(self) -> str:
        return f"Streams({len(self)} streams)"


Generator: TypeAlias = torch.Generator | Streams | None
"""What the toolkit accepts as a source of randomness: a shared generator, per-row streams, or ``None``."""


def uniform(
    generator: Generator, num: int, streams: torch.Tensor | None = None, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    """``num`` uniforms on [0, 1) on the CPU: from the shared generator, or one per row from its stream.

    Parameters
    ----------
    generator : torch.Generator, Streams or None
        The source of randomness.
    num : int
        Number of draws (rows).
    streams : torch.Tensor, optional
        ``long[num]``, the stream of each row; required with :class:`Streams`, ignored otherwise.
    dtype : torch.dtype
        Floating type of the result.

    Returns
    -------
    torch.Tensor

    Raises
    ------
    EGPSError
        For :class:`Streams` without one stream per row.
    """
    if isinstance(generator, Streams):
        if streams is None or streams.numel() != num:
            raise EGPSError("per-row random streams need the stream of every row (Sequences.stream)")
        return generator.uniform(streams.cpu()).to(dtype)
    return torch.rand(num, dtype=dtype, generator=generator, device="cpu")


def categorical(
    probs: torch.Tensor, num: int, generator: Generator, streams: torch.Tensor | None = None
) -> torch.Tensor:
    """``long[num]`` draws from the categorical distribution ``probs[K]`` (shared) or ``probs[num, K]`` (per row),
    unnormalised weights allowed, by inverting the CDF with :func:`uniform`.

    Examples
    --------
    >>> categorical(torch.tensor([0.0, 1.0, 0.0]), 4, torch.Generator().manual_seed(0)).tolist()
    [1, 1, 1, 1]
    """
    probs = probs.to(torch.float64).cpu()
    cdf = torch.cumsum(probs.expand(num, -1) if probs.dim() == 1 else probs, dim=-1)
    u = uniform(generator, num, streams) * cdf[:, -1]
    draws = torch.searchsorted(cdf, u.unsqueeze(1), right=True).squeeze(1)
    # Rounding can put u * total at the total itself: fall back to the last category with positive weight.
    return torch.minimum(draws, (cdf < cdf[:, -1:]).sum(1))
