"""GET /healthz (liveness), GET /readyz (readiness), GET /metrics (Prometheus text). No auth: probes and scrapers."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST

from service.schemas import Health
from service.state import ServiceState, get_state

router = APIRouter(tags=["health"])


@router.get("/healthz", response_model=Health, summary="Liveness: the process answers")
async def healthz() -> Health:
    return Health(status="ok")


@router.get("/readyz", response_model=Health, responses={503: {"model": Health}}, summary="Readiness")
async def readyz(state: Annotated[ServiceState, Depends(get_state)]) -> JSONResponse:
    """Ready when the model and generator are loaded. Redis down is ``degraded`` (still serving from memory),
    unless Redis holds the task registry: then the service is not ready."""
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
async def metrics(state: Annotated[ServiceState, Depends(get_state)]) -> Response:
    return Response(state.metrics.render(), media_type=CONTENT_TYPE_LATEST)
