"""The left-padded batch cache: rows of different lengths join and leave without disturbing the others."""

from __future__ import annotations

import torch

from service.engine.kv_cache import BatchKVCache


def _cache(rows: int, length: int, fill: float, layers: int = 2) -> BatchKVCache:
    cache = BatchKVCache(layers)
    for i in range(layers):
        k = torch.full((rows, 2, length, 4), fill + i)
        cache.update(k, -k, i)
    cache.mask = torch.ones(rows, length, dtype=torch.bool)
    return cache


def test_concat_left_pads_and_select_trims() -> None:
    short, long = _cache(1, 3, 1.0), _cache(2, 5, 10.0)
    merged = BatchKVCache.concat([short, long])
    assert merged.num_rows == 3 and merged.length == 5
    assert merged.mask.tolist()[0] == [False, False, True, True, True]  # type: ignore[union-attr]
    keys = merged.layers[1].keys
    assert keys.shape == (3, 2, 5, 4)
    assert torch.equal(keys[0, :, :2], torch.zeros(2, 2, 4)) and torch.equal(keys[0, :, 2:], torch.full((2, 3, 4), 2.0))
    assert torch.equal(keys[1:], torch.full((2, 2, 5, 4), 11.0))
    merged.select([0])  # the long rows leave: the padding column block goes too
    assert merged.length == 3 and merged.mask.tolist() == [[True, True, True]]  # type: ignore[union-attr]
    assert torch.equal(merged.layers[0].keys, torch.full((1, 2, 3, 4), 1.0))
    assert torch.equal(merged.layers[0].values, torch.full((1, 2, 3, 4), -1.0))


def test_update_appends_in_place_and_grows() -> None:
    cache = _cache(2, 3, 0.0, layers=1)
    buffer = cache.layers[0]._k  # type: ignore[attr-defined]
    keys, _values = cache.update(torch.ones(2, 2, 1, 4), torch.ones(2, 2, 1, 4), 0)
    assert keys.shape == (2, 2, 4, 4) and cache.get_seq_length() == 4
    assert cache.layers[0]._k is buffer  # type: ignore[attr-defined]  # no copy of the cache per step
    big = torch.arange(2 * 2 * 200 * 4, dtype=torch.float32).reshape(2, 2, 200, 4)
    keys, _ = cache.update(big, big, 0)
    assert (
        keys.shape == (2, 2, 204, 4)
        and torch.equal(keys[:, :, 4:], big)
        and torch.equal(keys[:, :, 3:4], torch.ones(2, 2, 1, 4))
    )


def _rows_of(cache: BatchKVCache) -> list[float]:
    """Each active row's marker: its first real key value (rows are filled with one value each)."""
    keys, mask = cache.layers[0].keys, cache.mask
    assert mask is not None
    return [float(keys[r, 0][mask[r]][0, 0]) for r in range(cache.num_rows)]


def test_rows_leave_and_join_in_place() -> None:
    cache = BatchKVCache.concat([_cache(1, 4, float(i)) for i in range(1, 6)], row_capacity=8)
    buffer = cache.layers[0]._k  # type: ignore[attr-defined]
    assert cache.num_rows == 5 and buffer.shape[0] == 8
    order = cache.retain([0, 2, 4])  # rows 1 and 3 leave: row 4 moves into the hole at 1
    assert order == [0, 4, 2] and _rows_of(cache) == [1.0, 5.0, 3.0]
    assert cache.layers[0]._k is buffer  # type: ignore[attr-defined]  # nothing rebuilt
    assert cache.layers[0].keys.shape == (3, 2, 4, 4) and cache.real_lengths() == [4, 4, 4]
    short = _cache(2, 2, 7.0)  # shorter than the cache: written into spare rows, left-padded with zeros
    assert cache.join(short)
    assert cache.layers[0]._k is buffer  # type: ignore[attr-defined]
    assert cache.num_rows == 5 and _rows_of(cache) == [1.0, 5.0, 3.0, 7.0, 7.0]
    assert cache.mask.tolist()[3] == [False, False, True, True]  # type: ignore[union-attr]
    assert torch.equal(cache.layers[1].keys[3, :, :2], torch.zeros(2, 2, 4))
    assert torch.equal(cache.layers[1].values[4, :, 2:], torch.full((2, 2, 4), -8.0))
    assert not cache.join(_cache(1, 6, 9.0))  # longer than the cache: the caller rebuilds with concat
    assert not cache.join(_cache(4, 2, 9.0))  # more rows than the spare ones
    assert cache.num_rows == 5


def test_retain_trims_the_columns_every_row_pads() -> None:
    cache = BatchKVCache.concat([_cache(1, 2, 1.0), _cache(1, 5, 2.0), _cache(1, 3, 3.0)], row_capacity=4)
    order = cache.retain([0, 2])  # the longest row leaves: 2 padding columns go
    assert order == [0, 2] and cache.length == 3 and _rows_of(cache) == [1.0, 3.0]
    assert cache.mask.tolist() == [[False, True, True], [True, True, True]]  # type: ignore[union-attr]
