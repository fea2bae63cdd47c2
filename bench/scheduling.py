"""Scheduling benchmark on SmolLM2-135M, in process: what a long prompt does to running streams, and what many
distinct adapters through few slots cost.

    python bench/scheduling.py                                  # a few minutes on a 2-core CPU
    python bench/scheduling.py --streams 4 --long-tokens 400 --requests 32 --out /tmp/scheduling.json   # a quick look

1. **Long prompt mid-run.** ``--streams`` requests decode (EOS ignored, until the long request has finished: then
   they are cancelled); once every stream has produced a few tokens a ``--long-tokens`` prompt (2,000 by default)
   arrives and generates ``--long-new-tokens`` (16). For every running stream: its median inter-token gap before the
   arrival and its longest gap among those that overlap the long prompt's prefill (from its arrival to its first
   token, so its join is included). The *delay* is longest - median: what the long prompt added to a stream's next
   token. Also the streams' median gap while the long request decodes beside them, and the decode groups then.
   Run once per ``--chunks`` value (``EngineConfig.prefill_chunk``; a value >= the prompt's length is the unchunked
   prefill), ``--groups`` value, ``--packed`` value (``EngineConfig.packed_linears`` and
   ``matmul_decode_attention``, the service's CPU generation path) and ``--chunk-ms`` value
   (``EngineConfig.prefill_chunk_target_ms``: chunks sized by time while rows decode), ``--gc-freeze`` value (the
   start-up heap frozen, as the service leaves it, or not) and ``--fused`` value (``fused_passes``: every
   decode group and the chunk in one forward pass per step, as the service does on the CPU, or a pass each).
   Target: <= 100 ms.
2. **256 adapters through 8 slots.** ``--requests`` requests, ``--slots`` at a time (8 slots, batch 8), each request
   with its own adapter from a set of ``--adapters`` (256: nearly every request swaps an adapter in) vs from a set of
   ``--slots`` (8: all resident after the first round). Throughput = generated tokens / wall time; ``--pairs``
   alternating pairs, median ratio, on the service's CPU generation path. Target: >= 0.7.
3. **Adapter generation mid-run** (on the service's CPU path since 2026-12-07; before, a plain engine on the process's
   thread setting). The same streams, then what the service does on a cache miss with 8 examples: the
   task vector's hidden-state read and the self-check's scoring of the base model and the adapter, on the engine
   thread. Both go in passes of at most ``prefill_chunk`` padded tokens with decode steps between them; a chunk of
   100,000 is the single pass every read and check made before. ``--generation-rounds`` alternating rounds; the
   streams' delay as in 1, and how long the read and the scoring took.
   ``--chunks ""`` and ``--pairs 0`` leave out 1 and 2.

Writes JSON with the targets and the machine's load (``os.getloadavg``, ``--load-note``).
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import os
import platform
import statistics
import sys
import threading
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


from bench.common import load_record
from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from generator.config import LoraSettings
from generator.lora_layout import LoraLayout
from generator.selfcheck import encode_groups
from generator.tasks import Example, format_prompt, format_target
from service.engine import Engine, EngineConfig, RequestHandle, SamplingParams

RESULTS = Path(__file__).resolve().parent / "results"
TOPICS = "the sea, a red fox, winter, bread, the moon, trains, a garden, rain, hills, quiet towns at night"
WORDS = TOPICS.replace(",", "").split(" ")


def make_adapters(model: torch.nn.Module, n: int, name: str) -> list[GeneratedAdapter]:
    settings = LoraSettings()
    layout = LoraLayout.from_model(model, settings)
    return [
        GeneratedAdapter(
            layout.unflatten(torch.randn(layout.dim, generator=torch.Generator().manual_seed(i)) * 0.05),
            settings,
            name,
            f"sched-{i}",
        )
        for i in range(n)
    ]


def frozen_heap(freeze: bool) -> None:
    """As the service leaves the heap after start-up (``gc.freeze``: the collector's full passes skip what is loaded),
    or not."""
    gc.unfreeze()
    gc.collect()
    if freeze:
        gc.freeze()


def text_of(n_words: int, seed: int) -> str:
    return " ".join(WORDS[(seed * 7 + i * 3) % len(WORDS)] for i in range(n_words))


class Streams:
    """``n`` requests decoding (EOS ignored) on ``engine``, a thread each recording the time of every token; the
    constructor returns once each has 4 tokens (and 0.3 s more), so what comes next arrives mid-run."""

    def __init__(self, engine: Engine, n: int, tokens: int, adapters: list[GeneratedAdapter]) -> None:
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        self.handles = [
            engine.submit(text_of(12, i), adapter=adapters[i % len(adapters)], params=params) for i in range(n)
        ]
        self.times: list[list[float]] = [[] for _ in self.handles]
        started = threading.Barrier(n + 1)

        def follow(k: int, handle: RequestHandle) -> None:
            first = True
            for delta in handle:
                if delta.token_ids:
                    self.times[k].append(time.perf_counter())
                    if first and len(self.times[k]) >= 4:
                        first = False
                        started.wait()

        self.threads = [threading.Thread(target=follow, args=(k, h)) for k, h in enumerate(self.handles)]
        for t in self.threads:
            t.start()
        started.wait()
        time.sleep(0.3)

    def stop(self) -> bool:
        """Cancel every stream; True when all were still running (they outlasted what was measured)."""
        outlasted = all(not h.done for h in self.handles)
        for h in self.handles:
            h.cancel()
        for t in self.threads:
            t.join()
        return outlasted

    def gaps(self, start: float, end: float) -> tuple[list[float], list[float], list[float]]:
        """Per stream: its median gap before ``start``, its longest gap overlapping [start, end) (its next token
        after ``end`` included), and every such gap."""
        medians, worst, during_all = [], [], []
        for series in self.times:
            pairs = list(itertools.pairwise(series))
            before = [b - a for a, b in pairs if b <= start]
            during = [b - a for a, b in pairs if b > start and a < end]
            medians.append(statistics.median(before) if before else 0.0)
            worst.append(max(during) if during else 0.0)
            during_all += during
        return medians, worst, during_all


def long_prompt_interference(
    base: Any,
    chunk: int,
    streams: int,
    tokens: int,
    long_tokens: int,
    adapters: list[GeneratedAdapter],
    long_new_tokens: int = 16,
    groups: int = 4,
    packed: bool = True,
    threads: int = 0,
    chunk_ms: float = 0.0,
    fused: bool = False,
) -> dict[str, Any]:
    config = EngineConfig(
        num_slots=max(8, streams),
        max_batch_size=streams + 1,
        prefill_chunk=chunk,
        prefill_chunk_target_ms=chunk_ms,
        max_decode_groups=groups,
        packed_linears=packed,
        matmul_decode_attention=packed,
        fused_passes=fused,
        threads=threads,
    )
    engine = Engine(base, config)
    try:
        tokenizer = base.tokenizer
        long_ids = (tokenizer(text_of(long_tokens, 99))["input_ids"] * 2)[:long_tokens]
        # the streams run until the long request has finished (then they are cancelled), so its prefill, its join
        # and its decoding beside them are all measured; ``tokens`` only bounds them
        running = Streams(engine, streams, tokens, adapters)
        arrival = time.perf_counter()
        long_handle = engine.submit(long_ids, params=SamplingParams(max_tokens=long_new_tokens, ignore_eos=True))
        groups_while = 0
        for delta in long_handle:
            if delta.token_ids:  # it has joined the running rows (its group may form just after its first token)
                groups_while = max(groups_while, engine.stats().decode_groups)
        long_result = long_handle.result()
        long_done_at = time.perf_counter()
        outlasted = running.stop()
        assert long_result.time_to_first_token is not None
        first_token_at = arrival + long_result.time_to_first_token
    finally:
        engine.close()
    # the gaps that overlap the long prompt's prefill: from the arrival to its first token (its join included)
    medians, worst, during_gaps = running.gaps(arrival, first_token_at)
    delays = [w - m for w, m in zip(worst, medians, strict=True)]
    # the long request decoding beside them (its rows in the same pass, or a group of its own)
    after_gaps = [
        b - a
        for series in running.times
        for a, b in itertools.pairwise(series)
        if a >= first_token_at and b <= long_done_at
    ]
    return {
        "prefill_chunk": chunk,
        "max_decode_groups": groups,
        "long_prompt_tokens": len(long_ids),
        "long_request_ttft_ms": round(long_result.time_to_first_token * 1000, 1),
        "stream_gap_before_p50_ms": round(statistics.median(medians) * 1000, 1),
        "stream_gap_during_p50_ms": round(statistics.median(during_gaps) * 1000, 1),  # a chunk + a decode step
        "stream_longest_gap_during_ms": round(max(worst) * 1000, 1),
        "delay_of_next_token_ms_max": round(max(delays) * 1000, 1),
        "delay_of_next_token_ms_median": round(statistics.median(delays) * 1000, 1),
        "stream_gap_while_long_decodes_p50_ms": round(statistics.median(after_gaps) * 1000, 1) if after_gaps else None,
        "decode_groups_while_long_decodes": groups_while,
        "streams_outlasted_the_long_request": outlasted,
    }


def generation_interference(
    base: Any,
    chunk: int,
    streams: int,
    tokens: int,
    adapters: list[GeneratedAdapter],
    layer: int = -8,
    examples: int = 8,
    threads: int = 0,
) -> dict[str, Any]:
    """What generating an adapter from ``examples`` examples does to running streams: the task vector's hidden-state
    read (layer 23 of 30, as the shipped generator reads) and the self-check's scoring of base and adapter on the
    same examples (3 choices each), both on the engine thread, as the service runs them."""
    config = EngineConfig(
        num_slots=max(8, streams) + 1,
        max_batch_size=streams,
        prefill_chunk=chunk,
        packed_linears=True,  # the service's CPU path; the read and the scoring run on the plain weights regardless
        matmul_decode_attention=True,
        threads=threads,
    )
    engine = Engine(base, config)
    try:
        shots = [
            Example(text_of(40 + 5 * i, 50 + i), text_of(2, 70 + i), tuple(text_of(2, 70 + i + k) for k in range(3)))
            for i in range(examples)
        ]
        texts = [format_prompt(e.input) + format_target(e.output) for e in shots]
        groups = encode_groups(base.tokenizer, shots, 96, choices=True)
        reader = engine.hidden_state_reader(layer, 96)
        candidate = engine.prepare_adapter(adapters[-1])
        running = Streams(engine, streams, tokens, adapters[:-1])
        arrival = time.perf_counter()
        reader(texts)
        read_done = time.perf_counter()
        engine.answer_logprobs(groups, [None, candidate])
        done = time.perf_counter()
        outlasted = running.stop()
    finally:
        engine.close()
    medians, worst, _ = running.gaps(arrival, done)
    delays = [w - m for w, m in zip(worst, medians, strict=True)]
    return {
        "prefill_chunk": chunk,
        "read_tokens": sum(len(base.tokenizer(t)["input_ids"]) for t in texts),
        "read_ms": round((read_done - arrival) * 1000, 1),
        "self_check_scoring_ms": round((done - read_done) * 1000, 1),
        "stream_gap_before_p50_ms": round(statistics.median(medians) * 1000, 1),
        "stream_longest_gap_during_ms": round(max(worst) * 1000, 1),
        "delay_of_next_token_ms_max": round(max(delays) * 1000, 1),
        "delay_of_next_token_ms_median": round(statistics.median(delays) * 1000, 1),
        "streams_outlasted_the_generation": outlasted,
    }


def adapter_cycling(
    base: Any, adapters: list[GeneratedAdapter], slots: int, requests: int, tokens: int, threads: int = 0
) -> float:
    """Tokens/s of ``requests`` requests over ``adapters`` through ``slots`` slots, as the service's engine runs on the
    CPU (packed Linears, matmul decode attention, ``threads`` on the engine thread)."""
    config = EngineConfig(
        num_slots=slots, max_batch_size=slots, packed_linears=True, matmul_decode_attention=True, threads=threads
    )
    engine = Engine(base, config)
    try:
        prepared = [engine.prepare_adapter(a) for a in adapters]  # prepared once per id, as the service does
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)
        prompts = [text_of(10, i) for i in range(requests)]
        start = time.perf_counter()
        handles = [engine.submit(p, adapter=prepared[i % len(prepared)], params=params) for i, p in enumerate(prompts)]
        generated = sum(len(h.result().token_ids) for h in handles)
        return generated / (time.perf_counter() - start)
    finally:
        engine.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--streams", type=int, default=8)
    parser.add_argument(
        "--tokens", type=int, default=4000, help="bound on each stream (cancelled once the long one ends)"
    )
    parser.add_argument("--long-tokens", type=int, default=2000)
    parser.add_argument("--long-new-tokens", type=int, default=16)
    parser.add_argument("--groups", default="1,4", help="max_decode_groups values, alternated for each chunk")
    parser.add_argument("--chunks", default="32,256,4096", help="prefill_chunk values to compare")
    parser.add_argument(
        "--chunk-ms", default="0", help="prefill_chunk_target_ms values (0: fixed chunks; the service paces at 50)"
    )
    parser.add_argument("--engine-threads", type=int, default=-1, help="part 1, as ICM_LORA_ENGINE_THREADS (0: off)")
    parser.add_argument(
        "--packed",
        default="1",
        help="part 1: the service's CPU generation path (packed Linears, matmul decode attention) off (0) / on (1)",
    )
    parser.add_argument(
        "--fused",
        default="1",
        help="part 1: prefill chunks in decode steps' passes (1, as the service does on the CPU) or apart (0); '0,1'"
        " compares",
    )
    parser.add_argument(
        "--gc-freeze",
        default="1",
        help="part 1: the start-up heap frozen (1, as the service does after loading) or not (0); '0,1' compares",
    )
    parser.add_argument(
        "--generation-chunks", default="256,100000", help="prefill_chunk values for the generation mid-run"
    )
    parser.add_argument("--generation-rounds", type=int, default=3)
    parser.add_argument("--read-layer", type=int, default=-8, help="the hidden-state read's layer (shipped: -8)")
    parser.add_argument("--slots", type=int, default=8)
    parser.add_argument("--adapters", type=int, default=256)
    parser.add_argument("--requests", type=int, default=64)
    parser.add_argument("--cycle-tokens", type=int, default=16)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--load-note", default="")
    parser.add_argument("--out", type=Path, default=RESULTS / "scheduling.json")
    args = parser.parse_args()
    load_before = os.getloadavg()

    # as the service runs it (ICM_LORA_ENGINE_THREADS): the engine thread multi-threaded, this one single-threaded
    threads = torch.get_num_threads() if args.engine_threads == -1 else args.engine_threads
    if threads:
        torch.set_num_threads(1)
    base = load_base_model(args.base_model)
    adapters = make_adapters(base.model, max(args.adapters, args.slots), base.name)
    results: dict[str, Any] = {"long_prompt": [], "cycling": {}}
    for chunk in (int(c) for c in args.chunks.split(",") if c):
        for groups, packed, chunk_ms, freeze, fused in itertools.product(
            (int(g) for g in args.groups.split(",")),
            (p == "1" for p in args.packed.split(",")),
            (float(m) for m in args.chunk_ms.split(",")),
            (f == "1" for f in args.gc_freeze.split(",")),
            (f == "1" for f in args.fused.split(",")),
        ):
            frozen_heap(freeze)
            row = long_prompt_interference(
                base, chunk, args.streams, args.tokens, args.long_tokens, adapters[:16], args.long_new_tokens, groups,
                packed, threads, chunk_ms, fused,
            )  # fmt: skip
            row["packed_linears"], row["engine_threads"], row["prefill_chunk_target_ms"] = packed, threads, chunk_ms
            row["gc_frozen"], row["fused_passes"] = freeze, fused
            print(json.dumps(row))
            results["long_prompt"].append(row)

    frozen_heap(True)  # parts 2 and 3 as the service runs
    results["generation"] = []
    for _ in range(args.generation_rounds):  # alternating: the budgeted passes, then one pass (the old behaviour)
        for chunk in (int(c) for c in args.generation_chunks.split(",")):
            row = generation_interference(
                base, chunk, args.streams, args.tokens, adapters[:17], args.read_layer, threads=threads
            )
            print(json.dumps(row))
            results["generation"].append(row)

    pairs = []
    for k in range(args.pairs):
        order = ("few", "many") if k % 2 == 0 else ("many", "few")
        pair = {}
        for side in order:
            chosen = adapters[: args.slots] if side == "few" else adapters[: args.adapters]
            pair[side] = adapter_cycling(base, chosen, args.slots, args.requests, args.cycle_tokens, threads)
        pair["ratio"] = pair["many"] / pair["few"]
        print(
            f"pair {k + 1}: {args.adapters} adapters {pair['many']:.1f} tok/s, {args.slots} adapters {pair['few']:.1f}"
        )
        pairs.append(pair)
    ratio = statistics.median(p["ratio"] for p in pairs) if pairs else float("nan")  # --pairs 0: not measured
    results["cycling"] = {
        "slots": args.slots,
        "requests": args.requests,
        "tokens_per_request": args.cycle_tokens,
        "pairs": [{k: round(v, 3) for k, v in p.items()} for p in pairs],
        "many_over_few_median": round(ratio, 3),
    }
    best_delay = None  # --chunks "": not measured
    if results["long_prompt"]:
        best = min(results["long_prompt"], key=lambda r: r["delay_of_next_token_ms_max"])
        best_delay = {
            k: best[k]
            for k in ("delay_of_next_token_ms_max", "prefill_chunk", "max_decode_groups", "prefill_chunk_target_ms")
        }
    by_chunk: dict[int, list[float]] = {}
    for row in results["generation"]:
        by_chunk.setdefault(row["prefill_chunk"], []).append(row["delay_of_next_token_ms_max"])
    results["generation_delay_ms_max_median"] = {str(c): statistics.median(v) for c, v in by_chunk.items()}
    results["targets"] = {
        "long_prompt_delay_ms": {"target": "<= 100", "measured_best_chunk": best_delay},
        f"{args.adapters}_adapters_over_{args.slots}": {"target": ">= 0.7", "measured": round(ratio, 3)},
    }
    results["config"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    results["machine"] = {
        "platform": platform.platform(),
        "cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
    }
    results["load"] = load_record(load_before, args.load_note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(results["targets"], indent=2))
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
