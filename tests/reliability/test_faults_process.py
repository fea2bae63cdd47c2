"""The service process killed with SIGKILL (no shutdown, no flush) while tasks are being registered, then restarted
on the same data dir: every acknowledged task is there and every adapter is regenerated bit-identically."""

from __future__ import annotations

import hashlib
import sqlite3
import threading
import time
from collections.abc import Callable

import httpx

from tests.servers import ServiceProcess

KEY = "rel-secret-key-0123456789"
WRONG_KEY = "wrong-key-abcdefghijkl"
AUTH = {"Authorization": f"Bearer {KEY}"}
PROMPT = "Input: kiwi pear lime\nOutput:"


def _fingerprint(client: httpx.Client, task_id: str) -> tuple[str, str, str]:
    """(adapter id, sha256 of the safetensors bytes served, greedy completion)"""
    adapter_id = client.get(f"/v1/tasks/{task_id}").json()["adapter_id"]
    weights = client.get(f"/v1/adapters/{adapter_id}/weights", params={"format": "safetensors"})
    assert weights.status_code == 200, weights.text
    body = {"model": task_id, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
    completion = client.post("/v1/completions", json=body)
    assert completion.status_code == 200, completion.text
    return adapter_id, hashlib.sha256(weights.content).hexdigest(), completion.json()["choices"][0]["text"]


def test_sigkill_and_restart_keeps_tasks_and_adapters(service_process: Callable[..., ServiceProcess], tmp_path) -> None:  # type: ignore[no-untyped-def]
    service = service_process(ICM_LORA_API_KEYS=KEY)
    first_start = service.start()
    with httpx.Client(base_url=service.url, headers=AUTH, timeout=60) as client:
        for i in range(6):
            body = {
                "task_id": f"kept-{i}",
                "description": f"Answer yes for group {i} words.",
                "examples": [{"input": f"word{i} other", "output": "yes"}, {"input": "nothing", "output": "no"}],
            }
            assert client.post("/v1/tasks", json=body).status_code == 201
        before = {f"kept-{i}": _fingerprint(client, f"kept-{i}") for i in range(6)}
        assert client.get("/v1/tasks", headers={"Authorization": f"Bearer {WRONG_KEY}"}).status_code == 403

    # registrations in flight when the process is killed
    acknowledged: list[str] = []
    stop = threading.Event()

    def register(worker: int) -> None:
        with httpx.Client(base_url=service.url, headers=AUTH, timeout=30) as client:
            for n in range(200):  # bounded; the kill ends it much sooner
                if stop.is_set():
                    return
                task_id = f"inflight-{worker}-{n}"
                try:
                    response = client.post("/v1/tasks", json={"task_id": task_id, "description": f"Task {task_id}."})
                except httpx.HTTPError:
                    return
                if response.status_code == 201:
                    acknowledged.append(task_id)

    threads = [threading.Thread(target=register, args=(w,), daemon=True) for w in range(3)]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + 20
    while len(acknowledged) < 6 and time.monotonic() < deadline:
        time.sleep(0.05)
    service.kill()  # SIGKILL
    killed_with = len(acknowledged)
    stop.set()
    for thread in threads:
        thread.join(timeout=30)
    assert killed_with >= 6, "registrations were running when the process was killed"

    with sqlite3.connect(tmp_path / "data" / "tasks.sqlite3") as db:  # the WAL-mode file survived the kill intact
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)

    second_start = service.start()
    with httpx.Client(base_url=service.url, headers=AUTH, timeout=60) as client:
        listed = {t["task_id"] for t in client.get("/v1/tasks", params={"limit": 500}).json()["data"]}
        assert set(before) | set(acknowledged) <= listed, "an acknowledged task was lost"
        after = {task_id: _fingerprint(client, task_id) for task_id in before}
        assert after == before  # same adapter ids, bit-identical weights, same greedy completions
        for task_id in listed - set(before):  # in-flight ones that made it (acknowledged or not) are complete
            assert client.get(f"/v1/tasks/{task_id}").status_code == 200
        assert client.get("/readyz").status_code == 200
    service.kill()
    log = service.log()
    print(f"FIGURE sigkill: starts {first_start:.1f} s / {second_start:.1f} s, {len(acknowledged)} registrations "
          f"acknowledged before the kill (all found after), {len(listed - set(before) - set(acknowledged))} "
          f"unacknowledged in-flight ones stored anyway, "
          f"{len(before)} adapters bit-identical")  # fmt: skip
    assert "GET /v1/tasks" in log, "the access log was captured"
    assert KEY not in log and WRONG_KEY not in log, "API keys are never logged"
