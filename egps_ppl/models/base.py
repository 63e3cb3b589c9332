"""The protocol every language-model backend implements.

Two batched primitives, each returning per-token statistics (see :class:`egps_ppl.state.Sequences`):

* ``extend(seqs, start, stop, generator)`` keeps each row's first ``start`` tokens and samples the positions
  ``start <= t < stop`` from the row's token policy, stopping a row after EOS;
* ``score(seqs, start)`` teacher-forces the given tokens and recomputes the statistics from ``start`` on.

Backends reuse what they can (a KV cache of the kept prefix), so a move that cuts at position i costs about
``n - i`` decode steps, not ``n``. Both return a :class:`Cost` with per-row token counts.
"""

from __future__ import annotations

import operator
from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from egps_ppl.errors import EGPSError, NumericalError, check_positive_int
from egps_ppl.models.policy import PowerPolicy, exp_flushed
from egps_ppl.rng import Generator, uniform
from egps_ppl.state import PAD, RowCache, Sequences


@dataclass
class Cost:
    """Compute spent by one backend call (or a sum of them); ``+`` adds two costs.

    Attributes
    ----------
    decode_tokens : torch.Tensor
        ``long[C]``, tokens sampled one after another (sequential decode steps) per row.
    scored_tokens : torch.Tensor
        ``long[C]``, tokens run through the model in parallel (teacher forcing) per row.
    forward_calls : int
        Batched forward calls (shared by all rows).
    """

    decode_tokens: torch.Tensor  # LongTensor[C]: tokens sampled one after another
    scored_tokens: torch.Tensor  # LongTensor[C]: tokens run through the model in parallel (teacher forcing)
    forward_calls: int = 0

    @classmethod
    def zero(cls, num_rows: int, device: torch.device | str = "cpu") -> Cost:
        """No compute for ``num_rows`` rows."""
        z = torch.zeros(num_rows, dtype=torch.long, device=device)
        return cls(z, z.clone(), 0)

    def __add__(self, other: Cost) -> Cost:
        return Cost(
            self.decode_tokens + other.decode_tokens,
            self.scored_tokens + other.scored_tokens,
            self.forward_calls + other.forward_calls,
        )


@dataclass
class NextToken:
    """Statistics of the next-token distributions at a batch of histories.

    Attributes
    ----------
    logp : torch.Tensor
        ``[..., V]`` base log-probabilities (float32 or float64).
    logq : torch.Tensor
        ``[..., V]`` policy log-probabilities (``-inf`` outside a truncated policy's kept set).
    entropy : torch.Tensor
        ``[...]`` Shannon entropy of p, in nats.
    logz : torch.Tensor
        ``[...]`` ``log Σ_kept p^alpha``.
    """

    logp: torch.Tensor  # [..., V] base log-probabilities (float32 or float64)
    logq: torch.Tensor  # [..., V] policy log-probabilities
    entropy: torch.Tensor  # [...] Shannon entropy of p
    logz: torch.Tensor  # [...] log Σ_kept p^alpha


def next_token_stats(logits: torch.Tensor, policy: PowerPolicy) -> NextToken:
    """Turn raw logits into :class:`NextToken` statistics, in at least float32.

    Parameters
    ----------
    logits : torch.Tensor
        ``[..., V]`` raw logits in any float dtype (bf16/fp16 are upcast to float32).
    policy : PowerPolicy
        The token policy for ``logq`` and ``logz``.

    Returns
    -------
    NextToken

    Raises
    ------
    NumericalError
        On NaN or +inf logits, or a row with no finite logit.

    Examples
    --------
    >>> stats = next_token_stats(torch.log(torch.tensor([[0.5, 0.5, 0.0]])), PowerPolicy(2.0))
    >>> stats.logq.exp().tolist(), round(stats.entropy.item(), 4)
    ([[0.5, 0.5, 0.0]], 0.6931)
    """
    if logits.dtype not in (torch.float32, torch.float64):
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    probs = exp_flushed(logp)
    # 0 * log 0 = 0: a finite floor on log p keeps -inf out of the product (p is 0 wherever it bites).
    entropy = -(probs * logp.clamp(min=-1e30)).sum(-1)
    # A NaN or +inf logit, or a row with no finite one, makes its whole row of log p NaN, so its entropy: one check
    # on [...] values instead of three passes over [..., V].
    if torch.isnan(entropy).any():
        if torch.isnan(logits).any() or torch.isposinf(logits).any():
            raise NumericalError("the model returned NaN or +inf logits; check the weights and dtype")
        raise NumericalError("the model returned a row of logits that are all -inf")
    logq, logz = policy.apply(logp)
    return NextToken(logp, logq, entropy, logz)


