"""The chain state: a batch of C token sequences with the per-position statistics kernels need.

Keeping ``logp``, ``logq``, ``entropy`` and ``logz`` for every position in the state makes an acceptance
ratio cost only the changed part of a sequence: the unchanged prefix is never rescored.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

if TYPE_CHECKING:
    from egps_ppl.models.policy import PowerPolicy

PAD = -1
"""Token id used for positions past a sequence's end (also in the ArviZ export)."""

STAT_NAMES = ("logp", "logq", "entropy", "logz")


@runtime_checkable
class RowCache(Protocol):
    """A backend's per-row cache (e.g. a KV pool) that follows the rows of :class:`Sequences`.

    :meth:`Sequences.take` and :meth:`Sequences.where` call these, so kernels select and merge rows of the
    state directly and the cache stays in step.
    """

    def take(self, index: torch.Tensor) -> RowCache:
        """Rows ``index`` (``long[N]``, repeats allowed) of the cache."""
        ...

    def where(self, take_other: torch.Tensor, other: RowCache | None) -> RowCache:
        """Row-wise choice: ``other``'s rows where ``take_other`` (``bool[C]``), else this cache's rows.

        ``other = None`` stands for an empty cache (nothing cached for those rows).
        """
        ...


@dataclass(frozen=True)
class Sequences:
    """C completions, of one prompt or of one prompt per row, padded to a common capacity.

    Attributes
    ----------
    prompt:
        ``LongTensor[P]`` shared by all rows (may be empty for Markov models), or ``LongTensor[C, P]`` with one
        prompt per row (a batch over problems), each right-padded with ``PAD``; see :meth:`prompt_rows` and
        :attr:`prompt_lengths`.
    tokens:
        ``LongTensor[C, T]`` completion tokens, ``PAD`` past ``length``.
    length:
        ``LongTensor[C]`` number of completion tokens of each row.
    logp, logq, entropy, logz:
        ``float64[C, T]`` per position: log p(x_t | h_t) under the base model, log q(x_t | h_t) under
        ``policy``, the Shannon entropy of p(. | h_t) and log sum_v p(v | h_t)^policy.alpha; zero past ``length``.
    limit:
        Current maximum completion length (``<= T``): one ``int`` for the batch, or ``LongTensor[C]`` with one
        limit per row (rows of different units growing their blocks independently; see :meth:`limit_rows`). The
        block-wise schedule grows it; a row that reaches its limit without EOS is a valid, unfinished member of
        the target's support.
    policy:
        The :class:`~egps_ppl.models.policy.PowerPolicy` that ``logq`` and ``logz`` refer to.
    eos_token_id:
        End-of-sequence id (or ``None`` when the model has none).
    cache:
        The backend's :class:`RowCache` for these rows (e.g. a KV pool); ``None`` where the backend keeps none.
    problem:
        ``LongTensor[C]``, the problem (prompt) index of each row in a batch over problems; ``None`` for one
        prompt.
    stream:
        ``LongTensor[C]``, the random stream of each row when sampling with per-row streams
        (:class:`~egps_ppl.rng.Streams`); ``None`` when the batch shares one generator.

    Notes
    -----
    Instances are immutable; the methods return new batches. :meth:`take` and :meth:`where` carry the cache
    along, so kernels select and merge rows of a state directly.

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(random_markov(3, seed=1), [], alpha=2.0, max_new_tokens=4)
    >>> seqs, cost = target.from_completions([[1, 2, 0], [2, 2, 2, 1]])
    >>> seqs.num_rows, seqs.capacity, seqs.length.tolist()
    (2, 4, [3, 4])
    >>> seqs.finished().tolist(), seqs.complete().tolist()
    ([True, False], [True, True])
    >>> seqs.row_tokens(0)
    [1, 2, 0]
    """

    prompt: torch.Tensor
    tokens: torch.Tensor
    length: torch.Tensor
    logp: torch.Tensor
    logq: torch.Tensor
    entropy: torch.Tensor
    logz: torch.Tensor
    limit: int | torch.Tensor
    policy: PowerPolicy
    eos_token_id: int | None
    cache: RowCache | None = None
    problem: torch.Tensor | None = None
    stream: torch.Tensor | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def empty(
        cls,
        prompt: torch.Tensor,
        num_rows: int,
        capacity: int,
        policy: PowerPolicy,
        eos_token_id: int | None,
        cache: RowCache | None = None,
        device: torch.device | str = "cpu",
    ) -> Sequences:
        """Rows with no completion tokens yet.

        Parameters
        ----------
        prompt : torch.Tensor
            ``LongTensor[P]`` prompt ids shared by all rows.
        num_rows : int
            ``C``, the number of rows (chains).
        capacity : int
            ``T``, the maximum completion length; also the initial ``limit``.
        policy : PowerPolicy
            The token policy of ``logq`` and ``logz``.
        eos_token_id : int or None
            End-of-sequence id.
        cache : object, optional
            The backend's handle for these rows (e.g. a KV pool holding the prompt).
        device : torch.device or str
            Where the tensors live.

        Returns
        -------
        Sequences
            Tokens all ``PAD``, lengths and statistics all zero.
        """
        zeros = torch.zeros(num_rows, capacity, dtype=torch.float64, device=device)
        return cls(
            prompt=prompt,
            tokens=torch.full((num_rows, capacity), PAD, dtype=torch.long, device=device),
            length=torch.zeros(num_rows, dtype=torch.long, device=device),
            logp=zeros,
            logq=zeros.clone(),
            entropy=zeros.clone(),
            logz=zeros.clone(),
            limit=capacity,
            policy=policy,
            eos_token_id=eos_token_id,
            cache=cache,
        )

    # ----------------------------------------------------------------- shape
    @property
    def num_rows(self) -> int:
        """``C``, the number of rows (chains) in the batch."""
        return self.tokens.shape[0]

    @property
    def capacity(self) -> int:
        """``T``, the padded width of ``tokens`` (the most completion tokens a row can hold)."""
        return self.tokens.shape[1]

    @property
    def device(self) -> torch.device:
        """The device of the batch's tensors."""
        return self.tokens.device

    @property
    def per_row_prompt(self) -> bool:
        """Whether each row has its own prompt (``prompt`` is ``[C, P]``)."""
        return self.prompt.dim() == 2

    @property
    def prompt_lengths(self) -> torch.Tensor:
        """``LongTensor[C]``: prompt tokens of each row."""
        if self.per_row_prompt:
            return (self.prompt != PAD).sum(1).to(self.device)
        return torch.full((self.num_rows,), self.prompt.numel(), dtype=torch.long, device=self.device)

    def prompt_rows(self) -> torch.Tensor:
        """``LongTensor[C, P]``: each row's prompt, right-padded with ``PAD`` (a shared prompt repeated)."""
        if self.per_row_prompt:
            return self.prompt
        return self.prompt.unsqueeze(0).expand(self.num_rows, -1)

    def positions(self) -> torch.Tensor:
        """``LongTensor[1, T]`` of completion positions, for masks."""
        return torch.arange(self.capacity, device=self.device).unsqueeze(0)

    def limit_rows(self) -> torch.Tensor:
        """``LongTensor[C]``: the length limit of each row (a batch-wide ``limit`` repeated)."""
        if torch.is_tensor(self.limit):
            return self.limit.to(device=self.device, dtype=torch.long)
        return torch.full((self.num_rows,), int(self.limit), dtype=torch.long, device=self.device)

    def valid_mask(self) -> torch.Tensor:
        """``bool[C, T]``: positions holding a completion token."""
        return self.positions() < self.length.unsqueeze(1)

    def finished(self) -> torch.Tensor:
        """``bool[C]``: rows whose last token is EOS."""
        if self.eos_token_id is None:
            return torch.zeros(self.num_rows, dtype=torch.bool, device=self.device)
        last = self.tokens.gather(1, (self.length - 1).clamp(min=0).unsqueeze(1)).squeeze(1)
        return (self.length > 0) & (last == self.eos_token_id)

    def complete(self) -> torch.Tensor:
        """``bool[C]``: rows that cannot grow further (EOS, or at ``limit``)."""
        return self.finished() | (self.length >= self.limit_rows())

    # ----------------------------------------------------------------- sums
    def total(self, stat: str, start: torch.Tensor | None = None, stop: torch.Tensor | None = None) -> torch.Tensor:
        """``float64[C]``: sum of ``stat`` over positions ``start <= t < min(stop, length)`` (from 0 to the end
        by default)."""
        values = getattr(self, stat)
        mask = self.valid_mask()
        if start is not None:
            mask = mask & (self.positions() >= start.unsqueeze(1))
        if stop is not None:
            mask = mask & (self.positions() < stop.unsqueeze(1))
        return torch.where(mask, values, torch.zeros((), dtype=values.dtype, device=values.device)).sum(1)

    def log_p(self) -> torch.Tensor:
        """``float64[C]``: log p(x | prompt) of each row."""
        return self.total("logp")

    # ----------------------------------------------------------------- rows
    def row_tokens(self, row: int) -> list[int]:
        """Completion token ids of one row as a Python list."""
        return self.tokens[row, : int(self.length[row])].tolist()

    def with_(self, **changes: Any) -> Sequences:
        """A copy with some fields replaced."""
        return replace(self, **changes)

    def where(self, take_other: torch.Tensor, other: Sequences) -> Sequences:
        """Row-wise choice: ``other``'s rows where ``take_other`` (``bool[C]``) is true, else ``self``'s.

        The caches are merged by :meth:`RowCache.where` (a side without one counts as empty).
        """
        take_other = torch.as_tensor(take_other, dtype=torch.bool, device=self.device)
        prompt, problem = self.prompt, self.problem
        if self.per_row_prompt or other.per_row_prompt or not torch.equal(self.prompt, other.prompt):
            mine, theirs = _pad_right(self.prompt_rows(), other.prompt_rows())
            prompt = torch.where(take_other.to(mine.device).unsqueeze(1), theirs, mine)
        if (self.problem is None) != (other.problem is None):
            raise ValueError("Sequences.where: one batch has problem indices and the other has none")
        if self.problem is not None:
            problem = torch.where(take_other, other.problem, self.problem)
        if (self.stream is None) != (other.stream is None):
            raise ValueError("Sequences.where: one batch has random streams and the other has none")
        stream = None if self.stream is None else torch.where(take_other, other.stream, self.stream)
        limit = self.limit
        if torch.is_tensor(self.limit) or torch.is_tensor(other.limit):
            limit = torch.where(take_other, other.limit_rows(), self.limit_rows())
        if self.cache is None and other.cache is None:
            cache = None
        elif self.cache is None:
            cache = other.cache.where(~take_other, None)
        else:
            cache = self.cache.where(take_other, other.cache)
        mask2 = take_other.unsqueeze(1)
        return replace(
            self,
            prompt=prompt,
            problem=problem,
            stream=stream,
            limit=limit,
            tokens=torch.where(mask2, other.tokens, self.tokens),
            length=torch.where(take_other, other.length, self.length),
            logp=torch.where(mask2, other.logp, self.logp),
            logq=torch.where(mask2, other.logq, self.logq),
            entropy=torch.where(mask2, other.entropy, self.entropy),
            logz=torch.where(mask2, other.logz, self.logz),
            cache=cache,
        )

    def take(self, index: torch.Tensor) -> Sequences:
        """Rows ``index`` (``long[N]``, repeats allowed), the cache's rows included."""
        index = torch.as_tensor(index, dtype=torch.long, device=self.device)
        cache = None if self.cache is None else self.cache.take(index)
        return replace(
            self,
            prompt=self.prompt[index.to(self.prompt.device)] if self.per_row_prompt else self.prompt,
            problem=None if self.problem is None else self.problem[index],
            stream=None if self.stream is None else self.stream[index],
            limit=self.limit_rows()[index] if torch.is_tensor(self.limit) else self.limit,
            tokens=self.tokens[index],
            length=self.length[index],
            logp=self.logp[index],
            logq=self.logq[index],
            entropy=self.entropy[index],
            logz=self.logz[index],
            cache=cache,
        )

    def concat(self, other: Sequences) -> Sequences:
        """The rows of this batch followed by those of ``other`` (caches, prompts, problems and streams included).

        Two different batch-wide limits become one limit per row.
        """
        a, b = self.num_rows, other.num_rows
        zeros_a = torch.zeros(a, dtype=torch.long, device=self.device)
        zeros_b = torch.zeros(b, dtype=torch.long, device=self.device)
        left = self.take(torch.cat([torch.arange(a, device=self.device), zeros_b]))
        right = other.take(torch.cat([zeros_a, torch.arange(b, device=self.device)]))
        if not torch.is_tensor(left.limit) and not torch.is_tensor(right.limit) and left.limit != right.limit:
            left = left.with_(limit=left.limit_rows())
        return left.where(torch.arange(a + b, device=self.device) >= a, right)

    def truncated(self, start: torch.Tensor) -> Sequences:
        """Rows cut to their first ``start`` tokens (stats past the cut zeroed, cache kept)."""
        keep = self.positions() < start.unsqueeze(1)
        zero = torch.zeros((), dtype=torch.float64, device=self.device)
        return replace(
            self,
            tokens=torch.where(keep, self.tokens, torch.full_like(self.tokens, PAD)),
            length=torch.minimum(self.length, start),
            logp=torch.where(keep, self.logp, zero),
            logq=torch.where(keep, self.logq, zero),
            entropy=torch.where(keep, self.entropy, zero),
            logz=torch.where(keep, self.logz, zero),
        )


def _pad_right(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two ``[C, *]`` prompt tables right-padded with ``PAD`` to a common width."""
    width = max(a.shape[1], b.shape[1])

    def pad(t: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(t, (0, width - t.shape[1]), value=PAD)

    return pad(a), pad(b)
