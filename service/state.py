"""What the lifespan builds and the routes use, kept on ``app.state.icm`` once loaded; ``app.state.startup`` says
how loading goes."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fastapi import Request

from generator.base_model import BaseModel
from service.adapters import AdapterService
from service.boot import LOADING_MESSAGE, RETRY_WHILE_LOADING_S
from service.cache import AdapterCache, Invalidations, RedisTier
from service.config import Settings
from service.downloads import DownloadCache
from service.errors import APIError
from service.metrics import ServiceMetrics
from service.refinements import RefinementQueue
from service.task_store import TaskStore

if TYPE_CHECKING:  # the engine imports torch; this module is imported before the port opens
    from service.engine import Engine


@dataclass
class ServiceState:
    settings: Settings
    metrics: ServiceMetrics
    base: BaseModel
    store: TaskStore
    cache: AdapterCache
    adapters: AdapterService
    refinements: RefinementQueue
    engine: Engine
    downloads: DownloadCache  # download bodies, built once per adapter
    redis_tier: RedisTier | None = None
    started_at: float = 0.0
    invalidations: Invalidations | None = None  # with Redis: deletions reach every replica
    background: list[asyncio.Task[None]] = field(default_factory=list)


@dataclass
class Startup:
    """Loading the model and generator in the background: ``loading`` until ``ready`` (or ``failed``, with why)."""

    status: Literal["loading", "ready", "failed"] = "loading"
    began: float = field(default_factory=time.monotonic)
    state: ServiceState | None = None
    error: str | None = None

    def ready(self, state: ServiceState) -> None:
        self.state, self.status = state, "ready"

    def fail(self, error: str) -> None:
        self.error, self.status = error, "failed"

    def details(self) -> dict[str, Any]:
        """For /healthz and /readyz while not ready."""
        details: dict[str, Any] = {"loading_s": round(time.monotonic() - self.began, 1)}
        if self.error is not None:
            details["error"] = self.error
        return details


def get_state(request: Request) -> ServiceState:
    """The loaded service; 503 with ``Retry-After`` while it loads (or when loading failed)."""
    startup: Startup = request.app.state.startup
    if startup.state is not None:
        return startup.state
    if startup.status == "failed":
        raise APIError(503, f"the service failed to start: {startup.error}", "unavailable")
    raise APIError(503, LOADING_MESSAGE, "loading", {"Retry-After": str(RETRY_WHILE_LOADING_S)})
