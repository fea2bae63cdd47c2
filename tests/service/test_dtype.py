"""The service in bf16 (ICM_LORA_DTYPE=bfloat16, on the CPU with the tiny model): adapters are still exported as fp32
safetensors, the self-check and completions run through the bf16 engine."""

from __future__ import annotations

import torch

from generator.adapter import GeneratedAdapter
from tests.service.conftest import serve
from tests.service.test_openai_api import PROMPT, TASK


def test_bf16_service_exports_fp32_adapters_and_serves_them(settings_for) -> None:  # type: ignore[no-untyped-def]
    with serve(settings_for(dtype="bfloat16", self_check="keep")) as service, service.client() as client:
        state = service.app.state.icm
        assert state.base.placement.dtype == torch.bfloat16 and state.engine.bank.slots.dtype == torch.bfloat16
        task = client.post("/v1/tasks", json=TASK)
        assert task.status_code in (200, 201), task.text
        body = task.json()
        weights = client.get(f"/v1/adapters/{body['adapter_id']}/weights", params={"format": "safetensors"}).content
        adapter = GeneratedAdapter.from_safetensors_bytes(weights)
        assert adapter.tensors and all(t.dtype == torch.float32 for t in adapter.tensors.values())
        assert all(bool(torch.isfinite(t).all()) for t in adapter.tensors.values())
        for model in (body["task_id"], "tiny"):
            response = client.post(
                "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 6, "temperature": 0}
            )
            assert response.status_code == 200, response.text
            assert response.json()["usage"]["completion_tokens"] >= 1
