"""Service benchmark over real HTTP (uvicorn on loopback, real Redis): adapter latency by cache tier, and completions
throughput over HTTP against the same engine driven in-process.

    python bench/service.py                                # SmolLM2-135M + the packaged generator, a few minutes
    python bench/service.py --base-model tiny --generator runs/demo/generator --out /tmp/service.json   # quick look

Adapter requests (``POST /v1/adapters``, JSON metadata), each spec distinct unless said otherwise:

* miss, description only / with 8 examples: a new spec; the service encodes, decodes and stores it;
* memory hit: a spec this process generated before;
* Redis hit: the same specs after a restart of the service (an empty memory tier, the same Redis prefix).

The service runs as its own process (``python -m icm_lora.cli serve``), as users run it: the benchmark's client
threads do not share its interpreter lock (before 2026-12-07 late: uvicorn in a thread of this process, whose 16
client threads parsing SSE took the GIL from the server's event loop and engine).

Throughput: ``--concurrency`` streamed chat completions at once (an instruction each, so the model writes until
``--max-tokens``; EOS is biased away on both sides, since task adapters stop after their answer), greedy; over HTTP
(one thread per request, one pooled httpx client, ``stream: true``) and in-process (``Engine.submit`` on an engine in
this process, loaded with the same settings and holding the same adapters (the ids are checked equal), with the same
token ids and sampling, each handle iterated in its own thread), ``--pairs`` rounds, each running both workloads
(their order and the sides' alternating from round to round), the median of the per-round ratios (this machine's speed
drifts; pairing cancels most of it; before 2026-12-07 late all the base model's pairs ran first, and the 16 adapters /
base ratio compared the two phases' medians). Two workloads: the base model, and
``--tasks`` distinct registered tasks (16: one adapter per request, what a user of task adapters gets). Each reports
tok/s, time to first token and inter-token latency (p50, p95, p99 over every request / gap of the workload). The
cache tier each phase hit is checked against the service's own ``icm_lora_adapter_cache_total`` counters
(``--skip-cache-phases`` leaves those phases out).

The JSON carries the targets of issue 14 and the load of the machine (``os.getloadavg`` before and after, and
``--load-note`` for what else ran), so that a figure from a busy machine is never mistaken for an idle one's.
"""

from __future__ import annotations

import argparse
import functools
import itertools
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import redis
from prometheus_client.parser import text_string_to_metric_families

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import load_record, pooled_client, run_threads
from service.config import Settings
from service.engine import PreparedAdapter, RequestHandle
from service.engine.sampling import SamplingParams
from service.inference import chat_prompt_ids
from service.schemas import ChatMessage
from service.state import ServiceState
from tests.servers import BackgroundServer, ServiceProcess

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


def percentiles(values_s: list[float]) -> dict[str, float]:
    ordered = sorted(values_s)
    if not ordered:
        return {}

    def at(q: float) -> float:
        return round(ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] * 1000, 2)

    return {"n": len(ordered), "p50_ms": at(0.5), "p95_ms": at(0.95), "p99_ms": at(0.99)}


