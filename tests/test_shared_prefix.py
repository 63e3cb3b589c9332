"""Shared-prefix KV (one copy of the prompt positions all rows have in common) equals the copied layout."""

from __future__ import annotations

import warnings

import pytest
import torch
from test_hf import BUILDERS, STATS, _ops, assert_same

from egps_ppl.infer.batched import concat
from egps_ppl.kernels import MetropolisHastings, MultipleTryMetropolis
from egps_ppl.models.hf import HFModel
from egps_ppl.models.kv_pool import KVPool
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.target import PowerDistribution

HEAD = "Q: add the numbers and answer. "


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def trio(request: pytest.FixtureRequest) -> tuple[HFModel, HFModel, HFModel]:
    """(shared prefix, copied prompt, recompute from the prompt) in float64 with identical weights."""
    build = BUILDERS[request.param]
    return (
        build(dtype="float64"),
        build(dtype="float64", share_prefix=False),
        build(dtype="float64", reuse_cache=False),
    )


def test_shared_prefix_equals_the_copied_layout_after_realistic_operations(trio):
    shared, copied, _ = trio
    assert shared.share_prefix and not copied.share_prefix
    hist_s, scored_s, decoded_s = _ops(shared, seed=5)
    hist_c, scored_c, decoded_c = _ops(copied, seed=5)
    for a, b in zip(hist_s, hist_c, strict=True):
        assert_same(a, b, tol=1e-9)
    assert (scored_s, decoded_s) == (scored_c, decoded_c)  # the same work, counted the same way
    # The prompt lives once in the prefix, not in every row's slots.
    first_s, first_c = hist_s[0].cache, hist_c[0].cache
    assert first_s.prefix_length == len(shared.encode("Once upon")) - 1
    assert first_s.num_slots == first_c.num_slots - first_s.prefix_length


def _rows_equal_reference(state, reference_state, tol: float = 1e-9) -> None:
    assert torch.equal(state.tokens, reference_state.tokens)
    for stat in STATS:
        diff = (getattr(state, stat) - getattr(reference_state, stat)).abs().max().item()
        assert diff <= tol, f"{stat} differs by {diff}"


def test_a_plate_with_a_common_head_matches_recomputation_through_kernels_and_refills(trio):
    shared, _, reference = trio
    texts = [HEAD + "3 + 4 =", HEAD + "12 + 30 + 1 =", HEAD + "7 =", "unrelated"]
    plate, ref_plate = (PowerDistribution(m, texts[:3], alpha=2.0, max_new_tokens=10) for m in (shared, reference))
    state, _ = plate.sample_proposal(2, torch.Generator().manual_seed(0))
    ref_state, _ = ref_plate.sample_proposal(2, torch.Generator().manual_seed(0))
    _rows_equal_reference(state, ref_state)
    assert state.cache.prefix_length >= len(shared.encode(HEAD))
    for kernel, ref_kernel in (
        (MetropolisHastings(plate), MetropolisHastings(ref_plate)),
        (MultipleTryMetropolis(plate, 3, local_width=3), MultipleTryMetropolis(ref_plate, 3, local_width=3)),
    ):
        for seed in range(2):
            state, _ = kernel.step(state, torch.Generator().manual_seed(seed))
            ref_state, _ = ref_kernel.step(ref_state, torch.Generator().manual_seed(seed))
        _rows_equal_reference(state, ref_state)
    # A refill from another prompt set (its own, longer shared prefix) and one with no common head at all.
    for problem in (2, 0):
        fresh, _ = shared.extend(plate.rows_for([problem]), torch.zeros(1, dtype=torch.long),
                                 generator=torch.Generator().manual_seed(9))  # fmt: skip
        ref_fresh, _ = reference.extend(ref_plate.rows_for([problem]), torch.zeros(1, dtype=torch.long),
                                        generator=torch.Generator().manual_seed(9))  # fmt: skip
        state, ref_state = concat(state, fresh), concat(ref_state, ref_fresh)
    other = PowerDistribution(shared, texts[3:], alpha=2.0, max_new_tokens=10)
    ref_other = PowerDistribution(reference, texts[3:], alpha=2.0, max_new_tokens=10)
    stranger, _ = shared.extend(other.rows_for([0]), torch.zeros(1, dtype=torch.long),
                                generator=torch.Generator().manual_seed(4))  # fmt: skip
    ref_stranger, _ = reference.extend(ref_other.rows_for([0]), torch.zeros(1, dtype=torch.long),
                                       generator=torch.Generator().manual_seed(4))  # fmt: skip
    mixed, ref_mixed = concat(state, stranger), concat(ref_state, ref_stranger)
    assert mixed.cache.prefix is None  # nothing in common with "unrelated": the prefix was copied into the rows
    cut = mixed.length // 2
    moved, _ = shared.extend(mixed, cut, generator=torch.Generator().manual_seed(1))
    ref_moved, _ = reference.extend(ref_mixed, cut, generator=torch.Generator().manual_seed(1))
    _rows_equal_reference(moved, ref_moved)