def sample_tokens(logq: torch.Tensor, generator: Generator, streams: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row from ``exp(logq[C, V])`` by inverting the CDF (zero-probability tokens never come out)."""
    return sample_from_cdf(torch.cumsum(exp_flushed(logq), dim=-1), generator, streams)


def sample_from_cdf(cdf: torch.Tensor, generator: Generator, streams: torch.Tensor | None = None) -> torch.Tensor:
    """One draw per row given unnormalised cumulative weights ``cdf[C, V]`` (row ``c`` from stream ``streams[c]``
    when ``generator`` is a :class:`~egps_ppl.rng.Streams`)."""
    u = uniform(generator, cdf.shape[0], streams, dtype=cdf.dtype).to(cdf.device)
    draws = torch.searchsorted(cdf, (u * cdf[:, -1]).unsqueeze(1), right=True).squeeze(1)
    # Rounding can put u * total at the total itself: fall back to the last token with positive weight.
    last_positive = (cdf < cdf[:, -1:]).sum(1)
    return torch.minimum(draws, last_positive)


def as_prompt(prompt: Sequence[int] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Validate token ids and return them as a 1-D LongTensor."""
    ids = torch.as_tensor(list(prompt) if not torch.is_tensor(prompt) else prompt, dtype=torch.long)
    if ids.dim() != 1:
        raise EGPSError("a prompt must be a flat list of token ids")
    if ids.numel() and (ids.min() < 0 or ids.max() >= vocab_size):
        raise EGPSError(f"prompt token ids must lie in [0, {vocab_size}); got {ids.min()}..{ids.max()}")
    return ids


def is_prompt_table(prompt: object) -> bool:
    """Whether ``prompt`` holds one prompt per row (a 2-D tensor, or a list of token-id lists)."""
    if torch.is_tensor(prompt):
        return prompt.dim() == 2
    if isinstance(prompt, (str, bytes)) or not isinstance(prompt, Sequence) or not len(prompt):
        return False
    return all(torch.is_tensor(p) or (isinstance(p, Sequence) and not isinstance(p, str)) for p in prompt)


def as_prompt_table(prompts: Sequence[Sequence[int]] | torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Validate one prompt per row and return them as ``LongTensor[C, P]``, right-padded with ``PAD``.

    Parameters
    ----------
    prompts : sequence of sequences of int, or torch.Tensor
        One list of token ids per row, or a ``[C, P]`` tensor already padded with ``PAD``.
    vocab_size : int
        Ids must lie in ``[0, vocab_size)``.

    Returns
    -------
    torch.Tensor

    Examples
    --------
    >>> as_prompt_table([[1, 2, 3], [4]], vocab_size=8).tolist()
    [[1, 2, 3], [4, -1, -1]]
    """
    if torch.is_tensor(prompts):
        table = prompts.to(torch.long)
        if table.dim() != 2:
            raise EGPSError("a prompt table must be 2-D: one row of token ids per chain")
        rows = [row[row != PAD] for row in table]
    else:
        rows = [as_prompt(p, vocab_size) for p in prompts]
    for i, row in enumerate(rows):
        if row.numel() and (row.min() < 0 or row.max() >= vocab_size):
            raise EGPSError(f"prompt {i}: token ids must lie in [0, {vocab_size}); got {row.min()}..{row.max()}")
    width = max((r.numel() for r in rows), default=0)
    table = torch.full((len(rows), width), PAD, dtype=torch.long)
    for i, row in enumerate(rows):
        table[i, : row.numel()] = row
    return table


def _is_index(value: object) -> bool:
    """True for Python and NumPy integers (not bools, not floats)."""
    if isinstance(value, bool):
        return False
    try:
        operator.index(value)
    except TypeError:
        return False
    return True


class LanguageModel(ABC):
    """A next-token distribution with batched sampling and scoring.

    Subclasses set ``name``, ``vocab_size``, ``eos_token_id`` and ``context_length`` (``None`` if unbounded),
    and implement :meth:`extend` and :meth:`score`. A backend that keeps a cache (e.g. of keys and values) stores
    it in ``Sequences.cache`` as a :class:`~egps_ppl.state.RowCache`, so rows selected or merged by
    ``Sequences.take`` / ``Sequences.where`` carry it along.
    """

    name: str = "model"
    vocab_size: int
    eos_token_id: int | None
    context_length: int | None = None
    requires_prompt: bool = False

    # ------------------------------------------------------------ text (optional)
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (backends without a tokenizer raise :class:`~egps_ppl.errors.EGPSError`)."""
        raise EGPSError(f"model {self.name!r} has no tokenizer; pass token ids instead of text")

    def decode(self, ids: Sequence[int]) -> str:
        """Text of token ids (backends without a tokenizer join the ids with spaces)."""
        return " ".join(str(i) for i in ids)

    @property
    def has_chat_template(self) -> bool:
        """Whether :meth:`encode_chat` can wrap messages in a chat template (``False`` for backends without one)."""
        return False

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of chat ``messages`` (``{"role": ..., "content": ...}`` dicts) through the model's chat
        template, ending where the assistant's reply starts.

        Raises
        ------
        EGPSError
            When the model has no chat template (see :attr:`has_chat_template`): encode the text with
            :meth:`encode` instead.
        """
        raise EGPSError(f"model {self.name!r} has no chat template; encode the prompt as plain text (--no-chat)")

    # ------------------------------------------------------------ batches
    def start(
        self,
        prompt: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        num_rows: int,
        capacity: int,
        policy: PowerPolicy,
    ) -> Sequences:
        """Empty completions of ``prompt`` (validated against the vocabulary and the context window).

        Parameters
        ----------
        prompt : sequence of int, sequence of sequences of int, or torch.Tensor
            Prompt token ids shared by all rows, or one prompt per row (a list of ``num_rows`` id lists, or a
            ``[num_rows, P]`` tensor right-padded with ``PAD``): a batch over problems.
        num_rows : int
            Rows (chains) of the batch.
        capacity : int
            ``max_new_tokens``.
        policy : PowerPolicy
            Token policy of the batch.

        Returns
        -------
        Sequences

        Raises
        ------
        EGPSError
            For ids outside the vocabulary, an empty prompt where the model needs one, or a prompt plus
            ``capacity`` longer than the context window.
        """
        ids = self.check_prompt(prompt, num_rows, capacity)
        return Sequences.empty(ids, num_rows, capacity, policy, self.eos_token_id, self._prompt_cache(ids, num_rows))

    def check_prompt(
        self, prompt: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor, num_rows: int, capacity: int
    ) -> torch.Tensor:
        """Validate a prompt (or one prompt per row) as :meth:`start` does, without computing any cache.

        Returns
        -------
        torch.Tensor
            ``LongTensor[P]``, or ``LongTensor[num_rows, P]`` right-padded with ``PAD``.

        Raises
        ------
        EGPSError
            As :meth:`start`.
        """
        check_positive_int("num_rows", num_rows)
        check_positive_int("max_new_tokens", capacity)
        if is_prompt_table(prompt):
            ids = as_prompt_table(prompt, self.vocab_size)
            if ids.shape[0] != num_rows:
                raise EGPSError(f"got {ids.shape[0]} prompts for {num_rows} rows; give one per row")
            lengths = (ids != PAD).sum(1)
        else:
            ids = as_prompt(prompt, self.vocab_size)
            lengths = torch.tensor([ids.numel()])
        if self.requires_prompt and bool((lengths == 0).any()):
            raise EGPSError(f"model {self.name!r} needs a non-empty prompt")
        longest = int(lengths.max())
        if self.context_length is not None and longest + capacity > self.context_length:
            raise EGPSError(
                f"prompt ({longest} tokens) + max_new_tokens ({capacity}) exceeds the context window of "
                f"{self.name!r} ({self.context_length} tokens)"
            )
        return ids

    def _prompt_cache(self, prompt: torch.Tensor, num_rows: int) -> RowCache | None:
        """Backend cache for ``num_rows`` rows of ``prompt`` (``[P]`` shared or ``[C, P]`` per row; ``None`` if
        the backend keeps none)."""
        return None

    def from_tokens(
        self,
        prompt: Sequence[int] | Sequence[Sequence[int]] | torch.Tensor,
        completions: Sequence[Sequence[int]],
        capacity: int,
        policy: PowerPolicy,
    ) -> tuple[Sequences, Cost]:
        """Score given completions (e.g. ``--init`` lines) into a batch with statistics.

        Parameters
        ----------
        prompt : sequence of int, sequence of sequences of int, or torch.Tensor
            Prompt token ids, shared or one prompt per completion (see :meth:`start`).
        completions : sequence of sequences of int
            One list of completion ids per row.
        capacity : int
            ``max_new_tokens``.
        policy : PowerPolicy
            Token policy for ``logq``/``logz``.

        Returns
        -------
        (Sequences, Cost)

        Raises
        ------
        EGPSError
            For an empty or too long completion, unknown ids, or EOS before the last token.
        """
        seqs = self.start(prompt, len(completions), capacity, policy)
        tokens = seqs.tokens.clone()
        for row, ids in enumerate(completions):
            ids = list(ids)
            if not ids:
                raise EGPSError(f"initial completion {row} is empty")
            if len(ids) > capacity:
                raise EGPSError(f"initial completion {row} has {len(ids)} tokens > max_new_tokens={capacity}")
            bad = [t for t in ids if not (_is_index(t) and 0 <= int(t) < self.vocab_size)]
            if bad:
                raise EGPSError(f"initial completion {row} has unknown token ids {bad[:5]}")
            if self.eos_token_id is not None and self.eos_token_id in ids[:-1]:
                raise EGPSError(f"initial completion {row} has EOS before its last token")
            tokens[row, : len(ids)] = torch.tensor([int(t) for t in ids], dtype=torch.long)
        length = torch.tensor([len(list(c)) for c in completions], dtype=torch.long)
        return self.score(seqs.with_(tokens=tokens, length=length), torch.zeros_like(length))

    def with_policy(self, seqs: Sequences, policy: PowerPolicy) -> tuple[Sequences, Cost]:
        """``seqs`` with ``logq``/``logz`` under ``policy`` (rescored only if the policy differs)."""
        if seqs.policy == policy:
            return seqs, Cost.zero(seqs.num_rows, seqs.device)
        return self.score(seqs.with_(policy=policy), torch.zeros_like(seqs.length))

    @abstractmethod
    def extend(
        self,
        seqs: Sequences,
        start: torch.Tensor,
        stop: torch.Tensor | int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Sequences, Cost]:
        """Keep each row's first ``start`` tokens and sample positions ``start <= t < stop`` (default
        ``seqs.limit``) from ``seqs.policy``; a row stops after EOS. Rows whose kept prefix ends in EOS are
        left as they are."""

    @abstractmethod
    def score(self, seqs: Sequences, start: torch.Tensor) -> tuple[Sequences, Cost]:
        """Recompute the statistics of positions ``start <= t < length`` by teacher forcing."""

    def next_token_logprobs(self, seqs: Sequences) -> tuple[torch.Tensor, Cost, Sequences]:
        """Full next-token log-distributions ``log p(· | prompt, tokens[r, :length[r]])`` of every row.

        Optional: samplers that need whole distributions (token-level Scalable Power Sampling) call it; the
        MCMC kernels never do.

        Returns
        -------
        logp : torch.Tensor
            ``float64[R, V]`` on the CPU.
        cost : Cost
            Tokens fed to get the distributions (counted as scored tokens).
        seqs : Sequences
            The rows, with the backend cache advanced where there is one.

        Raises
        ------
        EGPSError
            If the backend does not expose full distributions.
        """
        raise EGPSError(f"backend {type(self).__name__} does not expose full next-token distributions")

    # ------------------------------------------------------------ helpers for subclasses
    @staticmethod
    def _stop_tensor(seqs: Sequences, stop: torch.Tensor | int | None) -> torch.Tensor:
        limit = seqs.limit_rows()
        if stop is None:
            return limit.clone()
        stop_t = torch.as_tensor(stop, dtype=torch.long, device=seqs.device).expand(seqs.num_rows).clone()
        return torch.minimum(stop_t, limit)

    @staticmethod
    def _check_start(seqs: Sequences, start: torch.Tensor) -> None:
        if (start < 0).any() or (start > seqs.length).any():
            raise EGPSError("extend/score: start must lie in [0, length] for every row")


__all__ = [
    "PAD",
    "Cost",
    "LanguageModel",
    "NextToken",
    "PowerPolicy",
    "as_prompt",
    "next_token_stats",
    "sample_from_cdf",
    "sample_tokens",
]