class Run:
    """One workload run: tokens, wall time, each request's time to first token and each inter-token gap."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.tokens = 0
        self.ttft: list[float] = []
        self.gaps: list[float] = []
        self.seconds = 0.0

    def add(self, tokens: int, ttft: float, gaps: list[float]) -> None:
        with self.lock:
            self.tokens += tokens
            self.ttft.append(ttft)
            self.gaps.extend(gaps)

    def report(self) -> dict[str, Any]:
        return {
            "tok_s": round(self.tokens / self.seconds, 2),
            "tokens": self.tokens,
            "seconds": round(self.seconds, 3),
            "ttft": percentiles(self.ttft),
            "inter_token": percentiles(self.gaps),
        }


def no_eos(state: ServiceState) -> dict[int, float]:
    """A logit bias that keeps every request writing until ``max_tokens``: task adapters are trained to stop after
    their answer, which would turn a throughput run into a time-to-first-token run. Both sides get it."""
    return {token: -100.0 for token in sorted(state.engine.eos_token_ids)}


def http_run(
    client: httpx.Client, prompts: list[str], models: list[str], max_tokens: int, bias: dict[int, float]
) -> Run:
    """Streamed chat completions, all at once, through one pooled client; a token's time is when its SSE chunk
    arrives."""
    run = Run()

    def one(prompt: str, model: str) -> None:
        messages = [{"role": "user", "content": prompt}]
        body = {
            "model": model,
            "messages": messages,
            "max_tokens": max_tokens,
            "temperature": 0,
            "stream": True,
            "stream_options": {"include_usage": True},
            "logit_bias": {str(token): value for token, value in bias.items()},
        }
        start = time.perf_counter()
        times: list[float] = []
        tokens = 0
        with client.stream("POST", "/v1/chat/completions", json=body) as response:
            response.raise_for_status()
            for line in response.iter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if chunk.get("usage"):
                    tokens = int(chunk["usage"]["completion_tokens"])
                if any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                    times.append(time.perf_counter())
        gaps = [b - a for a, b in itertools.pairwise(times)]
        run.add(tokens, (times[0] - start) if times else float("nan"), gaps)

    start = time.perf_counter()
    run_threads(functools.partial(one, p, m) for p, m in zip(prompts, models, strict=True))
    run.seconds = time.perf_counter() - start
    return run


def engine_run(state: ServiceState, prompts: list[str], adapters: list[PreparedAdapter | None], max_tokens: int) -> Run:
    """The same requests through ``Engine.submit``, each handle iterated in its own thread."""
    ids = [chat_prompt_ids(state, [ChatMessage(role="user", content=p)]) for p in prompts]
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, logit_bias=tuple(no_eos(state).items()))
    run = Run()

    def one(handle: RequestHandle, start: float) -> None:
        times = []
        for delta in handle:
            if delta.text:
                times.append(time.perf_counter())
        result = handle.result()
        gaps = [b - a for a, b in itertools.pairwise(times)]
        run.add(len(result.token_ids), (times[0] - start) if times else float("nan"), gaps)

    start = time.perf_counter()
    handles = [state.engine.submit(i, a, params) for i, a in zip(ids, adapters, strict=True)]
    run_threads(functools.partial(one, h, start) for h in handles)
    run.seconds = time.perf_counter() - start
    return run


def register_tasks(client: Any, n: int, run_id: str) -> dict[str, str]:
    """``n`` distinct tasks (their adapters generated and checked at registration): task id -> adapter id."""
    ids: dict[str, str] = {}
    for i in range(n):
        task_id = f"bench-{run_id}-{i}"
        task = {
            "task_id": task_id,
            "description": f"Answer in the style of hotel review writer number {i} ({run_id}).",
            "examples": EXAMPLES[: 2 + i % 6],
        }
        response = client.post("/v1/tasks", json=task)
        response.raise_for_status()
        ids[task_id] = str(response.json()["adapter_id"])
    return ids


def prepared(state: ServiceState, adapter_id: str) -> PreparedAdapter:
    """The in-process engine's prepared copy, made when it first served the task."""
    found = state.engine.prepared(adapter_id)
    if found is None:
        raise RuntimeError(f"adapter {adapter_id} was not prepared by the in-process service")
    return found


def service_env(settings: Settings) -> dict[str, str]:
    """The settings given explicitly, as the ``ICM_LORA_*`` variables a service process reads."""
    values = settings.model_dump(exclude_unset=True)
    return {f"ICM_LORA_{key.upper()}": str(value) for key, value in values.items() if value is not None}


