"""POST /v1/resolve: many names (task ids or adapter ids) to the adapters they are served with, in a fixed number of
store round trips (tasks, then adapter specs, then Redis copies of ids without a spec) and without generating
anything. The vLLM plugin resolves and re-checks the names it serves this way: one request per re-check period,
whatever their number."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends

from service.api.negotiation import JSON, Accepts
from service.schemas import Resolution, ResolveRequest, ResolveResponse
from service.state import ServiceState, get_state
from service.task_store import TaskRecord

router = APIRouter(prefix="/v1", tags=["tasks"], dependencies=[Depends(Accepts(JSON))])


def _served_adapter(record: TaskRecord, state: ServiceState) -> str | None:
    """A task's refined adapter once its refinement is done, else its generated one (None without a generator)."""
    if record.refinement.status == "done" and record.refinement.adapter_id:
        return record.refinement.adapter_id
    return state.adapters.adapter_id(record.spec, record.seed) if state.adapters.generator else None


@router.post(
    "/resolve",
    response_model=ResolveResponse,
    summary="Task ids or adapter ids to the adapters they are served with (no generation)",
)
async def resolve(body: ResolveRequest, state: Annotated[ServiceState, Depends(get_state)]) -> ResolveResponse:
    """A name is a registered task first, else an adapter id that ``GET /v1/adapters/{id}`` would serve (a cache tier
    holds it, or its spec is this generator version's); anything else resolves to nulls."""
    tasks = await state.store.get_many(body.names)
    known = await state.adapters.known([n for n in body.names if n not in tasks])
    data = []
    for name in body.names:
        record = tasks.get(name)
        if record is not None:
            data.append(Resolution(name=name, task_id=record.task_id, adapter_id=_served_adapter(record, state)))
        else:
            data.append(Resolution(name=name, adapter_id=name if name in known else None))
    return ResolveResponse(data=data)
