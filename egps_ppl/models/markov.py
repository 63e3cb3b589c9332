"""An exact tabular Markov language model: the next token depends only on the previous one.

Small enough to enumerate, so every sampler can be checked against exact probabilities; exact power-distribution
quantities (normaliser, sampler, marginals) live in :mod:`egps_ppl.models.exact`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch

from egps_ppl.errors import EGPSError, ModelFileError
from egps_ppl.models.base import Cost, LanguageModel, NextToken, next_token_stats, sample_from_cdf
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.rng import Generator, Streams
from egps_ppl.state import PAD, STAT_NAMES, Sequences

ROW_TOLERANCE = 1e-6


class MarkovLM(LanguageModel):
    """p(x_1 = v) = initial[v] (or transition[prompt[-1], v]), p(x_t = v | x_{t-1} = u) = transition[u, v].

    Parameters
    ----------
    initial:
        ``[V]`` probabilities of the first completion token when the prompt is empty.
    transition:
        ``[V, V]`` row-stochastic matrix.
    eos_token_id:
        The end-of-sequence token.
    name:
        Display name.

    Raises
    ------
    ModelFileError
        If ``initial`` or ``transition`` are not probability vectors/rows (within 1e-6), have the wrong shape, or
        ``eos_token_id`` is not a token.

    Examples
    --------
    >>> lm = MarkovLM([0.5, 0.5, 0.0], [[1.0, 0.0, 0.0], [0.5, 0.0, 0.5], [0.5, 0.25, 0.25]], eos_token_id=0)
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(lm, prompt=[], alpha=2.0, max_new_tokens=3)
    >>> seqs, _ = target.from_completions([[1, 2, 0], [1, 0]])
    >>> [round(p, 6) for p in seqs.log_p().exp().tolist()]
    [0.125, 0.25]

    The exact power distribution of the same model, by dynamic programming:

    >>> from egps_ppl.models.exact import ExactPower
    >>> exact = ExactPower(lm, alpha=2.0, max_new_tokens=3)
    >>> support, log_pi = exact.enumerate()
    >>> len(support), round(float(log_pi.exp().sum()), 6)
    (5, 1.0)
    """

    def __init__(
        self,
        initial: Sequence[float] | torch.Tensor,
        transition: Sequence[Sequence[float]] | torch.Tensor,
        eos_token_id: int,
        name: str = "markov",
    ) -> None:
        init = _as_float_tensor(initial, "initial")
        trans = _as_float_tensor(transition, "transition")
        vocab = init.shape[0] if init.dim() == 1 else -1
        if init.dim() != 1 or vocab < 2:
            raise ModelFileError("'initial' must be a list of at least 2 probabilities")
        if trans.shape != (vocab, vocab):
            raise ModelFileError(
                f"'transition' must be a {vocab}x{vocab} matrix (V from 'initial'), got {tuple(trans.shape)}"
            )
        _check_distribution(init.unsqueeze(0), "'initial'")
        _check_distribution(trans, "'transition'")
        if isinstance(eos_token_id, bool) or not isinstance(eos_token_id, int) or not 0 <= eos_token_id < vocab:
            raise ModelFileError(f"'eos' must be a token id in [0, {vocab}), got {eos_token_id!r}")
        self.name = name
        self.vocab_size = vocab
        self.eos_token_id = eos_token_id
        self.initial = init
        self.transition = trans
        with torch.no_grad():
            # Row V of the table is the "no previous token" state (empty prompt).
            self.log_table = torch.cat([trans, init.unsqueeze(0)]).log()
        self._stats_cache: dict[object, object] = {}

    # ------------------------------------------------------------ loading
    @classmethod
    def from_json(cls, path: str | Path) -> MarkovLM:
        """Load ``{"initial": [V], "transition": [[V] x V], "eos": id}``; malformed files raise clearly."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise ModelFileError(f"Markov model file not found: {path}") from None
        except IsADirectoryError:
            raise ModelFileError(f"Markov model path {path} is a directory, not a JSON file") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise ModelFileError(f"Markov model file {path} is not valid JSON: {exc}") from None
        if not isinstance(data, dict) or not {"initial", "transition", "eos"} <= set(data):
            raise ModelFileError(f"Markov model file {path} needs the keys 'initial', 'transition' and 'eos'")
        try:
            return cls(data["initial"], data["transition"], data["eos"], name=f"markov:{path}")
        except ModelFileError as exc:
            raise ModelFileError(f"{path}: {exc}") from None

    def to_json(self, path: str | Path) -> None:
        """Write the model as ``{"initial": [V], "transition": [[V] x V], "eos": id}`` (see :meth:`from_json`)."""
        Path(path).write_text(
            json.dumps(
                {"initial": self.initial.tolist(), "transition": self.transition.tolist(), "eos": self.eos_token_id}
            )
        )

    # ------------------------------------------------------------ statistics per state
    def state_stats(self, policy: PowerPolicy) -> NextToken:
        """Next-token statistics for every state (rows 0..V-1: previous token, row V: start)."""
        stats = self._stats_cache.get(policy)
        if stats is None:
            stats = next_token_stats(self.log_table, policy)
            self._stats_cache[policy] = stats
        return stats

    def _previous(self, seqs: Sequences, tokens: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """State index before position ``pos`` of each row (V = start of an empty prompt)."""
        rows, lengths = seqs.prompt_rows(), seqs.prompt_lengths
        first = torch.full_like(lengths, self.vocab_size)
        if rows.shape[1]:
            last = rows.gather(1, (lengths - 1).clamp(min=0).unsqueeze(1).to(rows.device)).squeeze(1)
            first = torch.where(lengths > 0, last.to(lengths.device), first)
        if pos.dim() == 2:
            first = first.unsqueeze(1)
        prev = tokens.gather(1, (pos - 1).clamp(min=0).unsqueeze(-1) if pos.dim() == 1 else (pos - 1).clamp(min=0))
        prev = prev.squeeze(-1) if pos.dim() == 1 else prev
        return torch.where(pos == 0, first.expand_as(prev), prev)

    # ------------------------------------------------------------ protocol
    def extend(
        self,
        seqs: Sequences,
        start: torch.Tensor,
        stop: torch.Tensor | int | None = None,
        generator: Generator = None,
    ) -> tuple[Sequences, Cost]:
        self._check_start(seqs, start)
        stop_t = self._stop_tensor(seqs, stop)
        out = seqs.truncated(start)
        stats, cdf = self.state_stats(seqs.policy), self._cdf(seqs.policy)
        # Work on full columns with one scratch column (index T) that inactive rows write into: no boolean
        # indexing in the loop, which matters with 10^5 chains.
        scratch = torch.zeros(seqs.num_rows, 1, dtype=torch.float64)
        tokens = torch.cat([out.tokens, torch.full_like(out.length, PAD).unsqueeze(1)], 1)
        columns = {name: torch.cat([getattr(out, name), scratch], 1) for name in ("logp", "logq", "entropy", "logz")}
        length = out.length.clone()
        prev = self._previous(out, out.tokens, length)
        active = ~out.finished() & (length < stop_t)
        decoded = torch.zeros_like(length)
        calls = 0
        while bool(active.any()):
            if isinstance(generator, Streams):  # only active rows draw, each from its own stream
                rows = active.nonzero().flatten()
                new = prev.clone()
                new[rows] = sample_from_cdf(
                    cdf[prev[rows]], generator, None if seqs.stream is None else seqs.stream[rows]
                )
            else:
                new = sample_from_cdf(cdf[prev], generator)
            slot = torch.where(active, length, seqs.capacity).unsqueeze(1)
            tokens.scatter_(1, slot, new.unsqueeze(1))
            columns["logp"].scatter_(1, slot, stats.logp[prev, new].unsqueeze(1))
            columns["logq"].scatter_(1, slot, stats.logq[prev, new].unsqueeze(1))
            columns["entropy"].scatter_(1, slot, stats.entropy[prev].unsqueeze(1))
            columns["logz"].scatter_(1, slot, stats.logz[prev].unsqueeze(1))
            length += active
            decoded += active
            prev = torch.where(active, new, prev)
            active = active & (new != self.eos_token_id) & (length < stop_t)
            calls += 1
        result = out.with_(tokens=tokens[:, :-1], length=length, **{k: v[:, :-1] for k, v in columns.items()})
        return result, Cost(decoded, torch.zeros_like(decoded), calls)

    def _cdf(self, policy: PowerPolicy) -> torch.Tensor:
        key = ("cdf", policy)
        cdf = self._stats_cache.get(key)
        if cdf is None:
            cdf = torch.cumsum(self.state_stats(policy).logq.exp(), dim=-1)
            self._stats_cache[key] = cdf
        return cdf

    def next_token_logprobs(self, seqs: Sequences) -> tuple[torch.Tensor, Cost, Sequences]:
        """Full next-token log-distributions of every row: rows of the transition table (no cost)."""
        state = self._previous(seqs, seqs.tokens, seqs.length)
        return self.log_table.to(torch.float64)[state], Cost.zero(seqs.num_rows, seqs.device), seqs

    def score(self, seqs: Sequences, start: torch.Tensor) -> tuple[Sequences, Cost]:
        self._check_start(seqs, start)
        stats = self.state_stats(seqs.policy)
        pos = seqs.positions().expand(seqs.num_rows, -1)
        mask = (pos >= start.unsqueeze(1)) & seqs.valid_mask()
        safe = torch.where(seqs.valid_mask(), seqs.tokens, torch.zeros_like(seqs.tokens))
        if (safe < 0).any() or (safe >= self.vocab_size).any():
            raise EGPSError(f"token ids must lie in [0, {self.vocab_size})")
        state = self._previous(seqs, safe, pos)
        zero = torch.zeros((), dtype=torch.float64)
        result = seqs.with_(
            logp=torch.where(mask, stats.logp[state, safe], seqs.logp),
            logq=torch.where(mask, stats.logq[state, safe], seqs.logq),
            entropy=torch.where(mask, stats.entropy[state], seqs.entropy),
            logz=torch.where(mask, stats.logz[state], seqs.logz),
            tokens=torch.where(seqs.valid_mask(), seqs.tokens, torch.full_like(seqs.tokens, PAD)),
        )
        valid = result.valid_mask()
        result = result.with_(**{name: torch.where(valid, getattr(result, name), zero) for name in STAT_NAMES})
        scored = mask.sum(1)
        return result, Cost(torch.zeros_like(scored), scored, 1)


def _as_float_tensor(value: object, name: str) -> torch.Tensor:
    try:
        tensor = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ModelFileError(f"{name!r} must be numbers (a list or a matrix of floats)") from None
    return tensor


def _check_distribution(rows: torch.Tensor, name: str) -> None:
    if not torch.isfinite(rows).all():
        raise ModelFileError(f"{name} contains NaN or infinite values")
    if (rows < 0).any():
        raise ModelFileError(f"{name} contains negative probabilities")
    sums = rows.sum(-1)
    bad = ((sums - 1).abs() > ROW_TOLERANCE).nonzero().flatten().tolist()
    if bad:
        raise ModelFileError(
            f"{name} rows must sum to 1 within {ROW_TOLERANCE:g}; row {bad[0]} sums to {sums[bad[0]].item():.8g}"
        )
