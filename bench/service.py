"""Service benchmark over real HTTP (uvicorn on loopback, real Redis): adapter latency by cache tier, and completions
throughput over HTTP against the same engine driven in-process.

    python bench/service.py                                # SmolLM2-135M + the packaged generator, a few minutes
    python bench/service.py --base-model tiny --generator runs/demo/generator --out /tmp/service.json   # quick look

Adapter requests (``POST /v1/adapters``, JSON metadata), each spec distinct unless said otherwise:

* miss, description only / with 8 examples: a new spec; the service encodes, decodes and stores it;
* memory hit: a spec this process generated before;
* Redis hit: the same specs after a restart of the service (an empty memory tier, the same Redis prefix).

Throughput: ``--concurrency`` chat completions at once (an instruction each, so the model writes until
``--max-tokens``), greedy; over HTTP (one thread per request, httpx) and in-process (``Engine.submit`` with the same
token ids and sampling), ``--pairs`` times alternating, the
median of the per-pair ratios (this machine's speed drifts; pairing cancels most of it). The cache tier each phase
hit is checked against the service's own ``icm_lora_adapter_cache_total`` counters.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import tempfile
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import redis
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from service.background import BackgroundServer
from service.config import Settings
from service.engine.sampling import SamplingParams
from service.inference import chat_prompt_ids
from service.schemas import ChatMessage
from service.state import ServiceState

RESULTS = Path(__file__).resolve().parent / "results"
EXAMPLES = [
    {"input": f"The room was {word}.", "output": label}
    for word, label in [
        ("spotless", "positive"),
        ("filthy", "negative"),
        ("lovely", "positive"),
        ("noisy", "negative"),
        ("quiet and warm", "positive"),
        ("cold", "negative"),
        ("bright", "positive"),
        ("tiny and smelly", "negative"),
    ]
]
PROMPTS = [
    "Write a short story about a lighthouse keeper.",
    "Explain how a bicycle works.",
    "Describe a busy market in the morning.",
    "List some tips for learning to cook.",
    "Tell me about the history of paper.",
    "Describe the sea during a storm.",
    "Explain why the sky is blue.",
    "Write a letter to a friend about a trip.",
]


def summary(durations_s: list[float]) -> dict[str, float]:
    ordered = sorted(durations_s)
    return {
        "n": len(ordered),
        "p50_ms": round(statistics.median(ordered) * 1000, 2),
        "p95_ms": round(ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] * 1000, 2),
    }


def cache_counts(client: Any) -> dict[str, float]:
    """``tier/result`` -> count, from /metrics."""
    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(client.get("/metrics").text):
        for sample in family.samples:
            if sample.name == "icm_lora_adapter_cache_total":
                counts[f"{sample.labels['tier']}/{sample.labels['result']}"] = sample.value
    return counts


def delta(before: dict[str, float], after: dict[str, float]) -> dict[str, float]:
    return {k: after[k] - before.get(k, 0.0) for k in after if after[k] - before.get(k, 0.0)}


def time_adapter_requests(client: Any, specs: list[dict[str, Any]]) -> tuple[list[float], list[str]]:
    durations, ids = [], []
    for spec in specs:
        start = time.perf_counter()
        response = client.post("/v1/adapters", json=spec)
        durations.append(time.perf_counter() - start)
        response.raise_for_status()
        ids.append(response.json()["adapter_id"])
    return durations, ids


def measured_phase(client: Any, specs: list[dict[str, Any]]) -> dict[str, Any]:
    before = cache_counts(client)
    durations, _ = time_adapter_requests(client, specs)
    return {**summary(durations), "cache_lookups": delta(before, cache_counts(client))}


def http_throughput(service: BackgroundServer, prompts: list[str], model: str, max_tokens: int) -> tuple[float, int]:
    def one(prompt: str) -> int:
        with service.client() as client:
            messages = [{"role": "user", "content": prompt}]
            body = {"model": model, "messages": messages, "max_tokens": max_tokens, "temperature": 0}
            response = client.post("/v1/chat/completions", json=body)
            response.raise_for_status()
            return int(response.json()["usage"]["completion_tokens"])

    with ThreadPoolExecutor(len(prompts)) as pool:
        start = time.perf_counter()
        tokens = sum(pool.map(one, prompts))
        return tokens / (time.perf_counter() - start), tokens


def engine_throughput(state: ServiceState, prompts: list[str], max_tokens: int) -> tuple[float, int]:
    assert state.engine is not None
    ids = [chat_prompt_ids(state, [ChatMessage(role="user", content=p)]) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    start = time.perf_counter()
    handles = [state.engine.submit(i, None, params) for i in ids]
    tokens = sum(len(h.result().token_ids) for h in handles)
    return tokens / (time.perf_counter() - start), tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="smollm2-135m")
    parser.add_argument("--generator", type=Path, default=None, help="default: the packaged one for the base model")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--misses", type=int, default=30, help="description-only misses (half as many with examples)")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--pairs", type=int, default=3)
    parser.add_argument("--device", default="auto", help="ICM_LORA_DEVICE: auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", help="ICM_LORA_DTYPE: auto | float32 | bfloat16 | float16")
    parser.add_argument("--out", type=Path, default=RESULTS / "service.json")
    args = parser.parse_args()

    prefix = f"icm-lora-bench-{uuid.uuid4().hex[:8]}"
    data_dir = Path(tempfile.mkdtemp(prefix="icm-lora-bench-"))
    settings = Settings(
        base_model=args.base_model,
        generator_path=args.generator,
        redis_url=args.redis_url,
        redis_prefix=prefix,
        data_dir=data_dir,
        task_store="sqlite",
        max_batch_size=max(16, args.concurrency),
        device=args.device,
        dtype=args.dtype,
    )
    run_id = uuid.uuid4().hex[:6]
    desc_specs = [{"description": f"Classify the mood of hotel review {run_id}-{i}."} for i in range(args.misses)]
    example_specs = [
        {"description": f"Label hotel reviews {run_id}-{i}.", "examples": EXAMPLES} for i in range(args.misses // 2)
    ]
    results: dict[str, Any] = {}
    try:
        service = BackgroundServer(settings).start()
        with service.client() as client:
            time_adapter_requests(client, [{"description": f"warm-up {run_id}", "examples": EXAMPLES[:2]}])
            results["miss_description_only"] = measured_phase(client, desc_specs)
            results["miss_with_8_examples"] = measured_phase(client, example_specs)
            results["memory_hit"] = measured_phase(client, desc_specs + example_specs)
        service.stop()

        service = BackgroundServer(settings).start()  # empty memory tier, same Redis prefix
        state: ServiceState = service.app.state.icm
        with service.client() as client:
            results["redis_hit"] = measured_phase(client, desc_specs + example_specs)
            model = client.get("/v1/models").json()["data"][0]["id"]
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
        http_throughput(service, prompts[:2], model, 4)  # warm-up
        pairs = []
        for k in range(args.pairs):
            order = ("http", "engine") if k % 2 == 0 else ("engine", "http")
            pair: dict[str, Any] = {}
            for side in order:
                if side == "http":
                    pair["http_tok_s"], pair["http_tokens"] = http_throughput(service, prompts, model, args.max_tokens)
                else:
                    pair["engine_tok_s"], pair["engine_tokens"] = engine_throughput(state, prompts, args.max_tokens)
            pair["ratio"] = pair["http_tok_s"] / pair["engine_tok_s"]
            print(f"pair {k + 1}: http {pair['http_tok_s']:.1f} tok/s, engine {pair['engine_tok_s']:.1f} tok/s")
            pairs.append(pair)
        results["completions"] = {
            "concurrency": args.concurrency,
            "max_tokens": args.max_tokens,
            "pairs": pairs,
            "http_tok_s_median": round(statistics.median(p["http_tok_s"] for p in pairs), 1),
            "engine_tok_s_median": round(statistics.median(p["engine_tok_s"] for p in pairs), 1),
            "http_over_engine_median": round(statistics.median(p["ratio"] for p in pairs), 3),
            "target": 0.9,
        }
        results["generator_id"] = state.adapters.generator.generator_id if state.adapters.generator else None
        service.stop()
    finally:
        client_redis = redis.Redis.from_url(args.redis_url)
        keys = list(client_redis.scan_iter(f"{prefix}:*"))
        if keys:
            client_redis.delete(*keys)
        client_redis.close()
    results["settings"] = {
        "base_model": args.base_model,
        "generator": str(settings.resolved_generator_path()),
        "placement": str(settings.placement()),
    }
    results["machine"] = {"platform": platform.platform(), "python": platform.python_version()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for name in ("miss_description_only", "miss_with_8_examples", "memory_hit", "redis_hit"):
        row = results[name]
        print(f"{name:24s} p50 {row['p50_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms  cache {row['cache_lookups']}")
    c = results["completions"]
    print(
        f"completions x{c['concurrency']}: http {c['http_tok_s_median']} tok/s, engine {c['engine_tok_s_median']} "
        f"tok/s, ratio {c['http_over_engine_median']} (target >= 0.9)"
    )
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
