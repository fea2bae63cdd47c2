"""Completion requests on their way to the engine: from the moment one reaches the service until it is submitted
(``service.inference.submit``) or fails, the engine knows of it (``Engine.arrival``), so that an idle engine does not
prefill a burst's first request alone while the event loop is still parsing the others
(``EngineConfig.arrival_wait_ms``)."""

from __future__ import annotations

from contextvars import ContextVar
from typing import TYPE_CHECKING

from starlette.types import ASGIApp, Receive, Scope, Send

if TYPE_CHECKING:  # the engine imports torch; this module is imported before the port opens
    from service.engine import Arrival
    from service.state import Startup

COMPLETION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_current: ContextVar[Arrival | None] = ContextVar("icm_lora_arrival", default=None)


def submitted() -> None:
    """The current request has been submitted (or refused): its arrival ends."""
    arrival = _current.get()
    if arrival is not None:
        arrival.close()


class Arrivals:
    """Pure ASGI middleware: an ``Arrival`` for each completion request while the service is ready, closed when the
    route submits it and in any case when the request ends (a 4xx before submit, a client gone)."""

    def __init__(self, app: ASGIApp, startup: Startup) -> None:
        self.app = app
        self.startup = startup

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        state = self.startup.state
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] not in COMPLETION_PATHS
            or state is None
        ):
            await self.app(scope, receive, send)
            return
        arrival = state.engine.arrival()
        token = _current.set(arrival)
        try:
            await self.app(scope, receive, send)
        finally:
            arrival.close()
            _current.reset(token)
