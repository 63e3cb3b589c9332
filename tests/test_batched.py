"""A target over several prompts (a plate over problems): per-row results equal single-problem runs, and every
kernel leaves each problem's π invariant when the problems share one batch."""

from __future__ import annotations

import functools
import os

import pytest
import torch

from egps_ppl.errors import EGPSError
from egps_ppl.kernels import Cycle, MetropolisHastings, Mixture, MultipleTryMetropolis, WindowProposal
from egps_ppl.kernels.presets import PRESETS, build_kernel
from egps_ppl.kernels.sites import EntropyJumpSite
from egps_ppl.models import registry
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.models.testbeds import random_markov
from egps_ppl.rng import Streams
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution
from egps_ppl.testing import assert_invariant, check_invariance

# Where the backend tests build their models: EGPS_TEST_DEVICE=cuda runs them on a GPU (tools/gpu_check.py).
DEVICE = os.environ.get("EGPS_TEST_DEVICE", "cpu")
tiny_gpt2 = functools.partial(registry.tiny_gpt2, device=DEVICE)
tiny_llama = functools.partial(registry.tiny_llama, device=DEVICE)

STATS = ("logp", "logq", "entropy", "logz")
PROMPTS = [(), (2,), (3, 1), (1,)]
MODEL = random_markov(4, seed=1, eos_token_id=0, concentration=2.0)

KERNELS = {
    "mh": MetropolisHastings,
    "entropy-jump-mh": lambda t: MetropolisHastings(t, selector=EntropyJumpSite(beta=4.0)),
    "window": lambda t: MetropolisHastings(t, proposal=WindowProposal(t.default_policy(), [1, 2])),
    "mtm": lambda t: MultipleTryMetropolis(t, 3),
    "mtm-balanced-local": lambda t: MultipleTryMetropolis(t, 3, local_width=2, weights="balanced"),
    "cycle": lambda t: Cycle([MetropolisHastings(t), MultipleTryMetropolis(t, 2)]),
    "mixture": lambda t: Mixture([MetropolisHastings(t), MultipleTryMetropolis(t, 2, local_width=1)], [0.5, 0.5]),
    **{f"preset-{name}": (lambda t, name=name: build_kernel(name, t)) for name in PRESETS},
}


@pytest.mark.parametrize("kernel", sorted(KERNELS))
def test_every_kernel_leaves_each_problem_invariant(kernel):
    report = assert_invariant(KERNELS[kernel], MODEL, 2.0, 4, num_chains=15_000, steps=2, prompt=PROMPTS)
    assert report.num_chains == 15_000 * len(PROMPTS)


def test_a_kernel_that_mixes_up_problems_is_caught():
    """Rows that take a proposal drawn for another problem's prompt break every problem's π."""

    class SwapRows(MetropolisHastings):
        def step(self, state, generator=None):
            new, info = super().step(state, generator)
            shifted = new.take(torch.roll(torch.arange(new.num_rows), 1))
            return new.where(info.accepted, shifted.with_(prompt=new.prompt, problem=new.problem)), info

    report = check_invariance(SwapRows, MODEL, 2.0, 4, num_chains=15_000, steps=2, prompt=PROMPTS)
    assert not report.passed()


def test_plate_rows_and_errors():
    target = PowerDistribution(MODEL, [list(p) for p in PROMPTS], alpha=2.0, max_new_tokens=4)
    assert target.num_prompts == 4 and target.batched
    rows = target.rows_for([3, 0, 3])
    assert rows.problem.tolist() == [3, 0, 3] and rows.prompt_lengths.tolist() == [1, 0, 1]
    with pytest.raises(EGPSError, match=r"use target\.prompts"):
        _ = target.prompt
    with pytest.raises(EGPSError, match="problem indices"):
        target.rows_for([4])
    with pytest.raises(EGPSError, match="problem index of every completion"):
        target.from_completions([[1, 0]])
    single = PowerDistribution(MODEL, [2], alpha=2.0, max_new_tokens=4)
    assert not single.batched and single.empty(3).problem is None


# ---------------------------------------------------------------- transformers models, float64


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def models(request):
    build = {"gpt2": tiny_gpt2, "llama": tiny_llama}[request.param]
    return build(dtype="float64"), build(dtype="float64", reuse_cache=False)


def _single(model, prompt: list[int], tokens: list[int], capacity: int, policy: PowerPolicy) -> Sequences:
    seqs, _ = model.from_tokens(prompt, [tokens], capacity, policy)
    return seqs


