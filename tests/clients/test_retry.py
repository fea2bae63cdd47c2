"""Retries: which failures, which requests, how long to wait, when to give up."""

from __future__ import annotations

import asyncio
import random

import httpx
import pytest
from icm_lora_client import (
    APIConnectionError,
    BadRequestError,
    RateLimitError,
    RetryPolicy,
    ServiceUnavailableError,
)

from tests.clients.mock import COMPLETION, Recorder, error, task_json

OK_TASK = httpx.Response(200, json=task_json("t1"))


def test_get_retried_on_503_then_succeeds_with_jittered_backoff() -> None:
    recorder = Recorder(error(503), error(503), OK_TASK)
    with recorder.client() as client:
        assert client.get_task("t1").task_id == "t1"
    assert len(recorder.requests) == 3
    assert len(recorder.sleeps) == 2
    assert 0 <= recorder.sleeps[0] <= 0.5 and 0 <= recorder.sleeps[1] <= 1.0  # full jitter under 0.5 * 2**n


def test_429_honours_retry_after() -> None:
    recorder = Recorder(error(429, "rate_limited", **{"retry-after": "3"}), OK_TASK)
    with recorder.client() as client:
        client.get_task("t1")
    assert recorder.sleeps == [3.0]


def test_retry_after_beyond_the_cap_raises_at_once() -> None:
    recorder = Recorder(error(429, "rate_limited", **{"retry-after": "3600"}), OK_TASK)
    with recorder.client() as client, pytest.raises(RateLimitError) as caught:
        client.get_task("t1")
    assert caught.value.retry_after == 3600 and recorder.sleeps == [] and len(recorder.requests) == 1


def test_connect_error_retried_for_get_and_delete() -> None:
    recorder = Recorder(httpx.ConnectError("refused"), httpx.ReadError("reset"), OK_TASK)
    with recorder.client() as client:
        assert client.delete_task("t1").task_id == "t1"
    assert [r.method for r in recorder.requests] == ["DELETE"] * 3


def test_task_creation_is_retried_as_idempotent() -> None:
    recorder = Recorder(error(503), httpx.Response(201, json=task_json("t1")))
    with recorder.client() as client:
        assert client.create_task("d", [{"input": "a", "output": "b"}], task_id="t1").task_id == "t1"
    assert len(recorder.requests) == 2


def test_no_retry_on_400() -> None:
    recorder = Recorder(error(400, "bad_request"), OK_TASK)
    with recorder.client() as client, pytest.raises(BadRequestError):
        client.get_task("t1")
    assert len(recorder.requests) == 1 and recorder.sleeps == []


@pytest.mark.parametrize("failure", [error(503), error(429, **{"retry-after": "1"}), httpx.ReadError("reset")])
def test_sent_completions_are_not_retried(failure: httpx.Response | Exception) -> None:
    recorder = Recorder(failure, httpx.Response(200, json=COMPLETION))
    with recorder.client() as client, pytest.raises((ServiceUnavailableError, RateLimitError, APIConnectionError)):
        client.complete("t", "prompt")
    assert len(recorder.requests) == 1 and recorder.sleeps == []


@pytest.mark.parametrize("failure", [httpx.ConnectError("refused"), httpx.ConnectTimeout("slow connect")])
def test_completion_retried_when_the_connection_failed_before_sending(failure: Exception) -> None:
    recorder = Recorder(failure, httpx.Response(200, json=COMPLETION))
    with recorder.client() as client:
        assert client.complete("t", "prompt").text == " yes"
    assert len(recorder.requests) == 2


def test_gives_up_after_max_retries() -> None:
    recorder = Recorder(error(503))
    with recorder.client(max_retries=3) as client, pytest.raises(ServiceUnavailableError):
        client.models()
    assert len(recorder.requests) == 4 and len(recorder.sleeps) == 3
    recorder = Recorder(httpx.ConnectError("refused"))
    with recorder.client(max_retries=0) as client, pytest.raises(APIConnectionError):
        client.models()
    assert len(recorder.requests) == 1


def test_backoff_is_exponential_with_full_jitter() -> None:
    policy = RetryPolicy(initial_delay=0.5, max_delay=4.0, rng=random.Random(0))
    for attempt, cap in enumerate([0.5, 1.0, 2.0, 4.0, 4.0, 4.0]):
        samples = [policy.backoff(attempt) for _ in range(200)]
        assert all(0 <= s <= cap for s in samples)
        assert max(samples) > cap * 0.8 and min(samples) < cap * 0.2  # spread over the whole range
    with pytest.raises(ValueError):
        RetryPolicy(max_retries=-1)


def test_async_client_retries_the_same_way() -> None:
    async def main() -> None:
        recorder = Recorder(error(503), error(429, **{"retry-after": "2"}), OK_TASK)
        async with recorder.async_client() as client:
            assert (await client.get_task("t1")).task_id == "t1"
        assert len(recorder.requests) == 3 and recorder.sleeps[1] == 2.0
        recorder = Recorder(error(503), httpx.Response(200, json=COMPLETION))
        async with recorder.async_client() as client:
            with pytest.raises(ServiceUnavailableError):
                await client.complete("t", "p")
        assert len(recorder.requests) == 1

    asyncio.run(main())


@pytest.mark.parametrize("failure", [httpx.UnsupportedProtocol("ftp?"), httpx.DecodingError("bad gzip")])
def test_hopeless_request_errors_are_not_retried(failure: Exception) -> None:
    recorder = Recorder(failure, OK_TASK)
    with recorder.client() as client, pytest.raises(APIConnectionError):
        client.get_task("t1")
    assert len(recorder.requests) == 1
