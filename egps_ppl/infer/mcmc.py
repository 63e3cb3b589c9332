"""The MCMC runner: C chains advanced together, one batched kernel step at a time."""

from __future__ import annotations

import random
import time
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from egps_ppl.errors import EGPSError, check_positive_int
from egps_ppl.infer.schedule import BlockSchedule, Hook
from egps_ppl.kernels.base import Kernel, StepInfo
from egps_ppl.models.base import Cost
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import PAD, Sequences

POSTERIOR_VARS = ("tokens", "length", "log_p")
STAT_VARS = ("lp", "acceptance_rate", "is_accepted", "cut_position", "decode_tokens", "scored_tokens")
POSITION_VARS = ("token_logp", "entropy")  # [chain, draw, position]: only in the ArviZ export's sample_stats


class MCMC:
    """Run a kernel on ``num_chains`` chains and collect draws.

    Each recorded draw is the state after a kernel step; with ``thin = k`` every k-th step is recorded and the
    cost counters of a draw cover all k steps. Warmup steps (and a block-wise growth phase, if a schedule is
    given) are run first and not recorded.

    Parameters
    ----------
    kernel:
        Any :class:`egps_ppl.kernels.Kernel`.
    num_samples:
        Draws to record per chain.
    warmup_steps:
        Steps run (per chain) before recording.
    num_chains:
        Chains advanced together in each batched step.
    thin:
        Record every ``thin``-th step.
    seed:
        Seed of the run's random generator (``None``: a fresh one, recorded in ``self.seed``).
    progress:
        Show a progress bar.
    schedule:
        A :class:`BlockSchedule` that grows the completions block by block before sampling.
    hooks:
        Callables ``hook(phase, step, state, info)`` run after every step.
    init_policy:
        Token policy of the ancestral initial completions when :meth:`run` gets no ``initial`` and there is no
        schedule. Default: the target's proposal q ∝ p^α (temperature 1/α) for *every* kernel, so runs of
        different kernels with one seed start from the same completions (a kernel that proposes with another
        policy rescores them once in ``prepare``). A schedule grows its blocks with the kernel's own policy.

    Examples
    --------
    >>> from egps_ppl.kernels import MetropolisHastings
    >>> from egps_ppl.models.testbeds import random_markov
    >>> from egps_ppl.target import PowerDistribution
    >>> target = PowerDistribution(random_markov(4, seed=0), [], alpha=4.0, max_new_tokens=6)
    >>> mcmc = MCMC(MetropolisHastings(target), num_samples=20, num_chains=4, seed=0).run()
    >>> mcmc.get_samples()["tokens"].shape
    (4, 20, 6)
    """

    def __init__(
        self,
        kernel: Kernel,
        num_samples: int,
        warmup_steps: int = 0,
        num_chains: int = 1,
        thin: int = 1,
        seed: int | None = None,
        progress: bool = False,
        schedule: BlockSchedule | None = None,
        hooks: Sequence[Hook] = (),
        init_policy: PowerPolicy | None = None,
    ) -> None:
        self.kernel = kernel
        self.init_policy = init_policy
        self.num_samples = check_positive_int("num_samples", num_samples)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int) or warmup_steps < 0:
            raise EGPSError(f"warmup_steps must be an integer >= 0, got {warmup_steps!r}")
        self.warmup_steps = warmup_steps
        self.num_chains = check_positive_int("num_chains", num_chains)
        self.thin = check_positive_int("thin", thin)
        self.seed = seed if seed is not None else random.SystemRandom().randrange(2**31)
        self.progress = progress
        self.schedule = schedule
        self.hooks = list(hooks)
        self.state: Sequences | None = None
        self.warmup_cost: Cost | None = None
        self.sampling_cost: Cost | None = None
        self.wall_seconds: float = 0.0
        self.interrupted = False
        self._draws: dict[str, list[np.ndarray]] = {}

    # ------------------------------------------------------------ running
    def run(self, initial: Sequences | Sequence[Sequence[int]] | None = None) -> MCMC:
        """Run warmup and sampling; ``initial`` is a batch, one list of token ids per chain, or ``None``
        (ancestral samples of ``init_policy``, or the schedule's growth phase).

        On ``KeyboardInterrupt`` (Ctrl-C, or a hook raising it) during sampling, the draws recorded so far are kept
        (:attr:`draws_completed` of them; :attr:`interrupted` is set and :meth:`attrs` says ``partial=1``) and the
        interrupt is raised again, so a caller can save them.
        """
        started = time.perf_counter()
        self.interrupted, self._draws = False, {}
        generator = torch.Generator().manual_seed(self.seed)
        state, cost = self._initial_state(initial, generator)
        state, prep = self.kernel.prepare(state)
        cost = cost + prep
        total = self.warmup_steps + self.num_samples * self.thin
        bar = _progress_bar(total, self.kernel.name) if self.progress else None
        self._draws = {name: [] for name in POSTERIOR_VARS + STAT_VARS + POSITION_VARS}
        pending = Cost.zero(state.num_rows, state.device)
        sampling = Cost.zero(state.num_rows, state.device)
        try:
            for step in range(total):
                state, info = self.kernel.step(state, generator)
                warm = step < self.warmup_steps
                phase = "warmup" if warm else "sample"
                for hook in self.hooks:
                    hook(phase, step, state, info)
                if warm:
                    cost = cost + info.cost
                else:
                    pending = pending + info.cost
                    if (step - self.warmup_steps + 1) % self.thin == 0:
                        self._record(state, info, pending)
                        sampling = sampling + pending
                        pending = Cost.zero(state.num_rows, state.device)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(accept=f"{info.accept_prob.mean().item():.2f}", refresh=False)
        except KeyboardInterrupt:
            self.interrupted = True  # keep the complete draws (an interrupted _record may have added to some lists)
            done = self.draws_completed
            self._draws = {name: values[:done] for name, values in self._draws.items()}
            self.state, self.warmup_cost, self.sampling_cost = state, cost, sampling
            self.wall_seconds = time.perf_counter() - started
            raise
        finally:
            if bar is not None:
                bar.close()
        self.state, self.warmup_cost, self.sampling_cost = state, cost, sampling
        self.wall_seconds = time.perf_counter() - started
        return self

    def _initial_state(
        self, initial: Sequences | Sequence[Sequence[int]] | None, generator: torch.Generator
    ) -> tuple[Sequences, Cost]:
        target = self.kernel.target
        if isinstance(initial, Sequences):
            if initial.num_rows != self.num_chains * target.num_prompts:
                raise EGPSError(f"initial batch has {initial.num_rows} rows for {self.num_chains} chains")
            return initial, Cost.zero(initial.num_rows, initial.device)
        if initial is not None and target.batched:
            raise EGPSError("initial completions for a target over several prompts: pass a Sequences batch")
        if initial is not None:
            if len(initial) != self.num_chains:
                raise EGPSError(f"got {len(initial)} initial completions for {self.num_chains} chains")
            scored = target.from_completions(initial, self.kernel.policy)  # checks the ids and lengths first
            _check_in_support(initial, target.lm.eos_token_id, target.max_new_tokens)
            return scored
        if self.schedule is not None:
            return self.schedule.grow(self.kernel, self.num_chains, generator, self._block_hook)
        return target.sample_proposal(self.num_chains, generator, self.init_policy or target.default_policy())

    def _block_hook(self, phase: str, step: int, state: Sequences, info: StepInfo) -> None:
        for hook in self.hooks:
            hook(phase, step, state, info)

    def _record(self, state: Sequences, info: StepInfo, cost: Cost) -> None:
        target = self.kernel.target
        tokens = torch.where(state.valid_mask(), state.tokens, torch.full_like(state.tokens, PAD))
        values = {
            "tokens": tokens,
            "length": state.length,
            "log_p": state.log_p(),
            "lp": target.log_prob(state),
            "acceptance_rate": info.accept_prob,
            "is_accepted": info.accepted,
            "cut_position": info.cut,
            "decode_tokens": cost.decode_tokens,
            "scored_tokens": cost.scored_tokens,
            "token_logp": state.logp,  # zero past each length; the export stores NaN there
            "entropy": state.entropy,
        }
        for name, value in values.items():
            self._draws[name].append(value.detach().cpu().numpy())

    # ------------------------------------------------------------ results
    @property
    def draws_completed(self) -> int:
        """Draws recorded per chain by the latest :meth:`run` (fewer than ``num_samples`` after an interrupt)."""
        return min((len(values) for values in self._draws.values()), default=0)

    def _require_run(self) -> None:
        if self.state is None:
            raise EGPSError("call run() first")

    def get_samples(self) -> dict[str, np.ndarray]:
        """Posterior draws with leading dimensions ``[chain, draw]``: ``tokens`` (padded with -1), ``length``,
        ``log_p``."""
        self._require_run()
        return {name: np.stack(self._draws[name], axis=1) for name in POSTERIOR_VARS}

    def get_sample_stats(self) -> dict[str, np.ndarray]:
        """Per-draw kernel statistics ``[chain, draw]`` (see :class:`egps_ppl.kernels.StepInfo`)."""
        self._require_run()
        return {name: np.stack(self._draws[name], axis=1) for name in STAT_VARS}

    def attrs(self) -> dict[str, Any]:
        """Run metadata recorded in the ArviZ file."""
        target = self.kernel.target
        return {
            "alpha": target.alpha,
            "kernel": self.kernel.name,
            "model": target.lm.name,
            "seed": self.seed,
            "max_new_tokens": target.max_new_tokens,
            "num_chains": self.num_chains,
            "warmup_steps": self.warmup_steps,
            "thin": self.thin,
            "prompt_ids": " | ".join(" ".join(str(t) for t in p.tolist()) for p in target.prompts),
            "num_problems": target.num_prompts,
            "schedule": repr(self.schedule) if self.schedule else "none",
            "wall_seconds": round(self.wall_seconds, 3),
            **({"partial": 1, "draws_completed": self.draws_completed} if self.interrupted else {}),
        }

    def to_arviz(self) -> Any:
        """The draws as ArviZ data (``InferenceData`` on arviz < 1, a ``DataTree`` on arviz >= 1), with the
        per-position ``token_logp`` and ``entropy`` of every draw in ``sample_stats``. For a target over several
        prompts every variable gets a ``problem`` dimension after ``draw`` (``num_chains`` chains per problem), so
        ArviZ's R-hat and ESS come out per problem."""
        from egps_ppl.diagnostics import to_arviz

        self._require_run()
        per_position = {name: np.stack(self._draws[name], axis=1) for name in POSITION_VARS}
        problems = self.kernel.target.num_prompts if self.kernel.target.batched else None
        return to_arviz(
            self.get_samples(), {**self.get_sample_stats(), **per_position}, self.attrs(), problems=problems
        )

    def summary(self) -> dict[str, Any]:
        """R-hat, bulk/tail ESS of ``log_p`` and ``length`` (from ArviZ), acceptance rates, the moved fraction and
        the frozen chains (see :func:`egps_ppl.diagnostics.summarize`)."""
        from egps_ppl.diagnostics import summarize

        return summarize(self.to_arviz())

    def total_cost(self) -> Cost:
        """Everything spent: growth, warmup and sampling."""
        self._require_run()
        return self.warmup_cost + self.sampling_cost


def _check_in_support(completions: Sequence[Sequence[int]], eos: int | None, max_new_tokens: int) -> None:
    """Every completion π can produce ends with EOS or has exactly ``max_new_tokens`` tokens; a chain started
    elsewhere has π = 0 at its start and can stick there, so such a start is refused."""
    for number, ids in enumerate(completions, start=1):
        ids = list(ids)
        if 0 < len(ids) < max_new_tokens and (eos is None or int(ids[-1]) != eos):
            end = f"does not end with EOS ({eos})" if eos is not None else "the model has no EOS"
            raise EGPSError(
                f"initial completion {number} has {len(ids)} tokens and {end}: outside the support of pi (a "
                f"completion ends with EOS or has exactly max_new_tokens={max_new_tokens} tokens)"
            )


def _progress_bar(total: int, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, leave=False)
