"""A transformers causal LM as an egps_ppl backend, with KV reuse through a slot pool.

The backend cache of a batch (``Sequences.cache``) is a :class:`~egps_ppl.models.kv_pool.KVPool`: per layer
keys/values ``[C, heads, S, head_dim]`` and ``slot_pos[C, S]``, the absolute position each slot holds for each
row (``-1``: not valid for that row). Every forward call passes the pool as a ``DynamicCache``, a 2-D attention
mask that is 1 on the row's valid slots and on the newly fed tokens, and explicit ``position_ids``; the new
tokens are appended as new slots. Hence

* cutting a row at completion position ``i`` = invalidating its slots at positions ``>= P + i - 1`` and
  re-feeding token ``x_{i-1}`` (the last prompt token when ``i = 0``): a cut at ``i`` of an ``n``-token
  completion costs ``n - i`` decode steps plus one re-fed token;
* a cut that leaves many stale slots behind (an early cut) is followed by a compaction when attending to and
  carrying those slots through the coming decode calls would cost more than one gather of the live slots
  (:meth:`HFModel._shed_stale`; a slice, no copy, when the live slots already come first), so an early cut
  decodes over as many slots as a fresh cache would;
* the decode calls of one ``extend`` append into a per-call preallocated buffer (:class:`_SlotBuffer`) instead
  of concatenating the whole pool at every step; pools handed out are views of its filled part, never written
  again, so pools stay immutable values shared through lineage;
* rows decode in lock-step; rows that are done feed a dummy token whose slot is recorded invalid;
* ``score`` feeds each row's tokens from its start in one call (rows right-padded);
* ``Sequences.where`` after an accept/reject only swaps ``slot_pos`` rows when the proposal's pool descends from
  the current one (else copies each row from its side), and ``Sequences.take`` selects rows of the pool (the
  pool is the batch's :class:`~egps_ppl.state.RowCache`).

Invariant of a pool attached to ``Sequences``: the valid slots of row ``c`` hold positions ``0..m_c-1`` of
``prompt + tokens[c]`` exactly once, computed with exactly that prefix as context (normally ``m_c`` is
``P + length_c - 1``: the last sampled token is fed only when something needs its successor). Before reusing a
pool, each call checks that the recorded slot tokens still match the row's tokens, so a stale pool is cut and
recomputed, never trusted.

``reuse_cache=False`` keeps no pool: every call recomputes from the prompt (the reference path).
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from egps_ppl.errors import EGPSError, ModelFileError
from egps_ppl.models.base import Cost, LanguageModel, NextToken, next_token_stats, sample_tokens
from egps_ppl.models.kv_pool import KVPool
from egps_ppl.models.policy import PowerPolicy
from egps_ppl.models.shared_prefix import ATTENTION, SharedPrefix, active_prefix, common_length, register
from egps_ppl.state import PAD, Sequences

_DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "float": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
    "half": torch.float16,
    "float64": torch.float64,  # for exact comparisons in tests; slow
    "fp64": torch.float64,
}

PREFIX_MEMO = 8
"""Shared prefixes a backend keeps (most recent first): enough for a batch, its refills and the next problems."""

STATS_BUDGET = 2**25
"""Most logits (rows x vocabulary) turned into statistics at once, to bound float32 temporaries."""


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``, ``"bfloat16"``/``"bf16"``, ``"float16"``/``"fp16"``, ``"float64"`` (or a torch dtype)."""
    if isinstance(dtype, torch.dtype):
        if dtype in _DTYPES.values():
            return dtype
    elif isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise EGPSError(f"dtype must be one of float32, bfloat16, float16, float64; got {dtype!r}")


@contextlib.contextmanager
def hub_offline() -> Iterator[None]:
    """Set ``HF_HUB_OFFLINE=1`` for the duration (restored afterwards)."""
    old = os.environ.get("HF_HUB_OFFLINE")
    os.environ["HF_HUB_OFFLINE"] = "1"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("HF_HUB_OFFLINE", None)
        else:
            os.environ["HF_HUB_OFFLINE"] = old


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _short(exc: BaseException, limit: int = 300) -> str:
    text = str(exc).strip().splitlines()
    first = text[0] if text else type(exc).__name__
    return first if len(first) <= limit else first[: limit - 3] + "..."


@dataclass
class _Feed:
    """What a :meth:`HFModel._feed` call produced."""

    pool: KVPool
    calls: int
    # mode "last": per-row next-token statistics after the row's last fed token (rows without a feed: zeros)
    last: NextToken | None = None
    # mode "targets": float64[C, T] statistics of the fed rows' next tokens, by completion position
    logp: torch.Tensor | None = None
    logq: torch.Tensor | None = None
    entropy: torch.Tensor | None = None
    logz: torch.Tensor | None = None


