"""The KV slot pool over long runs: bounded slot counts after early cuts, compaction without copies where the
live slots already come first, and ``Mixture`` reassembling its parts' rows exactly (one copy per row)."""

from __future__ import annotations

import os

import torch

from egps_ppl.kernels import MetropolisHastings, MultipleTryMetropolis
from egps_ppl.kernels.combinators import Mixture
from egps_ppl.models.hf import HFModel
from egps_ppl.models.kv_pool import KVPool
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.models.registry import tiny_gpt2, tiny_llama
from egps_ppl.rng import categorical
from egps_ppl.state import Sequences
from egps_ppl.target import PowerDistribution

DEVICE = os.environ.get("EGPS_TEST_DEVICE", "cpu")
STATS = ("logp", "logq", "entropy", "logz")


class EarlySite:
    """Cut uniformly over the first quarter of each row (at least position 0): every proposal invalidates most
    of the pool, the case that used to leave stale slots behind."""

    name = "early"

    def log_probs(self, seqs: Sequences) -> torch.Tensor:
        quarter = (seqs.length // 4).clamp(min=1).unsqueeze(1)
        allowed = seqs.positions() < torch.minimum(quarter, seqs.length.unsqueeze(1))
        n = allowed.sum(1, keepdim=True).clamp(min=1).double()
        return torch.where(allowed, -n.log(), torch.full_like(n, -torch.inf))


def row_slots(pool: KVPool, row: int) -> dict[int, tuple[torch.Tensor, ...]]:
    """Position -> (keys of every layer, values of every layer) held by ``row``'s valid slots."""
    out = {}
    for s in (pool.slot_pos[row] >= 0).nonzero().flatten().tolist():
        pos = int(pool.slot_pos[row, s])
        assert pos not in out, "a position held twice"
        out[pos] = tuple(t[row, :, s] for t in pool.keys + pool.values)
    return out


def assert_rows_equal(a: Sequences, ra: int, b: Sequences, rb: int, tol: float = 0.0) -> None:
    assert int(a.length[ra]) == int(b.length[rb])
    assert torch.equal(a.tokens[ra], b.tokens[rb])
    for stat in STATS:
        assert (getattr(a, stat)[ra] - getattr(b, stat)[rb]).abs().max() <= tol
    sa, sb = row_slots(a.cache, ra), row_slots(b.cache, rb)
    assert sa.keys() == sb.keys()
    for pos, tensors in sa.items():
        for x, y in zip(tensors, sb[pos], strict=True):
            assert torch.equal(x, y)


def rescored_from_scratch(lm: HFModel, seqs: Sequences) -> Sequences:
    ref = HFModel(lm.model, lm.tokenizer, reuse_cache=False)
    out, _ = ref.score(seqs.with_(cache=None), torch.zeros_like(seqs.length))
    return out


def test_slots_stay_bounded_over_many_mh_steps_with_early_cuts() -> None:
    lm = tiny_gpt2(dtype="float64", device=DEVICE)
    capacity, chains = 24, 4
    target = PowerDistribution(lm, lm.encode("Once upon"), alpha=4.0, max_new_tokens=capacity)
    kernel = MetropolisHastings(target, selector=EarlySite())
    g = torch.Generator().manual_seed(0)
    state, _ = target.sample_proposal(chains, g)
    state, _ = kernel.prepare(state)
    prompt = int(state.prompt.numel())
    slots, accepted = [], 0
    for _ in range(60):
        state, info = kernel.step(state, g)
        accepted += int(info.accepted.sum())
        slots.append(state.cache.num_slots)
    assert accepted > 0
    # Live slots per row are at most prompt + capacity; a pool never holds more than twice that.
    assert max(slots) <= 2 * (prompt + capacity), slots
    # And the pool is still exact: its statistics are the recomputed ones.
    truth = rescored_from_scratch(lm, state)
    for stat in STATS:
        assert (getattr(truth, stat) - getattr(state, stat)).abs().max() <= 1e-9


def test_an_early_cut_sheds_the_stale_slots_before_decoding() -> None:
    lm = tiny_llama(dtype="float64", device=DEVICE)
    seqs = lm.start(lm.encode("Hello"), 2, 40, PowerPolicy(alpha=2.0))
    full, _ = lm.extend(seqs, torch.zeros(2, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    full = lm.compact(full)
    before = full.cache.num_slots
    out, _ = lm.extend(full, torch.zeros(2, dtype=torch.long), generator=torch.Generator().manual_seed(2))
    # The cut at 0 left only the prompt's slots live: they were kept (a view), the old suffix's slots dropped.
    assert out.cache.num_slots <= int(seqs.prompt.numel()) + int(out.length.max())
    assert out.cache.num_slots < before + int(out.length.max())
    never = tiny_llama(dtype="float64", device=DEVICE, compact_below=0.0)
    same, _ = never.extend(full, torch.zeros(2, dtype=torch.long), generator=torch.Generator().manual_seed(2))
    assert torch.equal(out.tokens, same.tokens)
    for stat in STATS:
        assert (getattr(out, stat) - getattr(same, stat)).abs().max() <= 1e-9
    assert same.cache.num_slots > out.cache.num_slots


def test_compacting_a_sorted_prefix_is_a_view_and_equals_the_gather() -> None:
    C, H, S, D = 3, 2, 6, 4
    keys = (torch.randn(C, H, S, D),)
    values = (torch.randn(C, H, S, D),)
    pos = torch.tensor([[0, 1, 2, -1, -1, -1], [0, 1, -1, -1, -1, -1], [0, 1, 2, 3, -1, -1]])
    pool = KVPool(keys, values, pos, pos.clone())
    fast = pool.compact()
    assert fast.num_slots == 4 and fast.keys[0].data_ptr() == keys[0].data_ptr()
    # The same slots out of order go through the gather and give the same pool.
    perm = torch.tensor([3, 0, 5, 1, 2, 4])
    shuffled = KVPool((keys[0][:, :, perm],), (values[0][:, :, perm],), pos[:, perm], pos[:, perm].clone())
    slow = shuffled.compact()
    assert slow.keys[0].data_ptr() != shuffled.keys[0].data_ptr()
    for row in range(C):
        a, b = row_slots(fast, row), row_slots(slow, row)
        assert a.keys() == b.keys() and all(torch.equal(x, y) for p in a for x, y in zip(a[p], b[p], strict=True))


def test_mixture_result_equals_the_unmixed_kernels_rows() -> None:
    lm = tiny_gpt2(dtype="float64", device=DEVICE)
    target = PowerDistribution(lm, lm.encode("The cat"), alpha=4.0, max_new_tokens=12)
    kernels = [MetropolisHastings(target), MultipleTryMetropolis(target, num_tries=3)]
    mixture = Mixture(kernels, [0.5, 0.5])
    state, _ = target.sample_proposal(8, torch.Generator().manual_seed(0))
    state, _ = mixture.prepare(state)
    mixed, _ = mixture.step(state, torch.Generator().manual_seed(5))
    # The same draws by hand: the mixture's choice, then each kernel alone on its rows.
    g = torch.Generator().manual_seed(5)
    choice = categorical(mixture.weights, state.num_rows, g, state.stream)
    assert 0 < int(choice.sum()) < state.num_rows, "both kernels must get rows for this test to mean anything"
    for j, kernel in enumerate(kernels):
        rows = (choice == j).nonzero().flatten()
        alone, _ = kernel.step(state.take(rows), g)
        for k, row in enumerate(rows.tolist()):
            assert_rows_equal(mixed, row, alone, k)
    assert mixed.cache.num_rows == state.num_rows
    # The reassembled pool is exact for further steps.
    nxt, _ = mixture.step(mixed, torch.Generator().manual_seed(6))
    truth = rescored_from_scratch(lm, nxt)
    for stat in STATS:
        assert (getattr(truth, stat) - getattr(nxt, stat)).abs().max() <= 1e-9


def test_a_mixture_whose_rows_all_pick_one_kernel_copies_no_pool_rows() -> None:
    lm = tiny_gpt2(dtype="float64", device=DEVICE)
    target = PowerDistribution(lm, lm.encode("ab"), alpha=4.0, max_new_tokens=8)
    mh = MetropolisHastings(target)
    state, _ = target.sample_proposal(3, torch.Generator().manual_seed(0))
    state, _ = mh.prepare(state)
    taken = []
    original = KVPool.rows

    def spy(self: KVPool, index: torch.Tensor) -> KVPool:
        taken.append(index)
        return original(self, index)

    mixture = Mixture([mh, MetropolisHastings(target)], [1.0, 0.0])
    KVPool.rows = spy  # type: ignore[method-assign]
    try:
        mixed, _ = mixture.step(state, torch.Generator().manual_seed(1))
    finally:
        KVPool.rows = original  # type: ignore[method-assign]
    alone, _ = mh.step(state, torch.Generator().manual_seed(1))
    assert not taken
    for row in range(state.num_rows):
        assert_rows_equal(mixed, row, alone, row)
