"""POST /v1/adapters, GET /v1/adapters (the registry of specs), GET and DELETE /v1/adapters/{adapter_id},
GET /v1/adapters/{adapter_id}/weights (one strong ETag per format: the SHA-256 of its bytes)."""

from __future__ import annotations

import asyncio
import json
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from generator.adapter import GeneratedAdapter
from generator.refine import RefinePlan
from service.adapters import refine_plan, spec_from_request
from service.api.negotiation import JSON, SAFETENSORS, ZIP, Accepts, negotiate, not_modified
from service.cache import Tier
from service.errors import APIError
from service.refine import REFINE, REFINED_FROM
from service.refinements import RefineJob
from service.schemas import (
    AdapterDeleted,
    AdapterList,
    AdapterMetadata,
    AdapterRequest,
    AdapterSummary,
    FileDigests,
    SelfCheckOut,
)
from service.selfcheck import check_of
from service.state import ServiceState, get_state

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])
FORMATS = {"zip": ZIP, "safetensors": SAFETENSORS}


async def adapter_metadata(state: ServiceState, adapter: GeneratedAdapter, tier: Tier) -> AdapterMetadata:
    """The adapter's metadata. Its per-format SHA-256 are those of the download bodies (``service.downloads``: built
    once per adapter object, in a worker thread; the digests are remembered after the bodies are evicted)."""
    seed = adapter.metadata.get("seed", "")
    digests = await state.downloads.digests(adapter)
    check = check_of(adapter)
    refine = adapter.metadata.get(REFINE)
    return AdapterMetadata(
        adapter_id=adapter.adapter_id,
        generator_id=adapter.metadata.get("generator_id", ""),
        base_model=adapter.base_model,
        seed=int(seed) if seed else None,
        rank=adapter.lora.rank,
        alpha=adapter.lora.alpha,
        target_modules=list(adapter.lora.target_modules),
        num_parameters=adapter.num_parameters,
        sha256=FileDigests.model_validate(digests),
        tensors_sha256=adapter.sha256,
        cached=tier != "generated",
        weights_url=f"/v1/adapters/{adapter.adapter_id}/weights",
        self_check=SelfCheckOut.model_validate(check) if check else None,
        parent_adapter_id=adapter.metadata.get(REFINED_FROM) or None,
        refine_steps=RefinePlan.from_dict(json.loads(refine)).steps if refine else None,
    )


async def download(
    state: ServiceState,
    adapter: GeneratedAdapter,
    fmt: Literal["zip", "safetensors"] = "zip",
    request: Request | None = None,
) -> Response:
    """The PEFT folder as a zip, or the bare safetensors file, built once per adapter (``service.downloads``). Its
    strong ETag is the SHA-256 of its bytes (also ``sha256.<format>`` in the metadata); a GET's ``If-None-Match``
    with it (``request``) gets a 304 without a body."""
    body = await state.downloads.body(adapter, fmt)
    etag = f'"{body.sha256}"'
    headers = {"ETag": etag, "Cache-Control": "no-cache"}  # content-addressed, but a deleted id may come back
    if request is not None and not_modified(request, etag):
        return Response(status_code=304, headers=headers)
    headers["Content-Disposition"] = f'attachment; filename="{adapter.adapter_id}.{fmt}"'
    return Response(body.content, media_type=FORMATS[fmt], headers=headers)  # Content-Length: set from the bytes


