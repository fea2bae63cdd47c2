"""The decode batch's KV cache: one left-padded tensor per layer, rows added and removed between steps.

Rows of different lengths share one [B, kv_heads, T, head_dim] tensor per layer; shorter rows are padded on the
left and ``mask`` [B, T] marks the real positions. Each layer keeps spare room along T so that a decode step writes
its new key/value in place instead of concatenating the whole cache (``DynamicCache`` copies it every step).

The running batch's cache keeps spare rows (``row_capacity``, the engine's batch size). Rows leave in place
(``retain``: the rows after the new end move into the holes, one copy of the moved rows only, and the caller learns
the new order); rows join in place (``join``: written into spare rows, right-aligned and zero-padded) when they are
not longer than the cache. Only a joining prompt longer than the cache, or a batch beyond its rows, rebuilds the
buffers (``concat``). Padded positions hold zeros (a padded query position of a prefill may produce NaN when SDPA
sees a fully masked row; zeroing keeps it out of the cache, and a masked position still enters the attention's value
product with weight 0, so it must be finite). Spare room (positions past a layer's length, spare rows) is allocated
uninitialised (``_fresh``) and is written before it is exposed, so a new buffer is not zero-filled first
(``bench/kv_cache.py``: a 600-token row rebuilt into 8 rows with room for 16, 22 ms against 180 ms; inside a run, where
first-touch page faults dominate, 97-115 ms against 113-165 ms). The tests fill fresh buffers with NaN instead, so a
read of an unwritten position shows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

_ROOM = 64  # spare positions allocated on each growth (and at least this many)


def _capacity(length: int) -> int:
    return length + max(_ROOM, length // 2)


def _fresh(like: torch.Tensor, *shape: int) -> torch.Tensor:
    """A new buffer, uninitialised: every position is written before the cache exposes it (the tests fill it with NaN
    to prove it)."""
    return like.new_empty(shape)


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose tensors are views of a larger buffer; ``update`` writes in place."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0
        self._rows = 0  # active rows: the first ones of the buffers

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        if self._k is None:
            self._rows = key_states.shape[0]
        new_len = self._len + key_states.shape[-2]
        if self._k is None or self._v is None or new_len > self._k.shape[-2]:
            self._grow(new_len, key_states, value_states)
        assert self._k is not None and self._v is not None
        rows = self._rows
        self._k[:rows, :, self._len : new_len].copy_(key_states)
        self._v[:rows, :, self._len : new_len].copy_(value_states)
        self._len = new_len
        self._expose()
        return self.keys, self.values  # type: ignore[return-value]

    def get_seq_length(self) -> int:
        return self._len

    def set_buffers(self, k: torch.Tensor, v: torch.Tensor, length: int, rows: int | None = None) -> None:
        """``k``/``v``: whole buffers (spare rows included); ``rows``: how many are active (all by default)."""
        self._k, self._v, self._len = k, v, length
        self._rows = k.shape[0] if rows is None else rows
        self.device = k.device
        self.is_initialized = True
        self._expose()

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The active rows' buffers (spare columns included)."""
        assert self._k is not None and self._v is not None
        return self._k[: self._rows], self._v[: self._rows]

    def full_buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The whole buffers, spare rows included."""
        assert self._k is not None and self._v is not None
        return self._k, self._v

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        rows = b if self._k is None else self._k.shape[0]
        cap = _capacity(needed)
        k = _fresh(key_states, rows, h, cap, d)
        v = _fresh(value_states, rows, h, cap, value_states.shape[-1])
        if self._k is not None and self._v is not None and self._len:
            k[: self._rows, :, : self._len].copy_(self._k[: self._rows, :, : self._len])
            v[: self._rows, :, : self._len].copy_(self._v[: self._rows, :, : self._len])
        self._k, self._v = k, v

    def _expose(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[: self._rows, :, : self._len]
        self.values = self._v[: self._rows, :, : self._len]


class BatchKVCache(Cache):
    """``mask`` [B, T] (bool, True at real tokens) is kept by the scheduler: it is the cache's padding map. It is a
    view of a buffer with spare columns, so the decode step's new column is written in place; the real length of each
    row is also kept on the host (``real_lengths``), so that deciding whether the batch is padded never reads the
    device."""

    def __init__(self, num_layers: int, row_capacity: int = 0) -> None:
        super().__init__(layers=[_GrowingLayer() for _ in range(num_layers)])
        self.row_capacity = row_capacity  # rows its buffers keep room for (at least its rows)
        self._mask_buffer: torch.Tensor | None = None
        self._mask_len = 0
        self._lengths: list[int] = []
        self._rows = 0

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self._mask_buffer is None else self._mask_buffer[: self._rows, : self._mask_len]

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        """Install a padding map (after a prefill); reads its row lengths back once (the batch changed)."""
        if mask is None:
            self._mask_buffer, self._mask_len, self._lengths = None, 0, []
            return
        self._set_mask(mask, [int(n) for n in mask.sum(dim=1).tolist()])

    def _set_mask(self, mask: torch.Tensor, lengths: list[int]) -> None:
        rows, length = mask.shape
        buffer = mask.new_zeros(max(rows, self.row_capacity), _capacity(length))
        buffer[:rows, :length].copy_(mask)
        self._mask_buffer, self._mask_len, self._lengths, self._rows = buffer, length, lengths, rows

    @property
    def num_rows(self) -> int:
        return 0 if self._mask_buffer is None else self._rows

    @property
    def length(self) -> int:
        return self.get_seq_length()

    def _layers(self) -> list[_GrowingLayer]:
        return self.layers  # type: ignore[return-value]

    def real_lengths(self) -> list[int]:
        """Real (unpadded) tokens per row, from the host's bookkeeping."""
        return list(self._lengths)

    def nbytes(self) -> int:
        total = 0
        for layer in self._layers():
            if layer._k is not None and layer._v is not None:
                total += layer._k.nbytes + layer._v.nbytes
        return total

    def start_from(self, keys: Sequence[torch.Tensor], values: Sequence[torch.Tensor], room: int) -> None:
        """Make this empty cache hold ``keys`` / ``values`` (one [rows, kv_heads, n, head_dim] tensor per layer),
        with spare room for ``room`` more positions (the prefix cache's opening, before the rest is prefilled)."""
        for layer, k, v in zip(self._layers(), keys, values, strict=True):
            n = k.shape[-2]
            kb = _fresh(k, k.shape[0], k.shape[1], _capacity(n + room), k.shape[-1])
            vb = _fresh(v, v.shape[0], v.shape[1], _capacity(n + room), v.shape[-1])
            kb[:, :, :n].copy_(k)
            vb[:, :, :n].copy_(v)
            layer.set_buffers(kb, vb, n)

    def realign(self, index: torch.Tensor) -> None:
        """Move positions within each row, in every layer: position ``j`` of row ``b`` takes the old position
        ``index[b, j]`` ([rows, length], long, on the cache's device). The prefix cache right-aligns rows whose
        padding sat between the cached opening and the rest of the prompt, so that every row is left-padded again
        (``select`` and ``retain`` drop the left columns that every row pads)."""
        for layer in self._layers():
            k, v = layer.buffers()
            n = layer._len
            picks = index[:, None, :, None]
            k[:, :, :n] = k[:, :, :n].gather(2, picks.expand(-1, k.shape[1], -1, k.shape[3]))
            v[:, :, :n] = v[:, :, :n].gather(2, picks.expand(-1, v.shape[1], -1, v.shape[3]))

    def span(self, row: int, start: int, length: int) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Copies of one row's keys and values at positions ``start`` .. ``start + length``, per layer."""
        keys, values = [], []
        for layer in self._layers():
            k, v = layer.buffers()
            keys.append(k[row : row + 1, :, start : start + length].clone())
            values.append(v[row : row + 1, :, start : start + length].clone())
        return keys, values

    def zero_padding(self) -> None:
        """Write zeros at padded positions (after a left-padded prefill)."""
        mask = self.mask
        assert mask is not None
        if not self.has_padding():
            return
        pad = ~mask[:, None, :, None]
        for layer in self._layers():
            k, v = layer.buffers()
            k[:, :, : layer._len].masked_fill_(pad, 0.0)
            v[:, :, : layer._len].masked_fill_(pad, 0.0)

    def append_position(self) -> torch.Tensor:
        """Extend the mask by one real position (the token of the coming decode step), in place; return the mask."""
        buffer = self._mask_buffer
        assert buffer is not None
        if self._mask_len == buffer.shape[1]:
            grown = buffer.new_zeros(buffer.shape[0], _capacity(self._mask_len + 1))
            grown[:, : self._mask_len].copy_(buffer)
            self._mask_buffer = buffer = grown
        buffer[: self._rows, self._mask_len].fill_(True)
        self._mask_len += 1
        self._lengths = [n + 1 for n in self._lengths]
        return buffer[: self._rows, : self._mask_len]

    def has_padding(self) -> bool:
        return bool(self._lengths) and min(self._lengths) < self._mask_len

    def select(self, rows: Sequence[int], index: torch.Tensor | None = None) -> None:
        """Keep only ``rows`` (in that order), then drop the left columns that every remaining row pads. ``index``:
        ``rows`` as a long tensor on the cache's device, when the caller has one already."""
        mask = self.mask
        assert mask is not None
        if index is None:
            index = torch.tensor(list(rows), dtype=torch.long).to(mask.device, non_blocking=True)
        lengths = [self._lengths[i] for i in rows]
        self._set_mask(mask.index_select(0, index), lengths)
        for layer in self._layers():
            k, v = layer.buffers()
            layer.set_buffers(k.index_select(0, index), v.index_select(0, index), layer._len)
        self._trim_left()

    def retain(self, keep: Sequence[int]) -> list[int]:
        """Keep the rows ``keep`` in place: the kept rows after the new end move into the holes the others leave (a
        copy of the moved rows only; no buffer is rebuilt). Returns the new order: the old index of the row now at
        each position (the caller reorders its own per-row state the same way)."""
        n = len(keep)
        kept = set(keep)
        holes = [i for i in range(n) if i not in kept]
        movers = [i for i in keep if i >= n]
        order = list(range(n))
        for hole, source in zip(holes, movers, strict=True):
            order[hole] = source
        buffer = self._mask_buffer
        assert buffer is not None
        if holes:
            pairs = torch.tensor([*holes, *movers], dtype=torch.long).to(buffer.device, non_blocking=True)
            dst, src = pairs[: len(holes)], pairs[len(holes) :]
            live = buffer[:, : self._mask_len]
            live.index_copy_(0, dst, live.index_select(0, src))
            for layer in self._layers():
                for tensor in layer.full_buffers():
                    used = tensor[:, :, : layer._len]
                    used.index_copy_(0, dst, used.index_select(0, src))
        self._lengths = [self._lengths[i] for i in order]
        self._rows = n
        for layer in self._layers():
            layer._rows = n
            layer._expose()
        self._trim_left()
        return order

    def join(self, other: BatchKVCache) -> bool:
        """Append ``other``'s rows in place (into spare rows, right-aligned, zero-padded on the left) when they fit:
        room in rows and not longer than this cache. False (nothing changed) when they do not: use ``concat``."""
        buffer = self._mask_buffer
        theirs_mask = other.mask
        n, m = self._rows, other.num_rows
        if buffer is None or theirs_mask is None or other.length > self.length or n + m > buffer.shape[0]:
            return False
        layers = self._layers()
        if any(layer._k is None or layer._k.shape[0] < n + m for layer in layers):
            return False
        length, offset = self.length, self.length - other.length
        for mine, theirs in zip(layers, other._layers(), strict=True):
            their_k, their_v = theirs.buffers()
            for tensor, source in zip(mine.full_buffers(), (their_k, their_v), strict=True):
                tensor[n : n + m, :, :offset].zero_()
                tensor[n : n + m, :, offset:length].copy_(source[:, :, : other.length])
            mine._rows = n + m
            mine._expose()
        buffer[n : n + m].zero_()
        buffer[n : n + m, offset:length].copy_(theirs_mask)
        self._lengths = [*self._lengths, *other._lengths]
        self._rows = n + m
        return True

    def _trim_left(self) -> None:
        if not self._lengths:
            return
        lead = self.length - max(self._lengths)
        if lead <= 0:
            return
        mask = self.mask
        assert mask is not None
        self._set_mask(mask[:, lead:], self._lengths)
        for layer in self._layers():
            k, v = layer.full_buffers()
            layer.set_buffers(k[:, :, lead:], v[:, :, lead:], layer._len - lead, rows=layer._rows)

    @classmethod
    def concat(cls, caches: Sequence[BatchKVCache], row_capacity: int = 0) -> BatchKVCache:
        """One cache holding the rows of ``caches`` in order, left-padded to the longest, with room for
        ``row_capacity`` rows."""
        caches = [c for c in caches if c.num_rows > 0]
        if not caches:
            raise ValueError("nothing to concatenate")
        if len(caches) == 1 and caches[0].row_capacity >= row_capacity:
            return caches[0]
        num_layers = len(caches[0].layers)
        out = cls(num_layers, row_capacity)
        length = max(c.length for c in caches)
        rows = sum(c.num_rows for c in caches)
        first_mask = caches[0].mask
        assert first_mask is not None
        mask = first_mask.new_zeros(rows, length)
        start = 0
        for c in caches:
            assert c.mask is not None
            mask[start : start + c.num_rows, length - c.length :] = c.mask
            start += c.num_rows
        out._set_mask(mask, [n for c in caches for n in c._lengths])
        cap = _capacity(length)
        for i in range(num_layers):
            k0, v0 = caches[0]._layers()[i].buffers()
            k = _fresh(k0, max(rows, row_capacity), k0.shape[1], cap, k0.shape[3])
            v = _fresh(v0, max(rows, row_capacity), v0.shape[1], cap, v0.shape[3])
            start = 0
            for c in caches:
                ck, cv = c._layers()[i].buffers()
                n, offset = c.num_rows, length - c.length
                k[start : start + n, :, :offset].zero_()  # the left padding this cache gets here
                v[start : start + n, :, :offset].zero_()
                k[start : start + n, :, offset:length].copy_(ck[:, :, : c.length])
                v[start : start + n, :, offset:length].copy_(cv[:, :, : c.length])
                start += n
            out._layers()[i].set_buffers(k, v, length, rows=rows)
        return out
