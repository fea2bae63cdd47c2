from __future__ import annotations

import json
import time

import httpx
import openai
import torch
from peft import PeftModel

from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from tests.service.conftest import RunningService, metric_value, serve

TASK = {
    "task_id": "fruit-or-animal",
    "description": "Decide whether the listed words are fruits or animals.",
    "examples": [{"input": "kiwi pear lime", "output": "yes"}, {"input": "wolf goat otter", "output": "no"}],
}
PROMPT = "Input: mango plum kiwi\nOutput:"


def _reference_tokens(adapter: GeneratedAdapter | None, ids: list[int], max_new: int, tmp_path) -> list[int]:  # type: ignore[no-untyped-def]
    """Greedy tokens from plain transformers / peft: the ground truth for the service."""
    model = load_base_model("tiny").model
    if adapter is not None:
        adapter.save_peft(tmp_path / adapter.adapter_id)
        model = PeftModel.from_pretrained(model, str(tmp_path / adapter.adapter_id))
    with torch.no_grad():
        out = model.generate(
            input_ids=torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, pad_token_id=0, eos_token_id=2
        )
    return out[0, len(ids) :].tolist()


def _engine(service: RunningService):  # type: ignore[no-untyped-def]
    return service.server.config.app.state.icm.engine  # type: ignore[attr-defined]


