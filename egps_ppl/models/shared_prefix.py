"""Keys and values of a token prefix shared by every row of a batch, and the attention that reads them once.

The rows of an evaluation batch start with the same tokens: the few-shot examples of the task for every problem,
the whole prompt for every chain of one problem, and every MTM try of a chain. Their keys and values at those
positions are equal (they depend only on the tokens), so a :class:`~egps_ppl.models.kv_pool.KVPool` stores them
once, as a :class:`SharedPrefix` of ``[1, kv_heads, n, head_dim]`` per layer, and each row's own slots hold only the
positions from ``n`` on. Without it, the prompt is copied into every row and every try, and a decode step of a
batch reads a 500-token few-shot prompt once per row.

:func:`shared_prefix_attention` is registered with ``transformers`` as the attention implementation
``"egps_shared_prefix"``. While a prefix is active (:func:`active_prefix`, set by the backend around one forward
call) it computes, per query, the softmax over the prefix scores and the row's own masked scores together, which
is the attention over prefix-then-slots written as two blocks: the same sum, so results equal the copied layout to
rounding (the tests check 1e-6 in float64). The prefix enters as ``[kv_heads, n, head_dim]`` matrices multiplied
against all rows' queries at once, so it is read once per call, never expanded per row. With no prefix active it is
``transformers``' SDPA attention, unchanged.

This is cascade attention (shared-prefix attention) as in FlashInfer and vLLM's prefix caching, for one prefix per
batch; :meth:`~egps_ppl.models.hf.HFModel` keeps a few recent prefixes (a small trie at the prompt level) so a
refill or the next problem reuses the few-shot part.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

ATTENTION = "egps_shared_prefix"
"""Name of the attention implementation registered with ``transformers``."""

_ACTIVE: ContextVar[SharedPrefix | None] = ContextVar("egps_shared_prefix", default=None)
_REGISTERED = False


@dataclass(frozen=True, eq=False)
class SharedPrefix:
    """Keys/values of positions ``0..n-1`` holding ``tokens``, computed with exactly that prefix as context.

    Attributes
    ----------
    tokens:
        The ``n`` token ids.
    keys, values:
        One tensor per layer, ``[1, kv_heads, n, head_dim]`` in the model's dtype and device.
    """

    tokens: tuple[int, ...]
    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]

    @property
    def length(self) -> int:
        """``n``, the positions the prefix holds."""
        return len(self.tokens)

    def truncated(self, n: int) -> SharedPrefix | None:
        """The prefix of positions ``0..n-1`` (views, no copy); ``None`` when ``n == 0``."""
        if n >= self.length:
            return self
        if n <= 0:
            return None
        return SharedPrefix(
            self.tokens[:n],
            tuple(k[:, :, :n] for k in self.keys),
            tuple(v[:, :, :n] for v in self.values),
        )

    def extended(self, rest: SharedPrefix) -> SharedPrefix:
        """This prefix followed by ``rest`` (whose keys/values were computed after this prefix): one copy."""
        return SharedPrefix(
            self.tokens + rest.tokens,
            tuple(torch.cat([a, b], 2) for a, b in zip(self.keys, rest.keys, strict=True)),
            tuple(torch.cat([a, b], 2) for a, b in zip(self.values, rest.values, strict=True)),
        )


def common_length(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two token sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = torch.as_tensor(list(a[:n]))
    y = torch.as_tensor(list(b[:n]))
    differ = (x != y).nonzero()
    return int(differ[0]) if differ.numel() else n


@contextlib.contextmanager
def active_prefix(prefix: SharedPrefix | None) -> Iterator[None]:
    """Make the forward calls inside the block attend to ``prefix`` before each row's own slots."""
    token = _ACTIVE.set(prefix)
    try:
        yield
    finally:
        _ACTIVE.reset(token)


def register() -> None:
    """Register :func:`shared_prefix_attention` (and SDPA's mask builder) under :data:`ATTENTION`."""
    global _REGISTERED
    if _REGISTERED:
        return
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTENTION, shared_prefix_attention)
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)
    _REGISTERED = True


def shared_prefix_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, None]:
    """Attention over the active :class:`SharedPrefix` and each row's own keys (``transformers``' interface).

    ``query`` is ``[B, heads, L, d]``; ``key``/``value`` ``[B, kv_heads, S, d]`` (the row's slots then the new
    tokens); ``attention_mask`` SDPA's boolean ``[B, 1, L, S]`` (``True``: attend), an additive float mask, or
    ``None`` (causal). Returns ``[B, L, heads, d]``. Without an active prefix this is SDPA attention.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    prefix = _ACTIVE.get()
    if prefix is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    for unsupported in ("softcap", "s_aux", "sliding_window"):
        if kwargs.get(unsupported) is not None:
            raise NotImplementedError(f"shared-prefix attention does not support {unsupported}")
    layer = int(module.layer_idx)
    pk, pv = prefix.keys[layer][0], prefix.values[layer][0]  # [kv_heads, n, d]
    B, H, L, d = query.shape
    kvh, S, n = key.shape[1], key.shape[2], pk.shape[1]
    g = H // kvh  # query head h reads kv head h // g (transformers' repeat_kv order)
    scale = float(scaling) if scaling is not None else d**-0.5
    work = torch.float64 if query.dtype == torch.float64 else torch.float32

    # Half-precision inputs are upcast: the scores, softmax and weighted sums run in float32 (as SDPA accumulates).
    q = query.to(work).reshape(B, kvh, g * L, d)
    own = torch.matmul(q, key.to(work).transpose(-1, -2)).view(B, kvh, g, L, S)
    # All rows' queries against the prefix in one [kv_heads, B*g*L, n] product: the prefix is not expanded.
    q_heads = q.permute(1, 0, 2, 3).reshape(kvh, B * g * L, d)
    shared = torch.bmm(q_heads, pk.to(work).transpose(-1, -2)).view(kvh, B, g, L, n).permute(1, 0, 2, 3, 4)
    if attention_mask is None:
        rows = torch.arange(L, device=query.device).unsqueeze(1)
        cols = torch.arange(S, device=query.device).unsqueeze(0)
        attention_mask = (cols <= rows + (S - L)).view(1, 1, L, S)
    mask = attention_mask.unsqueeze(2)  # [B or 1, 1, 1, L, S]: the same mask for every head
    own = own * scale
    own = own.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else own + mask.to(work)
    weights = torch.softmax(torch.cat([shared * scale, own], -1), -1)
    w_shared = weights[..., :n].permute(1, 0, 2, 3, 4).reshape(kvh, B * g * L, n)
    out = torch.bmm(w_shared, pv.to(work)).view(kvh, B, g * L, d).permute(1, 0, 2, 3)
    out = out + torch.matmul(weights[..., n:].reshape(B, kvh, g * L, S), value.to(work))
    out = out.to(query.dtype)
    return out.reshape(B, H, L, d).transpose(1, 2).contiguous(), None


__all__ = ["ATTENTION", "SharedPrefix", "active_prefix", "common_length", "register", "shared_prefix_attention"]
