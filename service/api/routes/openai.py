"""OpenAI-compatible inference: POST /v1/completions, POST /v1/chat/completions, GET /v1/models[/{id}].

``model`` is a task id (its generated adapter is used) or the base model's name (no adapter). ``stream: true``
answers with server-sent events in OpenAI's chunk format, ending with ``data: [DONE]``; a client that goes away
cancels its requests in the engine. Every choice (``n`` per prompt, for each prompt of a list) is one engine request;
they are queued together, all or none.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import secrets
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Path, Request, Response
from fastapi.responses import StreamingResponse

from service.api.negotiation import EVENT_STREAM, JSON, Accepts
from service.engine import EngineClosed, EngineError, GenerationResult, RequestHandle, StreamDelta
from service.engine.requests import FINISH_ERROR
from service.engine.sampling import TokenLogprob
from service.errors import APIError
from service.inference import (
    chat_logprobs,
    chat_prompt_ids,
    choice_params,
    completion_logprobs,
    completion_prompt_ids,
    prompt_logprobs,
    resolve_adapter,
    resolve_task,
    sampling_params,
    serving_headers,
    submit,
    with_task_defaults,
)
from service.schemas import (
    TASK_ID_PATTERN,
    AssistantMessage,
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    CompletionChoice,
    CompletionLogprobs,
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
TASK_ID = re.compile(TASK_ID_PATTERN)

ChunkMaker = Callable[[int, StreamDelta], dict[str, Any] | None]


def _usage(prompt_tokens: int, completion_tokens: int) -> Usage:
    return Usage(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


@dataclass(frozen=True)
class _Stream:
    request_id: str
    kind: str
    created: int
    model: str

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
        """One streamed chunk in OpenAI's format."""
        return {
            "id": self.request_id,
            "object": self.kind,
            "created": self.created,
            "model": self.model,
            "choices": choices,
            **extra,
        }


async def _deltas(handles: Sequence[RequestHandle]) -> AsyncGenerator[tuple[int, StreamDelta], None]:
    """Every choice's deltas, tagged with its index, as they come. A choice whose request fails mid-stream (the status
    line is sent) ends with finish_reason "error". Leaving early cancels every request."""
    queue: asyncio.Queue[tuple[int, StreamDelta | None]] = asyncio.Queue()

    async def pump(index: int, handle: RequestHandle) -> None:
        try:
            async for delta in handle:
                queue.put_nowait((index, delta))
        except EngineError:
            queue.put_nowait((index, StreamDelta("", (), FINISH_ERROR)))
        finally:
            queue.put_nowait((index, None))

    pumps = [asyncio.create_task(pump(i, h)) for i, h in enumerate(handles)]
    try:
        running = len(handles)
        while running:
            index, delta = await queue.get()
            if delta is None:
                running -= 1
            else:
                yield index, delta
    finally:
        for task in pumps:
            task.cancel()
        for handle in handles:
            handle.cancel()  # no-op when finished; frees the slot and KV cache when the client went away


def _sse(
    stream: _Stream,
    handles: Sequence[RequestHandle],
    make_choice: ChunkMaker,
    info: ServingInfo | None,
    leading: Sequence[dict[str, Any]] = (),
    usage_prompt_tokens: int | None = None,
) -> StreamingResponse:
    """``leading``: choices sent before any generated token (echo). A chunk with a finish reason carries
    ``icm_lora`` for a task's request; ``usage_prompt_tokens`` set (stream_options.include_usage): one more chunk
    before [DONE] with no choices and the request's usage."""

    async def chunks() -> AsyncIterator[dict[str, Any]]:
        for first in leading:
            yield stream.chunk([first])
        generated = 0
        async with contextlib.aclosing(_deltas(handles)) as deltas:  # closed at once when the client goes away
            async for index, delta in deltas:
                generated += len(delta.token_ids)
                choice = make_choice(index, delta)
                if choice is None:
                    continue
                extra = {"icm_lora": info.model_dump()} if info is not None and delta.finish_reason else {}
                yield stream.chunk([choice], **extra)
        if usage_prompt_tokens is not None:
            yield stream.chunk([], usage=_usage(usage_prompt_tokens, generated).model_dump())

    async def body() -> AsyncIterator[bytes]:
        async for chunk in chunks():
            yield f"data: {json.dumps(chunk, separators=(',', ':'))}\n\n".encode()
        yield b"data: [DONE]\n\n"

    headers = {"Cache-Control": "no-cache", **serving_headers(info)}
    return StreamingResponse(body(), media_type="text/event-stream", headers=headers)


