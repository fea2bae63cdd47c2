"""Run the service on a free loopback port: under uvicorn in a background thread, or as a separate process that can be
killed. For the tests and the benchmarks (``bench/``); not part of the installed service."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import uvicorn
from fastapi import FastAPI

from service.config import Settings
from service.main import create_app
from service.refine import Refiner
from service.state import Startup


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class BackgroundServer:
    """One service instance; ``start`` returns once the model and generator are loaded (``wait_ready=False``: once
    uvicorn accepts connections, which is at once: loading goes on in the background)."""

    def __init__(self, settings: Settings, port: int | None = None, refiner: Refiner | None = None) -> None:
        self.settings = settings
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.app: FastAPI = create_app(settings, refiner)
        config = uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            proxy_headers=bool(settings.trusted_proxies),
            forwarded_allow_ips=settings.trusted_proxies or None,
        )
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    def start(self, timeout_s: float = 300, wait_ready: bool = True) -> BackgroundServer:
        self.thread.start()
        deadline = time.monotonic() + timeout_s
        startup: Startup = self.app.state.startup
        while not self.server.started or (wait_ready and startup.status == "loading"):
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the service did not start")
            time.sleep(0.05)
        if wait_ready and startup.status == "failed":
            self.stop()
            raise RuntimeError(f"the service failed to start: {startup.error}")
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)

    def client(self, **kwargs: object) -> httpx.Client:
        return httpx.Client(base_url=self.url, timeout=60, **kwargs)  # type: ignore[arg-type]


@contextmanager
def serve(settings: Settings, refiner: Refiner | None = None) -> Iterator[BackgroundServer]:
    service = BackgroundServer(settings, refiner=refiner).start()
    try:
        yield service
    finally:
        service.stop()


class ServiceProcess:
    """``python -m icm_lora.cli serve`` as its own process on a free loopback port, configured by ``ICM_LORA_*``
    variables in ``env``; stdout and stderr (uvicorn's access log included) go to ``log_path``."""

    def __init__(self, env: dict[str, str], log_path: Path, unset: Iterable[str] = ()) -> None:
        """``unset``: variables of this process's environment the service must not inherit (a Redis URL or a
        generator path exported in the shell, where the caller wants the service's default)."""
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        skipped = set(unset)
        inherited = {name: value for name, value in os.environ.items() if name not in skipped}
        self.env = {**inherited, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", **env}
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 300) -> float:
        """Start and wait until ``/readyz`` answers 200; returns the seconds that took."""
        start = time.monotonic()
        proc = self.launch()
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"the service exited with {proc.returncode}:\n{self.log()[-3000:]}")
            try:
                ready = httpx.get(f"{self.url}/readyz", timeout=2)
                if ready.status_code == 200:
                    return time.monotonic() - start
                if ready.json().get("status") == "failed":
                    self.kill()
                    raise RuntimeError(f"the service failed to start: {ready.text}\n{self.log()[-3000:]}")
            except (httpx.HTTPError, ValueError):
                pass
            if time.monotonic() - start > timeout_s:
                self.kill()
                raise RuntimeError(f"the service was not ready in {timeout_s} s:\n{self.log()[-3000:]}")
            time.sleep(0.2)

    def launch(self) -> subprocess.Popen[bytes]:
        """Start the process and return at once (the port opens soon after; the model loads behind it)."""
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "icm_lora.cli", "serve", "--host", "127.0.0.1", "--port", str(self.port)],
                env=self.env,
                cwd=Path(__file__).resolve().parents[1],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        return self.proc

    def kill(self, sig: int = signal.SIGKILL) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(sig)
            self.proc.wait(timeout=30)
        self.proc = None

    def stop(self) -> None:
        """SIGTERM (uvicorn shuts down cleanly), SIGKILL when that takes over 30 s."""
        try:
            self.kill(signal.SIGTERM)
        except subprocess.TimeoutExpired:
            self.kill()

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
