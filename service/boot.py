"""Open the port before the heavy imports: ``icm-lora serve`` runs uvicorn on ``DeferredApp``, which answers at once
and builds the real application (torch, transformers, the service) in a background thread, then hands every request
to it. Imports nothing heavy itself.

While the application is being imported it answers as the application does while its model loads
(``service.state.Startup``): ``/healthz`` 200, ``/readyz`` 503 ``{"status": "loading", ...}``, everything else 503
with ``Retry-After`` (type ``loading``); a build that fails: ``/healthz`` and ``/readyz`` 503 ``failed``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager, suppress
from typing import Any

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

log = logging.getLogger(__name__)

RETRY_WHILE_LOADING_S = 5
LOADING_MESSAGE = "the service is starting: the model and generator are loading; retry shortly"


class DeferredApp:
    """``build``: imports and creates the application (a FastAPI app), in a background thread."""

    def __init__(self, build: Callable[[], Starlette]) -> None:
        self._build = build
        self._began = time.monotonic()
        self._app: Starlette | None = None
        self._lifespan: AbstractAsyncContextManager[Any] | None = None
        self._error: str | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "lifespan":
            await self._run_lifespan(receive, send)
        elif self._app is not None:
            await self._app(scope, receive, send)
        elif scope["type"] == "http":
            await self._answer_meanwhile(scope, send)

    async def _run_lifespan(self, receive: Receive, send: Send) -> None:
        await receive()  # lifespan.startup: the port opens now, the application comes later
        starting = asyncio.create_task(self._start())
        await send({"type": "lifespan.startup.complete"})
        await receive()  # lifespan.shutdown
        if not starting.done():
            starting.cancel()  # the import thread is a daemon: it does not hold the process
        with suppress(asyncio.CancelledError):
            await starting
        if self._lifespan is not None:
            await self._lifespan.__aexit__(None, None, None)
        await send({"type": "lifespan.shutdown.complete"})

    async def _start(self) -> None:
        loop = asyncio.get_running_loop()
        built: asyncio.Future[Starlette] = loop.create_future()

        def build() -> None:
            try:
                app = self._build()
            except BaseException as exc:  # reported through the future, on the loop
                loop.call_soon_threadsafe(_settle, built, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, built, app, None)

        threading.Thread(target=build, name="icm-lora-import", daemon=True).start()
        try:
            app = await built
            lifespan = app.router.lifespan_context(app)
            await lifespan.__aenter__()  # the application's own start-up: it loads its model in the background
        except Exception as exc:
            log.exception("icm-lora could not start")
            self._error = f"{type(exc).__name__}: {exc}"
            return
        self._lifespan, self._app = lifespan, app

    async def _answer_meanwhile(self, scope: Scope, send: Send) -> None:
        path = scope.get("path", "")
        checks: dict[str, object] = {"loading_s": round(time.monotonic() - self._began, 1)}
        status = "failed" if self._error is not None else "loading"
        if self._error is not None:
            checks["error"] = self._error
        headers: list[tuple[bytes, bytes]] = []
        body: dict[str, object]
        if path == "/healthz":
            code, body = (503 if self._error else 200), {"status": "failed" if self._error else "ok", "checks": {}}
            if self._error:
                body["checks"] = checks
        elif path == "/readyz":
            code, body = 503, {"status": status, "checks": checks}
        elif self._error is not None:
            code = 503
            body = {"error": {"type": "unavailable", "message": f"the service failed to start: {self._error}"}}
        else:
            code, body = 503, {"error": {"type": "loading", "message": LOADING_MESSAGE}}
            headers.append((b"retry-after", str(RETRY_WHILE_LOADING_S).encode()))
        payload = json.dumps(body).encode()
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        await send({"type": "http.response.start", "status": code, "headers": headers})
        await send({"type": "http.response.body", "body": payload})


def _settle(future: asyncio.Future[Starlette], app: Starlette | None, error: BaseException | None) -> None:
    if future.done():  # cancelled at shutdown
        return
    if error is not None:
        future.set_exception(error)
    elif app is not None:
        future.set_result(app)
