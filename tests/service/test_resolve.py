"""POST /v1/resolve over real HTTP: task ids and adapter ids to the adapters they are served with, in request order,
from the stores alone (nothing generated, however many names), with the API's guard and bounded input."""

from __future__ import annotations

from typing import Any

from tests.service.conftest import metric_value, serve

EXAMPLES = [{"input": "cat dog", "output": "animals"}, {"input": "red blue", "output": "colours"}]


def _generations(client) -> float:  # type: ignore[no-untyped-def]
    return metric_value(client.get("/metrics").text, "icm_lora_adapter_generation_seconds_count", stage="total")


def _resolve(client, names: list[Any]) -> list[dict[str, Any]]:  # type: ignore[no-untyped-def]
    answer = client.post("/v1/resolve", json={"names": names})
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]  # type: ignore[no-any-return]


def test_resolves_tasks_and_adapter_ids_without_generating(settings_for) -> None:  # type: ignore[no-untyped-def]
    # one adapter in memory: the first adapter made is evicted by the second, so it is known by its stored spec
    with serve(settings_for(memory_cache_size=1)) as service, service.client() as client:
        task = client.post("/v1/tasks", json={"task_id": "words", "description": "Animals or colours.",
                                              "examples": EXAMPLES}).json()  # fmt: skip
        adhoc = client.post("/v1/adapters", json={"description": "An ad-hoc adapter.", "seed": 3}).json()
        generated = _generations(client)
        assert generated == 2  # the counter counts: both were generated

        names = ["nope", adhoc["adapter_id"], "words", task["adapter_id"], "words", "x" * 128, "ünïcode"]
        data = _resolve(client, names)
        assert [d["name"] for d in data] == names  # one answer per name, in order, repeats included
        assert data[0] == {"name": "nope", "task_id": None, "adapter_id": None}
        assert data[1] == {"name": adhoc["adapter_id"], "task_id": None, "adapter_id": adhoc["adapter_id"]}
        assert data[2] == data[4] == {"name": "words", "task_id": "words", "adapter_id": task["adapter_id"]}
        assert data[3] == {"name": task["adapter_id"], "task_id": None, "adapter_id": task["adapter_id"]}
        assert all(d["adapter_id"] is None for d in data[5:])
        assert _generations(client) == generated  # the evicted adapter was not made again to answer

        # a deleted task and a deleted adapter resolve to nothing
        assert client.delete("/v1/tasks/words").status_code == 200
        assert client.delete(f"/v1/adapters/{adhoc['adapter_id']}").status_code == 200
        data = _resolve(client, ["words", adhoc["adapter_id"], task["adapter_id"]])
        assert data[0]["adapter_id"] is None and data[1]["adapter_id"] is None
        assert data[2]["adapter_id"] == task["adapter_id"]  # its spec stays: GET /v1/adapters/{id} still serves it
        assert client.get(f"/v1/adapters/{task['adapter_id']}").status_code == 200


def test_resolve_on_redis_stores(settings_for, redis_prefix: str) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(
        redis_url="redis://127.0.0.1:6379/0", redis_prefix=redis_prefix, task_store="redis", memory_cache_size=1
    )
    with serve(settings) as service, service.client() as client:
        first = client.post("/v1/adapters", json={"description": "First."}).json()["adapter_id"]
        second = client.post("/v1/adapters", json={"description": "Second."}).json()["adapter_id"]
        client.post("/v1/tasks", json={"task_id": "t", "description": "Third.", "examples": EXAMPLES})
        generated = _generations(client)
        data = _resolve(client, [first, "t", second, "missing"])
        assert [d["adapter_id"] is not None for d in data] == [True, True, True, False]
        assert data[1]["task_id"] == "t" and _generations(client) == generated


def test_bad_resolve_requests_are_422_and_the_guard_applies(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(api_keys="sk-resolve")) as service, service.client() as client:
        assert client.post("/v1/resolve", json={"names": ["a"]}).status_code == 401
        auth = {"Authorization": "Bearer sk-resolve"}
        for body in (
            {"names": []},
            {"names": ["a"] * 257},
            {"names": ["x" * 129]},
            {"names": [""]},
            {"names": [7]},
            {"names": "a"},
            {"names": ["a"], "extra": 1},
            {},
        ):
            answer = client.post("/v1/resolve", json=body, headers=auth)
            assert answer.status_code == 422, (body, answer.text)
            assert answer.json()["error"]["message"]
        assert client.post("/v1/resolve", json={"names": ["a"] * 256}, headers=auth).status_code == 200
