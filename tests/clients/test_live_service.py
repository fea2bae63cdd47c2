"""Client and AsyncClient against the real service (tiny base model, the session's small generator)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
import torch
from icm_lora_client import (
    AsyncClient,
    AuthenticationError,
    ChatCompletionChunk,
    Client,
    ConflictError,
    NotFoundError,
    PermissionDeniedError,
)
from peft import PeftModel

from generator.base_model import load_base_model
from tests.service.conftest import RunningService, serve

DESCRIPTION = "Decide whether the listed words are fruits or animals."
EXAMPLES = [{"input": "kiwi pear lime", "output": "yes"}, {"input": "wolf goat otter", "output": "no"}]
PROMPT = "Input: mango plum kiwi\nOutput:"
CHAT = [{"role": "user", "content": "mango plum kiwi"}]


def _assert_loads_with_peft(folder: Path, rank: int) -> None:
    base = load_base_model("tiny").model
    ids = torch.tensor([[1, 20, 21, 22]])
    with torch.no_grad():
        before = base(ids).logits.clone()
        model = PeftModel.from_pretrained(base, str(folder))
        after = model(ids).logits
    assert model.peft_config["default"].to_dict()["r"] == rank
    assert not torch.allclose(before, after), "the downloaded adapter must change the model"


def test_sync_client_end_to_end(settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, Client(service.url, timeout=60) as client:
        assert client.health().status == "ok"
        task = client.create_task(DESCRIPTION, EXAMPLES, task_id="fruit-or-animal")
        assert task.task_id == "fruit-or-animal" and task.adapter is not None
        assert task.adapter.adapter_id == task.adapter_id and task.adapter.rank == 4
        assert client.create_task(DESCRIPTION, EXAMPLES, task_id="fruit-or-animal").task_id == task.task_id  # 200
        with pytest.raises(ConflictError) as conflict:
            client.create_task("another spec", EXAMPLES, task_id="fruit-or-animal")
        assert conflict.value.status_code == 409 and conflict.value.type == "conflict"

        got = client.get_task("fruit-or-animal")
        assert got.adapter_id == task.adapter_id and got.examples[0].input == "kiwi pear lime"
        for i in range(3):
            client.create_task(f"task number {i}", EXAMPLES, task_id=f"extra-{i}")
        listed = [t.task_id for t in client.list_tasks(page_size=2)]  # 4 tasks over 2 pages
        assert listed == ["extra-0", "extra-1", "extra-2", "fruit-or-animal"]

        meta = client.generate_adapter(DESCRIPTION, EXAMPLES)
        assert meta.adapter_id == task.adapter_id and meta.cached
        assert client.get_adapter(meta.adapter_id).sha256 == meta.sha256
        folder = client.download_adapter(task, tmp_path / "peft")
        assert {p.name for p in folder.iterdir()} == {"adapter_config.json", "adapter_model.safetensors"}
        _assert_loads_with_peft(folder, meta.rank)

        completion = client.complete(task.task_id, PROMPT, max_tokens=4, temperature=0)
        assert completion.model == task.task_id and 1 <= completion.usage.completion_tokens <= 4
        assert completion.choices[0].finish_reason in {"length", "stop"}

        whole = client.chat(task.task_id, CHAT, max_tokens=6, temperature=0)
        with client.chat(task.task_id, CHAT, stream=True, max_tokens=6, temperature=0) as stream:
            chunks = list(stream)
        assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert chunks[-1].finish_reason in {"length", "stop"}
        assert "".join(c.text for c in chunks) == whole.content

        models = [m.id for m in client.models().data]
        assert models[0] == "tiny" and set(listed) <= set(models)

        with pytest.raises(NotFoundError) as missing:
            client.get_task("no-such-task")
        assert missing.value.status_code == 404 and missing.value.type == "not_found"
        assert "no-such-task" in missing.value.message
        assert client.delete_task("extra-0").task_id == "extra-0"
        with pytest.raises(NotFoundError):
            client.delete_task("extra-0")
        with pytest.raises(NotFoundError):
            client.complete("extra-0", PROMPT, max_tokens=2)


def test_async_client_end_to_end(settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    async def main(service: RunningService) -> None:
        async with AsyncClient(service.url, timeout=60) as client:
            assert (await client.health()).status == "ok"
            task = await client.create_task(DESCRIPTION, EXAMPLES, task_id="fruit-or-animal")
            await client.create_task("second", EXAMPLES, task_id="second")
            assert (await client.get_task(task.task_id)).adapter_id == task.adapter_id
            assert [t.task_id async for t in client.list_tasks(page_size=1)] == ["fruit-or-animal", "second"]
            meta = await client.generate_adapter(DESCRIPTION, EXAMPLES)
            folder = await client.download_adapter(meta, tmp_path / "peft")
            _assert_loads_with_peft(folder, meta.rank)
            completion = await client.complete(task.task_id, PROMPT, max_tokens=4, temperature=0)
            streamed = await client.complete(task.task_id, PROMPT, stream=True, max_tokens=4, temperature=0)
            async with streamed:
                text = "".join([chunk.text async for chunk in streamed])
            assert text == completion.text
            stream = await client.chat(task.task_id, CHAT, stream=True, max_tokens=6, temperature=0)
            chunks = [chunk async for chunk in stream]
            assert chunks[-1].finish_reason in {"length", "stop"}
            assert {m.id for m in (await client.models()).data} == {"tiny", "fruit-or-animal", "second"}
            assert (await client.delete_task("second")).task_id == "second"
            with pytest.raises(NotFoundError):
                await client.get_task("second")

    with serve(settings_for()) as service:
        asyncio.run(main(service))


def test_api_keys(settings_for, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    async def check_async(url: str) -> None:
        async with AsyncClient(url, api_key="") as anonymous:
            with pytest.raises(AuthenticationError):
                await anonymous.get_task("x")
        async with AsyncClient(url, api_key="sk-good") as client:
            assert [m.id for m in (await client.models()).data] == ["tiny"]

    monkeypatch.delenv("ICM_LORA_API_KEY", raising=False)
    with serve(settings_for(api_keys="sk-good")) as service:
        with Client(service.url) as anonymous:
            assert anonymous.health().status == "ok"  # probes need no key
            with pytest.raises(AuthenticationError) as unauthenticated:
                anonymous.list_tasks().__next__()
            assert unauthenticated.value.status_code == 401
            assert unauthenticated.value.type == "authentication_error"
            assert unauthenticated.value.response.headers["www-authenticate"] == "Bearer"
        with Client(service.url, api_key="sk-wrong") as wrong, pytest.raises(PermissionDeniedError):
            wrong.models()
        monkeypatch.setenv("ICM_LORA_BASE_URL", service.url)
        monkeypatch.setenv("ICM_LORA_API_KEY", "sk-good")
        with Client() as from_env:
            assert [t.task_id for t in from_env.list_tasks()] == []
        asyncio.run(check_async(service.url))


def test_sampling_options_and_developer_role(settings_for) -> None:  # type: ignore[no-untyped-def]
    """The SDK passes n, the penalties, logit_bias and max_completion_tokens through; a developer message is served."""
    tokenizer = load_base_model("tiny").tokenizer
    with serve(settings_for()) as service, Client(service.url, timeout=60) as client:
        result = client.complete(
            "tiny",
            PROMPT,
            n=2,
            temperature=1.0,
            seed=4,
            max_completion_tokens=3,
            presence_penalty=1.0,
            frequency_penalty=0.5,
            logit_bias={"2": -100},
        )
        assert [c.index for c in result.choices] == [0, 1]
        assert result.usage.completion_tokens == 6 and {c.finish_reason for c in result.choices} == {"length"}
        forced = client.complete("tiny", PROMPT, max_tokens=3, temperature=0, logit_bias={"42": 100})
        assert forced.text == tokenizer.decode([42] * 3)
        developer = client.chat(
            "tiny", [{"role": "developer", "content": "Be brief."}, *CHAT], max_tokens=4, temperature=0
        )
        system = client.chat("tiny", [{"role": "system", "content": "Be brief."}, *CHAT], max_tokens=4, temperature=0)
        assert developer.content == system.content
