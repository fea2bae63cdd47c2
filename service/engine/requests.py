"""What a caller holds for a submitted request: a handle to stream deltas from (sync or async), cancel, or wait on.

The engine thread pushes ``StreamDelta`` objects into the handle; sync consumers block on a condition variable,
async consumers are woken on their own event loop with ``loop.call_soon_threadsafe``: an async iteration on every
delta, ``wait()`` only when the request ends (a non-streamed completion does not wake its event loop for each token
it generates). Leaving an iteration early
(``break``, a cancelled task, a client that went away) cancels the request, which frees its slot pin and KV rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass

from service.engine.errors import EngineError
from service.engine.sampling import TokenLogprob

FINISH_STOP = "stop"
FINISH_LENGTH = "length"
FINISH_CANCELLED = "cancelled"
FINISH_ERROR = "error"


@dataclass(frozen=True)
class StreamDelta:
    """What one step added to a request: its new token(s) and the text that can be shown now.

    ``text`` may be empty while characters are incomplete or could begin a stop string. The last delta of a request
    has ``finish_reason`` set (``"stop"``, ``"length"``, ``"cancelled"`` or ``"error"``).
    """

    text: str
    token_ids: tuple[int, ...]
    finish_reason: str | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # one per token id when the request asked for log-probabilities


@dataclass(frozen=True)
class GenerationResult:
    request_id: str
    adapter_id: str | None
    prompt_tokens: int
    token_ids: list[int]
    text: str
    finish_reason: str
    seed: int | None
    time_to_first_token: float | None
    seconds: float
    logprobs: list[TokenLogprob] | None = None  # one per token id when the request asked for them

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


_END = object()


class RequestHandle:
    def __init__(self, request_id: str, on_cancel: Callable[[RequestHandle], None]) -> None:
        self.request_id = request_id
        self._on_cancel = on_cancel
        self._cond = threading.Condition()
        self._deltas: deque[StreamDelta] = deque()
        self._result: GenerationResult | None = None
        self._error: BaseException | None = None
        self._done = False
        self._cancel_requested = False
        self._waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # woken on every delta
        self._end_waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []  # woken when it ends

    # --- caller side ------------------------------------------------------------------------------------------

    @property
    def done(self) -> bool:
        return self._done

    @property
    def cancel_requested(self) -> bool:
        return self._cancel_requested

    def cancel(self) -> None:
        """Stop the request at the next step boundary (no-op once finished)."""
        if self._done or self._cancel_requested:
            return
        self._cancel_requested = True
        self._on_cancel(self)

    def result(self, timeout: float | None = None) -> GenerationResult:
        """Block until the request finishes; raise its error if it failed."""
        with self._cond:
            if not self._cond.wait_for(lambda: self._done, timeout):
                raise TimeoutError(f"request {self.request_id} did not finish within {timeout} s")
        return self._outcome()

    async def wait(self) -> GenerationResult:
        """Await the end of the request without consuming its deltas."""
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._add_waiter(loop, wake, every_delta=False)
        try:
            while not self._done:
                await wake.wait()
        finally:
            self._remove_waiter(loop, wake)
        return self._outcome()

    def __iter__(self) -> Iterator[StreamDelta]:
        """Blocking iteration over the deltas; stopping early cancels the request."""
        try:
            while True:
                with self._cond:
                    self._cond.wait_for(lambda: self._deltas or self._done)
                    item = self._pop()
                if item is _END:
                    self._raise_error()
                    return
                assert isinstance(item, StreamDelta)
                yield item
        finally:
            if not self._done:
                self.cancel()

    def __aiter__(self) -> AsyncIterator[StreamDelta]:
        return self._aiter()

    async def _aiter(self) -> AsyncIterator[StreamDelta]:
        loop = asyncio.get_running_loop()
        wake = asyncio.Event()
        self._add_waiter(loop, wake)
        try:
            while True:
                wake.clear()
                with self._cond:
                    item = self._pop() if (self._deltas or self._done) else None
                if item is None:
                    await wake.wait()
                    continue
                if item is _END:
                    self._raise_error()
                    return
                assert isinstance(item, StreamDelta)
                yield item
        finally:
            self._remove_waiter(loop, wake)
            if not self._done:
                self.cancel()

    # --- engine side ------------------------------------------------------------------------------------------

    def push(self, delta: StreamDelta) -> None:
        with self._cond:
            self._deltas.append(delta)
            self._cond.notify_all()
        self._wake_async(ended=False)

    def finish(self, result: GenerationResult) -> None:
        with self._cond:
            self._result = result
            self._done = True
            self._cond.notify_all()
        self._wake_async(ended=True)

    def fail(self, error: BaseException, result: GenerationResult | None = None) -> None:
        with self._cond:
            self._error = error
            self._result = result
            self._done = True
            self._cond.notify_all()
        self._wake_async(ended=True)

    # --- internals --------------------------------------------------------------------------------------------

    def _pop(self) -> object:
        if self._deltas:
            return self._deltas.popleft()
        return _END

    def _outcome(self) -> GenerationResult:
        self._raise_error()
        assert self._result is not None
        return self._result

    def _raise_error(self) -> None:
        if self._error is not None:
            if isinstance(self._error, EngineError):
                raise self._error
            raise EngineError(f"request {self.request_id} failed: {self._error}") from self._error

    def _add_waiter(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event, every_delta: bool = True) -> None:
        with self._cond:
            (self._waiters if every_delta else self._end_waiters).append((loop, wake))

    def _remove_waiter(self, loop: asyncio.AbstractEventLoop, wake: asyncio.Event) -> None:
        with self._cond:
            self._waiters = [(lp, ev) for lp, ev in self._waiters if ev is not wake]
            self._end_waiters = [(lp, ev) for lp, ev in self._end_waiters if ev is not wake]

    def _wake_async(self, ended: bool) -> None:
        with self._cond:
            waiters = self._waiters + self._end_waiters if ended else list(self._waiters)
        for loop, wake in waiters:
            with contextlib.suppress(RuntimeError):  # a closed loop: nobody is listening any more
                loop.call_soon_threadsafe(wake.set)
