"""The test and benchmark harness's service process: what it inherits from the caller's environment."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.servers import ServiceProcess


def test_a_service_process_inherits_the_environment_but_what_it_is_told_to_unset(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("ICM_LORA_REDIS_URL", "redis://127.0.0.1:1/0")
    monkeypatch.setenv("ICM_LORA_GENERATOR_PATH", "/nowhere/generator.safetensors")
    process = ServiceProcess(
        {"ICM_LORA_DATA_DIR": str(tmp_path)}, tmp_path / "service.log", unset=["ICM_LORA_REDIS_URL"]
    )
    assert "ICM_LORA_REDIS_URL" not in process.env
    assert process.env["ICM_LORA_GENERATOR_PATH"] == "/nowhere/generator.safetensors"
    assert process.env["ICM_LORA_DATA_DIR"] == str(tmp_path)
    assert process.env["HF_HUB_OFFLINE"] == "1"
