"""What each API call sends, and how its answer is read: one definition for both clients, which only add the I/O."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ValidationError

from ._errors import ResponseValidationError, request_id_of
from ._types import AdapterMetadata, ChatMessage, Example, SamplingOptions, Task, TaskDefaults

ZIP = "application/zip"
EVENT_STREAM = "text/event-stream"

ModelT = TypeVar("ModelT", bound=BaseModel)
ExampleLike = Example | Mapping[str, Any]
MessageLike = ChatMessage | Mapping[str, str]


@dataclass(frozen=True)
class APIRequest:
    """One call: ``idempotent`` says whether repeating it is harmless (see ``_retry``)."""

    method: str
    path: str
    json: Any = None
    params: dict[str, Any] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    idempotent: bool = True

    def build(self, http: httpx.Client | httpx.AsyncClient) -> httpx.Request:
        return http.build_request(self.method, self.path, json=self.json, params=self.params, headers=self.headers)


def _segment(value: str) -> str:
    if not value:
        raise ValueError("an id must not be empty")
    return quote(value, safe="")


def _spec(description: str, examples: Sequence[ExampleLike] | None) -> dict[str, Any]:
    return {
        "description": description,
        "examples": [Example.model_validate(e).model_dump(exclude_none=True) for e in examples or ()],
    }


def create_task(
    description: str,
    examples: Sequence[ExampleLike] | None,
    task_id: str | None,
    seed: int | None,
    refine_steps: int = 0,
    replace: bool = False,
) -> APIRequest:
    # idempotent by design: the same id and spec answers 200 with the same task, another spec 409 (never a duplicate);
    # with replace, a repeat finds the new spec in place and answers 200
    body = _spec(description, examples)
    if task_id is not None:
        body["task_id"] = task_id
    if seed is not None:
        body["seed"] = seed
    if refine_steps:
        body["refine_steps"] = refine_steps
    if replace:
        body["replace"] = True
    return APIRequest("POST", "/v1/tasks", json=body)


def get_task(task_id: str) -> APIRequest:
    return APIRequest("GET", f"/v1/tasks/{_segment(task_id)}")


def list_tasks(page_size: int, cursor: str | None) -> APIRequest:
    params: dict[str, Any] = {"limit": page_size}
    if cursor is not None:
        params["cursor"] = cursor
    return APIRequest("GET", "/v1/tasks", params=params)


def delete_task(task_id: str) -> APIRequest:
    return APIRequest("DELETE", f"/v1/tasks/{_segment(task_id)}")


def update_task(task_id: str, metadata: Mapping[str, str | None] | None, defaults: TaskDefaults | None) -> APIRequest:
    # a JSON merge patch: repeating it gives the same task, so it is retried like a GET
    body: dict[str, Any] = {}
    if metadata is not None:
        body["metadata"] = dict(metadata)
    if defaults is not None:
        body["defaults"] = dict(defaults)
    return APIRequest("PATCH", f"/v1/tasks/{_segment(task_id)}", json=body)


def generate_adapter(
    description: str, examples: Sequence[ExampleLike] | None, seed: int | None, refine_steps: int = 0
) -> APIRequest:
    # idempotent: generation is deterministic for (generator, spec, seed) and the adapter id is its content address
    body = _spec(description, examples)
    if seed is not None:
        body["seed"] = seed
    if refine_steps:
        body["refine_steps"] = refine_steps
    return APIRequest("POST", "/v1/adapters", json=body)


MAX_RESOLVE_NAMES = 256  # per request (the service's limit)


def resolve(names: Sequence[str]) -> APIRequest:
    # reads only: repeating it is harmless
    if not 1 <= len(names) <= MAX_RESOLVE_NAMES:
        raise ValueError(f"resolve takes 1 to {MAX_RESOLVE_NAMES} names per request, not {len(names)}")
    return APIRequest("POST", "/v1/resolve", json={"names": list(names)})


def get_adapter(adapter_id: str) -> APIRequest:
    return APIRequest("GET", f"/v1/adapters/{_segment(adapter_id)}")


def list_adapters(page_size: int, cursor: str | None) -> APIRequest:
    params: dict[str, Any] = {"limit": page_size}
    if cursor is not None:
        params["cursor"] = cursor
    return APIRequest("GET", "/v1/adapters", params=params)


def delete_adapter(adapter: str | AdapterMetadata | Task) -> APIRequest:
    return APIRequest("DELETE", f"/v1/adapters/{_segment(adapter_id_of(adapter))}")


def adapter_id_of(adapter: str | AdapterMetadata | Task) -> str:
    if isinstance(adapter, str):
        return adapter
    if isinstance(adapter, AdapterMetadata):
        return adapter.adapter_id
    if adapter.adapter_id is None:
        raise ValueError(f"task {adapter.task_id!r} has no adapter (the service has no generator)")
    return adapter.adapter_id


def adapter_zip(adapter: str | AdapterMetadata | Task) -> APIRequest:
    path = f"/v1/adapters/{_segment(adapter_id_of(adapter))}/weights"
    return APIRequest("GET", path, headers={"Accept": ZIP})


def completion(model: str, prompt: str, stream: bool, options: SamplingOptions) -> APIRequest:
    body = {"model": model, "prompt": prompt, **options, "stream": stream}
    return APIRequest("POST", "/v1/completions", json=body, headers=_accept(stream), idempotent=False)


def chat(model: str, messages: Sequence[MessageLike], stream: bool, options: SamplingOptions) -> APIRequest:
    wire = [ChatMessage.model_validate(m).model_dump() for m in messages]
    body = {"model": model, "messages": wire, **options, "stream": stream}
    return APIRequest("POST", "/v1/chat/completions", json=body, headers=_accept(stream), idempotent=False)


def models() -> APIRequest:
    return APIRequest("GET", "/v1/models")


def health() -> APIRequest:
    return APIRequest("GET", "/healthz")


def _accept(stream: bool) -> dict[str, str]:
    return {"Accept": EVENT_STREAM if stream else "application/json"}


def parse(response: httpx.Response, model: type[ModelT]) -> ModelT:
    """The body of a 2xx response as ``model``."""
    try:
        return model.model_validate_json(response.content)
    except ValidationError as exc:
        raise ResponseValidationError(
            f"unexpected {model.__name__} from {response.request.method} {response.request.url.path}: {exc}",
            request_id=request_id_of(response),
        ) from None


def check_zip(response: httpx.Response) -> bytes:
    content_type = response.headers.get("content-type", "")
    if not content_type.startswith(ZIP):
        raise ResponseValidationError(
            f"expected {ZIP}, got {content_type or 'no content type'}", request_id=request_id_of(response)
        )
    return response.content
