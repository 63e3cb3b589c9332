"""Multiple-Try Metropolis (Liu, Liang & Wong 2000) at a chosen cut, with all tries in one batch."""

from __future__ import annotations

import torch

from egps_ppl.errors import EGPSError
from egps_ppl.kernels.base import Kernel, StepInfo, metropolis_accept
from egps_ppl.kernels.sites import SiteSelector, UniformSite, sample_sites, site_log_prob
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

WEIGHTS = ("importance", "balanced")


class MultipleTryMetropolis(Kernel):
    """Draw ``num_tries`` suffixes from the cut, pick one by weight, accept with the MTM ratio.

    The suffix proposal depends only on the shared prefix, so it is of independent type. With importance
    weights ``w(y) = π(y) / q(y)`` (the default; ``= Π Z_α`` over the new suffix at temperature 1/α):

    ``r = P_y(i) Σ_j w(y_j) / (P_x(i) (Σ_{j≠J} w(y_j) + w(x)))``

    where ``P_x(i)`` is the selector's probability of the cut. With ``weights="balanced"`` the locally balanced
    weights ``w(y, x) = sqrt(w(y) / w(x))`` (Gagnon, Maire & Zanella 2023) are used with ``num_tries - 1``
    reference draws from the same prefix, and the ratio is ``Σ_j w(y_j, x) / Σ_j w(x*_j, y)`` with ``x*_k = x``.
    With one try both reduce exactly to Metropolis–Hastings.

    With ``local_width = W`` the tries resample only ``W`` tokens from the cut and keep the tail (rescored in
    one batched pass), so a try costs ``W`` decode steps instead of ``n - i``. The move then stays in the class of
    sequences that share x's prefix and its tail past the window; tries outside it get weight 0.

    Parameters
    ----------
    target : PowerDistribution
        The power distribution to leave invariant.
    num_tries : int
        ``k >= 1`` tries per step, drawn in one batch.
    selector : SiteSelector, optional
        Where to cut (default :class:`~egps_ppl.kernels.sites.UniformSite`).
    policy : PowerPolicy, optional
        Token policy of the tries (default the target's q ∝ p^α; ``egps`` uses ``PowerPolicy(1.0)``).
    weights : {"importance", "balanced"}
        MTM weight function.
    local_width : int, optional
        Resample only this many tokens per try and keep the tail.
    name : str, optional
        Display name.

    Raises
    ------
    EGPSError
        For ``num_tries < 1``, an unknown ``weights`` or ``local_width < 1``.

    Examples
    --------
    >>> from egps_ppl.kernels.sites import EntropyJumpSite
    >>> from egps_ppl.models.testbeds import random_markov
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(random_markov(4, seed=0), [], alpha=4.0, max_new_tokens=6)
    >>> kernel = MultipleTryMetropolis(target, num_tries=8, selector=EntropyJumpSite(floor=1e-3), local_width=2)
    >>> state, _ = target.sample_proposal(5, torch.Generator().manual_seed(0))
    >>> new_state, info = kernel.step(state, torch.Generator().manual_seed(1))
    >>> bool(((info.accept_prob >= 0) & (info.accept_prob <= 1)).all())
    True
    """

    def __init__(
        self,
        target: PowerDistribution,
        num_tries: int = 4,
        selector: SiteSelector | None = None,
        policy: PowerPolicy | None = None,
        weights: str = "importance",
        local_width: int | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(num_tries, bool) or not isinstance(num_tries, int) or num_tries < 1:
            raise EGPSError(f"num_tries must be an integer >= 1, got {num_tries!r}")
        if weights not in WEIGHTS:
            raise EGPSError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        self.target = target
        self.num_tries = num_tries
        self.selector = selector or UniformSite()
        self.policy = policy or target.default_policy()
        self.weights = weights
        if local_width is not None and (isinstance(local_width, bool) or int(local_width) < 1):
            raise EGPSError(f"local_width must be an integer >= 1, got {local_width!r}")
        self.local_width = local_width
        self.name = name or f"mtm[{getattr(self.selector, 'name', 'site')},k={num_tries}]"

    def prepare(self, state: Sequences) -> tuple[Sequences, Cost]:
        return self.target.lm.with_policy(state, self.policy)

    def _reach(self, state: Sequences, cut: torch.Tensor) -> torch.Tensor:
        """End (exclusive) of the region a move from ``cut`` resamples in each row of ``state``."""
        if self.local_width is None:
            return state.length
        return torch.minimum(cut + self.local_width, state.length)

    def _draw(
        self, state: Sequences, cut: torch.Tensor, count: int, generator: torch.Generator | None
    ) -> tuple[Sequences, torch.Tensor, Cost]:
        """``count`` tries per chain from each chain's cut (rows ``c*count .. c*count+count-1``) and their
        log-weights ``log π(y) - log q(y | x)``."""
        lm = self.target.lm
        rows = torch.arange(state.num_rows, device=state.device).repeat_interleave(count)
        base = lm.take(state, rows)
        cut_r = cut[rows]
        moving = cut_r >= 0
        start = torch.where(moving, cut_r, base.length)
        stop = torch.full_like(cut_r, state.limit)
        if self.local_width is not None:
            stop = torch.minimum(stop, cut_r + self.local_width)
        drawn, cost = lm.extend(base, start, torch.where(moving, stop, base.length), generator)
        log_q = drawn.total("logq", start)
        valid = moving
        if self.local_width is not None:
            drawn, valid, rescored = self._keep_tails(base, drawn, cut_r, moving)
            cost = cost + rescored
        log_w = torch.where(valid, self.target.log_prob(drawn) - log_q, torch.full_like(log_q, -torch.inf))
        per_chain = Cost(
            cost.decode_tokens.view(-1, count).sum(1), cost.scored_tokens.view(-1, count).sum(1), cost.forward_calls
        )
        return drawn, log_w.view(-1, count), per_chain

    def _keep_tails(
        self, base: Sequences, drawn: Sequences, cut: torch.Tensor, moving: torch.Tensor
    ) -> tuple[Sequences, torch.Tensor, Cost]:
        """Local moves stay in the class of sequences that share x's prefix and its tail past the window.

        If x has a tail, a try is valid when its window is full and has no EOS; the tail is spliced back and
        rescored. If x has no tail, a try is valid when it ends (EOS or the limit) within the window. Invalid
        tries get weight 0: the kernel is MTM on that class, which x and every valid try share.
        """
        end = cut + self.local_width
        has_tail = base.length > end
        full_window = (drawn.length == end) & ~drawn.finished()
        ended = drawn.complete()
        valid = moving & torch.where(has_tail, full_window, ended)
        splice = valid & has_tail
        from_old = splice.unsqueeze(1) & (base.positions() >= end.unsqueeze(1))
        spliced = drawn.with_(
            tokens=torch.where(from_old, base.tokens, drawn.tokens),
            length=torch.where(splice, base.length, drawn.length),
        )
        rescored, cost = self.target.lm.score(spliced, torch.where(splice, end, spliced.length))
        return rescored, valid, cost

    def step(self, state: Sequences, generator: torch.Generator | None = None) -> tuple[Sequences, StepInfo]:
        lm, k = self.target.lm, self.num_tries
        state, cost = self.prepare(state)
        site_lp = self.selector.log_probs(state)
        cut = sample_sites(site_lp, generator)
        tries, log_w, drawn_cost = self._draw(state, cut, k, generator)
        cost = cost + drawn_cost
        start = cut.clamp(min=0)
        current_lp = self.target.log_prob(state)
        log_w_x = current_lp - state.total("logq", start, self._reach(state, start))
        balanced = self.weights == "balanced"
        select_w = 0.5 * log_w if balanced else log_w
        chosen_j = _pick(select_w, generator) if k > 1 else torch.zeros_like(cut)
        log_w_y = log_w.gather(1, chosen_j.unsqueeze(1)).squeeze(1)
        if balanced:
            forward = torch.logsumexp(0.5 * log_w, 1) - 0.5 * log_w_x
            if k > 1:
                _, ref_w, ref_cost = self._draw(state, cut, k - 1, generator)
                cost = cost + ref_cost
                references = torch.cat([ref_w, log_w_x.unsqueeze(1)], 1)
            else:
                references = log_w_x.unsqueeze(1)
            backward = torch.logsumexp(0.5 * references, 1) - 0.5 * log_w_y
        else:
            others = log_w.scatter(1, chosen_j.unsqueeze(1), log_w_x.unsqueeze(1))  # {y_j, j != J} and x
            forward, backward = torch.logsumexp(log_w, 1), torch.logsumexp(others, 1)
        chosen = lm.take(tries, torch.arange(state.num_rows, device=state.device) * k + chosen_j)
        log_ratio = (
            forward - backward + site_log_prob(self.selector.log_probs(chosen), cut) - site_log_prob(site_lp, cut)
        )
        log_ratio = torch.where(torch.isneginf(forward), torch.full_like(forward, -torch.inf), log_ratio)
        accepted, accept_prob = metropolis_accept(log_ratio, current_lp, generator)
        accepted &= cut >= 0
        accept_prob = torch.where(cut >= 0, accept_prob, torch.zeros_like(accept_prob))
        new_state = lm.merge(accepted, state, chosen)
        return new_state, StepInfo.from_cost(accepted, accept_prob, cut, cost)


def _pick(log_w: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One index per row ∝ exp(log_w); index 0 for rows where every weight is 0."""
    finite = torch.isfinite(log_w).any(1, keepdim=True)
    safe = torch.where(finite, log_w, torch.zeros_like(log_w))
    probs = (safe - safe.max(1, keepdim=True).values).exp()
    return torch.multinomial(probs.float().cpu(), 1, generator=generator).squeeze(1).to(log_w.device)
