"""The unnormalised target: the sequence-level power distribution π(x) ∝ p(x | prompt)^α · exp(extra(x))."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from egps_ppl.errors import EGPSError, check_alpha, check_positive_int
from egps_ppl.models.base import Cost, LanguageModel
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences

LogFactor = Callable[[Sequences], torch.Tensor]
"""An extra log-factor: maps a batch of completions to ``float64[C]`` (a reward tilt, or -inf to forbid)."""


class PowerDistribution:
    """π(x) ∝ p(x | prompt)^α · exp(log_factor(x)) over completions of at most ``max_new_tokens`` tokens.

    The support is every sequence that ends in EOS within ``max_new_tokens`` tokens plus every sequence of
    exactly ``max_new_tokens`` tokens without EOS, so for a finite vocabulary π is a proper distribution.

    Parameters
    ----------
    lm:
        Any backend implementing :class:`egps_ppl.models.base.LanguageModel`.
    prompt:
        Token ids, or text (encoded with the model's tokenizer).
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
        if isinstance(prompt, str):
            if not prompt:
                raise EGPSError("the prompt is empty; pass some text or token ids")
            prompt = lm.encode(prompt)
        self.prompt = torch.as_tensor(list(prompt) if not torch.is_tensor(prompt) else prompt, dtype=torch.long)
        self.log_factor = log_factor
        # Validates the prompt (vocabulary, emptiness, context window) once, up front.
        lm.start(self.prompt, 1, self.max_new_tokens, self.default_policy())

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
        seqs = self.lm.start(self.prompt, num_chains, self.max_new_tokens, policy or self.default_policy())
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
        return self.lm.extend(seqs, torch.zeros(num_chains, dtype=torch.long), generator=generator)

    def from_completions(
        self, completions: Sequence[Sequence[int]], policy: PowerPolicy | None = None
    ) -> tuple[Sequences, Cost]:
        """Score given completions (one list of token ids per chain).

        Parameters
        ----------
        completions : sequence of sequences of int
            Completion token ids, one list per row (EOS, if any, last).
        policy : PowerPolicy, optional
            Token policy for ``logq``/``logz`` (default :meth:`default_policy`).

        Returns
        -------
        (Sequences, Cost)

        Raises
        ------
        EGPSError
            For an empty completion, one longer than ``max_new_tokens``, unknown token ids or EOS before the end.
        """
        return self.lm.from_tokens(self.prompt, completions, self.max_new_tokens, policy or self.default_policy())

    def describe(self) -> str:
        """A one-line description: model, α and ``max_new_tokens``."""
        return f"PowerDistribution(model={self.lm.name}, alpha={self.alpha:g}, max_new_tokens={self.max_new_tokens})"
