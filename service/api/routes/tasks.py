"""The task registry: POST/GET /v1/tasks, GET/PATCH/DELETE /v1/tasks/{task_id}."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Query
from fastapi.responses import JSONResponse

from generator.refine import refined_adapter_id
from service.adapters import refine_plan, spec_from_request
from service.api.negotiation import JSON, Accepts
from service.api.routes.adapters import adapter_metadata
from service.errors import APIError
from service.refinements import RefineJob
from service.schemas import (
    MAX_METADATA_KEYS,
    TASK_ID_PATTERN,
    ExampleIn,
    RefinementOut,
    SelfCheckOut,
    TaskCreate,
    TaskList,
    TaskOut,
    TaskPatch,
)
from service.selfcheck import check_of, passed
from service.state import ServiceState, get_state
from service.task_store import CheckResult, Refinement, TaskRecord, new_record

router = APIRouter(prefix="/v1/tasks", tags=["tasks"], dependencies=[Depends(Accepts(JSON))])
TaskId = Annotated[str, Path(pattern=TASK_ID_PATTERN)]


def _check_out(check: CheckResult | None) -> SelfCheckOut | None:
    return SelfCheckOut.model_validate(check) if check else None


def task_out(record: TaskRecord, state: ServiceState) -> TaskOut:
    adapter_id = state.adapters.adapter_id(record.spec, record.seed) if state.adapters.generator else None
    return TaskOut(
        task_id=record.task_id,
        description=record.spec.description,
        examples=[ExampleIn(**e.to_dict()) for e in record.spec.examples],
        seed=record.seed,
        created_at=record.created_at,
        adapter_id=adapter_id,
        self_check=_check_out(record.self_check),
        refinement=RefinementOut(
            status=record.refinement.status,
            steps=record.refinement.steps,
            adapter_id=record.refinement.adapter_id,
            error=record.refinement.error,
            self_check=_check_out(record.refinement.self_check),
        ),
        metadata=record.metadata,
        defaults=record.defaults,
    )


def _may_refine(record: TaskRecord, state: ServiceState) -> bool:
    """No refinement yet, a failed one, or a queued/running one that no process here tracks (left by a restart)."""
    status = record.refinement.status
    return status in ("none", "failed") or (status != "done" and not state.refinements.tracks(record.task_id))


@router.post(
    "",
    response_model=TaskOut,
    status_code=201,
    responses={
        200: {"description": "Already registered with the same spec"},
        409: {"description": "Id taken, or the base model's served name (reserved)"},
    },
    summary="Register a task and generate its adapter (idempotent for the same id and spec)",
)
async def create_task(body: TaskCreate, state: Annotated[ServiceState, Depends(get_state)]) -> JSONResponse:
    reserved = state.settings.model_name
    if body.task_id is not None and body.task_id.casefold() == reserved.casefold():
        raise APIError(
            409,
            f"task id {body.task_id!r} is reserved: {reserved!r} is the base model's served name (model={reserved!r} "
            "means no adapter); choose another id",
            "reserved_name",
        )
    spec = spec_from_request(body, state.settings)
    task_id = body.task_id or "task-" + hashlib.sha256(f"{spec.canonical_json()}|{body.seed}".encode()).hexdigest()[:16]
    existing = await state.store.get(task_id)
    replaced = None
    if existing is not None and not existing.same_content(spec, body.seed):
        if not body.replace:
            raise APIError(
                409,
                f"task {task_id!r} exists with another spec; choose another id, delete it first, or send "
                '"replace": true to replace its spec (a new adapter id)',
            )
        replaced, existing = existing, None
    if body.refine_steps and not spec.examples:
        raise APIError(422, "refine_steps needs examples: a refinement trains on the task's examples")
    adapter, tier = await state.adapters.get_or_generate(spec, body.seed)
    check = check_of(adapter)
    steps = body.refine_steps
    if not steps and state.settings.self_check == "refine" and not passed(check):
        steps = state.settings.refine_default_steps
    plan = refine_plan(state.settings, steps) if steps else None
    if plan is not None and existing is not None and not _may_refine(existing, state):
        plan = None  # already refining or refined: a repeated POST changes nothing
    job = None
    if plan is not None:
        refined_id = refined_adapter_id(adapter.adapter_id, plan)
        await state.adapters.plan_refinement(adapter, spec, body.seed, plan)
        if not state.refinements.reserve():
            raise APIError(429, "the refinement queue is full; retry shortly", "overloaded", {"Retry-After": "5"})
        job = RefineJob(spec, body.seed, plan, refined_id)
    queued = Refinement("queued", plan.steps, job.adapter_id) if plan and job else None
    if replaced is not None:
        await _drop_adapters(state, await state.store.delete(task_id) or replaced)
    try:
        record, created = await state.store.create(new_record(task_id, spec, body.seed, check, queued))
        if not created and not record.same_content(spec, body.seed):  # registered by someone else meanwhile
            raise APIError(409, f"task {task_id!r} exists with another spec; delete it first or choose another id")
        if job is not None and queued is not None and (created or _may_refine(record, state)):
            if not created and not await state.store.update_refinement(record, queued):
                raise APIError(409, f"task {task_id!r} was deleted while it was registered; try again")
            record = record if created else await state.store.get(task_id) or record
            state.refinements.submit(RefineJob(spec, body.seed, job.plan, job.adapter_id, record))
            job = None
    finally:
        if job is not None:
            state.refinements.release()
    if replaced is not None and created and (replaced.metadata or replaced.defaults):
        record = await state.store.update_settings(task_id, replaced.metadata, replaced.defaults) or record
    # the specs behind the task's adapters stay while it is registered (a bounded store lets others expire)
    await state.store.pin_adapter_specs([i for i in (adapter.adapter_id, record.refinement.adapter_id) if i], True)
    out = task_out(record, state)
    out.adapter = await adapter_metadata(state, adapter, tier)
    return JSONResponse(out.model_dump(), status_code=201 if created else 200)


@router.get("", response_model=TaskList, summary="List registered tasks, in id order")
async def list_tasks(
    state: Annotated[ServiceState, Depends(get_state)],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> TaskList:
    records = await state.store.list(limit + 1, cursor)
    page = records[:limit]
    next_cursor = page[-1].task_id if len(records) > limit else None
    return TaskList(data=[task_out(r, state) for r in page], next_cursor=next_cursor)


@router.get("/{task_id}", response_model=TaskOut, summary="One task")
async def get_task(task_id: TaskId, state: Annotated[ServiceState, Depends(get_state)]) -> TaskOut:
    record = await state.store.get(task_id)
    if record is None:
        raise APIError(404, f"unknown task {task_id!r}")
    return task_out(record, state)


@router.patch(
    "/{task_id}",
    response_model=TaskOut,
    responses={422: {"description": "Invalid settings, or an attempt to change the spec (immutable)"}},
    summary="Update a task's metadata and default generation settings (JSON merge patch; the spec is immutable)",
)
async def patch_task(task_id: TaskId, patch: TaskPatch, state: Annotated[ServiceState, Depends(get_state)]) -> TaskOut:
    record = await state.store.get(task_id)
    if record is None:
        raise APIError(404, f"unknown task {task_id!r}")
    metadata = dict(record.metadata)
    for key, value in (patch.metadata or {}).items():
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
    if len(metadata) > MAX_METADATA_KEYS:
        raise APIError(422, f"a task has at most {MAX_METADATA_KEYS} metadata keys; this patch makes {len(metadata)}")
    defaults = dict(record.defaults)
    if patch.defaults is not None:
        for name in patch.defaults.model_fields_set:
            value = getattr(patch.defaults, name)
            if value is None:
                defaults.pop(name, None)
            else:
                defaults[name] = value
    limit = state.settings.max_tokens
    if defaults.get("max_tokens", 0) > limit:
        raise APIError(422, f"defaults.max_tokens {defaults['max_tokens']} is above this server's limit of {limit}")
    updated = await state.store.update_settings(task_id, metadata, defaults)
    if updated is None:
        raise APIError(404, f"unknown task {task_id!r}")
    return task_out(updated, state)


@router.delete("/{task_id}", response_model=TaskOut, summary="Delete a task; frees its slot and cache entries")
async def delete_task(task_id: TaskId, state: Annotated[ServiceState, Depends(get_state)]) -> TaskOut:
    record = await state.store.delete(task_id)
    if record is None:
        raise APIError(404, f"unknown task {task_id!r}")
    await _drop_adapters(state, record)
    return task_out(record, state)


async def _drop_adapters(state: ServiceState, record: TaskRecord) -> None:
    """A deleted (or replaced) task's adapters leave the cache tiers and the engine's slots, on every replica (the
    other replicas hear it through Redis). Their specs stay, unpinned: the ids can still be fetched and regenerated
    on demand until a bounded store lets them expire."""
    generated = state.adapters.adapter_id(record.spec, record.seed) if state.adapters.generator else None
    dropped = [i for i in (generated, record.refinement.adapter_id) if i is not None]
    for adapter_id in dropped:
        await state.cache.drop(adapter_id)
        await asyncio.to_thread(state.engine.release_adapter, adapter_id)  # waits for the engine thread
    await state.store.pin_adapter_specs(dropped, False)
    if state.invalidations is not None:  # every other replica drops its memory copies and frees its slots
        await state.invalidations.publish(dropped)
