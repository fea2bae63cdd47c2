"""Client behaviour against a mock transport: pagination, request shapes, configuration, context managers."""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from icm_lora_client import AsyncClient, Client, Example

from tests.clients.mock import BASE, COMPLETION, Recorder, task_json

PAGES = {
    None: {"data": [task_json("a"), task_json("b")], "next_cursor": "b"},
    "b": {"data": [task_json("c"), task_json("d")], "next_cursor": "d"},
    "d": {"data": [task_json("e")], "next_cursor": None},
}


def _paged(request: httpx.Request) -> httpx.Response:
    return httpx.Response(200, json=PAGES[request.url.params.get("cursor")])


def test_list_tasks_walks_every_page() -> None:
    recorder = Recorder(_paged)
    with recorder.client() as client:
        tasks = list(client.list_tasks(page_size=2))
    assert [t.task_id for t in tasks] == ["a", "b", "c", "d", "e"]
    assert [r.url.params.get("cursor") for r in recorder.requests] == [None, "b", "d"]
    assert {r.url.params["limit"] for r in recorder.requests} == {"2"}


def test_list_tasks_is_lazy() -> None:
    recorder = Recorder(_paged)
    with recorder.client() as client:
        first = next(iter(client.list_tasks(page_size=2)))
    assert first.task_id == "a" and len(recorder.requests) == 1


def test_async_list_tasks_walks_every_page() -> None:
    async def main() -> list[str]:
        async with Recorder(_paged).async_client() as client:
            return [t.task_id async for t in client.list_tasks(page_size=2)]

    assert asyncio.run(main()) == ["a", "b", "c", "d", "e"]


def _resolved(request: httpx.Request) -> httpx.Response:
    data = [
        {"name": n, "task_id": n if n.startswith("t") else None, "adapter_id": None if n == "gone" else f"a-{n}"}
        for n in json.loads(request.content)["names"]
    ]
    return httpx.Response(200, json={"data": data})


def test_resolve_sends_256_names_per_request_in_order() -> None:
    names = [f"t{i}" for i in range(300)] + ["gone"]
    recorder = Recorder(_resolved)
    with recorder.client() as client:
        found = client.resolve(names)
        assert client.resolve([]) == []  # nothing to ask: no request
    assert [json.loads(r.content)["names"] for r in recorder.requests] == [names[:256], names[256:]]
    assert all(r.method == "POST" and r.url.path == "/v1/resolve" for r in recorder.requests)
    assert [r.name for r in found] == names and found[7].adapter_id == "a-t7" and found[-1].adapter_id is None

    async def main() -> list[str | None]:
        async with Recorder(_resolved).async_client() as client:
            return [r.task_id for r in await client.resolve(["t1", "x2"])]

    assert asyncio.run(main()) == ["t1", None]


def test_resolve_is_retried_like_a_read() -> None:
    recorder = Recorder(httpx.Response(503, json={"error": {"message": "busy"}}), _resolved)
    with recorder.client() as client:
        assert client.resolve(["t1"])[0].adapter_id == "a-t1"
    assert len(recorder.requests) == 2 and len(recorder.sleeps) == 1


def test_request_shapes() -> None:
    recorder = Recorder(
        lambda r: httpx.Response(201 if r.url.path == "/v1/tasks" else 200, json=task_json("t1")),
    )
    with recorder.client(api_key="sk-1") as client:
        client.create_task("desc", [Example(input="a", output="b"), {"input": "c", "output": "d"}], seed=3)
        client.get_task("odd id/x")
    create, get = recorder.requests
    assert create.method == "POST" and create.url.path == "/v1/tasks"
    assert json.loads(create.content) == {
        "description": "desc",
        "examples": [{"input": "a", "output": "b"}, {"input": "c", "output": "d"}],
        "seed": 3,
    }
    assert create.headers["authorization"] == "Bearer sk-1"
    assert get.url.raw_path == b"/v1/tasks/odd%20id%2Fx"  # ids are one path segment


def test_completion_options_are_passed_through() -> None:
    recorder = Recorder(httpx.Response(200, json=COMPLETION))
    with recorder.client() as client:
        result = client.complete("t", "p", max_tokens=4, temperature=0.0, stop=["\n"], seed=1)
    body = json.loads(recorder.requests[0].content)
    assert body == {
        "model": "t",
        "prompt": "p",
        "max_tokens": 4,
        "temperature": 0.0,
        "stop": ["\n"],
        "seed": 1,
        "stream": False,
    }
    assert result.text == " yes" and result.usage.total_tokens == 4


def test_base_url_and_key_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ICM_LORA_BASE_URL", "http://from-env:9000/")
    monkeypatch.setenv("ICM_LORA_API_KEY", "env-key")
    seen: list[httpx.Request] = []

    def handler(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"status": "ok"})

    with Client(transport=httpx.MockTransport(handler)) as client:
        assert client.health().status == "ok"
    assert str(seen[0].url) == "http://from-env:9000/healthz"
    assert seen[0].headers["authorization"] == "Bearer env-key"
    with Client(BASE, api_key="arg-key", transport=httpx.MockTransport(handler)) as client:
        client.health()
    assert str(seen[1].url) == f"{BASE}/healthz" and seen[1].headers["authorization"] == "Bearer arg-key"


def test_timeouts_are_configurable() -> None:
    with Client(BASE, timeout=httpx.Timeout(5.0, connect=1.0)) as client:
        assert client.config.timeout == httpx.Timeout(5.0, connect=1.0)
    with Client(BASE, timeout=3) as client:
        assert client.config.timeout == httpx.Timeout(3.0)


def test_context_managers_close_the_connection_pool() -> None:
    with Client(BASE) as client:
        pass
    assert client._http.is_closed

    async def main() -> AsyncClient:
        async with AsyncClient(BASE) as aclient:
            pass
        return aclient

    assert asyncio.run(main())._http.is_closed