class HFModel(LanguageModel):
    """A ``transformers`` causal language model (any local folder, hub id or GGUF file).

    Parameters
    ----------
    model:
        A loaded ``AutoModelForCausalLM`` (its dtype is used for the forward pass; statistics are float32).
    tokenizer:
        Optional tokenizer with ``encode``/``decode`` (and ``chat_template`` for chat prompts).
    name:
        Display name (defaults to the model's ``name_or_path``).
    reuse_cache:
        Keep a KV slot pool in ``Sequences.cache`` (default). ``False`` recomputes from the prompt on every call.
    chunk_size:
        Most tokens per row fed in one forward call when teacher forcing (longer chunks are split).
    compact_below:
        After ``Sequences.where``/``take``, compact the pool when every row uses at most this fraction of its slots
        (``0`` never compacts; ``1`` compacts whenever no row uses all slots).
    share_prefix:
        Store the prompt positions all rows have in common once (a
        :class:`~egps_ppl.models.shared_prefix.SharedPrefix`: the few-shot part of a task's prompts, or one prompt
        for all its chains and tries) and attend to it with the ``"egps_shared_prefix"`` attention, instead of
        copying it into every row (default). It switches a model that uses SDPA attention (``transformers``'
        default) to that implementation, which is SDPA when no prefix is active; a model loaded with another
        attention implementation keeps it and the copied layout, and one whose attention fails a one-call
        self-check at construction keeps SDPA and the copied layout, with a warning.
    """

    requires_prompt = True

    def __init__(
        self,
        model: Any,
        tokenizer: Any = None,
        *,
        name: str | None = None,
        reuse_cache: bool = True,
        chunk_size: int = 512,
        compact_below: float = 0.5,
        share_prefix: bool = True,
    ) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        config = model.config
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        out_features = getattr(head, "out_features", None) if head is not None else None
        self.vocab_size = int(out_features or text.vocab_size)
        ctx = getattr(text, "max_position_embeddings", None) or getattr(text, "n_positions", None)
        self.context_length = int(ctx) if ctx else None
        self.eos_token_id = _eos_id(tokenizer, model)
        self.name = name or str(getattr(config, "name_or_path", "") or type(model).__name__)
        self.device = next(model.parameters()).device
        self.chunk_size = max(1, int(chunk_size))
        self.compact_below = float(compact_below)
        params = inspect.signature(model.forward).parameters
        self._cache_kw = "cache" if "cache" in params else "past_key_values"
        self._keep_logits = "logits_to_keep" in params
        self.reuse_cache = bool(reuse_cache)
        if self.reuse_cache and not _pool_compatible(text, self.context_length):
            warnings.warn(
                f"{self.name}: sliding-window or non-standard attention; KV reuse is off (recomputing from the "
                "prompt on every call)",
                stacklevel=2,
            )
            self.reuse_cache = False
        self._prompt_memo: tuple[tuple[int, ...], KVPool] | None = None
        self._prefixes: list[SharedPrefix] = []
        self.share_prefix = bool(share_prefix) and self.reuse_cache and self._enable_shared_prefix()

    def _enable_shared_prefix(self) -> bool:
        """Switch the model to shared-prefix attention if one self-check call agrees with the copied layout."""
        original = getattr(self.model.config, "_attn_implementation", None)
        if original not in ("sdpa", ATTENTION):
            return False  # an implementation the user chose (eager, flash, ...) is kept: no sharing
        try:
            register()
            self.model.set_attn_implementation(ATTENTION)
            ids = (torch.arange(6) * 7 + 3) % self.vocab_size
            full = ids.view(1, -1).to(self.device)
            one = torch.ones(1, dtype=torch.long)
            policy = PowerPolicy()
            whole = self._feed(KVPool.empty(1, self.device), full, 0 * one, 6 * one, policy, 6 * one, 0).last
            head = self._feed(KVPool.empty(1, self.device), full, 0 * one, 3 * one, policy, 6 * one, 0).pool
            prefix = SharedPrefix(tuple(ids[:3].tolist()), head.keys, head.values)
            split = self._feed(KVPool.empty(1, self.device, prefix), full, 3 * one, 6 * one, policy, 6 * one, 0).last
            if self.model.dtype in (torch.float32, torch.float64):
                agree = torch.allclose(whole.logp, split.logp, atol=1e-3, rtol=0)
            else:  # half precision: rounding differs by an ulp or two per layer; a wrong attention is far off
                agree = torch.allclose(whole.logp.exp(), split.logp.exp(), atol=5e-2, rtol=0)
            if not agree:
                raise EGPSError("shared-prefix attention disagrees with the model's own attention")
            return True
        except Exception as exc:
            if original is not None:
                with contextlib.suppress(Exception):
                    self.model.set_attn_implementation(original)
            warnings.warn(f"{self.name}: prefix sharing is off ({_short(exc)})", stacklevel=3)
            return False

    # ------------------------------------------------------------ loading
    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        gguf_file: str | None = None,
        device: str = "cpu",
        dtype: str | torch.dtype = "float32",
        *,
        with_tokenizer: bool = True,
        name: str | None = None,
        **kwargs: Any,
    ) -> HFModel:
        """Load a local folder, a hub id, or a GGUF file (``name_or_path`` = its folder, ``gguf_file`` = its name;
        a path ending in ``.gguf`` is split that way).

        Parameters
        ----------
        name_or_path:
            Local folder, hub id (``owner/name``), or path to a ``.gguf`` file.
        gguf_file:
            File name of a GGUF checkpoint inside ``name_or_path`` (needs the ``gguf`` and ``accelerate`` packages).
        device:
            ``"cpu"``, ``"cuda"``, ``"cuda:1"``, ...
        dtype:
            Weights/activations dtype: ``"float32"`` (default), ``"bfloat16"``, ``"float16"``.
        with_tokenizer:
            Also load the tokenizer (text prompts, decoding).
        name:
            Display name.
        **kwargs:
            Passed to :class:`HFModel` (``reuse_cache``, ``chunk_size``, ``compact_below``).

        Raises
        ------
        EGPSError
            The model is not a local path and the hub is offline or unreachable, or the device/dtype is unusable.
        ModelFileError
            The GGUF file or checkpoint is missing or malformed.
        """
        torch_dtype = parse_dtype(dtype)
        path = str(name_or_path)
        if gguf_file is None and path.lower().endswith(".gguf"):
            folder, gguf_file = os.path.split(path)
            path = folder or "."
        device_t = _check_device(device)
        local = Path(path).expanduser().exists()
        if gguf_file is not None:
            gpath = Path(path).expanduser() / gguf_file
            _check_gguf(gpath)
            path = str(Path(path).expanduser())
        elif not local and (_looks_like_path(path) or _offline()):
            where = "HF_HUB_OFFLINE=1 is set" if _offline() else "it is not a hub id of the form owner/name"
            raise EGPSError(
                f"model {path!r} is not a local folder and cannot be fetched from the hub ({where}); pass a local "
                "model folder, a .gguf file (or folder with gguf_file=...), or a registry name such as "
                "'smollm2-135m' or 'tiny-gpt2'"
            )
        from transformers import AutoModelForCausalLM, AutoTokenizer

        load_kw: dict[str, Any] = {"dtype": torch_dtype}
        if gguf_file is not None:
            load_kw["gguf_file"] = gguf_file
        if local or gguf_file is not None:
            load_kw["local_files_only"] = True
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = AutoModelForCausalLM.from_pretrained(path, **load_kw)
        except EGPSError:
            raise
        except Exception as exc:
            raise _load_error(path, gguf_file, local, exc) from None
        tokenizer = None
        if with_tokenizer:
            # A checkpoint without tokenizer files is still usable with token ids.
            tok_kw = {k: v for k, v in load_kw.items() if k != "dtype"}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    tokenizer = AutoTokenizer.from_pretrained(path, **tok_kw)
                # transformers may build an empty tokenizer from the model type alone: not usable.
                if len(tokenizer) < 2:
                    raise ValueError("the tokenizer files are missing (empty vocabulary)")
            except Exception as exc:
                tokenizer = None
                warnings.warn(f"{path}: no usable tokenizer ({_short(exc)}); pass token ids", stacklevel=2)
        model = model.to(device_t)
        return cls(model, tokenizer, name=name or (gguf_file or path), **kwargs)

    # ------------------------------------------------------------ text
    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (the tokenizer's own special tokens, e.g. a BOS, included)."""
        if self.tokenizer is None:
            return super().encode(text)
        return list(self.tokenizer.encode(text))

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ``ids`` (special tokens such as EOS dropped)."""
        if self.tokenizer is None:
            return super().decode(ids)
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer has a chat template."""
        return self.tokenizer is not None and bool(getattr(self.tokenizer, "chat_template", None))

    def encode_chat(self, messages: Sequence[dict[str, str]]) -> list[int]:
        """Token ids of ``messages`` through the tokenizer's chat template, with the generation prompt (the
        assistant's turn) appended; an :class:`~egps_ppl.errors.EGPSError` when there is no template."""
        if not self.has_chat_template:
            return super().encode_chat(messages)
        ids = self.tokenizer.apply_chat_template(list(messages), add_generation_prompt=True, tokenize=True)
        if hasattr(ids, "keys") and "input_ids" in ids:
            ids = ids["input_ids"]
        return [int(i) for i in ids]

    # ------------------------------------------------------------ forward machinery
    def _dynamic_cache(self, pool: KVPool) -> Any:
        from transformers.cache_utils import DynamicCache

        if pool.num_slots == 0:
            return DynamicCache()
        # Build the layers from empty slices, then hand them the pool tensors: avoids one copy per call.
        empty = [(k[:, :, :0], v[:, :, :0]) for k, v in zip(pool.keys, pool.values, strict=True)]
        cache = DynamicCache(ddp_cache_data=empty)
        for layer, k, v in zip(cache.layers, pool.keys, pool.values, strict=True):
            layer.keys, layer.values = k, v
        return cache

    def _forward(
        self,
        pool: KVPool,
        tok: torch.Tensor,
        pos: torch.Tensor,
        new_valid: torch.Tensor,
        keep: torch.Tensor,
        buffer: _SlotBuffer | None = None,
    ) -> tuple[torch.Tensor, KVPool]:
        """Feed ``tok[C, L]`` at absolute positions ``pos[C, L]`` after the pool's slots.

        Returns the logits of the positions in ``keep`` (``bool[C, L]``) as ``[keep.sum(), V]`` (row-major order)
        and the pool with the ``L`` new slots appended (slots where ``new_valid`` is false recorded invalid). With
        ``buffer`` (whose filled part ``pool`` is), the new slots are written into it instead of concatenated.
        """
        C, L = tok.shape
        dev = self.device
        cache = self._dynamic_cache(pool)
        if buffer is not None:
            buffer.attach(cache, pool)
        # New tokens are always visible within this call (a padded query then attends to itself, never to an
        # empty set, so no NaN can enter the pool); real tokens precede pads, so they never see them.
        mask = torch.cat([pool.valid(), torch.ones(C, L, dtype=torch.bool, device=dev)], 1).long()
        hi = (self.context_length or 2**31) - 1
        kwargs: dict[str, Any] = {
            "input_ids": tok.to(dev),
            "attention_mask": mask,
            "position_ids": pos.clamp(0, hi).to(dev),
            self._cache_kw: cache,
            "use_cache": True,
        }
        keep_d = keep.to(dev)
        if self._keep_logits:
            kwargs["logits_to_keep"] = keep_d
        try:
            with torch.no_grad(), active_prefix(pool.prefix):
                out = self.model(**kwargs)
        finally:
            if buffer is not None:
                _SlotBuffer.detach(cache)
        logits = out.logits
        if logits.dim() == 3:
            logits = logits[keep_d] if logits.shape[1] == L else None
        if logits is None or logits.shape[0] != int(keep_d.sum()):
            raise EGPSError(f"{self.name}: unexpected logits shape from the model; try reuse_cache=False")
        layers = list(cache.layers)
        keys = [layer.keys for layer in layers]
        values = [layer.values for layer in layers]
        if any(k is None or k.dim() != 4 or k.shape[2] != pool.num_slots + L for k in keys):
            raise EGPSError(f"{self.name}: the model's KV cache layout is not supported; use reuse_cache=False")
        new_pos = torch.where(new_valid.to(dev), pos.to(dev), torch.full_like(pos, -1, device=dev))
        new_tok = torch.where(new_valid.to(dev), tok.to(dev), torch.full_like(tok, -1, device=dev))
        return logits, pool.appended(keys, values, new_pos, new_tok)

    def _feed(
        self,
        pool: KVPool,
        full: torch.Tensor,
        lo: torch.Tensor,
        hi: torch.Tensor,
        policy: PowerPolicy,
        prompt_len: torch.Tensor,
        capacity: int,
        need_from: torch.Tensor | None = None,
    ) -> _Feed:
        """Teacher-force, per row, the tokens at absolute positions ``lo[c] <= p < hi[c]`` of ``full``.

        With ``need_from`` (mode "targets"), return the statistics of ``full[c, p + 1]`` for fed positions
        ``p >= need_from[c]``, indexed by completion position ``p + 1 - P``. Without it (mode "last"), return the
        next-token statistics after each row's last fed token.
        """
        C = full.shape[0]
        dev = self.device
        lo, hi = lo.to(dev), hi.to(dev)
        count = (hi - lo).clamp(min=0)
        longest = int(count.max()) if C else 0
        result = _Feed(pool, 0)
        if need_from is None:
            last = None
        else:
            need_from = need_from.to(dev)
            z = torch.zeros(C, capacity, dtype=torch.float64)
            result.logp, result.logq, result.entropy, result.logz = z, z.clone(), z.clone(), z.clone()
        full_d = full.to(dev)
        # Bound the logits of one call (C x width x V floats) as well as the tokens per row.
        width_cap = max(1, min(self.chunk_size, (4 * STATS_BUDGET) // max(1, C * self.vocab_size)))
        for offset in range(0, longest, width_cap):
            width = min(width_cap, longest - offset)
            j = torch.arange(offset, offset + width, device=dev)
            pos = lo.unsqueeze(1) + j.unsqueeze(0)
            valid = j.unsqueeze(0) < count.unsqueeze(1)
            tok = torch.where(valid, full_d.gather(1, pos.clamp(0, full.shape[1] - 1)), torch.zeros_like(pos))
            if need_from is None:
                keep = valid & (pos == (hi - 1).unsqueeze(1))
            else:
                keep = valid & (pos >= need_from.unsqueeze(1))
            logits, result.pool = self._forward(result.pool, tok, pos, valid, keep)
            result.calls += 1
            rows, cols = keep.nonzero(as_tuple=True)
            if rows.numel() == 0:
                continue
            if need_from is None:
                stats = _stats(logits, policy)
                if last is None:
                    V = stats.logp.shape[-1]
                    kw = {"device": dev, "dtype": stats.logp.dtype}
                    last = NextToken(
                        torch.zeros(C, V, **kw), torch.zeros(C, V, **kw), torch.zeros(C, **kw), torch.zeros(C, **kw)
                    )
                last.logp[rows] = stats.logp
                last.logq[rows] = stats.logq
                last.entropy[rows] = stats.entropy
                last.logz[rows] = stats.logz
            else:
                p = pos[rows, cols]
                target = full_d[rows, p + 1]
                lp, lq, ent, lz = _target_stats(logits, target, policy)
                r_cpu = rows.cpu()
                t_cpu = p.cpu() + 1 - prompt_len[r_cpu]
                result.logp[r_cpu, t_cpu] = lp.double().cpu()
                result.logq[r_cpu, t_cpu] = lq.double().cpu()
                result.entropy[r_cpu, t_cpu] = ent.double().cpu()
                result.logz[r_cpu, t_cpu] = lz.double().cpu()
        if need_from is None:
            result.last = last
        return result

    def _shed_stale(self, pool: KVPool, calls: int) -> KVPool:
        """``pool`` compacted when its stale slots (left by a cut) would cost more to attend to and carry through
        the next ``calls`` forward calls than one gather of the live slots (a slice when they already come first).

        ``compact_below = 0`` turns this off, as it turns off compaction after ``where``/``take``.
        """
        if self.compact_below <= 0 or pool.num_slots == 0:
            return pool
        stale = pool.stale_slots()
        if stale > 0 and stale * max(1, calls) >= pool.num_slots:
            return pool.compact()
        return pool

    def _working_pool(self, seqs: Sequences) -> KVPool:
        """The pool to continue from: ``seqs.cache`` when reusing, else an empty pool (recompute from the prompt)."""
        cache = seqs.cache if self.reuse_cache else None
        if cache is None:
            return KVPool.empty(seqs.num_rows, self.device)
        if not isinstance(cache, KVPool) or cache.num_rows != seqs.num_rows:
            raise EGPSError(f"{self.name}: Sequences.cache is not this backend's KV pool (rows do not match)")
        if cache.prefix is not None and not cache.prefix_matches(self._full_tokens(seqs)):
            return cache.rebase(None)  # a row that does not start with the prefix: its slots are then checked
        return cache

    def _full_tokens(self, seqs: Sequences) -> torch.Tensor:
        """``LongTensor[C, P + T]``: each row's prompt followed by its completion tokens (PAD after), so column
        ``j`` of row ``c`` holds absolute position ``j`` of that row whatever its prompt length."""
        prompt = seqs.prompt_rows().to(seqs.device)
        full = torch.cat([prompt, torch.full_like(seqs.tokens, PAD)], 1)
        if not seqs.per_row_prompt:
            full[:, prompt.shape[1] :] = seqs.tokens
            return full
        columns = seqs.prompt_lengths.unsqueeze(1) + seqs.positions()
        return full.scatter(1, columns, seqs.tokens)

    def _check_prompt(self, seqs: Sequences) -> torch.Tensor:
        """``LongTensor[C]``: the prompt length of each row, checked non-empty and within the context window."""
        P = seqs.prompt_lengths.cpu()
        if bool((P == 0).any()):
            raise EGPSError(f"model {self.name!r} needs a non-empty prompt")
        longest = int(P.max())
        if self.context_length is not None and longest + seqs.capacity > self.context_length:
            raise EGPSError(
                f"prompt ({longest} tokens) + capacity ({seqs.capacity}) exceeds the context window of "
                f"{self.name!r} ({self.context_length} tokens)"
            )
        return P

    def _check_tokens(self, seqs: Sequences) -> None:
        valid = seqs.valid_mask()
        ids = seqs.tokens[valid]
        if ids.numel() and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise EGPSError(f"token ids must lie in [0, {self.vocab_size}); got {int(ids.min())}..{int(ids.max())}")

    def _finish_pool(self, pool: KVPool) -> KVPool | None:
        if not self.reuse_cache:
            return None
        return dataclasses.replace(pool.snapshotted(), compact_below=self.compact_below)

    # ------------------------------------------------------------ protocol
    def _prompt_cache(self, prompt: torch.Tensor, num_rows: int) -> KVPool | None:
        """The prompt's pool, computed once at batch 1 and expanded to ``num_rows`` rows; for one prompt per row
        (``prompt[C, P]``), each distinct prompt computed once in one batched call and its rows copied.

        It holds positions ``0..P-2``: the last prompt token is fed by the first ``extend`` (which needs the
        logits after it), so it is not computed twice.
        """
        if not self.reuse_cache:
            return None
        if self.share_prefix:
            return self._shared_prompt_cache(prompt, num_rows)
        if prompt.dim() == 2:
            distinct, inverse = torch.unique(prompt, dim=0, return_inverse=True)
            if distinct.shape[0] == 1:
                return self._prompt_cache(distinct[0][distinct[0] != PAD], num_rows)
            lengths = (distinct != PAD).sum(1)
            lo = torch.zeros_like(lengths)
            fed = self._feed(KVPool.empty(len(distinct), self.device), distinct, lo, (lengths - 1).clamp(min=0),
                             PowerPolicy(), lengths, 0)  # fmt: skip
            pool = fed.pool.rows(inverse.to(self.device))
            return dataclasses.replace(pool, history=(), compact_below=self.compact_below).snapshotted()
        key = tuple(int(t) for t in prompt.tolist())
        if self._prompt_memo is not None and self._prompt_memo[0] == key:
            one = self._prompt_memo[1]
        else:
            P = len(key)
            full = prompt.view(1, -1)
            lo = torch.zeros(1, dtype=torch.long)
            hi = torch.full((1,), max(P - 1, 0), dtype=torch.long)
            one = self._feed(KVPool.empty(1, self.device), full, lo, hi, PowerPolicy(), torch.tensor([P]), 0).pool
            self._prompt_memo = (key, one)
        if one.num_slots == 0:
            empty = KVPool.empty(num_rows, self.device)
            return dataclasses.replace(empty, compact_below=self.compact_below).snapshotted()
        index = torch.zeros(num_rows, dtype=torch.long, device=self.device)
        pool = KVPool(
            tuple(k.expand(num_rows, -1, -1, -1) for k in one.keys),
            tuple(v.expand(num_rows, -1, -1, -1) for v in one.values),
            one.slot_pos.index_select(0, index),
            one.slot_tok.index_select(0, index),
            (),
            self.compact_below,
        )
        return pool.snapshotted()

    def _shared_prompt_cache(self, prompt: torch.Tensor, num_rows: int) -> KVPool:
        """The prompts' pool over a shared prefix: the positions every prompt has in common (at most all but each
        prompt's last token) come from :meth:`_shared_prefix`; each distinct prompt's remaining positions, up to
        ``P - 2``, are computed in one batched call and its rows selected."""
        if prompt.dim() == 1:
            distinct, inverse = prompt.view(1, -1), torch.zeros(num_rows, dtype=torch.long)
        else:
            distinct, inverse = torch.unique(prompt, dim=0, return_inverse=True)
        lengths = (distinct != PAD).sum(1)
        most = max(int(lengths.min()) - 1, 0)
        same = (distinct[:, :most] == distinct[:1, :most]).all(0)
        n = int(same.long().cumprod(0).sum())
        prefix = self._shared_prefix([int(t) for t in distinct[0, :n]])
        pool = KVPool.empty(len(distinct), self.device, prefix)
        if bool((lengths - 1 > n).any()):
            hi = (lengths - 1).clamp(min=n)
            pool = self._feed(pool, distinct, torch.full_like(lengths, n), hi, PowerPolicy(), lengths, 0).pool
        pool = pool.rows(inverse.to(self.device))
        return dataclasses.replace(pool, history=(), compact_below=self.compact_below).snapshotted()

    def _shared_prefix(self, tokens: list[int]) -> SharedPrefix | None:
        """The shared prefix holding ``tokens``: a remembered one, or the longest remembered part of it extended by
        one call over the rest (a small trie over recent prompts, most recent first)."""
        if not tokens:
            return None
        key = tuple(tokens)
        best, best_len = None, 0
        for known in self._prefixes:
            if known.tokens == key:
                self._prefixes.remove(known)
                self._prefixes.insert(0, known)
                return known
            m = common_length(known.tokens, key)
            if m > best_len:
                best, best_len = known, m
        base = None if best is None else best.truncated(best_len)
        if best_len == len(key):
            prefix = base
        else:
            full = torch.tensor([tokens], dtype=torch.long)
            one = torch.ones(1, dtype=torch.long)
            pool = KVPool.empty(1, self.device, base)
            fed = self._feed(pool, full, best_len * one, len(key) * one, PowerPolicy(), len(key) * one, 0).pool
            rest = SharedPrefix(key[best_len:], fed.keys, fed.values)
            prefix = rest if base is None else base.extended(rest)
        assert prefix is not None
        self._prefixes = [prefix, *self._prefixes][:PREFIX_MEMO]
        return prefix

    def extend(
        self,
        seqs: Sequences,
        start: torch.Tensor,
        stop: torch.Tensor | int | None = None,
        generator: torch.Generator | None = None,
    ) -> tuple[Sequences, Cost]:
        """Keep each row's first ``start`` tokens and sample positions ``start <= t < stop`` from ``seqs.policy``.

        Parameters
        ----------
        seqs:
            The batch (its ``cache`` is reused when it is this backend's pool).
        start:
            ``LongTensor[C]``, tokens kept per row (``0 <= start <= length``).
        stop:
            ``LongTensor[C]`` or int, exclusive end (default and maximum ``seqs.limit``).
        generator:
            Random generator for the draws (a CPU generator: :func:`sample_tokens` draws its uniforms there).

        Returns
        -------
        (Sequences, Cost)
            The new batch (rows stop after EOS; rows whose kept prefix ends in EOS are unchanged) and its cost:
            ``decode_tokens`` = tokens sampled per row, ``scored_tokens`` = tokens re-fed to get the first
            logits (normally 1 per sampling row), ``forward_calls``.
        """
        P = self._check_prompt(seqs)
        start = torch.as_tensor(start, dtype=torch.long, device=seqs.device).expand(seqs.num_rows).clone()
        self._check_start(seqs, start)
        stop_t = self._stop_tensor(seqs, stop)
        out = seqs.truncated(start)
        self._check_tokens(out)
        C = out.num_rows
        tokens, length = out.tokens.clone(), out.length.clone()
        logp, logq, ent, logz = out.logp.clone(), out.logq.clone(), out.entropy.clone(), out.logz.clone()
        done = out.finished()
        active = ~done & (length < stop_t)
        decoded = torch.zeros_like(length)
        scored = torch.zeros_like(length)
        calls = 0
        pool = self._working_pool(out)
        if not active.any():
            return out.with_(cache=self._finish_pool(pool)), Cost(decoded, scored, 0)

        # Feed what the pool lacks up to the last kept token (normally only x_{start-1}) to get the first logits.
        full = self._full_tokens(out)
        seq_len = P + length
        held = pool.consistent_prefix(full, seq_len).cpu()
        lo = torch.where(active, torch.minimum(held, seq_len - 1), held)
        hi = torch.where(active, seq_len, lo)
        steps = int((stop_t - length)[active].max())  # decode calls to come, at most (one per sampled token)
        pool = self._shed_stale(pool.cut(lo), steps)
        fed = self._feed(pool, full, lo, hi, out.policy, P, out.capacity)
        pool, calls, nxt = fed.pool, fed.calls, fed.last
        scored += hi - lo

        dev = self.device
        # The decode calls append one slot each into a buffer owned by this call (no concatenation per step).
        buffer = _SlotBuffer(pool, steps - 1) if steps > 1 and pool.num_slots else None
        if buffer is not None:
            pool = buffer.pool
        while True:
            rows = active.nonzero().flatten()
            rows_d = rows.to(dev)
            new = sample_tokens(nxt.logq[rows_d], generator, None if out.stream is None else out.stream[rows]).to(dev)
            pos = length[rows]
            tokens[rows, pos] = new.cpu()
            logp[rows, pos] = nxt.logp[rows_d, new].double().cpu()
            logq[rows, pos] = nxt.logq[rows_d, new].double().cpu()
            ent[rows, pos] = nxt.entropy[rows_d].double().cpu()
            logz[rows, pos] = nxt.logz[rows_d].double().cpu()
            length[rows] = pos + 1
            decoded[rows] += 1
            if self.eos_token_id is not None:
                done[rows] = new.cpu() == self.eos_token_id
            active = ~done & (length < stop_t)
            if not active.any():
                break
            # One lock-step decode call: each still-active row feeds the token it just drew; the others a dummy.
            tok = torch.zeros(C, 1, dtype=torch.long)
            tok[active, 0] = tokens[active, length[active] - 1]
            step_pos = (P + length - 1).unsqueeze(1)
            keep = active.unsqueeze(1)
            logits, pool = self._forward(pool, tok, step_pos, keep, keep, buffer)
            calls += 1
            stats = _stats(logits, out.policy)
            act_d = active.nonzero().flatten().to(dev)
            nxt.logp[act_d], nxt.logq[act_d] = stats.logp, stats.logq
            nxt.entropy[act_d], nxt.logz[act_d] = stats.entropy, stats.logz

        if buffer is not None:
            pool = buffer.release(pool)
        result = out.with_(
            tokens=tokens, length=length, logp=logp, logq=logq, entropy=ent, logz=logz, cache=self._finish_pool(pool)
        )
        return result, Cost(decoded, scored, calls)

    def next_token_logprobs(self, seqs: Sequences) -> tuple[torch.Tensor, Cost, Sequences]:
        """Full next-token log-distributions of every row: one forward pass over what each row's KV slots lack
        (normally one token), as :meth:`extend` does; the pool is advanced and carried along."""
        P = self._check_prompt(seqs)
        self._check_tokens(seqs)
        pool = self._working_pool(seqs)
        full = self._full_tokens(seqs)
        seq_len = P + seqs.length
        held = pool.consistent_prefix(full, seq_len).cpu()
        lo = torch.minimum(held, seq_len - 1)
        fed = self._feed(pool.cut(lo), full, lo, seq_len, PowerPolicy(1.0), P, seqs.capacity)
        logp = fed.last.logp.to(torch.float64).cpu()
        cost = Cost(torch.zeros_like(seqs.length), seq_len - lo, fed.calls)
        return logp, cost, seqs.with_(cache=self._finish_pool(fed.pool))

    def score(self, seqs: Sequences, start: torch.Tensor) -> tuple[Sequences, Cost]:
        """Recompute ``logp``/``logq``/``entropy``/``logz`` of positions ``start <= t < length`` by teacher forcing.

        Parameters
        ----------
        seqs:
            The batch (tokens are taken as given; its ``cache`` is reused when valid).
        start:
            ``LongTensor[C]`` first position to rescore per row.

        Returns
        -------
        (Sequences, Cost)
            The rescored batch and its cost: ``scored_tokens`` = tokens fed per row (``length - start`` when the
            prefix is cached: ``x_{start-1}`` .. ``x_{length-2}``), one forward call per chunk.
        """
        P = self._check_prompt(seqs)
        start = torch.as_tensor(start, dtype=torch.long, device=seqs.device).expand(seqs.num_rows).clone()
        self._check_start(seqs, start)
        self._check_tokens(seqs)
        clean = torch.where(seqs.valid_mask(), seqs.tokens, torch.full_like(seqs.tokens, PAD))
        seqs = seqs.with_(tokens=clean)
        length = seqs.length
        need = start < length
        pool = self._working_pool(seqs)
        full = self._full_tokens(seqs)
        held = pool.consistent_prefix(full, P + length).cpu()
        lo = torch.where(need, torch.minimum(held, P + start - 1), held)
        hi = torch.where(need, P + length - 1, lo)
        pool = pool.cut(lo)
        fed = self._feed(pool, full, lo, hi, seqs.policy, P, seqs.capacity, need_from=P + start - 1)
        pos = seqs.positions()
        mask = (pos >= start.unsqueeze(1)) & seqs.valid_mask()
        zero = torch.zeros((), dtype=torch.float64)
        keep_old = seqs.valid_mask() & ~mask
        result = seqs.with_(
            logp=torch.where(mask, fed.logp, torch.where(keep_old, seqs.logp, zero)),
            logq=torch.where(mask, fed.logq, torch.where(keep_old, seqs.logq, zero)),
            entropy=torch.where(mask, fed.entropy, torch.where(keep_old, seqs.entropy, zero)),
            logz=torch.where(mask, fed.logz, torch.where(keep_old, seqs.logz, zero)),
            cache=self._finish_pool(fed.pool),
        )
        return result, Cost(torch.zeros_like(length), (hi - lo).clamp(min=0), fed.calls)

    def compact(self, seqs: Sequences) -> Sequences:
        """``seqs`` with its pool compacted (each row's valid slots gathered, sorted by position)."""
        if not isinstance(seqs.cache, KVPool):
            return seqs
        return seqs.with_(cache=seqs.cache.compact())


# ---------------------------------------------------------------- helpers
class _SlotBuffer:
    """Per-layer key/value buffers of ``S + extra`` slots that the decode loop of one ``extend`` call appends into.

    The pool's ``S`` slots are copied in once; each forward call then writes its new slots in place and the pools
    it returns hold views of the filled part. The buffer is created by, and written only within, one backend call,
    and it only ever writes past every view handed out, so pools stay immutable values: two proposals branched from
    one state never share a buffer region that either writes to.
    """

    def __init__(self, pool: KVPool, extra: int) -> None:
        C, S = pool.num_rows, pool.num_slots
        self.capacity = S + extra

        def grow(t: torch.Tensor) -> torch.Tensor:
            out = t.new_empty(C, t.shape[1], self.capacity, t.shape[3])
            out[:, :, :S] = t
            return out

        self.keys = [grow(k) for k in pool.keys]
        self.values = [grow(v) for v in pool.values]
        self.pool = dataclasses.replace(
            pool,
            keys=tuple(k[:, :, :S] for k in self.keys),
            values=tuple(v[:, :, :S] for v in self.values),
        )

    def attach(self, cache: Any, pool: KVPool) -> None:
        """Make ``cache``'s layers (built from ``pool``, the filled part of this buffer) append in place."""
        if len(cache.layers) != len(self.keys) or not pool.keys:
            return
        if pool.keys[0].data_ptr() != self.keys[0].data_ptr():
            return  # not this buffer's pool: the layers concatenate as usual
        for i, layer in enumerate(cache.layers):
            layer.update = _BufferedUpdate(self, i, layer)

    @staticmethod
    def detach(cache: Any) -> None:
        """Undo :meth:`attach`. Each layer and its ``_BufferedUpdate`` refer to each other; left in place, that
        cycle keeps the layer's keys/values (a whole buffer) alive until Python's cyclic collector runs, which
        grew a long run's memory by about one pool per kernel step."""
        for layer in getattr(cache, "layers", ()):
            if isinstance(layer.__dict__.get("update"), _BufferedUpdate):
                del layer.update

    def release(self, pool: KVPool) -> KVPool:
        """The final pool: views of the buffer, or a copy of the filled part when most of the buffer went unused
        (rows finished early), so a long-lived pool does not pin an oversized buffer."""
        if not pool.keys or pool.keys[0].data_ptr() != self.keys[0].data_ptr():
            return pool
        if 2 * pool.num_slots >= self.capacity:
            return pool
        return dataclasses.replace(
            pool,
            keys=tuple(k.contiguous() for k in pool.keys),
            values=tuple(v.contiguous() for v in pool.values),
        )


class _BufferedUpdate:
    """A cache layer's ``update`` that writes the new keys/values into a :class:`_SlotBuffer` (falls back to the
    layer's own concatenation when they would not fit)."""

    def __init__(self, buffer: _SlotBuffer, index: int, layer: Any) -> None:
        self.buffer, self.index, self.layer = buffer, index, layer
        self.fallback = type(layer).update.__get__(layer)

    def __call__(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        layer, i = self.layer, self.index
        n, L = layer.keys.shape[2], key_states.shape[2]
        keys, values = self.buffer.keys[i], self.buffer.values[i]
        if n + L > self.buffer.capacity or layer.keys.data_ptr() != keys.data_ptr():
            return self.fallback(key_states, value_states, *args, **kwargs)
        keys[:, :, n : n + L] = key_states
        values[:, :, n : n + L] = value_states
        layer.keys, layer.values = keys[:, :, : n + L], values[:, :, : n + L]
        return layer.keys, layer.values


def _stats(logits: torch.Tensor, policy: PowerPolicy) -> NextToken:
    """:func:`next_token_stats` over rows of ``logits[N, V]``, in pieces that bound the float32 temporaries."""
    n, V = logits.shape
    step = max(1, STATS_BUDGET // max(1, V))
    if n <= step:
        return next_token_stats(logits, policy)
    parts = [next_token_stats(logits[i : i + step], policy) for i in range(0, n, step)]
    return NextToken(
        torch.cat([p.logp for p in parts]),
        torch.cat([p.logq for p in parts]),
        torch.cat([p.entropy for p in parts]),
        torch.cat([p.logz for p in parts]),
    )


def _target_stats(
    logits: torch.Tensor, target: torch.Tensor, policy: PowerPolicy
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row of ``logits[N, V]``: log p and log q of ``target[N]``, entropy and log Z (piecewise, float32)."""
    n, V = logits.shape
    step = max(1, STATS_BUDGET // max(1, V))
    out: list[list[torch.Tensor]] = [[], [], [], []]
    for i in range(0, n, step):
        stats = next_token_stats(logits[i : i + step], policy)
        t = target[i : i + step].unsqueeze(1)
        out[0].append(stats.logp.gather(1, t).squeeze(1))
        out[1].append(stats.logq.gather(1, t).squeeze(1))
        out[2].append(stats.entropy)
        out[3].append(stats.logz)
    lp, lq, ent, lz = (torch.cat(x) for x in out)
    return lp, lq, ent, lz


def _eos_id(tokenizer: Any, model: Any) -> int | None:
    """EOS from the tokenizer, else the generation config, else the model config (first id of a list); ids
    outside the model's vocabulary are ignored."""
    candidates = [getattr(tokenizer, "eos_token_id", None)]
    gen = getattr(model, "generation_config", None)
    candidates.append(getattr(gen, "eos_token_id", None) if gen is not None else None)
    config = model.config
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    candidates.append(getattr(text, "eos_token_id", None))
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(head, "out_features", None) or getattr(text, "vocab_size", None)
    for eos in candidates:
        if isinstance(eos, (list, tuple)):
            eos = eos[0] if eos else None
        if eos is not None and (vocab is None or 0 <= int(eos) < int(vocab)):
            return int(eos)
    return None


def _pool_compatible(text_config: Any, context_length: int | None) -> bool:
    """Whether every layer is full causal attention (sliding windows index slots, which the pool reorders)."""
    layer_types = getattr(text_config, "layer_types", None)
    if layer_types and any(t != "full_attention" for t in layer_types):
        return False
    window = getattr(text_config, "sliding_window", None)
    if window and getattr(text_config, "use_sliding_window", True):
        return context_length is not None and window >= context_length
    return True


def _check_device(device: str) -> torch.device:
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise EGPSError(f"unknown device {device!r}; use 'cpu', 'cuda' or 'cuda:N'") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise EGPSError(f"device {device!r} requested but CUDA is not available; use device='cpu'")
    return dev


def _looks_like_path(spec: str) -> bool:
    """A spec that can only be a filesystem path (a hub id is ``name`` or ``owner/name``)."""
    return (
        spec.startswith((".", "/", "~"))
        or os.sep in spec.strip("/").split("/", 1)[-1]
        or spec.count("/") > 1
        or "\\" in spec
        or spec.endswith((".json", ".bin", ".safetensors", ".pt"))
    )


def _check_gguf(path: Path) -> None:
    """Fail early and clearly on a missing file or one without the GGUF magic bytes."""
    if not path.is_file():
        raise ModelFileError(f"GGUF file not found: {path}")
    try:
        with open(path, "rb") as fh:
            magic = fh.read(4)
    except OSError as exc:
        raise ModelFileError(f"cannot read GGUF file {path}: {_short(exc)}") from None
    if magic != b"GGUF":
        raise ModelFileError(f"{path} is not a GGUF file (bad magic bytes {magic!r})")


def _load_error(path: str, gguf_file: str | None, local: bool, exc: BaseException) -> EGPSError:
    """Turn a loading exception into one clear error."""
    reason = _short(exc)
    if isinstance(exc, ImportError):
        return EGPSError(f"loading {gguf_file or path} needs a missing package: {reason}")
    if gguf_file is not None:
        return ModelFileError(f"cannot load GGUF file {Path(path) / gguf_file}: malformed or truncated ({reason})")
    if local:
        folder = Path(path).expanduser()
        weights = sorted(
            p.name for p in folder.glob("*") if p.suffix in (".safetensors", ".bin", ".pt", ".json", ".gguf")
        )
        listed = ", ".join(weights[:6]) or "no model files"
        return ModelFileError(f"cannot load the checkpoint in {folder} ({listed}): {reason}")
    hint = "HF_HUB_OFFLINE=1 is set" if _offline() else "the hub is unreachable or the id does not exist"
    return EGPSError(
        f"cannot load model {path!r}: {hint} ({reason}); pass a local model folder, a .gguf file, or a registry "
        "name such as 'smollm2-135m' or 'tiny-gpt2'"
    )


__all__ = ["HFModel", "hub_offline", "parse_dtype"]
