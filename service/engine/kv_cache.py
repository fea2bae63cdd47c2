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
    """``mask`` [B, T] (bool, True at real tokens) is kept by the scheduler: it is the cache's padding map."""

    def __init__(self, num_layers: int) -> None:
        super().__init__(layers=[_GrowingLayer() for _ in range(num_layers)])
        self.mask: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return 0 if self.mask is None else int(self.mask.shape[0])

    @property
    def length(self) -> int:
        return self.get_seq_length()

    def _layers(self) -> list[_GrowingLayer]:
        return self.layers  # type: ignore[return-value]

    def real_lengths(self) -> list[int]:
        assert self.mask is not None
        return self.mask.sum(dim=1).tolist()

    def nbytes(self) -> int:
        total = 0
        for layer in self._layers():
            if layer._k is not None and layer._v is not None:
                total += layer._k.nbytes + layer._v.nbytes
        return total

    def zero_padding(self) -> None:
        """Write zeros at padded positions (after a left-padded prefill)."""
        assert self.mask is not None
        if bool(self.mask.all()):
            return
        pad = ~self.mask[:, None, :, None]
        for layer in self._layers():
            k, v = layer.buffers()
            k[:, :, : layer._len].masked_fill_(pad, 0.0)
            v[:, :, : layer._len].masked_fill_(pad, 0.0)

    def append_position(self) -> torch.Tensor:
        """Extend the mask by one real position (the token of the coming decode step); return the new mask."""
        assert self.mask is not None
        self.mask = torch.cat([self.mask, self.mask.new_ones(self.mask.shape[0], 1)], dim=1)
        return self.mask

    def has_padding(self) -> bool:
        return self.mask is not None and not bool(self.mask.all())

    def select(self, rows: Sequence[int]) -> None:
        """Keep only ``rows`` (in that order), then drop the left columns that every remaining row pads."""
        assert self.mask is not None
        index = torch.tensor(list(rows), dtype=torch.long, device=self.mask.device)
        self.mask = self.mask.index_select(0, index)
        for layer in self._layers():
            k, v = layer.buffers()
            layer.set_buffers(k.index_select(0, index), v.index_select(0, index), layer._len)
        self._trim_left()

    def _trim_left(self) -> None:
        assert self.mask is not None
        if self.mask.shape[0] == 0:
            return
        lead = int(self.length - self.mask.sum(dim=1).max().item())
        if lead <= 0:
            return
        self.mask = self.mask[:, lead:]
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
        out.mask = mask
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
