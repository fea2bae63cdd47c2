from __future__ import annotations

import time

import redis

from generator.adapter import GeneratedAdapter
from tests.service.conftest import REDIS_URL, RedisProcess, metric_value, serve


def _task(i: int) -> dict[str, object]:
    return {"task_id": f"task-{i:02d}", "description": f"Task number {i}: label the words."}


def test_task_registry_api(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        created = client.post("/v1/tasks", json={**_task(1), "examples": [{"input": "a", "output": "b"}]})
        assert created.status_code == 201, created.text
        body = created.json()
        assert body["task_id"] == "task-01" and body["adapter"]["adapter_id"] == body["adapter_id"]
        assert (
            client.post("/v1/tasks", json={**_task(1), "examples": [{"input": "a", "output": "b"}]}).status_code == 200
        )
        conflict = client.post("/v1/tasks", json=_task(1))
        assert conflict.status_code == 409 and conflict.json()["error"]["type"] == "conflict"
        anonymous = client.post("/v1/tasks", json={"description": "No id given."})
        assert anonymous.status_code == 201 and anonymous.json()["task_id"].startswith("task-")
        assert (
            client.post("/v1/tasks", json={"description": "No id given."}).json()["task_id"]
            == anonymous.json()["task_id"]
        )

        for i in range(2, 7):
            assert client.post("/v1/tasks", json=_task(i)).status_code == 201
        seen, cursor, pages = [], None, 0
        while True:
            page = client.get("/v1/tasks", params={"limit": 3, **({"cursor": cursor} if cursor else {})}).json()
            seen += [t["task_id"] for t in page["data"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert seen == sorted(seen) and len(seen) == len(set(seen)) == 7 and pages == 3

        fetched = client.get("/v1/tasks/task-01").json()
        assert fetched["examples"] == [{"input": "a", "output": "b", "choices": None}]
        assert client.delete("/v1/tasks/task-01").status_code == 200
        assert client.get("/v1/tasks/task-01").status_code == 404
        assert client.delete("/v1/tasks/task-01").status_code == 404
        assert client.get("/v1/tasks/bad id!").status_code == 422
        assert client.post("/v1/tasks", json={"task_id": "../etc", "description": "x"}).status_code == 422
        assert client.get("/v1/tasks", params={"limit": 0}).status_code == 422


def test_restart_keeps_tasks_and_regenerates_identically(settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for()
    with serve(settings) as service, service.client() as client:
        created = client.post("/v1/tasks", json=_task(1)).json()
        adhoc = client.post("/v1/adapters", json={"description": "An ad-hoc adapter."}).json()
    with serve(settings) as service, service.client() as client:  # same data dir, empty caches
        assert client.get("/v1/tasks/task-01").json()["adapter_id"] == created["adapter_id"]
        again = client.get(f"/v1/adapters/{created['adapter_id']}").json()
        assert again["sha256"] == created["adapter"]["sha256"] and again["cached"] is False
        assert client.get(f"/v1/adapters/{adhoc['adapter_id']}").json()["sha256"] == adhoc["sha256"]


def test_redis_tiers_hit_miss_and_corruption(settings_for, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(redis_url=REDIS_URL, redis_prefix=redis_prefix, task_store="sqlite")
    raw = redis.Redis.from_url(REDIS_URL)
    spec = {"description": "Fruits or countries?"}
    with serve(settings) as service, service.client() as client:
        meta = client.post("/v1/adapters", json=spec).json()
        key = f"{redis_prefix}:adapter:{meta['adapter_id']}"
        stored = raw.get(key)
        assert stored is not None and 0 < raw.ttl(key) <= settings.adapter_ttl_s
        assert GeneratedAdapter.from_safetensors_bytes(stored).sha256 == meta["tensors_sha256"]
    with serve(settings) as service, service.client() as client:  # new process: memory empty, Redis warm
        hit = client.post("/v1/adapters", json=spec).json()
        assert hit["cached"] is True and hit["sha256"] == meta["sha256"]
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "icm_lora_adapter_cache_total", tier="redis", result="hit") == 1
        assert metric_value(metrics, "icm_lora_adapter_generation_seconds_count", stage="total") == 0
    tampered = bytearray(stored)
    tampered[-5] ^= 0x55
    raw.set(key, bytes(tampered))
    with serve(settings) as service, service.client() as client:
        regenerated = client.post("/v1/adapters", json=spec).json()
        assert regenerated["cached"] is False and regenerated["sha256"] == meta["sha256"]
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "icm_lora_adapter_cache_total", tier="redis", result="corrupt") == 1
    assert GeneratedAdapter.from_safetensors_bytes(raw.get(key)).sha256 == meta["tensors_sha256"]  # repaired
    raw.close()


def test_redis_outage_and_return(settings_for, private_redis: RedisProcess) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(redis_url=private_redis.url, task_store="sqlite")
    with serve(settings) as service, service.client() as client:
        assert client.post("/v1/adapters", json={"description": "Before the outage."}).status_code == 200
        assert client.get("/readyz").json()["status"] == "ok"
        private_redis.kill()
        during = client.post("/v1/adapters", json={"description": "During the outage."})
        assert during.status_code == 200 and during.json()["cached"] is False
        assert client.post("/v1/adapters", json={"description": "Before the outage."}).json()["cached"] is True
        ready = client.get("/readyz")
        assert ready.status_code == 200 and ready.json()["status"] == "degraded"
        assert metric_value(client.get("/metrics").text, "icm_lora_redis_up") == 0
        assert client.post("/v1/tasks", json=_task(1)).status_code == 201  # the registry is SQLite: unaffected

        private_redis.start()
        time.sleep(1.2)  # the tier retries after its back-off
        assert client.get("/readyz").json()["status"] == "ok"
        after = client.post("/v1/adapters", json={"description": "After the outage."}).json()
        assert metric_value(client.get("/metrics").text, "icm_lora_redis_up") == 1
    raw = redis.Redis(port=private_redis.port)
    assert raw.get(f"icm-lora:adapter:{after['adapter_id']}") is not None
    raw.close()


def test_redis_task_store(settings_for, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(redis_url=REDIS_URL, redis_prefix=redis_prefix)
    assert settings.use_redis_tasks
    with serve(settings) as service, service.client() as client:
        for i in range(1, 5):
            assert client.post("/v1/tasks", json=_task(i)).status_code == 201
        assert client.post("/v1/tasks", json=_task(1)).status_code == 200
        assert client.post("/v1/tasks", json={**_task(1), "description": "changed"}).status_code == 409
        page = client.get("/v1/tasks", params={"limit": 3}).json()
        assert [t["task_id"] for t in page["data"]] == ["task-01", "task-02", "task-03"]
        assert page["next_cursor"] == "task-03"
        rest = client.get("/v1/tasks", params={"limit": 3, "cursor": "task-03"}).json()
        assert [t["task_id"] for t in rest["data"]] == ["task-04"] and rest["next_cursor"] is None
        assert client.delete("/v1/tasks/task-02").status_code == 200
    raw = redis.Redis.from_url(REDIS_URL)
    assert raw.ttl(f"{redis_prefix}:task:task-01") == -1  # no TTL: the registry is durable
    raw.close()
    with serve(settings) as service, service.client() as client:  # restart: tasks still there
        ids = [t["task_id"] for t in client.get("/v1/tasks").json()["data"]]
        assert ids == ["task-01", "task-03", "task-04"]


def test_redis_registry_outage_is_503_not_500(settings_for, private_redis: RedisProcess) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(redis_url=private_redis.url, task_store="redis")
    with serve(settings) as service, service.client() as client:
        assert client.post("/v1/tasks", json=_task(1)).status_code == 201
        private_redis.kill()
        for response in (
            client.get("/v1/tasks/task-01"),
            client.get("/v1/tasks"),
            client.post("/v1/tasks", json=_task(2)),
            client.post("/v1/adapters", json={"description": "Registry down."}),
            client.get("/v1/models"),
            client.post("/v1/completions", json={"model": "task-01", "prompt": "x"}),
        ):
            assert response.status_code == 503, response.text
            assert response.json()["error"]["type"] == "unavailable" and response.headers["retry-after"] == "1"
        ready = client.get("/readyz")
        assert ready.status_code == 503 and ready.json()["checks"]["redis"] == "down"
        private_redis.start()  # empty again: Redis here keeps nothing on disk
        time.sleep(1.2)
        assert client.get("/readyz").status_code == 200
