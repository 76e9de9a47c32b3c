"""A preallocated KV-cache pool of batch slots for continuous batching.

Why: with iteration-level scheduling rows join and leave at every step. Rebuilding the batch's
cache (`KVCache.select_rows`, a concatenation) would copy every row's keys each time. Here each
layer's keys and values live in one tensor `[slots, kv_heads, capacity, head_dim]` allocated once;
the running rows occupy slots `0..n-1`, so a decoding step sees plain views of the first `n` slots.
A row joining copies only its own prefilled keys into the next free slot; a row leaving moves only
the last row into its slot.

Rows share one column pointer `length` (every row's newest key sits in column `length - 1`, older
columns to the left, unused columns masked out), which is exactly the layout the decoder's
`KVCache` protocol (`valid`, `begin`, `update`, `commit`, `next_position`) expects, so the model
runs unchanged. Once the columns no row uses make up half the width (rows that started early have
left), or the pointer reaches the capacity, the rows shift left over them: one copy of the batch
every `length / 2` steps at most, so attention never runs over much more than the longest row.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..model.decoder import KVCache


class SlotKVCache:
    """The running rows' KV cache: duck-types `KVCache` for the model's forward."""

    def __init__(self, slots: int, capacity: int) -> None:
        if slots < 1 or capacity < 2:
            raise ValueError(f"a KV pool needs >= 1 slot and capacity >= 2, got {slots} and {capacity}")
        self.slots = slots
        self.capacity = capacity
        self.rows = 0  # running rows, in slots 0..rows-1
        self.length = 0  # shared column pointer
        self._keys: list[Tensor] = []
        self._values: list[Tensor] = []
        self._valid = torch.zeros(slots, capacity, dtype=torch.bool)
        self._next = torch.zeros(slots, dtype=torch.long)
        self._pending = 0

    # ------------------------------------------------------------------ the KVCache protocol
    @property
    def valid(self) -> Tensor | None:
        return self._valid[: self.rows, : self.length] if self.length else None

    @property
    def next_position(self) -> Tensor:
        return self._next[: self.rows]

    @next_position.setter
    def next_position(self, value: Tensor) -> None:
        self._next[: self.rows] = value

    @property
    def batch_size(self) -> int:
        return self.rows

    def begin(self, new_valid: Tensor) -> None:
        n = new_valid.shape[1]
        if self.length + n > self.capacity:  # the mask the model built must stay right: reserve() first
            raise RuntimeError(f"KV pool full: call reserve({n}) before the forward")
        self._valid[: self.rows, self.length : self.length + n] = new_valid
        self._pending = n

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        self._ensure(layer, k)
        end = self.length + k.shape[2]
        self._keys[layer][: self.rows, :, self.length : end] = k
        self._values[layer][: self.rows, :, self.length : end] = v
        return self._keys[layer][: self.rows, :, :end], self._values[layer][: self.rows, :, :end]

    def commit(self) -> None:
        self.length += self._pending
        self._pending = 0

    # ------------------------------------------------------------------ joining and leaving
    def _ensure(self, layer: int, like: Tensor) -> None:
        while len(self._keys) <= layer:
            shape = (self.slots, like.shape[1], self.capacity, like.shape[3])
            self._keys.append(like.new_zeros(shape))
            self._values.append(like.new_zeros(shape))
        if self._valid.device != like.device:
            self._valid = self._valid.to(like.device)
            self._next = self._next.to(like.device)

    def free_slots(self) -> int:
        return self.slots - self.rows

    def add_row(self, cache: KVCache, row: int) -> int:
        """Copy row `row` of a prefilled (left-padded) cache into the next free slot; returns the slot."""
        if self.rows >= self.slots:
            raise RuntimeError("the KV pool has no free slot")
        assert cache.valid is not None and cache.next_position is not None
        valid = cache.valid[row]
        n = int(valid.sum())
        if n + 1 > self.capacity:
            raise ValueError(f"a prompt of {n} tokens does not fit a KV pool of capacity {self.capacity}")
        src = cache.valid.shape[1]
        if self.rows == 0:
            self.length = n
        elif n > self.length:  # a longer prompt than any running row has seen: shift everyone right
            self._shift(n - self.length)
        slot = self.rows
        for layer in range(len(cache.keys)):
            self._ensure(layer, cache.keys[layer])
            self._keys[layer][slot, :, self.length - n : self.length] = cache.keys[layer][
                row, :, src - n : src
            ]
            self._values[layer][slot, :, self.length - n : self.length] = cache.values[layer][
                row, :, src - n : src
            ]
        self._valid[slot] = False
        self._valid[slot, self.length - n : self.length] = valid[src - n :]
        self._next[slot] = cache.next_position[row]
        self.rows += 1
        return slot

    def remove_row(self, slot: int) -> int | None:
        """Free `slot`; the last row moves into it. Returns the slot that moved (None: none did)."""
        last = self.rows - 1
        moved = None
        if slot != last:
            for k, v in zip(self._keys, self._values, strict=True):
                k[slot, :, : self.length] = k[last, :, : self.length]
                v[slot, :, : self.length] = v[last, :, : self.length]
            self._valid[slot] = self._valid[last]
            self._next[slot] = self._next[last]
            moved = last
        self.rows -= 1
        if self.rows == 0:
            self.length = 0
        else:
            self._compact_if_sparse()
        return moved

    def _compact_if_sparse(self) -> None:
        """Drop the columns no row uses once they are half the width, so attention does not run
        over them (a shift copies every row; at most once per `length / 2` steps)."""
        used = self._valid[: self.rows, : self.length].any(0)
        first = int(used.to(torch.int8).argmax())
        if first >= 16 and 2 * first >= self.length:
            self._shift(-first)

    def reserve(self, n: int) -> None:
        """Make sure `n` more columns fit (call before a forward: it may move the rows)."""
        if self.length + n > self.capacity:
            self.make_room(n)

    def make_room(self, n: int) -> None:
        """Shift the rows left by the columns none of them uses, so `n` more columns fit."""
        used = self._valid[: self.rows, : self.length].any(0)
        first = int(used.nonzero()[0]) if bool(used.any()) else self.length
        if self.length - first + n > self.capacity:
            raise RuntimeError(
                f"the KV pool's capacity {self.capacity} is too small for rows of {self.length - first + n} tokens"
            )
        self._shift(-first)

    def _shift(self, by: int) -> None:
        """Move every running row's columns `by` to the right (negative: left)."""
        rows, old = self.rows, self.length
        new = old + by
        lo_src, lo_dst = (0, by) if by >= 0 else (-by, 0)
        count = old - lo_src
        for t in (*self._keys, *self._values):
            t[:rows, :, lo_dst : lo_dst + count] = t[:rows, :, lo_src : lo_src + count].clone()
        self._valid[:rows, lo_dst : lo_dst + count] = self._valid[:rows, lo_src : lo_src + count].clone()
        if by > 0:
            self._valid[:rows, :by] = False
        else:
            self._valid[:rows, new:old] = False
        self.length = new
