"""KV cache rebuilds on the engine thread: new buffers zero-filled (before 2026-12-07) or left uninitialised.

    python bench/kv_cache.py                      # SmolLM2-135M's KV shapes, fp32, a few seconds

Two operations that stall every decoding stream while they run, with SmolLM2-135M's cache shapes (30 layers,
3 key/value heads of 64, fp32; no model is loaded):

* **join**: a ``--long``-token row (a long prompt just prefilled) joins a group of ``--rows`` rows of ``--short``
  positions that is shorter than it, so the group's cache is rebuilt (``BatchKVCache.concat`` with room for
  ``--capacity`` rows);
* **grow**: a batch of ``--capacity`` rows at ``--grow-at`` positions decodes one more token past its buffer's
  room, so every layer's buffer is reallocated half again as long (``_GrowingLayer._grow``).

Each is timed ``--repeats`` times per side, the sides alternating (``zeros``: ``_fresh`` patched to zero-fill, what
the cache did before; ``fresh``: the shipped uninitialised buffers), medians and their ratio. Writes
``bench/results/kv_cache.json`` with the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_record
from service.engine import kv_cache
from service.engine.kv_cache import BatchKVCache

RESULTS = Path(__file__).resolve().parent / "results"
LAYERS, KV_HEADS, HEAD_DIM = 30, 3, 64  # SmolLM2-135M


def filled(rows: int, length: int, capacity: int = 0) -> BatchKVCache:
    """A cache of ``rows`` rows of ``length`` real positions, as a prefill leaves it."""
    cache = BatchKVCache(LAYERS, row_capacity=capacity)
    for layer in range(LAYERS):
        k = torch.randn(rows, KV_HEADS, length, HEAD_DIM)
        cache.update(k, k.clone(), layer)
    cache.mask = torch.ones(rows, length, dtype=torch.bool)
    return cache


def time_join(rows: int, short: int, long: int, capacity: int) -> float:
    group, newcomer = filled(rows, short, capacity), filled(1, long)
    start = time.perf_counter()
    BatchKVCache.concat([group, newcomer], row_capacity=capacity)
    return time.perf_counter() - start


def time_grow(rows: int, at: int) -> float:
    cache = filled(rows, at, rows)
    step = torch.randn(rows, KV_HEADS, 1, HEAD_DIM)
    room = cache.layers[0]._k.shape[2]  # type: ignore[attr-defined]
    fill = torch.randn(rows, KV_HEADS, room - at, HEAD_DIM)
    for layer in range(LAYERS):  # fill the buffer's room, so the next token reallocates
        cache.update(fill, fill, layer)
    start = time.perf_counter()
    for layer in range(LAYERS):
        cache.update(step, step, layer)
    return time.perf_counter() - start


def zero_filled(like: torch.Tensor, *shape: int) -> torch.Tensor:
    return like.new_zeros(shape)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--short", type=int, default=100)
    parser.add_argument("--long", type=int, default=600)
    parser.add_argument("--capacity", type=int, default=16, help="rows the rebuilt cache keeps room for")
    parser.add_argument("--grow-at", type=int, default=300)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--load-note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS / "kv_cache.json")
    args = parser.parse_args()
    load_before = os.getloadavg()
    shipped = kv_cache._fresh
    allocators: dict[str, Callable[..., torch.Tensor]] = {"zeros": zero_filled, "fresh": shipped}
    operations: dict[str, Callable[[], float]] = {
        "join": lambda: time_join(args.rows, args.short, args.long, args.capacity),
        "grow": lambda: time_grow(args.capacity, args.grow_at),
    }
    times: dict[str, dict[str, list[float]]] = {op: {side: [] for side in allocators} for op in operations}
    try:
        for _ in range(args.repeats):
            for op, run in operations.items():
                for side, allocate in allocators.items():
                    kv_cache._fresh = allocate
                    times[op][side].append(run())
    finally:
        kv_cache._fresh = shipped
    results: dict[str, Any] = {}
    for op, sides in times.items():
        medians = {side: statistics.median(values) * 1000 for side, values in sides.items()}
        results[op] = {
            **{f"{side}_ms_p50": round(ms, 2) for side, ms in medians.items()},
            "fresh_over_zeros": round(medians["fresh"] / medians["zeros"], 3),
            "all_ms": {side: [round(v * 1000, 2) for v in values] for side, values in sides.items()},
        }
        print(op, {k: v for k, v in results[op].items() if k != "all_ms"})
    record = {
        "what": "KV cache rebuilds with zero-filled vs uninitialised buffers (SmolLM2-135M shapes, fp32, CPU)",
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        **results,
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads()},
        "load": load_record(load_before, args.load_note),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(record, indent=1) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