def _assert_rows_match_single_runs(model, batch: Sequences, prompts: list[list[int]], tol: float = 1e-6) -> None:
    for row in range(batch.num_rows):
        single = _single(model, prompts[row], batch.row_tokens(row), batch.capacity, batch.policy)
        n = int(batch.length[row])
        for stat in STATS:
            diff = (getattr(single, stat)[0, :n] - getattr(batch, stat)[row, :n]).abs().max().item()
            assert diff <= tol, f"row {row}: {stat} differs from the single-prompt run by {diff}"


def test_scores_of_a_prompt_batch_equal_single_prompt_scores(models):
    model, _ = models
    texts = ["Hi", "Once upon a time there", "2 + 2 ="]
    prompts = [model.encode(t) for t in texts]
    order = [0, 1, 2, 1, 0, 2]
    eos = model.eos_token_id
    completions = [[104, 105, eos], [32] * 7, [50, 51, 52, 53, eos], [120], [33, 34, 35, 36, 37, 38, 39, 40], [eos]]
    policy = PowerPolicy(alpha=3.0)
    batch, _ = model.from_tokens([prompts[i] for i in order], completions, 8, policy)
    assert batch.prompt_lengths.tolist() == [len(prompts[i]) for i in order]
    _assert_rows_match_single_runs(model, batch, [prompts[i] for i in order], tol=1e-9)


def test_sampling_and_kernel_steps_on_a_prompt_batch_match_single_runs(models):
    model, reference = models
    texts = ["The cat", "A long prompt about a dog that runs", "x"]
    target = PowerDistribution(model, texts, alpha=2.0, max_new_tokens=12)
    ref_target = PowerDistribution(reference, texts, alpha=2.0, max_new_tokens=12)
    prompts = [p.tolist() for p in target.prompts]
    row_prompts = [prompts[k] for k in target.empty(2).problem.tolist()]
    state, _ = target.sample_proposal(2, torch.Generator().manual_seed(0))
    ref_state, _ = ref_target.sample_proposal(2, torch.Generator().manual_seed(0))
    # The KV pool path and the recompute-from-prompt path draw the same tokens (float64).
    assert torch.equal(state.tokens, ref_state.tokens)
    _assert_rows_match_single_runs(model, state, row_prompts)
    for kernel in (MetropolisHastings(target), MultipleTryMetropolis(target, 3, local_width=3)):
        for seed in range(3):
            state, _ = kernel.step(state, torch.Generator().manual_seed(seed))
        _assert_rows_match_single_runs(model, state, row_prompts)
    # Refill: rows of problem 1 replaced by fresh rows of problem 0, then grown; still exact per row.
    fresh, _ = model.extend(target.rows_for([0] * state.num_rows), torch.zeros(state.num_rows, dtype=torch.long),
                            generator=torch.Generator().manual_seed(5))  # fmt: skip
    mixed = state.where(state.problem == 1, fresh)
    mixed, _ = MetropolisHastings(target).step(mixed, torch.Generator().manual_seed(6))
    _assert_rows_match_single_runs(model, mixed, [prompts[k] for k in mixed.problem.tolist()])


# ---------------------------------------------------------------- per-row random streams


def _run_unit_rows(target, problems, seeds, kernel_spec, steps, refill_at=None):
    """Rows of ``problems`` with streams seeded by ``seeds``: a low-temperature start then ``steps`` kernel steps.
    With ``refill_at``, the rows of problem 0 are replaced by fresh rows (new streams) after that many steps."""
    streams = Streams(seeds)
    rows = target.rows_for(problems).with_(stream=torch.arange(len(seeds)))
    state, _ = target.lm.extend(rows, torch.zeros(rows.num_rows, dtype=torch.long), generator=streams)
    kernel = build_kernel(kernel_spec, target)
    for step in range(steps):
        if step == refill_at:
            fresh_streams = torch.tensor([streams.add(1000 + i) for i in range(state.num_rows)])
            fresh = target.rows_for([0] * state.num_rows).with_(stream=fresh_streams)
            fresh, _ = target.lm.extend(fresh, torch.zeros(state.num_rows, dtype=torch.long), generator=streams)
            state = state.where(state.problem == 0, fresh)
        state, _ = kernel.step(state, streams)
    return state


