"""Adapter management over real HTTP: GET /v1/adapters (paginated registry of specs), DELETE /v1/adapters/{id}
(cache tiers and spec; a task using it keeps working), PATCH /v1/tasks/{id} (metadata, generation defaults, spec
immutable). Both registry backends: SQLite and Redis."""

from __future__ import annotations

import time

import pytest
import redis

from tests.service.conftest import REDIS_URL, serve

SPEC = {
    "description": "Decide whether the listed words are fruits or animals.",
    "examples": [{"input": "kiwi pear lime", "output": "yes"}, {"input": "wolf goat otter", "output": "no"}],
}


def _all_adapters(client, limit: int) -> tuple[list[dict[str, object]], int]:  # type: ignore[no-untyped-def]
    seen: list[dict[str, object]] = []
    cursor, pages = None, 0
    while True:
        page = client.get("/v1/adapters", params={"limit": limit, **({"cursor": cursor} if cursor else {})})
        assert page.status_code == 200, page.text
        seen += page.json()["data"]
        pages += 1
        cursor = page.json()["next_cursor"]
        if cursor is None:
            return seen, pages


@pytest.mark.parametrize("backend", ["sqlite", "redis"])
def test_list_and_delete_adapters(settings_for, redis_prefix: str, backend: str) -> None:  # type: ignore[no-untyped-def]
    extra = {"redis_url": REDIS_URL, "redis_prefix": redis_prefix} if backend == "redis" else {}
    raw = redis.Redis.from_url(REDIS_URL)
    with serve(settings_for(**extra)) as service, service.client() as client:
        task = client.post("/v1/tasks", json={"task_id": "fruit", **SPEC}).json()
        task_adapter = task["adapter_id"]
        others = [
            client.post("/v1/adapters", json={"description": f"Label words, variant {i}."}).json() for i in range(3)
        ]
        seeded = client.post("/v1/adapters", json={**SPEC, "seed": 5}).json()

        listed, pages = _all_adapters(client, limit=2)
        ids = [a["adapter_id"] for a in listed]
        expected = {task_adapter, seeded["adapter_id"], *(o["adapter_id"] for o in others)}
        assert set(ids) == expected and ids == sorted(ids) and len(ids) == 5 and pages == 3
        entry = next(a for a in listed if a["adapter_id"] == seeded["adapter_id"])
        assert entry == {
            "adapter_id": seeded["adapter_id"],
            "kind": "generated",
            "description": SPEC["description"],
            "num_examples": 2,
            "seed": 5,
            "parent_adapter_id": None,
            "refine_steps": None,
            "url": f"/v1/adapters/{seeded['adapter_id']}",
        }
        assert client.get("/v1/adapters", params={"limit": 0}).status_code == 422

        before = client.get(f"/v1/adapters/{task_adapter}").json()
        if backend == "redis":
            assert raw.exists(f"{redis_prefix}:adapter:{task_adapter}")
        deleted = client.delete(f"/v1/adapters/{task_adapter}")
        assert deleted.status_code == 200 and deleted.json() == {"adapter_id": task_adapter, "deleted": True}
        if backend == "redis":  # every tier and the spec are gone
            assert not raw.exists(f"{redis_prefix}:adapter:{task_adapter}")
            assert not raw.exists(f"{redis_prefix}:adapter-spec:{task_adapter}")
        gone = client.get(f"/v1/adapters/{task_adapter}")
        assert gone.status_code == 404 and gone.json()["error"]["type"] == "not_found"
        assert task_adapter not in [a["adapter_id"] for a in _all_adapters(client, limit=50)[0]]
        assert client.delete(f"/v1/adapters/{task_adapter}").status_code == 404
        assert client.delete("/v1/adapters/" + "0" * 32).status_code == 404

        # the task that used it keeps working: its next request regenerates the same adapter, bit for bit
        completion = client.post(
            "/v1/completions", json={"model": "fruit", "prompt": "Input: fig\nOutput:", "max_tokens": 2}
        )
        assert completion.status_code == 200, completion.text
        assert completion.json()["icm_lora"]["adapter_id"] == task_adapter
        again = client.get(f"/v1/adapters/{task_adapter}").json()
        assert again["sha256"] == before["sha256"] and again["cached"] is True
        assert task_adapter in [a["adapter_id"] for a in _all_adapters(client, limit=50)[0]]
    raw.close()


