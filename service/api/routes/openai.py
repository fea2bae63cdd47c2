"""OpenAI-compatible inference: POST /v1/completions, POST /v1/chat/completions, GET /v1/models.

``model`` is a task id (its generated adapter is used) or the base model's name (no adapter). ``stream: true``
answers with server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; a client that goes away
cancels its request in the engine.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import StreamingResponse

from service.api.negotiation import EVENT_STREAM, JSON, Accepts
from service.engine import EngineClosed, EngineError
from service.errors import APIError
from service.inference import (
    chat_prompt_ids,
    completion_prompt_ids,
    resolve_adapter,
    resolve_task,
    sampling_params,
    serving_headers,
    submit,
    with_task_defaults,
)
from service.schemas import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatMessage,
    CompletionChoice,
    CompletionRequest,
    CompletionResponse,
    ModelCard,
    ModelList,
    ServingInfo,
    Usage,
)
from service.state import ServiceState, get_state

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(Accepts(JSON, EVENT_STREAM))])
MAX_LISTED_TASKS = 1000


def _usage(result: Any) -> Usage:
    return Usage(
        prompt_tokens=result.prompt_tokens,
        completion_tokens=len(result.token_ids),
        total_tokens=result.prompt_tokens + len(result.token_ids),
    )


def _envelope(request_id: str, kind: str, created: int, model: str, choice: dict[str, Any]) -> dict[str, Any]:
    """One streamed chunk in OpenAI's format."""
    return {"id": request_id, "object": kind, "created": created, "model": model, "choices": [choice]}


def _sse(chunks: AsyncIterator[dict[str, Any]], info: ServingInfo | None) -> StreamingResponse:
    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks:
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", **serving_headers(info)}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


async def _stream_chunks(
    handle: Any, make_chunk: Callable[[str, str | None], dict[str, Any]], info: ServingInfo | None
) -> AsyncIterator[dict[str, Any]]:
    """The final chunk (the one with a finish reason) carries ``icm_lora`` for a task's request."""

    def final(chunk: dict[str, Any]) -> dict[str, Any]:
        return {**chunk, "icm_lora": info.model_dump()} if info is not None else chunk

    try:
        async for delta in handle:
            if delta.text or delta.finish_reason:
                chunk = make_chunk(delta.text, delta.finish_reason)
                yield final(chunk) if delta.finish_reason else chunk
    except EngineError:  # closed or failed mid-stream: the status line is sent, so say it in the last chunk
        yield final(make_chunk("", "error"))
    finally:
        handle.cancel()  # no-op when finished; frees the slot and KV cache when the client went away


@router.post("/completions", response_model=CompletionResponse, summary="Text completion with a task's adapter")
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    state: Annotated[ServiceState, Depends(get_state)],
) -> Any:
    record = await resolve_task(state, body.model)
    body = with_task_defaults(body, record)
    params = sampling_params(state, body)
    ids = completion_prompt_ids(state, body.prompt)
    adapter, info = await resolve_adapter(state, record)
    handle = submit(state, ids, adapter, params)
    request_id, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    if body.stream:

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
            return _envelope(request_id, "text_completion", created, body.model, choice)

        return _sse(_stream_chunks(handle, chunk, info), info)
    result = await _wait(handle, request)
    response.headers.update(serving_headers(info))
    return CompletionResponse(
        id=request_id,
        created=created,
        model=body.model,
        choices=[CompletionChoice(text=result.text, finish_reason=result.finish_reason)],
        usage=_usage(result),
        icm_lora=info,
    )


@router.post("/chat/completions", response_model=ChatCompletionResponse, summary="Chat completion (chat template)")
async def chat_completions(
    body: ChatCompletionRequest,
    request: Request,
    response: Response,
    state: Annotated[ServiceState, Depends(get_state)],
) -> Any:
    record = await resolve_task(state, body.model)
    body = with_task_defaults(body, record)
    params = sampling_params(state, body)
    ids = chat_prompt_ids(state, body.messages)
    adapter, info = await resolve_adapter(state, record)
    handle = submit(state, ids, adapter, params)
    request_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    if body.stream:
        first = True

        def chunk(text: str, finish: str | None) -> dict[str, Any]:
            nonlocal first
            delta: dict[str, Any] = {"content": text} if text else {}
            if first:
                delta = {"role": "assistant", **delta}
                first = False
            choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
            return _envelope(request_id, "chat.completion.chunk", created, body.model, choice)

        return _sse(_stream_chunks(handle, chunk, info), info)
    result = await _wait(handle, request)
    response.headers.update(serving_headers(info))
    return ChatCompletionResponse(
        id=request_id,
        created=created,
        model=body.model,
        choices=[
            ChatChoice(message=ChatMessage(role="assistant", content=result.text), finish_reason=result.finish_reason)
        ],
        usage=_usage(result),
        icm_lora=info,
    )


async def _wait(handle: Any, request: Request) -> Any:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handle))
    try:
        return await handle.wait()
    except EngineClosed:
        raise APIError(503, "the engine is shutting down", headers={"Retry-After": "1"}) from None
    finally:
        watcher.cancel()
        handle.cancel()  # when the awaiting request was cancelled (client gone), free the engine's resources


async def _cancel_on_disconnect(request: Request, handle: Any) -> None:
    """A non-streamed request is not cancelled by the server when its client goes away (a client timeout): watch for
    the disconnect (the body is read already, so the next message is ``http.disconnect``) and cancel it here."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    handle.cancel()


@router.get("/models", response_model=ModelList, summary="The base model and every registered task")
async def models(state: Annotated[ServiceState, Depends(get_state)]) -> ModelList:
    cards = [ModelCard(id=state.settings.model_name, created=int(state.started_at))]
    records = await state.store.list(MAX_LISTED_TASKS, None)
    cards += [ModelCard(id=r.task_id, created=int(r.created_at)) for r in records]
    return ModelList(data=cards)
