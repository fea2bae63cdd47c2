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
from icm_lora_vllm.store import WEIGHTS, AdapterStore, Resolved

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


class SlowStore(AdapterStore):
    """Resolves every name in ``served`` to its adapter; ``lookup_many`` (the watcher's re-check) waits for ``go``."""

    def __init__(self, folder: Path, served: dict[str, str]) -> None:
        super().__init__(AsyncClient(f"http://127.0.0.1:{free_port()}"), folder)
        self.served = served
        self.go = asyncio.Event()
        self.asked: list[list[str]] = []

    async def lookup_many(self, names):  # type: ignore[no-untyped-def]
        self.asked.append(list(names))
        await self.go.wait()
        return {n: (n, self.served[n]) if n in self.served else None for n in names}

    async def fetch(self, name: str) -> Resolved | None:
        adapter_id = self.served.get(name)
        if adapter_id is None:
            return None
        path = self.folder / adapter_id
        path.mkdir(exist_ok=True)
        (path / WEIGHTS).write_bytes(b"weights")
        return Resolved(name, name, adapter_id, path)


def test_a_name_resolved_during_a_recheck_is_not_unloaded(plugin: types.ModuleType, tmp_path: Path) -> None:
    """The watcher's re-check is in flight when vLLM resolves a new name: the answer does not list that name, and
    it must not be taken for deleted (unloaded, its folder dropped) because of that."""
    unloaded: list[bytes] = []
    vllm = httpx.AsyncClient(
        base_url="http://vllm",
        transport=httpx.MockTransport(lambda r: unloaded.append(r.content) or httpx.Response(200)),
    )

    async def main() -> None:
        store = SlowStore(tmp_path, {"fruit": "a" * 64, "animal": "b" * 64})
        resolver = plugin.IcmLoraResolver(store, 60, vllm)
        assert await resolver.resolve_lora("base", "fruit") is not None
        recheck = asyncio.create_task(resolver.refresh())
        while not store.asked:
            await asyncio.sleep(0)
        assert await resolver.resolve_lora("base", "animal") is not None  # while the re-check waits
        store.go.set()
        assert await recheck == [] and unloaded == []
        assert set(resolver.resolved) == {"fruit", "animal"} and (tmp_path / ("b" * 64) / WEIGHTS).is_file()
        assert store.asked == [["fruit"]]
        del store.served["animal"]  # deleted: the next re-check, which asks for it, unloads it
        assert await resolver.refresh() == ["animal"] and unloaded == [b'{"lora_name":"animal"}']
        assert set(resolver.resolved) == {"fruit"} and not (tmp_path / ("b" * 64)).exists()

    asyncio.run(main())
