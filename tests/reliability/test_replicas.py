"""Two ``icm-lora serve`` processes on one real Redis agree: one rate limit per identity, deletions reach both, one
generation of a new adapter however the requests are spread, bounded adapter-spec records, and forwarded client
addresses believed only from a configured proxy."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
import redis

from tests.servers import ServiceProcess
from tests.service.conftest import REDIS_URL, metric_value

GENERATIONS = "icm_lora_adapter_generation_seconds_count"


@pytest.fixture
def replicas(small_run: Path, tmp_path: Path, redis_prefix: str) -> Iterator[Callable[..., list[ServiceProcess]]]:
    made: list[ServiceProcess] = []

    def make(*envs: dict[str, str]) -> list[ServiceProcess]:
        processes = []
        for index, env in enumerate(envs):
            values = {
                "ICM_LORA_BASE_MODEL": "tiny",
                "ICM_LORA_GENERATOR_PATH": str(small_run / "generator"),
                "ICM_LORA_DATA_DIR": str(tmp_path / f"data-{index}"),
                "ICM_LORA_NUM_SLOTS": "4",
                "ICM_LORA_REDIS_URL": REDIS_URL,
                "ICM_LORA_REDIS_PREFIX": redis_prefix,
                "ICM_LORA_TASK_STORE": "redis",
                **env,
            }
            process = ServiceProcess(values, tmp_path / f"replica-{index}.log")
            made.append(process)
            processes.append(process)
        threads = [threading.Thread(target=p.start) for p in processes]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        for process in processes:
            assert process.proc is not None and process.proc.poll() is None, process.log()[-2000:]
        return processes

    yield make
    for process in made:
        process.stop()


def _generations(client: httpx.Client) -> float:
    return metric_value(client.get("/metrics").text, GENERATIONS, stage="total")


def test_replicas_share_deletion_generation_and_specs(replicas, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
    env = {"ICM_LORA_ADAPTER_SPEC_TTL_S": "600", "ICM_LORA_SELF_CHECK": "keep"}  # keep: B serves the adapter itself
    a, b = replicas(env, env)
    store = redis.Redis.from_url(REDIS_URL)
    with httpx.Client(base_url=a.url, timeout=60) as ca, httpx.Client(base_url=b.url, timeout=60) as cb:
        # single-flight across replicas: 8 requests for one new adapter, released together, spread over both
        # (40 examples: the encoding and the self-check take long enough that every request arrives meanwhile)
        examples = [{"input": f"word number {i} " * 8, "output": "yes" if i % 2 else "no"} for i in range(40)]
        body = {"description": "Say whether each word is a colour.", "examples": examples}
        before = _generations(ca) + _generations(cb)
        answers: list[httpx.Response] = []
        barrier = threading.Barrier(8)

        def ask(client: httpx.Client) -> None:
            barrier.wait()
            answers.append(client.post("/v1/adapters", json=body))

        threads = [threading.Thread(target=ask, args=(c,)) for c in (ca, cb) * 4]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert [r.status_code for r in answers] == [200] * 8, [r.text for r in answers]
        assert len({r.json()["adapter_id"] for r in answers}) == 1
        assert _generations(ca) + _generations(cb) - before == 1, "the adapter was generated more than once"
        free_id = answers[0].json()["adapter_id"]

        # adapter-spec records are bounded: a task-less adapter's expires, a registered task's is kept
        assert 0 < store.ttl(f"{redis_prefix}:adapter-spec:{free_id}") <= 600
        task = {
            "task_id": "shared",
            "description": "Answer yes for fruit.",
            "examples": [{"input": "kiwi", "output": "yes"}],
        }
        created = ca.post("/v1/tasks", json=task)
        assert created.status_code == 201, created.text
        task_adapter = created.json()["adapter_id"]
        assert store.ttl(f"{redis_prefix}:adapter-spec:{task_adapter}") == -1  # pinned while the task exists

        # B serves the task (its memory tier and an engine slot now hold the adapter)
        completion = {"model": "shared", "prompt": "Input: pear\nOutput:", "max_tokens": 2, "temperature": 0}
        assert cb.post("/v1/completions", json=completion).status_code == 200
        assert cb.get(f"/v1/adapters/{task_adapter}").json()["cached"] is True
        resident = metric_value(cb.get("/metrics").text, "icm_lora_adapters_resident")
        assert resident >= 1

        # deleted on A: B stops serving it and drops its own copies
        assert ca.delete("/v1/tasks/shared").status_code == 200
        assert cb.post("/v1/completions", json=completion).status_code == 404
        deadline = time.monotonic() + 10
        while metric_value(cb.get("/metrics").text, "icm_lora_adapters_resident") >= resident:
            assert time.monotonic() < deadline, "B kept the deleted task's adapter in its engine slot"
            time.sleep(0.1)
        # B's memory copy is gone too: its answer is regenerated from the spec, not a cache hit
        assert cb.get(f"/v1/adapters/{task_adapter}").json()["cached"] is False
        assert 0 < store.ttl(f"{redis_prefix}:adapter-spec:{task_adapter}") <= 600  # unpinned: it expires again
    store.close()


def test_replicas_share_one_rate_limit_and_trust_only_proxies(replicas) -> None:  # type: ignore[no-untyped-def]
    limit = {"ICM_LORA_RATE_LIMIT_PER_MINUTE": "3"}
    a, b = replicas({**limit, "ICM_LORA_TRUSTED_PROXIES": "127.0.0.1"}, limit)
    with httpx.Client(base_url=a.url, timeout=30) as ca, httpx.Client(base_url=b.url, timeout=30) as cb:
        # B trusts no proxy: three requests with three forged client addresses spend 127.0.0.1's one budget
        spoofed = [cb.get("/v1/models", headers={"X-Forwarded-For": f"10.0.0.{i}"}).status_code for i in range(3)]
        assert spoofed == [200, 200, 200]
        # ... which A (another replica) honours: not 2 x 3
        assert ca.get("/v1/models").status_code == 429
        assert cb.get("/v1/models").status_code == 429
        # A trusts 127.0.0.1 as a proxy: the forwarded address is the client, with a budget of its own
        assert [ca.get("/v1/models", headers={"X-Forwarded-For": "10.0.0.7"}).status_code for _ in range(4)] == [
            200,
            200,
            200,
            429,
        ]
