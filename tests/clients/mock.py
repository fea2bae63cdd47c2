"""A scripted ``httpx.MockTransport`` handler for unit tests: answers in order, records requests and sleeps."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import httpx
from icm_lora_client import AsyncClient, Client

BASE = "http://icm.test"
Answer = httpx.Response | Exception | Callable[[httpx.Request], httpx.Response]


class Recorder:
    def __init__(self, *answers: Answer) -> None:
        self.answers = list(answers)
        self.requests: list[httpx.Request] = []
        self.sleeps: list[float] = []

    def __call__(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        answer = self.answers[min(len(self.requests), len(self.answers)) - 1]  # the last answer repeats
        if isinstance(answer, Exception):
            raise answer
        if isinstance(answer, httpx.Response):  # a fresh copy: a response can be read once
            return httpx.Response(answer.status_code, headers=answer.headers, content=answer.content)
        return answer(request)

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    async def async_sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)

    def client(self, **kwargs: Any) -> Client:
        return Client(BASE, transport=httpx.MockTransport(self), sleep=self.sleep, **kwargs)

    def async_client(self, **kwargs: Any) -> AsyncClient:
        return AsyncClient(BASE, transport=httpx.MockTransport(self), sleep=self.async_sleep, **kwargs)


def error(status: int, error_type: str = "some_type", message: str = "went wrong", **headers: str) -> httpx.Response:
    """The service's error body."""
    return httpx.Response(status, json={"error": {"type": error_type, "message": message}}, headers=headers)


def task_json(task_id: str, **extra: Any) -> dict[str, Any]:
    return {
        "task_id": task_id,
        "description": "d",
        "examples": [{"input": "a", "output": "b"}],
        "seed": None,
        "created_at": 1.5,
        "adapter_id": f"ad-{task_id}",
        **extra,
    }


COMPLETION = {
    "id": "cmpl-1",
    "object": "text_completion",
    "created": 1,
    "model": "t",
    "choices": [{"index": 0, "text": " yes", "finish_reason": "length", "logprobs": None}],
    "usage": {"prompt_tokens": 3, "completion_tokens": 1, "total_tokens": 4},
}
