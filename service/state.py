"""What the lifespan builds and the routes use, kept on ``app.state.icm``."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from fastapi import Request

from generator.base_model import BaseModel
from service.adapters import AdapterService
from service.cache import AdapterCache, Invalidations, RedisTier
from service.config import Settings
from service.metrics import ServiceMetrics
from service.refinements import RefinementQueue
from service.task_store import TaskStore


@dataclass
class ServiceState:
    settings: Settings
    metrics: ServiceMetrics
    base: BaseModel
    store: TaskStore
    cache: AdapterCache
    adapters: AdapterService
    refinements: RefinementQueue
    redis_tier: RedisTier | None = None
    engine: Any = None
    started_at: float = 0.0
    invalidations: Invalidations | None = None  # with Redis: deletions reach every replica
    background: list[asyncio.Task[None]] = field(default_factory=list)


def get_state(request: Request) -> ServiceState:
    return request.app.state.icm
