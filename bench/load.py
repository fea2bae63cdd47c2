"""Load benchmark: many concurrent clients against one service process, and nothing served wrong.

    python bench/load.py                                   # tiny model, a small generator built here (~1 min)
    python bench/load.py --generator runs/demo/generator --duration 60 --clients 24 --tasks 24
    python bench/load.py --base-model smollm2-135m --duration 60 --clients 16 --tasks 16   # the real model and its
                                                                                       # packaged generator

The service runs as a real subprocess (``python -m icm_lora.cli serve``, configured by ``ICM_LORA_*`` variables) on
a free loopback port, so clients and server do not share a Python interpreter. Steps:

1. without ``--generator``: for the tiny model, build a small generator (6 synthetic tasks, as ``tests/conftest.py``);
   for a real base model (``--base-model smollm2-135m``), use its packaged generator;
2. start the service (``--slots`` LoRA slots, fewer than ``--tasks``, so the load forces hot swaps);
3. register ``--tasks`` synthetic tasks and, one request at a time, compute the **reference** for every
   (task, prompt) pair: a greedy (temperature 0) completion and chat completion, plus each adapter's zip and
   safetensors bytes;
4. ``--clients`` asyncio clients (httpx) send a weighted mix for ``--duration`` seconds (or ``--max-requests``):
   task creation (new tasks, each a new adapter to generate, and idempotent re-registrations), adapter downloads
   (zip and safetensors), completions and chat completions, plain and streamed (SSE). Every completion under load
   must equal its reference, every download must equal the reference bytes.

Reported in ``bench/results/load.json``: requests/s, p50/p95/p99 latency per kind, status counts per kind, the number
of responses checked against the references and the mismatches. The exit status is non-zero on any mismatch, any
5xx or transport error. Traffic goes to 127.0.0.1 only; the run is bounded by ``--duration`` and ``--max-requests``.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import os
import platform
import random
import shutil
import sys
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from generator.defaults import packaged_generator  # noqa: E402 (after the path set-up)
from generator.training.pipeline import run_small  # noqa: E402 (after the path set-up)
from tests.servers import ServiceProcess  # noqa: E402

RESULTS = ROOT / "bench" / "results"
KINDS = {  # kind -> weight in the mix
    "completion": 25,
    "completion_stream": 20,
    "chat": 10,
    "chat_stream": 10,
    "adapter_zip": 10,
    "adapter_safetensors": 10,
    "task_create_existing": 10,
    "task_create_new": 5,
}


# --- workload ------------------------------------------------------------------------------------------------------


def make_tasks(n: int, prompts_per_task: int) -> tuple[list[dict[str, Any]], dict[str, list[str]]]:
    """``n`` synthetic tasks (spec + id) and, per task, prompts made from its held-out test inputs."""
    from generator.tasks import format_prompt, synthetic_suite

    tasks, prompts = [], {}
    for task in synthetic_suite(n, seed=7):
        task_id = f"load-{task.name}"
        examples = [{"input": e.input, "output": e.output} for e in task.train[:6]]
        tasks.append({"task_id": task_id, "description": task.description, "examples": examples})
        prompts[task_id] = [format_prompt(e.input) for e in task.test[:prompts_per_task]]
    return tasks, prompts


def percentile(ordered: list[float], q: float) -> float:
    """Nearest-rank percentile of sorted values."""
    if not ordered:
        return 0.0
    rank = max(1, int(-(-q * len(ordered) // 100)))  # ceil(q/100 * n)
    return ordered[min(rank, len(ordered)) - 1]


async def read_sse(response: httpx.Response, chat: bool) -> tuple[str, str | None, bool]:
    """Concatenated text, the last finish_reason, and whether the stream ended with [DONE]."""
    text, finish, done = [], None, False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        data = line[6:]
        if data == "[DONE]":
            done = True
            break
        choice = json.loads(data)["choices"][0]
        text.append((choice["delta"].get("content") or "") if chat else choice["text"])
        finish = choice["finish_reason"] or finish
    return "".join(text), finish, done


class Load:
    def __init__(self, args: argparse.Namespace, tasks: list[dict[str, Any]], prompts: dict[str, list[str]]) -> None:
        self.args = args
        self.tasks = tasks
        self.prompts = prompts
        self.reference: dict[tuple[str, str, str], tuple[str, str | None]] = {}  # (kind, task, prompt) -> text
        self.downloads: dict[tuple[str, str], str] = {}  # (adapter_id, format) -> sha256 of the bytes
        self.adapter_of: dict[str, str] = {}
        self.latencies: dict[str, list[float]] = defaultdict(list)
        self.statuses: dict[str, Counter[str]] = defaultdict(Counter)
        self.checked = Counter[str]()
        self.mismatches: list[dict[str, Any]] = []
        self.new_tasks = 0
        self.sent = 0

    def body(self, kind: str, task_id: str, prompt: str, stream: bool) -> tuple[str, dict[str, Any]]:
        common = {"model": task_id, "max_tokens": self.args.max_tokens, "temperature": 0, "stream": stream}
        if kind == "completion":
            return "/v1/completions", {**common, "prompt": prompt}
        return "/v1/chat/completions", {**common, "messages": [{"role": "user", "content": prompt}]}

    async def complete(
        self, client: httpx.AsyncClient, kind: str, task_id: str, prompt: str, stream: bool
    ) -> tuple[int, tuple[str, str | None] | None]:
        path, body = self.body(kind, task_id, prompt, stream)
        if not stream:
            response = await client.post(path, json=body)
            if response.status_code != 200:
                return response.status_code, None
            choice = response.json()["choices"][0]
            text = choice["message"]["content"] if kind == "chat" else choice["text"]
            return 200, (text, choice["finish_reason"])
        async with client.stream("POST", path, json=body) as response:
            if response.status_code != 200:
                await response.aread()
                return response.status_code, None
            text, finish, done = await read_sse(response, chat=kind == "chat")
            return 200, ((text, finish) if done else ("<stream ended without [DONE]>", None))

    async def prepare(self, client: httpx.AsyncClient) -> dict[str, Any]:
        start = time.perf_counter()
        for task in self.tasks:
            response = await client.post("/v1/tasks", json=task)
            response.raise_for_status()
            self.adapter_of[task["task_id"]] = response.json()["adapter_id"]
        registered = time.perf_counter() - start
        start = time.perf_counter()
        for task_id, prompts in self.prompts.items():
            for prompt in prompts:
                for kind in ("completion", "chat"):
                    status, result = await self.complete(client, kind, task_id, prompt, stream=False)
                    if status != 200 or result is None:
                        raise RuntimeError(f"reference request failed with {status}")
                    self.reference[(kind, task_id, prompt)] = result
            adapter_id = self.adapter_of[task_id]
            for fmt in ("zip", "safetensors"):
                response = await client.get(f"/v1/adapters/{adapter_id}/weights", params={"format": fmt})
                response.raise_for_status()
                self.downloads[(adapter_id, fmt)] = hashlib.sha256(response.content).hexdigest()
        return {
            "tasks_registered": len(self.tasks),
            "register_s": round(registered, 2),
            "reference_pairs": len(self.reference),
            "reference_s": round(time.perf_counter() - start, 2),
            "distinct_reference_texts": len({v[0] for v in self.reference.values()}),
        }

    def mismatch(self, kind: str, detail: dict[str, Any]) -> None:
        if len(self.mismatches) < 20:
            self.mismatches.append({"kind": kind, **detail})
        else:
            self.mismatches.append({"kind": kind})

    async def one(self, client: httpx.AsyncClient, kind: str, rng: random.Random) -> str:
        """Send one request of ``kind``; return its status (or an error name) after checking its content."""
        task = rng.choice(self.tasks)
        task_id = task["task_id"]
        if kind.startswith(("completion", "chat")):
            base_kind = "chat" if kind.startswith("chat") else "completion"
            prompt = rng.choice(self.prompts[task_id])
            status, result = await self.complete(client, base_kind, task_id, prompt, kind.endswith("_stream"))
            if result is not None:
                self.checked["completions"] += 1
                expected = self.reference[(base_kind, task_id, prompt)]
                if result != expected:
                    self.mismatch(kind, {"task": task_id, "prompt": prompt, "got": result, "expected": expected})
            return str(status)
        if kind.startswith("adapter_"):
            fmt = kind.removeprefix("adapter_")
            adapter_id = self.adapter_of[task_id]
            response = await client.get(f"/v1/adapters/{adapter_id}/weights", params={"format": fmt})
            if response.status_code == 200:
                self.checked["downloads"] += 1
                if hashlib.sha256(response.content).hexdigest() != self.downloads[(adapter_id, fmt)]:
                    self.mismatch(kind, {"adapter_id": adapter_id})
            return str(response.status_code)
        if kind == "task_create_existing":
            response = await client.post("/v1/tasks", json=task)
            if response.status_code == 200:
                self.checked["idempotent_registrations"] += 1
                if response.json()["adapter_id"] != self.adapter_of[task_id]:
                    self.mismatch(kind, {"task": task_id})
            return str(response.status_code)
        self.new_tasks += 1
        body = {
            **task,
            "task_id": f"{task_id}-new-{self.new_tasks}",
            "description": f"{task['description']} #{rng.random()}",
        }
        response = await client.post("/v1/tasks", json=body)
        return str(response.status_code)

    async def client_loop(self, client: httpx.AsyncClient, index: int, deadline: float) -> None:
        rng = random.Random(f"{self.args.seed}:{index}")
        kinds, weights = zip(*KINDS.items(), strict=True)
        while time.monotonic() < deadline and self.sent < self.args.max_requests:
            self.sent += 1
            kind = rng.choices(kinds, weights)[0]
            start = time.perf_counter()
            try:
                status = await self.one(client, kind, rng)
            except httpx.HTTPError as exc:
                status = type(exc).__name__
            self.latencies[kind].append(time.perf_counter() - start)
            self.statuses[kind][status] += 1

    async def run(self, url: str) -> dict[str, Any]:
        limits = httpx.Limits(max_connections=self.args.clients + 4, max_keepalive_connections=self.args.clients + 4)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
            setup = await self.prepare(client)
            deadline = time.monotonic() + self.args.duration
            start = time.perf_counter()
            await asyncio.gather(*(self.client_loop(client, i, deadline) for i in range(self.args.clients)))
            elapsed = time.perf_counter() - start
            metrics = (await client.get("/metrics")).text
        return {"setup": setup, "elapsed_s": elapsed, "metrics": metrics}


def service_figures(metrics: str) -> dict[str, float]:
    wanted = (
        "icm_lora_adapter_swaps_total",
        "icm_lora_tokens_generated_total",
        "icm_lora_batch_size_sum",
        "icm_lora_batch_size_count",
        "icm_lora_adapter_generation_seconds_count",
    )
    figures: dict[str, float] = {}
    for line in metrics.splitlines():
        name, _, value = line.rpartition(" ")
        if name in wanted or (name.startswith("icm_lora_adapter_generation_seconds_count") and 'stage="total"' in name):
            figures[name.split("{")[0]] = float(value)
    if figures.get("icm_lora_batch_size_count"):
        figures["mean_decode_batch"] = round(
            figures["icm_lora_batch_size_sum"] / figures["icm_lora_batch_size_count"], 2
        )
    return figures


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--base-model", default="tiny")
    parser.add_argument("--generator", type=Path, default=None, help="generator folder; default: build a small one")
    parser.add_argument("--duration", type=float, default=60.0, help="seconds of load")
    parser.add_argument("--max-requests", type=int, default=100_000)
    parser.add_argument("--clients", type=int, default=24)
    parser.add_argument("--tasks", type=int, default=24)
    parser.add_argument("--prompts-per-task", type=int, default=2)
    parser.add_argument("--max-tokens", type=int, default=8)
    parser.add_argument("--slots", type=int, default=8, help="LoRA slots; fewer than --tasks forces hot swaps")
    parser.add_argument("--redis-url", default=None, help="also use a Redis adapter tier (a unique key prefix)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--load-note", default="", help="what else ran on the machine (written to the JSON)")
    parser.add_argument("--out", type=Path, default=RESULTS / "load.json")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="icm-lora-load-"))
    figures: dict[str, Any] = {"setup": {}}
    service: ServiceProcess | None = None
    prefix = f"icm-lora-load-{os.getpid()}"
    try:
        generator = args.generator
        if generator is None and args.base_model != "tiny":
            generator = packaged_generator(args.base_model)
            if generator is None:
                raise SystemExit(f"no packaged generator for {args.base_model!r}; pass --generator")
        if generator is None:
            start = time.perf_counter()
            generator = run_small(work / "run").generator_dir
            figures["setup"]["generator_build_s"] = round(time.perf_counter() - start, 1)
        env = {
            "ICM_LORA_BASE_MODEL": args.base_model,
            "ICM_LORA_GENERATOR_PATH": str(generator),
            "ICM_LORA_DATA_DIR": str(work / "data"),
            "ICM_LORA_NUM_SLOTS": str(args.slots),
            "ICM_LORA_MAX_QUEUE": str(max(64, 4 * args.clients)),
            "ICM_LORA_MAX_BATCH_SIZE": "16",
        }
        if args.redis_url:
            env |= {
                "ICM_LORA_REDIS_URL": args.redis_url,
                "ICM_LORA_REDIS_PREFIX": prefix,
                "ICM_LORA_TASK_STORE": "sqlite",
            }
        service = ServiceProcess(env, work / "service.log")
        figures["setup"]["service_start_s"] = round(service.start(), 1)

        tasks, prompts = make_tasks(args.tasks, args.prompts_per_task)
        load = Load(args, tasks, prompts)
        outcome = asyncio.run(load.run(service.url))
        figures["setup"] |= outcome["setup"]
    finally:
        if service is not None:
            service.stop()
        if args.redis_url:
            import redis

            client = redis.Redis.from_url(args.redis_url)
            keys = list(client.scan_iter(f"{prefix}:*"))
            if keys:
                client.delete(*keys)
            client.close()
        shutil.rmtree(work, ignore_errors=True)

    elapsed = outcome["elapsed_s"]
    by_kind: dict[str, Any] = {}
    all_statuses: Counter[str] = Counter()
    for kind in KINDS:
        ordered = sorted(load.latencies[kind])
        statuses = load.statuses[kind]
        all_statuses.update(statuses)
        by_kind[kind] = {
            "requests": len(ordered),
            "requests_per_s": round(len(ordered) / elapsed, 2),
            "p50_ms": round(percentile(ordered, 50) * 1000, 1),
            "p95_ms": round(percentile(ordered, 95) * 1000, 1),
            "p99_ms": round(percentile(ordered, 99) * 1000, 1),
            "statuses": dict(sorted(statuses.items())),
        }
    total = sum(all_statuses.values())
    failures = {s: n for s, n in all_statuses.items() if not (s.isdigit() and int(s) < 500)}
    passed = not load.mismatches and not failures
    figures |= {
        "benchmark": "load",
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "note": (
            f"base model {args.base_model!r}"
            + (
                "; with the tiny model (2 layers, hidden 64) the figures measure the service's HTTP, scheduling, "
                "caching and swapping overhead, not a real model's compute"
                if args.base_model == "tiny"
                else ""
            )
        ),
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "machine_load": {"loadavg_after": [round(x, 2) for x in os.getloadavg()], "note": args.load_note},
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "mix": KINDS,
        "load": {
            "duration_s": round(elapsed, 1),
            "requests": total,
            "requests_per_s": round(total / elapsed, 1),
            "statuses": dict(sorted(all_statuses.items())),
            "by_kind": by_kind,
            "new_tasks_created": load.new_tasks,
        },
        "checks": {
            "completions_checked_against_reference": load.checked["completions"],
            "downloads_checked_against_reference": load.checked["downloads"],
            "idempotent_registrations_checked": load.checked["idempotent_registrations"],
            "mismatches": len(load.mismatches),
            "mismatch_examples": load.mismatches[:20],
            "failed_requests_5xx_or_transport": failures,
        },
        "service_metrics": service_figures(outcome["metrics"]),
        "passed": passed,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps({k: figures[k] for k in ("load", "checks", "passed")}, indent=2))
    print(f"wrote {args.out}")
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
