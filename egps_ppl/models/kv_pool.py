"""A slot pool of cached keys and values shared by a batch of chains.

Every row of the batch (one chain, or one MTM try) owns the same number ``S`` of *slots* per layer; each slot
holds the key/value of one token. ``slot_pos[c, s]`` is the absolute position (prompt positions ``0..P-1``,
completion position ``t`` at ``P + t``) that slot ``s`` holds for row ``c``, or ``-1`` when the slot is not
valid for that row. A forward call attends to a row's valid slots (through the 2-D attention mask), so cutting a
row at some position is just marking slots invalid: nothing is recomputed and nothing is copied.

New tokens are always appended as new slots at the end. Causality inside a newly fed chunk follows slot order,
which matches position order; old slots are attended as a set (their keys already carry their positions).

Lineage: every pool remembers a short history of *snapshots* ``(uid, size, rows)``: "slots ``[0, size)`` of my
row ``c`` hold exactly what slots ``[0, size)`` of row ``rows[c]`` of snapshot ``uid`` hold". A backend call that
appended slots, a row-wise copy or a compaction creates a new snapshot; cutting (editing ``slot_pos``) keeps the
history; ``take`` remaps ``rows``. ``merge`` uses this to decide, per row, whether a proposal's pool still holds
the current state's slots at the same indices (then it only swaps ``slot_pos``) or whether rows must be copied
into a new pool.

Bounded memory: stale slots are dropped by :meth:`KVPool.compact` (a slice when each row's live slots already come
first, else one gather), which the backend applies right after a cut that left many stale slots (before decoding)
and after ``take``/``where`` when every row uses at most ``compact_below`` of the slots; :meth:`KVPool.scatter`
reassembles a batch from row groups with one copy per row (``Mixture``).

Shared prefix: a pool may hold a :class:`~egps_ppl.models.shared_prefix.SharedPrefix` (``prefix``), the keys and
values of positions ``0..n-1`` stored once for all rows (the few-shot part of every prompt, a whole prompt shared by
its chains and tries). Every row of such a pool starts with those tokens, and its slots hold positions ``>= n``
only. Pools with different prefixes are combined after :meth:`KVPool.rebase` to their common part (the positions
a pool gives up are copied into its rows' slots), so every operation stays exact.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, replace

import torch

from egps_ppl.models.shared_prefix import SharedPrefix, common_length

_UIDS = itertools.count(1)
MAX_HISTORY = 32
"""Snapshots kept per pool: enough for any kernel that merges a proposal a few calls after it branched."""


@dataclass(frozen=True, eq=False)
class Snapshot:
    """Slots ``[0, size)`` of row ``c`` equal slots ``[0, size)`` of row ``rows[c]`` of snapshot ``uid``."""

    uid: int
    size: int
    rows: torch.Tensor  # LongTensor[C] (on the CPU)


@dataclass(frozen=True, eq=False)
class KVPool:
    """Per-layer keys/values ``[C, heads, S, head_dim]`` plus which position each slot holds for each row.

    Attributes
    ----------
    keys, values:
        One tensor per layer, ``[C, kv_heads, S, head_dim]`` in the model's dtype and device. Empty tuples when
        ``S == 0``.
    slot_pos:
        ``LongTensor[C, S]`` (model device): absolute position held by each slot, ``-1`` if invalid for the row.
    slot_tok:
        ``LongTensor[C, S]`` (model device): the token id fed at that slot (``-1`` if invalid). Used to check
        that a pool still matches the tokens of a row before it is reused (a stale pool is then cut, never trusted).
    history:
        Lineage snapshots, oldest first (see the module docstring).
    compact_below:
        After :meth:`take` and :meth:`where`, compact the pool when every row uses at most this fraction of its
        slots (set by the backend; 0 compacts only pools with no valid slot left).
    prefix:
        Keys/values of positions ``0..n-1`` shared by every row (``None``: none); slots then hold positions ``>= n``.

    Notes
    -----
    A pool is the ``cache`` of :class:`~egps_ppl.state.Sequences`: it implements the
    :class:`~egps_ppl.state.RowCache` protocol (:meth:`take`, :meth:`where`), so rows selected or merged
    through ``Sequences.take`` / ``Sequences.where`` carry their slots along.
    """

    keys: tuple[torch.Tensor, ...]
    values: tuple[torch.Tensor, ...]
    slot_pos: torch.Tensor
    slot_tok: torch.Tensor
    history: tuple[Snapshot, ...] = ()
    compact_below: float = 0.0
    prefix: SharedPrefix | None = None

    # ----------------------------------------------------------------- construction
    @classmethod
    def empty(cls, num_rows: int, device: torch.device | str, prefix: SharedPrefix | None = None) -> KVPool:
        """A pool with no slots (rows hold only ``prefix``, if any)."""
        none = torch.empty(num_rows, 0, dtype=torch.long, device=device)
        return cls((), (), none, none.clone(), (), prefix=prefix)

    @property
    def prefix_length(self) -> int:
        """Positions held by the shared prefix (0 without one)."""
        return 0 if self.prefix is None else self.prefix.length

    @property
    def num_rows(self) -> int:
        """Rows (chains) of the pool."""
        return self.slot_pos.shape[0]

    @property
    def num_slots(self) -> int:
        """Slots per row (valid or not)."""
        return self.slot_pos.shape[1]

    @property
    def device(self) -> torch.device:
        """The device of the pool's tensors."""
        return self.slot_pos.device

    def valid(self) -> torch.Tensor:
        """``bool[C, S]``: slots valid for each row."""
        return self.slot_pos >= 0

    def _snapshot(self) -> tuple[Snapshot, ...]:
        """History extended by a fresh snapshot of this pool's current slots."""
        snap = Snapshot(next(_UIDS), self.num_slots, torch.arange(self.num_rows))
        return (*self.history, snap)[-MAX_HISTORY:]

    def appended(
        self,
        keys: list[torch.Tensor],
        values: list[torch.Tensor],
        new_pos: torch.Tensor,
        new_tok: torch.Tensor,
    ) -> KVPool:
        """The pool after a forward call that appended ``new_pos.shape[1]`` slots.

        ``keys``/``values`` are the full per-layer tensors returned by the cache (old slots first, untouched), so
        the old history stays true; the caller records a snapshot once per backend call (:meth:`snapshotted`).
        """
        return KVPool(
            tuple(keys),
            tuple(values),
            torch.cat([self.slot_pos, new_pos], 1),
            torch.cat([self.slot_tok, new_tok], 1),
            self.history,
            self.compact_below,
            self.prefix,
        )

    def snapshotted(self) -> KVPool:
        """This pool with a new lineage snapshot (call after appending slots)."""
        if self.history and self.history[-1].size == self.num_slots:
            return self
        return replace(self, history=self._snapshot())

    # ----------------------------------------------------------------- row edits
    def cut(self, keep_below: torch.Tensor) -> KVPool:
        """Invalidate, per row, every slot holding a position ``>= keep_below[c]`` (no data is touched).

        A cut inside the shared prefix first rebases the pool onto the prefix's part below the lowest cut.
        """
        if self.prefix is not None and bool((keep_below < self.prefix.length).any()):
            return self.rebase(self.prefix.truncated(int(keep_below.min()))).cut(keep_below)
        drop = self.slot_pos >= keep_below.to(self.device).unsqueeze(1)
        if not drop.any():
            return self
        return replace(
            self,
            slot_pos=self.slot_pos.masked_fill(drop, -1),
            slot_tok=self.slot_tok.masked_fill(drop, -1),
        )

    def consistent_prefix(self, full_tokens: torch.Tensor, seq_len: torch.Tensor) -> torch.Tensor:
        """``LongTensor[C]``: per row, the largest ``m`` such that positions ``0..m-1`` are all held by valid slots
        whose token matches ``full_tokens[c, :seq_len[c]]`` (prompt followed by the completion).

        Valid slots beyond ``m`` must not be used (the caller cuts them); normally ``m`` covers everything but
        the last token, and this check only guards against a pool that no longer matches its tokens. The shared
        prefix's positions count as held (the caller checked :meth:`prefix_matches` first).
        """
        C, width = full_tokens.shape
        n = self.prefix_length
        if self.num_slots == 0:
            return torch.minimum(torch.full((C,), n, device=self.device), seq_len.to(self.device))
        full = full_tokens.to(self.device)
        pos = self.slot_pos
        inside = (pos >= 0) & (pos < seq_len.to(self.device).unsqueeze(1))
        safe = torch.where(inside, pos, torch.zeros_like(pos))
        ok = inside & (full.gather(1, safe) == self.slot_tok)
        have = torch.zeros(C, width + 1, dtype=torch.bool, device=self.device)
        # Slots that are not ok all land in the spare last column, so they never mark a position as held.
        have.scatter_(1, torch.where(ok, pos, torch.full_like(pos, width)), ok)
        have[:, :n] = True
        return torch.minimum(have[:, :width].long().cumprod(1).sum(1), seq_len.to(self.device))

    def prefix_matches(self, full_tokens: torch.Tensor) -> bool:
        """Whether every row of ``full_tokens[C, P + T]`` starts with the shared prefix's tokens (true without one)."""
        if self.prefix is None:
            return True
        n = self.prefix.length
        if full_tokens.shape[1] < n:
            return False
        want = torch.as_tensor(self.prefix.tokens, dtype=full_tokens.dtype, device=full_tokens.device)
        return bool((full_tokens[:, :n] == want).all())

    def rebase(self, prefix: SharedPrefix | None) -> KVPool:
        """The same rows over ``prefix``, whose tokens must begin this pool's prefix: the positions this pool's
        prefix held beyond it are copied into every row's slots (first, in position order)."""
        n_old = self.prefix_length
        n_new = 0 if prefix is None else prefix.length
        old_tokens = () if self.prefix is None else self.prefix.tokens
        if n_new > n_old or (prefix is not None and old_tokens[:n_new] != prefix.tokens):
            raise ValueError("KVPool.rebase: the new prefix must be a prefix of the pool's shared prefix")
        if n_new == n_old:
            return self if prefix is self.prefix else replace(self, prefix=prefix)
        assert self.prefix is not None
        C, dev = self.num_rows, self.device
        head_pos = torch.arange(n_new, n_old, device=dev).expand(C, -1)
        head_tok = torch.as_tensor(self.prefix.tokens[n_new:], dtype=torch.long, device=dev).expand(C, -1)

        def grow(head: torch.Tensor, own: torch.Tensor | None) -> torch.Tensor:
            head = head[:, :, n_new:n_old].expand(C, -1, -1, -1)
            return head.contiguous() if own is None else torch.cat([head, own], 2)

        keys = tuple(grow(h, o) for h, o in itertools.zip_longest(self.prefix.keys, self.keys))
        values = tuple(grow(h, o) for h, o in itertools.zip_longest(self.prefix.values, self.values))
        pool = KVPool(
            keys,
            values,
            torch.cat([head_pos, self.slot_pos], 1),
            torch.cat([head_tok, self.slot_tok], 1),
            (),
            self.compact_below,
            prefix,
        )
        return pool.snapshotted()

    @staticmethod
    def common_base(pools: Sequence[KVPool]) -> list[KVPool]:
        """``pools`` rebased onto one prefix: the longest prefix common to all (a pool with no slots and no prefix
        adopts it, since a prefix is valid for any row whose tokens start with it)."""
        prefixes = [p.prefix for p in pools if p.prefix is not None or p.num_slots > 0]
        if not prefixes or all(q is prefixes[0] for q in prefixes):
            base = prefixes[0] if prefixes else None
        elif any(q is None for q in prefixes):
            base = None
        else:
            shortest = min(prefixes, key=lambda q: q.length)
            n = min(common_length(shortest.tokens, q.tokens) for q in prefixes)
            base = shortest.truncated(n)
        out = []
        for p in pools:
            if p.prefix is None and p.num_slots == 0:
                out.append(replace(p, prefix=base))
            else:
                out.append(p.rebase(base))
        return out

    # ----------------------------------------------------------------- the RowCache protocol
    def take(self, index: torch.Tensor) -> KVPool:
        """Rows ``index`` (repeats allowed), compacted if mostly unused (see ``compact_below``)."""
        return self.rows(index).maybe_compact(self.compact_below)

    def where(self, take_other: torch.Tensor, other: KVPool | None) -> KVPool:
        """Row-wise choice (``other``'s rows where ``take_other``) by :meth:`merge`, compacted if mostly unused.

        ``other = None`` stands for a pool with no slots.
        """
        other = other if other is not None else KVPool.empty(self.num_rows, self.device)
        return KVPool.merge(torch.as_tensor(take_other), self, other).maybe_compact(self.compact_below)

    # ----------------------------------------------------------------- batch edits
    def rows(self, index: torch.Tensor) -> KVPool:
        """Rows ``index`` (repeats allowed), never compacted."""
        idx = index.to(self.device)
        cpu_idx = index.cpu()
        return KVPool(
            tuple(k.index_select(0, idx) for k in self.keys),
            tuple(v.index_select(0, idx) for v in self.values),
            self.slot_pos.index_select(0, idx),
            self.slot_tok.index_select(0, idx),
            tuple(Snapshot(s.uid, s.size, s.rows[cpu_idx]) for s in self.history),
            self.compact_below,
            self.prefix,
        )

    def descends_from(self, current: KVPool, rows: torch.Tensor) -> bool:
        """Whether, for each row ``c`` where ``rows[c]``, slots ``[0, current.num_slots)`` of this pool hold
        exactly what ``current``'s slots hold for row ``c``."""
        if current.num_slots == 0:
            return True
        if not current.history or current.history[-1].size != current.num_slots:
            return False
        mine = current.history[-1]
        for snap in self.history:
            if snap.uid == mine.uid:
                if snap.size != mine.size:
                    return False
                rows_cpu = rows.cpu()
                return bool((snap.rows[rows_cpu] == mine.rows[rows_cpu]).all())
        return False

    def _padded_positions(self, width: int) -> tuple[torch.Tensor, torch.Tensor]:
        pad = width - self.num_slots
        if pad == 0:
            return self.slot_pos, self.slot_tok
        fill = torch.full((self.num_rows, pad), -1, dtype=torch.long, device=self.device)
        return torch.cat([self.slot_pos, fill], 1), torch.cat([self.slot_tok, fill], 1)

    @staticmethod
    def merge(take_other: torch.Tensor, current: KVPool, other: KVPool) -> KVPool:
        """Row-wise choice: ``other``'s slots where ``take_other``, else ``current``'s.

        Cheap when ``other`` descends row-wise from ``current`` (for every row that keeps ``current``, ``other``
        still holds ``current``'s slots at the same indices): ``other``'s tensors are reused and only ``slot_pos``
        is chosen per row. Otherwise each row's slots are copied from its side into a fresh pool (always correct).
        """
        choose = take_other.to(current.device)
        if bool(choose.all()):
            return other
        if not bool(choose.any()):
            return current
        if current.prefix is not other.prefix:
            current, other = KVPool.common_base([current, other])
        if other.descends_from(current, ~take_other):
            cur_pos, cur_tok = current._padded_positions(other.num_slots)
            return replace(
                other,
                slot_pos=torch.where(choose.unsqueeze(1), other.slot_pos, cur_pos),
                slot_tok=torch.where(choose.unsqueeze(1), other.slot_tok, cur_tok),
            )
        return KVPool.select(choose, current, other)

    @staticmethod
    def select(take_other: torch.Tensor, current: KVPool, other: KVPool) -> KVPool:
        """A fresh pool of ``max(S_current, S_other)`` slots: each row copied from the side it chose (its unused
        tail slots zero and invalid). Used when the two pools do not share their slot layout."""
        if current.prefix is not other.prefix:
            current, other = KVPool.common_base([current, other])
        width = max(current.num_slots, other.num_slots)
        choose = take_other.to(current.device)
        keep = ~choose
        cur_pos, cur_tok = current._padded_positions(width)
        oth_pos, oth_tok = other._padded_positions(width)
        slot_pos = torch.where(choose.unsqueeze(1), oth_pos, cur_pos)
        slot_tok = torch.where(choose.unsqueeze(1), oth_tok, cur_tok)
        template = current.keys or other.keys
        if not template:
            return KVPool((), (), slot_pos, slot_tok, (), current.compact_below, current.prefix).snapshotted()

        def pick(a: tuple[torch.Tensor, ...], b: tuple[torch.Tensor, ...], i: int) -> torch.Tensor:
            ref = template[i]
            out = ref.new_zeros(ref.shape[0], ref.shape[1], width, ref.shape[3])
            if a:
                out[keep, :, : a[i].shape[2]] = a[i][keep]
            if b:
                out[choose, :, : b[i].shape[2]] = b[i][choose]
            return out

        keys = tuple(pick(current.keys, other.keys, i) for i in range(len(template)))
        values = tuple(pick(current.values, other.values, i) for i in range(len(template)))
        return KVPool(keys, values, slot_pos, slot_tok, (), current.compact_below, current.prefix).snapshotted()

    @staticmethod
    def scatter(num_rows: int, parts: Sequence[tuple[torch.Tensor, KVPool]]) -> KVPool:
        """A pool of ``num_rows`` rows whose rows ``rows_j`` are the rows of ``pool_j``, for ``(rows_j, pool_j)`` in
        ``parts`` (the ``rows_j`` partition ``0..num_rows-1``): each row is copied once, into ``max_j S_j`` slots.

        Used by :class:`~egps_ppl.kernels.combinators.Mixture` to reassemble the sub-kernels' batches.
        """
        if len({id(p.prefix) for _, p in parts}) > 1:
            pools = KVPool.common_base([p for _, p in parts])
            parts = [(rows, pool) for (rows, _), pool in zip(parts, pools, strict=True)]
        first = parts[0][1]
        device = first.device
        width = max(p.num_slots for _, p in parts)
        slot_pos = torch.full((num_rows, width), -1, dtype=torch.long, device=device)
        slot_tok = slot_pos.clone()
        template = next((p.keys for _, p in parts if p.keys), ())
        if not template:
            return KVPool((), (), slot_pos, slot_tok, (), first.compact_below, first.prefix).snapshotted()
        keys = [t.new_zeros(num_rows, t.shape[1], width, t.shape[3]) for t in template]
        values = [t.new_zeros(num_rows, t.shape[1], width, t.shape[3]) for t in template]
        for rows, pool in parts:
            idx = rows.to(device)
            n = pool.num_slots
            if n == 0:
                continue
            slot_pos[idx, :n] = pool.slot_pos
            slot_tok[idx, :n] = pool.slot_tok
            for out, src in zip(keys + values, pool.keys + pool.values, strict=True):
                out[idx, :, :n] = src
        pool = KVPool(tuple(keys), tuple(values), slot_pos, slot_tok, (), first.compact_below, first.prefix)
        return pool.snapshotted()

    # ----------------------------------------------------------------- compaction
    def wasted(self, threshold: float) -> bool:
        """Whether every row has at most ``threshold`` of the slots valid (and something to gain)."""
        if self.num_slots == 0:
            return False
        most = int(self.valid().sum(1).max())
        return most < self.num_slots and most <= threshold * self.num_slots

    def compact(self) -> KVPool:
        """Gather each row's valid slots, sorted by position, into a fresh pool (right-padded, padding invalid)."""
        valid = self.valid()
        width = int(valid.sum(1).max()) if self.num_slots else 0
        if width == self.num_slots:
            return self
        if width == 0:
            return replace(KVPool.empty(self.num_rows, self.device, self.prefix), compact_below=self.compact_below)
        if self._sorted_prefix(width):
            # Every row's valid slots already come first, in position order: a view of the first slots, no copy.
            def cut(t: torch.Tensor) -> torch.Tensor:
                return t[:, :, :width]

            slot_pos, slot_tok = self.slot_pos[:, :width], self.slot_tok[:, :width]
        else:
            big = torch.iinfo(torch.long).max
            order = torch.where(valid, self.slot_pos, torch.full_like(self.slot_pos, big)).argsort(1)[:, :width]
            slot_pos = self.slot_pos.gather(1, order)
            slot_tok = self.slot_tok.gather(1, order)
            index = order[:, None, :, None]

            def cut(t: torch.Tensor) -> torch.Tensor:
                return t.gather(2, index.expand(t.shape[0], t.shape[1], width, t.shape[3]))

        pool = KVPool(
            tuple(cut(k) for k in self.keys),
            tuple(cut(v) for v in self.values),
            slot_pos,
            slot_tok,
            (),
            self.compact_below,
            self.prefix,
        )
        return replace(pool, history=pool._snapshot())

    def _sorted_prefix(self, width: int) -> bool:
        """Whether slots ``>= width`` are all invalid and the valid slots of every row come first, by position."""
        head = self.slot_pos[:, :width]
        valid = head >= 0
        if bool((self.slot_pos[:, width:] >= 0).any()):
            return False
        # valid slots form a prefix (no valid slot after an invalid one) with increasing positions
        prefix = bool((valid[:, 1:] <= valid[:, :-1]).all())
        rising = bool(((head[:, 1:] > head[:, :-1]) | ~valid[:, 1:]).all())
        return prefix and rising

    def stale_slots(self) -> int:
        """Slots that :meth:`compact` would drop (``S`` minus the most valid slots of any row)."""
        if self.num_slots == 0:
            return 0
        return self.num_slots - int(self.valid().sum(1).max())

    def maybe_compact(self, threshold: float) -> KVPool:
        """:meth:`compact` if :meth:`wasted`, else ``self``."""
        return self.compact() if self.wasted(threshold) else self
