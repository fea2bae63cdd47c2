"""Self-check and refinement over real HTTP with the tiny model and the session's small generator.

A failing check is forced with ``self_check_margin`` (an adapter passes when adapter - base >= -margin per answer
token): -100 fails every adapter, +100 passes every one, and a margin between a generated adapter's delta and its
refined adapter's delta fails the first and passes the second.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from pathlib import Path

import httpx

from generator.adapter import GeneratedAdapter
from generator.refine import RefinePlan
from generator.tasks import TaskSpec
from service.task_store import Refinement, SqliteTaskStore
from tests.service.conftest import metric_value, serve

EXAMPLES = [
    {"input": "cat dog cow", "output": "animals"},
    {"input": "red blue green", "output": "colours"},
    {"input": "horse sheep goat", "output": "animals"},
    {"input": "pink grey white", "output": "colours"},
    {"input": "wolf bear fox", "output": "animals"},
]
TASK = {"task_id": "words", "description": "Say whether the words are animals or colours.", "examples": EXAMPLES}
PROMPT = {"prompt": "Input: lion tiger\nOutput:", "max_tokens": 6, "temperature": 0}
WARNING = "x-icm-lora-warning"


def _wait_for(client: httpx.Client, task_id: str, statuses: set[str], timeout_s: float = 180) -> dict[str, object]:
    deadline = time.monotonic() + timeout_s
    while True:
        task = client.get(f"/v1/tasks/{task_id}").json()
        if task["refinement"]["status"] in statuses:
            return task  # type: ignore[no-any-return]
        assert time.monotonic() < deadline, task
        time.sleep(0.1)


def _last_chunk(client: httpx.Client, body: dict[str, object]) -> tuple[httpx.Headers, dict[str, object]]:
    with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        assert response.status_code == 200
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return response.headers, json.loads(events[-2])


def test_fallback_serves_the_base_model_with_a_warning(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(self_check_margin=-100.0)) as service, service.client() as client:
        created = client.post("/v1/tasks", json=TASK)
        assert created.status_code == 201, created.text
        task = created.json()
        check = task["adapter"]["self_check"]
        assert check["passed"] is False and check["examples"] == len(EXAMPLES) and check["held_out"] is False
        assert (
            check["delta"] == round(check["adapter_loglik"] - check["base_loglik"], 6)
            or abs(check["delta"] - (check["adapter_loglik"] - check["base_loglik"])) < 1e-5
        )
        assert task["self_check"] == check and task["refinement"]["status"] == "none"
        assert client.get(f"/v1/adapters/{task['adapter_id']}").json()["self_check"] == check
        assert client.get("/v1/tasks/words").json()["self_check"] == check

        answer = client.post("/v1/completions", json={"model": "words", **PROMPT})
        assert answer.status_code == 200, answer.text
        info = answer.json()["icm_lora"]
        assert info["served"] == "base" and info["adapter_id"] == task["adapter_id"] and info["refined"] is False
        assert "failed its self-check" in info["warning"] and answer.headers[WARNING] == info["warning"]
        base = client.post("/v1/completions", json={"model": "tiny", **PROMPT}).json()
        assert answer.json()["choices"][0]["text"] == base["choices"][0]["text"]
        assert (
            base["icm_lora"] is None
            and WARNING not in client.post("/v1/completions", json={"model": "tiny", **PROMPT}).headers
        )

        headers, last = _last_chunk(client, {"model": "words", **PROMPT})
        assert last["icm_lora"] == info and headers[WARNING] == info["warning"]
        chat = client.post(
            "/v1/chat/completions", json={"model": "words", "messages": [{"role": "user", "content": "hi"}]}
        )
        assert chat.status_code == 200 and chat.json()["icm_lora"] == info and chat.headers[WARNING] == info["warning"]

        # a description-only task has nothing to check against: served by its adapter, no warning
        plain = client.post("/v1/tasks", json={"task_id": "plain", "description": "Count the words."}).json()
        assert plain["adapter"]["self_check"] is None and plain["self_check"] is None
        served = client.post("/v1/completions", json={"model": "plain", **PROMPT})
        assert served.json()["icm_lora"] == {
            "adapter_id": plain["adapter_id"],
            "served": "adapter",
            "refined": False,
            "warning": None,
        }
        assert WARNING not in served.headers
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "icm_lora_adapter_self_checks_total", outcome="fallback") == 1
        assert metric_value(metrics, "icm_lora_adapter_self_checks_total", outcome="unchecked") == 1


def test_keep_serves_the_failed_adapter_with_a_warning(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(self_check_margin=-100.0, self_check="keep")) as service, service.client() as client:
        task = client.post("/v1/tasks", json=TASK).json()
        assert task["self_check"]["passed"] is False
        answer = client.post("/v1/completions", json={"model": "words", **PROMPT})
        info = answer.json()["icm_lora"]
        assert info["served"] == "adapter" and info["adapter_id"] == task["adapter_id"]
        assert "served anyway (policy keep)" in info["warning"] and answer.headers[WARNING] == info["warning"]
        assert metric_value(client.get("/metrics").text, "icm_lora_adapter_self_checks_total", outcome="kept") == 1


def test_passing_adapter_is_served_without_warning(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(self_check_margin=100.0)) as service, service.client() as client:
        task = client.post("/v1/tasks", json=TASK).json()
        assert task["self_check"]["passed"] is True
        answer = client.post("/v1/completions", json={"model": "words", **PROMPT})
        assert answer.json()["icm_lora"]["served"] == "adapter" and answer.json()["icm_lora"]["warning"] is None
        assert WARNING not in answer.headers
        assert metric_value(client.get("/metrics").text, "icm_lora_adapter_self_checks_total", outcome="passed") == 1


def test_refinement_is_served_once_done_and_reproducible(settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # A: every adapter passes; an explicit refinement of 8 steps
    with serve(settings_for(data_dir=tmp_path / "a", self_check_margin=100.0)) as service, service.client() as client:
        created = client.post("/v1/tasks", json={**TASK, "refine_steps": 8})
        assert created.status_code == 201, created.text
        assert created.json()["refinement"]["status"] in {"queued", "running", "done"}
        assert created.json()["refinement"]["steps"] == 8
        task = _wait_for(client, "words", {"done", "failed"})
        refinement = task["refinement"]
        assert isinstance(refinement, dict) and refinement["status"] == "done", refinement
        refined_id = refinement["adapter_id"]
        generated_delta = task["self_check"]["delta"]  # type: ignore[index]
        refined_delta = refinement["self_check"]["delta"]
        assert refined_delta > generated_delta  # trained on these examples: it explains them better
        meta = client.get(f"/v1/adapters/{refined_id}").json()
        assert meta["parent_adapter_id"] == task["adapter_id"] and meta["refine_steps"] == 8
        assert meta["self_check"] == refinement["self_check"]
        answer = client.post("/v1/completions", json={"model": "words", **PROMPT}).json()
        assert answer["icm_lora"] == {"adapter_id": refined_id, "served": "adapter", "refined": True, "warning": None}
        resolved = client.post("/v1/resolve", json={"names": ["words", refined_id]}).json()["data"]
        assert [r["adapter_id"] for r in resolved] == [refined_id, refined_id]  # what vLLM's plugin serves
        adhoc = client.post(
            "/v1/adapters", json={"description": TASK["description"], "examples": EXAMPLES, "refine_steps": 8}
        )
        assert adhoc.json()["refined_adapter_id"] == refined_id
        sha = meta["tensors_sha256"]  # the file digests also cover the self-check, which B's margin changes

    # B: policy refine, a margin between the two deltas: the generated adapter fails, its refinement passes
    margin = -(generated_delta + refined_delta) / 2
    settings_b = settings_for(
        data_dir=tmp_path / "b", self_check="refine", self_check_margin=margin, refine_default_steps=8
    )
    with serve(settings_b) as service, service.client() as client:
        created = client.post("/v1/tasks", json=TASK).json()  # no refine_steps: the policy starts one
        assert created["self_check"]["passed"] is False
        assert created["refinement"]["adapter_id"] == refined_id and created["refinement"]["steps"] == 8
        early = client.post("/v1/completions", json={"model": "words", **PROMPT}).json()["icm_lora"]
        if early["refined"] is False:  # the refinement has not finished yet: the base model serves, with a warning
            assert early["served"] == "base" and "failed its self-check" in early["warning"]
        _wait_for(client, "words", {"done", "failed"})
        answer = client.post("/v1/completions", json={"model": "words", **PROMPT})
        assert answer.json()["icm_lora"] == {
            "adapter_id": refined_id,
            "served": "adapter",
            "refined": True,
            "warning": None,
        }
        assert client.get(f"/v1/adapters/{refined_id}").json()["tensors_sha256"] == sha
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "icm_lora_adapter_self_checks_total", outcome="refined") == 1
        assert metric_value(metrics, "icm_lora_adapter_refinements_total", result="done") == 1

    # B restarted: empty caches; the refined adapter is trained again from its stored spec, bit-identically
    with serve(settings_b) as service, service.client() as client:
        resolved = client.post("/v1/resolve", json={"names": [refined_id]}).json()["data"]
        assert resolved[0]["adapter_id"] == refined_id  # known from its stored spec, nothing trained to answer
        again = client.get(f"/v1/adapters/{refined_id}").json()
        assert again["cached"] is False and again["tensors_sha256"] == sha
        assert client.get("/v1/tasks/words").json()["refinement"]["status"] == "done"
        weights = client.get(f"/v1/adapters/{refined_id}/weights", params={"format": "safetensors"}).content
        assert GeneratedAdapter.from_safetensors_bytes(weights, expected_id=refined_id).sha256 == sha


def test_bad_refine_steps_are_422(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        for value in (-1, 65, 1.5, "8", True, None, [4]):
            for path in ("/v1/tasks", "/v1/adapters"):
                response = client.post(path, json={**TASK, "refine_steps": value})
                assert response.status_code == 422, (path, value, response.text)
                assert "refine_steps" in response.json()["error"]["message"], response.text
        for path in ("/v1/tasks", "/v1/adapters"):
            response = client.post(path, json={"description": "No examples.", "refine_steps": 4})
            assert response.status_code == 422 and "needs examples" in response.json()["error"]["message"]
        assert client.get("/v1/tasks").json()["data"] == []


class GatedFailingRefiner:
    """A refiner double: waits for ``gate``, then raises."""

    def __init__(self) -> None:
        self.gate = threading.Event()
        self.calls = 0

    def __call__(
        self, spec: TaskSpec, adapter: GeneratedAdapter, plan: RefinePlan, adapter_id: str, stop: threading.Event
    ) -> GeneratedAdapter:
        self.calls += 1
        self.gate.wait(timeout=60)
        raise RuntimeError("the trainer ran out of patience")


def test_failed_refinement_keeps_the_generated_adapter_and_a_full_queue_is_429(settings_for) -> None:  # type: ignore[no-untyped-def]
    refiner = GatedFailingRefiner()
    settings = settings_for(self_check_margin=100.0, refine_queue_size=1)
    with serve(settings, refiner=refiner) as service, service.client() as client:
        first = client.post("/v1/tasks", json={**TASK, "refine_steps": 4})
        assert first.status_code == 201, first.text
        _wait_for(client, "words", {"running"})
        second = client.post(
            "/v1/tasks", json={**TASK, "task_id": "words-2", "examples": EXAMPLES[:3], "refine_steps": 4}
        )
        assert second.status_code == 201 and second.json()["refinement"]["status"] == "queued"
        third = client.post(
            "/v1/tasks", json={**TASK, "task_id": "words-3", "examples": EXAMPLES[:2], "refine_steps": 4}
        )
        assert third.status_code == 429 and third.json()["error"]["type"] == "overloaded", third.text
        assert "refinement queue is full" in third.json()["error"]["message"] and "retry-after" in third.headers
        assert client.get("/v1/tasks/words-3").status_code == 404
        refiner.gate.set()
        for task_id in ("words", "words-2"):
            task = _wait_for(client, task_id, {"done", "failed"})
            refinement = task["refinement"]
            assert isinstance(refinement, dict) and refinement["status"] == "failed"
            assert "ran out of patience" in refinement["error"]
        answer = client.post("/v1/completions", json={"model": "words", **PROMPT})
        assert answer.status_code == 200
        assert answer.json()["icm_lora"] == {
            "adapter_id": first.json()["adapter_id"],
            "served": "adapter",
            "refined": False,
            "warning": None,
        }
        metrics = client.get("/metrics").text
        assert metric_value(metrics, "icm_lora_adapter_refinements_total", result="failed") == 2
        assert metric_value(metrics, "icm_lora_adapter_refinements_total", result="rejected") == 1
        # a failed refinement may be asked for again
        retried = client.post("/v1/tasks", json={**TASK, "refine_steps": 4})
        assert retried.status_code == 200 and retried.json()["refinement"]["status"] in {"queued", "running", "failed"}


def test_a_refinement_left_running_by_a_restart_can_be_asked_for_again(settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(self_check_margin=100.0)
    with serve(settings) as service, service.client() as client:
        assert client.post("/v1/tasks", json=TASK).status_code == 201

    async def mark_running() -> None:  # what a process killed mid-refinement leaves behind
        store = SqliteTaskStore(settings.data_dir / "tasks.sqlite3")
        record = await store.get("words")
        assert record is not None
        assert await store.update_refinement(record, Refinement("running", 2, "lost"))
        await store.close()

    asyncio.run(mark_running())
    with serve(settings) as service, service.client() as client:
        assert client.get("/v1/tasks/words").json()["refinement"]["status"] == "running"
        again = client.post("/v1/tasks", json={**TASK, "refine_steps": 2})
        assert again.status_code == 200 and again.json()["refinement"]["status"] in {"queued", "running", "done"}
        task = _wait_for(client, "words", {"done", "failed"})
        assert task["refinement"]["status"] == "done" and task["refinement"]["adapter_id"] != "lost"  # type: ignore[index]