@pytest.mark.parametrize("kernel", ["mh", "mtm", "egps", "mixture(mh:0.5,mtm:0.5)", "entropy-cut-mh"])
def test_a_unit_with_its_own_streams_does_not_depend_on_its_batch(kernel):
    target = PowerDistribution(MODEL, [list(p) for p in PROMPTS], alpha=2.0, max_new_tokens=6)
    alone = _run_unit_rows(target, [2, 2, 2], [100, 101, 102], kernel, steps=6)
    mixed = _run_unit_rows(target, [0, 2, 1, 2, 0, 2], [7, 100, 8, 101, 9, 102], kernel, steps=6, refill_at=3)
    unit = mixed.take(torch.tensor([1, 3, 5]))
    assert torch.equal(unit.tokens, alone.tokens) and torch.equal(unit.length, alone.length)
    # Without streams the shared generator makes the unit depend on its neighbours.
    g = torch.Generator().manual_seed(0)
    shared = target.lm.extend(target.rows_for([0, 2, 2, 2]), torch.zeros(4, dtype=torch.long), generator=g)[0]
    g = torch.Generator().manual_seed(0)
    shared_alone = target.lm.extend(target.rows_for([2, 2, 2]), torch.zeros(3, dtype=torch.long), generator=g)[0]
    assert not torch.equal(shared.tokens[1:], shared_alone.tokens)


def test_streams_on_a_transformers_model_float64():
    model = tiny_gpt2(dtype="float64")
    target = PowerDistribution(model, ["The cat", "A much longer prompt here", "x"], alpha=2.0, max_new_tokens=10)
    alone = _run_unit_rows(target, [1, 1], [5, 6], "mtm", steps=3)
    mixed = _run_unit_rows(target, [0, 1, 2, 1], [1, 5, 2, 6], "mtm", steps=3, refill_at=1)
    unit = mixed.take(torch.tensor([1, 3]))
    assert torch.equal(unit.tokens, alone.tokens)
    torch.testing.assert_close(unit.logp, alone.logp, atol=1e-9, rtol=0)


def test_streams_need_a_stream_per_row():
    target = PowerDistribution(MODEL, [2], alpha=2.0, max_new_tokens=4)
    with pytest.raises(EGPSError, match="stream of every row"):
        target.lm.extend(target.empty(2), torch.zeros(2, dtype=torch.long), generator=Streams([1, 2]))


# ---------------------------------------------------------------- continuous batching across units


def _units(prompts, seeds):
    from egps_ppl.infer.batched import Unit

    return [Unit((i, s), list(p), 1000 * i + s) for i, p in enumerate(prompts) for s in seeds]


def _outputs(sampler, lm, units, max_units, max_new_tokens=6):
    from egps_ppl.infer.batched import run_units

    outs = {o.key: o for o in run_units(sampler, lm, units, 2.0, max_new_tokens, max_units=max_units)}
    assert sorted(outs) == sorted(u.key for u in units)
    return outs


@pytest.mark.parametrize("spec", ["mh", "egps", "low-temp", "best-of-n", "smc"])
def test_unit_records_do_not_depend_on_how_many_units_share_the_batch(spec):
    from egps_ppl.infer import load_sampler

    settings = {"mh": {"steps": 4, "num_chains": 3}, "egps": {"steps": 4, "num_chains": 3}}.get(spec, {})
    if spec == "smc":
        settings = {"particles": 16, "ess_every": 1}  # resampling at every token: populations must stay apart
    sampler = load_sampler(spec, **settings)
    units = _units(PROMPTS, seeds=[0, 1, 2])
    alone = _outputs(sampler, MODEL, units, max_units=1)
    for max_units in (4, 12):
        together = _outputs(sampler, MODEL, units, max_units=max_units)
        for key, out in alone.items():
            other = together[key].result
            assert torch.equal(out.result.samples.tokens, other.samples.tokens), key
            assert out.result.chosen == other.chosen
            assert torch.equal(out.result.cost.decode_tokens, other.cost.decode_tokens)


def test_batched_units_on_a_transformers_model_match_across_batch_sizes():
    from egps_ppl.infer import load_sampler

    model = tiny_gpt2(dtype="float64")
    prompts = [model.encode(t) for t in ("The cat", "A much longer prompt than that", "x y")]
    units = _units(prompts, seeds=[0, 1])
    sampler = load_sampler("mtm", steps=3, num_chains=2)
    alone = _outputs(sampler, model, units, max_units=1, max_new_tokens=8)
    together = _outputs(sampler, model, units, max_units=6, max_new_tokens=8)
    for key, out in alone.items():
        assert torch.equal(out.result.samples.tokens, together[key].result.samples.tokens)
        torch.testing.assert_close(out.result.samples.logp, together[key].result.samples.logp, atol=1e-9, rtol=0)
    # Each unit's chains really are its prompt's: rescoring the chosen row alone gives the same log p.
    for (i, _), out in together.items():
        single, _ = model.from_tokens(
            prompts[i], [out.result.samples.row_tokens(out.result.chosen)], 8, PowerPolicy(2.0)
        )
        torch.testing.assert_close(single.log_p()[0], out.result.samples.log_p()[out.result.chosen], atol=1e-9, rtol=0)


