"""The unnormalised target: the sequence-level power distribution π(x) ∝ p(x | prompt)^α · exp(extra(x))."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from egps_ppl.errors import EGPSError, check_alpha, check_positive_int
from egps_ppl.models.base import Cost, LanguageModel, as_prompt_table, is_prompt_table
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences

LogFactor = Callable[[Sequences], torch.Tensor]
"""An extra log-factor: maps a batch of completions to ``float64[C]`` (a reward tilt, or -inf to forbid)."""


class PowerDistribution:
    """π(x) ∝ p(x | prompt)^α · exp(log_factor(x)) over completions of at most ``max_new_tokens`` tokens.

    The support is every sequence that ends in EOS within ``max_new_tokens`` tokens plus every sequence of
    exactly ``max_new_tokens`` tokens without EOS, so for a finite vocabulary π is a proper distribution.

    Given several prompts, the target is a *plate* over problems: independent power distributions, one per
    prompt, whose chains all advance in the same batch (``Sequences.problem`` says which prompt a row belongs
    to; rows are problem-major in :meth:`empty`). Every kernel works on it unchanged, since kernels act row by
    row.

    Parameters
    ----------
    lm:
        Any backend implementing :class:`egps_ppl.models.base.LanguageModel`.
    prompt:
        Token ids, or text (encoded with the model's tokenizer); or a list of such prompts (one problem each).
    alpha:
        The power, ``> 0`` (the papers use 4). ``alpha = 1`` is the base model itself.
    max_new_tokens:
        Maximum completion length ``T``.
    log_factor:
        Optional extra log-factor, e.g. ``lambda seqs: 2.0 * reward(seqs)``; new targets are one function.

    Raises
    ------
    EGPSError
        For a non-positive ``alpha``, ``max_new_tokens < 1``, an empty prompt where the model needs one, token ids
        outside the vocabulary, or a prompt plus ``max_new_tokens`` longer than the model's context window.

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> lm = random_markov(4, seed=0)
    >>> target = PowerDistribution(lm, prompt=[], alpha=4.0, max_new_tokens=5)
    >>> target.alpha
    4.0
    >>> seqs, _ = target.from_completions([[1, 0], [2, 3, 0]])
    >>> bool((target.log_prob(seqs) == 4.0 * seqs.log_p()).all())
    True
    >>> plate = PowerDistribution(lm, prompt=[[1], [2, 3], []], alpha=4.0, max_new_tokens=5)
    >>> plate.num_prompts, plate.empty(2).problem.tolist()
    (3, [0, 0, 1, 1, 2, 2])
    """

    def __init__(
        self,
        lm: LanguageModel,
        prompt: Sequence[int] | torch.Tensor | str,
        alpha: float,
        max_new_tokens: int,
        log_factor: LogFactor | None = None,
    ) -> None:
        self.lm = lm
        self.alpha = check_alpha(alpha)
        self.max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
        many = is_prompt_table(prompt) or (
            isinstance(prompt, Sequence) and not isinstance(prompt, str) and len(prompt) > 0
            and all(isinstance(p, str) for p in prompt)
        )  # fmt: skip
        self.prompts = [_prompt_ids(lm, p) for p in prompt] if many else [_prompt_ids(lm, prompt)]
        self.batched = many
        self.log_factor = log_factor
        # Validates every prompt (vocabulary, emptiness, context window) once, up front.
        self._table = as_prompt_table(self.prompts, lm.vocab_size) if many else self.prompts[0]
        lm.check_prompt(self._table, len(self.prompts) if many else 1, self.max_new_tokens)

    @property
    def num_prompts(self) -> int:
        """Problems (prompts) in the plate; 1 for a single prompt."""
        return len(self.prompts)

    @property
    def prompt(self) -> torch.Tensor:
        """``LongTensor[P]``: the prompt of a single-prompt target.

        Raises
        ------
        EGPSError
            For a target over several prompts (use :attr:`prompts`).
        """
        if self.batched:
            raise EGPSError(f"this target has {self.num_prompts} prompts; use target.prompts[i]")
        return self.prompts[0]

    def problem_target(self, index: int) -> PowerDistribution:
        """The single-prompt target of problem ``index`` (same model, α, length and log-factor)."""
        if not 0 <= index < self.num_prompts:
            raise EGPSError(f"problem {index} is outside the plate of {self.num_prompts} prompts")
        return PowerDistribution(self.lm, self.prompts[index], self.alpha, self.max_new_tokens, self.log_factor)

    def default_policy(self) -> PowerPolicy:
        """The low-temperature proposal q ∝ p^α used by the standard kernels."""
        return PowerPolicy(self.alpha)

    # ------------------------------------------------------------ densities
    def log_prob(self, seqs: Sequences) -> torch.Tensor:
        """Unnormalised log π of each row: ``α·log p(x) + log_factor(x)``.

        Parameters
        ----------
        seqs : Sequences
            A batch of completions of this target's prompt, with statistics.

        Returns
        -------
        torch.Tensor
            ``float64[C]``; ``-inf`` where the completion is impossible or forbidden by ``log_factor``.
        """
        value = self.alpha * seqs.log_p()
        if self.log_factor is not None:
            value = value + torch.as_tensor(self.log_factor(seqs), dtype=torch.float64, device=value.device)
        return value

    def potential(self, seqs: Sequences) -> torch.Tensor:
        """Pyro's convention: the negative unnormalised log density."""
        return -self.log_prob(seqs)

    # ------------------------------------------------------------ batches
    def empty(self, num_chains: int, policy: PowerPolicy | None = None, limit: int | None = None) -> Sequences:
        """``num_chains`` empty completions of the prompt (with the backend's prompt cache).

        Parameters
        ----------
        num_chains : int
            Rows of the batch.
        policy : PowerPolicy, optional
            Token policy of the batch (default :meth:`default_policy`).
        limit : int, optional
            Initial length limit (at most ``max_new_tokens``; the block-wise schedule starts below it).

        Returns
        -------
        Sequences
        """
        problems = torch.arange(self.num_prompts).repeat_interleave(num_chains) if self.batched else None
        return self.rows_for(problems, policy, limit, num_rows=num_chains)

    def rows_for(
        self,
        problems: Sequence[int] | torch.Tensor | None,
        policy: PowerPolicy | None = None,
        limit: int | None = None,
        num_rows: int | None = None,
    ) -> Sequences:
        """Empty completions of the given problems, one row each (used to refill a batch with new problems).

        Parameters
        ----------
        problems : sequence of int, torch.Tensor or None
            Problem index of each row; ``None`` for a single-prompt target (then ``num_rows`` rows).
        policy : PowerPolicy, optional
            Token policy of the batch (default :meth:`default_policy`).
        limit : int, optional
            Initial length limit.
        num_rows : int, optional
            Rows of a single-prompt target.

        Returns
        -------
        Sequences
        """
        policy = policy or self.default_policy()
        if problems is None:
            if self.batched:
                raise EGPSError("a target over several prompts needs the problem index of every row")
            rows = check_positive_int("num_rows", num_rows or 0)
            seqs = self.lm.start(self.prompt, rows, self.max_new_tokens, policy)
        else:
            index = torch.as_tensor(problems, dtype=torch.long).flatten()
            if index.numel() == 0 or index.min() < 0 or index.max() >= self.num_prompts:
                raise EGPSError(f"problem indices must lie in [0, {self.num_prompts}) and not be empty")
            table = self._table.unsqueeze(0) if not self.batched else self._table
            seqs = self.lm.start(table[index], index.numel(), self.max_new_tokens, policy).with_(problem=index)
        return seqs if limit is None else seqs.with_(limit=min(limit, self.max_new_tokens))

    def sample_proposal(
        self,
        num_chains: int,
        generator: torch.Generator | None = None,
        policy: PowerPolicy | None = None,
        limit: int | None = None,
    ) -> tuple[Sequences, Cost]:
        """Ancestral samples from the token policy (default: q ∝ p^α, i.e. low-temperature sampling).

        Parameters
        ----------
        num_chains : int
            How many completions to draw (in one batch).
        generator : torch.Generator, optional
            Source of randomness.
        policy : PowerPolicy, optional
            Token policy to sample from (default :meth:`default_policy`).
        limit : int, optional
            Stop at this length instead of ``max_new_tokens``.

        Returns
        -------
        (Sequences, Cost)
            The completions with their statistics, and the backend's cost counters.
        """
        seqs = self.empty(num_chains, policy, limit)
        return self.lm.extend(seqs, torch.zeros(seqs.num_rows, dtype=torch.long), generator=generator)

    def from_completions(
        self,
        completions: Sequence[Sequence[int]],
        policy: PowerPolicy | None = None,
        problems: Sequence[int] | torch.Tensor | None = None,
    ) -> tuple[Sequences, Cost]:
        """Score given completions (one list of token ids per chain).

        Parameters
        ----------
        completions : sequence of sequences of int
            Completion token ids, one list per row (EOS, if any, last).
        policy : PowerPolicy, optional
            Token policy for ``logq``/``logz`` (default :meth:`default_policy`).
        problems : sequence of int, optional
            The problem of each completion (required for a target over several prompts).

        Returns
        -------
        (Sequences, Cost)

        Raises
        ------
        EGPSError
            For an empty completion, one longer than ``max_new_tokens``, unknown token ids or EOS before the end.
        """
        policy = policy or self.default_policy()
        if not self.batched:
            return self.lm.from_tokens(self.prompt, completions, self.max_new_tokens, policy)
        if problems is None or len(problems) != len(completions):
            raise EGPSError("a target over several prompts needs the problem index of every completion")
        index = torch.as_tensor(problems, dtype=torch.long)
        if index.min() < 0 or index.max() >= self.num_prompts:
            raise EGPSError(f"problem indices must lie in [0, {self.num_prompts})")
        seqs, cost = self.lm.from_tokens(self._table[index], completions, self.max_new_tokens, policy)
        return seqs.with_(problem=index), cost

    def describe(self) -> str:
        """A one-line description: model, α and ``max_new_tokens``."""
        prompts = f", prompts={self.num_prompts}" if self.batched else ""
        return (
            f"PowerDistribution(model={self.lm.name}, alpha={self.alpha:g}, "
            f"max_new_tokens={self.max_new_tokens}{prompts})"
        )


def _prompt_ids(lm: LanguageModel, prompt: Sequence[int] | torch.Tensor | str) -> torch.Tensor:
    """One prompt as ``LongTensor[P]`` (text encoded with the model's tokenizer)."""
    if isinstance(prompt, str):
        if not prompt:
            raise EGPSError("the prompt is empty; pass some text or token ids")
        prompt = lm.encode(prompt)
    return torch.as_tensor(list(prompt) if not torch.is_tensor(prompt) else prompt, dtype=torch.long)
