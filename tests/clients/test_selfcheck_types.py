"""The SDK's self-check and refinement fields: request shapes and typed answers, sync and async alike; and against
the live service."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
from icm_lora_client import AsyncClient, Client, Refinement, SelfCheck, ServingInfo

from tests.clients.mock import COMPLETION, Recorder, task_json
from tests.service.conftest import serve

CHECK = {
    "base_loglik": -2.0,
    "adapter_loglik": -2.5,
    "delta": -0.5,
    "base_correct": 2,
    "adapter_correct": 1,
    "examples": 2,
    "held_out": False,
    "passed": False,
}
INFO = {"adapter_id": "ad-t1", "served": "base", "refined": False, "warning": "the generated adapter failed"}
TASK = task_json(
    "t1",
    self_check=CHECK,
    refinement={"status": "queued", "steps": 8, "adapter_id": "r1", "error": None, "self_check": None},
)
ADAPTER = {
    "adapter_id": "ad-t1",
    "generator_id": "g",
    "base_model": "tiny",
    "seed": None,
    "rank": 4,
    "alpha": 8.0,
    "target_modules": ["q_proj", "v_proj"],
    "num_parameters": 10,
    "sha256": {"zip": "1" * 64, "safetensors": "2" * 64},
    "tensors_sha256": "0" * 64,
    "cached": False,
    "weights_url": "/v1/adapters/ad-t1/weights",
    "self_check": CHECK,
    "refined_adapter_id": "r1",
}


def _answer(request: httpx.Request) -> httpx.Response:
    if request.url.path == "/v1/tasks":
        return httpx.Response(201, json=TASK)
    if request.url.path == "/v1/adapters":
        return httpx.Response(200, json=ADAPTER)
    return httpx.Response(200, json={**COMPLETION, "icm_lora": INFO}, headers={"X-ICM-LoRA-Warning": INFO["warning"]})


def _check_answers(task: object, adapter: object, completion: object) -> None:
    from icm_lora_client import AdapterMetadata, Completion, Task

    assert isinstance(task, Task) and isinstance(adapter, AdapterMetadata) and isinstance(completion, Completion)
    assert task.self_check == SelfCheck(**CHECK) and task.self_check.passed is False
    assert task.refinement == Refinement(status="queued", steps=8, adapter_id="r1")
    assert adapter.self_check is not None and adapter.self_check.delta == -0.5 and adapter.refined_adapter_id == "r1"
    assert (adapter.self_check.base_correct, adapter.self_check.adapter_correct) == (2, 1)
    assert completion.icm_lora == ServingInfo(**INFO)  # type: ignore[arg-type]


def _check_requests(recorder: Recorder) -> None:
    create, generate, _ = recorder.requests
    assert json.loads(create.content)["refine_steps"] == 8
    assert json.loads(generate.content)["refine_steps"] == 4
    assert "refine_steps" not in json.loads(recorder.requests[2].content)


def test_sync_client_sends_refine_steps_and_reads_the_new_fields() -> None:
    recorder = Recorder(_answer)
    with recorder.client() as client:
        task = client.create_task("d", [{"input": "a", "output": "b"}], task_id="t1", refine_steps=8)
        adapter = client.generate_adapter("d", [{"input": "a", "output": "b"}], refine_steps=4)
        completion = client.complete("t1", "p")
    _check_requests(recorder)
    _check_answers(task, adapter, completion)


def test_async_client_sends_refine_steps_and_reads_the_new_fields() -> None:
    recorder = Recorder(_answer)

    async def run() -> tuple[object, object, object]:
        async with recorder.async_client() as client:
            task = await client.create_task("d", [{"input": "a", "output": "b"}], task_id="t1", refine_steps=8)
            adapter = await client.generate_adapter("d", [{"input": "a", "output": "b"}], refine_steps=4)
            completion = await client.complete("t1", "p")
            return task, adapter, completion

    task, adapter, completion = asyncio.run(run())
    _check_requests(recorder)
    _check_answers(task, adapter, completion)


def test_older_service_answers_still_parse() -> None:
    recorder = Recorder(lambda r: httpx.Response(200, json=task_json("t1")))
    with recorder.client() as client:
        task = client.get_task("t1")
    assert task.self_check is None and task.refinement.status == "none"


def test_live_service_self_check_and_refinement(settings_for) -> None:  # type: ignore[no-untyped-def]
    examples = [{"input": "cat dog", "output": "animals"}, {"input": "red blue", "output": "colours"}]
    with serve(settings_for(self_check_margin=-100.0)) as service:
        with Client(service.url) as client:
            task = client.create_task("Animals or colours?", examples, task_id="words", refine_steps=2)
            assert task.self_check is not None and task.self_check.passed is False
            assert task.adapter is not None and task.adapter.self_check == task.self_check
            answer = client.complete("words", "Input: cow\nOutput:", max_tokens=3, temperature=0)
            assert answer.icm_lora is not None and answer.icm_lora.served == "base" and answer.icm_lora.warning
            chunks = list(client.complete("words", "Input: cow\nOutput:", stream=True, max_tokens=3, temperature=0))
            assert chunks[-1].icm_lora == answer.icm_lora
            deadline = time.monotonic() + 120
            while client.get_task("words").refinement.status not in ("done", "failed"):
                assert time.monotonic() < deadline
                time.sleep(0.1)
            refinement = client.get_task("words").refinement
            assert refinement.status == "done" and refinement.self_check is not None and refinement.adapter_id

        async def run() -> None:
            async with AsyncClient(service.url) as client:
                refined = await client.get_adapter(str(refinement.adapter_id))
                assert refined.parent_adapter_id == task.adapter_id and refined.refine_steps == 2

        asyncio.run(run())
