"""The serving hot path over real HTTP: a completion for a registered task whose adapter is resident prepares nothing
and writes nothing to the task store (counted by the service's own metrics), and a download is built once."""

from __future__ import annotations

from generator.base_model import load_base_model
from tests.service.conftest import metric_value, serve

TASK = {
    "task_id": "hot",
    "description": "Say whether the words are animals or colours.",
    "examples": [{"input": "cat dog", "output": "animals"}, {"input": "red blue", "output": "colours"}],
}
PROMPT = {"model": "hot", "prompt": "Input: lion\nOutput:", "max_tokens": 4, "temperature": 0}


def _counts(client) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    text = client.get("/metrics").text
    return metric_value(text, "icm_lora_adapter_preparations_total"), metric_value(
        text, "icm_lora_adapter_spec_writes_total"
    )


def test_second_completion_prepares_nothing_and_writes_nothing(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(self_check="keep")) as service, service.client() as client:
        assert client.post("/v1/tasks", json=TASK).status_code == 201
        first = client.post("/v1/completions", json=PROMPT)
        assert first.status_code == 200, first.text
        prepared, written = _counts(client)
        assert prepared >= 1 and written >= 1  # the counters count: registration wrote the spec, serving prepared
        for _ in range(3):
            again = client.post("/v1/completions", json=PROMPT)
            assert again.status_code == 200, again.text
            assert again.json()["choices"][0]["text"] == first.json()["choices"][0]["text"]
        messages = [{"role": "user", "content": "hi"}]
        chat = client.post("/v1/chat/completions", json={"model": "hot", "messages": messages, "max_tokens": 4})
        assert chat.status_code == 200, chat.text
        assert _counts(client) == (prepared, written)


def test_deleted_adapter_of_a_task_is_served_again_and_its_spec_stored_again(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(self_check="keep")) as service, service.client() as client:
        adapter_id = client.post("/v1/tasks", json=TASK).json()["adapter_id"]
        assert client.post("/v1/completions", json=PROMPT).status_code == 200
        assert client.delete(f"/v1/adapters/{adapter_id}").status_code == 200
        assert client.get(f"/v1/adapters/{adapter_id}").status_code == 404
        assert client.post("/v1/completions", json=PROMPT).status_code == 200  # regenerated from the task's spec
        assert client.get(f"/v1/adapters/{adapter_id}").status_code == 200  # and its spec stored again


def test_a_download_is_built_once(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        meta = client.post("/v1/adapters", json={"description": "An ad-hoc adapter."}).json()
        url = f"/v1/adapters/{meta['adapter_id']}/weights"
        for fmt in ("zip", "safetensors"):
            first = client.get(url, params={"format": fmt})
            second = client.get(url, params={"format": fmt})
            assert first.status_code == second.status_code == 200
            assert first.content == second.content
            assert first.headers["etag"] == second.headers["etag"] == f'"{meta["sha256"][fmt]}"'
            builds = metric_value(client.get("/metrics").text, "icm_lora_adapter_download_builds_total", format=fmt)
            assert builds == 1
        etag = client.get(url).headers["etag"]  # zip, the default
        assert client.get(url, headers={"If-None-Match": etag}).status_code == 304


def test_a_task_second_chat_reads_the_template_opening_from_the_prefix_cache(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(self_check="keep")) as service, service.client() as client:
        assert client.post("/v1/tasks", json=TASK).status_code == 201
        answers = []
        for content in ("lion", "lion", "green"):
            body = {
                "model": "hot",
                "messages": [{"role": "user", "content": content}],
                "max_tokens": 4,
                "temperature": 0,
            }
            response = client.post("/v1/chat/completions", json=body)
            assert response.status_code == 200, response.text
            answers.append(response.json()["choices"][0]["message"]["content"])
        text = client.get("/metrics").text
        assert metric_value(text, "icm_lora_prefix_cache_total", result="miss") == 1
        assert metric_value(text, "icm_lora_prefix_cache_total", result="hit") == 2
        assert answers[0] == answers[1]  # the cached opening answers as the full read did


def test_generation_runs_on_packed_weights_unless_turned_off(settings_for) -> None:  # type: ignore[no-untyped-def]
    texts = []
    for packed in (True, False):
        with serve(settings_for(self_check="keep", packed_linears=packed)) as service, service.client() as client:
            size = metric_value(client.get("/metrics").text, "icm_lora_packed_weights_bytes")
            assert (size > 0) == packed, size
            task_id = f"hot-{int(packed)}"
            assert client.post("/v1/tasks", json={**TASK, "task_id": task_id}).status_code == 201
            reply = client.post("/v1/completions", json={**PROMPT, "model": task_id})
            assert reply.status_code == 200, reply.text
            texts.append(reply.json()["choices"][0]["text"])
    assert texts[0] == texts[1]  # greedy: packed weights round differently, not to another token here


def test_long_prompt_chunks_ride_in_decode_steps_unless_turned_off(settings_for) -> None:  # type: ignore[no-untyped-def]
    """A long prompt arriving while a stream decodes is read in chunks; with ``fused_passes`` (the default) in the
    stream's decode passes, else in passes of their own; the metric says which (chunks read after the stream ended go
    apart either way), and the answers agree."""
    eos = load_base_model("tiny").tokenizer.eos_token_id
    long_prompt = "Input: " + " ".join(["red green blue cat dog"] * 12) + "\nOutput:"
    texts = []
    for fused in (True, False):
        settings = settings_for(self_check="keep", prefill_chunk=8, fused_passes=fused)
        with serve(settings) as service, service.client() as client:
            task_id = f"long-{int(fused)}"  # the two services share a data dir
            assert client.post("/v1/tasks", json={**TASK, "task_id": task_id}).status_code == 201
            prompt = {**PROMPT, "model": task_id}
            body = {**prompt, "max_tokens": 400, "stream": True, "logit_bias": {str(eos): -100}}
            with client.stream("POST", "/v1/completions", json=body) as stream:
                lines = stream.iter_lines()
                assert next(line for line in lines if line.startswith("data:"))  # the stream decodes
                reply = client.post("/v1/completions", json={**prompt, "prompt": long_prompt, "max_tokens": 6})
                assert reply.status_code == 200, reply.text
                texts.append(reply.json()["choices"][0]["text"])
                for _ in lines:  # to its end
                    pass
            metrics = client.get("/metrics").text
            in_decode_passes = metric_value(metrics, "icm_lora_prefill_chunks_total", fused="true")
            apart = metric_value(metrics, "icm_lora_prefill_chunks_total", fused="false")
            assert (in_decode_passes > 0) == fused and (apart > 0 or fused), (in_decode_passes, apart)
    assert texts[0] == texts[1]
