"""Server-sent events: typed chunks, [DONE], and every way a stream can fail."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from icm_lora_client import APIConnectionError, APIStreamError, ChatCompletionChunk, CompletionChunk, NotFoundError
from icm_lora_client._sse import SSEDecoder

from tests.clients.mock import Recorder, error

SSE = {"content-type": "text/event-stream"}


def _chat_chunk(content: str | None, finish: str | None = None, role: bool = False) -> dict[str, Any]:
    delta: dict[str, Any] = {"content": content} if content else {}
    if role:
        delta["role"] = "assistant"
    choice = {"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}
    return {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "t", "choices": [choice]}


def _events(*payloads: dict[str, Any] | str) -> bytes:
    return b"".join(f"data: {p if isinstance(p, str) else json.dumps(p)}\n\n".encode() for p in payloads)


CHAT = _events(_chat_chunk("Hel", role=True), _chat_chunk("lo"), _chat_chunk(None, "length"), "[DONE]")


def test_chat_stream_yields_typed_chunks_until_done() -> None:
    recorder = Recorder(httpx.Response(200, headers=SSE, content=CHAT + _events(_chat_chunk("after done"))))
    with (
        recorder.client() as client,
        client.chat("t", [{"role": "user", "content": "hi"}], stream=True, max_tokens=3) as stream,
    ):
        chunks = list(stream)
    assert all(isinstance(c, ChatCompletionChunk) for c in chunks)
    assert [c.text for c in chunks] == ["Hel", "lo", ""]
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].finish_reason == "length"
    request = recorder.requests[0]
    assert request.headers["accept"] == "text/event-stream"
    assert json.loads(request.content)["stream"] is True
    assert stream.response.is_closed


def test_completion_stream_and_keepalive_comments() -> None:
    chunk = {"id": "c", "object": "text_completion", "created": 1, "model": "t"}
    body = (
        b": keep-alive\n\n"
        + _events({**chunk, "choices": [{"index": 0, "text": " yes", "finish_reason": None}]})
        + b"event: message\r\ndata: "
        + json.dumps({**chunk, "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]}).encode()
        + b"\r\n\r\ndata: [DONE]\n\n"
    )
    with Recorder(httpx.Response(200, headers=SSE, content=body)).client() as client:
        chunks = list(client.complete("t", "p", stream=True))
    assert all(isinstance(c, CompletionChunk) for c in chunks)
    assert [(c.text, c.finish_reason) for c in chunks] == [(" yes", None), ("", "stop")]


def test_error_chunk_mid_stream_raises_after_the_good_chunks() -> None:
    body = _events(_chat_chunk("Hel", role=True), _chat_chunk(None, "error"), "[DONE]")
    received: list[str] = []
    with Recorder(httpx.Response(200, headers=SSE, content=body)).client() as client:
        stream = client.chat("t", [{"role": "user", "content": "hi"}], stream=True)
        with pytest.raises(APIStreamError) as caught:
            for chunk in stream:
                received.append(chunk.text)
    assert received == ["Hel"]
    assert caught.value.request_id == "chatcmpl-1"
    assert stream.response.is_closed


def test_error_event_raises() -> None:
    body = _events(_chat_chunk("a", role=True), {"error": {"type": "engine_error", "message": "boom"}})
    client = Recorder(httpx.Response(200, headers=SSE, content=body)).client()
    with client, pytest.raises(APIStreamError) as caught:
        list(client.chat("t", [{"role": "user", "content": "hi"}], stream=True))
    assert caught.value.type == "engine_error" and caught.value.message == "boom"


def test_stream_without_done_raises() -> None:
    body = _events(_chat_chunk("a", role=True)) + b"data: " + json.dumps(_chat_chunk("b")).encode()
    with Recorder(httpx.Response(200, headers=SSE, content=body)).client() as client:
        stream = client.chat("t", [{"role": "user", "content": "hi"}], stream=True)
        received = []
        with pytest.raises(APIStreamError, match="before"):
            for chunk in stream:
                received.append(chunk.text)
    assert received == ["a"]  # an event cut short (no blank line) is dropped, as the SSE spec says


def test_malformed_event_raises() -> None:
    client = Recorder(httpx.Response(200, headers=SSE, content=b"data: {not json\n\n")).client()
    with client, pytest.raises(APIStreamError, match="malformed"):
        list(client.complete("t", "p", stream=True))


def test_connection_lost_mid_stream_is_a_connection_error() -> None:
    def body() -> Iterator[bytes]:
        yield _events(_chat_chunk("Hel", role=True))
        raise httpx.ReadError("connection reset")

    recorder = Recorder(lambda request: httpx.Response(200, headers=SSE, content=body()))
    received = []
    with recorder.client() as client, pytest.raises(APIConnectionError):
        for chunk in client.chat("t", [{"role": "user", "content": "hi"}], stream=True):
            received.append(chunk.text)
    assert received == ["Hel"] and len(recorder.requests) == 1  # never retried


def test_error_status_on_a_stream_request() -> None:
    client = Recorder(error(404, "not_found", "unknown model 'x'")).client()
    with client, pytest.raises(NotFoundError, match="unknown model"):
        client.chat("x", [{"role": "user", "content": "hi"}], stream=True)


def test_async_stream() -> None:
    async def main() -> list[str]:
        recorder = Recorder(httpx.Response(200, headers=SSE, content=CHAT))
        async with recorder.async_client() as client:
            stream = await client.chat("t", [{"role": "user", "content": "hi"}], stream=True)
            async with stream:
                texts = [chunk.text async for chunk in stream]
            assert stream.response.is_closed
            bad = httpx.Response(200, headers=SSE, content=_events(_chat_chunk(None, "error")))
            recorder.answers.append(bad)
            with pytest.raises(APIStreamError):
                async for _ in await client.chat("t", [{"role": "user", "content": "hi"}], stream=True):
                    pass
        return texts

    assert asyncio.run(main()) == ["Hel", "lo", ""]


def test_sse_decoder_joins_multiline_data_and_ignores_other_fields() -> None:
    decoder = SSEDecoder()
    lines = ["id: 1", "event: x", "data: one", "data:two", "retry: 5", "", ": comment", ""]
    assert [decoder.feed(line) for line in lines] == [None, None, None, None, None, "one\ntwo", None, None]
