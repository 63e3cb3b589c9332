"""Multiple-Try Metropolis (Liu, Liang & Wong 2000) at a chosen cut, with all tries in one batch."""

from __future__ import annotations

import torch

from egps_ppl.errors import EGPSError
from egps_ppl.kernels.base import Kernel, StepInfo, metropolis_accept, parts_name
from egps_ppl.kernels.proposals import Proposal, SuffixProposal, Tries, WindowProposal
from egps_ppl.kernels.sites import SiteSelector, UniformSite, sample_sites, site_log_prob
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.rng import Generator, categorical
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

WEIGHTS = ("importance", "balanced")


class MultipleTryMetropolis(Kernel):
    """Draw ``num_tries`` proposals from the cut, pick one by weight, accept with the MTM ratio.

    Any :class:`~egps_ppl.kernels.proposals.Proposal` works. With importance weights
    ``w(y, x) = π(y) / q(y | x)`` (the default; ``= Π Z_α`` over a new suffix at temperature 1/α) and a
    cut ``i`` drawn with probability ``P_x(i)``:

    ``r = P_y(i) Σ_j w(y_j, x) / (P_x(i) Σ_j w(x*_j, y))``

    with reference points ``x*_1..x*_{k-1}`` drawn from ``q(· | y)`` and ``x*_k = x``. For an independent
    proposal (``q(· | x) = q(· | y)``, e.g. suffix resampling) the other tries serve as the references, which
    gives the classic ``Σ_j w(y_j) / (Σ_{j≠J} w(y_j) + w(x))`` at no extra cost. With ``weights="balanced"`` the
    locally balanced weights ``w(y, x) = sqrt(π(y) q(x | y) / (π(x) q(y | x)))`` (Gagnon, Maire & Zanella 2023)
    are used with ``k - 1`` reference draws from ``y``. With one try both reduce exactly to Metropolis–Hastings.

    Parameters
    ----------
    target : PowerDistribution
        The power distribution to leave invariant.
    num_tries : int
        ``k >= 1`` tries per step, drawn in one batch.
    selector : SiteSelector, optional
        Where to cut (default :class:`~egps_ppl.kernels.sites.UniformSite`).
    proposal : Proposal, optional
        What the tries are (default :class:`~egps_ppl.kernels.proposals.SuffixProposal` with ``policy``, or a
        :class:`~egps_ppl.kernels.proposals.WindowProposal` of ``local_width`` tokens).
    policy : PowerPolicy, optional
        Token policy of the default proposal (the target's q ∝ p^α unless given). Not used with ``proposal``.
    weights : {"importance", "balanced"}
        MTM weight function.
    local_width : int, optional
        Shorthand for ``proposal=WindowProposal(policy, local_width)``: resample only this many tokens per try
        and keep the tail. Not used with ``proposal``.
    name : str, optional
        Display name.

    Raises
    ------
    EGPSError
        For ``num_tries < 1``, an unknown ``weights``, ``local_width < 1``, or ``proposal`` given together with
        ``policy`` or ``local_width``.

    Examples
    --------
    >>> from egps_ppl.kernels.sites import EntropyJumpSite
    >>> from egps_ppl.models.testbeds import random_markov
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(random_markov(4, seed=0), [], alpha=4.0, max_new_tokens=6)
    >>> kernel = MultipleTryMetropolis(target, num_tries=8, selector=EntropyJumpSite(floor=1e-3), local_width=2)
    >>> kernel.name
    'mtm[entropy-jump,window,k=8]'
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
        proposal: Proposal | None = None,
        policy: PowerPolicy | None = None,
        weights: str = "importance",
        local_width: int | None = None,
        name: str | None = None,
    ) -> None:
        if isinstance(num_tries, bool) or not isinstance(num_tries, int) or num_tries < 1:
            raise EGPSError(f"num_tries must be an integer >= 1, got {num_tries!r}")
        if weights not in WEIGHTS:
            raise EGPSError(f"weights must be one of {WEIGHTS}, got {weights!r}")
        if proposal is not None and (policy is not None or local_width is not None):
            raise EGPSError("give MultipleTryMetropolis either a proposal or policy/local_width, not both")
        if local_width is not None and (isinstance(local_width, bool) or not isinstance(local_width, int)):
            raise EGPSError(f"local_width must be an integer >= 1, got {local_width!r}")
        self.target = target
        self.num_tries = num_tries
        self.selector = selector or UniformSite()
        policy = policy or target.default_policy()
        if proposal is None:
            proposal = SuffixProposal(policy) if local_width is None else WindowProposal(policy, local_width)
        self.proposal = proposal
        self.weights = weights
        extras = ("" if num_tries == 4 else f"k={num_tries}", "" if weights == "importance" else weights)
        self.name = name or parts_name("mtm", self.selector, self.proposal, *extras)

    @property
    def policy(self) -> PowerPolicy:
        """The proposal's token policy."""
        return self.proposal.policy

    def prepare(self, state: Sequences) -> tuple[Sequences, Cost]:
        return self.target.lm.with_policy(state, self.policy)

    def _importance(self, tries: Tries) -> torch.Tensor:
        """``float64[C, k]``: ``log w(y_j, x) = log π(y_j) - log q(y_j | x)``, ``-inf`` for invalid tries."""
        log_pi = self.target.log_prob(tries.seqs).view(tries.log_q_forward.shape)
        return torch.where(tries.valid, log_pi - tries.log_q_forward, torch.full_like(log_pi, -torch.inf))

    def step(self, state: Sequences, generator: torch.Generator | None = None) -> tuple[Sequences, StepInfo]:
        k = self.num_tries
        state, cost = self.prepare(state)
        site_lp = self.selector.log_probs(state)
        cut = sample_sites(site_lp, generator, state.stream)
        tries = self.proposal.propose(self.target, state, cut, k, generator)
        cost = cost + tries.cost
        current_lp = self.target.log_prob(state)
        log_w = self._importance(tries)  # w(y_j, x)
        log_w_back = current_lp.unsqueeze(1) - tries.log_q_reverse  # w(x, y_j) = π(x) / q(x | y_j)
        balanced = self.weights == "balanced"
        select_w = 0.5 * (log_w - log_w_back) if balanced else log_w
        chosen_j = _pick(select_w, generator, state.stream) if k > 1 else torch.zeros_like(cut)
        chosen = tries.pick(chosen_j)

        def at_j(values: torch.Tensor) -> torch.Tensor:
            return values.gather(1, chosen_j.unsqueeze(1)).squeeze(1)

        log_w_x = at_j(log_w_back)  # w(x, y)
        if balanced or not self.proposal.independent:
            if k > 1:  # k - 1 reference points drawn from y
                refs = self.proposal.propose(self.target, chosen, cut, k - 1, generator)
                cost = cost + refs.cost
                ref_w = self._importance(refs)  # w(x*_j, y) = π(x*_j) / q(x*_j | y)
                if balanced:  # divided by w(y, x*_j) = π(y) / q(y | x*_j)
                    chosen_lp = self.target.log_prob(chosen).unsqueeze(1)
                    ref_w = 0.5 * (ref_w - (chosen_lp - refs.log_q_reverse))
            else:
                ref_w = log_w[:, :0]
            if balanced:
                log_w_x = 0.5 * (log_w_x - at_j(log_w))
            forward = torch.logsumexp(select_w, 1)
            backward = torch.logsumexp(torch.cat([ref_w, log_w_x.unsqueeze(1)], 1), 1)
        else:  # the other tries are the references: {y_j, j != J} and x
            others = log_w.scatter(1, chosen_j.unsqueeze(1), log_w_x.unsqueeze(1))
            forward, backward = torch.logsumexp(log_w, 1), torch.logsumexp(others, 1)
        log_ratio = (
            forward - backward + site_log_prob(self.selector.log_probs(chosen), cut) - site_log_prob(site_lp, cut)
        )
        accepted, accept_prob = metropolis_accept(log_ratio, current_lp, generator, state.stream)
        moved = at_j(tries.valid) & (cut >= 0)
        accepted &= moved
        accept_prob = torch.where(moved, accept_prob, torch.zeros_like(accept_prob))
        new_state = state.where(accepted, chosen)
        return new_state, StepInfo.from_cost(accepted, accept_prob, cut, cost)


def _pick(log_w: torch.Tensor, generator: Generator, streams: torch.Tensor | None) -> torch.Tensor:
    """One index per row ∝ exp(log_w); index 0 for rows where every weight is 0."""
    finite = torch.isfinite(log_w).any(1, keepdim=True)
    safe = torch.where(finite, log_w, torch.zeros_like(log_w))
    probs = (safe - safe.max(1, keepdim=True).values).exp()
    return categorical(probs, log_w.shape[0], generator, streams).to(log_w.device)