def test_completions_match_plain_peft(settings_for, tmp_path) -> None:  # type: ignore[no-untyped-def]
    # policy keep: the tiny generator's adapter may fail its self-check, and this test is about serving adapters
    with serve(settings_for(self_check="keep")) as service, service.client() as client:
        task = client.post("/v1/tasks", json=TASK).json()
        weights = client.get(f"/v1/adapters/{task['adapter_id']}/weights", params={"format": "safetensors"}).content
        adapter = GeneratedAdapter.from_safetensors_bytes(weights)
        tokenizer = load_base_model("tiny").tokenizer
        ids = [tokenizer.bos_token_id, *tokenizer(PROMPT, add_special_tokens=False)["input_ids"]]
        for model, used in ((task["task_id"], adapter), ("tiny", None)):
            response = client.post(
                "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
            )
            assert response.status_code == 200, response.text
            body = response.json()
            expected = _reference_tokens(used, ids, 12, tmp_path)
            assert body["choices"][0]["text"] == tokenizer.decode(expected, skip_special_tokens=True)
            assert body["usage"]["prompt_tokens"] == len(ids)
            assert body["usage"]["completion_tokens"] == len(expected)
            assert body["object"] == "text_completion" and body["model"] == model
            assert (body["icm_lora"] or {}).get("served", "base") == ("adapter" if used else "base")
        with_adapter = client.post(
            "/v1/completions", json={"model": task["task_id"], "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        ).json()
        without = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": PROMPT, "max_tokens": 12, "temperature": 0}
        ).json()
        assert with_adapter["choices"][0]["text"] != without["choices"][0]["text"], "the adapter must matter"
        metrics = client.get("/metrics").text
        assert task["adapter_id"] in _engine(service).resident_adapters()
        assert client.delete(f"/v1/tasks/{task['task_id']}").status_code == 200
        assert task["adapter_id"] not in _engine(service).resident_adapters()  # deleting frees the slot
        assert client.post("/v1/completions", json={"model": task["task_id"], "prompt": "x"}).status_code == 404
    assert metric_value(metrics, "icm_lora_adapter_swaps_total") >= 1
    assert metric_value(metrics, "icm_lora_tokens_generated_total") >= 24
    assert metric_value(metrics, "icm_lora_time_to_first_token_seconds_count") >= 2


def test_official_openai_client_completions_and_streamed_chat(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(api_keys="sk-test")) as service:
        with service.client(headers={"Authorization": "Bearer sk-test"}) as client:
            assert client.post("/v1/tasks", json=TASK).status_code == 201
        oai = openai.OpenAI(base_url=f"{service.url}/v1", api_key="sk-test", max_retries=0)
        completion = oai.completions.create(model=TASK["task_id"], prompt=PROMPT, max_tokens=8, temperature=0)
        assert completion.choices[0].text and completion.usage is not None
        messages = [{"role": "user", "content": "mango plum kiwi"}]
        full = oai.chat.completions.create(model=TASK["task_id"], messages=messages, max_tokens=10, temperature=0)
        stream = oai.chat.completions.create(
            model=TASK["task_id"], messages=messages, max_tokens=10, temperature=0, stream=True
        )
        chunks = list(stream)
        assert chunks[0].choices[0].delta.role == "assistant"
        assert "".join(c.choices[0].delta.content or "" for c in chunks) == full.choices[0].message.content
        assert chunks[-1].choices[0].finish_reason in {"stop", "length"}
        listed = [m.id for m in oai.models.list()]
        assert listed == ["tiny", TASK["task_id"]]
        try:
            oai.completions.create(model="no-such-task", prompt="x", max_tokens=2)
            raise AssertionError("expected a 404")
        except openai.NotFoundError as exc:
            assert exc.status_code == 404
        bad = openai.OpenAI(base_url=f"{service.url}/v1", api_key="wrong", max_retries=0)
        try:
            bad.models.list()
            raise AssertionError("expected a 403")
        except openai.PermissionDeniedError:
            pass


def test_streamed_completion_chunks_and_disconnect(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        body = {"model": "tiny", "prompt": PROMPT, "max_tokens": 10, "temperature": 0}
        plain = client.post("/v1/completions", json=body).json()["choices"][0]["text"]
        with client.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
            assert response.headers["content-type"].startswith("text/event-stream")
            events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        assert "".join(c["choices"][0]["text"] for c in chunks) == plain
        assert chunks[-1]["choices"][0]["finish_reason"] in {"stop", "length"}

        # a client that leaves mid-stream frees its request in the engine
        long_body = {
            "model": "tiny",
            "prompt": PROMPT,
            "max_tokens": 400,
            "temperature": 0.8,
            "seed": 1,
            "stream": True,
        }
        with (
            httpx.Client(base_url=service.url, timeout=30) as other,
            other.stream("POST", "/v1/completions", json=long_body) as r,
        ):
            next(r.iter_lines())
        engine = _engine(service)
        deadline = time.monotonic() + 20
        while engine.stats(sync=True).running and time.monotonic() < deadline:
            time.sleep(0.05)
        stats = engine.stats(sync=True)
        assert stats.running == 0 and stats.slots_pinned == 0


def test_inference_bad_inputs(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(max_tokens=32, max_prompt_tokens=50)) as service, service.client() as client:
        cases = [
            ({"model": "nope", "prompt": "x"}, 404, "model_not_found"),
            ({"model": "tiny", "prompt": "x", "max_tokens": 33}, 422, "invalid_request"),
            ({"model": "tiny", "prompt": "word " * 200}, 400, "bad_request"),
            ({"model": "tiny", "prompt": "x", "temperature": 3}, 422, "invalid_request"),
            ({"model": "tiny", "prompt": "x", "top_p": 0}, 422, "invalid_request"),
            ({"model": "tiny", "prompt": "x", "n": 9}, 422, "invalid_request"),
            ({"model": "tiny", "prompt": "x", "stop": [""]}, 422, "invalid_request"),
            ({"model": "tiny"}, 422, "invalid_request"),
        ]
        for body, status, error_type in cases:
            response = client.post("/v1/completions", json=body)
            assert response.status_code == status, (body, response.text)
            assert response.json()["error"]["type"] == error_type
        chat = client.post("/v1/chat/completions", json={"model": "tiny", "messages": []})
        assert chat.status_code == 422
        role = client.post(
            "/v1/chat/completions", json={"model": "tiny", "messages": [{"role": "robot", "content": "x"}]}
        )
        assert role.status_code == 422
        special = client.post(
            "/v1/completions", json={"model": "tiny", "prompt": "</s><s><|assistant|> hi", "max_tokens": 4}
        )
        assert special.status_code == 200  # special-token text is just text: tokenised, never a crash
