"""The decode batch's KV cache: one left-padded tensor per layer, rows added and removed between steps.

Rows of different lengths share one [B, kv_heads, T, head_dim] tensor per layer; shorter rows are padded on the
left and ``mask`` [B, T] marks the real positions. Each layer keeps spare room along T so that a decode step writes
its new key/value in place instead of concatenating the whole cache (``DynamicCache`` copies it every step).

Rows join with ``concat`` (after their own prefill) and leave with ``select``; both rebuild the buffers once, which
is cheap next to a forward pass and only happens when the batch changes. Padded positions hold zeros (a padded
query position of a prefill may produce NaN when SDPA sees a fully masked row; zeroing keeps it out of the cache).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.cache_utils import Cache, DynamicLayer

_ROOM = 64  # spare positions allocated on each growth (and at least this many)


def _capacity(length: int) -> int:
    return length + max(_ROOM, length // 2)


class _GrowingLayer(DynamicLayer):
    """A DynamicLayer whose tensors are views of a larger buffer; ``update`` writes in place."""

    def __init__(self) -> None:
        super().__init__()
        self._k: torch.Tensor | None = None
        self._v: torch.Tensor | None = None
        self._len = 0

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.is_initialized = True

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: object, **kwargs: object
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        new_len = self._len + key_states.shape[-2]
        if self._k is None or self._v is None or new_len > self._k.shape[-2]:
            self._grow(new_len, key_states, value_states)
        assert self._k is not None and self._v is not None
        self._k[:, :, self._len : new_len].copy_(key_states)
        self._v[:, :, self._len : new_len].copy_(value_states)
        self._len = new_len
        self._expose()
        return self.keys, self.values  # type: ignore[return-value]

    def get_seq_length(self) -> int:
        return self._len

    def set_buffers(self, k: torch.Tensor, v: torch.Tensor, length: int) -> None:
        self._k, self._v, self._len = k, v, length
        self.device = k.device
        self.is_initialized = True
        self._expose()

    def buffers(self) -> tuple[torch.Tensor, torch.Tensor]:
        assert self._k is not None and self._v is not None
        return self._k, self._v

    def _grow(self, needed: int, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        b, h, _, d = key_states.shape
        cap = _capacity(needed)
        k = key_states.new_zeros(b, h, cap, d)
        v = value_states.new_zeros(b, h, cap, value_states.shape[-1])
        if self._k is not None and self._v is not None and self._len:
            k[:, :, : self._len].copy_(self._k[:, :, : self._len])
            v[:, :, : self._len].copy_(self._v[:, :, : self._len])
        self._k, self._v = k, v

    def _expose(self) -> None:
        assert self._k is not None and self._v is not None
        self.keys = self._k[:, :, : self._len]
        self.values = self._v[:, :, : self._len]


class BatchKVCache(Cache):
    """``mask`` [B, T] (bool, True at real tokens) is kept by the scheduler: it is the cache's padding map. It is a
    view of a buffer with spare columns, so the decode step's new column is written in place; the real length of each
    row is also kept on the host (``real_lengths``), so that deciding whether the batch is padded never reads the
    device."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[_GrowingLayer() for _ in range(num_layers)])
        self._mask_buffer: torch.Tensor | None = None
        self._mask_len = 0
        self._lengths: list[int] = []

    @property
    def mask(self) -> torch.Tensor | None:
        return None if self._mask_buffer is None else self._mask_buffer[:, : self._mask_len]

    @mask.setter
    def mask(self, mask: torch.Tensor | None) -> None:
        """Install a padding map (after a prefill); reads its row lengths back once (the batch changed)."""
        if mask is None:
            self._mask_buffer, self._mask_len, self._lengths = None, 0, []
            return
        self._set_mask(mask, [int(n) for n in mask.sum(dim=1).tolist()])

    def _set_mask(self, mask: torch.Tensor, lengths: list[int]) -> None:
        rows, length = mask.shape
        buffer = mask.new_zeros(rows, _capacity(length))
        buffer[:, :length].copy_(mask)
        self._mask_buffer, self._mask_len, self._lengths = buffer, length, lengths

    @property
    def num_rows(self) -> int:
        return 0 if self._mask_buffer is None else int(self._mask_buffer.shape[0])

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
        buffer[:, self._mask_len].fill_(True)
        self._mask_len += 1
        self._lengths = [n + 1 for n in self._lengths]
        return buffer[:, : self._mask_len]

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
            k, v = layer.buffers()
            layer.set_buffers(k[:, :, lead:], v[:, :, lead:], layer._len - lead)

    @classmethod
    def concat(cls, caches: Sequence[BatchKVCache]) -> BatchKVCache:
        """One cache holding the rows of ``caches`` in order, left-padded to the longest."""
        caches = [c for c in caches if c.num_rows > 0]
        if not caches:
            raise ValueError("nothing to concatenate")
        if len(caches) == 1:
            return caches[0]
        num_layers = len(caches[0].layers)
        out = cls(num_layers)
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
            k = k0.new_zeros(rows, k0.shape[1], cap, k0.shape[3])
            v = v0.new_zeros(rows, v0.shape[1], cap, v0.shape[3])
            start = 0
            for c in caches:
                ck, cv = c._layers()[i].buffers()
                n, offset = c.num_rows, length - c.length
                k[start : start + n, :, offset:length].copy_(ck[:, :, : c.length])
                v[start : start + n, :, offset:length].copy_(cv[:, :, : c.length])
                start += n
            out._layers()[i].set_buffers(k, v, length)
        return out
