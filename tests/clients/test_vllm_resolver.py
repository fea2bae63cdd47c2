"""The plugin's resolver without vLLM: vLLM's two small interfaces it uses (``LoRARequest``, ``LoRAResolver`` and
the registry) are stood in for, so the resolver's own behaviour is checked here — a service outage answers None
(never raises), a deleted task is unloaded through vLLM's API — and tests/vllm checks it inside a real vLLM."""

from __future__ import annotations

import asyncio
import importlib
import sys
import types
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from icm_lora_client import AsyncClient, RetryPolicy
from icm_lora_vllm.store import AdapterStore

from tests.service.conftest import free_port, serve

EXAMPLES = [{"input": "kiwi pear", "output": "yes"}, {"input": "wolf goat", "output": "no"}]


@pytest.fixture
def plugin(monkeypatch: pytest.MonkeyPatch) -> Iterator[types.ModuleType]:
    @dataclass
    class LoRARequest:
        lora_name: str
        lora_int_id: int
        lora_path: str = ""
        base_model_name: str | None = None

    class Registry:
        def __init__(self) -> None:
            self.resolvers: dict[str, object] = {}

        def get_supported_resolvers(self) -> set[str]:
            return set(self.resolvers)

        def register_resolver(self, name: str, resolver: object) -> None:
            self.resolvers[name] = resolver

    request = types.ModuleType("vllm.lora.request")
    request.LoRARequest = LoRARequest  # type: ignore[attr-defined]
    resolver = types.ModuleType("vllm.lora.resolver")
    resolver.LoRAResolver = object  # type: ignore[attr-defined]
    resolver.LoRAResolverRegistry = Registry()  # type: ignore[attr-defined]
    for name, module in {"vllm": types.ModuleType("vllm"), "vllm.lora": types.ModuleType("vllm.lora"),
                         "vllm.lora.request": request, "vllm.lora.resolver": resolver}.items():  # fmt: skip
        monkeypatch.setitem(sys.modules, name, module)
    monkeypatch.delitem(sys.modules, "icm_lora_vllm.plugin", raising=False)
    yield importlib.import_module("icm_lora_vllm.plugin")
    sys.modules.pop("icm_lora_vllm.plugin", None)


def test_outage_answers_none(plugin: types.ModuleType, tmp_path: Path) -> None:
    async def main() -> None:
        client = AsyncClient(f"http://127.0.0.1:{free_port()}", retry=RetryPolicy(max_retries=2, initial_delay=0.01))
        resolver = plugin.IcmLoraResolver(AdapterStore(client, tmp_path), 60, httpx.AsyncClient())
        assert await resolver.resolve_lora("base", "some-task") is None  # logged, not raised
        assert await resolver.refresh() == []

    asyncio.run(main())


def test_resolves_and_unloads_a_deleted_task(plugin: types.ModuleType, settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    unloaded: list[bytes] = []

    def vllm_api(request: httpx.Request) -> httpx.Response:
        assert request.url.path == "/v1/unload_lora_adapter"
        unloaded.append(request.content)
        return httpx.Response(200, text="Success")

    class Counting(httpx.AsyncHTTPTransport):
        def __init__(self) -> None:
            super().__init__()
            self.calls: list[tuple[str, str]] = []

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            self.calls.append((request.method, request.url.path))
            return await super().handle_async_request(request)

    async def main(url: str) -> None:
        transport = Counting()
        async with AsyncClient(url, transport=transport) as client:
            created = await client.create_task("Fruit or not.", EXAMPLES, task_id="fruit")
            await client.create_task("Animal or not.", EXAMPLES, task_id="animal")
            vllm = httpx.AsyncClient(base_url="http://vllm", transport=httpx.MockTransport(vllm_api))
            resolver = plugin.IcmLoraResolver(AdapterStore(client, tmp_path), 60, vllm)
            request = await resolver.resolve_lora("smollm2-135m", "fruit")
            assert request.lora_name == "fruit" and request.base_model_name == "smollm2-135m"
            assert Path(request.lora_path).name == created.adapter_id and request.lora_int_id > 0
            assert await resolver.resolve_lora("smollm2-135m", "animal") is not None
            assert await resolver.resolve_lora("smollm2-135m", "nope") is None
            transport.calls.clear()
            assert await resolver.refresh() == [] and unloaded == []  # nothing changed
            assert transport.calls == [("POST", "/v1/resolve")]  # one request re-checks every resolved name

            await client.delete_task("fruit")
            assert await resolver.refresh() == ["fruit"]
            assert unloaded == [b'{"lora_name":"fruit"}']
            assert set(resolver.resolved) == {"animal"} and not (tmp_path / (created.adapter_id or "")).exists()

    with serve(settings_for()) as service:
        asyncio.run(main(service.url))
