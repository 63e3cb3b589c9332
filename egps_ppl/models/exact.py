"""Exact power-distribution quantities for a :class:`MarkovLM`, by dynamic programming.

For a tabular Markov model the target ``π(x) ∝ p(x)^α`` over the finite completion set (sequences that end in
EOS with length ``<= T``, plus length-``T`` sequences without EOS) is computable exactly:

* backward messages give the normaliser and an exact i.i.d. sampler,
* forward-backward gives the marginals (length, final token, per position, expected visits),
* brute-force enumeration (small models only) checks all of the above in tests.

These are the ground truth that every MCMC kernel is tested against.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from egps_ppl.errors import EGPSError, check_alpha, check_positive_int
from egps_ppl.models.base import as_prompt
from egps_ppl.models.markov import MarkovLM
from egps_ppl.state import PAD

NEG_INF = -math.inf


def _check_model(model: object) -> MarkovLM:
    if not isinstance(model, MarkovLM):
        raise EGPSError(f"exact power quantities need a MarkovLM, got {type(model).__name__}")
    return model


def _start_log_probs(model: MarkovLM, prompt: torch.Tensor) -> torch.Tensor:
    """``float64[V]`` log-distribution of the first completion token after ``prompt``."""
    row = int(prompt[-1]) if prompt.numel() else model.vocab_size  # row V of log_table is the empty-prompt start
    return model.log_table[row].to(torch.float64)


def enumerate_completions(
    model: MarkovLM,
    max_new_tokens: int,
    prompt: Sequence[int] | torch.Tensor = (),
    max_count: int = 1_000_000,
) -> tuple[list[tuple[int, ...]], torch.Tensor]:
    """All completions with ``p > 0`` and their log-probabilities, by brute force.

    Parameters
    ----------
    model:
        The Markov model.
    max_new_tokens:
        ``T``: completions end in EOS with length ``<= T``, or have length ``T`` without EOS.
    prompt:
        Prompt token ids; only the last one matters (empty: the first token follows ``model.initial``).
    max_count:
        Raise :class:`EGPSError` rather than build more than this many completions.

    Returns
    -------
    completions:
        The completions as tuples of token ids (shorter ones first).
    log_p:
        ``float64[len(completions)]``, ``log p(x | prompt)``; these sum (in probability) to 1.
    """
    model = _check_model(model)
    check_positive_int("max_new_tokens", max_new_tokens)
    check_positive_int("max_count", max_count)
    ids = as_prompt(prompt, model.vocab_size)
    eos = model.eos_token_id
    log_trans = model.log_table[: model.vocab_size].to(torch.float64)
    done: list[tuple[int, ...]] = []
    done_logp: list[torch.Tensor] = []
    frontier: list[tuple[int, ...]] = [()]
    frontier_logp = torch.zeros(1, dtype=torch.float64)
    for t in range(max_new_tokens):
        if t == 0:
            rows = _start_log_probs(model, ids).unsqueeze(0)
        else:
            rows = log_trans[torch.tensor([seq[-1] for seq in frontier], dtype=torch.long)]
        cand = frontier_logp.unsqueeze(1) + rows
        parent, token = torch.nonzero(cand > NEG_INF, as_tuple=True)
        values = cand[parent, token]
        ends = (token == eos) | (t == max_new_tokens - 1)
        # Every open prefix yields at least one completion later, so this bound is known now.
        if len(done) + len(parent) > max_count:
            raise EGPSError(
                f"more than {max_count} completions with p > 0 (max_new_tokens={max_new_tokens}); "
                "enumerate only small models"
            )
        parents, tokens, end_list = parent.tolist(), token.tolist(), ends.tolist()
        next_frontier: list[tuple[int, ...]] = []
        for f, v, end in zip(parents, tokens, end_list, strict=True):
            seq = (*frontier[f], v)
            (done if end else next_frontier).append(seq)
        done_logp.append(values[ends])
        frontier, frontier_logp = next_frontier, values[~ends]
        if not frontier:
            break
    return done, torch.cat(done_logp)


class ExactPower:
    """Exact ``π(x) ∝ p(x | prompt)^α`` of a :class:`MarkovLM` over completions of at most ``T`` tokens.

    Parameters
    ----------
    model:
        The Markov model.
    alpha:
        The power ``α > 0`` (``α = 1`` is the base distribution).
    max_new_tokens:
        ``T >= 1``.
    prompt:
        Prompt token ids; the first completion token follows ``transition[prompt[-1]]`` (or ``initial`` when
        the prompt is empty).

    Attributes
    ----------
    log_normalizer:
        ``log Σ_x p(x)^α`` over the completion set.

    Notes
    -----
    With ``A(s, v) = α log p(v | s)`` the backward messages are ``β_0(s) = 0`` and
    ``β_k(s) = logsumexp_v [A(s, v) + (v == EOS ? 0 : β_{k-1}(v))]`` (``k`` tokens still allowed), so
    ``log_normalizer = β_T(start)`` and ``π(v | s, k) = exp(A(s, v) + β_{k-1}(v) - β_k(s))``. Everything is in
    float64 log space, so there is no underflow for ``T`` in the hundreds.
    """

    def __init__(
        self,
        model: MarkovLM,
        alpha: float,
        max_new_tokens: int,
        prompt: Sequence[int] | torch.Tensor = (),
    ) -> None:
        self.model = _check_model(model)
        self.alpha = check_alpha(alpha)
        self.max_new_tokens = check_positive_int("max_new_tokens", max_new_tokens)
        self.prompt = as_prompt(prompt, model.vocab_size)
        self.vocab_size = model.vocab_size
        self.eos_token_id = model.eos_token_id
        self._log_start = _start_log_probs(model, self.prompt)
        self._log_trans = model.log_table[: model.vocab_size].to(torch.float64)
        # α·(-inf) stays -inf for α > 0, so impossible transitions keep zero weight.
        self._a_start = self.alpha * self._log_start
        self._a_trans = self.alpha * self._log_trans
        self._tail = self._backward()
        self.log_normalizer = float(torch.logsumexp(self._a_start + self._tail[-1], dim=0))
        self._positions: torch.Tensor | None = None

    # ------------------------------------------------------------------ dynamic programming
    def _backward(self) -> torch.Tensor:
        """``float64[T, V]``: row ``j`` is the log weight of all continuations after emitting token ``v`` when
        ``j`` more tokens are allowed (``β_j(v)``; 0 for EOS, which ends the sequence)."""
        T, V, eos = self.max_new_tokens, self.vocab_size, self.eos_token_id
        tail = torch.zeros(T, V, dtype=torch.float64)
        for j in range(1, T):
            row = torch.logsumexp(self._a_trans + tail[j - 1].unsqueeze(0), dim=1)
            row[eos] = 0.0
            tail[j] = row
        return tail

    def _forward(self) -> torch.Tensor:
        """``float64[T, V]``: row ``t`` is the log weight of all prefixes of length ``t + 1`` ending in ``v``
        with no EOS before position ``t``."""
        T, V, eos = self.max_new_tokens, self.vocab_size, self.eos_token_id
        fwd = torch.empty(T, V, dtype=torch.float64)
        fwd[0] = self._a_start
        for t in range(1, T):
            prev = fwd[t - 1].clone()
            prev[eos] = NEG_INF  # a sequence does not continue after EOS
            fwd[t] = torch.logsumexp(prev.unsqueeze(1) + self._a_trans, dim=0)
        return fwd

    # ------------------------------------------------------------------ densities
    def log_prob(self, tokens: torch.Tensor, length: torch.Tensor) -> torch.Tensor:
        """Exact ``log π(x)`` of a batch of completions.

        Parameters
        ----------
        tokens:
            ``LongTensor[N, W]`` completion tokens, padded with ``-1`` past ``length``.
        length:
            ``LongTensor[N]`` number of tokens of each row.

        Returns
        -------
        ``float64[N]``; ``-inf`` for rows outside the support (empty, longer than ``T``, EOS before the last
        token, no EOS but shorter than ``T``, or a zero-probability transition).
        """
        tokens = torch.as_tensor(tokens, dtype=torch.long).cpu()
        length = torch.as_tensor(length, dtype=torch.long).cpu()
        if tokens.dim() != 2 or length.shape != (tokens.shape[0],):
            raise EGPSError(
                f"log_prob needs tokens[N, W] and length[N]; got {tuple(tokens.shape)} and {tuple(length.shape)}"
            )
        T, V, eos = self.max_new_tokens, self.vocab_size, self.eos_token_id
        N, W = tokens.shape
        if ((length > W) & (length <= T)).any():
            raise EGPSError(f"a length exceeds the width of tokens ({W})")
        in_support = (length >= 1) & (length <= T)
        if W == 0:
            return torch.full((N,), NEG_INF, dtype=torch.float64)
        pos = torch.arange(W).unsqueeze(0)
        # Rows of impossible length are simply outside the support; only the others must hold valid ids.
        valid = (pos < length.unsqueeze(1)) & in_support.unsqueeze(1)
        if ((tokens < 0) | (tokens >= V))[valid].any():
            raise EGPSError(f"token ids must lie in [0, {V}) within each row's length")
        is_eos = (tokens == eos) & valid
        in_support &= ~(is_eos & (pos < length.unsqueeze(1) - 1)).any(1)
        last = tokens.gather(1, (length - 1).clamp(0, W - 1).unsqueeze(1)).squeeze(1)
        in_support &= (last == eos) | (length == T)
        safe = torch.where(valid, tokens, torch.zeros_like(tokens))
        score = self._a_start[safe[:, 0]]
        if W > 1:
            steps = self._a_trans[safe[:, :-1], safe[:, 1:]]
            score = score + torch.where(valid[:, 1:], steps, torch.zeros((), dtype=torch.float64)).sum(1)
        return torch.where(in_support, score - self.log_normalizer, torch.full_like(score, NEG_INF))

    # ------------------------------------------------------------------ sampling
    def sample(self, num: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Exact i.i.d. draws from ``π``, all rows at once.

        Position ``t`` (``k = T - t`` tokens still allowed) is drawn from
        ``π(v | s, k) ∝ p(v | s)^α exp(β_{k-1}(v))`` by inverting the conditional CDF with one uniform per row.

        Parameters
        ----------
        num:
            Number of draws.
        generator:
            Optional CPU random generator for reproducibility.

        Returns
        -------
        tokens:
            ``LongTensor[num, T]``, padded with ``-1`` past each row's length.
        length:
            ``LongTensor[num]``.
        """
        check_positive_int("num", num)
        T, V, eos = self.max_new_tokens, self.vocab_size, self.eos_token_id
        start, finished = V, V + 1  # extra states: before the first token, and after the last
        uniform = torch.rand(T, num, 1, dtype=torch.float64, generator=generator)
        tokens = torch.full((num, T), PAD, dtype=torch.long)
        state = torch.full((num,), start, dtype=torch.long)
        # Build the CDF tables a chunk of steps at a time: few large tensor ops rather than many tiny ones.
        chunk = max(1, (1 << 22) // ((V + 2) * V))
        for t0 in range(0, T, chunk):
            cdf, last = self._step_tables(t0, min(T, t0 + chunk))
            for i in range(cdf.shape[0]):
                t = t0 + i
                # index_select rather than advanced indexing: much cheaper for small tables on a busy CPU.
                new = torch.searchsorted(cdf[i].index_select(0, state), uniform[t], right=True).squeeze(1)
                # Rounding can leave the CDF just below 1: give that sliver to the last possible token.
                new = torch.minimum(new, last[i].index_select(0, state))
                done = state == finished
                tokens[:, t] = torch.where(done, PAD, new)
                state = torch.where(done | (new == eos), finished, new)
                if bool((state == finished).all()):
                    return tokens, (tokens != PAD).sum(1)
        return tokens, (tokens != PAD).sum(1)

    def _step_tables(self, t0: int, t1: int) -> tuple[torch.Tensor, torch.Tensor]:
        """CDFs ``[t1 - t0, V + 2, V]`` of ``π(x_t | state)`` for ``t0 <= t < t1`` (state rows: the previous token,
        then start, then an unused row for finished sequences), and the last token of positive probability."""
        T, V = self.max_new_tokens, self.vocab_size
        # After position t, T - 1 - t tokens remain: backward row T-1-t.
        after = self._tail[T - t1 : T - t0].flip(0).unsqueeze(1)  # [n, 1, V]
        rows = torch.cat([self._a_trans, self._a_start.unsqueeze(0), torch.zeros(1, V, dtype=torch.float64)])
        probs = torch.softmax(rows.unsqueeze(0) + after, dim=-1)
        positive = torch.where(probs > 0, torch.arange(V), torch.full((), -1, dtype=torch.long))
        return probs.cumsum(-1), positive.max(-1).values

    # ------------------------------------------------------------------ conditionals along a completion
    def conditional_log_probs(self, completion: Sequence[int] | torch.Tensor) -> torch.Tensor:
        """Exact next-token conditionals of ``π`` along one completion.

        Row ``t`` is ``log π(x_t = v | prompt, x_<t)`` for every ``v``:
        ``α log p(v | x_{t-1}) + β_{T-1-t}(v) - β_{T-t}(x_{t-1})``, i.e. the base conditional raised to ``α`` and
        reweighted by the future normaliser ``Z(h v) / Z(h)`` (the same messages as :meth:`sample`).

        Parameters
        ----------
        completion:
            Token ids ``x_1..x_n`` with ``1 <= n <= T`` and no EOS before the last token (the last token itself
            need not be EOS: rows only condition on ``x_<t``).

        Returns
        -------
        ``float64[n, V]``; each row is a normalised log-distribution (``-inf`` for impossible tokens).
        """
        ids = torch.as_tensor(list(completion) if not torch.is_tensor(completion) else completion, dtype=torch.long)
        T, V, eos = self.max_new_tokens, self.vocab_size, self.eos_token_id
        n = int(ids.numel())
        if ids.dim() != 1 or not 1 <= n <= T:
            raise EGPSError(f"a completion must be a flat list of 1..{T} token ids (max_new_tokens), got {n}")
        if (ids < 0).any() or (ids >= V).any():
            raise EGPSError(f"token ids must lie in [0, {V})")
        if (ids[:-1] == eos).any():
            raise EGPSError("the completion has EOS before its last token")
        # Row t scores token t from the state x_{t-1} (start row for t = 0); T - 1 - t tokens remain after it.
        rows = torch.cat([self._a_start.unsqueeze(0), self._a_trans.index_select(0, ids[:-1])])
        after = self._tail[T - 1 - torch.arange(n)]
        return torch.log_softmax(rows + after, dim=-1)

    # ------------------------------------------------------------------ marginals
    def position_marginals(self) -> torch.Tensor:
        """``float64[T, V]``: ``P_π(x_t = v)``; row ``t`` sums to ``P_π(length > t)``."""
        if self._positions is None:
            fwd = self._forward()
            # After position t there are T - 1 - t tokens left: row T-1-t of the backward messages.
            suffix = self._tail.flip(0)
            self._positions = (fwd + suffix - self.log_normalizer).exp()
        return self._positions.clone()

    def length_marginal(self) -> torch.Tensor:
        """``float64[T + 1]``: ``P_π(length = n)``; index 0 is always 0."""
        pos = self.position_marginals()
        out = torch.zeros(self.max_new_tokens + 1, dtype=torch.float64)
        out[1:] = pos[:, self.eos_token_id]
        out[-1] = pos[-1].sum()  # length T: EOS or any other last token
        return out

    def final_token_marginal(self) -> torch.Tensor:
        """``float64[V]``: ``P_π(last token = v)``."""
        pos = self.position_marginals()
        out = pos[-1].clone()
        out[self.eos_token_id] = pos[:, self.eos_token_id].sum()
        return out

    def expected_visits(self, token: int) -> float:
        """``E_π[#{t : x_t = token}]``."""
        if isinstance(token, bool) or not isinstance(token, int) or not 0 <= token < self.vocab_size:
            raise EGPSError(f"token must be an id in [0, {self.vocab_size}), got {token!r}")
        return float(self.position_marginals()[:, token].sum())

    # ------------------------------------------------------------------ brute force
    def enumerate(self, max_count: int = 1_000_000) -> tuple[list[tuple[int, ...]], torch.Tensor]:
        """All completions with ``p > 0`` and their exact ``log π``, normalised by brute force (not the DP).

        Raises :class:`EGPSError` if there are more than ``max_count`` completions.
        """
        completions, log_p = enumerate_completions(self.model, self.max_new_tokens, self.prompt, max_count)
        scaled = self.alpha * log_p
        return completions, scaled - torch.logsumexp(scaled, dim=0)


__all__ = ["ExactPower", "enumerate_completions"]
