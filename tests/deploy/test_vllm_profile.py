"""The compose profile `vllm`: vLLM with the icm-lora plugin beside icm-lora (config and image lint, not run)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.deploy.conftest import find_tool
from tests.deploy.helpers import ROOT
from tests.deploy.test_static import HADOLINT_INSTALL, _compose_config


def test_vllm_profile_serves_beside_icm_lora(tmp_path: Path) -> None:
    (tmp_path / "plain").mkdir()
    (tmp_path / "profile").mkdir()
    assert "vllm" not in _compose_config(tmp_path / "plain")["services"]  # only with --profile vllm
    config = _compose_config(tmp_path / "profile", "--profile", "vllm")
    vllm, icm = config["services"]["vllm"], config["services"]["icm-lora"]
    assert vllm["build"]["context"] == str(ROOT / "clients") and vllm["build"]["dockerfile"] == "vllm/Dockerfile"
    assert (ROOT / "clients" / "vllm" / "Dockerfile").is_file()
    # the model folder icm-lora writes into its data volume, mounted read-only
    data = next(v for v in vllm["volumes"] if v["target"] == "/data")
    assert data["source"] == icm["volumes"][0]["source"] and data["read_only"] is True
    assert icm["environment"]["ICM_LORA_DATA_DIR"] == "/data"
    command = vllm["command"]
    assert command[command.index("--model") + 1] == "/data/models/smollm2-135m-instruct"
    assert "--enable-lora" in command
    port = command[command.index("--port") + 1]
    assert vllm["environment"]["ICM_LORA_VLLM_URL"].endswith(f":{port}")
    assert any(str(p["target"]) == port for p in vllm["ports"])
    assert vllm["environment"]["ICM_LORA_BASE_URL"] == "http://icm-lora:8000"
    assert vllm["depends_on"]["icm-lora"]["condition"] == "service_healthy"


def test_vllm_dockerfile_lint() -> None:
    hadolint = find_tool("hadolint")
    if hadolint is None:
        pytest.skip(f"hadolint not installed: {HADOLINT_INSTALL}")
    dockerfile = ROOT / "clients" / "vllm" / "Dockerfile"
    result = subprocess.run([hadolint, "--no-color", str(dockerfile)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = dockerfile.read_text()
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING=True" in text and "vllm.entrypoints.openai.api_server" in text