def service_process(settings: Settings, log_path: Path) -> ServiceProcess:
    """A service process with ``settings``; ready when returned."""
    unset = ["ICM_LORA_GENERATOR_PATH"] if settings.generator_path is None else []
    process = ServiceProcess(service_env(settings), log_path, unset=unset)
    process.start(timeout_s=600)
    return process


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
    parser.add_argument("--tasks", type=int, default=16, help="distinct task adapters of the adapter workload")
    parser.add_argument("--skip-cache-phases", action="store_true", help="throughput and latency only")
    parser.add_argument("--load-note", default="", help="what else ran on the machine (written to the JSON)")
    parser.add_argument("--out", type=Path, default=RESULTS / "service.json")
    args = parser.parse_args()
    load_before = os.getloadavg()

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
        num_slots=max(8, args.tasks),
        self_check="keep",  # every task serves its own adapter, whatever its self-check says
        device=args.device,
        dtype=args.dtype,
    )
    run_id = uuid.uuid4().hex[:6]
    desc_specs = [{"description": f"Classify the mood of hotel review {run_id}-{i}."} for i in range(args.misses)]
    example_specs = [
        {"description": f"Label hotel reviews {run_id}-{i}.", "examples": EXAMPLES} for i in range(args.misses // 2)
    ]
    results: dict[str, Any] = {}
    logs = Path(tempfile.mkdtemp(prefix="icm-lora-bench-logs-"))
    processes: list[ServiceProcess] = []
    local: BackgroundServer | None = None
    try:
        if not args.skip_cache_phases:
            service = service_process(settings, logs / "service-1.log")
            processes.append(service)
            with httpx.Client(base_url=service.url, timeout=60) as client:
                time_adapter_requests(client, [{"description": f"warm-up {run_id}", "examples": EXAMPLES[:2]}])
                results["miss_description_only"] = measured_phase(client, desc_specs)
                results["miss_with_8_examples"] = measured_phase(client, example_specs)
                results["memory_hit"] = measured_phase(client, desc_specs + example_specs)
            service.stop()

        service = service_process(settings, logs / "service-2.log")  # empty memory tier, same Redis prefix
        processes.append(service)
        with httpx.Client(base_url=service.url, timeout=60) as client:
            if not args.skip_cache_phases:
                results["redis_hit"] = measured_phase(client, desc_specs + example_specs)
            base_model = client.get("/v1/models").json()["data"][0]["id"]
            tasks = register_tasks(client, args.tasks, run_id)
        # the in-process side: the same settings in this process, its own registry (the adapters come from Redis)
        local = BackgroundServer(settings.model_copy(update={"data_dir": Path(tempfile.mkdtemp(prefix="icm-lora-"))}))
        local.start()
        state: ServiceState = local.app.state.icm
        with local.client() as client:
            local_tasks = register_tasks(client, args.tasks, run_id)
        if local_tasks != tasks:
            raise RuntimeError(f"the two services made different adapters: {tasks} vs {local_tasks}")
        prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.concurrency)]
        task_ids = list(tasks)
        task_models = [task_ids[i % len(task_ids)] for i in range(args.concurrency)]
        bias = no_eos(state)
        pooled = pooled_client(max(args.concurrency, len(task_ids)) + 4, base_url=service.url, timeout=60)
        http_run(pooled, prompts[:2], [base_model] * 2, 4, bias)  # warm-up
        for url in (service.url, local.url):  # every task adapter prepared and copied into a slot, on both sides
            with pooled_client(len(task_ids) + 4, base_url=url, timeout=60) as warm:
                http_run(warm, task_ids, task_ids, 2, bias)
        engine_run(state, prompts[:2], [None, None], 4)  # warm-up
        workloads: dict[str, tuple[list[str], list[PreparedAdapter | None]]] = {
            "base": ([base_model] * len(prompts), [None] * len(prompts)),
            "adapters": (task_models, [prepared(state, tasks[t]) for t in task_models]),
        }
        pairs: dict[str, list[dict[str, Any]]] = {name: [] for name in workloads}
        for k in range(args.pairs):  # both workloads in every round, so the machine's drift hits them alike
            names = list(workloads) if k % 2 == 0 else list(reversed(workloads))
            for name in names:
                models, adapters = workloads[name]
                order = ("http", "engine") if k % 2 == 0 else ("engine", "http")
                pair: dict[str, Any] = {}
                for side in order:
                    if side == "http":
                        pair["http"] = http_run(pooled, prompts, models, args.max_tokens, bias).report()
                    else:
                        pair["engine"] = engine_run(state, prompts, adapters, args.max_tokens).report()
                pair["ratio"] = round(pair["http"]["tok_s"] / pair["engine"]["tok_s"], 3)
                print(
                    f"{name} pair {k + 1}: http {pair['http']['tok_s']:.1f} tok/s (ttft p50 "
                    f"{pair['http']['ttft'].get('p50_ms')} ms, itl p50 {pair['http']['inter_token'].get('p50_ms')} ms)"
                    f", engine {pair['engine']['tok_s']:.1f} tok/s"
                )
                pairs[name].append(pair)
        for name, (models, _) in workloads.items():
            http_rates = [p["http"]["tok_s"] for p in pairs[name]]
            median = statistics.median(http_rates)
            results[f"completions_{name}"] = {
                "concurrency": args.concurrency,
                "max_tokens": args.max_tokens,
                "distinct_adapters": 0 if name == "base" else len(set(models)),
                "pairs": pairs[name],
                "http_tok_s_median": round(median, 1),
                "engine_tok_s_median": round(statistics.median(p["engine"]["tok_s"] for p in pairs[name]), 1),
                "http_over_engine_median": round(statistics.median(p["ratio"] for p in pairs[name]), 3),
                "http_spread_vs_median": round(max(abs(r - median) for r in http_rates) / median, 3),
                "http_ttft_p50_ms_median": round(
                    statistics.median(p["http"]["ttft"]["p50_ms"] for p in pairs[name]), 1
                ),
                "http_inter_token_p50_ms_median": round(
                    statistics.median(p["http"]["inter_token"].get("p50_ms", float("nan")) for p in pairs[name]), 1
                ),
            }
        base, adapted = results["completions_base"], results["completions_adapters"]
        by_round = [
            round(a["http"]["tok_s"] / b["http"]["tok_s"], 3)
            for a, b in zip(pairs["adapters"], pairs["base"], strict=True)
        ]
        results["adapters_over_base_http_by_round"] = by_round
        results["adapters_over_base_http"] = round(statistics.median(by_round), 3)  # paired: median of the rounds'
        results["targets"] = {
            "http_over_engine_with_adapters": {"target": ">= 0.9", "measured": adapted["http_over_engine_median"]},
            "adapters_over_base": {"target": ">= 0.95", "measured": results["adapters_over_base_http"]},
            "http_spread_vs_median": {
                "target": "<= 0.10 over 5 identical runs (--pairs 5)",
                "measured": max(base["http_spread_vs_median"], adapted["http_spread_vs_median"]),
            },
        }
        results["generator_id"] = state.adapters.generator.generator_id if state.adapters.generator else None
        pooled.close()
    finally:
        for process in processes:
            process.stop()
        if local is not None:
            local.stop()
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
    results["machine"] = {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()}
    results["load"] = load_record(load_before, args.load_note)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    for name in ("miss_description_only", "miss_with_8_examples", "memory_hit", "redis_hit"):
        if name in results:
            row = results[name]
            print(f"{name:24s} p50 {row['p50_ms']:8.2f} ms  p95 {row['p95_ms']:8.2f} ms  cache {row['cache_lookups']}")
    for name in ("base", "adapters"):
        c = results[f"completions_{name}"]
        print(
            f"{name} x{c['concurrency']}: http {c['http_tok_s_median']} tok/s, engine {c['engine_tok_s_median']} "
            f"tok/s, http/engine {c['http_over_engine_median']}, ttft p50 {c['http_ttft_p50_ms_median']} ms"
        )
    print(f"16 adapters / base over HTTP: {results['adapters_over_base_http']}")
    print(f"written to {args.out}")


if __name__ == "__main__":
    main()
