"""The asynchronous client: the same methods as ``Client``, awaited."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Unpack, overload

import httpx

from . import _requests as api
from ._config import DEFAULT_TIMEOUT, ClientConfig, Timeout
from ._requests import APIRequest, ExampleLike, MessageLike
from ._retry import RetryPolicy, delay_or_raise
from ._streaming import AsyncStream
from ._types import (
    AdapterDeleted,
    AdapterMetadata,
    AdapterPage,
    AdapterSummary,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChunk,
    Health,
    ModelList,
    Resolution,
    ResolvePage,
    SamplingOptions,
    Task,
    TaskDefaults,
    TaskPage,
)
from ._zip import extract_peft_zip


class AsyncClient:
    """Asynchronous client for an icm-lora service.

    ``base_url`` defaults to ``$ICM_LORA_BASE_URL`` (else ``http://127.0.0.1:8000``), ``api_key`` to
    ``$ICM_LORA_API_KEY``. Idempotent calls are retried ``max_retries`` times on connection errors, 429 and 503
    (see :class:`RetryPolicy`); ``sleep`` is what waits between tries. Use it as an async context manager, or
    await ``close``.
    """

    def __init__(
        self,
        base_url: str | None = None,
        *,
        api_key: str | None = None,
        timeout: Timeout = DEFAULT_TIMEOUT,
        max_retries: int = 2,
        retry: RetryPolicy | None = None,
        headers: dict[str, str] | None = None,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    ) -> None:
        self.config = ClientConfig.resolve(base_url, api_key, timeout, max_retries, retry)
        self._sleep = sleep
        self._http = httpx.AsyncClient(
            base_url=self.config.base_url,
            headers=self.config.headers(headers),
            timeout=self.config.timeout,
            transport=transport,
        )

    # --- tasks ---------------------------------------------------------------------------------------------------

    async def create_task(
        self,
        description: str = "",
        examples: Sequence[ExampleLike] | None = None,
        *,
        task_id: str | None = None,
        seed: int | None = None,
        refine_steps: int = 0,
        replace: bool = False,
    ) -> Task:
        """Register a task and generate its adapter; the answer carries the adapter's metadata in ``adapter``, its
        self-check in ``self_check``. ``refine_steps`` (1 to 64) also refines the adapter on the examples in the
        background: follow ``get_task(task_id).refinement`` until its status is done (completions then use it).
        ``replace=True`` replaces the spec of an existing ``task_id`` (otherwise a ``ConflictError``): a new adapter
        id; the task's metadata and defaults stay."""
        request = api.create_task(description, examples, task_id, seed, refine_steps, replace)
        return api.parse(await self._send(request), Task)

    async def get_task(self, task_id: str) -> Task:
        return api.parse(await self._send(api.get_task(task_id)), Task)

    async def list_tasks(self, *, page_size: int = 100) -> AsyncIterator[Task]:
        """Every registered task in id order, fetching pages of ``page_size`` as the iteration goes."""
        cursor: str | None = None
        while True:
            page = api.parse(await self._send(api.list_tasks(page_size, cursor)), TaskPage)
            for task in page.data:
                yield task
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def delete_task(self, task_id: str) -> Task:
        return api.parse(await self._send(api.delete_task(task_id)), Task)

    async def update_task(
        self,
        task_id: str,
        *,
        metadata: Mapping[str, str | None] | None = None,
        defaults: TaskDefaults | None = None,
    ) -> Task:
        """Change a task's ``metadata`` (labels) and ``defaults`` (generation settings used when a completion does not
        set them), as a merge: keys not given stay, a key set to None is removed. The spec cannot change."""
        return api.parse(await self._send(api.update_task(task_id, metadata, defaults)), Task)

    # --- adapters ------------------------------------------------------------------------------------------------

    async def generate_adapter(
        self,
        description: str = "",
        examples: Sequence[ExampleLike] | None = None,
        *,
        seed: int | None = None,
        refine_steps: int = 0,
    ) -> AdapterMetadata:
        """Generate (or find cached) the adapter of a task spec without registering the task. With ``refine_steps``
        its refinement is trained in the background; ``refined_adapter_id`` names it (``get_adapter`` waits for it)."""
        request = api.generate_adapter(description, examples, seed, refine_steps)
        return api.parse(await self._send(request), AdapterMetadata)

    async def resolve(self, names: Sequence[str]) -> list[Resolution]:
        """Task ids or adapter ids (any mix) to the adapters they are served with, in order, in one request per 256
        names; nothing is generated. A name that is neither a task nor a servable adapter comes back with
        ``task_id`` and ``adapter_id`` None."""
        found: list[Resolution] = []
        for start in range(0, len(names), api.MAX_RESOLVE_NAMES):
            chunk = names[start : start + api.MAX_RESOLVE_NAMES]
            found += api.parse(await self._send(api.resolve(chunk)), ResolvePage).data
        return found

    async def get_adapter(self, adapter_id: str) -> AdapterMetadata:
        return api.parse(await self._send(api.get_adapter(adapter_id)), AdapterMetadata)

    async def list_adapters(self, *, page_size: int = 100) -> AsyncIterator[AdapterSummary]:
        """Every adapter the service can serve (from its stored specs) in id order, a page at a time."""
        cursor: str | None = None
        while True:
            page = api.parse(await self._send(api.list_adapters(page_size, cursor)), AdapterPage)
            for adapter in page.data:
                yield adapter
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    async def delete_adapter(self, adapter: str | AdapterMetadata | Task) -> AdapterDeleted:
        """Delete an adapter's cached weights and stored spec; a task using it regenerates it on its next request."""
        return api.parse(await self._send(api.delete_adapter(adapter)), AdapterDeleted)

    async def download_adapter(self, adapter: str | AdapterMetadata | Task, path: str | os.PathLike[str]) -> Path:
        """Download an adapter (by id, metadata or task) as a PEFT folder at ``path``, which
        ``peft.PeftModel.from_pretrained(base_model, path)`` loads."""
        data = api.check_zip(await self._send(api.adapter_zip(adapter)))
        return await asyncio.to_thread(extract_peft_zip, data, path)

    # --- inference -----------------------------------------------------------------------------------------------

    @overload
    async def complete(
        self, model: str, prompt: str, *, stream: Literal[False] = False, **options: Unpack[SamplingOptions]
    ) -> Completion: ...

    @overload
    async def complete(
        self, model: str, prompt: str, *, stream: Literal[True], **options: Unpack[SamplingOptions]
    ) -> AsyncStream[CompletionChunk]: ...

    async def complete(
        self, model: str, prompt: str, *, stream: bool = False, **options: Unpack[SamplingOptions]
    ) -> Completion | AsyncStream[CompletionChunk]:
        """Text completion; ``model`` is a task id, or the base model's name for no adapter."""
        request = api.completion(model, prompt, stream, options)
        if stream:
            return AsyncStream(await self._send(request, stream=True), CompletionChunk)
        return api.parse(await self._send(request), Completion)

    @overload
    async def chat(
        self,
        model: str,
        messages: Sequence[MessageLike],
        *,
        stream: Literal[False] = False,
        **options: Unpack[SamplingOptions],
    ) -> ChatCompletion: ...

    @overload
    async def chat(
        self, model: str, messages: Sequence[MessageLike], *, stream: Literal[True], **options: Unpack[SamplingOptions]
    ) -> AsyncStream[ChatCompletionChunk]: ...

    async def chat(
        self, model: str, messages: Sequence[MessageLike], *, stream: bool = False, **options: Unpack[SamplingOptions]
    ) -> ChatCompletion | AsyncStream[ChatCompletionChunk]:
        """Chat completion with the base model's chat template; ``model`` as in :meth:`complete`."""
        request = api.chat(model, messages, stream, options)
        if stream:
            return AsyncStream(await self._send(request, stream=True), ChatCompletionChunk)
        return api.parse(await self._send(request), ChatCompletion)

    async def models(self) -> ModelList:
        return api.parse(await self._send(api.models()), ModelList)

    async def health(self) -> Health:
        return api.parse(await self._send(api.health()), Health)

    # --- plumbing ------------------------------------------------------------------------------------------------

    async def _send(self, request: APIRequest, *, stream: bool = False) -> httpx.Response:
        """A 2xx response (left open when ``stream``), after the retries the policy allows."""
        attempt = 0
        while True:
            try:
                response = await self._http.send(request.build(self._http), stream=stream)
                if response.is_success:
                    return response
                await response.aread()  # the error body; reading it also closes a streamed response
            except httpx.RequestError as exc:
                delay = delay_or_raise(self.config.retry, attempt, idempotent=request.idempotent, error=exc)
            else:
                delay = delay_or_raise(self.config.retry, attempt, idempotent=request.idempotent, response=response)
            await self._sleep(delay)
            attempt += 1

    async def close(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()
