"""Reliability and security tests: faults (Redis, the process, cache bytes, clients, overload) and hostile input.

The service fixtures of tests/service are reused (``settings_for``, ``redis_prefix``, ``private_redis``); this file
adds a persistent Redis (AOF, fsync always) that survives a kill, the service as a real subprocess, and a small
bounded load driver. Traffic goes to 127.0.0.1 only and every loop is bounded in count and time.
"""

from __future__ import annotations

import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import pytest

from tests.servers import ServiceProcess
from tests.service.conftest import (  # noqa: F401 (fixtures re-exported to this folder)
    REDIS_URL,
    RedisProcess,
    free_port,
    metric_value,
    private_redis,
    redis_prefix,
    serve,
    settings_for,
)

ROOT = Path(__file__).resolve().parents[2]


class PersistentRedis(RedisProcess):
    """A private redis-server that keeps its data on disk (AOF, fsync on every write): a kill loses nothing it
    acknowledged, so a restart brings the registry back."""

    def __init__(self, folder: Path) -> None:
        super().__init__()
        self.folder = folder

    def arguments(self) -> list[str]:
        return [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "yes", "--appendfsync", "always", "--dir", str(self.folder),
        ]  # fmt: skip

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        super().start()


@pytest.fixture
def persistent_redis(tmp_path: Path) -> Iterator[PersistentRedis]:
    server = PersistentRedis(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


@pytest.fixture
def service_process(small_run: Path, tmp_path: Path) -> Iterator[Callable[..., ServiceProcess]]:
    made: list[ServiceProcess] = []

    def make(**env: str) -> ServiceProcess:
        values = {
            "ICM_LORA_BASE_MODEL": "tiny",
            "ICM_LORA_GENERATOR_PATH": str(small_run / "generator"),
            "ICM_LORA_DATA_DIR": str(tmp_path / "data"),
            "ICM_LORA_NUM_SLOTS": "4",
            **env,
        }
        process = ServiceProcess(values, tmp_path / "service.log")
        made.append(process)
        return process

    yield make
    for process in made:
        process.kill()


@dataclass
class LoadRecord:
    """What a bounded background load saw: (seconds since start, kind, status) per request."""

    started: float = field(default_factory=time.monotonic)
    events: list[tuple[float, str, str]] = field(default_factory=list)
    created: list[str] = field(default_factory=list)  # task ids acknowledged with 201
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, kind: str, status: str) -> None:
        with self.lock:
            self.events.append((time.monotonic() - self.started, kind, status))

    def statuses(self, since: float = 0.0, until: float = float("inf")) -> Counter[str]:
        return Counter(s for t, _, s in self.events if since <= t < until)


def run_load(
    url: str,
    known_tasks: dict[str, str],
    stop: threading.Event,
    record: LoadRecord,
    clients: int = 4,
    max_requests: int = 400,
    prefix: str = "load",
    pause_s: float = 0.01,
) -> list[threading.Thread]:
    """Start ``clients`` threads that mix task creation, task reads, adapter downloads and completions until
    ``stop`` is set or ``max_requests`` were sent in all. ``known_tasks``: task id -> adapter id. Returns the
    threads (join them)."""
    sent = Counter[int]()
    ids = sorted(known_tasks)

    def worker(index: int) -> None:
        n = 0
        with httpx.Client(base_url=url, timeout=30) as client:
            while not stop.is_set() and sum(sent.values()) < max_requests:
                n += 1
                sent[index] += 1
                task_id = ids[(n + index) % len(ids)]
                kind = ("create", "read", "complete", "weights")[n % 4]
                try:
                    if kind == "create":
                        new_id = f"{prefix}-{index}-{n}"
                        r = client.post("/v1/tasks", json={"task_id": new_id, "description": f"Load task {new_id}."})
                        if r.status_code == 201:
                            with record.lock:
                                record.created.append(new_id)
                    elif kind == "read":
                        r = client.get(f"/v1/tasks/{task_id}")
                    elif kind == "complete":
                        body = {"model": task_id, "prompt": "Input: kiwi\nOutput:", "max_tokens": 4, "temperature": 0}
                        r = client.post("/v1/completions", json=body)
                    else:
                        adapter_id = known_tasks[task_id]
                        r = client.get(f"/v1/adapters/{adapter_id}/weights", params={"format": "safetensors"})
                    status = str(r.status_code)
                except httpx.HTTPError as exc:
                    status = type(exc).__name__
                record.add(kind, status)
                stop.wait(pause_s)  # fast refusals (503) must not use up max_requests before the outage ends

    threads = [threading.Thread(target=worker, args=(i,), daemon=True) for i in range(clients)]
    for thread in threads:
        thread.start()
    return threads
