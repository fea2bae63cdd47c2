"""Redis killed and restarted while clients keep sending requests.

* SQLite registry (the default): Redis is only a cache tier. Bound: **zero** failed requests during the outage, and
  every task acknowledged with 201 is there afterwards.
* Redis registry: requests that need the registry answer 503 (never 500, never a hang) while Redis is down and only
  then; with a Redis that persists (AOF), every acknowledged task is back after the restart.
"""

from __future__ import annotations

import threading
import time

import httpx
import redis

from tests.reliability.conftest import LoadRecord, PersistentRedis, RedisProcess, metric_value, run_load, serve

OUTAGE_AT_S, OUTAGE_S, AFTER_S = 2.0, 2.5, 2.5


def _register(client: httpx.Client, n: int) -> dict[str, str]:
    known = {}
    for i in range(n):
        body = {"task_id": f"base-{i}", "description": f"Decide whether the words are group {i} or not."}
        response = client.post("/v1/tasks", json=body)
        assert response.status_code == 201, response.text
        known[body["task_id"]] = response.json()["adapter_id"]
    return known


def _all_task_ids(client: httpx.Client) -> set[str]:
    ids: set[str] = set()
    cursor = None
    for _ in range(50):  # bounded paging
        params: dict[str, str | int] = {"limit": 500, **({"cursor": cursor} if cursor else {})}
        page = client.get("/v1/tasks", params=params)
        assert page.status_code == 200, page.text
        ids |= {t["task_id"] for t in page.json()["data"]}
        cursor = page.json()["next_cursor"]
        if cursor is None:
            break
    return ids


def _outage(server: RedisProcess, record: LoadRecord, stop: threading.Event) -> tuple[float, float]:
    """Kill Redis OUTAGE_AT_S into the load, restart it OUTAGE_S later, stop the load AFTER_S after that."""
    time.sleep(OUTAGE_AT_S)
    down = time.monotonic() - record.started
    server.kill()
    time.sleep(OUTAGE_S)
    server.start()
    up = time.monotonic() - record.started
    time.sleep(AFTER_S)
    stop.set()
    return down, up


def test_redis_cache_outage_under_load_loses_nothing(settings_for, private_redis: RedisProcess) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(redis_url=private_redis.url, task_store="sqlite")
    with serve(settings) as service, service.client() as client:
        known = _register(client, 6)
        record, stop = LoadRecord(), threading.Event()
        threads = run_load(service.url, known, stop, record, clients=4, max_requests=2000, prefix="during")
        down, up = _outage(private_redis, record, stop)
        for thread in threads:
            thread.join(timeout=60)
        statuses = record.statuses()
        during = record.statuses(down, up)
        print(f"FIGURE redis-cache-outage: {sum(statuses.values())} requests, {sum(during.values())} during the "
              f"{up - down:.1f} s outage, statuses {dict(statuses)}, {len(record.created)} tasks created")  # fmt: skip
        assert sum(during.values()) >= 8, "the load must keep running through the outage"
        assert set(statuses) <= {"200", "201"}, statuses  # the bound: no failed request at all

        assert set(known) | set(record.created) <= _all_task_ids(client)  # no task lost
        for task_id, adapter_id in known.items():
            assert client.get(f"/v1/tasks/{task_id}").json()["adapter_id"] == adapter_id
        deadline = time.monotonic() + 10
        while client.get("/readyz").json()["status"] != "ok" and time.monotonic() < deadline:
            time.sleep(0.2)
        assert client.get("/readyz").json()["status"] == "ok"
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "icm_lora_redis_up") == 1
        assert metric_value(metrics, "icm_lora_adapter_cache_total", tier="redis", result="error") >= 1
        client.post("/v1/adapters", json={"description": "Written after the restart."}).raise_for_status()
    raw = redis.Redis(port=private_redis.port)
    assert list(raw.scan_iter("icm-lora:adapter:*")), "the cache tier is written again after the restart"
    raw.close()


def test_redis_registry_outage_under_load_is_503_then_everything_back(  # type: ignore[no-untyped-def]
    settings_for, persistent_redis: PersistentRedis
) -> None:
    settings = settings_for(redis_url=persistent_redis.url, task_store="redis", redis_prefix="rel")
    with serve(settings) as service, service.client() as client:
        known = _register(client, 6)
        record, stop = LoadRecord(), threading.Event()
        threads = run_load(service.url, known, stop, record, clients=4, max_requests=2000, prefix="during")
        down, up = _outage(persistent_redis, record, stop)
        for thread in threads:
            thread.join(timeout=60)
        statuses = record.statuses()
        grace = 1.5  # in-flight requests at the kill, and the first ones after the restart (reconnection)
        before, during, after = record.statuses(0, down), record.statuses(down, up + grace), record.statuses(up + grace)
        print(f"FIGURE redis-registry-outage: {sum(statuses.values())} requests; before {dict(before)}, during "
              f"{dict(during)}, after {dict(after)}; {len(record.created)} tasks created")  # fmt: skip
        assert set(statuses) <= {"200", "201", "503"}, statuses  # never a 500 or a transport error
        assert set(before) <= {"200", "201"} and set(after) <= {"200", "201"}, (before, after)
        assert during["503"] >= 4, "requests needing the registry are refused while Redis is down"
        assert sum(after.values()) >= 4

        # the restarted Redis replays its append-only file: every acknowledged task is back
        assert set(known) | set(record.created) <= _all_task_ids(client)
        for task_id in [*known, *record.created[:5]]:
            body = {"model": task_id, "prompt": "Input: kiwi\nOutput:", "max_tokens": 2, "temperature": 0}
            assert client.post("/v1/completions", json=body).status_code == 200
        assert client.get("/readyz").status_code == 200
