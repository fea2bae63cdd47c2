"""Real HTTP: the service under uvicorn on a free loopback port, a private redis-server for outage tests."""

from __future__ import annotations

import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from service.config import Settings
from tests.servers import BackgroundServer, free_port, serve  # noqa: F401 (re-exported to the tests)

REDIS_URL = "redis://127.0.0.1:6379/0"


RunningService = BackgroundServer  # the name the tests use


@pytest.fixture
def settings_for(small_run: Path, tmp_path: Path):  # type: ignore[no-untyped-def]
    """Settings for the tiny model and the session's small generator; each test gets its own data dir."""

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "base_model": "tiny",
            "generator_path": small_run / "generator",
            "data_dir": tmp_path / "data",
            "num_slots": 4,
            "engine_threads": 0,  # torch's threads as the test process has them (the subprocess tests use -1)
        }
        values.update(overrides)
        return Settings(**values)  # type: ignore[arg-type]

    return make


@pytest.fixture
def redis_prefix() -> Iterator[str]:
    """A unique key prefix on the shared Redis, deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:10]}"
    yield prefix
    client = redis.Redis.from_url(REDIS_URL)
    keys = list(client.scan_iter(f"{prefix}:*"))
    if keys:
        client.delete(*keys)
    client.close()


class RedisProcess:
    """A private redis-server on a free port that a test may kill and restart."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def arguments(self) -> list[str]:
        return ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.arguments(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 10
        while True:
            try:
                client.ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        client.close()

    def kill(self) -> None:
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None


@pytest.fixture
def private_redis() -> Iterator[RedisProcess]:
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    server = RedisProcess()
    server.start()
    yield server
    server.kill()


def metric_value(text: str, name: str, **labels: str) -> float:
    """The value of one sample in Prometheus text (labels in any order), 0 when absent."""
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        sample, _, value = line.rpartition(" ")
        sample_name, _, raw_labels = sample.partition("{")
        found = dict(pair.split("=", 1) for pair in raw_labels.rstrip("}").split(",") if pair)
        if sample_name == name and {k: v.strip('"') for k, v in found.items()} == labels:
            return float(value)
    return 0.0