@router.post(
    "",
    response_model=AdapterMetadata,
    responses={
        200: {"content": {ZIP: {}}, "description": "Metadata, or the PEFT folder as a zip (Accept: application/zip)"},
        406: {"description": "Accept takes neither JSON nor a zip"},
    },
    summary="Generate (or fetch from cache) the adapter for a task",
)
async def create_adapter(
    body: AdapterRequest,
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    media_type: Annotated[str, Depends(Accepts(JSON, ZIP))],
) -> Response:
    spec = spec_from_request(body, state.settings)
    if body.refine_steps and not spec.examples:
        raise APIError(422, "refine_steps needs examples: a refinement trains on the task's examples")
    adapter, tier = await state.adapters.get_or_generate(spec, body.seed)
    refined_id = None
    if body.refine_steps:  # trained in the background; GET /v1/adapters/{refined_id} also trains it on demand
        plan = refine_plan(state.settings, body.refine_steps)
        refined_id = await state.adapters.plan_refinement(adapter, spec, body.seed, plan)
        if not state.cache.in_memory(refined_id):
            if not state.refinements.reserve():
                raise APIError(429, "the refinement queue is full; retry shortly", "overloaded", {"Retry-After": "5"})
            state.refinements.submit(RefineJob(spec, body.seed, plan, refined_id))
    if media_type == ZIP:
        return await download(state, adapter)
    metadata = await adapter_metadata(state, adapter, tier)
    metadata.refined_adapter_id = refined_id
    return JSONResponse(metadata.model_dump())


@router.get(
    "",
    response_model=AdapterList,
    summary="List the adapters this service can serve (from their stored specs), in id order",
    dependencies=[Depends(Accepts(JSON))],
)
async def list_adapters(
    state: Annotated[ServiceState, Depends(get_state)],
    limit: Annotated[int, Query(ge=1, le=500)] = 50,
    cursor: Annotated[str | None, Query(max_length=128)] = None,
) -> AdapterList:
    rows = await state.store.list_adapter_specs(limit + 1, cursor)
    page = rows[:limit]
    return AdapterList(
        data=[
            AdapterSummary(
                adapter_id=adapter_id,
                kind="refined" if stored.refine else "generated",
                description=stored.spec.description,
                num_examples=len(stored.spec.examples),
                seed=stored.seed,
                parent_adapter_id=stored.refine.parent_id if stored.refine else None,
                refine_steps=stored.refine.plan.steps if stored.refine else None,
                url=f"/v1/adapters/{adapter_id}",
            )
            for adapter_id, stored in page
        ],
        next_cursor=page[-1][0] if len(rows) > limit else None,
    )


@router.get(
    "/{adapter_id}",
    response_model=AdapterMetadata,
    summary="Adapter metadata",
    dependencies=[Depends(Accepts(JSON))],
)
async def get_adapter(adapter_id: str, state: Annotated[ServiceState, Depends(get_state)]) -> AdapterMetadata:
    adapter, tier = await state.adapters.by_id(adapter_id)
    return await adapter_metadata(state, adapter, tier)


@router.delete(
    "/{adapter_id}",
    response_model=AdapterDeleted,
    summary="Delete an adapter: its cached weights (every tier) and its stored spec",
    dependencies=[Depends(Accepts(JSON))],
)
async def delete_adapter(adapter_id: str, state: Annotated[ServiceState, Depends(get_state)]) -> AdapterDeleted:
    """A task whose adapter this is keeps working: its next request regenerates the adapter (same id, same bytes)
    from the task's spec. An id with neither a spec nor a cached copy is a 404."""
    had_spec = await state.store.delete_adapter_spec(adapter_id)
    cached = await state.cache.drop(adapter_id)
    state.downloads.forget(adapter_id)
    if not (had_spec or cached):
        raise APIError(404, f"unknown adapter {adapter_id!r}")
    await asyncio.to_thread(state.engine.release_adapter, adapter_id)  # waits for the engine thread: off the loop
    if state.invalidations is not None:  # every other replica drops its memory copy and frees its slot
        await state.invalidations.publish([adapter_id])
    return AdapterDeleted(adapter_id=adapter_id)


@router.get(
    "/{adapter_id}/weights",
    responses={
        200: {"content": {ZIP: {}, SAFETENSORS: {}}},
        304: {"description": "If-None-Match names the current ETag"},
        406: {"description": "Accept does not take the format asked for"},
    },
    summary="The adapter's weights: PEFT zip (default) or the bare safetensors file",
)
async def get_weights(
    adapter_id: str,
    request: Request,
    state: Annotated[ServiceState, Depends(get_state)],
    format: Annotated[Literal["zip", "safetensors"], Query()] = "zip",
) -> Response:
    negotiate(request, [FORMATS[format]])
    adapter, _ = await state.adapters.by_id(adapter_id)
    return await download(state, adapter, format, request)
