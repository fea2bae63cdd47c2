"""The synchronous client."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Literal, Unpack, overload

import httpx

from . import _requests as api
from ._config import DEFAULT_TIMEOUT, ClientConfig, Timeout
from ._requests import APIRequest, ExampleLike, MessageLike
from ._retry import RetryPolicy, delay_or_raise
from ._streaming import Stream
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


class Client:
    """Client for an icm-lora service.

    ``base_url`` defaults to ``$ICM_LORA_BASE_URL`` (else ``http://127.0.0.1:8000``), ``api_key`` to
    ``$ICM_LORA_API_KEY``. Idempotent calls are retried ``max_retries`` times on connection errors, 429 and 503
    (see :class:`RetryPolicy`); ``sleep`` is what waits between tries. Use it as a context manager, or call ``close``.
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
        transport: httpx.BaseTransport | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.config = ClientConfig.resolve(base_url, api_key, timeout, max_retries, retry)
        self._sleep = sleep
        self._http = httpx.Client(
            base_url=self.config.base_url,
            headers=self.config.headers(headers),
            timeout=self.config.timeout,
            transport=transport,
        )

    # --- tasks ---------------------------------------------------------------------------------------------------

    def create_task(
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
        return api.parse(self._send(request), Task)

    def get_task(self, task_id: str) -> Task:
        return api.parse(self._send(api.get_task(task_id)), Task)

    def list_tasks(self, *, page_size: int = 100) -> Iterator[Task]:
        """Every registered task in id order, fetching pages of ``page_size`` as the iteration goes."""
        cursor: str | None = None
        while True:
            page = api.parse(self._send(api.list_tasks(page_size, cursor)), TaskPage)
            yield from page.data
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def delete_task(self, task_id: str) -> Task:
        return api.parse(self._send(api.delete_task(task_id)), Task)

    def update_task(
        self,
        task_id: str,
        *,
        metadata: Mapping[str, str | None] | None = None,
        defaults: TaskDefaults | None = None,
    ) -> Task:
        """Change a task's ``metadata`` (labels) and ``defaults`` (generation settings used when a completion does not
        set them), as a merge: keys not given stay, a key set to None is removed. The spec cannot change."""
        return api.parse(self._send(api.update_task(task_id, metadata, defaults)), Task)

    # --- adapters ------------------------------------------------------------------------------------------------

    def generate_adapter(
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
        return api.parse(self._send(request), AdapterMetadata)

    def resolve(self, names: Sequence[str]) -> list[Resolution]:
        """Task ids or adapter ids (any mix) to the adapters they are served with, in order, in one request per 256
        names; nothing is generated. A name that is neither a task nor a servable adapter comes back with
        ``task_id`` and ``adapter_id`` None."""
        found: list[Resolution] = []
        for start in range(0, len(names), api.MAX_RESOLVE_NAMES):
            chunk = names[start : start + api.MAX_RESOLVE_NAMES]
            found += api.parse(self._send(api.resolve(chunk)), ResolvePage).data
        return found

    def get_adapter(self, adapter_id: str) -> AdapterMetadata:
        return api.parse(self._send(api.get_adapter(adapter_id)), AdapterMetadata)

    def list_adapters(self, *, page_size: int = 100) -> Iterator[AdapterSummary]:
        """Every adapter the service can serve (from its stored specs) in id order, a page at a time."""
        cursor: str | None = None
        while True:
            page = api.parse(self._send(api.list_adapters(page_size, cursor)), AdapterPage)
            yield from page.data
            if page.next_cursor is None:
                return
            cursor = page.next_cursor

    def delete_adapter(self, adapter: str | AdapterMetadata | Task) -> AdapterDeleted:
        """Delete an adapter's cached weights and stored spec; a task using it regenerates it on its next request."""
        return api.parse(self._send(api.delete_adapter(adapter)), AdapterDeleted)

    def download_adapter(self, adapter: str | AdapterMetadata | Task, path: str | os.PathLike[str]) -> Path:
        """Download an adapter (by id, metadata or task) as a PEFT folder at ``path``, which
        ``peft.PeftModel.from_pretrained(base_model, path)`` loads."""
        return extract_peft_zip(api.check_zip(self._send(api.adapter_zip(adapter))), path)

    # --- inference -----------------------------------------------------------------------------------------------

    @overload
    def complete(
        self, model: str, prompt: str, *, stream: Literal[False] = False, **options: Unpack[SamplingOptions]
    ) -> Completion: ...

    @overload
    def complete(
        self, model: str, prompt: str, *, stream: Literal[True], **options: Unpack[SamplingOptions]
    ) -> Stream[CompletionChunk]: ...

    def complete(
        self, model: str, prompt: str, *, stream: bool = False, **options: Unpack[SamplingOptions]
    ) -> Completion | Stream[CompletionChunk]:
        """Text completion; ``model`` is a task id, or the base model's name for no adapter."""
        request = api.completion(model, prompt, stream, options)
        if stream:
            return Stream(self._send(request, stream=True), CompletionChunk)
        return api.parse(self._send(request), Completion)

    @overload
    def chat(
        self,
        model: str,
        messages: Sequence[MessageLike],
        *,
        stream: Literal[False] = False,
        **options: Unpack[SamplingOptions],
    ) -> ChatCompletion: ...

    @overload
    def chat(
        self, model: str, messages: Sequence[MessageLike], *, stream: Literal[True], **options: Unpack[SamplingOptions]
    ) -> Stream[ChatCompletionChunk]: ...

    def chat(
        self, model: str, messages: Sequence[MessageLike], *, stream: bool = False, **options: Unpack[SamplingOptions]
    ) -> ChatCompletion | Stream[ChatCompletionChunk]:
        """Chat completion with the base model's chat template; ``model`` as in :meth:`complete`."""
        request = api.chat(model, messages, stream, options)
        if stream:
            return Stream(self._send(request, stream=True), ChatCompletionChunk)
        return api.parse(self._send(request), ChatCompletion)

    def models(self) -> ModelList:
        return api.parse(self._send(api.models()), ModelList)

    def health(self) -> Health:
        return api.parse(self._send(api.health()), Health)

    # --- plumbing ------------------------------------------------------------------------------------------------

    def _send(self, request: APIRequest, *, stream: bool = False) -> httpx.Response:
        """A 2xx response (left open when ``stream``), after the retries the policy allows."""
        attempt = 0
        while True:
            try:
                response = self._http.send(request.build(self._http), stream=stream)
                if response.is_success:
                    return response
                response.read()  # the error body; reading it also closes a streamed response
            except httpx.RequestError as exc:
                delay = delay_or_raise(self.config.retry, attempt, idempotent=request.idempotent, error=exc)
            else:
                delay = delay_or_raise(self.config.retry, attempt, idempotent=request.idempotent, response=response)
            self._sleep(delay)
            attempt += 1

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
