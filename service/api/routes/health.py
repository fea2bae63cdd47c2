"""GET /healthz (liveness), GET /readyz (readiness), GET /metrics (Prometheus text). No auth: probes and scrapers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.metrics import ServiceMetrics
from service.schemas import Health
from service.state import Startup

router = APIRouter(tags=["health"])


def _startup(request: Request) -> Startup:
    startup: Startup = request.app.state.startup
    return startup


@router.get(
    "/healthz", response_model=Health, responses={503: {"model": Health}}, summary="Liveness: the process answers"
)
async def healthz(startup: Annotated[Startup, Depends(_startup)]) -> JSONResponse:
    """200 from the moment the port opens, loading included; 503 ``failed`` when loading failed (restart it)."""
    if startup.status == "failed":
        return JSONResponse(Health(status="failed", checks=startup.details()).model_dump(), status_code=503)
    return JSONResponse(Health(status="ok").model_dump())


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}}, summary="Readiness")
async def readyz(startup: Annotated[Startup, Depends(_startup)]) -> JSONResponse:
    """Ready when the model and generator are loaded (503 ``loading`` until then, ``failed`` when loading failed).
    Redis down is ``degraded`` (still serving from memory), unless Redis holds the task registry: then the service is
    not ready."""
    state = startup.state
    if state is None:
        return JSONResponse(Health(status=startup.status, checks=startup.details()).model_dump(), status_code=503)
    checks: dict[str, object] = {"model": state.base.name, "generator": state.adapters.generator is not None}
    status, code = "ok", 200
    if state.adapters.generator is None:
        status, code = "no_generator", 503
    if state.redis_tier is not None:
        redis_up = await state.redis_tier.ping()
        checks["redis"] = "up" if redis_up else "down"
        if not redis_up:
            if state.settings.use_redis_tasks:
                status, code = "unavailable", 503
            elif code == 200:
                status = "degraded"
    return JSONResponse(Health(status=status, checks=checks).model_dump(), status_code=code)


@router.get("/metrics", summary="Prometheus metrics", response_class=Response)
async def metrics(request: Request) -> Response:
    service_metrics: ServiceMetrics = request.app.state.metrics  # there from the start, loading included
    return Response(service_metrics.render(), media_type=CONTENT_TYPE_LATEST)
