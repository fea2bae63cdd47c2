"""POST /v1/adapters, GET /v1/adapters/{adapter_id}, GET /v1/adapters/{adapter_id}/weights."""

from __future__ import annotations

import json
from typing import Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import JSONResponse, Response

from generator.adapter import GeneratedAdapter
from generator.refine import RefinePlan
from service.adapters import refine_plan, spec_from_request
from service.cache import Tier
from service.errors import APIError
from service.refine import REFINE, REFINED_FROM
from service.refinements import RefineJob
from service.schemas import AdapterMetadata, AdapterRequest, SelfCheckOut
from service.selfcheck import check_of
from service.state import ServiceState, get_state

router = APIRouter(prefix="/v1/adapters", tags=["adapters"])

ZIP = "application/zip"
SAFETENSORS = "application/octet-stream"


def adapter_metadata(adapter: GeneratedAdapter, tier: Tier) -> AdapterMetadata:
    seed = adapter.metadata.get("seed", "")
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
        sha256=adapter.sha256,
        cached=tier != "generated",
        weights_url=f"/v1/adapters/{adapter.adapter_id}/weights",
        self_check=SelfCheckOut.model_validate(check) if check else None,
        parent_adapter_id=adapter.metadata.get(REFINED_FROM) or None,
        refine_steps=RefinePlan.from_dict(json.loads(refine)).steps if refine else None,
    )


def download(adapter: GeneratedAdapter, as_zip: bool = True) -> Response:
    """The PEFT folder as a zip, or the bare safetensors file; the ETag is the tensors' checksum."""
    content, media_type, suffix = (
        (adapter.to_peft_zip(), ZIP, "zip") if as_zip else (adapter.to_safetensors_bytes(), SAFETENSORS, "safetensors")
    )
    headers = {
        "Content-Disposition": f'attachment; filename="{adapter.adapter_id}.{suffix}"',
        "ETag": f'"{adapter.sha256}"',
    }
    return Response(content, media_type=media_type, headers=headers)


@router.post(
    "",
    response_model=AdapterMetadata,
    responses={200: {"content": {ZIP: {}}, "description": "Metadata, or the PEFT folder as a zip"}},
    summary="Generate (or fetch from cache) the adapter for a task",
)
async def create_adapter(
    body: AdapterRequest, request: Request, state: Annotated[ServiceState, Depends(get_state)]
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
    if ZIP in request.headers.get("accept", ""):
        return download(adapter)
    metadata = adapter_metadata(adapter, tier)
    metadata.refined_adapter_id = refined_id
    return JSONResponse(metadata.model_dump())


@router.get("/{adapter_id}", response_model=AdapterMetadata, summary="Adapter metadata")
async def get_adapter(adapter_id: str, state: Annotated[ServiceState, Depends(get_state)]) -> AdapterMetadata:
    adapter, tier = await state.adapters.by_id(adapter_id)
    return adapter_metadata(adapter, tier)


@router.get(
    "/{adapter_id}/weights",
    responses={200: {"content": {ZIP: {}, SAFETENSORS: {}}}},
    summary="The adapter's weights: PEFT zip (default) or the bare safetensors file",
)
async def get_weights(
    adapter_id: str,
    state: Annotated[ServiceState, Depends(get_state)],
    format: Annotated[Literal["zip", "safetensors"], Query()] = "zip",
) -> Response:
    adapter, _ = await state.adapters.by_id(adapter_id)
    return download(adapter, as_zip=format == "zip")
