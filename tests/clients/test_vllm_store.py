"""The vLLM plugin's adapter store (no vLLM needed): resolve task and adapter ids through a live service, verify the
weights against the served checksum, write folders atomically, keep a bounded number."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from icm_lora_client import AsyncClient
from icm_lora_vllm.store import AdapterStore, ChecksumMismatch, tensors_sha256

from generator.adapter import GeneratedAdapter
from tests.service.conftest import serve

EXAMPLES = [{"input": "kiwi pear", "output": "yes"}, {"input": "wolf goat", "output": "no"}]


def test_store_fetches_verifies_and_bounds(settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def main(url: str) -> None:
        async with AsyncClient(url) as client:
            first = await client.create_task("Fruit or not.", EXAMPLES, task_id="fruit")
            second = await client.create_task("Animal or not.", EXAMPLES, task_id="animal")
            store = AdapterStore(client, tmp_path / "cache", max_adapters=1)

            by_task = await store.fetch("fruit")
            assert by_task is not None and by_task.task_id == "fruit" and by_task.adapter_id == first.adapter_id
            weights = (by_task.path / "adapter_model.safetensors").read_bytes()
            served = GeneratedAdapter.from_safetensors_bytes(weights)  # the service's own check agrees
            assert tensors_sha256(weights) == served.sha256 == first.adapter.tensors_sha256  # type: ignore[union-attr]
            config = json.loads((by_task.path / "adapter_config.json").read_text())
            assert config["base_model_name_or_path"] == "tiny:0" and config["r"] == first.adapter.rank  # type: ignore[union-attr]
            assert 0 < by_task.int_id < 2**31 and by_task.int_id == (await store.fetch("fruit")).int_id  # type: ignore[union-attr]

            by_adapter = await store.fetch(first.adapter_id or "")
            assert by_adapter is not None and by_adapter.task_id is None and by_adapter.path == by_task.path

            assert await store.fetch("no-such-task") is None

            other = await store.fetch("animal")  # bounded: max_adapters=1 evicts the older folder
            assert other is not None and store.held() == {second.adapter_id}
            assert not any(p.name.startswith(".part-") for p in (tmp_path / "cache").iterdir())

            # weights that do not match the served checksum are refused and leave nothing behind
            metadata = await client.get_adapter(first.adapter_id or "")
            with pytest.raises(ChecksumMismatch):
                wrong = metadata.model_copy(update={"tensors_sha256": "0" * 64})
                await store._download(wrong, tmp_path / "cache" / "x")
            assert sorted(p.name for p in (tmp_path / "cache").iterdir()) == [second.adapter_id]

    with serve(settings_for()) as service:
        asyncio.run(main(service.url))