def test_unbatchable_samplers_are_refused():
    from egps_ppl.infer import load_sampler
    from egps_ppl.infer.batched import Unit, run_units, supports_batching
    from egps_ppl.infer.samplers import SamplerResult

    class OwnSampler:  # a user's sampler: only run(target, generator)
        name = "own"

        def config(self):
            return {"name": self.name}

        def run(self, target, generator=None):
            seqs, cost = target.sample_proposal(1, generator)
            return SamplerResult(seqs, 0, cost)

    assert supports_batching(load_sampler("sps")) and supports_batching(load_sampler("smc"))
    assert not supports_batching(OwnSampler())
    with pytest.raises(EGPSError, match="cannot be batched"):
        next(run_units(OwnSampler(), MODEL, [Unit(0, [1], 0)], 2.0, 4))


def test_smc_populations_in_one_batch_match_exact_pi_per_problem():
    """Power-SMC over a plate: each problem's weighted particles estimate its own exact final-token marginal."""
    from egps_ppl.infer.smc import PowerSMC
    from egps_ppl.models.exact import ExactPower

    target = PowerDistribution(MODEL, [list(p) for p in PROMPTS], alpha=2.0, max_new_tokens=4)
    n = 4000
    rows = target.rows_for(torch.arange(len(PROMPTS)).repeat_interleave(n), PowerPolicy(2.0))
    results = PowerSMC(num_particles=n, check_every=1).run_populations(target, rows, torch.Generator().manual_seed(0))
    for k, result in enumerate(results):
        exact = ExactPower(MODEL, 2.0, 4, list(PROMPTS[k]))
        support, log_pi = exact.enumerate()
        probs = dict(zip(support, log_pi.exp().tolist(), strict=True))
        weights = result.log_weights.exp()
        estimate = sum(float(w) for w, row in zip(weights, range(n), strict=True)
                       if len(result.samples.row_tokens(row)) == 1)  # fmt: skip
        truth = sum(p for s, p in probs.items() if len(s) == 1)
        assert abs(estimate - truth) < 0.03, (k, estimate, truth)


# ---------------------------------------------------------------- MCMC and its ArviZ export over a plate


def test_mcmc_over_a_plate_exports_one_problem_dimension(tmp_path):
    from egps_ppl.diagnostics import format_summary, load_netcdf, posterior_dataset, save_netcdf, select_problem
    from egps_ppl.infer import MCMC

    target = PowerDistribution(MODEL, [list(p) for p in PROMPTS], alpha=2.0, max_new_tokens=4)
    mcmc = MCMC(MetropolisHastings(target), num_samples=12, warmup_steps=2, num_chains=3, seed=0, progress=False)
    mcmc.run()
    data = load_netcdf(save_netcdf(mcmc.to_arviz(), tmp_path / "plate.nc"))
    tokens = posterior_dataset(data)["tokens"]
    assert tokens.dims == ("chain", "draw", "problem", "position") and tokens.shape == (3, 12, len(PROMPTS), 4)
    # Problem k's chains are rows k*C .. k*C+C-1 of the runner's draws.
    rows = mcmc.get_samples()["tokens"]
    assert (tokens.isel(problem=2).values == rows[6:9]).all()
    summary = mcmc.summary()
    assert summary["num_problems"] == len(PROMPTS) and summary["problems"][0]["num_chains"] == 3
    assert "problem 3:" in format_summary(summary)
    one = posterior_dataset(select_problem(data, 1))
    assert "problem" not in one.dims and one["log_p"].shape == (3, 12)


def test_egps_sample_with_several_prompts(tmp_path, capsys):
    from egps_ppl.cli import main
    from egps_ppl.diagnostics import load_netcdf, posterior_dataset

    out = tmp_path / "two.nc"
    args = ["sample", "--model", "tiny-gpt2", "--prompt", "Hello", "--prompt", "A longer prompt", "--alpha", "4"]
    args += ["--num-chains", "2", "--num-samples", "3", "--warmup", "1", "--max-new-tokens", "5", "--no-progress"]
    assert main([*args, "--threads", "1", "--out", str(out)]) == 0
    assert posterior_dataset(load_netcdf(out))["log_p"].dims == ("chain", "draw", "problem")
    printed = capsys.readouterr().out
    assert "problem 1, chain 0" in printed and "2 chains per problem (2 problems)" in printed