def test_the_prefix_memo_computes_a_common_head_once():
    model = BUILDERS["llama"](dtype="float64")
    fed: list[int] = []
    forward = model.model.forward

    def counting(*args, **kwargs):
        fed.append(int(kwargs["input_ids"].shape[0] * kwargs["input_ids"].shape[1]))
        return forward(*args, **kwargs)

    model.model.forward = counting
    first, second = model.encode(HEAD + "1 + 1 ="), model.encode(HEAD + "20 + 22 =")
    model.start(first, 3, 8, PowerPolicy())
    assert sum(fed) == len(first) - 1  # the whole prompt but its last token, once for three rows
    fed.clear()
    pool = model.start(second, 3, 8, PowerPolicy()).cache
    head = len(model.encode(HEAD))
    assert sum(fed) <= len(second) - head  # only what follows the head the two prompts share
    assert pool.prefix.length == len(second) - 1 and pool.num_slots == 0


def test_a_pool_whose_prefix_does_not_match_the_rows_is_not_trusted(trio):
    shared, _, reference = trio
    policy = PowerPolicy(alpha=2.0)
    a, _ = shared.extend(shared.start(shared.encode(HEAD + "1 ="), 2, 8, policy), torch.zeros(2, dtype=torch.long),
                         generator=torch.Generator().manual_seed(0))  # fmt: skip
    b = shared.start(shared.encode("Other text"), 2, 8, policy)
    b, _ = shared.extend(b, torch.zeros(2, dtype=torch.long), generator=torch.Generator().manual_seed(1))
    wrong = b.with_(cache=a.cache)  # a pool built for another prompt
    scored, _ = shared.score(wrong, torch.zeros(2, dtype=torch.long))
    ref, _ = reference.score(b.with_(cache=None), torch.zeros(2, dtype=torch.long))
    _rows_equal_reference(scored, ref)


def test_rebase_moves_prefix_positions_into_the_rows(trio):
    shared, _, reference = trio
    policy = PowerPolicy(alpha=2.0)
    seqs, _ = shared.extend(shared.start(shared.encode(HEAD + "5 ="), 3, 8, policy), torch.zeros(3, dtype=torch.long),
                            generator=torch.Generator().manual_seed(2))  # fmt: skip
    pool = seqs.cache
    for keep in (5, 0):
        rebased = pool.rebase(pool.prefix.truncated(keep))
        assert rebased.prefix_length == keep
        assert rebased.num_slots == pool.num_slots + pool.prefix_length - keep
        cut = seqs.length // 2
        again, _ = shared.extend(seqs.with_(cache=rebased), cut, generator=torch.Generator().manual_seed(3))
        ref, _ = reference.extend(seqs.with_(cache=None), cut, generator=torch.Generator().manual_seed(3))
        _rows_equal_reference(again, ref)
    with pytest.raises(ValueError, match="prefix"):
        KVPool.empty(3, "cpu").rebase(pool.prefix)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_half_precision_and_chosen_attention(name):
    build = BUILDERS[name]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the self-check must accept bf16 rounding without a warning
        assert build(dtype="bfloat16").share_prefix
    eager = build(dtype="float64", attn_implementation="eager")
    assert not eager.share_prefix and eager.model.config._attn_implementation == "eager"
