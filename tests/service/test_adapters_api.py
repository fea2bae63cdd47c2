from __future__ import annotations

import hashlib
import io
import json
import zipfile
from pathlib import Path

import torch
from peft import PeftModel

from generator.adapter import GeneratedAdapter
from generator.base_model import load_base_model
from generator.lora_model import LoraModel
from tests.service.conftest import metric_value, serve

SPEC = {
    "description": "Decide whether the listed words are fruits or animals.",
    "examples": [{"input": "kiwi pear lime", "output": "yes"}, {"input": "wolf goat otter", "output": "no"}],
}


def test_generate_fetch_and_download(settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        first = client.post("/v1/adapters", json=SPEC)
        assert first.status_code == 200, first.text
        meta = first.json()
        assert meta["cached"] is False and meta["rank"] == 4 and meta["num_parameters"] == 1792
        again = client.post("/v1/adapters", json=SPEC).json()
        assert (
            again["cached"] is True and again["adapter_id"] == meta["adapter_id"] and again["sha256"] == meta["sha256"]
        )
        seeded = client.post("/v1/adapters", json={**SPEC, "seed": 3}).json()
        assert seeded["adapter_id"] != meta["adapter_id"] and seeded["seed"] == 3

        assert client.get(f"/v1/adapters/{meta['adapter_id']}").json()["sha256"] == meta["sha256"]
        raw = client.get(f"/v1/adapters/{meta['adapter_id']}/weights", params={"format": "safetensors"})
        assert raw.headers["content-type"] == "application/octet-stream"
        adapter = GeneratedAdapter.from_safetensors_bytes(raw.content, expected_id=meta["adapter_id"])
        assert adapter.sha256 == meta["tensors_sha256"]
        assert hashlib.sha256(raw.content).hexdigest() == meta["sha256"]["safetensors"]

        zipped = client.post("/v1/adapters", json=SPEC, headers={"Accept": "application/zip"})
        assert zipped.headers["content-type"] == "application/zip"
        assert hashlib.sha256(zipped.content).hexdigest() == meta["sha256"]["zip"]
        assert zipped.content == client.get(f"/v1/adapters/{meta['adapter_id']}/weights").content
        metrics = client.get("/metrics").text
    with zipfile.ZipFile(io.BytesIO(zipped.content)) as archive:
        archive.extractall(tmp_path / "peft")
    assert json.loads((tmp_path / "peft" / "adapter_config.json").read_text())["r"] == 4

    # the downloaded folder loads with plain peft and equals the service's adapter
    plain = PeftModel.from_pretrained(load_base_model("tiny").model, str(tmp_path / "peft"))
    ours = LoraModel(load_base_model("tiny").model, adapter.lora)
    ours.load_tensors(adapter.tensors)
    ids = torch.tensor([[1, 20, 21, 22]])
    with torch.no_grad():
        assert torch.allclose(plain(ids).logits, ours.model(ids).logits, atol=1e-5)

    assert metric_value(metrics, "icm_lora_adapter_generation_seconds_count", stage="total") == 2
    assert metric_value(metrics, "icm_lora_adapter_cache_total", tier="memory", result="hit") >= 2
    assert metric_value(metrics, "icm_lora_requests_total", route="/v1/adapters/{adapter_id}", status="200") == 1


def test_concurrent_requests_generate_once(settings_for) -> None:  # type: ignore[no-untyped-def]
    import concurrent.futures

    with serve(settings_for()) as service:

        def post() -> str:
            with service.client() as client:
                return str(client.post("/v1/adapters", json={"description": "Colors or tools?"}).json()["sha256"])

        with concurrent.futures.ThreadPoolExecutor(6) as pool:
            hashes = list(pool.map(lambda _: post(), range(6)))
        with service.client() as client:
            metrics = client.get("/metrics").text
    assert len(set(hashes)) == 1
    assert metric_value(metrics, "icm_lora_adapter_generation_seconds_count", stage="total") == 1


def test_bad_inputs_are_4xx_with_the_error_body(settings_for) -> None:  # type: ignore[no-untyped-def]
    settings = settings_for(max_examples=3, max_body_bytes=4096, max_text_chars=200)
    with serve(settings) as service, service.client() as client:
        cases = [
            ({"description": ""}, 422, "description or at least one example"),
            ({"description": "x", "examples": [{"input": "a", "output": "b"}] * 4}, 422, "too many examples"),
            ({"description": "x" * 300}, 422, "limit is 200"),
            ({"description": "x", "seed": -1}, 422, "seed"),
            ({"description": "x", "examples": [{"input": "a"}]}, 422, "output"),
            ({"description": "x", "examples": [{"input": "a", "output": "b", "choices": ["c", "d"]}]}, 422, "choices"),
            ({"description": "x", "unknown": 1}, 422, "unknown"),
            ({"description": "x" * 5000}, 413, "larger than 4096"),
        ]
        for body, status, text in cases:
            response = client.post("/v1/adapters", json=body)
            assert response.status_code == status, (body, response.text)
            error = response.json()["error"]
            assert set(error) == {"type", "message"} and text in error["message"], (body, error)
        broken = client.post("/v1/adapters", content=b'{"description": ', headers={"Content-Type": "application/json"})
        assert broken.status_code == 400, broken.text
        assert broken.json()["error"]["message"].startswith("the request body is not valid JSON: ")
        not_utf8 = client.post(
            "/v1/adapters", content=b'{"description": "\xff"}', headers={"Content-Type": "application/json"}
        )
        assert not_utf8.status_code == 400 and "error" in not_utf8.json()
        assert client.get("/v1/adapters/" + "0" * 32).status_code == 404
        assert client.get("/v1/adapters/x/weights", params={"format": "pickle"}).status_code == 422
        assert client.get("/v1/nothing-here").json()["error"]["type"] == "not_found"


def test_no_generator_answers_503(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(generator_path=None)) as service, service.client() as client:
        response = client.post("/v1/adapters", json=SPEC)
        assert response.status_code == 503 and response.json()["error"]["type"] == "generator_unavailable"
        assert client.get("/readyz").status_code == 503
        assert client.get("/healthz").status_code == 200


def test_openapi_docs(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for()) as service, service.client() as client:
        assert client.get("/docs").status_code == 200
        schema = client.get("/openapi.json").json()
        assert {"/v1/adapters", "/v1/tasks/{task_id}", "/v1/chat/completions", "/v1/models"} <= set(schema["paths"])
        create = schema["paths"]["/v1/tasks"]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert create["$ref"].endswith("TaskCreate")
        assert schema["components"]["schemas"]["TaskCreate"]["examples"], "request examples are documented"