def test_patch_task_settings_and_defaults(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(max_tokens=32)) as service, service.client() as client:
        created = client.post("/v1/tasks", json={"task_id": "fruit", **SPEC}).json()
        assert created["metadata"] == {} and created["defaults"] == {}
        prompt = {"model": "fruit", "prompt": "Input: fig plum\nOutput:"}
        free = client.post("/v1/completions", json={**prompt, "temperature": 0}).json()
        assert free["usage"]["completion_tokens"] > 3  # the server's default max_tokens is well above 3

        patched = client.patch(
            "/v1/tasks/fruit",
            json={"metadata": {"owner": "search", "team": "ml"}, "defaults": {"max_tokens": 3, "temperature": 0}},
        )
        assert patched.status_code == 200, patched.text
        body = patched.json()
        assert body["metadata"] == {"owner": "search", "team": "ml"}
        assert body["defaults"] == {"max_tokens": 3, "temperature": 0}
        assert body["adapter_id"] == created["adapter_id"] and body["description"] == SPEC["description"]
        assert client.get("/v1/tasks/fruit").json()["defaults"] == body["defaults"]

        # applied when the request does not set them
        defaulted = client.post("/v1/completions", json=prompt).json()
        explicit = client.post("/v1/completions", json={**prompt, "max_tokens": 3, "temperature": 0}).json()
        assert defaulted["usage"]["completion_tokens"] == 3 and defaulted["choices"][0]["finish_reason"] == "length"
        assert defaulted["choices"][0]["text"] == explicit["choices"][0]["text"]
        assert free["choices"][0]["text"].startswith(defaulted["choices"][0]["text"])  # greedy: the same start
        longer = client.post("/v1/completions", json={**prompt, "max_tokens": 5}).json()  # the request wins
        assert longer["usage"]["completion_tokens"] == 5
        chat = client.post(
            "/v1/chat/completions", json={"model": "fruit", "messages": [{"role": "user", "content": "fig"}]}
        )
        assert chat.status_code == 200 and chat.json()["usage"]["completion_tokens"] <= 3

        # merge patch: null removes, absent keys stay
        removed = client.patch("/v1/tasks/fruit", json={"metadata": {"team": None}, "defaults": {"max_tokens": None}})
        assert removed.json()["metadata"] == {"owner": "search"} and removed.json()["defaults"] == {"temperature": 0}
        assert client.patch("/v1/tasks/fruit", json={}).json()["metadata"] == {"owner": "search"}

        # the spec is immutable; settings are typed strictly and bounded
        for bad, text in (
            ({"description": "Something else."}, "immutable"),
            ({"examples": [], "metadata": {"a": "b"}}, "immutable"),
            ({"defaults": {"max_tokens": "5"}}, "max_tokens"),
            ({"defaults": {"max_tokens": 64}}, "limit of 32"),
            ({"defaults": {"temperature": 3}}, "temperature"),
            ({"defaults": {"logit_bias": {}}}, "logit_bias"),
            ({"metadata": {"k": 5}}, "metadata"),
            ({"metadata": {"bad key!": "v"}}, "metadata"),
        ):
            response = client.patch("/v1/tasks/fruit", json=bad)
            assert response.status_code == 422, (bad, response.text)
            assert text in response.json()["error"]["message"], (bad, response.json())
        assert client.get("/v1/tasks/fruit").json()["defaults"] == {"temperature": 0}  # unchanged by refusals
        assert client.patch("/v1/tasks/nope", json={"metadata": {"a": "b"}}).status_code == 404


