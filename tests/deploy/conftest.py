"""The observability stack for real: a private redis-server, the service in-process (tiny model, small generator),
and Prometheus (Debian's `prometheus` package) scraping it every second with the repository's prometheus.yml and
alerts.yml, after a short load that touches every metric."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from service.config import Settings
from tests.servers import BackgroundServer, free_port
from tests.service.conftest import RedisProcess

ROOT = Path(__file__).resolve().parents[2]
PROMETHEUS_DIR = ROOT / "docker" / "prometheus"
SCRAPE_INTERVAL_S = 1.0
PROMETHEUS_INSTALL = "apt-get install -y --no-install-recommends prometheus"


def find_tool(name: str) -> str | None:
    """A command on PATH or next to this interpreter (tools pip-installed into the venv)."""
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.is_file() else None


def prometheus_binaries() -> tuple[str, str]:
    prometheus, promtool = find_tool("prometheus"), find_tool("promtool")
    if prometheus is None or promtool is None:
        pytest.skip(f"prometheus/promtool not found: {PROMETHEUS_INSTALL}")
    return prometheus, promtool


class Prometheus:
    """A Prometheus on a free loopback port, configured from docker/prometheus/prometheus.yml with the service's
    job pointed at ``target`` and 1 s scrape and rule intervals."""

    def __init__(self, binary: str, promtool: str, folder: Path, target: str) -> None:
        self.binary, self.promtool, self.folder = binary, promtool, folder
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.config_path = folder / "prometheus.yml"
        self.config_path.write_text(yaml.safe_dump(self.config_for(target, self.port)))
        self.proc: subprocess.Popen[bytes] | None = None

    @staticmethod
    def config_for(target: str, port: int) -> dict[str, Any]:
        config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
        config["global"]["scrape_interval"] = f"{SCRAPE_INTERVAL_S:g}s"
        config["global"]["evaluation_interval"] = f"{SCRAPE_INTERVAL_S:g}s"
        config["rule_files"] = [str(PROMETHEUS_DIR / f) for f in config["rule_files"]]
        for job in config["scrape_configs"]:
            address = target if job["job_name"] == "icm-lora" else f"127.0.0.1:{port}"
            for key in [k for k in job if k.endswith("_sd_configs") or k == "static_configs"]:
                del job[key]
            job["static_configs"] = [{"targets": [address]}]
        return config

    def start(self) -> Prometheus:
        log = (self.folder / "prometheus.log").open("wb")
        self.proc = subprocess.Popen(
            [
                self.binary,
                f"--config.file={self.config_path}",
                f"--storage.tsdb.path={self.folder / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
                "--storage.tsdb.retention.time=1h",
                "--log.level=warn",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                    if response.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"prometheus did not start: {(self.folder / 'prometheus.log').read_text()}")
            time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
            self.proc = None

    def api(self, path: str, **params: object) -> dict[str, Any]:
        """GET /api/v1/<path>; the JSON body, also for 400/422 answers (invalid expressions)."""
        url = f"{self.url}/api/v1/{path}?{urllib.parse.urlencode(params)}"
        try:
            with urllib.request.urlopen(url, timeout=30) as response:
                return dict(json.loads(response.read()))
        except urllib.error.HTTPError as exc:
            return dict(json.loads(exc.read()))

    def query(self, expr: str) -> dict[str, Any]:
        return self.api("query", query=expr)

    def last_scrape(self) -> float:
        result = self.query('timestamp(up{job="icm-lora"})')
        return float(result["data"]["result"][0]["value"][1]) if result.get("data", {}).get("result") else 0.0


TASKS = [
    ("fruit-or-animal", "Decide whether the listed words are fruits or animals.", ("kiwi pear lime", "wolf goat")),
    ("hot-or-cold", "Label each list hot when it names colors, cold otherwise.", ("red blue", "hammer saw")),
    ("up-or-down", "Answer up for countries and down for body parts.", ("peru chad", "knee elbow")),
    ("tool-or-fruit", "Say yes for tools, no for fruits.", ("drill wrench", "plum fig")),
    ("animal-or-color", "Is it an animal list? yes or no.", ("otter lynx", "green teal")),
    ("country-or-tool", "Countries get left, tools get right.", ("laos oman", "awl vise")),
]


def _task(index: int, round_no: int) -> dict[str, Any]:
    task_id, description, (first, second) = TASKS[index % len(TASKS)]
    suffix = f"-r{round_no}" if index >= len(TASKS) else ""
    return {
        "task_id": f"{task_id}{suffix}",
        "description": description + suffix,
        "examples": [{"input": first, "output": "yes"}, {"input": second, "output": "no"}],
    }


def drive_load(client: httpx.Client, round_no: int) -> dict[str, int]:
    """One round of traffic that moves every metric: new tasks (generation), cache hits in memory and Redis,
    completions on 3 adapters with 2 slots (swaps), concurrent ones (batches), streamed ones (TTFT), and 4xx."""
    statuses: dict[str, int] = {}

    def note(response: httpx.Response) -> None:
        statuses[str(response.status_code)] = statuses.get(str(response.status_code), 0) + 1

    tasks = [_task(2 * round_no, round_no), _task(2 * round_no + 1, round_no)]
    for task in tasks:
        note(client.post("/v1/tasks", json=task))  # 201: generated
    note(client.post("/v1/tasks", json=tasks[0]))  # 200: idempotent
    first = _task(0, 0)
    spec = {"description": first["description"], "examples": first["examples"]}
    note(client.post("/v1/adapters", json=spec))  # memory holds 1 adapter: a Redis hit
    note(client.post("/v1/adapters", json={**spec, "seed": 100 + round_no}))  # generated
    adapter_id = client.post("/v1/adapters", json={**spec, "seed": 100 + round_no}).json()["adapter_id"]
    note(client.get(f"/v1/adapters/{adapter_id}"))  # memory hit
    note(client.get("/v1/tasks", params={"limit": 5}))
    note(client.get("/v1/models"))

    models = [tasks[0]["task_id"], tasks[1]["task_id"], first["task_id"], "tiny"]

    def complete(model: str) -> httpx.Response:
        body = {"model": model, "prompt": "Input: mango plum kiwi\nOutput:", "max_tokens": 6, "temperature": 0}
        return client.post("/v1/completions", json=body)

    with ThreadPoolExecutor(max_workers=4) as pool:  # rounds alternate between lighter and heavier traffic
        for response in pool.map(complete, models * (1 + round_no % 3)):
            note(response)
    stream_body = {"model": models[0], "prompt": "Input: wolf goat\nOutput:", "max_tokens": 6, "stream": True}
    with client.stream("POST", "/v1/completions", json=stream_body) as response:
        list(response.iter_lines())
        note(response)
    chat = {"model": models[1], "messages": [{"role": "user", "content": "kiwi pear"}], "max_tokens": 6}
    with client.stream("POST", "/v1/chat/completions", json={**chat, "stream": True}) as response:
        list(response.iter_lines())
        note(response)
    note(client.post("/v1/chat/completions", json=chat))

    note(client.get("/v1/tasks/no-such-task"))  # 404
    note(client.post("/v1/completions", json={"model": "no-such-task", "prompt": "x", "max_tokens": 2}))  # 404
    note(client.get("/v1/adapters/" + "0" * 64))  # 404
    note(client.get("/no-such-route"))  # 404, route "unmatched"
    note(client.post("/v1/tasks", json={"examples": "not a list"}))  # 422
    return statuses


@dataclass
class Stack:
    service: BackgroundServer
    prometheus: Prometheus
    load_start: float
    load_end: float
    statuses: dict[str, int]


@pytest.fixture(scope="module")
def stack(small_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    """Redis + service + Prometheus, after ``ICM_LORA_DEPLOY_LOAD_ROUNDS`` (default 2) rounds of load and 2+ scrapes
    since. Two rounds at least: a counter's first scrape has no rate, the second round gives every series one."""
    prometheus_bin, promtool = prometheus_binaries()
    if shutil.which("redis-server") is None:
        pytest.fail("redis-server is not installed (apt-get install redis-server)")
    rounds = max(2, int(os.environ.get("ICM_LORA_DEPLOY_LOAD_ROUNDS", "2")))
    pause_s = float(os.environ.get("ICM_LORA_DEPLOY_LOAD_PAUSE_S", "2.5"))
    folder = tmp_path_factory.mktemp("deploy-stack")
    redis = RedisProcess()
    redis.start()
    settings = Settings(
        base_model="tiny",
        generator_path=small_run / "generator",
        data_dir=folder / "data",
        redis_url=redis.url,
        redis_prefix="deploy-test",
        memory_cache_size=1,  # so that re-used adapters come from the Redis tier
        num_slots=2,  # 3 adapters in use: swaps
    )
    service = BackgroundServer(settings).start()
    prometheus = Prometheus(prometheus_bin, promtool, folder, f"127.0.0.1:{service.port}")
    try:
        prometheus.start()
        deadline = time.monotonic() + 30
        while prometheus.last_scrape() == 0.0:  # Prometheus syncs its targets ~5 s after start
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not scrape the service")
            time.sleep(0.25)
        statuses: dict[str, int] = {}
        load_start = time.time()
        with service.client() as client:
            for round_no in range(rounds):
                if round_no:
                    time.sleep(pause_s)
                for code, count in drive_load(client, round_no).items():
                    statuses[code] = statuses.get(code, 0) + count
        load_end = time.time()
        deadline = time.monotonic() + 30
        while prometheus.last_scrape() < load_end + 2 * SCRAPE_INTERVAL_S + 0.5:
            if time.monotonic() > deadline:
                raise RuntimeError("prometheus did not scrape the service after the load")
            time.sleep(0.25)
        time.sleep(SCRAPE_INTERVAL_S)  # one more rule evaluation over the last scrape
        yield Stack(service, prometheus, load_start, load_end, statuses)
    finally:
        prometheus.stop()
        service.stop()
        redis.kill()
