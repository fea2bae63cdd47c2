"""``RequestHandle`` between the engine thread and an event loop: an async iteration is woken for every delta,
``wait()`` (a non-streamed completion) only when the request ends."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from service.engine.requests import GenerationResult, RequestHandle, StreamDelta

TOKENS = 20


def _result() -> GenerationResult:
    return GenerationResult("r", None, 3, list(range(TOKENS)), "x" * TOKENS, "length", None, 0.01, 0.1)


def _engine(handle: RequestHandle, result: GenerationResult) -> threading.Thread:
    def run() -> None:
        for i in range(TOKENS):
            handle.push(StreamDelta("x", (i,), "length" if i == TOKENS - 1 else None))
        handle.finish(result)

    return threading.Thread(target=run)


async def _counting_wakes(consume: Callable[[RequestHandle], Any]) -> tuple[Any, int]:
    """Run ``consume(handle)`` on this loop while another thread generates; count the loop's cross-thread wake-ups."""
    loop = asyncio.get_running_loop()
    wakes = 0
    original = loop.call_soon_threadsafe

    def counting(callback: Callable[..., object], *args: object, **kwargs: Any) -> asyncio.Handle:
        nonlocal wakes
        wakes += 1
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    handle = RequestHandle("r", lambda _h: None)
    consumer = asyncio.ensure_future(consume(handle))
    await asyncio.sleep(0.01)  # the consumer has registered and is waiting
    result = _result()
    engine = _engine(handle, result)
    engine.start()
    got = await consumer
    engine.join()
    return got, wakes


def test_wait_is_woken_once_when_the_request_ends_not_per_token() -> None:
    got, wakes = asyncio.run(_counting_wakes(lambda handle: handle.wait()))
    assert got.token_ids == list(range(TOKENS))
    assert wakes == 1


def test_an_async_iteration_gets_every_delta() -> None:
    async def collect(handle: RequestHandle) -> list[StreamDelta]:
        return [delta async for delta in handle]

    deltas, wakes = asyncio.run(_counting_wakes(collect))
    assert [d.token_ids[0] for d in deltas] == list(range(TOKENS))
    assert deltas[-1].finish_reason == "length"
    assert 1 <= wakes <= TOKENS + 1  # woken for the deltas (some may arrive together) and the end


def test_wait_returns_at_once_for_a_request_that_has_ended() -> None:
    handle = RequestHandle("r", lambda _h: None)
    handle.finish(_result())
    assert asyncio.run(handle.wait()).finish_reason == "length"
