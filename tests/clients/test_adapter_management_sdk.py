"""The SDK's adapter management calls (sync and async) against the real service: list_adapters, delete_adapter,
update_task with generation defaults, and the per-format digests in the metadata."""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from icm_lora_client import AdapterDeleted, AsyncClient, BadRequestError, Client, ConflictError, NotFoundError

from tests.service.conftest import serve

DESCRIPTION = "Decide whether the listed words are fruits or animals."
EXAMPLES = [{"input": "kiwi pear lime", "output": "yes"}, {"input": "wolf goat otter", "output": "no"}]
PROMPT = "Input: mango plum kiwi\nOutput:"


def test_sync_adapter_management(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, Client(service.url, timeout=60) as client:
        task = client.create_task(DESCRIPTION, EXAMPLES, task_id="fruit")
        other = client.generate_adapter("Label the words by colour.")
        listed = list(client.list_adapters(page_size=1))
        assert [a.adapter_id for a in listed] == sorted([task.adapter_id, other.adapter_id])  # type: ignore[type-var]
        assert {a.kind for a in listed} == {"generated"} and {a.num_examples for a in listed} == {0, 2}

        assert task.adapter is not None and task.metadata == {} and task.defaults == {}
        with service.client() as raw:
            weights = raw.get(f"/v1/adapters/{task.adapter_id}/weights").content
        assert hashlib.sha256(weights).hexdigest() == task.adapter.sha256.zip

        updated = client.update_task("fruit", metadata={"owner": "ml"}, defaults={"max_tokens": 3, "temperature": 0.0})
        assert updated.metadata == {"owner": "ml"} and updated.defaults == {"max_tokens": 3, "temperature": 0.0}
        completion = client.complete("fruit", PROMPT)
        assert completion.usage.completion_tokens == 3 and completion.choices[0].finish_reason == "length"
        assert client.complete("fruit", PROMPT, max_tokens=5).usage.completion_tokens == 5
        cleared = client.update_task("fruit", defaults={"max_tokens": None})
        assert cleared.defaults == {"temperature": 0.0} and cleared.metadata == {"owner": "ml"}
        with pytest.raises(BadRequestError) as invalid:
            client.update_task("fruit", defaults={"max_tokens": 0})
        assert invalid.value.status_code == 422
        with pytest.raises(NotFoundError):
            client.update_task("nope", metadata={"a": "b"})

        deleted = client.delete_adapter(task)
        assert deleted == AdapterDeleted(adapter_id=task.adapter_id or "", deleted=True)
        with pytest.raises(NotFoundError):
            client.get_adapter(task.adapter_id or "")
        assert client.complete("fruit", PROMPT, max_tokens=2).icm_lora is not None  # regenerated for the task
        assert client.get_adapter(task.adapter_id or "").sha256 == task.adapter.sha256

        with pytest.raises(ConflictError):
            client.create_task("Label the words by colour.", task_id="fruit")
        replaced = client.create_task("Label the words by colour.", task_id="fruit", replace=True)
        assert replaced.adapter_id == other.adapter_id and replaced.metadata == {"owner": "ml"}


def test_async_adapter_management(settings_for) -> None:  # type: ignore[no-untyped-def]
    async def scenario(url: str) -> None:
        async with AsyncClient(url, timeout=60) as client:
            task = await client.create_task(DESCRIPTION, EXAMPLES, task_id="fruit")
            listed = [a.adapter_id async for a in client.list_adapters(page_size=1)]
            assert listed == [task.adapter_id]
            updated = await client.update_task("fruit", defaults={"max_tokens": 2, "stop": ["\n"]})
            assert updated.defaults == {"max_tokens": 2, "stop": ["\n"]}
            completion = await client.complete("fruit", PROMPT, temperature=0)
            assert completion.usage.completion_tokens <= 2
            assert (await client.delete_adapter(task.adapter_id or "")).deleted
            assert [a.adapter_id async for a in client.list_adapters()] == []
            with pytest.raises(NotFoundError):
                await client.delete_adapter(task.adapter_id or "")

    with serve(settings_for()) as service:
        asyncio.run(scenario(service.url))
