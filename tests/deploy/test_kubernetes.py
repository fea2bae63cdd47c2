"""docker/kubernetes/fleet.yaml: valid against Kubernetes' own schemas (strict: no unknown fields), and its parts
point at each other (service names and ports, the model folder vLLM serves, the settings icm-lora reads)."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from service.config import Settings
from tests.deploy.conftest import find_tool
from tests.deploy.helpers import ROOT

MANIFEST = ROOT / "docker" / "kubernetes" / "fleet.yaml"
INSTALL = "pip install kubernetes-validate==1.37.0"


def _resources() -> dict[tuple[str, str], dict[str, Any]]:
    return {(d["kind"], d["metadata"]["name"]): d for d in yaml.safe_load_all(MANIFEST.read_text()) if d}


def test_manifest_follows_the_kubernetes_schemas() -> None:
    tool = find_tool("kubernetes-validate")
    if tool is None:
        pytest.skip(f"kubernetes-validate not installed: {INSTALL}")
    result = subprocess.run([tool, "--strict", "--quiet", str(MANIFEST)], capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_manifest_parts_fit_together() -> None:
    resources = _resources()
    workloads = {name: d for (kind, name), d in resources.items() if kind in ("Deployment", "StatefulSet")}
    pods = {name: d["spec"]["template"]["spec"] for name, d in workloads.items()}
    services = {name: d for (kind, name), d in resources.items() if kind == "Service"}
    assert set(services) == set(workloads) == {"redis", "icm-lora", "vllm"}
    for name, service in services.items():
        assert service["spec"]["selector"] == workloads[name]["spec"]["selector"]["matchLabels"], name
        container_port = pods[name]["containers"][0]["ports"][0]["containerPort"]
        assert service["spec"]["ports"][0]["targetPort"] == container_port, name

    icm = pods["icm-lora"]["containers"][0]
    env = {e["name"]: e.get("value") for e in icm["env"]}
    assert set(env) <= {f"ICM_LORA_{n.upper()}" for n in Settings.model_fields}, "icm-lora reads every variable"
    assert env["ICM_LORA_REDIS_URL"] == "redis://redis:6379/0" and env["ICM_LORA_TASK_STORE"] == "redis"
    assert Settings(trusted_proxies=env["ICM_LORA_TRUSTED_PROXIES"]).trusted_proxies  # a valid network

    vllm_pod = pods["vllm"]
    vllm = vllm_pod["containers"][0]
    venv = {e["name"]: e.get("value") for e in vllm["env"]}
    assert venv["ICM_LORA_BASE_URL"] == "http://icm-lora:8000" and venv["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    args = vllm["args"]
    assert venv["ICM_LORA_VLLM_URL"].endswith(":" + args[args.index("--port") + 1])
    # the model folder: written by the init container with icm-lora's own function, read by vLLM
    init = vllm_pod["initContainers"][0]
    mount = next(m["mountPath"] for m in init["volumeMounts"] if m["name"] == "models")
    assert f"ensure_smollm2_folder(Path('{mount}'))" in init["command"][-1]
    assert args[args.index("--model") + 1] == f"{mount}/models/smollm2-135m-instruct"
    assert Path(args[args.index("--model") + 1]).parent.name == "models"  # generator.base_model: data_dir/models/...