def test_deleting_a_tasks_refined_adapter_trains_it_again(settings_for) -> None:  # type: ignore[no-untyped-def]
    examples = [
        {"input": "cat dog cow", "output": "animals"},
        {"input": "red blue green", "output": "colours"},
        {"input": "horse sheep goat", "output": "animals"},
        {"input": "pink grey white", "output": "colours"},
    ]
    task = {"task_id": "words", "description": "Animals or colours?", "examples": examples, "refine_steps": 4}
    prompt = {"model": "words", "prompt": "Input: lion tiger\nOutput:", "max_tokens": 3, "temperature": 0}
    with serve(settings_for(self_check_margin=100.0)) as service, service.client() as client:
        assert client.post("/v1/tasks", json=task).status_code == 201
        deadline = time.monotonic() + 180
        while (refinement := client.get("/v1/tasks/words").json()["refinement"])["status"] not in {"done", "failed"}:
            assert time.monotonic() < deadline, refinement
            time.sleep(0.2)
        assert refinement["status"] == "done", refinement
        refined_id = refinement["adapter_id"]
        before = client.post("/v1/completions", json=prompt).json()
        assert before["icm_lora"]["adapter_id"] == refined_id and before["icm_lora"]["refined"] is True
        digest = client.get(f"/v1/adapters/{refined_id}").json()["tensors_sha256"]
        listed = {a["adapter_id"]: a for a in _all_adapters(client, limit=10)[0]}
        assert listed[refined_id]["kind"] == "refined" and listed[refined_id]["refine_steps"] == 4

        assert client.delete(f"/v1/adapters/{refined_id}").status_code == 200
        assert client.get(f"/v1/adapters/{refined_id}").status_code == 404
        after = client.post("/v1/completions", json=prompt)  # trains it again from the task's own refinement
        assert after.status_code == 200, after.text
        assert after.json()["icm_lora"] == before["icm_lora"] and after.json()["choices"] == before["choices"]
        assert client.get(f"/v1/adapters/{refined_id}").json()["tensors_sha256"] == digest


def test_replacing_a_tasks_spec_is_explicit_and_changes_the_adapter(settings_for) -> None:  # type: ignore[no-untyped-def]
    other_spec = {"description": "Decide whether the listed words are colours or tools.", "examples": []}
    with serve(settings_for()) as service, service.client() as client:
        first = client.post("/v1/tasks", json={"task_id": "fruit", **SPEC}).json()
        client.patch("/v1/tasks/fruit", json={"metadata": {"owner": "ml"}, "defaults": {"max_tokens": 2}})
        conflict = client.post("/v1/tasks", json={"task_id": "fruit", **other_spec})
        assert conflict.status_code == 409 and '"replace": true' in conflict.json()["error"]["message"]
        assert client.post("/v1/tasks", json={"task_id": "fruit", **other_spec, "replace": "yes"}).status_code == 422

        replaced = client.post("/v1/tasks", json={"task_id": "fruit", **other_spec, "replace": True})
        assert replaced.status_code == 201, replaced.text
        body = replaced.json()
        assert body["adapter_id"] != first["adapter_id"] and body["description"] == other_spec["description"]
        assert body["metadata"] == {"owner": "ml"} and body["defaults"] == {"max_tokens": 2}  # kept
        assert body["created_at"] > first["created_at"]  # a new registration
        again = client.post("/v1/tasks", json={"task_id": "fruit", **other_spec, "replace": True})
        assert again.status_code == 200 and again.json()["adapter_id"] == body["adapter_id"]  # a repeat changes nothing

        answer = client.post("/v1/completions", json={"model": "fruit", "prompt": "Input: hammer\nOutput:"}).json()
        assert answer["icm_lora"]["adapter_id"] == body["adapter_id"] and answer["usage"]["completion_tokens"] <= 2
        # the old adapter left the caches but its id still resolves (regenerated from its stored spec)
        old = client.get(f"/v1/adapters/{first['adapter_id']}").json()
        assert old["cached"] is False and old["sha256"] == first["adapter"]["sha256"]