def _include_usage(body: CompletionRequest | ChatCompletionRequest) -> bool:
    return body.stream_options is not None and body.stream_options.include_usage


@router.post("/completions", response_model=CompletionResponse, summary="Text completion with a task's adapter")
async def completions(
    body: CompletionRequest,
    request: Request,
    response: Response,
    state: Annotated[ServiceState, Depends(get_state)],
) -> Any:
    record = await resolve_task(state, body.model)
    body = with_task_defaults(body, record)
    prompts = body.prompts
    n = body.choices_per_prompt
    k = body.logprobs
    params = sampling_params(state, body, k, len(prompts))
    prompt_ids = [completion_prompt_ids(state, p) for p in prompts]
    adapter, info = await resolve_adapter(state, record)
    echoed: list[tuple[list[int], list[TokenLogprob | None]]] = []  # per prompt: its tokens and their logprobs
    if body.echo and k is not None:
        for ids in prompt_ids:
            scored = await prompt_logprobs(state, ids, adapter, k)
            echoed.append((ids[len(ids) - len(scored) :], scored))
    handles = submit(
        state, [ids for ids in prompt_ids for _ in range(n)], adapter, choice_params(params, n) * len(prompts)
    )

    def prompt_of(index: int) -> str:
        return prompts[index // n]

    def echo_logprobs(index: int) -> CompletionLogprobs:
        tokens, scored = echoed[index // n]
        return completion_logprobs(state, tokens, scored, 0)

    prompt_tokens = sum(len(ids) for ids in prompt_ids)
    request_id, created = f"cmpl-{secrets.token_hex(12)}", int(time.time())
    if body.stream:
        stream = _Stream(request_id, "text_completion", created, body.model)
        offsets = {i: len(prompt_of(i)) for i in range(len(handles))}

        def choice(index: int, delta: StreamDelta) -> dict[str, Any] | None:
            if not (delta.text or delta.finish_reason or (k is not None and delta.token_ids)):
                return None
            logprobs = None
            if k is not None:
                tokens = [e.token for e in delta.logprobs]
                listing = completion_logprobs(state, tokens, delta.logprobs, offsets[index])
                offsets[index] += sum(len(t) for t in listing.tokens)
                logprobs = listing.model_dump()
            return {"index": index, "text": delta.text, "finish_reason": delta.finish_reason, "logprobs": logprobs}

        leading = []
        if body.echo:
            for index in range(len(handles)):
                logprobs = echo_logprobs(index).model_dump() if k is not None else None
                leading.append({"index": index, "text": prompt_of(index), "finish_reason": None, "logprobs": logprobs})
        usage_tokens = prompt_tokens if _include_usage(body) else None
        return _sse(stream, handles, choice, info, leading, usage_tokens)

    results = await _wait(handles, request)
    choices = []
    for index, result in enumerate(results):
        text = prompt_of(index) + result.text if body.echo else result.text
        listing: CompletionLogprobs | None = None
        if k is not None:
            listing = completion_logprobs(state, result.token_ids, result.logprobs or [], len(prompt_of(index)))
            if body.echo:
                listing = echo_logprobs(index).followed_by(listing)
        choices.append(CompletionChoice(index=index, text=text, finish_reason=result.finish_reason, logprobs=listing))
    response.headers.update(serving_headers(info))
    return CompletionResponse(
        id=request_id,
        created=created,
        model=body.model,
        choices=choices,
        usage=_usage(prompt_tokens, sum(r.completion_tokens for r in results)),
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
    n = body.choices_per_prompt
    k = body.top_logprobs_wanted
    params = sampling_params(state, body, k, 1)
    ids = chat_prompt_ids(state, body.messages)
    adapter, info = await resolve_adapter(state, record)
    handles = submit(state, [ids] * n, adapter, choice_params(params, n))
    request_id, created = f"chatcmpl-{secrets.token_hex(12)}", int(time.time())
    if body.stream:
        stream = _Stream(request_id, "chat.completion.chunk", created, body.model)
        started: set[int] = set()

        def choice(index: int, delta: StreamDelta) -> dict[str, Any] | None:
            if not (delta.text or delta.finish_reason or (k is not None and delta.token_ids)):
                return None
            content: dict[str, Any] = {"content": delta.text} if delta.text else {}
            if index not in started:
                content = {"role": "assistant", **content}
                started.add(index)
            logprobs = chat_logprobs(state, delta.logprobs).model_dump() if k is not None else None
            return {"index": index, "delta": content, "finish_reason": delta.finish_reason, "logprobs": logprobs}

        return _sse(stream, handles, choice, info, usage_prompt_tokens=len(ids) if _include_usage(body) else None)
    results = await _wait(handles, request)
    response.headers.update(serving_headers(info))
    return ChatCompletionResponse(
        id=request_id,
        created=created,
        model=body.model,
        choices=[
            ChatChoice(
                index=index,
                message=AssistantMessage(content=result.text),
                finish_reason=result.finish_reason,
                logprobs=chat_logprobs(state, result.logprobs or []) if k is not None else None,
            )
            for index, result in enumerate(results)
        ],
        usage=_usage(len(ids), sum(r.completion_tokens for r in results)),
        icm_lora=info,
    )


async def _wait(handles: Sequence[RequestHandle], request: Request) -> list[GenerationResult]:
    watcher = asyncio.create_task(_cancel_on_disconnect(request, handles))
    try:
        return list(await asyncio.gather(*(handle.wait() for handle in handles)))
    except EngineClosed:
        raise APIError(503, "the engine is shutting down", headers={"Retry-After": "1"}) from None
    finally:
        watcher.cancel()
        for handle in handles:
            handle.cancel()  # when the awaiting request was cancelled (client gone), free the engine's resources


async def _cancel_on_disconnect(request: Request, handles: Sequence[RequestHandle]) -> None:
    """A non-streamed request is not cancelled by the server when its client goes away (a client timeout): watch for
    the disconnect (the body is read already, so the next message is ``http.disconnect``) and cancel it here."""
    while (await request.receive())["type"] != "http.disconnect":
        pass
    for handle in handles:
        handle.cancel()


@router.get("/models", response_model=ModelList, summary="The base model and every registered task")
async def models(state: Annotated[ServiceState, Depends(get_state)]) -> ModelList:
    cards = [ModelCard(id=state.settings.model_name, created=int(state.started_at))]
    records = await state.store.list(MAX_LISTED_TASKS, None)
    # a task registered under the base model's name before it was reserved can never be used: not listed
    cards += [ModelCard(id=r.task_id, created=int(r.created_at)) for r in records if r.task_id != cards[0].id]
    return ModelList(data=cards)


@router.get(
    "/models/{model_id:path}",
    response_model=ModelCard,
    responses={404: {"description": "Neither the base model's name nor a registered task"}},
    summary="One model: the base model or a registered task",
)
async def model(
    model_id: Annotated[str, Path(max_length=512)], state: Annotated[ServiceState, Depends(get_state)]
) -> ModelCard:
    if model_id == state.settings.model_name:
        return ModelCard(id=model_id, created=int(state.started_at))
    record = await state.store.get(model_id) if _is_task_id(model_id) else None
    if record is None:
        raise APIError(
            404,
            f"model {model_id!r} is neither a registered task id nor {state.settings.model_name!r}",
            "model_not_found",
        )
    return ModelCard(id=record.task_id, created=int(record.created_at))


def _is_task_id(value: str) -> bool:
    return TASK_ID.fullmatch(value) is not None
