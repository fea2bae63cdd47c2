"""Start-up over real HTTP: the port opens at once and says "loading" until the model and generator are ready; the
first run's model conversion is one log line with its duration, without progress bars; `icm-lora generate` uses the
packaged generator by default."""

from __future__ import annotations

import contextlib
import gc
import json
import re
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
import uvicorn
from fastapi import FastAPI
from typer.testing import CliRunner

from generator.adapter import ADAPTER_WEIGHTS, GeneratedAdapter
from generator.checkpoint import load_checkpoint
from generator.defaults import packaged_generator
from icm_lora.cli import app
from service.boot import DeferredApp
from tests.servers import BackgroundServer, ServiceProcess, free_port


def _until(condition, timeout_s: float, what: str):  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            value = condition()
        except httpx.HTTPError:
            value = None
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.slow
def test_port_opens_at_once_and_the_first_conversion_is_one_log_line(tmp_path: Path) -> None:
    """The packaged SmolLM2-135M and its generator, into an empty data dir: the first start converts the model."""
    service = ServiceProcess({"ICM_LORA_DATA_DIR": str(tmp_path / "data")}, tmp_path / "service.log")
    launched = time.monotonic()
    service.launch()
    try:
        with httpx.Client(base_url=service.url, timeout=5) as client:
            _until(lambda: client.get("/healthz").status_code == 200, 60, "the port to open")
            port_open_s = time.monotonic() - launched
            loading = client.get("/readyz")
            assert loading.status_code == 503, loading.text
            assert loading.json()["status"] == "loading" and loading.json()["checks"]["loading_s"] >= 0
            refused = client.get("/v1/tasks")
            assert refused.status_code == 503 and refused.json()["error"]["type"] == "loading"
            assert int(refused.headers["retry-after"]) >= 1
            assert client.post("/v1/adapters", json={"description": "x"}).status_code == 503
            assert client.get("/metrics").status_code in (200, 503)  # 503 until torch and the service are imported

            _until(lambda: client.get("/readyz").status_code == 200, 600, "the service to be ready")
            ready_s = time.monotonic() - launched
            assert client.get("/readyz").json()["status"] == "ok"
            assert client.get("/v1/tasks").status_code == 200
    finally:
        service.stop()
    assert port_open_s < ready_s - 5, (port_open_s, ready_s)  # the conversion alone takes longer than that
    log = service.log()
    converted = [line for line in log.splitlines() if "converted the packaged smollm2-135m" in line]
    assert len(converted) == 1 and re.search(r" in \d+\.\d s", converted[0]), log[-3000:]
    assert "de-quantizing" not in log and "%|" not in log and "\r" not in log, log[-3000:]  # no progress bars
    assert (tmp_path / "data" / "models").is_dir()


def test_loading_failure_is_reported_not_hidden(settings_for, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """A generator folder that cannot be read: the port stays open and says why, liveness included."""
    broken = tmp_path / "not-a-generator"
    broken.mkdir()
    with pytest.raises(RuntimeError, match="failed to start"):
        BackgroundServer(settings_for(generator_path=broken)).start()
    service = BackgroundServer(settings_for(generator_path=broken)).start(wait_ready=False)
    try:
        with service.client() as client:
            _until(lambda: client.get("/readyz").json()["status"] != "loading", 60, "loading to end")
            ready = client.get("/readyz")
            assert ready.status_code == 503 and ready.json()["status"] == "failed"
            assert "generator" in ready.json()["checks"]["error"], ready.json()
            health = client.get("/healthz")
            assert health.status_code == 503 and health.json()["status"] == "failed"
            refused = client.get("/v1/tasks")
            assert refused.status_code == 503 and "failed to start" in refused.json()["error"]["message"]
    finally:
        service.stop()


@pytest.mark.slow
def test_generate_uses_the_packaged_generator_by_default(tmp_path: Path) -> None:
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"description": "Classify the sentiment of a hotel review as positive or negative."}))
    out = tmp_path / "adapter"
    result = CliRunner().invoke(app, ["generate", "--task", str(task), "--out", str(out), "--no-self-check"])
    assert result.exit_code == 0, result.output
    written = GeneratedAdapter.from_safetensors_bytes((out / ADAPTER_WEIGHTS).read_bytes())
    packaged = packaged_generator("smollm2-135m")
    assert packaged is not None
    assert written.metadata["generator_id"] == load_checkpoint(packaged).generator_id
    missing = CliRunner().invoke(app, ["generate", "--task", str(task), "--out", str(out), "--base-model", "tiny"])
    assert missing.exit_code == 2 and "give --generator" in missing.output


def _run(app: object) -> tuple[uvicorn.Server, threading.Thread, str]:
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))  # type: ignore[arg-type]
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    _until(lambda: server.started, 30, "uvicorn")
    return server, thread, f"http://127.0.0.1:{port}"


def test_deferred_app_answers_while_the_application_is_imported() -> None:
    """``icm-lora serve`` runs uvicorn on DeferredApp: the port answers before the application (and torch) is built."""
    release = threading.Event()
    events: list[str] = []

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        events.append("started")
        yield
        events.append("stopped")

    def build() -> FastAPI:
        assert release.wait(30)
        app = FastAPI(lifespan=lifespan)
        app.get("/v1/ping")(lambda: {"pong": True})
        return app

    server, thread, url = _run(DeferredApp(build))
    with httpx.Client(base_url=url, timeout=5) as client:
        assert client.get("/healthz").json() == {"status": "ok", "checks": {}}
        loading = client.get("/readyz")
        assert loading.status_code == 503 and loading.json()["status"] == "loading"
        waiting = client.get("/v1/ping")
        assert waiting.status_code == 503 and waiting.headers["retry-after"] == "5"
        assert waiting.json()["error"]["type"] == "loading"
        release.set()
        _until(lambda: client.get("/v1/ping").status_code == 200, 30, "the application")
        assert client.get("/v1/ping").json() == {"pong": True} and events == ["started"]
    server.should_exit = True
    thread.join(30)
    assert events == ["started", "stopped"]  # the application's own lifespan ran inside the shim's

    def broken() -> FastAPI:
        raise ImportError("no module named 'torch'")

    server, thread, url = _run(DeferredApp(broken))
    with httpx.Client(base_url=url, timeout=5) as client:
        _until(lambda: client.get("/healthz").status_code == 503, 30, "the failure")
        assert client.get("/healthz").json()["status"] == "failed"
        assert "no module named 'torch'" in client.get("/readyz").json()["checks"]["error"]
        assert "failed to start" in client.get("/v1/tasks").json()["error"]["message"]
    server.should_exit = True
    thread.join(30)


def test_the_start_up_heap_is_frozen_while_serving(settings_for) -> None:  # type: ignore[no-untyped-def]
    """What start-up loaded is frozen (``gc.freeze``: full collections skip it, so none stalls the engine thread on
    the model's objects) from the moment the service is ready, and unfrozen when it stops."""
    gc.unfreeze()
    server = BackgroundServer(settings_for()).start()
    try:
        assert gc.get_freeze_count() > 10_000  # the tiny model, tokenizer, generator and service
        with server.client() as client:
            assert client.get("/readyz").status_code == 200
    finally:
        server.stop()
    assert gc.get_freeze_count() == 0
