"""The chat template's opening cached per adapter, against reading every prompt in full: time to first token.

    python bench/prefix_cache.py           # about 3 minutes on a 2-core CPU -> bench/results/prefix_cache.json

Two engines on two copies of SmolLM2-135M (fp32) in one process, one with the prefix cache
(``EngineConfig.prefix_cache_entries``, 64 by default) and one without (0). Workload: ``--requests`` one-line chat
prompts (SmolLM2's template: a 24-token opening, 38 tokens for a short question) submitted at once, greedy,
``--max-tokens`` each (EOS ignored), with no adapter and with one distinct random adapter per request. Each
engine serves each workload once before timing (the cached side keeps every opening from then on, as a
service does after a task's first request). Then ``--rounds`` rounds, the two engines alternating (order
rotated), the median of each: time to first token (p50 over the requests of a run) and end-to-end tokens/s. Run it
on an otherwise idle machine: the load average is recorded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.engine import TOPICS, make_adapters
from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from service.engine import Engine, EngineConfig, SamplingParams
from service.engine.engine import chat_token_ids
from service.engine.prefix_cache import chat_opening

RESULTS = Path(__file__).resolve().parent / "results"


def questions(n: int) -> list[str]:
    return [f"Write {1 + i % 3} short lines about {TOPICS[i % len(TOPICS)]}." for i in range(n)]


def run(
    engine: Engine, prompts: list[list[int]], adapters: list[GeneratedAdapter | None], tokens: int
) -> dict[str, float]:
    start = time.perf_counter()
    results = engine.generate_many(prompts, adapters, SamplingParams(max_tokens=tokens, ignore_eos=True))
    seconds = time.perf_counter() - start
    ttft = [r.time_to_first_token for r in results if r.time_to_first_token is not None]
    return {"ttft_p50_ms": statistics.median(ttft) * 1000, "tok_s": sum(len(r.token_ids) for r in results) / seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS / "prefix_cache.json")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    load_before = os.getloadavg()

    engines = {
        "cached": Engine(load_base_model("smollm2-135m"), EngineConfig(num_slots=args.requests)),
        "full": Engine(load_base_model("smollm2-135m"), EngineConfig(num_slots=args.requests, prefix_cache_entries=0)),
    }
    tokenizer = engines["cached"].tokenizer
    prompts = [chat_token_ids(tokenizer, [{"role": "user", "content": q}]) for q in questions(args.requests)]
    workloads: dict[str, list[GeneratedAdapter | None]] = {
        "no_adapter": [None] * args.requests,
        "adapters": list(make_adapters(engines["cached"].model, args.requests, "smollm2-135m")),
    }
    for engine in engines.values():
        for adapters in workloads.values():
            run(engine, prompts, adapters, 2)  # warm-up: slots loaded, and the cached side's openings kept
    found: dict[str, dict[str, list[dict[str, float]]]] = {w: {e: [] for e in engines} for w in workloads}
    for round_ in range(args.rounds):
        for workload, adapters in workloads.items():
            order = list(engines) if round_ % 2 == 0 else list(reversed(engines))
            for name in order:
                found[workload][name].append(run(engines[name], prompts, adapters, args.max_tokens))
        print(f"round {round_}: {json.dumps({w: {e: found[w][e][-1] for e in engines} for w in workloads})}")
    stats = {name: engine.stats(sync=True) for name, engine in engines.items()}
    for engine in engines.values():
        engine.close()

    def median(workload: str, engine: str, key: str) -> float:
        return round(statistics.median(r[key] for r in found[workload][engine]), 1)

    summary: dict[str, Any] = {}
    for workload in workloads:
        cached, full = (median(workload, e, "ttft_p50_ms") for e in ("cached", "full"))
        summary[workload] = {
            "ttft_p50_ms": {"cached": cached, "full": full},
            "ttft_cached_over_full": round(cached / full, 3),
            "tok_s": {e: median(workload, e, "tok_s") for e in engines},
        }
    result = {
        "what": "time to first token and tokens/s of chat prompts, the chat template's opening cached vs read in full",
        "model": "smollm2-135m, fp32, CPU",
        "workload": {
            "requests": args.requests,
            "max_tokens": args.max_tokens,
            "prompt_tokens": [len(p) for p in prompts],
            "opening_tokens": len(chat_opening(tokenizer, chat_token_ids)),
            "rounds": args.rounds,
        },
        "summary": summary,
        "prefix_cache": {"hits": stats["cached"].prefix_hits_total, "misses": stats["cached"].prefix_misses_total},
        "machine": {
            "cpu": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_before_after": [load_before, os.getloadavg()],
        },
    }
    args.out.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(result["summary"], indent=2))


if __name__ == "__main__":
    main()
